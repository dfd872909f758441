#include "map_budget.hpp"

#include <atomic>

namespace usermm::detail {

namespace {
constinit std::atomic<long> g_used{0};
constinit std::atomic<long> g_limit{1L << 62};
constinit std::atomic<bool> g_kernel_merges{true};

// A value no PTE holds, for the pages beyond the arena: another mapping is always a boundary.
constexpr unsigned kOutside = 0x100;

unsigned prot_at(const ArenaCore& arena, std::size_t index, std::size_t npages) {
    if (index >= npages) return kOutside;  // also catches index == SIZE_MAX, the page before 0
    return pte_prot(arena.pte[index].load(std::memory_order_relaxed));
}
}  // namespace

void map_budget_set_limit(long limit) { g_limit.store(limit, std::memory_order_relaxed); }
long map_budget_limit() { return g_limit.load(std::memory_order_relaxed); }
long map_budget_used() { return g_used.load(std::memory_order_relaxed); }

long map_count_delta(const ArenaCore& arena, std::size_t first, std::size_t last, Prot prot) {
    const std::size_t npages = arena.page_index(arena.end);
    const unsigned p = to_pte(prot);
    long before = 0;
    unsigned prev = prot_at(arena, first - 1, npages);
    const unsigned left = prev;
    for (std::size_t i = first; i <= last; ++i) {
        const unsigned cur = prot_at(arena, i, npages);
        before += cur != prev;
        prev = cur;
    }
    const unsigned right = prev;
    if (!g_kernel_merges.load(std::memory_order_relaxed)) {
        // Existing boundaries stay; a new one appears where a neighbour equal to the range's old
        // protection differs from the new one.
        return long(left == prot_at(arena, first, npages) && left != p) +
               long(right == prot_at(arena, last - 1, npages) && right != p);
    }
    const long after = long(left != p) + long(right != p);
    return after - before;
}

bool map_budget_try_charge(ArenaCore& arena, long delta) {
    if (delta <= 0) {
        map_budget_charge(arena, delta);
        return true;
    }
    long used = g_used.load(std::memory_order_relaxed);
    do {
        if (used + delta > g_limit.load(std::memory_order_relaxed)) return false;
    } while (!g_used.compare_exchange_weak(used, used + delta, std::memory_order_relaxed));
    arena.kernel_maps.fetch_add(delta, std::memory_order_relaxed);
    return true;
}

void map_budget_after_fork(ArenaCore& arena, long kernel_maps) {
    g_kernel_merges.store(false, std::memory_order_relaxed);
    map_budget_charge(arena, kernel_maps - arena.kernel_maps.load(std::memory_order_relaxed));
}

void map_budget_charge(ArenaCore& arena, long delta) {
    g_used.fetch_add(delta, std::memory_order_relaxed);
    arena.kernel_maps.fetch_add(delta, std::memory_order_relaxed);
}

}  // namespace usermm::detail
