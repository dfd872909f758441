// The kernel's mapping budget (invariant 4): per-page protection in a large region runs into
// vm.max_map_count; usermm must stay within its budget and degrade instead of failing or looping.
#include <doctest/doctest.h>

#include <cstdlib>
#include <random>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

namespace {

// Writes `writes` single pages at random offsets of a `vma_bytes` VMA, then reads all of them back.
void random_writes(usermm::Arena& arena, std::size_t vma_bytes, std::size_t writes, std::uint64_t seed) {
    const std::size_t ps = usermm::page_size();
    char* base = static_cast<char*>(arena.map(vma_bytes, Prot::ReadWrite, {.name = "sparse"}));
    std::mt19937_64 rng(seed);
    std::vector<std::size_t> pages(writes);
    for (auto& p : pages) p = rng() % (vma_bytes / ps);
    for (std::size_t i = 0; i < writes; ++i) write_u64(base + pages[i] * ps + 8, pages[i] * 2654435761u + 1);
    for (std::size_t i = 0; i < writes; ++i)
        if (read_u64(base + pages[i] * ps + 8) != pages[i] * 2654435761u + 1) std::_Exit(3);
}


}  // namespace

// Both cases run in children: the budget is fixed when a process creates its first arena, and the
// second case sets it through the environment first.
TEST_CASE("200,000 random single-page writes in a 64 GiB VMA stay within vm.max_map_count") {
    const long limit = max_map_count();
    const ChildEnd end = run_in_child(
        [limit] {
            usermm::Arena arena(64ull << 30);
            random_writes(arena, 64ull << 30, 200000, 42);
            if (process_mappings() >= limit) std::_Exit(4);
            arena.verify();
            const usermm::Stats s = arena.stats();
            if (s.degraded_faults == 0) std::_Exit(5);  // 200,000 isolated pages cannot fit otherwise
            if (s.minor_faults == 0 || s.access_errors != 0) std::_Exit(6);
        },
        120);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

TEST_CASE("a small budget: degraded faults keep the mapping count near the budget, content intact") {
    const ChildEnd end = run_in_child([] {
        setenv("USERMM_MAP_BUDGET", "200", 1);
        const long before = process_mappings();
        usermm::Arena arena(1ull << 30);
        random_writes(arena, 1ull << 30, 5000, 7);
        arena.verify();
        const usermm::Stats s = arena.stats();
        if (s.degraded_faults == 0 || s.degraded_pages == 0) std::_Exit(5);
        // The budget covers the kernel mappings the arena consists of (the sanitizers add mappings
        // of their own elsewhere, so the count is taken inside the arena).
        if (mappings_within(arena.base(), arena.size()) > 200) std::_Exit(4);
        if (process_mappings() <= before) std::_Exit(7);
    });
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}
