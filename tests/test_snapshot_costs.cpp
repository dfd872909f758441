// What snapshots and restore() cost: a page nobody wrote is recorded as zero, never copied (whatever
// granted it write access: fault-around, prefault, a budget-degraded fault); restore() changes only
// the pages it restores and leaves the kernel-mapping count exact.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <barrier>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <usermm/usermm.hpp>

#include "arena_ops.hpp"
#include "file_test_util.hpp"
#include "map_budget.hpp"
#include "test_util.hpp"

namespace {

using namespace usermm_test;
using usermm::Prot;

std::size_t ps() { return usermm::page_size(); }

// The size of the image (or increment) the snapshot writes.
std::size_t image_bytes(const usermm::Snapshot& snap, const usermm::Snapshot* previous = nullptr) {
    const int fd = memfd_create("usermm-test-costs", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    if (previous)
        snap.write_to(fd, *previous);
    else
        snap.write_to(fd);
    const auto size = std::size_t(lseek(fd, 0, SEEK_END));
    close(fd);
    return size;
}


long counted_maps(const usermm::Arena& arena) {
    return usermm::detail::ArenaAccess::core(arena).kernel_maps.load();
}

// In a forked child: what USERMM_MAP_BUDGET=n does for a process's first arena (earlier cases of
// this file created arenas in the parent, so the environment is read no more): n mappings for
// arenas made from now on.
void limit_map_budget(long n) {
    usermm::detail::map_budget_set_limit(usermm::detail::map_budget_used() + n);
}

}  // namespace

TEST_CASE("prefault(Write) with a snapshot live copies only the pages that were written") {
    // Each write fault grants write access to its 16-page window; 15 of those pages are never
    // written. A read-faulted window maps the kernel's zero page, which holds no data either.
    usermm::Arena arena(256ull << 20);
    const std::size_t pages = 8192;
    char* heap = static_cast<char*>(arena.map(pages * ps(), Prot::ReadWrite, {.name = "heap"}));
    const std::size_t written = 100;
    for (std::size_t k = 0; k < written; ++k) write_u64(heap + k * 64 * ps(), k + 1);
    for (std::size_t k = 0; k < written; ++k) CHECK(read_u64(heap + (k * 64 + 32) * ps()) == 0);
    usermm::Snapshot before = arena.snapshot();
    arena.prefault(heap, pages * ps(), Prot::ReadWrite);
    CHECK(before.stats().cow_faults == written);
    CHECK(before.stats().cow_bytes_copied == written * ps());
    std::size_t visited = 0;
    before.for_each_page([&](const void*, std::span<const std::byte>) { ++visited; });
    CHECK(visited == written);
    for (std::size_t k = 0; k < written; ++k) {
        std::uint64_t v = 0;
        before.read(heap + k * 64 * ps(), &v, sizeof v);
        CHECK(v == k + 1);
    }
    // Nothing was written since, though prefault made every page writable: the next increment
    // holds no page.
    usermm::Snapshot after = arena.snapshot();
    CHECK(image_bytes(after, &before) < ps());
    arena.verify();
}

TEST_CASE("a snapshot that outlives its arena holds only the pages written") {
    std::optional<usermm::Snapshot> snap;
    {
        usermm::Arena arena(16ull << 20);
        char* heap = static_cast<char*>(arena.map(256 * ps(), Prot::ReadWrite, {.name = "heap"}));
        write_u64(heap + 3 * ps(), 42);
        snap.emplace(arena.snapshot());
    }
    std::size_t visited = 0;
    snap->for_each_page([&](const void*, std::span<const std::byte> page) {
        ++visited;
        std::uint64_t v;
        std::memcpy(&v, page.data(), sizeof v);
        CHECK(v == 42);
    });
    CHECK(visited == 1);
    CHECK(snap->stats().cow_faults == 1);  // the written page, copied as the arena went
    CHECK(image_bytes(*snap) < 2 * ps());
}

TEST_CASE("restore keeps the kernel-mapping count exact on a fragmented heap") {
    for (const char* budget : {"5000", ""}) {
        INFO("USERMM_MAP_BUDGET=" << std::string(budget));
        const ChildEnd end = run_in_child(
            [budget] {
                if (*budget) limit_map_budget(std::atoi(budget));
                usermm::Arena arena(16ull << 30);
                char* heap = static_cast<char*>(arena.map(8ull << 30, Prot::ReadWrite, {.name = "sparse"}));
                const std::size_t pages = (8ull << 30) / ps();
                std::mt19937_64 rng(8);
                for (int k = 0; k < 20000; ++k) write_u64(heap + (rng() % pages) * ps(), 1);
                usermm::Snapshot snap = arena.snapshot();
                for (int k = 0; k < 20000; ++k) write_u64(heap + (rng() % pages) * ps(), 2);
                auto check = [&](const char* when, int round) {
                    const long kernel = mappings_within(arena.base(), arena.size()) + 2;
                    if (counted_maps(arena) == kernel) return;
                    std::fprintf(stderr, "round %d, %s: usermm counts %ld, the kernel has %ld\n", round, when,
                                 counted_maps(arena), kernel);
                    std::_Exit(4);
                };
                for (int round = 0; round < 3; ++round) {
                    arena.restore(snap);
                    check("after restore", round);
                    for (std::size_t p = 0; p < pages; p += 997) (void)read_u64(heap + p * ps());
                    check("after reads", round);
                    for (int k = 0; k < 2000; ++k) write_u64(heap + (rng() % pages) * ps(), 3);
                    check("after writes", round);
                }
                arena.verify();
            },
            120);
        INFO(end.err);
        CHECK(end.signal == 0);
        CHECK(end.exit_code == 0);
    }
}

TEST_CASE("restore of many scattered pages of a dense heap stays within the map budget") {
    // Each restored page becomes PROT_NONE inside a writable mapping, two kernel mappings more:
    // past the budget, restore resets the whole range instead, as it did before it kept access.
    const ChildEnd end = run_in_child(
        [] {
            limit_map_budget(1000);
            usermm::Arena arena(1ull << 30);
            const std::size_t pages = 65536;
            char* heap = static_cast<char*>(arena.map(pages * ps(), Prot::ReadWrite, {.name = "dense"}));
            for (std::size_t p = 0; p < pages; ++p) write_u64(heap + p * ps(), p + 1);
            usermm::Snapshot snap = arena.snapshot();
            std::mt19937_64 rng(3);
            for (int k = 0; k < 5000; ++k) write_u64(heap + (rng() % pages) * ps(), 0);
            arena.restore(snap);
            const long kernel = mappings_within(arena.base(), arena.size()) + 2;
            std::fprintf(stderr, "after restore: usermm counts %ld, the kernel has %ld\n", counted_maps(arena), kernel);
            if (counted_maps(arena) != kernel) std::_Exit(4);
            if (kernel > 1000) std::_Exit(5);
            for (std::size_t p = 0; p < pages; ++p)
                if (read_u64(heap + p * ps()) != p + 1) std::_Exit(6);
            arena.verify();
        },
        60);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

TEST_CASE("restore of k pages: the pages it did not change keep their access") {
    usermm::Arena arena(256ull << 20);
    const std::size_t pages = 16384;
    char* heap = static_cast<char*>(arena.map(pages * ps(), Prot::ReadWrite, {.name = "warm"}));
    for (std::size_t p = 0; p < pages; ++p) write_u64(heap + p * ps(), p + 1);
    usermm::Snapshot snap = arena.snapshot();
    const std::size_t k = 10;
    for (std::size_t j = 0; j < k; ++j) write_u64(heap + j * 1000 * ps(), 7);
    arena.restore(snap);
    const usermm::Stats before = arena.stats();
    for (std::size_t p = 0; p < pages; ++p) REQUIRE(read_u64(heap + p * ps()) == p + 1);
    const std::uint64_t read_faults = arena.stats().minor_faults - before.minor_faults;
    CHECK(read_faults <= k * 16 + 16);
    CHECK(read_faults >= 1);
    // The restored pages hold data: reading them is no zero-page read.
    CHECK(arena.stats().zero_page_reads == before.zero_page_reads);
    // Writes fault only where a snapshot needs the old content: every page is tracked again.
    for (std::size_t p = 0; p < pages; ++p) write_u64(heap + p * ps(), p + 2);
    CHECK(snap.stats().cow_faults == pages);
    arena.restore(snap);
    for (std::size_t p = 0; p < pages; ++p) REQUIRE(read_u64(heap + p * ps()) == p + 1);
    arena.verify();
}

TEST_CASE("restore keeps the per-VMA counters, as the arena's") {
    usermm::Arena arena(64ull << 20);
    char* heap = static_cast<char*>(arena.map(1024 * ps(), Prot::ReadWrite, {.name = "heap"}));
    for (std::size_t p = 0; p < 1024; p += 16) write_u64(heap + p * ps(), p + 1);
    usermm::Snapshot snap = arena.snapshot();
    for (std::size_t p = 0; p < 1024; p += 16) write_u64(heap + p * ps(), p + 2);
    arena.protect(heap, 512 * ps(), Prot::Read);  // restore puts the one VMA back
    auto faults = [&] {
        std::uint64_t n = 0;
        for (const usermm::VmaInfo& v : arena.vmas()) n += v.stats.minor_faults;
        return n;
    };
    const std::uint64_t before = faults();
    REQUIRE(before >= 64);
    arena.restore(snap);
    CHECK(arena.vmas().size() == 1);
    CHECK(faults() == before);
    CHECK(arena.stats().minor_faults == before);

    // A snapshot of a range that held no VMA: restore unmaps what was mapped there since.
    usermm::Arena empty(16ull << 20);
    usermm::Snapshot none = empty.snapshot();
    write_u64(empty.map(4 * ps(), Prot::ReadWrite), 1);
    empty.restore(none);
    CHECK(empty.vmas().empty());
    empty.verify();
}

// The writers' stores are hidden from ThreadSanitizer: a degraded fault of one thread copies pages
// that the other writes once their protection is lifted, an order the kernel keeps and TSan cannot
// see (as in test_snapshot_threads).
__attribute__((no_sanitize("thread"))) void store_u64(void* p, std::uint64_t v) {
    *static_cast<volatile std::uint64_t*>(p) = v;
}

TEST_CASE("past a small map budget, concurrent writers: snapshots copy and image only pages written") {
    // Degraded faults grant write access to whole runs of untouched pages; none of those holds data.
    const ChildEnd end = run_in_child(
        [] {
            limit_map_budget(100);
            usermm::Arena arena(1ull << 30);
            const std::size_t pages = 65536;
            char* heap = static_cast<char*>(arena.map(pages * ps(), Prot::ReadWrite, {.name = "table"}));
            constexpr std::size_t kThreads = 2, kWrites = 1500;
            // Each thread writes its own pages: a first set before the snapshot, a second after.
            std::vector<std::size_t> first[kThreads], second[kThreads];
            std::mt19937_64 rng(5);
            for (std::size_t t = 0; t < kThreads; ++t)
                for (std::size_t k = 0; k < kWrites; ++k) {
                    first[t].push_back((rng() % (pages / kThreads)) * kThreads + t);
                    second[t].push_back((rng() % (pages / kThreads)) * kThreads + t);
                }
            std::barrier sync(kThreads + 1);
            std::vector<std::thread> writers;
            for (std::size_t t = 0; t < kThreads; ++t)
                writers.emplace_back([&, t] {
                    for (std::size_t p : first[t]) store_u64(heap + p * ps(), p + 1);
                    sync.arrive_and_wait();  // the snapshot is taken
                    sync.arrive_and_wait();
                    for (std::size_t p : second[t]) store_u64(heap + p * ps(), p + 2);
                });
            sync.arrive_and_wait();
            usermm::Snapshot before = arena.snapshot();
            sync.arrive_and_wait();
            for (auto& w : writers) w.join();
            usermm::Snapshot after = arena.snapshot();
            if (arena.stats().degraded_faults == 0) std::_Exit(3);  // the budget was not reached
            std::size_t written = 0;
            for (std::size_t t = 0; t < kThreads; ++t) written += first[t].size();
            const std::uint64_t copies = before.stats().cow_faults;
            std::size_t full = 0;
            before.for_each_page([&](const void*, std::span<const std::byte>) { ++full; });
            // The increment holds at most the pages written after `before` (a record of 16 bytes
            // and the page each).
            const std::size_t increment = image_bytes(after, &before);
            std::fprintf(stderr, "copies %llu, full image pages %zu, increment %zu bytes\n",
                         static_cast<unsigned long long>(copies), full, increment);
            if (copies > written) std::_Exit(4);
            if (full > written) std::_Exit(5);
            if (increment > written * (ps() + 16) + ps()) std::_Exit(6);
            arena.verify();
        },
        60);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

TEST_CASE("a whole-arena snapshot covers the anonymous VMAs and leaves file VMAs alone") {
    const std::size_t file_pages = 32;
    TempFile file(file_pages * ps());
    usermm::Arena arena(64ull << 20);
    char* heap = static_cast<char*>(arena.map(64 * ps(), Prot::ReadWrite, {.name = "heap"}));
    auto* shared = static_cast<std::uint8_t*>(
        arena.map_file(file.fd(), 0, file_pages * ps(), Prot::ReadWrite, usermm::Share::Shared, {.name = "file"}));
    char* tail = static_cast<char*>(arena.map(64 * ps(), Prot::ReadWrite, {.name = "tail"}));
    write_u64(heap, 1);
    write_u64(tail + 5 * ps(), 2);
    CHECK(read_byte(shared + 3 * ps()) == pattern_byte(3 * ps()));

    // An explicit range over a file VMA is still refused.
    CHECK_THROWS_AS(arena.snapshot(shared, ps()), usermm::Error);
    usermm::Snapshot snap = arena.snapshot();
    write_u64(heap, 10);
    write_u64(tail + 5 * ps(), 20);
    write_byte(shared + 7 * ps(), 0x5a);
    std::size_t visited = 0;
    snap.for_each_page([&](const void* addr, std::span<const std::byte>) {
        ++visited;
        CHECK((addr == heap || addr == tail + 5 * ps()));
    });
    CHECK(visited == 2);
    CHECK(snap.stats().cow_faults == 2);  // the file page was not copied

    // A file VMA mapped meanwhile is not part of it either.
    auto* later = static_cast<std::uint8_t*>(arena.map_file(file.fd(), 0, ps(), Prot::Read, usermm::Share::Private));
    CHECK(read_byte(later + 1) == pattern_byte(1));
    std::uint8_t seen = 1;
    snap.read(later + 1, &seen, 1);
    CHECK(seen == 0);

    arena.restore(snap);
    CHECK(read_u64(heap) == 1);
    CHECK(read_u64(tail + 5 * ps()) == 2);
    CHECK(read_byte(shared + 7 * ps()) == 0x5a);  // the file VMAs are left as they are
    CHECK(read_byte(later + 1) == pattern_byte(1));
    CHECK(arena.vmas().size() == 4);
    arena.sync(shared, file_pages * ps());
    CHECK(file.content()[7 * ps()] == 0x5a);

    // The image holds the anonymous pages and VMAs only.
    const int fd = memfd_create("usermm-test-costs", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    snap.write_to(fd);
    lseek(fd, 0, SEEK_SET);
    const int fds[] = {fd};
    usermm::Arena loaded = usermm::Arena::load(fds);
    CHECK(loaded.vmas().size() == 2);
    close(fd);
    arena.verify();
}

// Once a bug (found by review): a page whose anonymous VMA gave way to a file VMA at the middle
// snapshot and came back, untouched, at the last one was loaded with the data the first image held.
TEST_CASE("a chain of whole-arena images across a file VMA that came and went loads what the last snapshot held") {
    TempFile file(4 * ps());
    usermm::Arena arena(64ull << 20);
    char* heap = static_cast<char*>(arena.map(8 * ps(), Prot::ReadWrite, {.name = "heap"}));
    char* x = heap + 4 * ps();
    write_u64(heap, 1);
    write_u64(x, 0xd);
    const int fd = memfd_create("usermm-test-chain", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    usermm::Snapshot first = arena.snapshot();
    first.write_to(fd);
    arena.unmap(x, 4 * ps());
    REQUIRE(arena.map_file(file.fd(), 0, 4 * ps(), Prot::Read, usermm::Share::Private, {.address = x}) == x);
    usermm::Snapshot middle = arena.snapshot();
    middle.write_to(fd, first);
    arena.unmap(x, 4 * ps());
    REQUIRE(arena.map(4 * ps(), Prot::ReadWrite, {.name = "heap", .address = x}) == x);
    usermm::Snapshot last = arena.snapshot();
    last.write_to(fd, middle);
    REQUIRE(read_u64(x) == 0);
    const int fds[] = {fd};
    usermm::Arena loaded = usermm::Arena::load(fds);
    const char* lbase = static_cast<const char*>(loaded.base());
    CHECK(read_u64(lbase + (heap - static_cast<char*>(arena.base()))) == 1);
    CHECK(read_u64(lbase + (x - static_cast<char*>(arena.base()))) == 0);
    loaded.verify();
    close(fd);
}

namespace {
std::size_t resident_bytes() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    REQUIRE(f);
    unsigned long size = 0, resident = 0;
    REQUIRE(std::fscanf(f, "%lu %lu", &size, &resident) == 2);
    std::fclose(f);
    return resident * ps();
}
}  // namespace

TEST_CASE("a 64 GiB arena with one page written: snapshots and restore cost what changed, not what is reserved" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    // Per page of the range, the change record of a snapshot took 1 bit and restore wrote the
    // 2-byte PTE of every page: 128 MiB for 64 snapshots and 32 MiB for one restore here (2 GiB
    // and 512 MiB on 1 TiB); a page written with 64 snapshots live committed 64 pages of store in
    // each.
    usermm::Arena arena(64ull << 30);
    char* heap = static_cast<char*>(arena.map(arena.size(), Prot::ReadWrite, {.name = "huge"}));
    char* page = heap + (23ull << 30);
    write_u64(page, 1);
    constexpr std::size_t kBound = 16ull << 20;
    const std::size_t before = resident_bytes();
    std::vector<usermm::Snapshot> snaps;
    for (int k = 0; k < 64; ++k) snaps.push_back(arena.snapshot());
    const std::size_t after_snapshots = resident_bytes();
    MESSAGE("64 snapshots: +" << (after_snapshots - before) / 1024 << " KiB");
    CHECK(after_snapshots < before + kBound);
    write_u64(page, 2);
    arena.restore(snaps.front());
    CHECK(read_u64(page) == 1);
    const std::size_t after_restore = resident_bytes();
    MESSAGE("restore: +" << (after_restore - after_snapshots) / 1024 << " KiB");
    CHECK(after_restore < after_snapshots + kBound);
    write_u64(page, 3);
    snaps.erase(snaps.begin() + 1);
    usermm::Snapshot last = arena.snapshot();
    CHECK(image_bytes(last, &snaps.back()) < 2 * ps());
}

namespace {
// The peak resident set since the last reset_peak_rss() (VmHWM).
std::size_t peak_rss() {
    FILE* f = std::fopen("/proc/self/status", "r");
    REQUIRE(f);
    char line[256];
    std::size_t kib = 0;
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "VmHWM: %zu kB", &kib) == 1) break;
    std::fclose(f);
    return kib << 10;
}
void reset_peak_rss() {
    FILE* f = std::fopen("/proc/self/clear_refs", "w");
    REQUIRE(f);
    std::fputs("5", f);
    std::fclose(f);
}
}  // namespace

TEST_CASE("collect_dirty on a 64 GiB arena with two pages written needs no per-page buffers" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    usermm::Arena arena(64ull << 30);
    char* heap = static_cast<char*>(arena.map(arena.size(), Prot::ReadWrite, {.name = "huge"}));
    (void)arena.collect_dirty(heap, arena.size());
    write_u64(heap + (7ull << 30), 1);
    arena.advise(heap + (9ull << 30), ps(), usermm::Advice::DontNeed);
    write_u64(heap + (11ull << 30), 1);
    arena.advise(heap + (11ull << 30), ps(), usermm::Advice::DontNeed);  // written, then discarded
    reset_peak_rss();
    const std::size_t before = resident_bytes();
    const usermm::DirtySet dirty = arena.collect_dirty(heap, arena.size());
    const std::size_t peak = peak_rss();
    MESSAGE("collect_dirty: peak +" << (peak - before) / 1024 << " KiB");
    CHECK(peak < before + (4ull << 20));  // a per-page byte would be 16 MiB
    REQUIRE(dirty.size() == 2);
    CHECK(dirty.pages[0] == heap + (7ull << 30));
    CHECK(dirty.pages[1] == heap + (11ull << 30));
}
