// collect_dirty() with the kernel tracking the writes (userfaultfd WP_ASYNC + PAGEMAP_SCAN,
// lib/api/dirty_async.cpp) and without it: the same answers either way. Run on the default engine,
// on the mprotect engine, and with USERMM_DIRTY_ASYNC=0 (tests/CMakeLists.txt); each case checks
// that the asynchronous mode was used exactly where it should be.
#include <sys/utsname.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include "page_ops_api.hpp"
#include "test_util.hpp"

using usermm::Prot;
using namespace usermm_test;

namespace {

using Pages = std::vector<std::size_t>;

bool async_disabled_by_environment() {
    const char* v = std::getenv("USERMM_DIRTY_ASYNC");
    return v && std::string(v) == "0";
}

bool kernel_at_least(int major, int minor) {
    utsname u{};
    if (uname(&u) != 0) return false;
    int ma = 0, mi = 0;
    if (std::sscanf(u.release, "%d.%d", &ma, &mi) != 2) return false;
    return ma > major || (ma == major && mi >= minor);
}

// Whether collect_dirty should hand ranges to the kernel here. A kernel that has the mechanism
// (6.7 on) must pass the probe: a probe that fails where it should not would make every case pass
// on the fallback path without a word.
bool expect_async() {
    (void)usermm::page_size();  // sets the process up (the probe)
    const bool uffd = usermm::engine() == usermm::Engine::Uffd;
    const bool have = usermm::detail::uffd_async_available();
    if (uffd && !async_disabled_by_environment() && kernel_at_least(6, 7)) REQUIRE(have);
    if (!uffd || async_disabled_by_environment()) REQUIRE(!have);
    static bool said = false;
    if (!said) {
        said = true;
        const std::string how = have   ? "asynchronous (WP_ASYNC + PAGEMAP_SCAN)"
                                : uffd ? "synchronous uffd (the kernel lacks WP_ASYNC/PAGEMAP_SCAN, or USERMM_DIRTY_ASYNC=0)"
                                       : "mprotect engine";
        MESSAGE("collect_dirty: " << how);
    }
    return have;
}

std::string text(const Pages& pages) {
    std::string out;
    for (std::size_t i : pages) {
        if (!out.empty()) out += ' ';
        out += std::to_string(i);
    }
    return out;
}

struct Fixture {
    std::size_t ps = usermm::page_size();
    std::size_t pages;
    usermm::Arena arena;
    char* base;
    explicit Fixture(std::size_t n, std::uint32_t fault_around = 1)
        : pages(n), arena(n * ps), base(static_cast<char*>(arena.map(n * ps, Prot::ReadWrite,
                                                                     {.name = "dirty", .fault_around_pages = fault_around}))) {}
    char* page(std::size_t i) const { return base + i * ps; }
    Pages collect(std::size_t from = 0, std::size_t count = 0) {
        if (!count) count = pages - from;
        const usermm::DirtySet d = arena.collect_dirty(page(from), count * ps);
        Pages out;
        for (void* p : d.pages) out.push_back(std::size_t(static_cast<char*>(p) - base) / ps);
        CHECK(std::is_sorted(out.begin(), out.end()));
        return out;
    }
    void write(const Pages& ps_, std::uint8_t v) {
        for (std::size_t i : ps_) write_byte(page(i) + (i * 7) % ps, v);
    }
};

}  // namespace

TEST_CASE("every written page is reported exactly once per collection, and only those") {
    const bool async = expect_async();
    Fixture f(512, 16);
    std::mt19937 rng(15);
    Pages all(f.pages);
    std::iota(all.begin(), all.end(), 0);
    f.write(all, 1);
    CHECK(text(f.collect()) == text(all));
    CHECK(f.collect().empty());
    const std::uint64_t async_before = f.arena.stats().dirty_async_collects;
    const std::uint64_t faults_before = f.arena.stats().write_faults;
    std::size_t written = 0;
    for (int round = 0; round < 20; ++round) {
        Pages w;
        for (std::size_t i = 0; i < f.pages; ++i)
            if (rng() % 7 == 0) w.push_back(i);
        f.write(w, std::uint8_t(round));
        f.write(w, std::uint8_t(round + 1));  // twice: still one report
        written += w.size();
        CHECK(text(f.collect()) == text(w));
    }
    CHECK(f.collect().empty());
    const usermm::Stats st = f.arena.stats();
    if (async) {
        CHECK(st.dirty_async_collects - async_before == 21);
        CHECK(st.write_faults == faults_before);  // the kernel resolved every first write itself
    } else {
        CHECK(st.dirty_async_collects == 0);
        CHECK(st.write_faults - faults_before == written);  // one write-track fault per first write
    }
    f.arena.verify();
}

TEST_CASE("collect_dirty of part of the range, DontNeed, protect and pages granted but never written") {
    expect_async();
    Fixture f(256, 16);
    f.write({0, 5, 100, 200}, 1);  // fault-around grants write to neighbours nobody writes
    CHECK(text(f.collect()) == text({0, 5, 100, 200}));
    f.write({1, 130, 255}, 2);
    CHECK(text(f.collect(128, 128)) == text({130, 255}));
    CHECK(text(f.collect()) == text({1}));
    // Discarded pages changed, though nothing wrote them; read afterwards (the zero page), they
    // stay unwritten.
    f.write({40, 41}, 3);
    CHECK(text(f.collect()) == text({40, 41}));
    f.arena.advise(f.page(40), 2 * f.ps, usermm::Advice::DontNeed);
    (void)read_byte(f.page(40));
    CHECK(text(f.collect()) == text({40, 41}));
    (void)read_byte(f.page(41));
    CHECK(f.collect().empty());
    f.write({41}, 4);
    CHECK(text(f.collect()) == text({41}));
    // Protect takes write away; a write after write comes back (a fault) is seen.
    f.arena.protect(f.page(60), 4 * f.ps, Prot::Read);
    CHECK(f.collect().empty());
    f.arena.protect(f.page(60), 4 * f.ps, Prot::ReadWrite);
    f.write({61}, 5);
    CHECK(text(f.collect()) == text({61}));
    // prefault(Write) grants write access without a fault; the write after it is seen.
    f.arena.prefault(f.page(70), f.ps, Prot::ReadWrite);
    (void)f.collect();
    f.write({70}, 6);
    CHECK(text(f.collect()) == text({70}));
    CHECK(f.collect().empty());
    f.arena.verify();
}

// Writers own disjoint pages; in each round every writer writes its pages of the round once, then
// all meet and the main thread collects. In odd rounds the main thread also collects while the
// writers write. Each page written in the round is reported by the round's collections, and no
// other page is; in even rounds (no collection during the writes) exactly once. A write in flight
// across a collection may be reported by it and again by the next: the kernel (or usermm's
// fault, on the synchronous path) marks the page written when it lets the write through, before
// the store lands, and the store may then meet the protection put back and be let through again.
// Reporting it twice is right (the first collection may have read the page before the store).
TEST_CASE("writers and collections on other threads: each write reported, exactly once when quiescent") {
    const bool async = expect_async();
    constexpr std::size_t kWriters = 3, kPages = 3 * 256, kRounds = 40;
    Fixture f(kPages, 1);
    Pages all(kPages);
    std::iota(all.begin(), all.end(), 0);
    f.write(all, 1);
    (void)f.collect();
    std::vector<Pages> plan(kRounds);
    std::mt19937 rng(7);
    for (auto& p : plan)
        for (std::size_t i = 0; i < kPages; ++i)
            if (rng() % 5 == 0) p.push_back(i);
    std::barrier start(kWriters + 1), done(kWriters + 1);
    std::vector<std::thread> writers;
    for (std::size_t w = 0; w < kWriters; ++w)
        writers.emplace_back([&, w] {
            for (std::size_t r = 0; r < kRounds; ++r) {
                start.arrive_and_wait();
                for (std::size_t i : plan[r])
                    if (i % kWriters == w) write_byte(f.page(i) + 64, std::uint8_t(r));
                done.arrive_and_wait();
            }
        });
    std::size_t repeated = 0, concurrent = 0;
    for (std::size_t r = 0; r < kRounds; ++r) {
        start.arrive_and_wait();
        std::map<std::size_t, int> reports;
        if (r % 2)
            for (int k = 0; k < 3; ++k, ++concurrent)
                for (std::size_t i : f.collect()) ++reports[i];
        done.arrive_and_wait();
        for (std::size_t i : f.collect()) ++reports[i];
        Pages got;
        for (const auto& [i, n] : reports) {
            got.push_back(i);
            if (n > 1) ++repeated;
            if (r % 2 == 0) CHECK_MESSAGE(n == 1, "round " << r << " page " << i << " reported " << n << " times");
        }
        CHECK_MESSAGE(text(got) == text(plan[r]), "round " << r);
    }
    for (auto& t : writers) t.join();
    MESSAGE(repeated << " pages reported again after a collection that ran while they were written (" << concurrent
                     << " such collections)");
    CHECK(f.collect().empty());
    CHECK((f.arena.stats().dirty_async_collects > 0) == async);
    f.arena.verify();
}

TEST_CASE("a snapshot taken in the middle: its content exact, the dirty sets before and after exact") {
    const bool async = expect_async();
    Fixture f(128, 4);
    Pages all(f.pages);
    std::iota(all.begin(), all.end(), 0);
    f.write(all, 1);
    (void)f.collect();
    f.write({3, 9, 70}, 2);  // seen by the kernel only (asynchronous mode)
    std::vector<char> then(f.pages * f.ps);
    std::memcpy(then.data(), f.base, then.size());
    std::optional<usermm::Snapshot> snap = f.arena.snapshot(f.page(0), 64 * f.ps);  // part of the range
    f.write({9, 10, 100}, 3);  // 9, 10: copied for the snapshot first
    std::vector<char> got(64 * f.ps);
    snap->read(f.base, got.data(), got.size());
    CHECK(std::memcmp(got.data(), then.data(), got.size()) == 0);
    CHECK(snap->stats().cow_faults == 2);
    CHECK(text(f.collect()) == text({3, 9, 10, 70, 100}));
    CHECK(f.collect().empty());
    // While the snapshot lives, its range is tracked by usermm (every write seen) and the rest may
    // be the kernel's.
    f.write({11, 120}, 4);
    CHECK(text(f.collect()) == text({11, 120}));
    snap->read(f.base, got.data(), got.size());
    CHECK(std::memcmp(got.data(), then.data(), got.size()) == 0);
    // A whole-arena snapshot takes the kernel's part back too.
    f.write({12, 121}, 5);
    {
        const usermm::Snapshot whole = f.arena.snapshot();
        f.write({121, 122}, 6);
        CHECK(whole.stats().cow_faults == 2);
    }
    CHECK(text(f.collect()) == text({12, 121, 122}));
    snap.reset();
    // With no snapshot alive the kernel may take the range again.
    const std::uint64_t async_before = f.arena.stats().dirty_async_collects;
    f.write({0, 64, 127}, 7);
    CHECK(text(f.collect()) == text({0, 64, 127}));
    f.write({1}, 8);
    CHECK(text(f.collect()) == text({1}));
    CHECK(f.arena.stats().dirty_async_collects - async_before == (async ? 2u : 0u));
    f.arena.verify();
}

TEST_CASE("fork: the child and the parent each get exact dirty sets afterwards") {
    expect_async();
    Fixture f(256, 8);
    Pages all(f.pages);
    std::iota(all.begin(), all.end(), 0);
    f.write(all, 1);
    (void)f.collect();
    f.write({2, 50, 51, 200}, 2);
    const ChildEnd end = run_guarded(
        [&] {
            CHILD_CHECK(text(f.collect()) == text({2, 50, 51, 200}));
            CHILD_CHECK(f.collect().empty());
            f.write({3, 50, 255}, 3);
            CHILD_CHECK(text(f.collect()) == text({3, 50, 255}));
            CHILD_CHECK(f.collect().empty());
            f.arena.verify();
        },
        30);
    check_survived(end);
    CHECK(text(f.collect()) == text({2, 50, 51, 200}));
    f.write({4, 51}, 4);
    CHECK(text(f.collect()) == text({4, 51}));
    CHECK(f.collect().empty());
    f.arena.verify();
}

TEST_CASE("a stack VMA in the range keeps the collection on usermm's tracking, with the same answers") {
    expect_async();
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(1024 * ps);
    char* heap = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.name = "heap", .fault_around_pages = 1}));
    for (std::size_t i = 0; i < 64; ++i) write_byte(heap + i * ps, 1);
    char* const lo = static_cast<char*>(arena.base());
    (void)arena.collect_dirty(lo, arena.size());
    write_byte(heap + 5 * ps, 2);  // the kernel's, if asynchronous
    usermm::Stack stack = arena.map_stack(64 * ps);
    write_byte(heap + 6 * ps, 3);
    // The whole arena, stack included: usermm tracks it all again, and a stack's committed pages
    // count as written at every collection.
    auto heap_part = [&] {
        std::vector<void*> out;
        for (void* p : arena.collect_dirty(lo, arena.size()).pages)
            if (p >= heap && p < heap + 64 * ps) out.push_back(p);
        return out;
    };
    CHECK(heap_part() == std::vector<void*>{heap + 5 * ps, heap + 6 * ps});
    CHECK(heap_part().empty());
    write_byte(heap + 7 * ps, 4);
    CHECK(heap_part() == std::vector<void*>{heap + 7 * ps});
    arena.verify();
}

// map_file where the kernel tracked writes: that part goes back first (a file mapping has no
// userfaultfd context); unmapping the file gives the arena a fresh reservation of its own.
TEST_CASE("a file mapped and unmapped inside a range the kernel tracked") {
    const bool async = expect_async();
    const std::size_t ps = usermm::page_size();
    TempDir dir;
    const std::string path = dir.file("f");
    {
        FILE* f = std::fopen(path.c_str(), "w");
        REQUIRE(f);
        std::vector<char> bytes(16 * ps, 'x');
        REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
        std::fclose(f);
    }
    usermm::Arena arena(256 * ps);
    char* const lo = static_cast<char*>(arena.base());
    char* heap = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.name = "heap", .fault_around_pages = 1}));
    for (std::size_t i = 0; i < 64; ++i) write_byte(heap + i * ps, 1);
    (void)arena.collect_dirty(lo, arena.size());  // the whole arena, unmapped space included
    write_byte(heap + 3 * ps, 2);
    char* file = static_cast<char*>(arena.map_file(path, 0, 16 * ps, Prot::Read, usermm::Share::Private));
    CHECK(read_byte(file) == 'x');
    write_byte(heap + 4 * ps, 3);
    CHECK(arena.collect_dirty(heap, 64 * ps).pages == std::vector<void*>{heap + 3 * ps, heap + 4 * ps});
    arena.verify();
    arena.unmap(file, 16 * ps);
    write_byte(heap + 5 * ps, 4);
    CHECK(arena.collect_dirty(lo, arena.size()).pages == std::vector<void*>{heap + 5 * ps});
    write_byte(heap + 6 * ps, 5);
    CHECK(arena.collect_dirty(lo, arena.size()).pages == std::vector<void*>{heap + 6 * ps});
    CHECK((arena.stats().dirty_async_collects > 0) == async);
    arena.verify();
}

// fork() while another thread writes: the child's first collection misses no page whose content
// changed since the parent's last collection (a write the kernel let through just before fork
// copied the page tables must be the child's too). The writer writes each page once, so that the
// fork lands among first writes, which are the ones the kernel notes.
TEST_CASE("fork while another thread writes: the child misses no changed page") {
    expect_async();
    constexpr std::size_t kPages = 16384;
    Fixture f(kPages, 1);
    Pages all(kPages);
    std::iota(all.begin(), all.end(), 0);
    for (int trial = 0; trial < 4; ++trial) {
        f.write(all, 1);
        (void)f.collect();
        std::vector<std::uint8_t> then(kPages);
        for (std::size_t i = 0; i < kPages; ++i) then[i] = read_byte(f.page(i) + 100);
        std::atomic<std::size_t> reached{0};
        std::thread writer([&] {
            for (std::size_t i = 0; i < kPages; ++i) {
                write_byte(f.page(i) + 100, std::uint8_t(trial + 2));
                reached.store(i + 1);
            }
        });
        while (reached.load() < kPages / 8) {
        }
        const ChildEnd end = run_guarded(
            [&] {
                const usermm::DirtySet d = f.arena.collect_dirty(f.base, kPages * f.ps);
                std::size_t changed = 0;
                for (std::size_t i = 0; i < kPages; ++i)
                    if (read_byte(f.page(i) + 100) != then[i]) {
                        ++changed;
                        CHILD_CHECK(d.contains(f.page(i)));
                    }
                // At most one more: a write the kernel let through whose store had not landed when
                // the guard went on (it landed in the parent only), reported as a write in flight.
                CHILD_CHECK(d.size() <= changed + 1);
                f.arena.verify();
            },
            30);
        writer.join();
        check_survived(end);
        f.arena.verify();
    }
}

// A collection changes kernel mappings (a userfaultfd switch splits them, one context each side
// of the range's ends; write tracking on the mprotect engine splits them by protection), and so
// does a snapshot of a range the kernel tracked (the switch back). The kernel refuses them at
// vm.max_map_count, possibly after it changed part of the range. Whatever step is refused, no
// write is lost: the collection after the refusal reports every page written since, and a
// snapshot taken after it still copies each page before its write. Swept over how many mappings
// are left to spare and how the range is cut into kernel mappings, so that each step is the one
// refused somewhere. In this process, not a child: a forked child has no userfaultfd.
namespace {

enum class AtTheLimit { Collect, Snapshot };

// How many of the sweep's calls at the limit were refused.
int refusal_sweep(AtTheLimit what) {
    constexpr std::size_t kPages = 512, kFrom = 64, kCount = 384;
    int refused = 0;
    struct Piece {
        std::size_t first, last;
        Prot prot;
    };
    // Pieces of other protections cut the range into several kernel mappings. In the last layout,
    // the guard merges only the second writable run with a read-only neighbour, so the mapping
    // that frees is one fewer than the switch's two splits need: the refusal comes after the
    // context the range leaves let go of the mappings before it, write-tracked pages included.
    const std::vector<std::vector<Piece>> layouts = {
        {},
        {{100, 110, Prot::Read}},
        {{100, 110, Prot::Read}, {300, 310, Prot::Read}},
        {{0, 100, Prot::Read}, {100, 110, Prot::None}, {200, 210, Prot::None}, {412, 512, Prot::Read}},
    };
    for (std::size_t layout = 0; layout < layouts.size(); ++layout)
        for (std::size_t spare = 0; spare <= 10; ++spare) {
            CAPTURE(layout);
            CAPTURE(spare);
            Fixture f(kPages, 1);
            Pages all(kPages);
            std::iota(all.begin(), all.end(), 0);
            f.write(all, 1);
            for (const Piece& p : layouts[layout])
                f.arena.protect(f.page(p.first), (p.last - p.first) * f.ps, p.prot);
            // Write-tracked by usermm (a released snapshot leaves its marks), or by the kernel.
            { const usermm::Snapshot s = f.arena.snapshot(f.base, kPages * f.ps); }
            if (what == AtTheLimit::Snapshot) (void)f.collect(kFrom, kCount);
            Pages writable;
            for (std::size_t i = kFrom; i < kFrom + kCount; ++i)
                if (std::none_of(layouts[layout].begin(), layouts[layout].end(),
                                 [i](const Piece& p) { return i >= p.first && i < p.last; }))
                    writable.push_back(i);
            format_an_error(f.arena);
            std::string refusal;
            {
                std::vector<void*> mine = use_up_mappings(spare);
                try {
                    if (what == AtTheLimit::Collect)
                        (void)f.arena.collect_dirty(f.page(kFrom), kCount * f.ps);
                    else  // of part of the range the kernel tracks: leaving splits its mappings
                        (void)f.arena.snapshot(f.page(kFrom + 40), (kCount - 80) * f.ps);
                } catch (const usermm::Error& e) {
                    refusal = e.what();
                }
                for (void* m : mine) munmap(m, f.ps);
            }
            if (!refusal.empty()) {
                ++refused;
                MESSAGE("refused: " << refusal);
            }
            f.write(writable, 2);
            const Pages got = f.collect(kFrom, kCount);
            CHECK(std::includes(got.begin(), got.end(), writable.begin(), writable.end()));
            const usermm::Snapshot s = f.arena.snapshot(f.base, kPages * f.ps);
            f.write(writable, 3);
            std::vector<char> then(kPages * f.ps);
            s.read(f.base, then.data(), then.size());
            std::size_t lost = 0, wrong = 0;
            for (std::size_t i : writable) {
                lost += then[i * f.ps + (i * 7) % f.ps] != 2;
                wrong += read_byte(f.page(i) + (i * 7) % f.ps) != 3;
            }
            CHECK(lost == 0);
            CHECK(wrong == 0);
            f.arena.verify();
        }
    MESSAGE(refused << " of " << layouts.size() * 11 << " calls refused");
    return refused;
}

}  // namespace

TEST_CASE("at vm.max_map_count, a refused collection loses no write" * doctest::skip(kSkipAtTheMappingLimit)) {
    const bool async = expect_async();
    const int refused = refusal_sweep(AtTheLimit::Collect);
    if (async || usermm::engine() == usermm::Engine::Mprotect)
        CHECK(refused > 0);  // else the sweep missed the limit and tested nothing
    else
        CHECK(refused == 0);  // UFFDIO_WRITEPROTECT changes no mapping
}

TEST_CASE("at vm.max_map_count, a refused snapshot (of a range the kernel tracks, where it can) loses no write" *
          doctest::skip(kSkipAtTheMappingLimit)) {
    expect_async();
    // Refused somewhere on every engine: the snapshot's own reservations need mappings too.
    CHECK(refusal_sweep(AtTheLimit::Snapshot) > 0);
}
