// The store pool: released snapshots' stores serve the copies of later snapshots. Every snapshot's
// content stays exact though its store pages held another snapshot's copies, under concurrent
// writers; the pool keeps what its limit allows and gives memory back when told to.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

namespace {

using namespace usermm_test;
using usermm::Prot;

std::size_t ps() { return usermm::page_size(); }

std::size_t resident_bytes() {
    std::ifstream in("/proc/self/statm");
    std::size_t size = 0, resident = 0;
    in >> size >> resident;
    return resident * ps();
}

// A page's words all say which page it is and in which round it was written, so that a copy that
// kept a word of the page its store page held before (another snapshot's) is caught.
void fill(char* page, std::uint64_t tag) {
    for (std::size_t w = 0; w < ps() / 8; w += 61) write_u64(page + w * 8, tag);
    write_u64(page + ps() - 8, tag);
}
std::uint64_t tag_of(std::size_t page, std::uint64_t round) { return (round << 32) | (page + 1); }

// Whether `content` (one page as a snapshot gives it) is page `page` as written in `round`.
bool holds(const std::vector<char>& content, std::size_t page, std::uint64_t round) {
    const std::uint64_t want = tag_of(page, round);
    for (std::size_t w = 0; w < ps() / 8; w += 61)
        if (read_u64(content.data() + w * 8) != want) return false;
    return read_u64(content.data() + ps() - 8) == want;
}

// Resets the pool to its limit with nothing kept.
struct FreshPool {
    std::size_t limit = usermm::set_snapshot_store_pool(0);
    explicit FreshPool(std::size_t bytes) { usermm::set_snapshot_store_pool(bytes); }
    ~FreshPool() { usermm::set_snapshot_store_pool(limit); }
};

}  // namespace

TEST_CASE("a released snapshot's store takes the next snapshot's copies, and each snapshot reads its own content") {
    const FreshPool pool(64ull << 20);
    constexpr std::size_t kPages = 2048, kFirst = 600, kSecond = 900;
    usermm::Arena arena(4 * kPages * ps());
    char* heap = static_cast<char*>(arena.map(kPages * ps(), Prot::ReadWrite));
    for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 1));

    std::optional<usermm::Snapshot> first = arena.snapshot(heap, kPages * ps());
    for (std::size_t p = 0; p < kFirst; ++p) fill(heap + p * ps(), tag_of(p, 2));
    CHECK(first->stats().cow_faults == kFirst);
    CHECK(first->stats().snapshot_pages_recycled == 0);
    first.reset();
    CHECK(usermm::snapshot_store_pool().kept_bytes == kFirst * ps());

    const usermm::Stats before = arena.stats();
    usermm::Snapshot second = arena.snapshot(heap, kPages * ps());
    CHECK(usermm::snapshot_store_pool().kept_bytes == 0);  // taken
    // From the other end, so that every store page the first snapshot filled is written again.
    for (std::size_t p = kPages - kSecond; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 3));
    CHECK(second.stats().cow_faults == kSecond);
    CHECK(second.stats().snapshot_pages_recycled == kFirst);
    CHECK(arena.stats().snapshot_pages_recycled - before.snapshot_pages_recycled == kFirst);
    std::vector<char> page(ps());
    std::size_t wrong = 0;
    for (std::size_t p = 0; p < kPages; ++p) {
        second.read(heap + p * ps(), page.data(), ps());
        wrong += !holds(page, p, p < kFirst ? 2 : 1);
    }
    CHECK(wrong == 0);
}

TEST_CASE("snapshots stay exact on pooled stores while writers write and older snapshots go") {
    const FreshPool pool(64ull << 20);
    constexpr std::size_t kPages = 1024, kWriters = 2, kRounds = 12, kWritesPerRound = 300;
    usermm::Arena arena(4 * kPages * ps());
    char* heap = static_cast<char*>(arena.map(kPages * ps(), Prot::ReadWrite));
    // written[p]: the round whose tag page p holds now. Each writer owns the pages p % kWriters == w.
    std::vector<std::uint64_t> written(kPages, 1);
    for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 1));

    std::barrier sync(kWriters + 1);
    std::atomic<std::uint64_t> round{0};
    std::vector<std::thread> writers;
    for (std::size_t w = 0; w < kWriters; ++w) {
        writers.emplace_back([&, w] {
            std::mt19937_64 rng(w + 7);
            for (;;) {
                sync.arrive_and_wait();  // the main thread has taken round r's snapshot
                const std::uint64_t r = round.load();
                if (r == 0) return;
                for (std::size_t k = 0; k < kWritesPerRound; ++k) {
                    std::size_t p = rng() % kPages;
                    p -= p % kWriters;
                    p += w;
                    if (p >= kPages) continue;
                    fill(heap + p * ps(), tag_of(p, r + 1));
                    written[p] = r + 1;
                }
                sync.arrive_and_wait();  // round r's writes are done
            }
        });
    }

    struct Taken {
        usermm::Snapshot snap;
        std::vector<std::uint64_t> expect;
    };
    std::vector<Taken> live;
    std::size_t wrong = 0, recycled = 0;
    std::vector<char> page(ps());
    auto check = [&](const Taken& t) {
        for (std::size_t p = 0; p < kPages; ++p) {
            t.snap.read(heap + p * ps(), page.data(), ps());
            wrong += !holds(page, p, t.expect[p]);
        }
    };
    for (std::uint64_t r = 1; r <= kRounds; ++r) {
        live.push_back({arena.snapshot(heap, kPages * ps()), written});
        // A checkpoint loop: two snapshots live, the older released once the newer is taken, so that
        // the next one takes its store from the pool.
        if (live.size() > 2) {
            recycled += live.front().snap.stats().snapshot_pages_recycled;
            live.erase(live.begin());
        }
        round.store(r);
        sync.arrive_and_wait();
        for (const Taken& t : live) check(t);  // while the writers copy into the stores
        sync.arrive_and_wait();
        for (const Taken& t : live) check(t);
    }
    round.store(0);
    sync.arrive_and_wait();
    for (auto& t : writers) t.join();
    CHECK(wrong == 0);
    MESSAGE("copies onto pooled store pages: " << recycled);
    CHECK(recycled > 0);
}

TEST_CASE("the pool keeps no more than its limit, and gives the memory back when emptied" * doctest::skip(kSkipUnderTsan)) {
    // ThreadSanitizer's shadow of the copied pages is resident as well (README, "Sanitizers").
    const FreshPool pool(64ull << 20);
    const std::size_t copies = (32ull << 20) / ps();
    usermm::Arena arena(4 * copies * ps());
    char* heap = static_cast<char*>(arena.map(copies * ps(), Prot::ReadWrite));
    for (std::size_t p = 0; p < copies; ++p) fill(heap + p * ps(), tag_of(p, 1));

    auto copy_all = [&](std::uint64_t round) {
        std::optional<usermm::Snapshot> snap = arena.snapshot(heap, copies * ps());
        for (std::size_t p = 0; p < copies; ++p) fill(heap + p * ps(), tag_of(p, round));
        CHECK(snap->stats().cow_faults == copies);
        return snap;
    };

    SUBCASE("within the limit: kept, until the limit goes to 0") {
        std::optional<usermm::Snapshot> snap = copy_all(2);
        snap.reset();
        CHECK(usermm::snapshot_store_pool().kept_bytes == copies * ps());
        const std::size_t kept = resident_bytes();
        usermm::set_snapshot_store_pool(0);
        CHECK(usermm::snapshot_store_pool().kept_bytes == 0);
        const std::size_t emptied = resident_bytes();
        MESSAGE("emptying the pool gave back " << (kept - emptied) / 1024 << " KiB of " << copies * ps() / 1024);
        CHECK(kept - emptied >= copies * ps() * 9 / 10);
    }
    SUBCASE("above the limit: unmapped at once") {
        usermm::set_snapshot_store_pool(copies * ps() / 2);
        std::optional<usermm::Snapshot> snap = copy_all(2);
        const std::size_t held = resident_bytes();
        snap.reset();
        CHECK(usermm::snapshot_store_pool().kept_bytes == 0);
        const std::size_t released = resident_bytes();
        CHECK(held - released >= copies * ps() * 9 / 10);
    }
    SUBCASE("the oldest stores go first") {
        std::optional<usermm::Snapshot> a = copy_all(2);
        std::optional<usermm::Snapshot> b = copy_all(3);
        a.reset();
        b.reset();
        // Two stores of 32 MiB within a limit of 64 MiB; a third would pass it.
        CHECK(usermm::snapshot_store_pool().kept_bytes == 2 * copies * ps());
        usermm::set_snapshot_store_pool(copies * ps());
        CHECK(usermm::snapshot_store_pool().kept_bytes == copies * ps());
    }
}

TEST_CASE("a forked child starts with an empty pool, and the parent keeps its own") {
    const FreshPool pool(64ull << 20);
    constexpr std::size_t kPages = 256;
    usermm::Arena arena(4 * kPages * ps());
    char* heap = static_cast<char*>(arena.map(kPages * ps(), Prot::ReadWrite));
    for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 1));
    std::optional<usermm::Snapshot> snap = arena.snapshot(heap, kPages * ps());
    for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 2));
    snap.reset();
    REQUIRE(usermm::snapshot_store_pool().kept_bytes == kPages * ps());

    check_survived(run_guarded(
        [&] {
            CHILD_CHECK(usermm::snapshot_store_pool().kept_bytes == 0);
            usermm::Snapshot child = arena.snapshot(heap, kPages * ps());
            for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 3));
            CHILD_CHECK(child.stats().snapshot_pages_recycled == 0);
            std::vector<char> page(ps());
            for (std::size_t p = 0; p < kPages; ++p) {
                child.read(heap + p * ps(), page.data(), ps());
                CHILD_CHECK(holds(page, p, 2));
            }
        },
        20));
    CHECK(usermm::snapshot_store_pool().kept_bytes == kPages * ps());
    usermm::Snapshot again = arena.snapshot(heap, kPages * ps());
    for (std::size_t p = 0; p < kPages; ++p) fill(heap + p * ps(), tag_of(p, 4));
    // The pooled pages were the child's too until it exited: the parent's copies onto them are exact.
    CHECK(again.stats().snapshot_pages_recycled == kPages);
    std::vector<char> page(ps());
    std::size_t wrong = 0;
    for (std::size_t p = 0; p < kPages; ++p) {
        again.read(heap + p * ps(), page.data(), ps());
        wrong += !holds(page, p, 2);
    }
    CHECK(wrong == 0);
}
