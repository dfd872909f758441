// Per-page state, our "PTE": one byte per page of an arena, in a table the kernel itself pages in
// on demand (an untouched part of the table costs nothing, like the arena it describes).
//
// The low bits are exactly the protection the kernel currently has for the page (invariant 3:
// metadata agrees with the kernel). A fault that resolves a page sets kLocked with a CAS first, so
// that of several threads faulting the same page one resolves it and the others wait and then find
// it resolved; the new protection and the unlock are published by one release store, after the
// kernel call that made them true.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

using pte_t = std::uint8_t;
using Pte = std::atomic<pte_t>;

inline constexpr pte_t kPteProt = 0x7;   // Prot bits the kernel grants now
inline constexpr pte_t kPteLocked = 0x80;  // a fault is installing this page

inline constexpr pte_t pte_prot(pte_t v) { return v & kPteProt; }
inline constexpr pte_t to_pte(Prot p) { return pte_t(unsigned(p) & kPteProt); }
inline constexpr Prot pte_to_prot(pte_t v) { return Prot(v & kPteProt); }

inline constexpr int to_mmap_prot(Prot p) {
    return (allows(p, Prot::Read) ? PROT_READ : 0) | (allows(p, Prot::Write) ? PROT_WRITE : 0) |
           (allows(p, Prot::Exec) ? PROT_EXEC : 0);
}

// Write and exec imply read on x86-64 (without protection keys, which usermm does not use): the MMU
// lets a PROT_EXEC or PROT_WRITE page be read whatever /proc/self/maps says. Keeping the rights
// together keeps the PTE exact and makes "a read the VMA forbids" mean the same as for the kernel.
inline constexpr Prot normalize(Prot p) { return p == Prot::None ? p : (p | Prot::Read); }

}  // namespace usermm::detail
