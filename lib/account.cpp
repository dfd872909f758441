#include "account.hpp"

#include <time.h>

#include <bit>

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
    switch (result) {
        case FaultResult::Resolved:
            c.minor_faults.fetch_add(1, kRelaxed);
            if (vmf.access == Access::Write)
                c.write_faults.fetch_add(1, kRelaxed);
            else if (vmf.access == Access::Exec)
                c.exec_faults.fetch_add(1, kRelaxed);
            else
                c.read_faults.fetch_add(1, kRelaxed);
            if (vmf.kind == FaultKind::Anonymous) {
                if (vmf.access != Access::Write) c.zero_page_reads.fetch_add(1, kRelaxed);
                if (vmf.pages > 1) c.fault_around_pages.fetch_add(vmf.pages - 1, kRelaxed);
            } else if (vmf.kind == FaultKind::Degraded) {
                c.degraded_faults.fetch_add(1, kRelaxed);
                c.degraded_pages.fetch_add(vmf.pages, kRelaxed);
            }
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
        case FaultResult::Fatal:
            c.access_errors.fetch_add(1, kRelaxed);
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

void account_fault(const vm_fault& vmf, FaultResult result) {
    const std::uint64_t ns = vmf.start_ns ? now_ns() - vmf.start_ns : 0;
    if (vmf.vma) count(vmf.vma->stats, vmf, result, ns);
    if (vmf.arena) count(vmf.arena->stats, vmf, result, ns);
    count(g_process, vmf, result, ns);
}

void account_prefault(ArenaCore& arena, Vma& vma, std::uint64_t pages) {
    vma.stats.prefault_pages.fetch_add(pages, kRelaxed);
    arena.stats.prefault_pages.fetch_add(pages, kRelaxed);
    g_process.prefault_pages.fetch_add(pages, kRelaxed);
}

}  // namespace usermm::detail
