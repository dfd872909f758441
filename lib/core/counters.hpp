// The live form of usermm::Stats: the same field list, as relaxed atomics, so that the fault path
// can count without locks and the API can read a consistent-enough copy at any time.
#pragma once

#include <atomic>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

struct Counters {
#define USERMM_COUNTER_MEMBER(name, doc) std::atomic<std::uint64_t> name{0};
    USERMM_STATS_FIELDS(USERMM_COUNTER_MEMBER)
#undef USERMM_COUNTER_MEMBER
    std::atomic<std::uint64_t> latency[kLatencyBuckets]{};

    Stats load() const {
        Stats s;
#define USERMM_COUNTER_LOAD(name, doc) s.name = name.load(std::memory_order_relaxed);
        USERMM_STATS_FIELDS(USERMM_COUNTER_LOAD)
#undef USERMM_COUNTER_LOAD
        for (std::size_t i = 0; i < kLatencyBuckets; ++i) s.latency[i] = latency[i].load(std::memory_order_relaxed);
        return s;
    }

    // Folds another set in; used when VMAs merge, so that the arena's per-VMA view loses nothing.
    void add(const Stats& s) {
#define USERMM_COUNTER_ADD(name, doc) name.fetch_add(s.name, std::memory_order_relaxed);
        USERMM_STATS_FIELDS(USERMM_COUNTER_ADD)
#undef USERMM_COUNTER_ADD
        for (std::size_t i = 0; i < kLatencyBuckets; ++i) latency[i].fetch_add(s.latency[i], std::memory_order_relaxed);
    }
};

}  // namespace usermm::detail
