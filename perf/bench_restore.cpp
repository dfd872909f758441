// What a snapshot costs around the calls that used to make it copy or fault far more than the
// program wrote (issue 8, items 4 and 7), each beside its floor measured in the same run:
//  - prefault(Write) of a whole sparse VMA while a snapshot is live: pages copied and memory grown
//    against the pages the program wrote, and the size of the next increment (nothing written);
//  - restore() of k changed pages of a warm heap: the restore, then a read pass and a write pass
//    over the heap, against a read pass of the warm heap and the first writes after the snapshot.
// Usage: usermm-bench-restore [heap MiB (1024)] [sparse VMA MiB (2048)] [rounds (5)]; `8 16 1` is a
// smoke run.
// The engine is the default one; USERMM_ENGINE=mprotect measures the other.
#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm::Prot;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

std::size_t page() { return usermm::page_size(); }

double resident_mib() {
    long total = 0, resident = 0;
    FILE* f = std::fopen("/proc/self/statm", "r");
    if (!f || std::fscanf(f, "%ld %ld", &total, &resident) != 2) std::abort();
    std::fclose(f);
    return double(resident) * double(page()) / double(1 << 20);
}

// Bytes of an image written to an unlinked temporary file.
std::size_t image_bytes(const usermm::Snapshot& s, const usermm::Snapshot* previous) {
    char path[] = "/tmp/usermm-bench-restore-XXXXXX";
    const int fd = mkstemp(path);
    if (fd < 0) std::abort();
    unlink(path);
    if (previous)
        s.write_to(fd, *previous);
    else
        s.write_to(fd);
    const off_t n = lseek(fd, 0, SEEK_END);
    close(fd);
    return std::size_t(n);
}

void touch(char* p, std::uint64_t v) { *reinterpret_cast<volatile std::uint64_t*>(p) = v; }
std::uint64_t peek(const char* p) { return *reinterpret_cast<const volatile std::uint64_t*>(p); }

void prefault_after_snapshot(std::size_t vma_mib, int rounds) {
    constexpr std::size_t kWrites = 5000;
    const std::size_t pages = (vma_mib << 20) / page();
    std::vector<double> copied, grown, prefault_ms, increment;
    std::mt19937_64 rng(1);
    for (int round = 0; round < rounds; ++round) {
        usermm::Arena arena((vma_mib << 20) * 2);
        char* vma = static_cast<char*>(arena.map(pages * page(), Prot::ReadWrite, {.name = "sparse"}));
        for (std::size_t i = 0; i < kWrites; ++i) touch(vma + (rng() % pages) * page(), i + 1);
        const usermm::Snapshot first = arena.snapshot();
        const double rss0 = resident_mib();
        const std::uint64_t t0 = now_ns();
        arena.prefault(vma, pages * page(), Prot::Write);
        prefault_ms.push_back(double(now_ns() - t0) / 1e6);
        grown.push_back(resident_mib() - rss0);
        copied.push_back(double(first.stats().cow_faults));
        const usermm::Snapshot second = arena.snapshot();
        increment.push_back(double(image_bytes(second, &first)));
    }
    fmt::print("prefault(Write) of a {} MiB VMA with {} random pages written, a snapshot live (median of {}):\n",
               vma_mib, kWrites, rounds);
    fmt::print("  pages copied into the snapshot   {:>10.0f}   (floor: pages written, at most {})\n", median(copied),
               kWrites);
    fmt::print("  resident memory grown            {:>10.1f} MiB (the copies: {:.1f} MiB)\n", median(grown),
               median(copied) * double(page()) / double(1 << 20));
    fmt::print("  prefault                         {:>10.1f} ms\n", median(prefault_ms));
    fmt::print("  next increment, nothing written  {:>10.0f} bytes\n", median(increment));
}

double pass_ms(char* heap, std::size_t pages, bool write, std::uint64_t v) {
    const std::uint64_t t0 = now_ns();
    std::uint64_t sum = 0;
    for (std::size_t p = 0; p < pages; ++p) {
        if (write)
            touch(heap + p * page(), v + p);
        else
            sum += peek(heap + p * page());
    }
    if (sum == 1) std::puts("");  // keeps the reads
    return double(now_ns() - t0) / 1e6;
}

void restore_k_pages(std::size_t heap_mib, int rounds) {
    constexpr std::size_t kChanged = 100;
    const std::size_t pages = (heap_mib << 20) / page();
    std::vector<double> warm_read, warm_write, restore_ms, read_after, write_after, faults_after;
    for (int round = 0; round < rounds; ++round) {
        usermm::Arena arena((heap_mib << 20) * 2);
        char* heap = static_cast<char*>(arena.map(pages * page(), Prot::ReadWrite, {.name = "warm"}));
        pass_ms(heap, pages, true, 1);
        const usermm::Snapshot snap = arena.snapshot();
        // The floors: the first write to every page after a snapshot (each one copies), and a read
        // pass over the warm heap.
        warm_write.push_back(pass_ms(heap, pages, true, 2));
        warm_read.push_back(pass_ms(heap, pages, false, 0));
        arena.restore(snap);  // every page changed: all of them are restored, and fault again
        pass_ms(heap, pages, false, 0);
        for (std::size_t i = 0; i < kChanged; ++i) touch(heap + (i * (pages / kChanged)) * page(), 4);
        std::uint64_t t0 = now_ns();
        arena.restore(snap);
        restore_ms.push_back(double(now_ns() - t0) / 1e6);
        const std::uint64_t faults = arena.stats().minor_faults;
        read_after.push_back(pass_ms(heap, pages, false, 0));
        faults_after.push_back(double(arena.stats().minor_faults - faults));
        write_after.push_back(pass_ms(heap, pages, true, 5));
    }
    fmt::print("restore() of {} changed pages of a warm {} MiB heap ({} pages; median of {}):\n", kChanged, heap_mib,
               pages, rounds);
    fmt::print("  restore                           {:>9.2f} ms\n", median(restore_ms));
    fmt::print("  read pass after it                {:>9.2f} ms   warm heap {:.2f} ms   ratio {:.2f}; faults {:.0f}\n",
               median(read_after), median(warm_read), median(read_after) / median(warm_read), median(faults_after));
    fmt::print("  write pass after it               {:>9.2f} ms   first writes after the snapshot {:.2f} ms   ratio {:.2f}\n",
               median(write_after), median(warm_write), median(write_after) / median(warm_write));
}

std::size_t arg(int argc, char** argv, int i, std::size_t fallback) {
    return argc > i ? std::size_t(std::strtoull(argv[i], nullptr, 10)) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t heap_mib = arg(argc, argv, 1, 1024);
    const std::size_t vma_mib = arg(argc, argv, 2, 2048);
    const int rounds = int(arg(argc, argv, 3, 5));
    fmt::print("engine: {}\n", usermm::engine() == usermm::Engine::Uffd ? "uffd" : "mprotect");
    prefault_after_snapshot(vma_mib, rounds);
    restore_k_pages(heap_mib, rounds);
}
