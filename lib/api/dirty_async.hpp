// collect_dirty without a fault per written page: ranges handed to the kernel's own write-protect
// resolution (userfaultfd WP_ASYNC) and asked, at each collection, which pages were written since
// the previous one (PAGEMAP_SCAN, which write-protects them again in the same call). API world.
//
// A range is asynchronous (listed in ArenaCore::async_ranges, registered with the asynchronous
// userfaultfd) only while nothing else needs to see each write as it happens: no live snapshot
// covers it (copy-before-write), the arena has no store (eviction must know that a swap copy went
// stale), and it holds no file or stack VMA. Its pages are never write-tracked in the PTEs: the
// kernel, not usermm, lifts the protection. A write-fault usermm resolves there (a grant) marks the
// page as it does anywhere; the kernel's written bits are folded into the PTEs' marks wherever the
// range stops being asynchronous (a snapshot, map_file, map_stack, a collection that cannot use
// the mode, fork).
//
// Moving a range between the two contexts drops its write-protect marks (UFFDIO_UNREGISTER clears
// them) until the other context protects it again: meanwhile its writable pages are made read-only
// (the guard), so that a write by another thread faults into usermm and waits for the arena's
// lock instead of landing unseen.
#pragma once

#include <cstddef>
#include <vector>

#include "arena_ops.hpp"
#include "vma.hpp"

namespace usermm::detail {

// Whether collect_dirty may track r asynchronously now (under the write lock).
bool async_eligible(const ArenaCore& a, Range r);
// collect_dirty's part for an eligible r: the parts of r not yet asynchronous become so (their
// write-tracked pages lose T), then the pages the kernel saw written in r since the previous
// collection are appended to `dirty` (page indices) and protected again. They are also marked
// dirty-snapshot (and their change bits set), which the next snapshot needs.
void async_collect(ArenaCore& a, const char* call, Range r, std::vector<std::size_t>& dirty);
// The parts of [first, last) that are not asynchronous (registered with the synchronous userfaultfd,
// whose calls refuse the others).
std::vector<PageSpan> sync_parts(const ArenaCore& a, std::size_t first, std::size_t last);
// The parts that are.
std::vector<PageSpan> async_spans(const ArenaCore& a, std::size_t first, std::size_t last);
// The parts of r that are asynchronous go back to the synchronous engine: what the kernel saw
// written becomes dirty-collect and dirty-snapshot marks, and the clean writable pages are
// write-tracked as collect_dirty would have left them.
void async_leave(ArenaCore& a, const char* call, Range r);
// fork's prepare handler, every lock held: the ranges' writable pages made read-only, then the
// written bits become the PTEs' marks. After the fork, the parent gives write access back.
void async_fold_before_fork(ArenaCore& a) noexcept;
void async_after_fork_parent(ArenaCore& a) noexcept;
// In the child, which keeps no registration nor mark: the asynchronous ranges' writable pages (read-only
// in the kernel already, the guard) are write-tracked by the mprotect engine, and the ranges forgotten.
void async_after_fork_child(ArenaCore& a);

}  // namespace usermm::detail
