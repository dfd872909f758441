// What every benchmark needs: a monotonic clock, the median of interleaved rounds, the page size,
// the sizes a run asks for, free memory warmed before a pass, and the floors' fault filter.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace usermm_bench {

// The kernel's page size, read at start-up: a floor's signal handler needs it, and
// usermm::page_size() at namespace scope would start usermm before main.
inline const std::size_t kPage = std::size_t(sysconf(_SC_PAGESIZE));

inline std::uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::uint64_t(ts.tv_sec) * 1000000000u + std::uint64_t(ts.tv_nsec);
}

inline double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// A size from the environment (the smoke run in perf/CMakeLists.txt sets tiny ones), or `fallback`.
inline std::size_t env_or(const char* name, std::size_t fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::size_t(std::strtoull(v, nullptr, 10)) : fallback;
}

}  // namespace usermm_bench

// In a floor's SIGSEGV handler: the fault's address, if it lies in [base, base + length). Any other
// fault is not the floor's: the default action is put back, so that the access faults again and
// kills the process, as it would have without the floor.
inline bool floor_fault(const siginfo_t* si, std::uintptr_t base, std::size_t length, std::uintptr_t* addr) {
    *addr = reinterpret_cast<std::uintptr_t>(si->si_addr);
    if (*addr >= base && *addr - base < length) return true;
    signal(SIGSEGV, SIG_DFL);
    return false;
}

// The VM gives memory that stays free for a while back to the host (free page reporting), and the
// first touch of such a page again costs a trip to the host. Which free pages a pass gets depends on
// the pass before it: here a kernel mmap read took 1.1-2.6 s after a usermm read and 0.3-0.4 s after
// another mmap read, the difference all in the touches. Touching `bytes` of memory in huge pages and
// freeing it just before every pass puts warm pages first in the free lists for all variants alike
// (the same read then took 0.4 s after a usermm read).
inline void warm_free_memory(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("warm_free_memory: mmap");
        std::exit(1);
    }
    madvise(p, bytes, MADV_HUGEPAGE);  // advice: without THP, 4 KiB pages warm the same memory
    if (madvise(p, bytes, MADV_POPULATE_WRITE) != 0) {
        std::perror("warm_free_memory: madvise(MADV_POPULATE_WRITE)");
        std::exit(1);
    }
    munmap(p, bytes);
}
