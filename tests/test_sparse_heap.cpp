// A sparse heap (records written at random places of a large VMA) must not become tens of thousands
// of kernel VMAs: fork() copies each of them, and arming a snapshot pays a kernel call and a TLB
// shootdown for each piece it write-protects.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

TEST_CASE("20,000 random records in a 2 GiB VMA are a few kernel VMAs, also across snapshots") {
    constexpr std::size_t kVma = 2ull << 30, kRecords = 20000, kRecord = 64;
    usermm::Arena arena(kVma + (64ull << 20));
    char* table = static_cast<char*>(arena.map(kVma, Prot::ReadWrite, {.name = "kv-table"}));
    std::mt19937_64 rng(8);
    std::set<std::size_t> places;  // distinct, so that each record keeps its own values
    while (places.size() < kRecords) places.insert((rng() % (kVma / kRecord)) * kRecord);
    std::vector<std::size_t> at(places.begin(), places.end());
    std::shuffle(at.begin(), at.end(), rng);
    for (std::size_t i = 0; i < kRecords; ++i) write_u64(table + at[i], i + 1);
    // One record per ~26 pages: isolated 16-page fault-around windows would be ~14,000 pieces of
    // read-write memory between PROT_NONE ones, ~28,000 kernel VMAs.
    const long after_writes = mappings_within(arena.base(), arena.size());
    MESSAGE("kernel VMAs after the writes: " << after_writes);
    CHECK(after_writes < 4000);

    usermm::Snapshot first = arena.snapshot();
    for (std::size_t i = 0; i < kRecords; i += 4) write_u64(table + at[i], i + 2);
    // Re-arming gives the pages written since the first snapshot the protection of their
    // neighbours again (the mprotect engine split a kernel VMA out for each).
    usermm::Snapshot second = arena.snapshot();
    const long after_snapshots = mappings_within(arena.base(), arena.size());
    MESSAGE("kernel VMAs after two snapshots: " << after_snapshots);
    CHECK(after_snapshots < 4000);
    for (std::size_t i = 0; i < kRecords; i += 3) write_u64(table + at[i], i + 3);
    arena.verify();

    // Content: the arena holds the last write of each record, each snapshot what it had then.
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < kRecords; ++i) {
        const std::uint64_t in_first = i + 1, in_second = i % 4 == 0 ? i + 2 : in_first;
        const std::uint64_t now = i % 3 == 0 ? i + 3 : in_second;
        std::uint64_t v1 = 0, v2 = 0;
        first.read(table + at[i], &v1, sizeof v1);
        second.read(table + at[i], &v2, sizeof v2);
        wrong += read_u64(table + at[i]) != now || v1 != in_first || v2 != in_second;
    }
    CHECK(wrong == 0);
    const usermm::Stats s = arena.stats();
    CHECK(s.access_errors == 0);
    CHECK(s.degraded_faults == 0);
}
