// Snapshots against fork(): the pause of taking one, the cost of the first write to a page after
// it, and the memory it costs, for resident heaps of 256 MiB, 1 GiB and 4 GiB, side by side in one
// run. The engine is the default one (userfaultfd where the kernel has it); USERMM_ENGINE=mprotect
// measures the other.
// Usage: usermm-bench-snapshot [heap MiB]   (one heap of that size instead of the three; 4 is a
// smoke run)
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

#include "page_ops_api.hpp"

using usermm::Prot;

using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kHuge = 2ull << 20;  // a transparent huge page on x86-64
constexpr std::size_t kWrites = 20000;  // first writes timed after each snapshot / fork
constexpr int kRounds = 5;

// ns per write of one word into each page of `order`.
double write_pages(char* heap, const std::vector<std::size_t>& order, std::uint64_t value) {
    const std::uint64_t t0 = now_ns();
    for (std::size_t p : order) *reinterpret_cast<volatile std::uint64_t*>(heap + p * kPage) = value;
    return double(now_ns() - t0) / double(order.size());
}

struct ForkResult {
    double pause_ms;
    double first_write_ns;
};

// fork() of this process with the heap resident: the parent's pause, and its first writes to
// pages the child still shares (kernel copy-on-write). The child waits on a pipe, then exits.
ForkResult fork_once(char* heap, const std::vector<std::size_t>& order) {
    int fds[2];
    if (pipe(fds) != 0) std::abort();
    const std::uint64_t t0 = now_ns();
    const pid_t pid = fork();
    if (pid == 0) {
        char c;
        close(fds[1]);
        while (read(fds[0], &c, 1) < 0) {
        }
        _exit(0);
    }
    const double pause = double(now_ns() - t0) / 1e6;
    close(fds[0]);
    const double write = write_pages(heap, order, 7);
    close(fds[1]);
    waitpid(pid, nullptr, 0);
    return {pause, write};
}

struct SnapshotResult {
    double pause_ms;
    double first_write_ns;
    double repeat_pause_ms;  // the next checkpoint, after 1% of the heap changed
    std::uint64_t copied_bytes;
};

// A checkpoint loop as a database would run it: the previous snapshot lives until the next one is
// taken, so each snapshot re-arms only the pages written since the previous one.
SnapshotResult snapshot_once(usermm::Arena& arena, char* heap, std::size_t pages,
                             const std::vector<std::size_t>& order, std::mt19937_64& rng) {
    std::uint64_t t0 = now_ns();
    std::optional<usermm::Snapshot> previous = arena.snapshot(heap, pages * kPage);
    const double pause = double(now_ns() - t0) / 1e6;
    const double write = write_pages(heap, order, 9);
    const std::uint64_t copied = previous->stats().cow_bytes_copied;
    previous = arena.snapshot(heap, pages * kPage);  // re-arms what the timed writes changed
    std::vector<std::size_t> one_percent(pages / 100);
    for (auto& p : one_percent) p = rng() % pages;
    write_pages(heap, one_percent, 11);
    t0 = now_ns();
    usermm::Snapshot next = arena.snapshot(heap, pages * kPage);
    const double repeat = double(now_ns() - t0) / 1e6;
    return {pause, write, repeat, copied};
}

// A heap of `bytes`, every page written, in a fresh arena (so that huge pages split by an earlier
// round do not carry over).
struct Heap {
    usermm::Arena arena;
    char* data;
    Heap(std::size_t bytes, bool huge) : arena(bytes + (1ull << 30)) {
        char* at =
            reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(arena.base()) + kHuge - 1) & ~(kHuge - 1));
        data = static_cast<char*>(arena.map(
            bytes, Prot::ReadWrite, {.name = "heap", .address = at, .fault_around_pages = 512, .huge_pages = huge}));
        for (std::size_t p = 0; p < bytes / kPage; ++p) *reinterpret_cast<std::uint64_t*>(data + p * kPage) = p;
    }
};

// Resident huge pages of the process, from /proc/self/smaps_rollup.
std::size_t huge_resident_mib() {
    FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    std::size_t kib = 0;
    while (f && std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "AnonHugePages: %zu kB", &kib) == 1) break;
    if (f) std::fclose(f);
    return kib >> 10;
}

void heap_row(std::size_t bytes, bool huge) {
    const std::size_t pages = bytes / kPage;
    std::mt19937_64 rng(bytes);
    std::vector<std::size_t> all(pages);
    std::iota(all.begin(), all.end(), 0);
    std::vector<double> fork_pause, fork_write, snap_pause, snap_write, snap_repeat;
    std::uint64_t copied = 0;
    std::size_t huge_mib = 0;
    for (int r = 0; r < kRounds; ++r) {
        {
            Heap heap(bytes, huge);
            std::shuffle(all.begin(), all.end(), rng);
            const ForkResult f = fork_once(heap.data, {all.begin(), all.begin() + std::min(kWrites, pages)});
            fork_pause.push_back(f.pause_ms);
            fork_write.push_back(f.first_write_ns);
        }
        Heap heap(bytes, huge);
        huge_mib = huge_resident_mib();
        std::shuffle(all.begin(), all.end(), rng);
        const SnapshotResult s =
            snapshot_once(heap.arena, heap.data, pages, {all.begin(), all.begin() + std::min(kWrites, pages)}, rng);
        snap_pause.push_back(s.pause_ms);
        snap_write.push_back(s.first_write_ns);
        snap_repeat.push_back(s.repeat_pause_ms);
        copied = s.copied_bytes;
    }
    const double fp = median(fork_pause), fw = median(fork_write), sp = median(snap_pause),
                 sw = median(snap_write), sr = median(snap_repeat);
    fmt::print("{:>5} MiB {} ({:>4} MiB huge)  fork pause {:7.2f} ms | snapshot {:7.2f} ms = {:4.2f}x  repeat (1% "
               "changed) {:6.2f} ms = {:5.3f}x | first write: fork {:5.0f} ns, snapshot {:5.0f} ns = {:4.2f}x | copied "
               "{} pages for {} written\n",
               bytes >> 20, huge ? fmt::format("{}M", kHuge >> 20) : fmt::format("{}K", kPage >> 10), huge_mib, fp,
               sp, sp / fp, sr, sr / fp, fw, sw, sw / fw, copied / kPage, std::min(kWrites, pages));
}

// The VM backs guest memory lazily; touch more than the largest heap so no variant pays for it.
void warm_up(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    std::memset(p, 1, bytes);
    munmap(p, bytes);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::size_t> sizes = {256ull << 20, 1ull << 30, 4ull << 30};
    if (argc > 1) sizes = {std::strtoull(argv[1], nullptr, 10) << 20};
    usermm::page_size();
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    fmt::print("usermm snapshot vs fork(): median of {} rounds, {} first writes to random pages, engine {}\n", kRounds,
               kWrites, uffd ? "uffd" : "mprotect");
    fmt::print("targets: snapshot pause <= 0.25x fork's; first write <= 1.5x fork's; copied = pages written\n");
    const std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
    warm_up(largest + std::min<std::size_t>(largest, 1ull << 30));
    for (bool huge : {false, true})
        for (std::size_t s : sizes) heap_row(s, huge);
    return 0;
}
