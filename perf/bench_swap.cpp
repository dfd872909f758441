// Reclaim and swap (issue 11's benchmark): every figure side by side with its floor, measured in
// the same run, as a ratio against its target.
//  a. Under the limit: random writes and reads over pages that fit, in a fresh arena with a
//     resident limit (twice the pages) and a SwapFile, against the same arena without either.
//  b. Replacement quality: reference strings (perf/refstring.hpp: uniform, Zipf 0.99, a loop 1.1
//     times the limit, a scan mixed into a Zipf working set) over 2 and 4 times the limit,
//     replayed on arenas with each Policy; usermm's major faults next to exact LRU, FIFO and OPT
//     (and the page-granular CLOCK and S3-FIFO models) computed offline with frames = the limit.
//     Every page is written first and paged out, so that both start empty and every miss of the
//     replay is a swap-in.
//  c. Swap-in latency: reads of random swapped-out pages, each timed, against the floor of any
//     SIGSEGV-based swap: a handler that reads the page from a file with an O_DIRECT pread,
//     mprotects the page and copies it in (its parts are timed alone too).
//  d. Sequential swap-in (readahead) against O_DIRECT 256 KiB sequential preads of a file, and
//     the write-out of a PageOut against O_DIRECT 256 KiB pwrites, on the same file system.
// Files live in USERMM_BENCH_DIR (default /var/tmp, which is on a disk here). Free memory is warmed
// (touched and freed) before each timed pass: the VM's first touch of memory it gave back to the
// host is slow.
// Usage: usermm-bench-swap [limit pages (2048: 8 MiB)] [references per string (100000)]
//        [MiB for c and d (256)] [rounds (3)]; `64 2000 4 1` is a smoke run.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include "bench_util.hpp"
#include "offline_policies.hpp"
#include "refstring.hpp"

using usermm::Advice;
using usermm::Prot;
using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kCluster = 32;       // usermm's unit of reclaim, in pages
constexpr std::size_t kChunk = 256 << 10;  // the floor's O_DIRECT transfer size

// Thrown, so that the stores alive unwind and remove their files; main reports it.
[[noreturn]] void die(const std::string& what) { throw std::runtime_error(what); }
[[noreturn]] void die_errno(const std::string& what) { die(fmt::format("{}: {}", what, std::strerror(errno))); }

std::string bench_dir() {
    const char* dir = std::getenv("USERMM_BENCH_DIR");
    return dir && *dir ? dir : "/var/tmp";
}

std::string temp_path(const char* what) { return fmt::format("{}/usermm-bench-swap-{}-{}", bench_dir(), what, getpid()); }

std::uint64_t& word(char* base, std::size_t page, std::size_t i = 0) {
    return reinterpret_cast<std::uint64_t*>(base + page * kPage)[i];
}
std::uint64_t read_word(const char* base, std::size_t page) {
    return *reinterpret_cast<const volatile std::uint64_t*>(base + page * kPage);
}

// Tags each page (word 0 = page + 1), so that every later read can check it has its own page back.
void write_tags(char* p, std::size_t pages) {
    for (std::size_t i = 0; i < pages; ++i) word(p, i) = i + 1;
}

void target_line(const std::string& what, double value, const std::string& op, double limit, bool met) {
    fmt::print("  {:<58} {:>7.3f} {} {:<5} {}\n", what, value, op, limit, met ? "met" : "MISSED");
}

// A file of `bytes` whose first word of each page tags it as write_tags does, written through the
// page cache, synced and dropped from it, then open with O_DIRECT; removed with the object.
struct TaggedFile {
    std::string path;
    int fd = -1;
    TaggedFile(std::string file, std::size_t bytes) : path(std::move(file)) {
        const int w = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (w < 0) die_errno("open " + path);
        std::vector<char> block(1 << 20);
        for (std::size_t at = 0; at < bytes; at += block.size()) {
            const std::size_t n = std::min(block.size(), bytes - at);
            for (std::size_t pg = 0; pg < n / kPage; ++pg) word(block.data(), pg) = at / kPage + pg + 1;
            if (pwrite(w, block.data(), n, off_t(at)) != ssize_t(n)) die_errno("pwrite " + path);
        }
        if (fsync(w) != 0) die_errno("fsync " + path);
        posix_fadvise(w, 0, 0, POSIX_FADV_DONTNEED);
        close(w);
        fd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
        if (fd < 0) {
            unlink(path.c_str());
            die_errno("open O_DIRECT " + path);
        }
    }
    ~TaggedFile() {
        close(fd);
        unlink(path.c_str());
    }
    TaggedFile(const TaggedFile&) = delete;
    TaggedFile& operator=(const TaggedFile&) = delete;
};

usermm::ArenaOptions with_store(usermm::Store& store, std::size_t limit_bytes = 0,
                                usermm::Policy policy = usermm::ArenaOptions{}.policy) {
    usermm::ArenaOptions o;
    o.resident_limit = limit_bytes;
    o.store = &store;
    o.policy = policy;
    return o;
}

struct AlignedBuffer {
    void* p;
    explicit AlignedBuffer(std::size_t bytes) : p(std::aligned_alloc(kPage, bytes)) {
        if (!p) die("aligned_alloc failed");
    }
    ~AlignedBuffer() { std::free(p); }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
    char* data() const { return static_cast<char*>(p); }
};

// ---- a. under the limit ----

volatile std::uint64_t g_sink;  // what the reads of a pass read, so that they are not optimised away

// One pass: a fresh arena, `ops` random accesses over `pages` pages (half of them writes),
// the first of each page included; ms.
double fit_pass(std::size_t pages, std::size_t ops, usermm::SwapFile* swap, usermm::Stats* stats) {
    usermm::Arena arena(2 * pages * kPage, swap ? with_store(*swap, 2 * pages * kPage) : usermm::ArenaOptions{});
    std::mt19937_64 rng(7);
    std::uint64_t read_sum = 0, writes = 0;
    const std::uint64_t t0 = now_ns();
    char* p = static_cast<char*>(arena.map(pages * kPage, Prot::ReadWrite));
    for (std::size_t i = 0; i < ops; ++i) {
        const std::uint64_t r = rng();
        const std::size_t pg = std::size_t(r >> 1) % pages;
        if (r & 1) {
            ++word(p, pg);
            ++writes;
        } else {
            read_sum += read_word(p, pg);
        }
    }
    const double ms = double(now_ns() - t0) / 1e6;
    *stats = arena.stats();
    std::uint64_t total = 0;
    for (std::size_t pg = 0; pg < pages; ++pg) total += read_word(p, pg);
    if (total != writes) die("under the limit: the pages lost writes");
    g_sink = read_sum;
    return ms;
}

void under_the_limit(std::size_t pages, std::size_t rounds) {
    const std::size_t ops = 8 * pages;
    usermm::SwapFile swap(temp_path("fit"), 2 * pages * kPage + (1 << 20));
    usermm::Stats limited{}, plain{};
    std::vector<double> with, without;
    for (std::size_t r = 0; r <= rounds; ++r) {  // round 0 warms up and is not counted
        for (std::size_t j = 0; j < 2; ++j) {
            const bool limit = (r + j) % 2 == 0;
            warm_free_memory(pages * kPage * 3);
            const double ms = fit_pass(pages, ops, limit ? &swap : nullptr, limit ? &limited : &plain);
            if (r > 0) (limit ? with : without).push_back(ms);
        }
    }
    const double w = median(with), wo = median(without);
    fmt::print("a. under the limit: {} pages ({} MiB), {} random accesses (half writes) in a fresh arena, median of "
               "{} passes each\n",
               pages, pages * kPage >> 20, ops, with.size());
    fmt::print("  {:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n", "", "ms", "minor", "write", "around", "swapped",
               "hinting");
    const auto line = [](const char* what, double ms, const usermm::Stats& s) {
        fmt::print("  {:<40} {:>9.2f} {:>9} {:>9} {:>9} {:>9} {:>9}\n", what, ms, s.minor_faults, s.write_faults,
                   s.fault_around_pages, s.pages_swapped_out, s.hinting_faults);
    };
    line("limit 2x the pages + SwapFile", w, limited);
    line("no limit, no store (as before issue 11)", wo, plain);
    target_line("limit / no limit", w / wo, "<=", 1.05, w / wo <= 1.05);
}

// ---- b. replacement quality ----

struct Replay {
    std::uint64_t majors = 0, minors = 0, hinting = 0, direct = 0, out = 0, in = 0, ra_hits = 0, ra_wasted = 0;
    double seconds = 0;
};

Replay replay(const usermm_refstring::RefString& s, std::size_t limit_pages, usermm::Policy policy,
              usermm::SwapFile& swap) {
    const std::size_t bytes = std::size_t(s.page_count) * kPage;
    usermm::Arena arena(bytes, with_store(swap, limit_pages * kPage, policy));
    char* p = static_cast<char*>(arena.map(bytes, Prot::ReadWrite, {.name = "refs"}));
    write_tags(p, s.page_count);
    arena.advise(p, bytes, Advice::PageOut);
    const usermm::Stats before = arena.stats();
    std::vector<std::uint32_t> writes(s.page_count);
    std::size_t wrong = 0;
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < s.pages.size(); ++i) {
        const std::uint32_t pg = s.pages[i];
        // Word 0 says the page is its own, word 1 that it lost no write since it was last touched.
        wrong += read_word(p, pg) != pg + 1u || word(p, pg, 1) != writes[pg];
        if (s.writes[i]) {
            ++word(p, pg, 1);
            ++writes[pg];
        }
    }
    Replay out;
    out.seconds = double(now_ns() - t0) / 1e9;
    const usermm::Stats after = arena.stats();
    out.majors = after.major_faults - before.major_faults;
    out.minors = after.minor_faults - before.minor_faults;
    out.hinting = after.hinting_faults - before.hinting_faults;
    out.direct = after.direct_reclaims - before.direct_reclaims;
    out.out = after.pages_swapped_out - before.pages_swapped_out;
    out.in = after.pages_swapped_in - before.pages_swapped_in;
    out.ra_hits = after.swap_readahead_hits - before.swap_readahead_hits;
    out.ra_wasted = after.swap_readahead_wasted - before.swap_readahead_wasted;
    if (wrong != 0) die(fmt::format("replay: {} pages read back wrong", wrong));
    return out;
}

// Exact LRU with usermm's unit of reclaim: a miss loads its page alone, an eviction drops every
// resident page of the least recently used aligned cluster. What any policy that reclaims
// clusters, with perfect reference information, would pay: the part of usermm's gap to exact LRU
// that comes from the clusters, not from the policy.
std::uint64_t cluster_lru_faults(std::span<const std::uint32_t> refs, std::size_t frames, std::uint32_t page_count) {
    constexpr std::uint32_t kNone = UINT32_MAX;
    const std::size_t clusters = (page_count + kCluster - 1) / kCluster;
    std::vector<std::uint32_t> newer(clusters, kNone), older(clusters, kNone), held(clusters);
    std::vector<bool> resident(page_count), listed(clusters);
    std::uint32_t head = kNone, tail = kNone;
    const auto unlink_cluster = [&](std::uint32_t c) {
        (newer[c] != kNone ? older[newer[c]] : head) = older[c];
        (older[c] != kNone ? newer[older[c]] : tail) = newer[c];
    };
    std::size_t used = 0;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        const auto c = std::uint32_t(p / kCluster);
        if (!resident[p]) {
            ++faults;
            if (used == frames) {
                std::uint32_t victim = tail;
                if (victim == c) victim = newer[victim];  // the faulting page's own cluster stays
                unlink_cluster(victim);
                listed[victim] = false;
                const std::size_t first = std::size_t(victim) * kCluster;
                for (std::size_t q = first; q < std::min<std::size_t>(page_count, first + kCluster); ++q) resident[q] = false;
                used -= held[victim];
                held[victim] = 0;
            }
            resident[p] = true;
            ++held[c];
            ++used;
        }
        if (listed[c]) unlink_cluster(c);
        newer[c] = kNone;
        older[c] = head;
        (head != kNone ? newer[head] : tail) = c;
        head = c;
        listed[c] = true;
    }
    return faults;
}

constexpr usermm::Policy kArenaPolicies[] = {usermm::Policy::Fifo, usermm::Policy::Clock, usermm::Policy::S3Fifo};
constexpr const char* kArenaPolicyNames[] = {"FIFO", "CLOCK", "S3-FIFO"};
constexpr usermm_offline::Policy kOffline[] = {usermm_offline::Policy::Opt, usermm_offline::Policy::Lru,
                                               usermm_offline::Policy::Fifo, usermm_offline::Policy::Clock,
                                               usermm_offline::Policy::S3Fifo};

struct QualityRow {
    std::string name;
    std::uint32_t pages = 0;
    std::uint64_t offline[std::size(kOffline)] = {};
    std::uint64_t cluster_lru = 0;
    Replay arena[std::size(kArenaPolicies)];
};

void replacement_quality(std::size_t limit_pages, std::size_t refs) {
    const auto k = std::uint32_t(limit_pages);
    constexpr double kWrites = 0.2;
    std::vector<std::pair<std::string, usermm_refstring::RefString>> strings;
    {
        usermm_refstring::Loop g(k + k / 10, 1, kWrites);
        strings.emplace_back("loop 1.1x", usermm_refstring::take(g, refs));
    }
    for (const std::uint32_t times : {2u, 4u}) {
        const std::uint32_t pages = times * k;
        const std::string x = fmt::format(" {}x", times);
        usermm_refstring::Uniform u(pages, times, kWrites);
        strings.emplace_back("uniform" + x, usermm_refstring::take(u, refs));
        usermm_refstring::Zipf z(pages, 0.99, times, kWrites);
        strings.emplace_back("zipf 0.99" + x, usermm_refstring::take(z, refs));
        usermm_refstring::ScanMix m(pages / 2, 0.99, pages / 2, 0.25, std::max<std::uint32_t>(1, k / 4), times,
                                    kWrites);
        strings.emplace_back("scan mix" + x, usermm_refstring::take(m, refs));
    }
    usermm::SwapFile swap(temp_path("refs"), std::uint64_t(4 * limit_pages + limit_pages) * kPage + (1 << 20));
    std::vector<QualityRow> rows;
    for (const auto& [name, s] : strings) {
        QualityRow row;
        row.name = name;
        row.pages = s.page_count;
        for (std::size_t i = 0; i < std::size(kOffline); ++i)
            row.offline[i] = usermm_offline::faults(kOffline[i], s.pages, limit_pages);
        row.cluster_lru = cluster_lru_faults(s.pages, limit_pages, s.page_count);
        for (std::size_t i = 0; i < std::size(kArenaPolicies); ++i) {
            fmt::print(stderr, "replaying {} with {}\n", name, kArenaPolicyNames[i]);  // progress: these take long
            row.arena[i] = replay(s, limit_pages, kArenaPolicies[i], swap);
        }
        rows.push_back(row);
    }

    const usermm::Policy def = usermm::ArenaOptions{}.policy;
    const std::size_t def_i = std::size_t(std::find(std::begin(kArenaPolicies), std::end(kArenaPolicies), def) -
                                          std::begin(kArenaPolicies));
    fmt::print("\nb. replacement quality: limit {} pages ({} MiB, {} clusters), {} references per string, 20% "
               "writes; major faults\n",
               limit_pages, limit_pages * kPage >> 20, limit_pages / kCluster, refs);
    fmt::print("   (offline: exact page-granular simulations with frames = the limit, cold misses included; usermm: "
               "the same string replayed on an arena\n"
               "    whose pages were all written and paged out first. usermm reclaims aligned clusters of {} pages and "
               "evicts from its high watermark\n"
               "    (limit - 1/16) down to its low one (limit - 1/8): it has fewer units of replacement, and on "
               "average fewer frames, than the simulations.\n"
               "    LRU/32: exact LRU evicting whole clusters of {} pages, pages loaded one by one at their faults)\n",
               kCluster, kCluster);
    fmt::print("  {:<14} {:>7} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8}\n", "string", "pages", "OPT",
               "LRU", "FIFO", "CLOCK", "S3-FIFO", "LRU/32", "u:FIFO", "u:CLOCK", "u:S3FIFO");
    for (const QualityRow& r : rows) {
        fmt::print("  {:<14} {:>7} |", r.name, r.pages);
        for (const std::uint64_t f : r.offline) fmt::print(" {:>8}", f);
        fmt::print(" {:>8} |", r.cluster_lru);
        for (const Replay& a : r.arena) fmt::print(" {:>8}", a.majors);
        fmt::print("\n");
    }
    fmt::print("  as a ratio to exact LRU:\n");
    for (const QualityRow& r : rows) {
        const double lru = double(r.offline[1]);
        fmt::print("  {:<14} {:>7} |", r.name, "");
        for (const std::uint64_t f : r.offline) fmt::print(" {:>8.3f}", double(f) / lru);
        fmt::print(" {:>8.3f} |", double(r.cluster_lru) / lru);
        for (const Replay& a : r.arena) fmt::print(" {:>8.3f}", double(a.majors) / lru);
        fmt::print("\n");
    }
    fmt::print("  usermm's pages swapped in (at major faults and read ahead), as a ratio to exact LRU: what "
               "replacement alone,\n  without readahead's help, is judged by:\n");
    for (const QualityRow& r : rows) {
        fmt::print("  {:<14} {:>7} | {:>53} |", r.name, "", "");
        for (const Replay& a : r.arena) fmt::print(" {:>8.3f}", double(a.in) / double(r.offline[1]));
        fmt::print("\n");
    }
    fmt::print("  usermm's replays: seconds, minor faults (hinting faults among them), direct reclaims, pages swapped "
               "out / in, swap readahead hits / wasted, and pages swapped in that none of majors, hits and wasted "
               "counts\n"
               "  (a page read ahead and then used is a hit, not a major fault: readahead, not replacement, saves "
               "those;\n"
               "   pages read ahead and still resident unused at the end are the only ones the counters may leave "
               "out: at most the limit)\n");
    for (const QualityRow& r : rows)
        for (std::size_t i = 0; i < std::size(kArenaPolicies); ++i) {
            const Replay& a = r.arena[i];
            fmt::print("  {:<14} {:<8} {:>7.2f} s  minor {:>8} (hinting {:>8})  direct {:>7}  out {:>8}  in {:>8}  "
                       "readahead {:>7} / {:>7}  uncounted {:>7}\n",
                       r.name, kArenaPolicyNames[i], a.seconds, a.minors, a.hinting, a.direct, a.out, a.in, a.ra_hits,
                       a.ra_wasted, std::int64_t(a.in) - std::int64_t(a.majors + a.ra_hits + a.ra_wasted));
        }
    fmt::print("  targets (default policy: {}):\n", kArenaPolicyNames[def_i]);
    for (const QualityRow& r : rows) {
        const double ratio = double(r.arena[def_i].majors) / double(r.offline[1]);
        if (r.name.starts_with("zipf"))
            target_line(r.name + ": default / exact LRU", ratio, "<=", 1.1, ratio <= 1.1);
        else if (r.name.starts_with("scan mix") || r.name.starts_with("loop"))
            target_line(r.name + ": default / exact LRU (fewer faults)", ratio, "< ", 1.0, ratio < 1.0);
        else
            continue;
        fmt::print("    (by pages swapped in instead of major faults: {:.3f})\n",
                   double(r.arena[def_i].in) / double(r.offline[1]));
    }
}

// ---- c. swap-in latency ----

struct Latency {
    double mean_us = 0, p50_us = 0;
};

Latency summarise(std::vector<double> ns) {
    const double total = std::accumulate(ns.begin(), ns.end(), 0.0);
    return {total / double(ns.size()) / 1e3, median(std::move(ns)) / 1e3};
}

struct SwapInPass {
    Latency latency;
    usermm::Stats stats;
};

// Reads each page of `order` once, timing each read (ns); *wrong counts pages whose tag is not theirs.
std::vector<double> timed_reads(const char* p, const std::vector<std::size_t>& order, std::size_t* wrong) {
    std::vector<double> ns;
    ns.reserve(order.size());
    for (const std::size_t pg : order) {
        const std::uint64_t t0 = now_ns();
        const std::uint64_t v = read_word(p, pg);
        ns.push_back(double(now_ns() - t0));
        *wrong += v != pg + 1;
    }
    return ns;
}

SwapInPass usermm_random_swap_in(std::size_t pages, const std::vector<std::size_t>& order, usermm::SwapFile& swap) {
    usermm::Arena arena(pages * kPage, with_store(swap));
    char* p = static_cast<char*>(arena.map(pages * kPage, Prot::ReadWrite, {.name = "swapped"}));
    write_tags(p, pages);
    arena.advise(p, pages * kPage, Advice::PageOut);
    warm_free_memory(pages * kPage * 3 / 2);
    const usermm::Stats before = arena.stats();
    std::size_t wrong = 0;
    std::vector<double> ns = timed_reads(p, order, &wrong);
    if (wrong != 0) die(fmt::format("random swap-in: {} pages read back wrong", wrong));
    SwapInPass out{summarise(std::move(ns)), arena.stats()};
    const usermm::Stats& a = out.stats;
    out.stats.major_faults = a.major_faults - before.major_faults;
    out.stats.pages_swapped_in = a.pages_swapped_in - before.pages_swapped_in;
    out.stats.swap_readahead_hits = a.swap_readahead_hits - before.swap_readahead_hits;
    out.stats.swap_readahead_wasted = a.swap_readahead_wasted - before.swap_readahead_wasted;
    return out;
}

// The floor's handler: the page comes from the file (O_DIRECT, into a bounce buffer) and becomes
// accessible whole, as a swap-in must, or (no file) only becomes accessible.
struct FloorState {
    std::uintptr_t base = 0;
    std::size_t length = 0;
    int fd = -1;
    char* bounce = nullptr;
} g_floor;

void floor_handler(int, siginfo_t* si, void*) {
    std::uintptr_t addr = 0;
    if (!floor_fault(si, g_floor.base, g_floor.length, &addr)) return;
    const std::uintptr_t page = addr & ~std::uintptr_t(kPage - 1);
    if (g_floor.fd >= 0 && pread(g_floor.fd, g_floor.bounce, kPage, off_t(page - g_floor.base)) != ssize_t(kPage))
        signal(SIGSEGV, SIG_DFL);
    if (mprotect(reinterpret_cast<void*>(page), kPage, PROT_READ | PROT_WRITE) != 0) signal(SIGSEGV, SIG_DFL);
    if (g_floor.fd >= 0) std::memcpy(reinterpret_cast<void*>(page), g_floor.bounce, kPage);
}

// Per access, with `fd` (the whole floor) or without (the signal and mprotect alone). No arena
// exists meanwhile: the handler is swapped in for the pass.
Latency floor_faults(std::size_t pages, const std::vector<std::size_t>& order, int fd, char* bounce) {
    char* p = static_cast<char*>(
        mmap(nullptr, pages * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (p == MAP_FAILED) die_errno("mmap");
    g_floor = {reinterpret_cast<std::uintptr_t>(p), pages * kPage, fd, bounce};
    struct sigaction sa {}, saved {};
    sa.sa_sigaction = floor_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &saved) != 0) die_errno("sigaction");
    warm_free_memory(pages * kPage * 3 / 2);
    std::size_t wrong = 0;
    std::vector<double> ns = timed_reads(p, order, &wrong);
    sigaction(SIGSEGV, &saved, nullptr);
    munmap(p, pages * kPage);
    if (fd >= 0 && wrong != 0) die(fmt::format("the floor read {} pages wrong", wrong));
    return summarise(std::move(ns));
}

Latency direct_preads(const std::vector<std::size_t>& order, int fd, char* bounce) {
    std::vector<double> ns;
    ns.reserve(order.size());
    for (const std::size_t pg : order) {
        const std::uint64_t t0 = now_ns();
        if (pread(fd, bounce, kPage, off_t(pg * kPage)) != ssize_t(kPage)) die_errno("pread O_DIRECT");
        ns.push_back(double(now_ns() - t0));
    }
    return summarise(std::move(ns));
}

void swap_in_latency(std::size_t pages, std::size_t reads, std::size_t rounds, usermm::SwapFile& swap) {
    std::vector<std::size_t> order(pages);
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(11);
    for (std::size_t i = pages - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
    order.resize(std::min(reads, pages));
    const TaggedFile file(temp_path("floor-random"), pages * kPage);
    const int fd = file.fd;
    AlignedBuffer bounce(kPage);

    std::vector<double> um_mean, um_p50, fl_mean, fl_p50, pr_mean, pr_p50, sig_mean, sig_p50;
    SwapInPass last;
    for (std::size_t r = 0; r <= rounds; ++r) {  // round 0 warms up
        const bool usermm_first = r % 2 == 0;
        for (std::size_t j = 0; j < 2; ++j) {
            if ((j == 0) == usermm_first) {
                last = usermm_random_swap_in(pages, order, swap);
                if (r > 0) {
                    um_mean.push_back(last.latency.mean_us);
                    um_p50.push_back(last.latency.p50_us);
                }
            } else {
                const Latency f = floor_faults(pages, order, fd, bounce.data());
                const Latency pr = direct_preads(order, fd, bounce.data());
                const Latency sg = floor_faults(pages, order, -1, nullptr);
                if (r > 0) {
                    fl_mean.push_back(f.mean_us);
                    fl_p50.push_back(f.p50_us);
                    pr_mean.push_back(pr.mean_us);
                    pr_p50.push_back(pr.p50_us);
                    sig_mean.push_back(sg.mean_us);
                    sig_p50.push_back(sg.p50_us);
                }
            }
        }
    }
    fmt::print("\nc. swap-in latency: {} reads of random swapped-out pages of {} MiB (SwapFile{}), µs per access, "
               "median of {} rounds\n",
               order.size(), pages * kPage >> 20, swap.direct() ? ", O_DIRECT" : ", NOT O_DIRECT", um_mean.size());
    fmt::print("  {:<58} {:>9} {:>9}\n", "", "mean", "p50");
    fmt::print("  {:<58} {:>9.1f} {:>9.1f}\n", "usermm: major fault (do_swap_page)", median(um_mean), median(um_p50));
    fmt::print("  {:<58} {:>9.1f} {:>9.1f}\n", "floor: SIGSEGV, O_DIRECT 4 KiB pread, mprotect, copy",
               median(fl_mean), median(fl_p50));
    fmt::print("  {:<58} {:>9.1f} {:>9.1f}\n", "  its parts: O_DIRECT 4 KiB pread alone", median(pr_mean),
               median(pr_p50));
    fmt::print("  {:<58} {:>9.1f} {:>9.1f}\n", "  its parts: SIGSEGV + mprotect alone", median(sig_mean),
               median(sig_p50));
    fmt::print("  last usermm pass: {} major faults, {} pages swapped in, readahead hits {} wasted {}\n",
               last.stats.major_faults, last.stats.pages_swapped_in, last.stats.swap_readahead_hits,
               last.stats.swap_readahead_wasted);
    // Judged on the medians, which the other loads of a shared machine move less than the means.
    const double ratio = median(um_p50) / median(fl_p50);
    fmt::print("  usermm / floor, means: {:.3f}\n", median(um_mean) / median(fl_mean));
    target_line("usermm / floor (p50)", ratio, "<=", 1.2, ratio <= 1.2);
}

// ---- d. sequential swap-in and write-out ----

struct Bandwidth {
    double out_mbs = 0, in_mbs = 0;
    usermm::Stats stats;
};

Bandwidth usermm_sequential(std::size_t pages, usermm::SwapFile& swap) {
    usermm::Arena arena(pages * kPage, with_store(swap));
    char* p = static_cast<char*>(arena.map(pages * kPage, Prot::ReadWrite, {.name = "sequential"}));
    warm_free_memory(pages * kPage * 3 / 2);
    write_tags(p, pages);
    const usermm::Stats s0 = arena.stats();
    std::uint64_t t0 = now_ns();
    arena.advise(p, pages * kPage, Advice::PageOut);
    const double out_s = double(now_ns() - t0) / 1e9;
    const usermm::Stats s1 = arena.stats();
    warm_free_memory(pages * kPage * 3 / 2);
    std::size_t wrong = 0;
    t0 = now_ns();
    for (std::size_t pg = 0; pg < pages; ++pg) wrong += read_word(p, pg) != pg + 1;
    const double in_s = double(now_ns() - t0) / 1e9;
    if (wrong != 0) die(fmt::format("sequential swap-in: {} pages read back wrong", wrong));
    const usermm::Stats s2 = arena.stats();
    Bandwidth out{double(pages * kPage) / out_s / 1e6, double(pages * kPage) / in_s / 1e6, {}};
    out.stats.pages_swapped_out = s1.pages_swapped_out - s0.pages_swapped_out;
    out.stats.swap_bytes_written = s1.swap_bytes_written - s0.swap_bytes_written;
    out.stats.major_faults = s2.major_faults - s1.major_faults;
    out.stats.pages_swapped_in = s2.pages_swapped_in - s1.pages_swapped_in;
    out.stats.swap_readahead_hits = s2.swap_readahead_hits - s1.swap_readahead_hits;
    out.stats.swap_readahead_wasted = s2.swap_readahead_wasted - s1.swap_readahead_wasted;
    out.stats.minor_faults = s2.minor_faults - s1.minor_faults;
    return out;
}

double direct_sequential(int fd, std::size_t bytes, char* buf, bool write) {
    const std::uint64_t t0 = now_ns();
    for (std::size_t at = 0; at < bytes; at += kChunk) {
        const std::size_t n = std::min(kChunk, bytes - at);
        const ssize_t got = write ? pwrite(fd, buf, n, off_t(at)) : pread(fd, buf, n, off_t(at));
        if (got != ssize_t(n)) die_errno(write ? "pwrite O_DIRECT" : "pread O_DIRECT");
    }
    return double(bytes) / (double(now_ns() - t0) / 1e9) / 1e6;
}

void sequential(std::size_t pages, std::size_t rounds, usermm::SwapFile& swap) {
    const std::size_t bytes = pages * kPage;
    const TaggedFile rfile(temp_path("floor-seq-read"), bytes), wfile(temp_path("floor-seq-write"), bytes);
    const int rfd = rfile.fd, wfd = wfile.fd;
    AlignedBuffer buf(kChunk);
    std::memset(buf.data(), 0x5a, kChunk);
    std::vector<double> um_out, um_in, fl_read, fl_write;
    Bandwidth last;
    for (std::size_t r = 0; r <= rounds; ++r) {  // round 0 warms up (and allocates the files' blocks)
        const bool usermm_first = r % 2 == 0;
        for (std::size_t j = 0; j < 2; ++j) {
            if ((j == 0) == usermm_first) {
                last = usermm_sequential(pages, swap);
                if (r > 0) {
                    um_out.push_back(last.out_mbs);
                    um_in.push_back(last.in_mbs);
                }
            } else {
                const double rd = direct_sequential(rfd, bytes, buf.data(), false);
                const double wr = direct_sequential(wfd, bytes, buf.data(), true);
                if (r > 0) {
                    fl_read.push_back(rd);
                    fl_write.push_back(wr);
                }
            }
        }
    }
    fmt::print("\nd. sequential: {} MiB written, paged out (PageOut) and read back in order; MB/s, median of {} "
               "rounds\n",
               bytes >> 20, um_in.size());
    fmt::print("  {:<58} {:>9.0f}\n", "usermm: sequential swap-in (readahead)", median(um_in));
    fmt::print("  {:<58} {:>9.0f}\n", "floor: O_DIRECT 256 KiB sequential pread", median(fl_read));
    fmt::print("  {:<58} {:>9.0f}\n", "usermm: PageOut write-out", median(um_out));
    fmt::print("  {:<58} {:>9.0f}\n", "floor: O_DIRECT 256 KiB sequential pwrite", median(fl_write));
    fmt::print("  last usermm pass: {} pages swapped out ({} bytes); read back: {} major and {} minor faults, {} pages "
               "swapped in, readahead hits {} wasted {}\n",
               last.stats.pages_swapped_out, last.stats.swap_bytes_written, last.stats.major_faults,
               last.stats.minor_faults, last.stats.pages_swapped_in, last.stats.swap_readahead_hits,
               last.stats.swap_readahead_wasted);
    const double rin = median(um_in) / median(fl_read), rout = median(um_out) / median(fl_write);
    target_line("sequential swap-in / O_DIRECT 256 KiB reads", rin, ">=", 0.7, rin >= 0.7);
    target_line("PageOut write-out / O_DIRECT 256 KiB writes", rout, ">=", 0.7, rout >= 0.7);
}

std::size_t arg(int argc, char** argv, int i, std::size_t fallback) {
    return argc > i ? std::size_t(std::strtoull(argv[i], nullptr, 10)) : fallback;
}

void run(std::size_t limit_pages, std::size_t refs, std::size_t big_pages, std::size_t rounds) {
    const std::uint64_t t0 = now_ns();
    fmt::print("reclaim and swap: files in {}, {} KiB pages, engine {}\n", bench_dir(), kPage >> 10,
               usermm::engine() == usermm::Engine::Uffd ? "uffd" : "mprotect");
    under_the_limit(std::max<std::size_t>(4 * limit_pages, 1024), 2 * rounds + 1);
    std::fflush(stdout);
    replacement_quality(limit_pages, refs);
    std::fflush(stdout);
    usermm::SwapFile swap(temp_path("io"), big_pages * kPage + (1 << 20));
    swap_in_latency(std::min<std::size_t>(big_pages, 16384), 4000, rounds, swap);
    std::fflush(stdout);
    sequential(big_pages, rounds, swap);
    fmt::print("\ntotal {:.1f} s\n", double(now_ns() - t0) / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t limit_pages = arg(argc, argv, 1, 2048) / kCluster * kCluster;
    const std::size_t refs = arg(argc, argv, 2, 100000);
    const std::size_t big_pages = (arg(argc, argv, 3, 256) << 20) / kPage;
    const std::size_t rounds = arg(argc, argv, 4, 3);
    if (limit_pages < 2 * kCluster || refs == 0 || big_pages < kCluster || rounds == 0) {
        fmt::print(stderr, "usage: {} [limit pages >= 64] [references > 0] [MiB >= 1] [rounds > 0]\n", argv[0]);
        return 2;
    }
    try {
        run(limit_pages, refs, big_pages, rounds);
    } catch (const std::exception& e) {  // unwinds, so that the stores remove their files
        fmt::print(stderr, "usermm-bench-swap: {}\n", e.what());
        return 1;
    }
}
