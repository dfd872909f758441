#include "node_pool.hpp"

#include <new>
#include <thread>

#include "page_ops.hpp"
#include "page_ops_api.hpp"
#include "vma.hpp"

namespace usermm::detail {

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kOwnRange = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kOwnRange = false;
#else
constexpr bool kOwnRange = true;
#endif
#else
constexpr bool kOwnRange = true;
#endif

constinit NodePool g_vma_nodes(sizeof(Vma));

}  // namespace

NodePool& vma_node_pool() { return g_vma_nodes; }

void NodePool::lock() noexcept {
    while (locked_.exchange(true, std::memory_order_acquire))
        while (locked_.load(std::memory_order_relaxed)) std::this_thread::yield();
}

void NodePool::reserve() noexcept {
    // PROT_NONE, so that it counts against neither RLIMIT_DATA nor the commit limit until a part
    // is made writable; reserved with room to start on a huge page's boundary, the rest given back.
    void* p = nullptr;
    if (page_reserve(kRange + kStep, &p) != 0) return;
    const auto at = reinterpret_cast<std::uintptr_t>(p);
    const std::uintptr_t aligned = (at + kStep - 1) & ~(kStep - 1);
    if (aligned > at) page_release(at, aligned - at);
    page_release(aligned + kRange, at + kStep - aligned);
    page_advise_huge(aligned + kStep, kRange - kStep);  // without huge pages, nodes still work
    base_ = next_ = writable_ = aligned;
}

void* NodePool::allocate() noexcept {
    lock();
    if (!tried_ && kOwnRange) {
        tried_ = true;
        reserve();
    }
    void* node = free_;
    if (node) {
        free_ = *static_cast<void**>(node);
    } else if (base_ && next_ + size_ <= base_ + kRange) {
        // At RLIMIT_DATA or the commit limit this node comes from the heap, and the next asks again.
        if (next_ + size_ > writable_ && page_protect(writable_, kStep, Prot::ReadWrite) == 0) writable_ += kStep;
        if (next_ + size_ <= writable_) {
            node = reinterpret_cast<void*>(next_);
            next_ += size_;
        }
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
