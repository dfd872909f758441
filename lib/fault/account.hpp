// Accounting: the one place where a fault is counted ("each fault is counted once"), like the kernel's
// mm_account_fault. Every outcome of handle_mm_fault passes through account_fault exactly once.
#pragma once

#include <cstdint>

#include <usermm/trace.hpp>

#include "counters.hpp"
#include "fault.hpp"
#include "snapshot.hpp"

namespace usermm::detail {

// Counters of the whole process, including arenas that no longer exist.
Counters& process_counters();

// Under the arena's read lock when vmf.arena is set (the VMA must still exist). Also fires the
// fault's probe (lib/core/probes.hpp) and records it into a trace that is on.
void account_fault(const vm_fault& vmf, FaultResult result);
// What the fault was, for probes and traces.
FaultEvent fault_event(const vm_fault& vmf, FaultResult result);

// For the API world: pages granted by prefault(); pages read into the page cache by advice or
// prefault (all of them read ahead of any fault); read-ahead pages dropped unmapped (vma and arena
// may be null when the cache outlived the VMA or arena that read them); one write-back of a VMA's dirty pages.
void account_prefault(ArenaCore& arena, Vma& vma, std::uint64_t pages);
// Stack pages committed outside a fault (Stack::ensure, an API call on a usermm stack).
void account_stack_grown(ArenaCore& arena, Vma& vma, std::uint64_t pages);
void account_file_read(ArenaCore& arena, Vma& vma, std::uint64_t pages, std::uint64_t bytes);
void account_readahead_wasted(ArenaCore* arena, Vma* vma, std::uint64_t pages);
void account_writeback(ArenaCore& arena, Vma& vma, std::uint64_t pages, std::uint64_t bytes, bool failed);
void account_writeback_error(ArenaCore& arena);  // when the VMA may be gone
// One eviction: pages written to the store, pages dropped from memory (written, zero, or clean in
// the store), of them read ahead from the store and never used.
struct SwapOut {
    std::uint64_t written = 0;
    std::uint64_t dropped = 0;
    std::uint64_t wasted = 0;
};
void account_swap_out(ArenaCore& arena, Vma& vma, const SwapOut& out);
void account_store_error(ArenaCore& arena);
void account_swap_in(ArenaCore& arena, std::uint64_t pages);  // read back by the API world (prefault)
// A snapshot's own counters (its VMA, arena and process count the fault that copied, through
// vm_fault::copies): one page it took before a write; `recycled`, onto a page of a pooled store
// (counted at the arena and the process too).
void account_snapshot_copy(SnapshotCore& snap, bool recycled);
// Pages written back into the arena by a restore of `snap`; pages reported by collect_dirty.
void account_restore(ArenaCore& arena, SnapshotCore& snap, std::uint64_t pages);
void account_dirty_collected(ArenaCore& arena, std::uint64_t pages);
void account_dirty_async(ArenaCore& arena);
// One snapshot, which held the arena's write lock for `pause_ns`.
void account_snapshot_taken(ArenaCore& arena, std::uint64_t pause_ns);
// A VMA's name the kernel was not given (map budget short) or refused.
void account_name_dropped(ArenaCore& arena);

std::uint64_t now_ns();

}  // namespace usermm::detail
