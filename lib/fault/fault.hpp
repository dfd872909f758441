// One fault, from the handler's point of view: the kernel's struct vm_fault and vm_fault_t.
#pragma once

#include <cstdint>

#include "raw_log.hpp"
#include "vma.hpp"

namespace usermm::detail {

enum class Access : std::uint8_t { Read, Write, Exec, Unknown };

enum class FaultResult : std::uint8_t {
    Resolved,     // the page now allows the access; return and let the instruction run again
    Spurious,     // another thread had resolved it already
    Foreign,      // the address belongs to no arena: someone else's fault
    AccessError,  // in an arena, but a hole or an access the VMA forbids
    BusError,     // a file page with no content to show: past the end of the file, or unreadable
    Fatal,        // usermm cannot resolve a fault it owns (the kernel refused); never loop on it
    StackOverflow,  // an access past a stack's end by the code running on it (vm_fault::overflow)
};

// What kind of resolution a fault got, for accounting.
enum class FaultKind : std::uint8_t { None, Anonymous, Upgrade, Degraded, WriteProtect, File, Swap, Hinting, SwapReadahead, StackGrow };

struct vm_fault {
    // In: from decode.
    std::uintptr_t address = 0;
    Access access = Access::Unknown;
    int signo = 0;
    std::uintptr_t sp = 0;          // the faulting thread's stack pointer (0 if unknown)
    StackOverflow* overflow = nullptr;  // filled in for a StackOverflow result
    // Filled by find_vma.
    ArenaCore* arena = nullptr;
    Vma* vma = nullptr;
    // Filled by the handlers.
    FaultKind kind = FaultKind::None;
    std::uint32_t pages = 0;        // pages whose protection this fault changed
    std::uint32_t copies = 0;       // page copies made into snapshots before write access
    bool had_data = false;          // the page's content survived its PROT_NONE (restore put it back)
    pte_t pte_seen = 0;             // a spurious fault's PTE, as the fault left it
    // File VMAs.
    std::uint64_t file_size = 0;    // bytes, as fstat said at this fault
    std::uint64_t file_eof = 0;     // the first file page wholly past the end of the file
    bool major = false;             // the faulting page was not in the page cache
    std::uint32_t read_pages = 0;   // pages the kernel reads for this fault (readahead included)
    std::uint64_t read_bytes = 0;
    std::uint32_t readahead_pages = 0;
    std::uint32_t readahead_hits = 0;
    std::uint32_t dirtied = 0;      // shared file pages that became dirty
    // Swap.
    std::uint32_t swapped_in = 0;   // pages read from the store (the faulting page and its readahead)
    std::uint32_t swap_hits = 0;    // pages read ahead from the store that this fault mapped
    bool direct_reclaim = false;    // the fault found the arena at its resident limit and evicted a batch
    bool stalled = false;           // ... and found none to evict, and waited for the reclaimer
    bool overran = false;           // ... which did not bring it under: the fault goes on over it
    // Store slots whose copies a write grant made stale, released once the install lock is let go.
    std::uint64_t stale_slots[8];
    std::uint32_t stale_count = 0;
    std::uint64_t start_ns = 0;     // when the handler was entered, for the latency counters
    RawLine* diag = nullptr;        // why a fault is passed on; written only if it kills the process
};

// The whole fault world behind the signal entry: find the VMA, check the access, resolve, count.
FaultResult handle_mm_fault(vm_fault& vmf);

}  // namespace usermm::detail
