// A stack VMA's own state (map_stack), read by expand_stack in the fault world: where its
// committed part begins, as an atomic floor, so that growing one stack needs neither the tree's
// write side nor anything another stack's thread holds.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "vma.hpp"

namespace usermm::detail {

// The kernel's historic expand_stack rule (removed in 4.x, kept here as one of two): an access at
// most this far below the faulting thread's stack pointer is the stack's own (a push, a prologue
// touching its frame), wherever it lies in the gap.
inline constexpr std::uintptr_t kStackPointerReach = 65536 + 32 * sizeof(unsigned long);

struct StackCore {
    // The VMA is [start, end): its permanent guard is [start, floor), the stack [floor, end).
    std::uintptr_t start = 0;
    std::uintptr_t floor = 0;
    std::uintptr_t end = 0;
    // Pages from here to end are committed (no guard); below, to start, every page is a guard page
    // (kPteGuard). Lowered only by expand_stack under `growing`; raised only by the API world under
    // the arena's write lock (a pool shrinking an idle stack).
    std::atomic<std::uintptr_t> committed_low{0};
    // The lowest committed_low since creation or the last shrink: the stack's reach.
    std::atomic<std::uintptr_t> lowest{0};
    // The deepest page a growth fault touched since then (end when none): peak() starts from it.
    std::atomic<std::uintptr_t> deepest{0};
    std::uintptr_t initial_low = 0;  // committed_low at creation and after a shrink
    std::uintptr_t gap = 0;          // bytes below committed_low a fault may grow to without the sp rule
    std::uint32_t headroom_pages = 0;
    bool markers = false;            // guard markers (true) or PROT_NONE (false)
    std::uint64_t id = 0;            // unique in the process, never reused
    char name[kVmaNameMax] = {};
    // Held by the one fault (or ensure) that grows the stack: two threads on one stack are rare
    // (a pointer into it, a signal handler running on it), and growth must stay contiguous.
    std::atomic<bool> growing{false};
};

// Process-wide gauges and counts of stacks (usermm::stack_stats). The fault world adds growth and
// overflows; the API world the rest.
struct StackGauges {
    std::atomic<std::int64_t> live{0};
    std::atomic<std::int64_t> committed_pages{0};  // of live stacks, guard-free
    std::atomic<std::uint64_t> growth_faults{0};
    std::atomic<std::uint64_t> overflows{0};
    std::atomic<std::int64_t> kernel_maps{0};      // kernel mappings stacks added (PROT_NONE fallback)
};
inline constinit StackGauges g_stack_gauges;

}  // namespace usermm::detail
