// The fault world's half of fault traces (include/usermm/trace.hpp): a fault appends one record
// to its thread's ring; lib/api/trace.cpp starts and stops traces and drains the rings.
//
// A ring is single-producer, single-consumer: its thread claims it (a CAS on `owner`) at its first
// fault of a trace, and only that thread writes records and `head`; only the drainer writes
// `tail`. The ring headers are static, so a fault can always touch them; the record buffers are
// the API world's and exist while a trace does. A fault never waits: a full ring, or no free ring,
// drops the record and counts it.
//
// Stopping a trace and a fault that is writing meet through `busy` (Dekker-style, both sides
// sequentially consistent): the fault raises busy and then reads `on`; stop clears `on` and then
// waits until no ring is busy. Either the fault sees the trace off, or stop sees the fault and
// waits for it, so buffers are never freed under a writer. `generation` tells a thread that the
// ring it claimed belongs to an earlier trace.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <usermm/trace.hpp>

#include "fault.hpp"

namespace usermm::detail {

struct alignas(64) TraceRing {
    std::atomic<std::uint32_t> owner{0};  // the thread (tid) writing it; 0: free
    std::atomic<std::uint32_t> busy{0};   // faults between their check of `on` and their last write
    std::atomic<std::uint64_t> head{0};   // records written (the producer's)
    std::atomic<std::uint64_t> tail{0};   // records drained (the drainer's)
};

struct TraceState {
    // Threads that fault while a trace is on, at once; the faults of a thread beyond them are
    // dropped (counted) until the drainer frees the ring of a thread that ended.
    static constexpr std::size_t kRings = 128;
    std::atomic<bool> on{false};
    std::atomic<std::uint64_t> generation{0};
    std::atomic<std::uint64_t> dropped{0};
    std::uint64_t start_ns = 0;
    TraceRecord* buffers = nullptr;  // kRings rings of `capacity` records each
    std::uint64_t capacity = 0;      // a power of two
    TraceRing rings[kRings];
};

TraceState& trace_state();

// Appends the fault's record if a trace is on: it began at `when` (CLOCK_MONOTONIC) and took `ns`.
void trace_fault(const vm_fault& vmf, FaultEvent event, std::uint8_t flags, std::uint64_t when, std::uint64_t ns);

}  // namespace usermm::detail
