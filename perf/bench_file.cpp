// File VMAs against the kernel's mmap of the same file, side by side in one run. A 1 GiB file
// (USERMM_BENCH_FILE_MIB sets the size, USERMM_BENCH_DIR where it lives) whose pages leave the
// page cache (fdatasync, then posix_fadvise DONTNEED) before every pass, and free memory warmed
// (warm_free_memory). Every variant runs once per round, in an order balanced over the rounds
// (run_balanced); the median of the rounds is reported (USERMM_BENCH_ROUNDS, default 5), after one
// warm-up pass of each variant, since the first touch of memory the VM has not used yet is slow.
//  - Cold sequential read, one byte of every page: usermm (Share::Private, Prot::Read, default
//    options) against mmap(MAP_PRIVATE) and against the floor of any SIGSEGV-based runtime: the file
//    mapped PROT_NONE in place, and a handler that mprotects the aligned window of W pages around
//    the fault to PROT_READ (W = 64 and W = 16). Each floor pass runs in a forked child, so that
//    its handler is the only one, and reports its time through a pipe.
//  - 8,000 random one-page reads (a quarter of the pages of a file under 128 MiB; one seed, the same
//    pages for every variant): usermm with Advice::Random against mmap with MADV_RANDOM.
//  - Every 10th page written (one byte) in a Share::Shared read-write VMA, then Arena::sync of the
//    whole range, against the same writes to a MAP_SHARED mapping and msync(MS_SYNC): the sync
//    alone, and the writes plus the sync.
//  - Memory after a full sequential read, as deltas over the pass: the page cache (Cached in
//    /proc/meminfo) and the process's RSS and RssShmem (/proc/self/status), and the system's Shmem.
// Every pass of a round checks that it read the same bytes as the others.
// At 1 GiB a run takes about 100 s (2-core VM, loaded); USERMM_BENCH_FILE_MIB=16
// USERMM_BENCH_ROUNDS=1 is a smoke run of a second or two.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm::Advice;
using usermm::Prot;
using usermm::Share;
using usermm_bench::env_or;
using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kRandomReads = 8000;  // or a quarter of the file's pages, if fewer
constexpr std::size_t kDirtyStride = 10;

[[noreturn]] void die(const std::string& what) {
    fmt::print(stderr, "usermm-bench-file: {}\n", what);
    std::exit(1);
}
[[noreturn]] void die_errno(const char* what) { die(fmt::format("{}: {}", what, std::strerror(errno))); }

long majflt() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_majflt;
}

void drop_cache(int fd) {
    if (fdatasync(fd) != 0) die_errno("fdatasync");
    if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) die("posix_fadvise failed");
}

// One "Key:   N kB" field of a /proc file, in kB.
long proc_kb(const char* file, std::string_view key) {
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line))
        if (line.size() > key.size() && line.compare(0, key.size(), key) == 0 && line[key.size()] == ':')
            return std::atol(line.c_str() + key.size() + 1);
    die(fmt::format("no {} in {}", key, file));
}

struct Memory {
    double cached = 0, rss = 0, rss_shmem = 0, shmem = 0;  // MiB
    static Memory now() {
        return {proc_kb("/proc/meminfo", "Cached") / 1024.0, proc_kb("/proc/self/status", "VmRSS") / 1024.0,
                proc_kb("/proc/self/status", "RssShmem") / 1024.0, proc_kb("/proc/meminfo", "Shmem") / 1024.0};
    }
    Memory operator-(const Memory& o) const {
        return {cached - o.cached, rss - o.rss, rss_shmem - o.rss_shmem, shmem - o.shmem};
    }
};

// Every pass opens the file anew, as map_file(path) does, so that no pass inherits the kernel's
// readahead state (struct file's f_ra, its mmap miss count) from the one before.
struct File {
    int fd;
    File(const std::string& path, int flags) : fd(open(path.c_str(), flags | O_CLOEXEC)) {
        if (fd < 0) die_errno("open");
    }
    ~File() { close(fd); }
    File(const File&) = delete;
    File& operator=(const File&) = delete;
};

struct Pass {
    double ms = 0;
    long major = 0;  // usermm's major_faults for usermm passes, the kernel's ru_majflt otherwise
    std::uint64_t sum = 0;
    Memory grown;  // over the pass, measured outside the timed part
};

std::uint64_t touch(const char* p, const std::vector<std::size_t>& pages) {
    std::uint64_t sum = 0;
    for (std::size_t pg : pages) sum += *reinterpret_cast<const volatile std::uint8_t*>(p + pg * kPage);
    return sum;
}

Pass read_usermm(const std::string& path, std::size_t size, const std::vector<std::size_t>& pages, bool random) {
    const Memory before = Memory::now();
    Pass out;
    usermm::Arena arena(size + (64 << 20));
    const std::uint64_t t0 = now_ns();
    char* p = static_cast<char*>(arena.map_file(path, 0, size, Prot::Read, Share::Private));
    if (random) arena.advise(p, size, Advice::Random);
    out.sum = touch(p, pages);
    out.ms = double(now_ns() - t0) / 1e6;
    out.grown = Memory::now() - before;
    out.major = long(arena.stats().major_faults);
    return out;
}

Pass read_mmap(const std::string& path, std::size_t size, const std::vector<std::size_t>& pages, bool random) {
    const File file(path, O_RDONLY);
    const Memory before = Memory::now();
    Pass out;
    const long m0 = majflt();
    const std::uint64_t t0 = now_ns();
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, file.fd, 0);
    if (p == MAP_FAILED) die_errno("mmap");
    if (random && madvise(p, size, MADV_RANDOM) != 0) die_errno("madvise");
    out.sum = touch(static_cast<const char*>(p), pages);
    out.ms = double(now_ns() - t0) / 1e6;
    out.major = majflt() - m0;
    out.grown = Memory::now() - before;
    munmap(p, size);
    return out;
}

// The floor's handler, in a child of its own: the window around the fault becomes readable.
struct FloorMapping {
    std::uintptr_t base;
    std::size_t length;
    std::size_t window_bytes;
} g_floor;

void floor_handler(int, siginfo_t* si, void*) {
    std::uintptr_t addr = 0;
    if (!floor_fault(si, g_floor.base, g_floor.length, &addr)) return;
    const std::uintptr_t start = addr - (addr - g_floor.base) % g_floor.window_bytes;
    const std::size_t len = std::min(g_floor.window_bytes, g_floor.base + g_floor.length - start);
    if (mprotect(reinterpret_cast<void*>(start), len, PROT_READ) != 0) signal(SIGSEGV, SIG_DFL);
}

Pass read_floor(const std::string& path, std::size_t size, const std::vector<std::size_t>& pages,
                std::size_t window) {
    const File file(path, O_RDONLY);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) die_errno("pipe2");
    const pid_t pid = fork();
    if (pid < 0) die_errno("fork");
    if (pid == 0) {
        struct sigaction sa {};
        sa.sa_sigaction = floor_handler;
        sa.sa_flags = SA_SIGINFO;
        sigemptyset(&sa.sa_mask);
        Pass out;
        const std::uint64_t t0 = now_ns();
        void* p = mmap(nullptr, size, PROT_NONE, MAP_PRIVATE, file.fd, 0);
        if (p == MAP_FAILED) _exit(2);
        g_floor = {reinterpret_cast<std::uintptr_t>(p), size, window * kPage};
        if (sigaction(SIGSEGV, &sa, nullptr) != 0) _exit(3);
        out.sum = touch(static_cast<const char*>(p), pages);
        out.ms = double(now_ns() - t0) / 1e6;
        out.major = majflt();  // the child's own count starts at 0
        _exit(write(pipe_fds[1], &out, sizeof out) == ssize_t(sizeof out) ? 0 : 4);
    }
    close(pipe_fds[1]);
    Pass out;
    const ssize_t got = read(pipe_fds[0], &out, sizeof out);
    close(pipe_fds[0]);
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) die_errno("waitpid");
    if (got != ssize_t(sizeof out) || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die(fmt::format("the floor's child failed (wait status {:#x})", status));
    return out;
}

// Writes one byte of each dirty page, then writes the pages back: the time of each part.
struct WritePass {
    double dirty_ms = 0;
    double sync_ms = 0;
};

WritePass write_usermm(const std::string& path, std::size_t size, const std::vector<std::size_t>& dirty) {
    usermm::Arena arena(size + (64 << 20));
    char* p = static_cast<char*>(arena.map_file(path, 0, size, Prot::ReadWrite, Share::Shared));
    const std::uint64_t t0 = now_ns();
    for (std::size_t pg : dirty) p[pg * kPage] = char(p[pg * kPage] + 1);
    const std::uint64_t t1 = now_ns();
    arena.sync(p, size);
    return {double(t1 - t0) / 1e6, double(now_ns() - t1) / 1e6};
}

WritePass write_msync(const std::string& path, std::size_t size, const std::vector<std::size_t>& dirty) {
    const File file(path, O_RDWR);
    char* p = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, file.fd, 0));
    if (p == MAP_FAILED) die_errno("mmap");
    const std::uint64_t t0 = now_ns();
    for (std::size_t pg : dirty) p[pg * kPage] = char(p[pg * kPage] + 1);
    const std::uint64_t t1 = now_ns();
    if (msync(p, size, MS_SYNC) != 0) die_errno("msync");
    const WritePass out{double(t1 - t0) / 1e6, double(now_ns() - t1) / 1e6};
    munmap(p, size);
    return out;
}

std::string make_file(std::size_t size) {
    const char* dir = std::getenv("USERMM_BENCH_DIR");
    std::string path = std::string(dir ? dir : "/var/tmp") + "/usermm-bench-XXXXXX";
    const int fd = mkstemp(path.data());
    if (fd < 0) die_errno("mkstemp");
    std::vector<char> block(1 << 20);
    std::mt19937_64 rng(1);
    for (std::size_t at = 0; at < size; at += block.size()) {
        const std::size_t n = std::min(block.size(), size - at);
        for (std::size_t i = 0; i < n; i += 8) *reinterpret_cast<std::uint64_t*>(&block[i]) = rng();
        if (pwrite(fd, block.data(), n, off_t(at)) != ssize_t(n)) die_errno("pwrite");
    }
    if (fsync(fd) != 0) die_errno("fsync");
    close(fd);
    return path;
}

// Runs the variants of a group once each, the file's pages dropped and free memory warmed before
// each, in the order of row `round` of a Williams square (even n): over n rounds each variant runs
// in each place once and follows each other variant once.
void run_balanced(int fd, std::size_t size, std::size_t round, const std::vector<std::function<void()>>& variants) {
    const std::size_t n = variants.size();
    for (std::size_t j = 0; j < n; ++j) {
        const std::size_t first_row = j % 2 ? (j + 1) / 2 : (n - j / 2) % n;
        drop_cache(fd);
        warm_free_memory(size / 2 * 3);
        variants[(first_row + round) % n]();
    }
}

std::string ms_cell(double v) { return fmt::format("{:.1f}", v); }
std::string ratio_cell(double a, double b) { return fmt::format("{:.2f}", a / b); }

void row(const std::string& what, const std::string& um, const std::string& kernel, const std::string& f64,
         const std::string& f16, const std::string& um_k, const std::string& f64_k, const std::string& f16_k,
         const std::string& um_f64) {
    fmt::print("{:<36} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7}\n", what, um, kernel, f64, f16, um_k, f64_k,
               f16_k, um_f64);
}

void target(const std::string& what, double value, double limit) {
    fmt::print("  {:<48} {:>6.2f}  {}\n", what, value, value <= limit ? "met" : "MISSED");
}

}  // namespace

int main() {
    const std::size_t size = env_or("USERMM_BENCH_FILE_MIB", 1024) << 20;
    const std::size_t rounds = std::max<std::size_t>(1, env_or("USERMM_BENCH_ROUNDS", 5));
    const std::size_t npages = size / kPage;
    if (npages == 0) die("USERMM_BENCH_FILE_MIB must be at least 1");
    fmt::print("file VMAs vs the kernel's mmap: {} MiB file, {} KiB pages, page cache dropped before every pass, "
               "median of {} rounds\n",
               size >> 20, kPage >> 10, rounds);
    const std::string path = make_file(size);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) die_errno("open");

    std::vector<std::size_t> sequential(npages);
    for (std::size_t i = 0; i < npages; ++i) sequential[i] = i;
    std::mt19937_64 rng(42);
    std::vector<std::size_t> random(std::min(kRandomReads, std::max<std::size_t>(1, npages / 4)));
    for (auto& pg : random) pg = rng() % npages;
    std::vector<std::size_t> dirty;
    for (std::size_t i = 0; i < npages; i += kDirtyStride) dirty.push_back(i);

    Pass seq_um, seq_k, seq_f64, seq_f16, rnd_um, rnd_k;
    WritePass wb_um, wb_k;
    const std::vector<std::function<void()>> seq_variants{
        [&] { seq_um = read_usermm(path, size, sequential, false); },
        [&] { seq_k = read_mmap(path, size, sequential, false); },
        [&] { seq_f64 = read_floor(path, size, sequential, 64); },
        [&] { seq_f16 = read_floor(path, size, sequential, 16); },
    };
    const std::vector<std::function<void()>> rnd_variants{
        [&] { rnd_um = read_usermm(path, size, random, true); },
        [&] { rnd_k = read_mmap(path, size, random, true); },
    };
    const std::vector<std::function<void()>> wb_variants{
        [&] { wb_um = write_usermm(path, size, dirty); },
        [&] { wb_k = write_msync(path, size, dirty); },
    };

    run_balanced(fd, size, 0, seq_variants);
    run_balanced(fd, size, 0, rnd_variants);
    run_balanced(fd, size, 0, wb_variants);

    struct Series {
        std::vector<double> um, k, f64, f16;
    } seq, rnd, sync_only, dirty_sync;
    struct MemorySeries {
        std::vector<double> cached, rss, rss_shmem, shmem, total;
        void add(const Memory& m) {
            cached.push_back(m.cached);
            rss.push_back(m.rss);
            rss_shmem.push_back(m.rss_shmem);
            shmem.push_back(m.shmem);
            total.push_back(m.cached + m.rss);
        }
    } mem_um, mem_k;
    for (std::size_t round = 0; round < rounds; ++round) {
        run_balanced(fd, size, round, seq_variants);
        if (seq_um.sum != seq_k.sum || seq_f64.sum != seq_k.sum || seq_f16.sum != seq_k.sum)
            die("the sequential passes read different bytes");
        run_balanced(fd, size, round, rnd_variants);
        if (rnd_um.sum != rnd_k.sum) die("the random passes read different bytes");
        run_balanced(fd, size, round, wb_variants);
        seq.um.push_back(seq_um.ms);
        seq.k.push_back(seq_k.ms);
        seq.f64.push_back(seq_f64.ms);
        seq.f16.push_back(seq_f16.ms);
        rnd.um.push_back(rnd_um.ms);
        rnd.k.push_back(rnd_k.ms);
        sync_only.um.push_back(wb_um.sync_ms);
        sync_only.k.push_back(wb_k.sync_ms);
        dirty_sync.um.push_back(wb_um.dirty_ms + wb_um.sync_ms);
        dirty_sync.k.push_back(wb_k.dirty_ms + wb_k.sync_ms);
        mem_um.add(seq_um.grown);
        mem_k.add(seq_k.grown);
    }
    close(fd);
    unlink(path.c_str());

    const double s_um = median(seq.um), s_k = median(seq.k), s_f64 = median(seq.f64), s_f16 = median(seq.f16);
    const double r_um = median(rnd.um), r_k = median(rnd.k);
    const double w_um = median(sync_only.um), w_k = median(sync_only.k);
    const double d_um = median(dirty_sync.um), d_k = median(dirty_sync.k);
    const double m_um = median(mem_um.total), m_k = median(mem_k.total);
    row("", "usermm", "kernel", "floor64", "floor16", "u/k", "f64/k", "f16/k", "u/f64");
    row("cold sequential read, ms", ms_cell(s_um), ms_cell(s_k), ms_cell(s_f64), ms_cell(s_f16),
        ratio_cell(s_um, s_k), ratio_cell(s_f64, s_k), ratio_cell(s_f16, s_k), ratio_cell(s_um, s_f64));
    row(fmt::format("{} random {} KiB reads, ms", random.size(), kPage >> 10), ms_cell(r_um), ms_cell(r_k), "-", "-",
        ratio_cell(r_um, r_k), "-", "-", "-");
    row(fmt::format("sync of {} dirty pages (10%), ms", dirty.size()), ms_cell(w_um), ms_cell(w_k), "-", "-",
        ratio_cell(w_um, w_k), "-", "-", "-");
    row("dirtying + sync, ms", ms_cell(d_um), ms_cell(d_k), "-", "-", ratio_cell(d_um, d_k), "-", "-", "-");
    row("page cache + RSS after the read, MiB", ms_cell(m_um), ms_cell(m_k), "-", "-", ratio_cell(m_um, m_k), "-",
        "-", "-");
    fmt::print("(kernel: mmap, MADV_RANDOM for random reads, msync(MS_SYNC) for write-back; floorW: PROT_NONE "
               "mapping + SIGSEGV handler granting W-page windows)\n");
    fmt::print("major faults, last round: sequential usermm {} kernel {} floor64 {} floor16 {}; random usermm {} "
               "kernel {}\n",
               seq_um.major, seq_k.major, seq_f64.major, seq_f16.major, rnd_um.major, rnd_k.major);
    fmt::print("{:<54} {:>9} {:>9} {:>9} {:>13}\n", "memory grown by a full sequential read, MiB (median)",
               "Cached", "RSS", "RssShmem", "system Shmem");
    for (auto [name, m] : {std::pair{"usermm", &mem_um}, std::pair{"mmap", &mem_k}})
        fmt::print("  {:<52} {:>9.1f} {:>9.1f} {:>9.1f} {:>13.1f}\n", name, median(m->cached), median(m->rss),
                   median(m->rss_shmem), median(m->shmem));
    const double shmem_noise = std::max(4.0, double(size >> 20) / 100);  // MiB
    fmt::print("targets (issue 9):\n");
    target("cold sequential read <= 1.10 x mmap", s_um / s_k, 1.10);
    target("random page reads <= 1.15 x mmap", r_um / r_k, 1.15);
    target("write-back of 10% dirty pages <= 1.10 x msync", w_um / w_k, 1.10);
    target("dirtying + write-back <= 1.20 x the kernel's", d_um / d_k, 1.20);
    target("page cache + RSS <= 1.05 x mmap's", m_um / m_k, 1.05);
    fmt::print("  {:<48} {:>6.1f}  {}\n", fmt::format("system Shmem growth ~0 MiB (<= {:.0f})", shmem_noise),
               median(mem_um.shmem), median(mem_um.shmem) <= shmem_noise ? "met" : "MISSED");
}
