// Memory for the VMA nodes, which find_vma reaches by a pointer from the index: one range of
// address space, nodes handed out in order, whose pages past the first 2 MiB the kernel backs with
// transparent huge pages. 10^5 VMA nodes are 16 MB, 4,000 small pages, more than the TLB holds: on
// the heap a random lookup missed the TLB as well as the cache, and a scan in address order found
// its nodes scattered (perf/run core, same session: random 16.3x the 10-VMA case on the heap,
// 12.0-13.5x here; in address order 2.10x, 1.15-1.34x). The index's own nodes (1.8 MB at 10^5 VMAs)
// measured the same either way and stay on the heap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>

namespace usermm::detail {

// Nodes of one size, API world only. Freed nodes are kept for the next allocation, as the kernel's
// slab caches keep theirs: the range holds the peak number of nodes. Once it is used up, or where
// the kernel refuses it or its next writable part (at vm.max_map_count, RLIMIT_DATA or the commit
// limit), nodes come from the global heap; under AddressSanitizer they always do, so that a node
// used after it was freed is still caught.
class NodePool {
public:
    explicit constexpr NodePool(std::size_t node_size) : size_((node_size + 63) / 64 * 64) {}
    // nullptr if no memory is left.
    void* allocate() noexcept;
    void deallocate(void* p) noexcept;
    // Taken inside allocate and deallocate, and by usermm's fork handlers (api/arena.cpp) after
    // every arena's lock, so that the child's pool is whole. A leaf: its holder waits for nothing
    // else (a system call at most), while a thread holding an arena's write lock may wait for it.
    void lock() { lock_.lock(); }
    void unlock() { lock_.unlock(); }

private:
    static constexpr std::size_t kRange = std::size_t(1) << 30;
    // The range becomes writable 2 MiB at a time, a huge page each but for the first, so that a
    // program with few VMAs holds no huge page for them.
    static constexpr std::size_t kStep = std::size_t(2) << 20;

    void reserve() noexcept;
    bool mine(const void* p) const {
        const auto at = reinterpret_cast<std::uintptr_t>(p);
        return base_ && at >= base_ && at < base_ + kRange;
    }

    std::size_t size_;
    std::mutex lock_;
    bool tried_ = false;           // the range was asked for (once)
    std::uintptr_t base_ = 0;
    std::uintptr_t next_ = 0;      // the first node never handed out
    std::uintptr_t writable_ = 0;  // the end of the part made writable
    void* free_ = nullptr;         // freed nodes, each holding the next
};

NodePool& vma_node_pool();

}  // namespace usermm::detail
