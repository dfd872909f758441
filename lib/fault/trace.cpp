#include "trace.hpp"

#include <sys/syscall.h>
#include <unistd.h>

namespace usermm::detail {

namespace {
constinit TraceState g_trace;

// Initial-exec: the fault path reads these without __tls_get_addr, which may allocate.
[[gnu::tls_model("initial-exec")]] constinit thread_local TraceRing* t_ring = nullptr;
[[gnu::tls_model("initial-exec")]] constinit thread_local std::uint64_t t_generation = 0;
[[gnu::tls_model("initial-exec")]] constinit thread_local std::uint32_t t_tid = 0;

// The tid is asked at every claim (claims are rare): a forked child's thread inherits its parent's
// thread-locals, tid included.
TraceRing* claim_ring() {
    t_tid = std::uint32_t(syscall(SYS_gettid));
    for (TraceRing& ring : g_trace.rings) {
        std::uint32_t free = 0;
        if (ring.owner.load(std::memory_order_relaxed) == 0 &&
            ring.owner.compare_exchange_strong(free, t_tid, std::memory_order_acquire, std::memory_order_relaxed))
            return &ring;
    }
    return nullptr;
}
}  // namespace

TraceState& trace_state() { return g_trace; }

void trace_fault(const vm_fault& vmf, FaultEvent event, std::uint8_t flags, std::uint64_t when, std::uint64_t ns) {
    if (!g_trace.on.load(std::memory_order_acquire)) return;
    const std::uint64_t generation = g_trace.generation.load(std::memory_order_relaxed);
    if (t_generation != generation) {
        t_ring = nullptr;
        t_generation = generation;
    }
    // A thread that found none free tries again: the drainer frees the rings of threads that ended.
    if (!t_ring) t_ring = claim_ring();
    TraceRing* ring = t_ring;
    if (!ring) {
        g_trace.dropped.fetch_add(1, std::memory_order_relaxed);
        return;
    }
    // A count, not a flag: a thread whose ring was given to another thread by a stop and a start
    // meanwhile touches it once more here, and must not end the new owner's busy time.
    ring->busy.fetch_add(1, std::memory_order_seq_cst);
    // Stopped meanwhile, or stopped and started again (the ring may be another thread's now).
    if (!g_trace.on.load(std::memory_order_seq_cst) ||
        g_trace.generation.load(std::memory_order_relaxed) != generation) {
        ring->busy.fetch_sub(1, std::memory_order_release);
        return;
    }
    const std::uint64_t head = ring->head.load(std::memory_order_relaxed);
    if (head - ring->tail.load(std::memory_order_acquire) == g_trace.capacity) {
        g_trace.dropped.fetch_add(1, std::memory_order_relaxed);
    } else {
        const std::size_t index = std::size_t(ring - g_trace.rings);
        TraceRecord& r = g_trace.buffers[index * g_trace.capacity + (head & (g_trace.capacity - 1))];
        r.time_ns = when >= g_trace.start_ns ? when - g_trace.start_ns : 0;
        r.address = vmf.address;
        r.vma_start = vmf.vma ? vmf.vma->start : 0;
        r.arena_base = vmf.arena ? vmf.arena->base : 0;
        r.latency_ns = ns > UINT32_MAX ? UINT32_MAX : std::uint32_t(ns);
        r.tid = t_tid;
        r.pages = vmf.pages > UINT16_MAX ? UINT16_MAX : std::uint16_t(vmf.pages);
        r.event = std::uint8_t(event);
        r.flags = flags;
        r.reserved = 0;
        ring->head.store(head + 1, std::memory_order_release);
    }
    ring->busy.fetch_sub(1, std::memory_order_release);
}

}  // namespace usermm::detail
