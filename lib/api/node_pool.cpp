#include "node_pool.hpp"

#include <pthread.h>

#include <new>
#include <thread>

#include "page_ops_api.hpp"
#include "vma.hpp"

namespace usermm::detail {

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kOwnRange = false;
#else
constexpr bool kOwnRange = true;
#endif

constexpr std::size_t kHuge = std::size_t(2) << 20;

constinit NodePool g_vma_nodes(sizeof(Vma));

[[gnu::constructor]] void register_fork_handler() {
    pthread_atfork(nullptr, nullptr, [] { g_vma_nodes.after_fork_child(); });
}

}  // namespace

NodePool& vma_node_pool() { return g_vma_nodes; }

void NodePool::lock() noexcept {
    while (locked_.exchange(true, std::memory_order_acquire))
        while (locked_.load(std::memory_order_relaxed)) std::this_thread::yield();
}

void* NodePool::allocate() noexcept {
    lock();
    if (!tried_ && kOwnRange) {
        tried_ = true;
        // Reserved with room to start on a huge page's boundary; the rest goes back.
        void* p = nullptr;
        if (page_alloc_table(kRange + kHuge, &p) == 0) {
            const auto at = reinterpret_cast<std::uintptr_t>(p);
            const std::uintptr_t aligned = (at + kHuge - 1) & ~(kHuge - 1);
            if (aligned > at) page_release(at, aligned - at);
            page_release(aligned + kRange, at + kHuge - aligned);
            page_advise_huge(aligned + kSmall, kRange - kSmall);  // without huge pages, nodes still work
            base_ = next_ = aligned;
        }
    }
    void* node = free_;
    if (node) {
        free_ = *static_cast<void**>(node);
    } else if (base_ && next_ + size_ <= base_ + kRange) {
        node = reinterpret_cast<void*>(next_);
        next_ += size_;
    }
    unlock();
    return node ? node : ::operator new(size_, std::nothrow);
}

void NodePool::deallocate(void* p) noexcept {
    if (!p) return;
    if (!mine(p)) return ::operator delete(p);
    lock();
    *static_cast<void**>(p) = free_;
    free_ = p;
    unlock();
}

void* Vma::operator new(std::size_t) {
    if (void* p = vma_node_pool().allocate()) return p;
    throw std::bad_alloc();
}

void Vma::operator delete(void* p) noexcept { vma_node_pool().deallocate(p); }

}  // namespace usermm::detail
