// What every benchmark needs: a monotonic clock, the median of interleaved rounds, the page size
// and the sizes a run asks for.
#pragma once

#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
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
