// Accounting: the one place where a fault is counted ("each fault is counted once"), like the kernel's
// mm_account_fault. Every outcome of handle_mm_fault passes through account_fault exactly once.
#pragma once

#include <cstdint>

#include "counters.hpp"
#include "fault.hpp"

namespace usermm::detail {

// Counters of the whole process, including arenas that no longer exist.
Counters& process_counters();

// Under the arena's read lock when vmf.arena is set (the VMA must still exist).
void account_fault(const vm_fault& vmf, FaultResult result);

// For the API world: pages granted by prefault().
void account_prefault(ArenaCore& arena, Vma& vma, std::uint64_t pages);

std::uint64_t now_ns();

}  // namespace usermm::detail
