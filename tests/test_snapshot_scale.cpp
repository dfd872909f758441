// The scale case of snapshots: a 1 GiB fully resident arena, a snapshot, then writes to 25% of its
// pages at random. A naive mprotect-per-page runtime hits vm.max_map_count here and loops on one
// fault; usermm must complete, keep the content right, and grow only by the copied pages (the
// uffd engine exactly; the mprotect engine, past its map budget, copies whole runs at once).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <usermm/usermm.hpp>

#include "page_ops_api.hpp"
#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

TEST_CASE("1 GiB resident, snapshot, 25% of pages rewritten at random: completes, content right, memory bounded") {
    const std::size_t ps = usermm::page_size();
    const std::size_t pages = (1ull << 30) / ps;
    usermm::Arena arena(2ull << 30);
    char* heap = static_cast<char*>(arena.map(pages * ps, Prot::ReadWrite, {.name = "heap", .fault_around_pages = 512}));
    for (std::size_t p = 0; p < pages; ++p) write_u64(heap + p * ps, p);

    usermm::Snapshot snap = arena.snapshot(heap, pages * ps);
    std::vector<std::size_t> order(pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(25));
    const std::size_t written = pages / 4;
    for (std::size_t k = 0; k < written; ++k) write_u64(heap + order[k] * ps, ~order[k]);

    // The arena has the new values, the snapshot the old ones, for every page.
    std::vector<std::uint64_t> before(pages);
    snap.for_each_page([&](const void* addr, std::span<const std::byte> page) {
        const std::size_t p = std::size_t(static_cast<const char*>(addr) - heap) / ps;
        std::memcpy(&before[p], page.data(), sizeof(std::uint64_t));
    });
    std::size_t wrong_snapshot = 0, wrong_arena = 0;
    std::vector<bool> was_written(pages);
    for (std::size_t k = 0; k < written; ++k) was_written[order[k]] = true;
    for (std::size_t p = 0; p < pages; ++p) {
        wrong_snapshot += before[p] != p;
        wrong_arena += read_u64(heap + p * ps) != (was_written[p] ? ~p : p);
    }
    CHECK(wrong_snapshot == 0);
    CHECK(wrong_arena == 0);

    const usermm::Stats s = snap.stats();
    const std::size_t copied = s.cow_bytes_copied / ps;
    CHECK(copied >= written);
    if (usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd)
        CHECK(copied == written);  // exactly the pages written
    else
        CHECK(copied <= pages);  // whole runs past the map budget, never more than the range
    CHECK(process_mappings() < max_map_count());
    arena.verify();
}
