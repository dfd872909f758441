#include "account.hpp"

#include <time.h>

#include <bit>

#include "probes.hpp"
#include "trace.hpp"

namespace usermm::detail {

namespace {
constinit Counters g_process;

constexpr auto kRelaxed = std::memory_order_relaxed;

std::size_t latency_bucket(std::uint64_t ns) {
    const std::size_t b = std::size_t(std::bit_width(ns / 1000));
    return b < kLatencyBuckets ? b : kLatencyBuckets - 1;
}

// Applies one fault to one level (VMA, arena or process).
void count(Counters& c, const vm_fault& vmf, FaultResult result, std::uint64_t ns) {
    if (vmf.direct_reclaim) c.direct_reclaims.fetch_add(1, kRelaxed);  // before the fault, whatever it became
    if (vmf.stalled) c.reclaim_stalls.fetch_add(1, kRelaxed);
    if (vmf.overran) c.limit_overruns.fetch_add(1, kRelaxed);
    switch (result) {
        case FaultResult::Resolved:
            (vmf.major ? c.major_faults : c.minor_faults).fetch_add(1, kRelaxed);
            if (vmf.access == Access::Write)
                c.write_faults.fetch_add(1, kRelaxed);
            else if (vmf.access == Access::Exec)
                c.exec_faults.fetch_add(1, kRelaxed);
            else
                c.read_faults.fetch_add(1, kRelaxed);
            if (vmf.kind == FaultKind::Anonymous) {
                if (vmf.access != Access::Write && !vmf.had_data) c.zero_page_reads.fetch_add(1, kRelaxed);
                if (vmf.pages > 1) c.fault_around_pages.fetch_add(vmf.pages - 1, kRelaxed);
            } else if (vmf.kind == FaultKind::File) {
                if (vmf.pages > 1) c.fault_around_pages.fetch_add(vmf.pages - 1, kRelaxed);
            } else if (vmf.kind == FaultKind::Hinting) {
                c.hinting_faults.fetch_add(1, kRelaxed);
            } else if (vmf.kind == FaultKind::StackGrow) {
                c.stack_growth_faults.fetch_add(1, kRelaxed);
                c.stack_pages_grown.fetch_add(vmf.pages, kRelaxed);
            } else if (vmf.kind == FaultKind::Degraded) {
                c.degraded_faults.fetch_add(1, kRelaxed);
                c.degraded_pages.fetch_add(vmf.pages, kRelaxed);
            }
            if (vmf.read_pages) {
                c.file_pages_read.fetch_add(vmf.read_pages, kRelaxed);
                c.file_bytes_read.fetch_add(vmf.read_bytes, kRelaxed);
                c.readahead_pages.fetch_add(vmf.readahead_pages, kRelaxed);
            }
            if (vmf.readahead_hits) c.readahead_hits.fetch_add(vmf.readahead_hits, kRelaxed);
            if (vmf.dirtied) c.pages_dirtied.fetch_add(vmf.dirtied, kRelaxed);
            if (vmf.swapped_in) {
                c.pages_swapped_in.fetch_add(vmf.swapped_in, kRelaxed);
                c.swap_bytes_read.fetch_add(std::uint64_t(vmf.swapped_in) << g_page_shift, kRelaxed);
            }
            if (vmf.swap_hits) c.swap_readahead_hits.fetch_add(vmf.swap_hits, kRelaxed);
            if (vmf.copies) {
                c.cow_faults.fetch_add(1, kRelaxed);
                c.cow_bytes_copied.fetch_add(std::uint64_t(vmf.copies) << g_page_shift, kRelaxed);
            }
            break;
        case FaultResult::Spurious:
            c.spurious_faults.fetch_add(1, kRelaxed);
            break;
        case FaultResult::Foreign:
            c.foreign_faults.fetch_add(1, kRelaxed);
            return;  // time spent deciding that a fault is not ours is not usermm's latency
        case FaultResult::AccessError:
        case FaultResult::BusError:
        case FaultResult::Fatal:
            c.access_errors.fetch_add(1, kRelaxed);
            return;
        case FaultResult::StackOverflow:
            c.stack_overflows.fetch_add(1, kRelaxed);
            return;
    }
    c.handler_ns.fetch_add(ns, kRelaxed);
    c.latency[latency_bucket(ns)].fetch_add(1, kRelaxed);
}
}  // namespace

Counters& process_counters() { return g_process; }

std::uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::uint64_t(ts.tv_sec) * 1000000000u + std::uint64_t(ts.tv_nsec);
}

FaultEvent fault_event(const vm_fault& vmf, FaultResult result) {
    switch (result) {
        case FaultResult::Resolved:
            break;
        case FaultResult::Spurious:
            return FaultEvent::Spurious;
        case FaultResult::Foreign:
            return FaultEvent::Foreign;
        case FaultResult::StackOverflow:
            return FaultEvent::StackOverflow;
        case FaultResult::AccessError:
        case FaultResult::BusError:
        case FaultResult::Fatal:
            return FaultEvent::AccessError;
    }
    // By the kind of resolution alone, as the counters count kinds: that a fault also copied pages
    // into snapshots, or waited for I/O, are probes and trace flags of their own.
    const bool write = vmf.access == Access::Write;
    switch (vmf.kind) {
        case FaultKind::Anonymous:
            return write ? FaultEvent::AnonWrite : vmf.had_data ? FaultEvent::AnonRead : FaultEvent::ZeroRead;
        case FaultKind::Upgrade:
            if (vmf.vma->kind() == VmaKind::Anonymous) return FaultEvent::Upgrade;
            [[fallthrough]];  // a write to a file page mapped read-only so far
        case FaultKind::File:
            if (!write) return vmf.major ? FaultEvent::FileReadMajor : FaultEvent::FileReadMinor;
            return vmf.vma->kind() == VmaKind::FileShared ? FaultEvent::SharedWrite : FaultEvent::FileCow;
        case FaultKind::WriteProtect:
            return vmf.copies ? FaultEvent::SnapshotCopy : FaultEvent::WriteTrack;
        case FaultKind::Swap:
            return FaultEvent::SwapIn;
        case FaultKind::SwapReadahead:
            return FaultEvent::SwapHit;
        case FaultKind::Hinting:
            return FaultEvent::Hinting;
        case FaultKind::StackGrow:
            return FaultEvent::StackGrow;
        case FaultKind::Degraded:
            return FaultEvent::Degraded;
        case FaultKind::None:
            break;
    }
    // Every handler that resolves a fault names its kind; a record of no event, and no probe,
    // would make the sums that test_probes and test_trace check come out short.
    return FaultEvent::None;
}

namespace {
// One probe per event, since a probe's name is fixed where it is compiled. The arguments of every
// event's probe: address, VMA start, arena base, latency (ns), pages.
void fire_event_probe(FaultEvent event, std::uint64_t addr, std::uint64_t vma, std::uint64_t arena, std::uint64_t ns,
                      std::uint64_t pages) {
    switch (event) {
#define USERMM_EVENT_PROBE(e, name, doc)                 \
    case FaultEvent::e:                                  \
        USERMM_PROBE(name, addr, vma, arena, ns, pages); \
        break;
        USERMM_FAULT_EVENTS(USERMM_EVENT_PROBE)
#undef USERMM_EVENT_PROBE
        case FaultEvent::None:
            break;
    }
}

std::uint8_t trace_flags(const vm_fault& vmf) {
    return std::uint8_t((vmf.major ? kTraceMajor : 0) | (std::uint8_t(vmf.access) << 1) |
                        (vmf.direct_reclaim ? kTraceDirectReclaim : 0) | (vmf.stalled ? kTraceStalled : 0) |
                        (vmf.copies ? kTraceCopied : 0));
}
}  // namespace

void account_fault(const vm_fault& vmf, FaultResult result) {
    const std::uint64_t now = now_ns();
    const std::uint64_t ns = vmf.start_ns ? now - vmf.start_ns : 0;
    if (vmf.vma) count(*vmf.vma->stats, vmf, result, ns);
    if (vmf.arena) count(vmf.arena->stats, vmf, result, ns);
    count(g_process, vmf, result, ns);
    const FaultEvent event = fault_event(vmf, result);
    const std::uint64_t vma = vmf.vma ? vmf.vma->start : 0, arena = vmf.arena ? vmf.arena->base : 0;
    fire_event_probe(event, vmf.address, vma, arena, ns, vmf.pages);
    // Counted as the counters count them: cow_faults, major_faults, direct_reclaims + reclaim_stalls.
    if (result == FaultResult::Resolved && vmf.copies) USERMM_PROBE(snapshot_copy, vmf.address, vma, arena, vmf.copies);
    if (result == FaultResult::Resolved && vmf.major) USERMM_PROBE(major_fault, vmf.address, vma, arena, ns);
    if (vmf.direct_reclaim || vmf.stalled)
        USERMM_PROBE(direct_reclaim, vmf.address, arena, vmf.direct_reclaim, vmf.stalled, vmf.overran);
    trace_fault(vmf, event, trace_flags(vmf), vmf.start_ns ? vmf.start_ns : now, ns);
}

namespace {
// Adds to one counter at every level: the VMA (if any), the arena and the process.
void add(ArenaCore* arena, Vma* vma, std::atomic<std::uint64_t> Counters::*field, std::uint64_t n) {
    if (!n) return;
    if (vma) ((*vma->stats).*field).fetch_add(n, kRelaxed);
    if (arena) (arena->stats.*field).fetch_add(n, kRelaxed);
    (g_process.*field).fetch_add(n, kRelaxed);
}
}  // namespace

void account_prefault(ArenaCore& arena, Vma& vma, std::uint64_t pages) {
    add(&arena, &vma, &Counters::prefault_pages, pages);
}

void account_stack_grown(ArenaCore& arena, Vma& vma, std::uint64_t pages) {
    add(&arena, &vma, &Counters::stack_pages_grown, pages);
}

void account_file_read(ArenaCore& arena, Vma& vma, std::uint64_t pages, std::uint64_t bytes) {
    add(&arena, &vma, &Counters::file_pages_read, pages);
    add(&arena, &vma, &Counters::file_bytes_read, bytes);
    add(&arena, &vma, &Counters::readahead_pages, pages);
}

void account_readahead_wasted(ArenaCore* arena, Vma* vma, std::uint64_t pages) {
    add(arena, vma, &Counters::readahead_wasted, pages);
}

void account_writeback_error(ArenaCore& arena) { add(&arena, nullptr, &Counters::writeback_errors, 1); }

void account_writeback(ArenaCore& arena, Vma& vma, std::uint64_t pages, std::uint64_t bytes, bool failed) {
    add(&arena, &vma, &Counters::pages_written_back, pages);
    add(&arena, &vma, &Counters::bytes_written_back, bytes);
    add(&arena, &vma, &Counters::writeback_errors, failed ? 1 : 0);
}

void account_swap_out(ArenaCore& arena, Vma& vma, const SwapOut& out) {
    USERMM_PROBE(evict, arena.base, vma.start, out.written, out.dropped);
    add(&arena, &vma, &Counters::pages_swapped_out, out.written);
    add(&arena, &vma, &Counters::swap_bytes_written, out.written << g_page_shift);
    add(&arena, &vma, &Counters::pages_reclaimed, out.dropped);
    add(&arena, &vma, &Counters::swap_readahead_wasted, out.wasted);
}

void account_store_error(ArenaCore& arena) { add(&arena, nullptr, &Counters::store_errors, 1); }

void account_swap_in(ArenaCore& arena, std::uint64_t pages) {
    add(&arena, nullptr, &Counters::pages_swapped_in, pages);
    add(&arena, nullptr, &Counters::swap_bytes_read, pages << g_page_shift);
}

void account_snapshot_copy(SnapshotCore& snap, bool recycled) {
    snap.stats.cow_faults.fetch_add(1, kRelaxed);
    snap.stats.cow_bytes_copied.fetch_add(g_page_size, kRelaxed);
    if (recycled) {
        snap.stats.snapshot_pages_recycled.fetch_add(1, kRelaxed);
        add(snap.arena, nullptr, &Counters::snapshot_pages_recycled, 1);
    }
}

void account_restore(ArenaCore& arena, SnapshotCore& snap, std::uint64_t pages) {
    snap.stats.pages_restored.fetch_add(pages, kRelaxed);
    add(&arena, nullptr, &Counters::pages_restored, pages);
}

void account_snapshot_taken(ArenaCore& arena, std::uint64_t pause_ns) {
    add(&arena, nullptr, &Counters::snapshots_taken, 1);
    add(&arena, nullptr, &Counters::snapshot_pause_ns, pause_ns);
}

void account_name_dropped(ArenaCore& arena) { add(&arena, nullptr, &Counters::vma_names_dropped, 1); }

void account_dirty_collected(ArenaCore& arena, std::uint64_t pages) {
    add(&arena, nullptr, &Counters::dirty_pages_collected, pages);
}

void account_dirty_async(ArenaCore& arena) { add(&arena, nullptr, &Counters::dirty_async_collects, 1); }

}  // namespace usermm::detail
