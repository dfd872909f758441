// Reclaim and swap under threads: RSS and the resident count bounded while four threads run a
// working set four times the limit, content intact under random reads and writes with each
// policy, a bounce test in the manner of the kernel's uffd-stress (per-page locks in the pages
// being evicted), churn at the smallest limits, and eviction racing unmap, protect, snapshot,
// restore and fork.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include "swap_test_util.hpp"
#include "test_util.hpp"

namespace {

using namespace usermm_swap_test;
using usermm::Advice;
using usermm::Arena;
using usermm::Policy;
using usermm::Prot;
using usermm::Stats;
using usermm::SwapFile;

constexpr Policy kPolicies[] = {Policy::Fifo, Policy::Clock, Policy::S3Fifo};

std::string name(Policy p) { return p == Policy::Fifo ? "Fifo" : p == Policy::Clock ? "Clock" : "S3Fifo"; }

// What went wrong in the threads: a count, the first description, and exceptions by message.
class Problems {
public:
    void add(const std::string& what) {
        std::lock_guard lock(mu_);
        if (count_++ == 0) first_ = what;
    }
    // Runs fn, turning an exception into a problem (a thread must not end the process).
    void guard(const std::function<void()>& fn) {
        try {
            fn();
        } catch (const std::exception& e) {
            add(std::string("threw: ") + e.what());
        }
    }
    std::size_t count() const {
        std::lock_guard lock(mu_);
        return count_;
    }
    std::string first() const {
        std::lock_guard lock(mu_);
        return first_;
    }

private:
    mutable std::mutex mu_;
    std::size_t count_ = 0;
    std::string first_;
};

#define CHECK_NO_PROBLEMS(problems)               \
    do {                                          \
        INFO("first problem: " << (problems).first()); \
        CHECK((problems).count() == 0);           \
    } while (0)

// VmRSS of /proc/self/status, in bytes.
std::uint64_t vm_rss() {
    FILE* f = std::fopen("/proc/self/status", "r");
    if (!f) std::abort();
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "VmRSS: %llu kB", &kb) == 1) break;
    std::fclose(f);
    return kb << 10;
}

// A page check that records the first wrong page.
void expect_page(Problems& problems, const char* what, const char* p, std::size_t i, std::uint64_t version) {
    if (!holds(p, i, version))
        problems.add(fmt::format("{}: page {} should be version {} (first word {:#x}, expected {:#x})", what, i,
                                 version, first_word(p), seed_of(i, version)));
}

// Progress reported by workers and waited for by another thread (no sleeps): a count bumped and
// notified every few pages.
struct Progress {
    std::atomic<std::uint64_t> ticks{0};
    std::atomic<bool> done{false};
    void tick() {
        ticks.fetch_add(1);
        ticks.notify_all();
    }
    void finish() {
        done.store(true);
        tick();
    }
    // Calls fn after each tick until finish().
    void follow(const std::function<void()>& fn) {
        std::uint64_t seen = ticks.load();
        while (!done.load()) {
            ticks.wait(seen);
            seen = ticks.load();
            fn();
        }
    }
};

}  // namespace

TEST_CASE("four threads over a working set four times the limit: VmRSS and resident_pages stay bounded") {
    constexpr std::size_t threads = 4, limit = 128 * kCluster, n = 4 * limit;  // 16 MiB of 64
    SwapFile swap(swap_path(), 128 << 20);
    Arena arena(256 << 20, options(&swap, limit));
    char* p = map_aligned(arena, n);
    Problems problems;
    Progress progress;
    std::atomic<std::uint64_t> peak_rss{0}, peak_resident{0};
    // Taken before the arena is touched: what follows is the arena's memory, usermm's metadata
    // and the threads'.
    const std::uint64_t baseline = vm_rss();
    std::thread sampler([&] {
        progress.follow([&] {
            peak_rss.store(std::max(peak_rss.load(), vm_rss()));
            peak_resident.store(std::max(peak_resident.load(), arena.stats().resident_pages));
        });
    });
    std::vector<std::thread> workers;
    for (std::size_t t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            problems.guard([&] {
                // Thread t owns every fourth page: the clusters being evicted are everybody's.
                std::vector<std::size_t> own;
                for (std::size_t i = t; i < n; i += threads) own.push_back(i);
                std::mt19937_64 rng(t);
                for (std::uint64_t version = 1; version <= 2; ++version) {
                    std::shuffle(own.begin(), own.end(), rng);
                    for (std::size_t k = 0; k < own.size(); ++k) {
                        fill(p + own[k] * page(), own[k], version);
                        if (k % 64 == 0) progress.tick();
                    }
                    std::shuffle(own.begin(), own.end(), rng);
                    for (std::size_t k = 0; k < own.size(); ++k) {
                        expect_page(problems, "re-read", p + own[k] * page(), own[k], version);
                        if (k % 64 == 0) progress.tick();
                    }
                }
            });
        });
    for (std::thread& w : workers) w.join();
    progress.finish();
    sampler.join();
    CHECK_NO_PROBLEMS(problems);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > 0);
    CHECK(s.pages_swapped_in > 0);
    CHECK(s.major_faults > 0);
    // A fault that finds the arena at the limit evicts a batch itself (or, with none chosen yet,
    // waits for the reclaimer): each of the four threads may have brought one batch in (a swap-in
    // with its readahead) before it does. Measured here: the limit plus three pages.
    // A fault that waited for the reclaimer in vain goes on over the limit (limit_overruns): a
    // starved reclaimer (a loaded machine, TSan) is seen there, and each such fault may have
    // granted up to a cluster.
    const std::uint64_t slack = threads * kCluster + s.limit_overruns * kCluster;
    INFO("peak resident " << peak_resident.load() << ", limit " << limit << ", direct reclaims " << s.direct_reclaims
                          << ", stalls " << s.reclaim_stalls << ", overruns " << s.limit_overruns);
    CHECK(s.direct_reclaims > 0);
    CHECK(peak_resident.load() <= limit + slack);
    // The same bound on the kernel's count, plus 8 MiB: usermm's page-state table and policy
    // queues for 16,384 pages and its eviction buffers (a few hundred KiB), the five threads'
    // stacks and malloc arenas, and the kernel's per-CPU RSS counters, which lag by up to a batch
    // per CPU. Without reclaim the arena alone would add 64 MiB.
    const std::uint64_t rss_bound = (limit + slack) * page() + (8ull << 20);
    INFO("VmRSS peak " << (peak_rss.load() >> 10) << " kB, baseline " << (baseline >> 10) << " kB");
    CHECK(peak_rss.load() > baseline);
    // Under TSan VmRSS holds its shadow memory too (about five times what the threads touch).
    if (!usermm_test::kSkipUnderTsan) CHECK(peak_rss.load() - baseline <= rss_bound);
    arena.verify();
}

TEST_CASE("content intact under four threads of random reads and writes over four times the limit, each policy") {
    // 10^6 page accesses over the three policies. 99% go to a window of half the limit that slides through
    // the working set, 1% anywhere (about ten times each page): every page is evicted and read
    // back, dirty and clean, many times. At 60-70 µs a swap-in, uniform accesses alone would take
    // minutes.
    constexpr std::size_t threads = 4, limit = 8 * kCluster, n = 4 * limit, window = limit / 2;
    constexpr std::size_t ops_per_thread = 84'000, slide_every = 340;
    std::atomic<std::uint64_t> accesses{0};
    for (Policy policy : kPolicies) {
        CAPTURE(name(policy));
        SwapFile swap(swap_path(), 64 << 20);
        Arena arena(64 << 20, options(&swap, limit, policy));
        char* p = map_aligned(arena, n);
        Problems problems;
        std::vector<std::thread> workers;
        for (std::size_t t = 0; t < threads; ++t)
            workers.emplace_back([&, t] {
                problems.guard([&] {
                    std::vector<std::uint64_t> version(n, 0);  // of this thread's pages: i % threads == t
                    std::mt19937_64 rng(100 + t);
                    for (std::size_t op = 0; op < ops_per_thread; ++op) {
                        const std::uint64_t r = rng();
                        std::size_t i = r % 100 < 99 ? (op / slide_every + (r >> 8) % window) % n : (r >> 8) % n;
                        i = i - i % threads + t;
                        if ((r >> 40) % 3 == 0)
                            fill(p + i * page(), i, ++version[i]);
                        else
                            expect_page(problems, "random access", p + i * page(), i, version[i]);
                    }
                    for (std::size_t i = t; i < n; i += threads)
                        expect_page(problems, "final read", p + i * page(), i, version[i]);
                    accesses.fetch_add(ops_per_thread + n / threads);
                });
            });
        for (std::thread& w : workers) w.join();
        CHECK_NO_PROBLEMS(problems);
        const Stats s = arena.stats();
        MESSAGE(name(policy) << ": " << s.major_faults << " major faults, " << s.pages_swapped_out
                             << " pages swapped out, " << s.hinting_faults << " hinting faults");
        // Most of the working set went out and came back (it is four times the limit).
        CHECK(s.pages_swapped_out > n / 2);
        CHECK(s.pages_swapped_in > n / 2);
        CHECK(s.resident_pages <= limit + threads * 2 * kCluster);
        arena.verify();
        arena.unmap(p, n * page());
        CHECK(arena.stats().resident_pages == 0);
        CHECK(swap.slots_in_use() == 0);
    }
    CHECK(accesses.load() >= 1'000'000);
}

// uffd-stress's bounce: each page holds a spin lock (word 0) and a counter (word 1, echoed in the
// last word); threads lock random pages, increment, unlock, while the reclaimer (a limit of two
// clusters over four times as many pages) and a thread of PageOut evict them underneath. A lost
// write, a page swapped in from a stale slot or a torn copy-out shows as a counter short of the
// increments made.
TEST_CASE("bounce: per-page locks and counters in pages evicted underneath the lockers") {
    constexpr std::size_t threads = 4, limit = 2 * kCluster, n = 4 * limit, ops_per_thread = 6'000;
    SwapFile swap(swap_path(), 64 << 20);
    Arena arena(64 << 20, options(&swap, limit));
    char* p = map_aligned(arena, n);
    const std::size_t last = page() / 8 - 1;
    Problems problems;
    std::vector<std::vector<std::uint32_t>> made(threads, std::vector<std::uint32_t>(n, 0));
    Progress progress;
    // One cluster paged out for every 64 increments of any thread.
    std::thread pager([&] {
        problems.guard([&] {
            std::mt19937_64 rng(7);
            progress.follow([&] {
                const std::size_t c = rng() % (n / kCluster);
                arena.advise(p + c * kCluster * page(), kCluster * page(), Advice::PageOut);
            });
        });
    });
    std::vector<std::thread> workers;
    for (std::size_t t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            problems.guard([&] {
                std::mt19937_64 rng(200 + t);
                for (std::size_t op = 0; op < ops_per_thread; ++op) {
                    const std::size_t i = rng() % n;
                    auto* words = reinterpret_cast<std::uint64_t*>(p + i * page());
                    std::atomic_ref<std::uint32_t> lock(*reinterpret_cast<std::uint32_t*>(words));
                    while (lock.exchange(1, std::memory_order_acquire) != 0)
                        while (lock.load(std::memory_order_relaxed) != 0) std::this_thread::yield();
                    const std::uint64_t count = words[1];
                    if (words[last] != count)
                        problems.add(fmt::format("page {}: counter {} but its echo {}", i, count, words[last]));
                    words[1] = count + 1;
                    words[last] = count + 1;
                    lock.store(0, std::memory_order_release);
                    ++made[t][i];
                    if (op % 64 == 0) progress.tick();
                }
            });
        });
    for (std::thread& w : workers) w.join();
    progress.finish();
    pager.join();
    CHECK_NO_PROBLEMS(problems);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) {
        std::uint64_t expected = 0;
        for (std::size_t t = 0; t < threads; ++t) expected += made[t][i];
        const auto* words = reinterpret_cast<const volatile std::uint64_t*>(p + i * page());
        if (words[1] != expected || words[last] != expected || (words[0] & 0xffffffffu) != 0) {
            if (wrong++ == 0)
                MESSAGE("page " << i << ": counter " << words[1] << ", echo " << words[last] << ", "
                                << expected << " increments made");
        }
    }
    CHECK(wrong == 0);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > n);
    CHECK(s.major_faults > n);
    arena.verify();
}

// The smallest limits (two and three clusters) over many pages, changed all the time, with PageOut
// of arbitrary ranges (partial clusters included) on top: a count of resident pages that goes
// negative wraps to about 2^64, and one that leaks stays above zero once everything is unmapped.
TEST_CASE("churn at a limit of a few batches: resident_pages never wraps and ends at zero") {
    constexpr std::size_t threads = 2, small = 2 * kCluster, large = 3 * kCluster, n = 64 * kCluster;
    SwapFile swap(swap_path(), 64 << 20);
    Arena arena(64 << 20, options(&swap, small));
    char* p = map_aligned(arena, n);
    Problems problems;
    std::atomic<std::uint64_t> peak{0};
    Progress progress;
    auto sample = [&] {
        const std::uint64_t r = arena.stats().resident_pages;
        if (r >= (1ull << 40)) problems.add(fmt::format("resident_pages {:#x}: wrapped around", r));
        peak.store(std::max(peak.load(), r));
    };
    std::thread churner([&] {
        problems.guard([&] {
            std::mt19937_64 rng(9);
            std::uint64_t k = 0;
            progress.follow([&] {
                arena.set_resident_limit((++k % 2 ? large : small) * page());
                const std::size_t first = rng() % n, count = 1 + rng() % std::min<std::size_t>(n - first, 2 * kCluster);
                arena.advise(p + first * page(), count * page(), Advice::PageOut);
                sample();
            });
        });
    });
    std::vector<std::thread> workers;
    for (std::size_t t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            problems.guard([&] {
                // Thread 0 sequential (swap readahead), thread 1 random, over their own halves.
                const std::size_t from = t * n / threads, count = n / threads;
                std::vector<std::size_t> order(count);
                std::iota(order.begin(), order.end(), from);
                std::mt19937_64 rng(300 + t);
                for (std::uint64_t version = 1; version <= 3; ++version) {
                    if (t == 1) std::shuffle(order.begin(), order.end(), rng);
                    for (std::size_t k = 0; k < count; ++k) {
                        fill(p + order[k] * page(), order[k], version);
                        if (k % 16 == 0) sample();
                        if (k % 32 == 0) progress.tick();
                    }
                    for (std::size_t k = 0; k < count; ++k) {
                        expect_page(problems, "churn", p + order[k] * page(), order[k], version);
                        if (k % 16 == 0) sample();
                    }
                }
            });
        });
    for (std::thread& w : workers) w.join();
    progress.finish();
    churner.join();
    CHECK_NO_PROBLEMS(problems);
    // The largest limit, plus two clusters for each faulting thread and one for each fault that
    // waited for the reclaimer in vain and went on over the limit.
    const Stats s = arena.stats();
    INFO("peak " << peak.load() << ", stalls " << s.reclaim_stalls << ", overruns " << s.limit_overruns);
    CHECK(peak.load() <= large + threads * 2 * kCluster + s.limit_overruns * kCluster);
    CHECK(s.pages_swapped_out > n);
    CHECK(s.pages_reclaimed >= s.pages_swapped_out);
    arena.verify();
    arena.unmap(p, n * page());
    CHECK(arena.stats().resident_pages == 0);
    CHECK(swap.slots_in_use() == 0);
}

// One thread writes and reads region A (its versions are the truth); a controller pauses it at
// handshakes to take snapshots of A, restore them and fork; meanwhile another thread pages out
// parts of A and C, and a third maps, writes and unmaps VMAs and toggles C's protection; the limit
// evicts all of it throughout.
// Skipped under TSan: its forked children start usermm's threads again, which TSan refuses after a
// multi-threaded fork ("starting new threads after multi-threaded fork is not supported").
TEST_CASE("eviction racing unmap, protect, snapshot, restore and fork" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    constexpr std::size_t limit = 4 * kCluster, na = 4 * limit, nb = 2 * kCluster, nc = 2 * kCluster;
    constexpr int rounds = 6;
    constexpr std::uint64_t ops_per_round = 1000;
    SwapFile swap(swap_path(), 64 << 20);
    Arena arena(64 << 20, options(&swap, limit));
    char* a = map_aligned(arena, na);
    char* c = map_aligned(arena, nc, na / kCluster + 1);
    Problems problems;
    std::atomic<bool> stop{false};

    Progress progress;  // the pager's pace (below)
    // The writer and its pause handshake: request n is acknowledged with ack = n and lasts until
    // resume = n.
    std::vector<std::uint64_t> version(na, 0);
    std::atomic<std::uint64_t> ops{0};
    std::atomic<int> request{0}, ack{0}, resume{0};
    std::atomic<bool> writer_done{false};  // it threw: nothing may wait for it any more
    auto pause = [&] {
        const int r = request.fetch_add(1) + 1;
        for (int seen = ack.load(); seen != r && !writer_done.load(); seen = ack.load()) ack.wait(seen);
        return r;
    };
    auto resume_writer = [&](int r) {
        resume.store(r);
        resume.notify_all();
    };
    std::thread writer([&] {
        problems.guard([&] {
            std::mt19937_64 rng(11);
            while (!stop.load()) {
                if (const int r = request.load(); r != ack.load()) {
                    ack.store(r);
                    ack.notify_all();
                    for (int seen = resume.load(); seen != r; seen = resume.load()) resume.wait(seen);
                    continue;
                }
                const std::size_t i = rng() % na;
                if (rng() % 2)
                    fill(a + i * page(), i, ++version[i]);
                else
                    expect_page(problems, "writer", a + i * page(), i, version[i]);
                if (ops.fetch_add(1) % 16 == 0) progress.tick();
                ops.notify_all();
            }
        });
        // Set before a value neither wait can be waiting for, so that both see it.
        writer_done.store(true);
        ack.store(-1);
        ack.notify_all();
        ops.fetch_add(1);
        ops.notify_all();
    });

    // Paced by the writer (every 16 accesses) and the mapper (every round), which goes on while
    // the writer is paused: so the pager races the snapshots, restores and forks too, without
    // taking a core of its own.
    std::thread pager([&] {
        problems.guard([&] {
            std::mt19937_64 rng(12);
            progress.follow([&] {
                const std::size_t first = rng() % na, count = 1 + rng() % std::min<std::size_t>(na - first, kCluster);
                arena.advise(a + first * page(), count * page(), rng() % 4 ? Advice::PageOut : Advice::Cold);
                arena.advise(c, nc * page(), Advice::PageOut);
            });
        });
    });

    std::atomic<std::uint64_t> mapper_accesses{0};
    std::thread mapper([&] {
        problems.guard([&] {
            std::vector<std::uint64_t> cv(nc, 0);
            for (std::uint64_t round = 1; !stop.load(); ++round) {
                mapper_accesses.fetch_add(nb + (nb + 6) / 7 + nc + (nc + 2) / 3);
                progress.tick();
                char* b = static_cast<char*>(arena.map(nb * page(), Prot::ReadWrite));
                for (std::size_t i = 0; i < nb; ++i) fill(b + i * page(), 10'000 + i, round);
                for (std::size_t i = 0; i < nb; i += 7) expect_page(problems, "mapped VMA", b + i * page(), 10'000 + i, round);
                arena.unmap(b, nb * page());
                // Half of C read-only while it is evicted and read back; then written again.
                arena.protect(c, nc / 2 * page(), Prot::Read);
                for (std::size_t i = 0; i < nc; ++i) expect_page(problems, "protected VMA", c + i * page(), 20'000 + i, cv[i]);
                arena.protect(c, nc / 2 * page(), Prot::ReadWrite);
                for (std::size_t i = 0; i < nc; i += 3) fill(c + i * page(), 20'000 + i, ++cv[i]);
            }
            for (std::size_t i = 0; i < nc; ++i) expect_page(problems, "protected VMA at the end", c + i * page(), 20'000 + i, cv[i]);
        });
    });

    std::size_t snapshot_wrong = 0, children_failed = 0;
    problems.guard([&] {
        std::vector<std::uint8_t> image(na * page());
        for (int round = 0; round < rounds; ++round) {
            int r = pause();
            const std::vector<std::uint64_t> taken = version;
            usermm::Snapshot snap = arena.snapshot(a, na * page());
            resume_writer(r);
            // Let the writer overwrite a good part of A, and the limit evict it, before reading.
            const std::uint64_t until = ops.load() + ops_per_round;
            for (std::uint64_t seen = ops.load(); seen < until && !writer_done.load(); seen = ops.load())
                ops.wait(seen);
            // A snapshot that cannot be read is one problem; the rounds go on.
            problems.guard([&] {
                snap.read(a, image.data(), image.size());
                for (std::size_t i = 0; i < na; ++i) snapshot_wrong += !holds(image.data() + i * page(), i, taken[i]);
            });

            r = pause();
            if (round % 2 == 0) {
                arena.restore(snap);
                version = taken;
                resume_writer(r);
                continue;
            }
            // The child reads every page of A (most of them swapped out) as the writer left them,
            // then overwrites and reads them back (its own evictions, in the shared swap file),
            // while the parent goes on writing.
            std::fflush(nullptr);
            const pid_t pid = fork();
            if (pid < 0) std::abort();
            if (pid == 0) {
                alarm(30);
                int bad = 0;
                for (std::size_t i = 0; i < na; ++i) bad += !holds(a + i * page(), i, version[i]);
                for (std::size_t i = 0; i < na; ++i) fill(a + i * page(), i, version[i] + 1000);
                for (std::size_t i = 0; i < na; ++i) bad += !holds(a + i * page(), i, version[i] + 1000);
                if (bad) std::fprintf(stderr, "child: %d pages wrong\n", bad);
                // _exit runs no destructor: the child's arena is destroyed here, so that it
                // releases its references to the shared swap file's slots (the kernel drops a
                // process's swap references at exit; nothing in usermm runs at _exit).
                { Arena gone(std::move(arena)); }
                _exit(bad ? 1 : 0);
            }
            resume_writer(r);
            int status = 0;
            while (waitpid(pid, &status, 0) < 0) {
            }
            children_failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
    });
    resume_writer(request.load());  // if the controller threw while the writer was paused
    stop.store(true);
    writer.join();
    mapper.join();
    progress.finish();
    pager.join();
    CHECK_NO_PROBLEMS(problems);
    CHECK(snapshot_wrong == 0);
    CHECK(children_failed == 0);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < na; ++i) wrong += !holds(a + i * page(), i, version[i]);
    CHECK(wrong == 0);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > na);
    CHECK(s.major_faults > 0);
    CHECK(s.pages_restored > 0);
    // An access that faults completes once its page is in: each costs at most a major fault or
    // two (another thread's reclaim may take the page between its fault and the next access), and
    // restore, snapshots and the children's pages add a few of A's size. A page swapped in and
    // reclaimed again before its own access could complete (a refault storm) exceeds it.
    const std::uint64_t accesses = ops.load() + mapper_accesses.load();
    INFO("accesses " << accesses << ", major faults " << s.major_faults << ", pages reclaimed " << s.pages_reclaimed
                     << ", direct reclaims " << s.direct_reclaims);
    CHECK(s.major_faults <= 2 * accesses + 4 * rounds * na);
    arena.verify();
    arena.unmap(a, na * page());
    arena.unmap(c, nc * page());
    CHECK(arena.stats().resident_pages == 0);
    CHECK(swap.slots_in_use() == 0);
}
