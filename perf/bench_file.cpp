// File VMAs against the kernel, side by side in one run, on a 1 GiB file whose page cache is
// dropped (posix_fadvise DONTNEED) before every pass: sequential and random 4 KiB reads through
// usermm, through the kernel's own mmap of the file and through pread into a buffer; write-back of
// 10% dirty pages through Arena::sync against msync(MS_SYNC). Rounds are interleaved and the
// median of each is reported, with ratios against the kernel's mmap (reads) and msync (sync).
// USERMM_BENCH_FILE_MIB sets the file size (default 1024); USERMM_BENCH_DIR where it lives.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm::Prot;
using usermm::Share;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kRandomReads = 8000;
constexpr int kRounds = 5;

[[noreturn]] void die(const char* what) {
    std::perror(what);
    std::exit(1);
}

long majflt() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_majflt;
}

// The file's pages leave the kernel's page cache, so that the next pass reads the disk.
void drop_cache(int fd) {
    if (fdatasync(fd) != 0) die("fdatasync");
    if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) die("posix_fadvise");
}

struct Pass {
    double ms = 0;
    long major = 0;  // usermm's major_faults for usermm passes, the kernel's for mmap passes
};

volatile std::uint64_t g_sink;

std::uint64_t touch(const char* p, const std::vector<std::size_t>& pages) {
    std::uint64_t sum = 0;
    for (std::size_t pg : pages) sum += *reinterpret_cast<const volatile std::uint8_t*>(p + pg * kPage);
    return sum;
}

Pass read_usermm(const std::string& path, std::size_t size, const std::vector<std::size_t>& pages) {
    usermm::Arena arena(size + (64 << 20));
    const std::uint64_t t0 = now_ns();
    const char* p = static_cast<const char*>(arena.map_file(path, 0, size, Prot::Read, Share::Private));
    g_sink = touch(p, pages);
    const double ms = double(now_ns() - t0) / 1e6;
    return {ms, long(arena.stats().major_faults)};
}

Pass read_kernel_mmap(int fd, std::size_t size, const std::vector<std::size_t>& pages) {
    const long m0 = majflt();
    const std::uint64_t t0 = now_ns();
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) die("mmap");
    g_sink = touch(static_cast<const char*>(p), pages);
    const double ms = double(now_ns() - t0) / 1e6;
    const long major = majflt() - m0;
    munmap(p, size);
    return {ms, major};
}

Pass read_pread(int fd, const std::vector<std::size_t>& pages) {
    alignas(64) static char buf[kPage];
    std::uint64_t sum = 0;
    const std::uint64_t t0 = now_ns();
    for (std::size_t pg : pages) {
        if (pread(fd, buf, kPage, off_t(pg * kPage)) != ssize_t(kPage)) die("pread");
        sum += std::uint8_t(buf[0]);
    }
    g_sink = sum;
    return {double(now_ns() - t0) / 1e6, 0};
}

// Dirties the pages (one byte each) of a shared mapping, then writes them back: the time of each.
// The kernel does part of its write-back work at the first write to a page (page_mkwrite maps
// the file system's blocks); usermm does all of it in sync. So both figures are reported.
struct SyncPass {
    double dirty_ms;
    double sync_ms;
};

SyncPass sync_usermm(const std::string& path, std::size_t size, const std::vector<std::size_t>& dirty) {
    usermm::Arena arena(size + (64 << 20));
    char* p = static_cast<char*>(arena.map_file(path, 0, size, Prot::ReadWrite, Share::Shared));
    const std::uint64_t t0 = now_ns();
    for (std::size_t pg : dirty) p[pg * kPage] = char(p[pg * kPage] + 1);
    const std::uint64_t t1 = now_ns();
    arena.sync(p, size);
    return {double(t1 - t0) / 1e6, double(now_ns() - t1) / 1e6};
}

SyncPass sync_kernel(int fd, std::size_t size, const std::vector<std::size_t>& dirty) {
    char* p = static_cast<char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    if (p == MAP_FAILED) die("mmap");
    const std::uint64_t t0 = now_ns();
    for (std::size_t pg : dirty) p[pg * kPage] = char(p[pg * kPage] + 1);
    const std::uint64_t t1 = now_ns();
    if (msync(p, size, MS_SYNC) != 0) die("msync");
    const SyncPass out{double(t1 - t0) / 1e6, double(now_ns() - t1) / 1e6};
    munmap(p, size);
    return out;
}

std::string make_file(std::size_t size) {
    const char* dir = std::getenv("USERMM_BENCH_DIR");
    std::string path = std::string(dir ? dir : "/var/tmp") + "/usermm-bench-XXXXXX";
    const int fd = mkstemp(path.data());
    if (fd < 0) die("mkstemp");
    std::vector<char> block(1 << 20);
    std::mt19937_64 rng(1);
    for (std::size_t at = 0; at < size; at += block.size()) {
        for (std::size_t i = 0; i < block.size(); i += 8) *reinterpret_cast<std::uint64_t*>(&block[i]) = rng();
        if (pwrite(fd, block.data(), block.size(), off_t(at)) != ssize_t(block.size())) die("pwrite");
    }
    if (fsync(fd) != 0) die("fsync");
    close(fd);
    return path;
}

void row(const char* what, double usermm_ms, double mmap_ms, double pread_ms, long um_major, long k_major) {
    fmt::print("{:<26} {:>10.1f} {:>10.1f} {:>10.1f} {:>8.2f} {:>8.2f} {:>12} {:>12}\n", what, usermm_ms, mmap_ms,
               pread_ms, usermm_ms / mmap_ms, usermm_ms / pread_ms, um_major, k_major);
}

}  // namespace

int main() {
    const char* mib_env = std::getenv("USERMM_BENCH_FILE_MIB");
    const std::size_t size = std::size_t(mib_env ? std::atol(mib_env) : 1024) << 20;
    const std::size_t npages = size / kPage;
    fmt::print("file VMAs vs the kernel: {} MiB file, page cache dropped before every pass, median of {} rounds\n",
               size >> 20, kRounds);
    const std::string path = make_file(size);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open");

    std::vector<std::size_t> sequential(npages);
    for (std::size_t i = 0; i < npages; ++i) sequential[i] = i;
    std::mt19937_64 rng(42);
    std::vector<std::size_t> random(kRandomReads);
    for (auto& pg : random) pg = rng() % npages;
    std::vector<std::size_t> dirty;
    for (std::size_t i = 0; i < npages; ++i)
        if (rng() % 10 == 0) dirty.push_back(i);

    // Warm-up: the first touch of memory the VM has not used yet is slow.
    drop_cache(fd);
    read_usermm(path, size, sequential);
    drop_cache(fd);
    read_kernel_mmap(fd, size, sequential);

    struct Series {
        std::vector<double> um, km, pr;
        long um_major = 0, k_major = 0;
    } seq, rnd;
    std::vector<double> sync_um, sync_k, both_um, both_k;
    for (int round = 0; round < kRounds; ++round) {
        // Odd rounds run the kernel first: whoever runs first meets a colder host cache.
        const bool kernel_first = round % 2;
        for (auto* s : {&seq, &rnd}) {
            const auto& pages = s == &seq ? sequential : random;
            Pass u, k;
            if (kernel_first) {
                drop_cache(fd);
                k = read_kernel_mmap(fd, size, pages);
            }
            drop_cache(fd);
            u = read_usermm(path, size, pages);
            if (!kernel_first) {
                drop_cache(fd);
                k = read_kernel_mmap(fd, size, pages);
            }
            drop_cache(fd);
            Pass r = read_pread(fd, pages);
            s->um.push_back(u.ms);
            s->km.push_back(k.ms);
            s->pr.push_back(r.ms);
            s->um_major = u.major;
            s->k_major = k.major;
        }
        drop_cache(fd);
        const SyncPass su = sync_usermm(path, size, dirty);
        drop_cache(fd);
        const SyncPass sk = sync_kernel(fd, size, dirty);
        sync_um.push_back(su.sync_ms);
        sync_k.push_back(sk.sync_ms);
        both_um.push_back(su.dirty_ms + su.sync_ms);
        both_k.push_back(sk.dirty_ms + sk.sync_ms);
    }

    fmt::print("{:<26} {:>10} {:>10} {:>10} {:>8} {:>8} {:>12} {:>12}\n", "", "usermm ms", "mmap ms", "pread ms",
               "/mmap", "/pread", "usermm major", "kernel major");
    row("sequential 4 KiB reads", median(seq.um), median(seq.km), median(seq.pr), seq.um_major, seq.k_major);
    row(fmt::format("random 4 KiB reads ({})", kRandomReads).c_str(), median(rnd.um), median(rnd.km), median(rnd.pr),
        rnd.um_major, rnd.k_major);
    fmt::print("write-back of {} dirty pages (10%): sync {:.1f} ms, msync {:.1f} ms, ratio {:.2f}\n", dirty.size(),
               median(sync_um), median(sync_k), median(sync_um) / median(sync_k));
    fmt::print("dirtying the pages + write-back: usermm {:.1f} ms, kernel {:.1f} ms, ratio {:.2f}\n", median(both_um),
               median(both_k), median(both_um) / median(both_k));
    fmt::print("targets: sequential <= 1.3 x mmap, random <= 1.5 x mmap, sync <= 1.2 x msync\n");
    close(fd);
    unlink(path.c_str());
}
