// Per-page state, our "PTE": two bytes per page of an arena, in a table the kernel itself pages in
// on demand (an untouched part of the table costs nothing, like the arena it describes).
//
// The low bits are exactly the protection the kernel currently has for the page (the invariant
// "metadata agrees with the kernel"). A fault that resolves a page sets kLocked with a CAS first, so
// that of several threads faulting the same page one resolves it and the others wait and then find
// it resolved; the new protection and the unlock are published by one release store, after the
// kernel call that made them true.
//
// The other bits remember what the protection alone does not say:
//  - populated: write access was granted since the page was last discarded, so the kernel may hold
//    data for it (a page without it reads as zeros, whatever its protection);
//  - write-tracked: write access is withheld only so that the next write is seen (a snapshot needs
//    the old content first, or collect_dirty() wants to know);
//  - dirty-snapshot / dirty-collect: write access was granted (or the content discarded) since the
//    arena's last snapshot / since the last collect_dirty() that covered the page;
//  - dirty-file: write access was granted since the page was last written back to its file (only
//    shared file VMAs read it);
//  - file: the page lies in a file VMA, whose kernel mapping is the file rather than the arena's
//    anonymous memory, so it never merges with an anonymous neighbour;
//  - readahead: a file page usermm asked the kernel to read ahead of any access, not granted since
//    (granted, it is a readahead hit; dropped, a readahead wasted);
//  - saved: a shared file page whose write-back failed; usermm holds its content (MappedFile), and
//    keeps it PROT_NONE until the copy is back in the page cache;
//  - edge: a kernel VMA boundary may lie before this page whatever the neighbours' protections
//    (the first page of a file mapping, the page after one, the pieces an unmapped file VMA leaves,
//    the boundaries a forked child inherits), set where the kernel keeps the mappings apart for good.
//    The map budget counts a boundary there.
//  - swapped: an anonymous page whose content is in the arena's store (its slot in
//    ArenaCore::swap_slots), not in memory; PROT_NONE, populated (it holds data), until a fault reads
//    it back (do_swap_page);
//  - inactive: a page the reclaimer made PROT_NONE without dropping its content, to see whether it
//    is still used: its next touch is a hinting fault.
//  - guard: a page of a stack VMA (map_stack) below the stack's committed part, or of its
//    permanent guard: the kernel holds a guard marker there (MADV_GUARD_INSTALL, with the VMA's
//    protection, Read+Write) or PROT_NONE (the fallback). A fault on it is expand_stack's: growth
//    or an overflow. Never populated.
// No bit is free. lib/README.md, "The
// per-page state machine", tells the states from these flags and lists which world may make each
// transition, with the bits it sets and clears.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

// Set once, before the first arena exists, from sysconf(_SC_PAGESIZE).
inline std::size_t g_page_shift = 12;
inline std::size_t g_page_size = 4096;

using pte_t = std::uint16_t;
using Pte = std::atomic<pte_t>;

inline constexpr pte_t kPteProt = 0x7;           // Prot bits the kernel grants now
inline constexpr pte_t kPtePopulated = 0x08;
inline constexpr pte_t kPteWriteTracked = 0x10;
inline constexpr pte_t kPteDirtySnapshot = 0x20;
inline constexpr pte_t kPteDirtyCollect = 0x40;
inline constexpr pte_t kPteDirty = kPteDirtySnapshot | kPteDirtyCollect;
inline constexpr pte_t kPteLocked = 0x80;        // a fault is installing this page
inline constexpr pte_t kPteDirtyFile = 0x100;
inline constexpr pte_t kPteFile = 0x200;
inline constexpr pte_t kPteEdge = 0x400;
inline constexpr pte_t kPteReadahead = 0x800;
inline constexpr pte_t kPteSaved = 0x1000;
inline constexpr pte_t kPteSwapped = 0x2000;
inline constexpr pte_t kPteInactive = 0x4000;
inline constexpr pte_t kPteGuard = 0x8000;       // a stack page not committed yet (guard marker or PROT_NONE)
inline constexpr pte_t kPteFlags = pte_t(~kPteProt & ~kPteLocked);

inline constexpr pte_t pte_prot(pte_t v) { return v & kPteProt; }
inline constexpr pte_t to_pte(Prot p) { return pte_t(unsigned(p) & kPteProt); }
inline constexpr Prot pte_to_prot(pte_t v) { return Prot(v & kPteProt); }

// The PTE of a page whose kernel protection became `prot`, from its value `old` (lock bit clear).
// Granting write makes the page populated and dirty and ends write tracking. Any access granted
// ends a readahead mark, an inactive one and a stack guard.
inline constexpr pte_t pte_with_prot(pte_t old, Prot prot) {
    const pte_t flags = pte_t(old & kPteFlags &
                              (prot == Prot::None ? pte_t(~0) : pte_t(~(kPteReadahead | kPteInactive | kPteGuard))));
    if (!allows(prot, Prot::Write)) return pte_t(flags | to_pte(prot));
    return pte_t((flags & ~kPteWriteTracked) | kPtePopulated | kPteDirty | kPteDirtyFile | to_pte(prot));
}

// Whether an anonymous page holds data in memory: what the resident limit counts
// (ArenaCore::resident). File pages are the kernel's page cache, which reclaims them itself.
inline constexpr bool pte_resident(pte_t v) { return (v & kPtePopulated) && !(v & (kPteSwapped | kPteFile)); }

inline constexpr int to_mmap_prot(Prot p) {
    return (allows(p, Prot::Read) ? PROT_READ : 0) | (allows(p, Prot::Write) ? PROT_WRITE : 0) |
           (allows(p, Prot::Exec) ? PROT_EXEC : 0);
}

// "rwx" as /proc/self/maps writes it, into a fixed buffer, for both worlds.
struct ProtLetters {
    char text[4];
};
inline constexpr ProtLetters prot_letters(Prot p) {
    return {{allows(p, Prot::Read) ? 'r' : '-', allows(p, Prot::Write) ? 'w' : '-', allows(p, Prot::Exec) ? 'x' : '-',
             0}};
}

// Write and exec imply read on x86-64 (without protection keys, which usermm does not use): the MMU
// lets a PROT_EXEC or PROT_WRITE page be read whatever /proc/self/maps says. Keeping the rights
// together keeps the PTE exact and makes "a read the VMA forbids" mean the same as for the kernel.
inline constexpr Prot normalize(Prot p) { return p == Prot::None ? p : (p | Prot::Read); }

}  // namespace usermm::detail
