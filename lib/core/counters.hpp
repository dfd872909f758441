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

    void reset() {
#define USERMM_COUNTER_RESET(name, doc) name.store(0, std::memory_order_relaxed);
        USERMM_STATS_FIELDS(USERMM_COUNTER_RESET)
#undef USERMM_COUNTER_RESET
        for (auto& b : latency) b.store(0, std::memory_order_relaxed);
    }

    // Folds another set in; used when VMAs merge, so that the arena's per-VMA view loses nothing.
    void add(const Stats& s) {
#define USERMM_COUNTER_ADD(name, doc) name.fetch_add(s.name, std::memory_order_relaxed);
        USERMM_STATS_FIELDS(USERMM_COUNTER_ADD)
#undef USERMM_COUNTER_ADD
        for (std::size_t i = 0; i < kLatencyBuckets; ++i) latency[i].fetch_add(s.latency[i], std::memory_order_relaxed);
    }
};

// A VMA's counters, kept apart from its tree node in a slab of their own (lib/api/vma_counters.cpp)
// so that the nodes every fault walks stay small and close together. Taken when the VMA is made,
// given back (zeroed) when it is freed; both only in the API world.
Counters* vma_counters_take();
void vma_counters_give(Counters* c) noexcept;

class VmaCounters {
public:
    VmaCounters() : c_(vma_counters_take()) {}
    ~VmaCounters() { vma_counters_give(c_); }
    VmaCounters(const VmaCounters&) = delete;
    VmaCounters& operator=(const VmaCounters&) = delete;
    Counters& operator*() const { return *c_; }
    Counters* operator->() const { return c_; }

private:
    Counters* c_;
};

}  // namespace usermm::detail
