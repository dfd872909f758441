// Snapshots against fork(): the pause of taking one, the cost of the first write to a page after
// it, and the memory it costs, for resident heaps of 256 MiB, 1 GiB and 4 GiB, side by side in one
// run, with the floor of the mechanism beside them (a bare handler that copies and gives write access
// back). The store pool carries released snapshots' pages from one round to the next. The engine is
// the default one (userfaultfd where the kernel has it); USERMM_ENGINE=mprotect measures the other.
// Usage: usermm-bench-snapshot [heap MiB]   (one heap of that size instead of the three; 4 is a
// smoke run); USERMM_BENCH_STORE_POOL=0 turns the store pool off.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
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

// The mechanism's floor: a handler that copies the page into a store page that is already there and
// gives write access back (UFFDIO_WRITEPROTECT, or mprotect for the mprotect engine), and nothing
// else: no lookup, no locks, no accounting. It runs in a forked child with a heap of its own, so
// that its SIGBUS/SIGSEGV handler replaces usermm's there only. The other way to a copy that no
// zeroing precedes, measured beside it (uffd only): UFFDIO_MOVE the page itself into an empty store
// page and UFFDIO_COPY it back, which allocates the arena a page and fills it with the copy.
namespace bare {

// Linux 6.8's values; Debian 12's headers lack them.
constexpr std::uint64_t kFeatureMove = std::uint64_t(1) << 16;
struct MoveArgs {
    std::uint64_t dst, src, len, mode;
    std::int64_t move;
};
constexpr unsigned long kUffdioMove = _IOWR(UFFDIO, 0x05, MoveArgs);

int g_uffd = -1;
bool g_move = false;
char* g_store = nullptr;
std::size_t g_used = 0;

void on_fault(int, siginfo_t* si, void*) {
    char* page = reinterpret_cast<char*>(reinterpret_cast<std::uintptr_t>(si->si_addr) & ~(kPage - 1));
    char* to = g_store + g_used++ * kPage;
    if (g_move) {
        MoveArgs mv{reinterpret_cast<std::uintptr_t>(to), reinterpret_cast<std::uintptr_t>(page), kPage, 0, 0};
        uffdio_copy back{};
        back.dst = reinterpret_cast<std::uintptr_t>(page);
        back.src = reinterpret_cast<std::uintptr_t>(to);
        back.len = kPage;
        back.mode = UFFDIO_COPY_MODE_DONTWAKE;
        if (ioctl(g_uffd, kUffdioMove, &mv) != 0 || ioctl(g_uffd, UFFDIO_COPY, &back) != 0) _exit(2);
        return;
    }
    std::memcpy(to, page, kPage);
    if (g_uffd < 0) {
        mprotect(page, kPage, PROT_READ | PROT_WRITE);
        return;
    }
    uffdio_writeprotect wp{};
    wp.range.start = reinterpret_cast<std::uintptr_t>(page);
    wp.range.len = kPage;
    ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp);
}

// In the child: ns per first write to the pages of `order` of a written, write-protected heap.
double first_write(std::size_t bytes, bool huge, bool uffd, bool move, const std::vector<std::size_t>& order) {
    g_move = move;
    char* heap = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    // A page moves only into a hole of a range registered with the same userfaultfd.
    g_store = static_cast<char*>(mmap(nullptr, order.size() * kPage, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | (move ? 0 : MAP_POPULATE), -1, 0));
    if (heap == MAP_FAILED || g_store == MAP_FAILED) std::abort();
    madvise(heap, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (std::size_t p = 0; p < bytes / kPage; ++p) *reinterpret_cast<std::uint64_t*>(heap + p * kPage) = p;
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(uffd ? SIGBUS : SIGSEGV, &sa, nullptr);
    if (uffd) {
        g_uffd = int(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
        uffdio_api api{};
        api.api = UFFD_API;
        api.features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP | (move ? kFeatureMove : 0);
        uffdio_register reg{};
        reg.range.start = reinterpret_cast<std::uintptr_t>(heap);
        reg.range.len = bytes;
        reg.mode = UFFDIO_REGISTER_MODE_WP;
        uffdio_register store{};
        store.range.start = reinterpret_cast<std::uintptr_t>(g_store);
        store.range.len = order.size() * kPage;
        store.mode = UFFDIO_REGISTER_MODE_WP;
        uffdio_writeprotect wp{};
        wp.range = reg.range;
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
        if (g_uffd < 0 || ioctl(g_uffd, UFFDIO_API, &api) || ioctl(g_uffd, UFFDIO_REGISTER, &reg) ||
            (move && ioctl(g_uffd, UFFDIO_REGISTER, &store)) || ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp))
            _exit(2);  // the parent reports the row as not measured
    } else if (mprotect(heap, bytes, PROT_READ) != 0) {
        std::abort();
    }
    return write_pages(heap, order, 5);
}

// The same, from the parent: the child's answer over a pipe, or 0 if the kernel refused the way.
double first_write_in_child(std::size_t bytes, bool huge, bool uffd, bool move, const std::vector<std::size_t>& order) {
    int fds[2];
    if (pipe(fds) != 0) std::abort();
    const pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        const double ns = first_write(bytes, huge, uffd, move, order);
        if (write(fds[1], &ns, sizeof ns) != sizeof ns) _exit(1);
        _exit(0);
    }
    close(fds[1]);
    double ns = 0;
    if (read(fds[0], &ns, sizeof ns) != sizeof ns) ns = 0;
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return ns;
}

}  // namespace bare

struct SnapshotResult {
    double pause_ms;
    double first_write_ns;
    double repeat_pause_ms;  // the next checkpoint, after 1% of the heap changed
    std::uint64_t copied_bytes;
    std::uint64_t recycled_pages;  // of those copies, onto pages of a pooled store
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
    const std::uint64_t recycled = previous->stats().snapshot_pages_recycled;
    previous = arena.snapshot(heap, pages * kPage);  // re-arms what the timed writes changed
    std::vector<std::size_t> one_percent(pages / 100);
    for (auto& p : one_percent) p = rng() % pages;
    write_pages(heap, one_percent, 11);
    t0 = now_ns();
    usermm::Snapshot next = arena.snapshot(heap, pages * kPage);
    const double repeat = double(now_ns() - t0) / 1e6;
    return {pause, write, repeat, copied, recycled};
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
    std::vector<double> fork_pause, fork_write, bare_write, move_write, snap_pause, snap_write, snap_repeat;
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    std::uint64_t recycled = 0;
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
        std::shuffle(all.begin(), all.end(), rng);
        const std::vector<std::size_t> timed(all.begin(), all.begin() + std::min(kWrites, pages));
        bare_write.push_back(bare::first_write_in_child(bytes, huge, uffd, false, timed));
        if (uffd) move_write.push_back(bare::first_write_in_child(bytes, huge, uffd, true, timed));
        Heap heap(bytes, huge);
        huge_mib = huge_resident_mib();
        std::shuffle(all.begin(), all.end(), rng);
        const SnapshotResult s =
            snapshot_once(heap.arena, heap.data, pages, {all.begin(), all.begin() + std::min(kWrites, pages)}, rng);
        snap_pause.push_back(s.pause_ms);
        snap_write.push_back(s.first_write_ns);
        snap_repeat.push_back(s.repeat_pause_ms);
        copied = s.copied_bytes;
        recycled = s.recycled_pages;
    }
    const double fp = median(fork_pause), fw = median(fork_write), bw = median(bare_write), sp = median(snap_pause),
                 sw = median(snap_write), sr = median(snap_repeat), mw = move_write.empty() ? 0 : median(move_write);
    fmt::print("{:>5} MiB {} ({:>4} MiB huge)  fork pause {:7.2f} ms | snapshot {:7.2f} ms = {:4.2f}x  repeat (1% "
               "changed) {:6.2f} ms = {:5.3f}x | first write: fork {:5.0f} ns, bare handler {:5.0f} ns = {:4.2f}x "
               "(move + copy back {}), snapshot {:5.0f} ns = {:4.2f}x ({:4.2f}x the bare handler) | copied {} pages "
               "for {} written, {} onto pooled pages\n",
               bytes >> 20, huge ? fmt::format("{}M", kHuge >> 20) : fmt::format("{}K", kPage >> 10), huge_mib, fp,
               sp, sp / fp, sr, sr / fp, fw, bw, bw / fw,
               mw > 0 ? fmt::format("{:.0f} ns = {:.2f}x", mw, mw / fw) : std::string("refused"), sw, sw / fw,
               sw / bw, copied / kPage, std::min(kWrites, pages), recycled);
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::size_t> sizes = {256ull << 20, 1ull << 30, 4ull << 30};
    if (argc > 1) sizes = {std::strtoull(argv[1], nullptr, 10) << 20};
    usermm::page_size();
    // USERMM_BENCH_STORE_POOL=0: every copy on a fresh store page (the pool's saving, by difference).
    if (const char* v = std::getenv("USERMM_BENCH_STORE_POOL"); v && std::strcmp(v, "0") == 0)
        usermm::set_snapshot_store_pool(0);
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    fmt::print("usermm snapshot vs fork(): median of {} rounds, {} first writes to random pages, engine {}\n", kRounds,
               kWrites, uffd ? "uffd" : "mprotect");
    fmt::print("targets: snapshot pause <= 0.25x fork's; first write <= 1.5x fork's; copied = pages written\n");
    fmt::print("store pool: up to {} MiB of released snapshots' pages (the first round has none)\n",
               usermm::snapshot_store_pool().limit_bytes >> 20);
    const std::size_t largest = *std::max_element(sizes.begin(), sizes.end());
    warm_free_memory(largest + std::min<std::size_t>(largest, 1ull << 30));
    for (bool huge : {false, true})
        for (std::size_t s : sizes) heap_row(s, huge);
    return 0;
}
