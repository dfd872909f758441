// The slab that VMAs' counters live in (VmaCounters): chunks that are never freed, handed out and
// taken back through a free list, so that taking a VMA's counters out of its node keeps the node
// small without a heap allocation per VMA beside it.
#include <memory>
#include <mutex>
#include <vector>

#include "counters.hpp"
#include "vma_counters.hpp"

namespace usermm::detail {

namespace {

constexpr std::size_t kChunk = 256;

struct CounterSlab {
    std::mutex lock;  // a leaf of the lock order: nothing is taken under it
    std::vector<std::unique_ptr<Counters[]>> chunks;
    std::vector<Counters*> free;
};

// Never destroyed: arenas that outlive static destruction still free their VMAs.
CounterSlab& slab() {
    static CounterSlab* s = new CounterSlab;
    return *s;
}

}  // namespace

Counters* vma_counters_take() {
    CounterSlab& s = slab();
    std::lock_guard guard(s.lock);
    if (s.free.empty()) {
        s.free.reserve((s.chunks.size() + 1) * kChunk);  // room for every counter, for give()
        s.chunks.push_back(std::make_unique<Counters[]>(kChunk));
        for (std::size_t i = kChunk; i-- > 0;) s.free.push_back(&s.chunks.back()[i]);
    }
    Counters* c = s.free.back();
    s.free.pop_back();
    return c;
}

void vma_counters_give(Counters* c) noexcept {
    c->reset();
    CounterSlab& s = slab();
    std::lock_guard guard(s.lock);
    s.free.push_back(c);  // cannot throw: the free list has room for every counter ever taken
}

void vma_counters_lock_for_fork() { slab().lock.lock(); }
void vma_counters_unlock_after_fork() { slab().lock.unlock(); }

}  // namespace usermm::detail
