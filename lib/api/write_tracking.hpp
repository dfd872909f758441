// The two write-tracking engines behind one interface. An engine withholds write access from a page
// whose next write usermm must see (a snapshot's copy-before-write, collect_dirty) without taking
// anything else away, and gives it back. uffd: a userfaultfd write-protect mark; the protection
// keeps Write, a write is a SIGBUS in the writing thread (do_wp_page). mprotect: the protection
// loses Write; a write is a SIGSEGV (do_upgrade_fault). The fault world's side of it is
// handle_bus_fault's test for a write-protect fault; everything else is here. collect_dirty has a
// third way on the uffd engine, outside this table: ranges whose write-protect faults the kernel
// resolves itself (dirty_async.cpp), never write-tracked in the PTEs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include <usermm/usermm.hpp>

#include "arena_ops.hpp"
#include "pte.hpp"
#include "vma.hpp"

namespace usermm::detail {

// A table of operations, as the kernel's vm_operations_struct, rather than virtual functions:
// two constant tables, no objects to construct, and nothing for a sanitizer's vptr check to read
// (which it cannot in a process out of descriptors).
struct WriteTracker {
    Engine engine;
    // Whether a reservation must be registered before its pages can be tracked (page_reserve_fixed
    // registers in the middle of making one), and registering an arena's whole reservation.
    bool registers;
    int (*enrol)(std::uintptr_t at, std::size_t len);
    // The PTE protection of a tracked page that had `prot` (with Write).
    pte_t (*armed_prot)(pte_t prot);
    // Withholds write access from pages [i, j), all of protection `prot` (with Write): 0 or errno.
    int (*arm)(ArenaCore& a, std::size_t i, std::size_t j, Prot prot);
    // Whether arming pages that are armed already costs the kernel their PTEs' rewrite, as with
    // userfaultfd. mprotect passes over a kernel VMA that has the protection already: a page bridged
    // there costs nothing in the call (a heap re-armed in one call costs a quarter of its first arming).
    bool rearm_rewrites;
    // Whether the tracked page i (PTE v) lacks write access only for tracking: the VMA allows it.
    bool (*withheld_only)(ArenaCore& a, std::size_t i, pte_t v);
    // Gives write access back to tracked pages [i, j) whose PTE protection is `prot`: 0 or errno.
    // The PTEs then have prot | Write.
    int (*disarm)(ArenaCore& a, std::size_t i, std::size_t j, Prot prot);
    // Whether a page's tracking survives a change of its protection (a userfaultfd mark outlives
    // mprotect): then a grant of write access outside a fault must clear_marks too, and
    // /proc/self/maps does not show it.
    bool marks_outlive_protect;
    int (*clear_marks)(std::uintptr_t at, std::size_t len);
    // verify(): the kernel tracks every page the PTEs say are tracked.
    void (*verify)(const ArenaCore& a, const char* call, std::span<const PageSpan> spans);
    // In a forked child, for each inherited arena: the kernel kept the protections but dropped the
    // child's userfaultfd registrations; the child tracks with the mprotect engine from now on.
    void (*after_fork)(ArenaCore& a);
};

// The engine in use (tracking_engine()).
const WriteTracker& write_tracker();

}  // namespace usermm::detail
