// What every benchmark needs: a monotonic clock and the median of interleaved rounds.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace usermm_bench {

inline std::uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::uint64_t(ts.tv_sec) * 1000000000u + std::uint64_t(ts.tv_nsec);
}

inline double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace usermm_bench
