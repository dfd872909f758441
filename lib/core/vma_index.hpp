// The VMA index: the arena's VMAs again, by end, in a B+tree of wide nodes, so that find_vma at
// 10^5 VMAs reads three nodes (the upper two stay in the cache) instead of seventeen tree links.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace usermm::detail {

struct Vma;

// One node: a leaf holds VMA ends and their VMAs, an inner node its children's largest keys and the
// children. A lookup scans all of a node's keys: the loads do not depend on one another, so the
// node's four lines of keys cost one miss, where a binary search would wait for each line in turn.
struct VmaIndexNode {
    static constexpr std::uint32_t kSlots = 32;
    static constexpr std::uintptr_t kNoKey = INTPTR_MAX;   // past count: above every user address
    alignas(64) std::uintptr_t keys[kSlots];               // ascending
    void* slots[kSlots];                                   // Vma* in a leaf, VmaIndexNode* above
    std::uint32_t count;

    // How many keys are at or below x (a user address, in the lower half of the address space as
    // every key is): the keys above
    // it are those whose difference from it is negative, a count without compares or branches that
    // the compiler turns into vector arithmetic. The slots are fetched meanwhile: the one read
    // next waits for the keys only.
    std::uint32_t rank(std::uintptr_t x) const {
        for (std::uint32_t i = 0; i < kSlots; i += 64 / sizeof(void*)) __builtin_prefetch(slots + i);
        std::uintptr_t above = 0;
        for (std::uint32_t i = 0; i < kSlots; ++i) above += (x - keys[i]) >> (sizeof x * 8 - 1);
        return kSlots - std::uint32_t(above);
    }
};

// Read under the arena's read lock (the fault world) or its write lock; changed only by the API
// world under the write lock, by vma_link and vma_unlink (api/arena_ops.cpp), with the tree. Its
// nodes are allocated there too. An insertion that finds no memory for a node leaves the index
// unusable, with no node, and find_vma walks the tree until a vma_link finds the memory to build
// it again.
class VmaIndex {
public:
    VmaIndex() = default;
    VmaIndex(const VmaIndex&) = delete;
    VmaIndex& operator=(const VmaIndex&) = delete;
    ~VmaIndex();

    bool usable() const { return usable_; }
    std::size_t size() const { return size_; }

    // The first VMA whose end is above addr, or nullptr: the tree's upper_bound. The leaf of the
    // previous answer answers first, for a scan that faults from one VMA into the next: it holds a
    // run of consecutive ends, so an address above its first and below its last has its answer
    // there.
    Vma* find(std::uintptr_t addr) const {
        if (const VmaIndexNode* leaf = last_leaf_.load(std::memory_order_relaxed)) {
            const std::uint32_t p = leaf->rank(addr);
            if (p > 0 && p < leaf->count) return static_cast<Vma*>(leaf->slots[p]);
        }
        const VmaIndexNode* n = root_;
        if (!n) return nullptr;
        std::uint32_t p = n->rank(addr);
        if (p == n->count) return nullptr;
        for (std::uint32_t level = 1; level < height_; ++level) {
            n = static_cast<const VmaIndexNode*>(n->slots[p]);
            p = n->rank(addr);
        }
        last_leaf_.store(n, std::memory_order_relaxed);
        return static_cast<Vma*>(n->slots[p]);
    }

    // API world, under the write lock. insert returns false, the index unchanged, if it had no
    // memory for the nodes a split needs; erase and clear never allocate.
    bool insert(Vma& v);
    void erase(const Vma& v);
    void clear();
    void set_usable(bool usable) { usable_ = usable; }

private:
    // Far above the height of any arena's index: a root splits only when full, and a tree built in
    // address order (as vma_link rebuilds one) is full, log32 of the VMAs high.
    static constexpr std::uint32_t kMaxHeight = 24;

    VmaIndexNode* root_ = nullptr;
    // Written by lookups under the read lock (a hint: any leaf it names is alive until the write
    // lock is taken); forgotten by every change.
    mutable std::atomic<const VmaIndexNode*> last_leaf_{nullptr};
    std::uint32_t height_ = 0;  // levels, the leaves' included
    bool usable_ = true;
    std::size_t size_ = 0;
};

}  // namespace usermm::detail
