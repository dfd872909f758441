// The periodic snapshot's pause against the kernel's floors (issue 15: <= 1.1x the cheaper one).
// A checkpoint loop takes a snapshot of a resident heap while the previous snapshot lives, so each
// snapshot re-arms only the pages written since the previous one; what it costs is set against the
// two ways the kernel itself can re-protect the same state, measured in the same run on a plain mmap
// heap of the same size: (a) one call over the whole heap (the kernel rewrites every present PTE)
// and (b) one call per run of changed pages. The call is UFFDIO_WRITEPROTECT, or mprotect(PROT_READ)
// for the mprotect engine (USERMM_ENGINE=mprotect), where each page written has split a kernel VMA
// of its own, as in usermm's heap while its arena is under the map budget.
//
// Usage: usermm-bench-rearm [heap MiB] [rounds] [percent ...]   (defaults 1024 5 1 10; `8 1` is a
// smoke run). Each round measures, for each percentage of the heap's pages changed at random
// scattered places, the floors once each and usermm's pause over kCheckpoints checkpoints; the
// figures are medians.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

#include "page_ops_api.hpp"

using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr int kCheckpoints = 4;  // timed snapshots per round and fraction, in one arena
constexpr double kTarget = 1.1;

std::vector<std::size_t> changed_pages(std::size_t pages, unsigned percent, std::mt19937_64& rng) {
    std::vector<std::size_t> all(pages);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(std::max<std::size_t>(1, pages * percent / 100));
    return all;
}

// The changed pages (any order) as runs of neighbours: [first, last) in pages.
std::vector<std::pair<std::size_t, std::size_t>> runs_of(std::vector<std::size_t> changed) {
    std::sort(changed.begin(), changed.end());
    std::vector<std::pair<std::size_t, std::size_t>> runs;
    for (std::size_t p : changed) {
        if (!runs.empty() && runs.back().second == p)
            ++runs.back().second;
        else
            runs.push_back({p, p + 1});
    }
    return runs;
}

void write_pages(char* heap, const std::vector<std::size_t>& pages, std::uint64_t value) {
    for (std::size_t p : pages) *reinterpret_cast<volatile std::uint64_t*>(heap + p * kPage) = value;
}

// A plain heap, every page written, whose write access the engine's own kernel call withholds. The
// pages a round changes get write access back one page each before they are written, as usermm's
// fault handler gives it back, so that nothing here faults: the state before a timed call is
// usermm's at its re-arm (every page present, the changed ones written and writable, the others
// protected). In-process: a separate mapping and userfaultfd, which usermm's handlers never see.
class PlainHeap {
public:
    PlainHeap(std::size_t bytes, bool uffd) : bytes_(bytes), uffd_(uffd ? open_uffd() : -1) {
        data_ = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        if (data_ == MAP_FAILED) {
            std::perror("bench_rearm: mmap");
            std::exit(1);
        }
        madvise(data_, bytes, MADV_NOHUGEPAGE);  // 4 KiB PTEs, as usermm's heap has
        for (std::size_t p = 0; p < bytes / kPage; ++p) *reinterpret_cast<std::uint64_t*>(data_ + p * kPage) = p;
        if (uffd) {
            uffdio_register reg{};
            reg.range = {addr(0), bytes};
            reg.mode = UFFDIO_REGISTER_MODE_WP;
            if (ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER");
        }
        if (!protect(0, bytes / kPage, true)) die(uffd ? "UFFDIO_WRITEPROTECT" : "mprotect");
    }
    ~PlainHeap() {
        munmap(data_, bytes_);
        if (uffd_ >= 0) close(uffd_);
    }
    PlainHeap(const PlainHeap&) = delete;
    PlainHeap& operator=(const PlainHeap&) = delete;

    // Write access back to each changed page, then a write to it. False if the kernel refused (the
    // mprotect engine past the process's map count).
    bool change(const std::vector<std::size_t>& changed, std::uint64_t value) {
        for (std::size_t p : changed)
            if (!protect(p, p + 1, false)) return false;
        write_pages(data_, changed, value);
        return true;
    }
    // Floor (a): ms of one call over the heap, or a negative number if it was refused.
    double whole() {
        const std::uint64_t t0 = now_ns();
        const bool ok = protect(0, bytes_ / kPage, true);
        return ok ? double(now_ns() - t0) / 1e6 : -1;
    }
    // Floor (b): ms of one call per run.
    double per_run(const std::vector<std::pair<std::size_t, std::size_t>>& runs) {
        const std::uint64_t t0 = now_ns();
        for (const auto& [i, j] : runs)
            if (!protect(i, j, true)) return -1;
        return double(now_ns() - t0) / 1e6;
    }

private:
    static int open_uffd() {
        // SIGBUS rather than a wait for a reader that does not exist, should a write ever fault here.
        const int fd = int(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
        uffdio_api api{};
        api.api = UFFD_API;
        api.features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        if (fd < 0 || ioctl(fd, UFFDIO_API, &api) != 0) die("userfaultfd");
        return fd;
    }
    [[noreturn]] static void die(const char* what) {
        std::perror(fmt::format("bench_rearm: plain heap: {}", what).c_str());
        std::exit(1);
    }
    std::uintptr_t addr(std::size_t page) const { return reinterpret_cast<std::uintptr_t>(data_) + page * kPage; }
    bool protect(std::size_t i, std::size_t j, bool on) {
        if (uffd_ < 0) return mprotect(data_ + i * kPage, (j - i) * kPage, on ? PROT_READ : PROT_READ | PROT_WRITE) == 0;
        uffdio_writeprotect wp{};
        wp.range = {addr(i), (j - i) * kPage};
        wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
        return ioctl(uffd_, UFFDIO_WRITEPROTECT, &wp) == 0;
    }

    std::size_t bytes_;
    int uffd_;
    char* data_;
};

struct Figures {
    std::vector<double> usermm, release, whole, per_run;
    std::size_t changed = 0, runs = 0;
    bool refused = false;
};

// One round of the floors: the same state timed under (a) and under (b), in alternating order.
void floors_round(std::size_t bytes, unsigned percent, bool uffd, int round, std::mt19937_64& rng, Figures& f) {
    warm_free_memory(bytes);
    PlainHeap heap(bytes, uffd);
    const std::vector<std::size_t> changed = changed_pages(bytes / kPage, percent, rng);
    const auto runs = runs_of(changed);
    f.changed = changed.size();
    f.runs = runs.size();
    for (int k = 0; k < 2; ++k) {
        if (!heap.change(changed, std::uint64_t(round * 2 + k))) {
            f.refused = true;
            return;
        }
        const double ms = (k + round) % 2 == 0 ? heap.whole() : heap.per_run(runs);
        if (ms < 0) {
            f.refused = true;
            return;
        }
        ((k + round) % 2 == 0 ? f.whole : f.per_run).push_back(ms);
    }
}

// One round of usermm: a fresh arena with the heap written, a first snapshot, then checkpoints that
// each write the fraction at fresh random places and take the next snapshot while the previous one
// lives (timed: the pause), then let the previous one go (timed too: it holds the arena's lock).
void usermm_round(std::size_t bytes, unsigned percent, std::mt19937_64& rng, Figures& f) {
    warm_free_memory(bytes);
    usermm::Arena arena(bytes + (1ull << 30));
    char* heap = static_cast<char*>(
        arena.map(bytes, usermm::Prot::ReadWrite, {.name = "heap", .fault_around_pages = 512}));
    const std::size_t pages = bytes / kPage;
    for (std::size_t p = 0; p < pages; ++p) *reinterpret_cast<std::uint64_t*>(heap + p * kPage) = p;
    std::optional<usermm::Snapshot> previous = arena.snapshot(heap, bytes);
    for (int c = 0; c < kCheckpoints; ++c) {
        write_pages(heap, changed_pages(pages, percent, rng), std::uint64_t(c));
        std::uint64_t t0 = now_ns();
        usermm::Snapshot next = arena.snapshot(heap, bytes);
        f.usermm.push_back(double(now_ns() - t0) / 1e6);
        t0 = now_ns();
        previous = std::move(next);
        f.release.push_back(double(now_ns() - t0) / 1e6);
    }
}

std::string range_of(const std::vector<double>& v) {
    return fmt::format("{:.2f}-{:.2f}", *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()));
}

void report(unsigned percent, const Figures& f) {
    if (f.refused) {
        fmt::print("{:>3}% changed: the kernel refused a floor's call (past vm.max_map_count?)\n", percent);
        return;
    }
    const double u = median(f.usermm), a = median(f.whole), b = median(f.per_run), floor = std::min(a, b);
    fmt::print("{:>3}% changed ({} pages, {} runs): usermm pause {:6.2f} ms ({}) | floor (a) one call over the heap "
               "{:6.2f} ms ({}) | floor (b) one call per run {:6.2f} ms ({}; {:.2f} us per call) | usermm / min(a, b) "
               "= {:5.2f}x (target <= {:.1f}x) | letting the previous snapshot go {:.2f} ms\n",
               percent, f.changed, f.runs, u, range_of(f.usermm), a, range_of(f.whole), b, range_of(f.per_run),
               b * 1e3 / double(f.runs), u / floor, kTarget, median(f.release));
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t bytes = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024) << 20;
    const int rounds = argc > 2 ? std::atoi(argv[2]) : 5;
    std::vector<unsigned> percents;
    for (int k = 3; k < argc; ++k) percents.push_back(unsigned(std::atoi(argv[k])));
    if (percents.empty()) percents = {1, 10};
    const bool percents_ok =
        std::all_of(percents.begin(), percents.end(), [](unsigned p) { return p >= 1 && p <= 100; });
    if (bytes < 100 * kPage || rounds < 1 || !percents_ok) {
        std::fprintf(stderr, "usage: %s [heap MiB, at least 100 pages] [rounds] [percent 1-100 ...]\n", argv[0]);
        return 2;
    }
    usermm::page_size();
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    fmt::print("periodic snapshot pause vs the kernel's floors: {} MiB heap of {} KiB pages, all present, the previous "
               "snapshot live; {} rounds x {} checkpoints (floors: {} rounds), medians (min-max); engine {}, floors "
               "with {}\n",
               bytes >> 20, kPage >> 10, rounds, kCheckpoints, rounds, uffd ? "uffd" : "mprotect",
               uffd ? "UFFDIO_WRITEPROTECT" : "mprotect(PROT_READ)");
    warm_free_memory(2 * bytes + (bytes / 5));
    std::mt19937_64 rng(bytes);
    std::vector<Figures> figures(percents.size());
    for (int r = 0; r < rounds; ++r) {
        for (std::size_t k = 0; k < percents.size(); ++k) {
            floors_round(bytes, percents[k], uffd, r, rng, figures[k]);
            usermm_round(bytes, percents[k], rng, figures[k]);
        }
    }
    for (std::size_t k = 0; k < percents.size(); ++k) report(percents[k], figures[k]);
    return 0;
}
