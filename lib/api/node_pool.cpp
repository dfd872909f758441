#include "node_pool.hpp"

#include <new>

#include "page_ops.hpp"
#include "page_ops_api.hpp"
#include "vma.hpp"

namespace usermm::detail {

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kOwnRange = false;
#else
constexpr bool kOwnRange = true;
#endif

constinit NodePool g_vma_nodes(sizeof(Vma));

}  // namespace

NodePool& vma_node_pool() { return g_vma_nodes; }

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
    std::unique_lock guard(lock_);
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
    guard.unlock();
    return node ? node : ::operator new(size_, std::nothrow);
}

void NodePool::deallocate(void* p) noexcept {
    if (!mine(p)) return ::operator delete(p);
    std::lock_guard guard(lock_);
    *static_cast<void**>(p) = free_;
    free_ = p;
}

void* Vma::operator new(std::size_t) {
    if (void* p = vma_node_pool().allocate()) return p;
    throw std::bad_alloc();
}

void Vma::operator delete(void* p) noexcept { vma_node_pool().deallocate(p); }

}  // namespace usermm::detail
