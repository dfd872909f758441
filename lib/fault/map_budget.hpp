// The kernel's mapping budget ("the kernel's mapping budget holds").
//
// Every mprotect of part of a mapping splits a kernel VMA, and a process may hold vm.max_map_count
// of them. usermm counts the kernel VMAs its arenas consist of, from the per-page state alone: in
// an arena, a kernel VMA boundary lies wherever two neighbouring pages have different protections
// or backings (file or anonymous), and wherever a page carries an edge mark (where the kernel keeps
// two mappings apart for good: see settle_edges, inherit_edges). The count is exact; verify()
// compares it with /proc/self/maps.
// A fault that would take the count past the budget is resolved coarsely instead (see
// do_degraded_fault), which merges kernel VMAs rather than splitting them.
#pragma once

#include <cstdint>

#include "vma.hpp"

namespace usermm::detail {

// API world: set the limit once, from vm.max_map_count less what the process already uses and a
// reserve for the program's own mappings (thread stacks, malloc, libraries).
void map_budget_set_limit(long limit);
void map_budget_set_max_map_count(long max_map_count);
long map_budget_limit();
long map_budget_used();
long map_budget_max_map_count();
// The kernel refused a change for want of a mapping (ENOMEM): from now on usermm holds no more
// kernel mappings than it does now, so that faults degrade before they ask the kernel again.
void map_budget_refused();

// How many kernel VMAs the arena gains (or loses, negative) when pages [first, last) all get
// `prot`, judged from the PTEs of those pages and of their two neighbours.
long map_count_delta(const ArenaCore& arena, std::size_t first, std::size_t last, Prot prot);

// Records `delta` if it keeps the count within the limit (a negative delta always fits).
bool map_budget_try_charge(ArenaCore& arena, long delta);
// Records `delta` whatever the limit: for changes the program asked for, and for degraded faults.
void map_budget_charge(ArenaCore& arena, long delta);
// The same for usermm's mappings outside every arena (the page caches' views and state tables).
void map_budget_charge_process(long delta);

// Whether a refused grant of write access to `bytes` more of private memory (ENOMEM) was
// RLIMIT_DATA's doing: the kernel counts private writable mappings against it (a PROT_NONE
// reservation is not counted; mprotect to writable counts the pages then). Fault world: reads
// /proc/self/status with plain system calls. *limit gets the limit in bytes.
bool data_limit_reached(std::size_t bytes, std::uint64_t* limit);

// An arena's count covers its reservation and its two tables (the PTEs and the changed-group bits).
inline constexpr long kArenaTableMaps = 2;

// API world: the arena's count becomes what the kernel really has, `kernel_maps` mappings inside
// the reservation (read from /proc/self/maps), plus its tables.
void map_budget_recount(ArenaCore& arena, long kernel_maps);

}  // namespace usermm::detail
