// File VMAs under concurrency and against the kernel's own mmap: threads racing to fault the same
// file pages (in one arena and in two), writers racing with sync(), a random walk checked step by
// step against mmap(2) of a second copy of the file, and fork() of file mappings.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "file_test_util.hpp"
#include "test_util.hpp"

namespace {

using usermm::Advice;
using usermm::Arena;
using usermm::MapOptions;
using usermm::Prot;
using usermm::Share;
using usermm_test::pattern_byte;
using usermm_test::read_byte;
using usermm_test::run_in_child;
using usermm_test::TempFile;
using usermm_test::write_byte;
using Bytes = std::vector<std::uint8_t>;

[[maybe_unused]] const unsigned g_watchdog = alarm(120);

const std::size_t kPage = usermm_test::os_page_size();
constexpr unsigned kThreads = 4;

// The sanitizers make every access several times slower: fewer rounds and steps there (races
// still show within the first rounds).
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr int kScale = 4;
#else
constexpr int kScale = 1;
#endif

// What a mapping of `file` rounded up to whole pages shows: the file's bytes, then zeros.
Bytes mapped_image(const TempFile& file) {
    Bytes out(((file.size() + kPage - 1) / kPage) * kPage, 0);
    for (std::size_t i = 0; i < file.size(); ++i) out[i] = pattern_byte(i);
    return out;
}

// The first byte of [p, p + n) that differs from `want`, or n. (memcmp first: the sanitizers check
// it as one range instead of byte by byte.)
std::size_t first_difference(const void* p, const std::uint8_t* want, std::size_t n) {
    if (std::memcmp(p, want, n) == 0) return n;
    const auto* b = static_cast<const std::uint8_t*>(p);
    return std::size_t(std::mismatch(b, b + n, want).first - b);
}

// Failures seen by worker threads, reported by the main thread (a failed REQUIRE in a worker
// would terminate the process without saying which page).
class Failures {
public:
    void add(const std::string& what) {
        if (count_.fetch_add(1) == 0) {
            std::lock_guard lock(mutex_);
            first_ = what;
        }
    }
    int count() const { return count_.load(); }
    std::string first() {
        std::lock_guard lock(mutex_);
        return first_;
    }

private:
    std::atomic<int> count_{0};
    std::mutex mutex_;
    std::string first_;
};

// Reads every page of a mapping of `want.size()` bytes whole, in `order`, and records any page that
// is not exactly `want` (a page that became readable before its content was complete).
void verify_pages(const char* base, const Bytes& want, const std::vector<std::size_t>& order, Failures& failures,
                  const std::string& who) {
    for (std::size_t page : order) {
        const std::size_t d = first_difference(base + page * kPage, want.data() + page * kPage, kPage);
        if (d != kPage)
            failures.add(fmt::format("{}: page {} byte {:#x} is {:#x}, the file has {:#x}", who, page, d,
                                     read_byte(base + page * kPage + d), want[page * kPage + d]));
    }
}

std::vector<std::size_t> page_order(std::size_t pages, std::uint64_t seed) {
    std::vector<std::size_t> order(pages);
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    return order;
}

// How a round maps the file: the fault-around window, readahead and advice decide how many pages
// one read takes, and so which races are possible (Random with no fault-around: every page is a
// read of its own, raced for by every thread).
struct RoundMode {
    std::size_t fault_around;
    std::size_t readahead;
    Advice advice;
    bool same_order;  // every thread walks the pages in the same order: they collide on every page
};
constexpr std::array kModes = {
    RoundMode{16, 64, Advice::Normal, false},
    RoundMode{1, 64, Advice::Random, true},
    RoundMode{1, 8, Advice::Normal, false},
    RoundMode{16, 64, Advice::Sequential, true},
    RoundMode{4, 4, Advice::Random, false},
};

usermm::Stats minus(const usermm::Stats& a, const usermm::Stats& b) {
    usermm::Stats d;
#define USERMM_TEST_DIFF(name, doc) d.name = a.name - b.name;
    USERMM_STATS_FIELDS(USERMM_TEST_DIFF)
#undef USERMM_TEST_DIFF
    return d;
}

}  // namespace

// Protects "no torn page" and "each file page read once" when threads race for the same pages.
TEST_CASE("threads faulting the same file pages at once see whole pages, and each page is read once") {
    constexpr std::size_t kPages = 96;
    TempFile file(kPages * kPage - 100);  // a partial last page: its tail must read as zeros
    const Bytes want = mapped_image(file);
    Arena arena(1ull << 32);
    constexpr int kRounds = 250 / kScale;
    std::barrier sync(kThreads + 1);
    std::atomic<const char*> region{nullptr};
    Failures failures;

    auto worker = [&](unsigned id) {
        for (int round = 0; round < kRounds; ++round) {
            const RoundMode& mode = kModes[std::size_t(round) % kModes.size()];
            const auto order = page_order(kPages, mode.same_order ? std::uint64_t(round) : round * 31u + id + 1);
            sync.arrive_and_wait();
            verify_pages(region.load(), want, order, failures, fmt::format("reader {}, round {}", id, round));
            sync.arrive_and_wait();
        }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);

    std::uint64_t spurious = 0;
    for (int round = 0; round < kRounds && failures.count() == 0; ++round) {
        const RoundMode& mode = kModes[std::size_t(round) % kModes.size()];
        INFO("round ", round, ", fault-around ", mode.fault_around, ", readahead ", mode.readahead, ", advice ",
             unsigned(mode.advice));
        const usermm::Stats before = arena.stats();
        // A fresh mapping of a file whose pages the kernel's page cache no longer holds.
        file.drop_cache();
        char* p = static_cast<char*>(arena.map_file(
            file.fd(), 0, file.size(), Prot::Read, Share::Private,
            {.name = "raced", .fault_around_pages = mode.fault_around, .readahead_pages = mode.readahead}));
        if (mode.advice != Advice::Normal) arena.advise(p, file.size(), mode.advice);
        region = p;
        sync.arrive_and_wait();  // the readers start together
        sync.arrive_and_wait();  // and are done
        const usermm::Stats s = minus(arena.stats(), before);
        // Each page the page cache lacked when a fault mapped it counts once, whichever thread's
        // fault it was; the kernel's readahead may have read the others first.
        CHECK(s.file_pages_read <= kPages);
        CHECK(s.file_pages_read >= 1);
        CHECK(s.file_bytes_read <= file.size());
        CHECK(s.major_faults >= 1);
        CHECK(s.major_faults <= s.file_pages_read);
        CHECK(s.access_errors == 0);
        if (mode.advice == Advice::Random && mode.fault_around == 1) {
            // One page per read: every page is exactly one major fault, whoever won the race.
            CHECK(s.major_faults == kPages);
            CHECK(s.readahead_pages == 0);
        }
        spurious += s.spurious_faults;
        if (round % 10 == 0) arena.verify();
        arena.unmap(p, file.size());
    }
    if (failures.count() != 0) {
        // Let the workers finish their rounds on a mapping that stays valid.
        char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
        region = p;
        sync.arrive_and_drop();
    }
    for (auto& t : threads) t.join();
    INFO("first failure: ", failures.first());
    CHECK(failures.count() == 0);
    // How often a thread found a page that another one resolved while it waited: nothing forces
    // the threads to run at once (on a loaded machine they may not), so the figure is reported,
    // not checked; the checks above hold however the faults interleaved.
    MESSAGE(spurious, " spurious faults (pages another thread resolved first) in ", kRounds, " rounds");
    arena.verify();
}

// Protects the per-process page cache: two arenas mapping one file share it, so a page raced for
// from both is still read once in total, and both see whole pages.
TEST_CASE("two arenas mapping the same file, faulted at once by threads: each page read once per arena") {
    constexpr std::size_t kPages = 64;
    TempFile file(kPages * kPage - 1000);
    const Bytes want = mapped_image(file);
    Arena a(1ull << 32), b(1ull << 32);
    constexpr int kRounds = 150 / kScale;
    std::barrier sync(kThreads + 1);
    std::atomic<const char*> in_a{nullptr}, in_b{nullptr};
    Failures failures;

    // Thread t reads one arena's mapping, then the other's; half the threads start in each.
    auto worker = [&](unsigned id) {
        for (int round = 0; round < kRounds; ++round) {
            const RoundMode& mode = kModes[std::size_t(round) % kModes.size()];
            const auto order = page_order(kPages, mode.same_order ? std::uint64_t(round) : round * 17u + id + 1);
            sync.arrive_and_wait();
            const bool a_first = id % 2 == 0;
            const std::string who = fmt::format("reader {}, round {}, arena ", id, round);
            verify_pages(a_first ? in_a.load() : in_b.load(), want, order, failures, who + (a_first ? "a" : "b"));
            verify_pages(a_first ? in_b.load() : in_a.load(), want, order, failures, who + (a_first ? "b" : "a"));
            sync.arrive_and_wait();
        }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);

    for (int round = 0; round < kRounds && failures.count() == 0; ++round) {
        const RoundMode& mode = kModes[std::size_t(round) % kModes.size()];
        INFO("round ", round, ", fault-around ", mode.fault_around, ", readahead ", mode.readahead, ", advice ",
             unsigned(mode.advice));
        const usermm::Stats before_a = a.stats(), before_b = b.stats(), before = usermm::process_stats();
        const MapOptions options{.fault_around_pages = mode.fault_around, .readahead_pages = mode.readahead};
        file.drop_cache();
        // Arena a's VMA is private, b's read-only and shared or private by turns: all map the file's
        // one page cache.
        char* p = static_cast<char*>(a.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, options));
        char* q = static_cast<char*>(b.map_file(file.path(), 0, file.size(), Prot::Read,
                                                round % 2 ? Share::Shared : Share::Private, options));
        if (mode.advice != Advice::Normal) {
            a.advise(p, file.size(), mode.advice);
            b.advise(q, file.size(), mode.advice);
        }
        in_a = p;
        in_b = q;
        sync.arrive_and_wait();
        sync.arrive_and_wait();
        const usermm::Stats da = minus(a.stats(), before_a), db = minus(b.stats(), before_b);
        const usermm::Stats process = minus(usermm::process_stats(), before);
        // Each VMA counts a page the kernel reads for it once; two VMAs that fault the same page
        // at the same moment may both find it missing from the page cache and both count it.
        CHECK(da.file_pages_read <= kPages);
        CHECK(db.file_pages_read <= kPages);
        CHECK(da.file_pages_read + db.file_pages_read >= 1);
        CHECK(process.file_pages_read == da.file_pages_read + db.file_pages_read);
        CHECK(da.major_faults + db.major_faults <= 2 * kPages);
        CHECK(da.access_errors + db.access_errors == 0);
        if (round % 10 == 0) {
            a.verify();
            b.verify();
        }
        a.unmap(p, file.size());
        b.unmap(q, file.size());
    }
    if (failures.count() != 0) {
        in_a = static_cast<char*>(a.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
        in_b = static_cast<char*>(b.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
        sync.arrive_and_drop();
    }
    for (auto& t : threads) t.join();
    INFO("first failure: ", failures.first());
    CHECK(failures.count() == 0);
    a.verify();
    b.verify();
}

// Protects "nothing lost": a write that races with sync()'s write-back of its page is written by a
// later sync, never dropped.
TEST_CASE("shared writers while another thread syncs all the time: the last sync leaves every write in the file") {
    constexpr std::size_t kPages = 24;
    constexpr unsigned kWriters = 3;
    constexpr int kPhases = 40 / kScale;
    constexpr long kMinWrites = 1500;  // per writer and phase
    constexpr long kMinSyncs = 3;      // per phase, while the writers run
    TempFile file(kPages * kPage);
    Bytes want = file.expected();
    Arena arena(1ull << 30);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    std::atomic<long> syncs{0};
    std::atomic<unsigned> writing{0};
    std::barrier sync(kWriters + 2);
    Failures failures;

    // A write lost by write-back is restored by any later write to its page, so what counts is the
    // writes that end a phase: the test runs many short phases and checks the file after each.
    // Writer t owns the bytes whose offset in their page is t modulo kWriters: single bytes at
    // random, now and then every byte it owns in a page. want[] records the last value of each byte (the writers
    // touch disjoint elements of it; the main thread reads it between phases).
    auto writer = [&](unsigned t) {
        std::mt19937_64 rng(1000 + t);
        for (int phase = 0; phase < kPhases; ++phase) {
            sync.arrive_and_wait();
            const long syncs_before = syncs.load();
            for (long i = 0; i < kMinWrites || syncs.load(std::memory_order_relaxed) - syncs_before < kMinSyncs; ++i) {
                const std::size_t page = rng() % kPages;
                const auto value = std::uint8_t(rng());
                if (rng() % 64 == 0) {
                    for (std::size_t off = page * kPage + t; off < (page + 1) * kPage; off += kWriters) {
                        write_byte(p + off, std::uint8_t(value + off));
                        want[off] = std::uint8_t(value + off);
                    }
                } else {
                    const std::size_t off = page * kPage + t + kWriters * (rng() % (kPage / kWriters));
                    write_byte(p + off, value);
                    want[off] = value;
                }
            }
            writing.fetch_sub(1);
            sync.arrive_and_wait();
        }
    };
    // Syncs the whole mapping or a random part of it until the writers of the phase are done.
    std::thread syncer([&] {
        std::mt19937_64 rng(99);
        for (int phase = 0; phase < kPhases; ++phase) {
            sync.arrive_and_wait();
            while (writing.load() != 0) {
                try {
                    if (rng() % 2) {
                        arena.sync(p, file.size());
                    } else {
                        const std::size_t first = rng() % kPages;
                        arena.sync(p + first * kPage, (1 + rng() % (kPages - first)) * kPage);
                    }
                } catch (const usermm::Error& e) {
                    failures.add(e.what());
                }
                syncs.fetch_add(1);
                // sync() holds the arena's write lock through its writes and fdatasync: in a tight
                // loop it would leave the writers' faults almost no time. The pause sets up no
                // race (writers and syncs overlap without it, and the checks hold either way); it
                // only leaves the writers room.
                std::this_thread::sleep_for(std::chrono::microseconds(rng() % 100));
            }
            sync.arrive_and_wait();
        }
    });
    std::vector<std::thread> writers;
    for (unsigned t = 0; t < kWriters; ++t) writers.emplace_back(writer, t);

    int bad_phases = 0;
    std::string first_bad;
    for (int phase = 0; phase < kPhases; ++phase) {
        writing = kWriters;
        sync.arrive_and_wait();  // the phase starts
        sync.arrive_and_wait();  // the writers are done, and the syncer too
        arena.sync(p, file.size());
        const Bytes got = file.content();
        const std::size_t d = first_difference(got.data(), want.data(), std::min(got.size(), want.size()));
        if ((d != want.size() || got.size() != want.size()) && bad_phases++ == 0)
            first_bad = fmt::format("phase {}: file byte {:#x} (page {}) is {:#x}, the last write was {:#x}", phase, d,
                                    d / kPage, d < got.size() ? got[d] : 0, d < want.size() ? want[d] : 0);
    }
    for (auto& t : writers) t.join();
    syncer.join();
    INFO("syncer: ", failures.first());
    CHECK(failures.count() == 0);
    INFO("first lost write: ", first_bad);
    CHECK(bad_phases == 0);
    // Every page a write made dirty was written back once for it, and pages were dirtied again
    // after their write-back (the writes did race with the syncs).
    const usermm::Stats s = arena.stats();
    CHECK(s.pages_dirtied == s.pages_written_back);
    CHECK(s.pages_written_back > kPhases * kPages);
    CHECK(s.writeback_errors == 0);
    // The mapping itself agrees, and a fresh mapping (after this one is gone) reads the same.
    CHECK(first_difference(p, want.data(), want.size()) == want.size());
    arena.verify();
    arena.unmap(p, file.size());
    char* q = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    CHECK(first_difference(q, want.data(), want.size()) == want.size());
}

namespace {

// A random walk over one file VMA, with the kernel as the reference: every call made on the
// arena is made on mmap(2) of a second copy of the file, with the same Share mode, and every byte
// read must agree. A second, read-only mapping of each file (in another arena for ours), there for
// part of the walk, must agree too: it shares the page cache with the first, whatever the first
// one does (and while it is there, DontNeed on the first must leave the page cache alone).
// Only operations whose effect on content both sides define the same way are in it: no write past
// the end of the file (the kernel may or may not keep it in its page cache), one Share mode per
// walk (a private mapping's view of shared writes is not defined by POSIX).
struct WalkConfig {
    std::uint64_t seed;
    Share share;
    std::size_t pages;    // of the mapping; the last one is partial
    std::size_t max_run;  // most pages one call covers
    int steps;
};

int mmap_prot(Prot p) {
    return (usermm::allows(p, Prot::Read) ? PROT_READ : 0) | (usermm::allows(p, Prot::Write) ? PROT_WRITE : 0);
}

int madvice(Advice a) {
    switch (a) {
        case Advice::Random:
            return MADV_RANDOM;
        case Advice::Sequential:
            return MADV_SEQUENTIAL;
        case Advice::WillNeed:
            return MADV_WILLNEED;
        case Advice::DontNeed:
            return MADV_DONTNEED;
        default:
            return MADV_NORMAL;
    }
}

const char* advice_name(Advice a) {
    constexpr std::array names = {"Normal", "Random", "Sequential", "WillNeed", "DontNeed"};
    return names[unsigned(a)];
}

Bytes pread_range(int fd, std::uint64_t off, std::size_t len) {
    Bytes out(len);
    std::size_t done = 0;
    while (done < len) {
        const ssize_t n = pread(fd, out.data() + done, len - done, off_t(off + done));
        if (n <= 0) break;
        done += std::size_t(n);
    }
    out.resize(done);
    return out;
}

class FileWalk {
public:
    explicit FileWalk(const WalkConfig& cfg)
        : cfg_(cfg),
          len_(cfg.pages * kPage),
          ours_(len_ - 333),
          theirs_(len_ - 333),
          arena_(1ull << 30),
          view_arena_(1ull << 30),
          prot_(cfg.pages, Prot::ReadWrite),
          rng_(cfg.seed) {
        u_ = static_cast<char*>(arena_.map_file(ours_.path(), 0, len_, Prot::ReadWrite, cfg.share, {.name = "walk"}));
        void* k = mmap(nullptr, len_, PROT_READ | PROT_WRITE, share_flag(), theirs_.fd(), 0);
        REQUIRE(k != MAP_FAILED);
        k_ = static_cast<char*>(k);
        uv_ = static_cast<char*>(view_arena_.map_file(ours_.path(), 0, len_, Prot::Read, cfg.share, {.name = "view"}));
        k = mmap(nullptr, len_, PROT_READ, share_flag(), theirs_.fd(), 0);
        REQUIRE(k != MAP_FAILED);
        kv_ = static_cast<char*>(k);
    }
    ~FileWalk() {
        munmap(k_, len_);
        munmap(kv_, len_);
    }
    FileWalk(const FileWalk&) = delete;
    FileWalk& operator=(const FileWalk&) = delete;

    void run() {
        for (int step = 0; step < cfg_.steps; ++step) {
            INFO(share_name_, " walk, seed ", cfg_.seed, ", step ", step, ": ", what_);
            what_.clear();
            const std::size_t pick = below(100);
            if (pick < 18)
                read_byte_step();
            else if (pick < 24)
                read_page_step();
            else if (pick < 29)
                read_view_step();
            else if (pick < 30)
                toggle_view_step();
            else if (pick < 54)
                write_step();
            else if (pick < 64)
                protect_step();
            else if (pick < 76)
                advise_step();
            else if (pick < 84)
                sync_step();
            else if (pick < 92)
                remap_step();
            else
                compare_all();
            if (step % 25 == 0) {
                REQUIRE_NOTHROW(arena_.verify());
                REQUIRE_NOTHROW(view_arena_.verify());
            }
        }
        what_ = "the end";
        INFO(share_name_, " walk, seed ", cfg_.seed, ": ", what_);
        compare_all();
        CHECK(writes_ > cfg_.steps / 8);  // the walk did write
        arena_.sync(u_, len_);
        REQUIRE(msync(k_, len_, MS_SYNC) == 0);
        const Bytes ours = ours_.content(), theirs = theirs_.content();
        REQUIRE(ours.size() == ours_.size());
        const std::size_t d = first_difference(ours.data(), theirs.data(), std::min(ours.size(), theirs.size()));
        INFO("the files differ first at byte ", d, " (page ", d / kPage, ")");
        CHECK(d == ours.size());
        CHECK(ours.size() == theirs.size());
        if (cfg_.share == Share::Private)
            CHECK(ours == ours_.expected());  // private writes never reach the file
        else
            CHECK(ours != ours_.expected());  // shared ones do
        REQUIRE_NOTHROW(arena_.verify());
        REQUIRE_NOTHROW(view_arena_.verify());
        const usermm::Stats s = arena_.stats(), v = view_arena_.stats();
        CHECK(s.major_faults + v.major_faults > 0);
        CHECK(s.access_errors + v.access_errors == 0);
    }

private:
    std::size_t below(std::size_t n) { return std::size_t(rng_() % n); }

    int share_flag() const { return cfg_.share == Share::Shared ? MAP_SHARED : MAP_PRIVATE; }

    // A random page satisfying `ok`, or cfg_.pages if there is none.
    template <typename Ok>
    std::size_t any_page(Ok ok) {
        std::vector<std::size_t> fit;
        for (std::size_t i = 0; i < cfg_.pages; ++i)
            if (ok(prot_[i])) fit.push_back(i);
        return fit.empty() ? cfg_.pages : fit[below(fit.size())];
    }

    // Pages [first, last): sometimes the whole mapping, mostly a few pages.
    std::pair<std::size_t, std::size_t> any_span() {
        if (below(10) == 0) return {0, cfg_.pages};
        const std::size_t first = below(cfg_.pages);
        return {first, std::min(cfg_.pages, first + 1 + below(cfg_.max_run))};
    }

    Prot any_prot() {
        constexpr std::array prots = {Prot::None, Prot::Read, Prot::ReadWrite, Prot::ReadWrite};
        return prots[below(prots.size())];
    }

    void read_byte_step() {
        const std::size_t page = any_page([](Prot p) { return usermm::allows(p, Prot::Read); });
        if (page == cfg_.pages) return protect_step();
        const std::size_t off = page * kPage + below(kPage);
        what_ = fmt::format("read byte {:#x}", off);
        REQUIRE(read_byte(u_ + off) == read_byte(k_ + off));
    }

    void read_page_step() {
        const std::size_t page = any_page([](Prot p) { return usermm::allows(p, Prot::Read); });
        if (page == cfg_.pages) return protect_step();
        what_ = fmt::format("read page {}", page);
        check_page(page);
    }

    void read_view_step() {
        if (!view_on_) return toggle_view_step();
        const std::size_t page = below(cfg_.pages);
        what_ = fmt::format("read page {} of the second mapping", page);
        check_view_page(page);
    }

    // Our second mapping comes and goes (the kernel's stays: it changes nothing).
    void toggle_view_step() {
        what_ = view_on_ ? "unmap the second mapping" : "map the second mapping again";
        if (view_on_)
            view_arena_.unmap(uv_, len_);
        else
            REQUIRE(view_arena_.map_file(ours_.fd(), 0, len_, Prot::Read, cfg_.share,
                                         {.name = "view", .address = uv_}) == uv_);
        view_on_ = !view_on_;
    }

    void write_step() {
        const std::size_t page = any_page([](Prot p) { return usermm::allows(p, Prot::Write); });
        if (page == cfg_.pages) return protect_step();
        // Only bytes inside the file: what a write past its end leaves in the last page is up to
        // the kernel's page cache.
        const std::size_t room = std::min(kPage, ours_.size() - page * kPage);
        const std::size_t off = page * kPage + below(room);
        const std::size_t n = std::min<std::size_t>(1 + below(below(4) == 0 ? 64 : 4), page * kPage + room - off);
        what_ = fmt::format("write {} bytes at {:#x}", n, off);
        for (std::size_t i = 0; i < n; ++i) {
            const auto v = std::uint8_t(rng_());
            write_byte(u_ + off + i, v);
            write_byte(k_ + off + i, v);
        }
        ++writes_;
    }

    void protect_step() {
        const auto [first, last] = any_span();
        const Prot prot = any_prot();
        what_ = fmt::format("protect pages [{}, {}) {}", first, last, usermm::to_string(prot));
        arena_.protect(u_ + first * kPage, (last - first) * kPage, prot);
        REQUIRE(mprotect(k_ + first * kPage, (last - first) * kPage, mmap_prot(prot)) == 0);
        std::fill(prot_.begin() + std::ptrdiff_t(first), prot_.begin() + std::ptrdiff_t(last), prot);
    }

    void advise_step() {
        const auto [first, last] = any_span();
        constexpr std::array advice = {Advice::DontNeed, Advice::DontNeed, Advice::WillNeed, Advice::Random,
                                       Advice::Sequential, Advice::Normal};
        const Advice a = advice[below(advice.size())];
        what_ = fmt::format("advise pages [{}, {}) {}", first, last, advice_name(a));
        arena_.advise(u_ + first * kPage, (last - first) * kPage, a);
        REQUIRE(madvise(k_ + first * kPage, (last - first) * kPage, madvice(a)) == 0);
        // DontNeed writes dirty shared pages back before it drops them.
        if (a == Advice::DontNeed) check_file(first, last);
        // DontNeed leaves the page cache alone (as MADV_DONTNEED); memory pressure does not: then
        // the next read of a page no mapping holds is a major fault.
        if (a == Advice::DontNeed && below(2) == 0) {
            ours_.drop_cache();
            theirs_.drop_cache();
        }
        check_some_page(first, last);
    }

    void sync_step() {
        const auto [first, last] = any_span();
        what_ = fmt::format("sync pages [{}, {})", first, last);
        arena_.sync(u_ + first * kPage, (last - first) * kPage);
        REQUIRE(msync(k_ + first * kPage, (last - first) * kPage, MS_SYNC) == 0);
        check_file(first, last);
    }

    // munmap and mmap again: private writes of the range are gone; shared ones were written back.
    void remap_step() {
        const auto [first, last] = any_span();
        const Prot prot = any_prot();
        constexpr std::array<std::size_t, 3> windows = {1, 4, 16};
        const std::size_t fa = below(2) ? 16 : windows[below(windows.size())];
        what_ = fmt::format("unmap and map pages [{}, {}) {} fa {}", first, last, usermm::to_string(prot), fa);
        const std::size_t off = first * kPage, n = (last - first) * kPage;
        arena_.unmap(u_ + off, n);
        void* got = arena_.map_file(ours_.fd(), off, n, prot, cfg_.share,
                                    {.name = "walk", .address = u_ + off, .fault_around_pages = fa});
        REQUIRE(got == u_ + off);
        void* k = mmap(k_ + off, n, mmap_prot(prot), MAP_FIXED | share_flag(), theirs_.fd(), off_t(off));
        REQUIRE(k == k_ + off);
        std::fill(prot_.begin() + std::ptrdiff_t(first), prot_.begin() + std::ptrdiff_t(last), prot);
        check_file(first, last);
        check_some_page(first, last);
    }

    // After write-back of pages [first, last), our file holds there what the kernel's mapping
    // shows (its page cache): the shared writes. A private walk's file never changes.
    void check_file(std::size_t first, std::size_t last) {
        const std::uint64_t off = first * kPage;
        const std::size_t n = std::size_t(std::min<std::uint64_t>(last * kPage, ours_.size()) - off);
        const Bytes ours = pread_range(ours_.fd(), off, n), theirs = pread_range(theirs_.fd(), off, n);
        REQUIRE(ours.size() == n);
        const std::size_t d = first_difference(ours.data(), theirs.data(), n);
        INFO("the files differ at byte ", off + d);
        REQUIRE(d == n);
    }

    void check_page(std::size_t page) {
        const std::size_t d =
            first_difference(u_ + page * kPage, reinterpret_cast<const std::uint8_t*>(k_) + page * kPage, kPage);
        INFO("page ", page, " differs from the kernel's at byte ", d);
        REQUIRE(d == kPage);
    }

    void check_view_page(std::size_t page) {
        if (!view_on_) return;
        const std::size_t d =
            first_difference(uv_ + page * kPage, reinterpret_cast<const std::uint8_t*>(kv_) + page * kPage, kPage);
        INFO("page ", page, " of the second mapping differs from the kernel's at byte ", d);
        REQUIRE(d == kPage);
    }

    void check_some_page(std::size_t first, std::size_t last) {
        const std::size_t page = first + below(last - first);
        if (usermm::allows(prot_[page], Prot::Read)) check_page(page);
        check_view_page(page);
    }

    void compare_all() {
        what_ = "compare every readable page";
        for (std::size_t page = 0; page < cfg_.pages; ++page) {
            if (usermm::allows(prot_[page], Prot::Read)) check_page(page);
            check_view_page(page);
        }
    }

    const WalkConfig cfg_;
    const std::string share_name_ = cfg_.share == Share::Shared ? "shared" : "private";
    const std::size_t len_;
    TempFile ours_;    // mapped by the arena
    TempFile theirs_;  // mapped by the kernel
    Arena arena_;       // after the files: destroyed (and written back) first
    Arena view_arena_;  // the second mapping of our file
    char* u_ = nullptr;
    char* k_ = nullptr;
    char* uv_ = nullptr;  // the second mappings, read-only
    char* kv_ = nullptr;
    bool view_on_ = true;
    std::vector<Prot> prot_;  // per page, on both sides
    std::mt19937_64 rng_;
    int writes_ = 0;
    std::string what_;
};

}  // namespace

// Protects the equivalence of file VMAs with mmap(2) for MAP_SHARED: reads, writes, protect,
// advice, sync and remapping leave the same bytes in the mapping and, after sync, in the file.
TEST_CASE("model: a shared file VMA against the kernel's MAP_SHARED of a copy of the file") {
    for (std::uint64_t seed = 1; seed <= 2; ++seed)
        FileWalk({.seed = seed, .share = Share::Shared, .pages = 40, .max_run = 8, .steps = 2000 / kScale}).run();
    FileWalk({.seed = 3, .share = Share::Shared, .pages = 9, .max_run = 3, .steps = 1500 / kScale}).run();
}

// Protects the same equivalence for MAP_PRIVATE: private writes show in the mapping only, are lost
// on DontNeed and remapping, and never reach the file or the page cache.
TEST_CASE("model: a private file VMA against the kernel's MAP_PRIVATE of a copy of the file") {
    for (std::uint64_t seed = 11; seed <= 12; ++seed)
        FileWalk({.seed = seed, .share = Share::Private, .pages = 40, .max_run = 8, .steps = 3000 / kScale}).run();
    FileWalk({.seed = 13, .share = Share::Private, .pages = 9, .max_run = 3, .steps = 2000 / kScale}).run();
}

namespace {

// In a forked child, where doctest's assertions cannot report: a failed check ends the child with
// a message and exit status 3.
void child_check(bool ok, const std::string& what) {
    if (ok) return;
    std::fprintf(stderr, "child: %s\n", what.c_str());
    std::fflush(stderr);
    _exit(3);
}

void child_expect_bytes(const char* p, const Bytes& want, const char* what) {
    const std::size_t d = first_difference(p, want.data(), want.size());
    child_check(d == want.size(), fmt::format("{}: byte {:#x} is {:#x}, expected {:#x}", what, d,
                                              d < want.size() ? read_byte(p + d) : 0, d < want.size() ? want[d] : 0));
}

}  // namespace

// Protects MAP_SHARED across fork(): the child inherits the mapping and its page cache; what it
// writes and syncs reaches the file, and the parent's mapping shows it, as the kernel's would.
TEST_CASE("fork: a child's write to an inherited shared file mapping reaches the file and the parent") {
    constexpr std::size_t kPages = 16;
    TempFile file(kPages * kPage + 77);
    Bytes want = mapped_image(file);
    Arena arena(1ull << 30);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared,
                                                {.fault_around_pages = 1, .readahead_pages = 1}));
    // Before the fork: page 0 read, page 1 written and synced, page 2 written and left dirty; the
    // other pages untouched (not even in the page cache).
    REQUIRE(read_byte(p + 10) == pattern_byte(10));
    write_byte(p + kPage + 1, 0xa1);
    want[kPage + 1] = 0xa1;
    arena.sync(p, file.size());
    write_byte(p + 2 * kPage + 2, 0xa2);
    want[2 * kPage + 2] = 0xa2;

    // The child reads everything, writes a page the parent read, one it wrote, one it never
    // touched and the last (partial) page, and syncs.
    const std::array<std::size_t, 4> child_writes = {5, kPage + 100, 9 * kPage + 9, kPages * kPage + 3};
    const auto end = run_in_child([&] {
        child_expect_bytes(p, want, "before the child's writes");
        Bytes mine = want;
        for (std::size_t off : child_writes) {
            write_byte(p + off, 0xc0);
            mine[off] = 0xc0;
        }
        arena.sync(p, file.size());
        child_expect_bytes(p, mine, "after the child's writes");
        // Dropping the pages in the child must not drop them under the parent, which maps the
        // same page cache: the child's pages come back with the same content, the parent keeps
        // its own. (The child reads only the second half again: reading a page refills it.)
        arena.advise(p, file.size(), Advice::DontNeed);
        child_expect_bytes(p + 8 * kPage, Bytes(mine.begin() + 8 * std::ptrdiff_t(kPage), mine.end()),
                           "after DontNeed in the child");
        arena.verify();
    });
    INFO("child stderr: ", end.err);
    REQUIRE(end.exited);
    REQUIRE(end.exit_code == 0);
    for (std::size_t off : child_writes) want[off] = 0xc0;

    // The file has the child's writes, and the parent's dirty page too: the child's sync wrote
    // every dirty page of its copy of the VMA, as msync in a child writes the shared page cache.
    const Bytes in_file = file.content();
    Bytes want_file(want.begin(), want.begin() + std::ptrdiff_t(file.size()));
    CHECK(in_file == want_file);
    for (std::size_t off : child_writes) CHECK(in_file[off] == 0xc0);
    // The parent's mapping shows them at once, touched pages and untouched ones alike.
    CHECK(first_difference(p, want.data(), want.size()) == want.size());
    // The parent goes on writing; its sync writes its dirty page (again) and the new write.
    write_byte(p + 12 * kPage, 0xb1);
    want[12 * kPage] = 0xb1;
    want_file[12 * kPage] = 0xb1;
    arena.sync(p, file.size());
    CHECK(file.content() == want_file);
    arena.verify();
}

// Protects MAP_PRIVATE across fork(): the child sees the parent's private writes made before the
// fork; its own writes stay in the child, out of the parent's mapping and the file.
TEST_CASE("fork: a child's write to an inherited private file mapping is seen by nobody else") {
    constexpr std::size_t kPages = 16;
    TempFile file(kPages * kPage);
    Bytes want = file.expected();
    Arena arena(1ull << 30);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Private,
                                                {.fault_around_pages = 1, .readahead_pages = 1}));
    write_byte(p + 7, 0x11);  // the parent's own copy of page 0
    want[7] = 0x11;
    REQUIRE(read_byte(p + 3 * kPage) == pattern_byte(3 * kPage));  // page 3 mapped from the page cache

    const std::array<std::size_t, 3> child_writes = {7, 3 * kPage + 3, 11 * kPage + 11};
    const auto end = run_in_child([&] {
        child_expect_bytes(p, want, "before the child's writes");
        Bytes mine = want;
        for (std::size_t off : child_writes) {
            write_byte(p + off, 0xcc);
            mine[off] = 0xcc;
        }
        arena.sync(p, file.size());  // nothing to write: a private VMA
        child_expect_bytes(p, mine, "after the child's writes");
        // DontNeed drops the child's private copies (and must leave the page cache the parent
        // maps alone): the child sees the file again.
        arena.advise(p, file.size(), Advice::DontNeed);
        const Bytes from_file = file.expected();
        child_expect_bytes(p + 8 * kPage, Bytes(from_file.begin() + 8 * std::ptrdiff_t(kPage), from_file.end()),
                           "after DontNeed in the child");
        arena.verify();
    });
    INFO("child stderr: ", end.err);
    REQUIRE(end.exited);
    REQUIRE(end.exit_code == 0);

    CHECK(first_difference(p, want.data(), want.size()) == want.size());
    for (std::size_t off : child_writes) CHECK(read_byte(p + off) == want[off]);
    CHECK(file.content() == file.expected());
    // A second mapping (of the same page cache) shows the file: the child's writes never reached
    // the page cache either.
    char* q = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private));
    CHECK(first_difference(q, file.expected().data(), file.size()) == file.size());
    arena.verify();
}
