// From a decoded fault to a resolved page: find the VMA, check the access, then one small handler
// per kind of resolution, in the manner of mm/memory.c's handle_pte_fault and its do_* functions.
//
// Every handler is entered with the arena's read lock held and the faulting page's PTE locked
// (kPteLocked set by handle_pte_fault's CAS). The page-lock rule, stated again at each do_*: a
// handler that returns Resolved has published the page (and every neighbour it locked), which
// unlocks it; Spurious, AccessError and BusError return with every PTE it locked as it found it,
// unlocked; Fatal returns with the faulting page still locked, and with it every neighbour whose
// kernel state is in doubt (install's Unknown and CopyFailed), since the process is about to die
// (fault_entry's die_by) and no other thread may act on them meanwhile.
#include <algorithm>
#include <cerrno>
#include <signal.h>

#include "account.hpp"
#include "evict.hpp"
#include "expand_stack.hpp"
#include "fault.hpp"
#include "filemap.hpp"
#include "find_vma.hpp"
#include "map_budget.hpp"
#include "mapped_file.hpp"
#include "page_ops.hpp"
#include "snapshot.hpp"
#include "swap_ops.hpp"

namespace usermm::detail {

namespace {

constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kRelaxed = std::memory_order_relaxed;

// The rights an access needs from the page.
Prot needed(Access a) {
    switch (a) {
        case Access::Write:
            return Prot::Read | Prot::Write;
        case Access::Exec:
            return Prot::Exec;
        default:
            return Prot::Read;
    }
}

// What a fault grants: a write gets everything the VMA allows; a read or an instruction fetch
// everything but write, so that the first write to the page is still seen (the kernel maps its
// zero page read-only for the same reason).
Prot grant_for(Access a, Prot vma_prot) {
    return a == Access::Write ? vma_prot : (vma_prot & ~Prot::Write);
}

// When the hardware did not say which access faulted: the weakest right the page lacks and the VMA
// has. Guessing low is safe: if the access needed more, it faults again and the guess moves up.
Access infer_access(pte_t cur, Prot vma_prot) {
    const Prot have = pte_to_prot(cur);
    if (!allows(have, Prot::Read)) return Access::Read;
    if (allows(vma_prot, Prot::Write) && !allows(have, Prot::Write)) return Access::Write;
    if (allows(vma_prot, Prot::Exec) && !allows(have, Prot::Exec)) return Access::Exec;
    // The page has everything the VMA allows, so the access was one the VMA forbids (or none, if
    // the VMA allows everything and another thread resolved the page meanwhile).
    if (!allows(vma_prot, Prot::Write)) return Access::Write;
    if (!allows(vma_prot, Prot::Exec)) return Access::Exec;
    return Access::Read;
}

const char* access_name(Access a) {
    switch (a) {
        case Access::Read:
            return "read";
        case Access::Write:
            return "write";
        case Access::Exec:
            return "exec";
        default:
            return "access";
    }
}

struct PageRange {
    std::size_t first;  // page indices in the arena, [first, last)
    std::size_t last;
};

// Publishes `prot` for the locked range: the kernel already has it, so the PTEs may say so. File
// pages read ahead that become accessible here count as readahead hits. In an arena with a store,
// a page given write access loses its store copy before anyone can write it (else an eviction
// could drop the write, taking the copy for current), and its cluster counts as used.
void publish(vm_fault& vmf, PageRange r, Prot prot) {
    ArenaCore& arena = *vmf.arena;
    const bool file = vmf.vma->kind() != VmaKind::Anonymous;
    for (std::size_t i = r.first; i < r.last; ++i) {
        const pte_t old = pte_t(arena.pte[i].load(kRelaxed) & ~kPteLocked);
        // A page read ahead (from the file, or from the store) that becomes accessible is a hit,
        // whichever fault grants it (a hinting fault may, if the reclaimer deactivated it first).
        const bool hit = (old & kPteReadahead) && pte_prot(old) == 0 && prot != Prot::None;
        vmf.readahead_hits += file && hit;
        vmf.swap_hits += !file && hit;
        const pte_t now = pte_with_prot(old, prot);
        if (arena.swap) {
            if (const std::uint64_t held = allows(prot, Prot::Write) ? swap_take_copy(*arena.swap, i) : 0) {
                if (vmf.stale_count == std::size(vmf.stale_slots)) {  // rare: a degraded grant over many
                    swap_release_slots(*arena.swap, vmf.stale_slots, vmf.stale_count);
                    vmf.stale_count = 0;
                }
                vmf.stale_slots[vmf.stale_count++] = held - 1;
            }
            if (i == r.first || i % kClusterPages == 0) swap_note_use(*arena.swap, i);
        }
        arena.note_resident(old, now);
        arena.pte[i].store(now, kRelease);
    }
    if (allows(prot, Prot::Write)) arena.note_changed(r.first, r.last);
}

// Unlocks PTEs of the range as they were.
void unlock_unchanged(ArenaCore& arena, PageRange r) {
    for (std::size_t i = r.first; i < r.last; ++i) arena.pte[i].fetch_and(pte_t(~kPteLocked), kRelease);
}

// Extends a locked range over neighbours whose PTE is exactly `state` (but for bits in `ignore`,
// which stay as they are) and that `ready(page)` allows, locking each, without crossing `limit`.
// Stops at the first page another thread holds or that is in another state.
template <typename Ready>
PageRange lock_neighbours(ArenaCore& arena, PageRange r, PageRange limit, pte_t state, Ready ready, pte_t ignore = 0) {
    auto lock = [&](std::size_t i) {
        if (!ready(i)) return false;
        pte_t v = arena.pte[i].load(kRelaxed);
        if ((v & ~ignore) != state) return false;
        return arena.pte[i].compare_exchange_strong(v, pte_t(v | kPteLocked), kAcquire, kRelaxed);
    };
    while (r.first > limit.first && lock(r.first - 1)) --r.first;
    while (r.last < limit.last && lock(r.last)) ++r.last;
    return r;
}

constexpr auto any_page = [](std::size_t) { return true; };

PageRange vma_pages(const ArenaCore& arena, const Vma& vma) {
    return {arena.page_index(vma.start), arena.page_index(vma.end)};
}

// The fault-around window of `window` pages around the faulting page, as arena page indices.
// Aligned in the address space, like the kernel's, not relative to the arena: it may begin before
// the arena's first page (then it is cut at page 0).
PageRange around_pages(const vm_fault& vmf, std::size_t window) {
    const std::size_t page = vmf.arena->page_index(vmf.address);
    const std::size_t into = (vmf.address >> g_page_shift) % window;
    return {page >= into ? page - into : 0, page - into + window};
}

PageRange clamp(PageRange r, PageRange limit) {
    return {std::max(r.first, limit.first), std::min(r.last, limit.last)};
}

enum class Budget : std::uint8_t { Enforce, Exceed };

// What install() did with its locked range. Only Done publishes the range (and so unlocks
// it); every other answer leaves all of it locked, in the state it was locked from, for the caller
// to unlock (the refusals) or to keep locked on its way to death (Unknown, CopyFailed).
struct InstallResult {
    enum What : std::uint8_t {
        Done,        // the kernel has the protection, the PTEs say so
        OverBudget,  // the change would take the arena past its map budget; the kernel was not asked
        Refused,     // the kernel refused with `err` (ENOMEM: no mapping to spare), and nothing changed
        DataLimit,   // the kernel refused write access for RLIMIT_DATA, and nothing changed
        Unknown,     // the kernel refused, and so did undoing its partial change: fatal
        CopyFailed,  // a snapshot could not take a page's old content (diagnosed already): fatal
    } what;
    int err = 0;
    bool fatal() const { return what == Unknown || what == CopyFailed; }
};

FaultResult fatal(vm_fault& vmf, const char* what, int err);

// Gives the locked range `prot` in the kernel and publishes it. All of the range was locked from
// PTE value `was`. Counting the kernel VMAs the change makes, making it and publishing it happen
// under the arena's install lock: two neighbouring faults counting at once would both count the
// boundary between them. The kernel serialises mprotect on its mmap_lock anyway.
//
// mprotect is not all-or-nothing: across several kernel VMAs it can change a prefix of the range
// and then fail (ENOMEM at vm.max_map_count). A refusal is therefore undone by putting the whole
// range back to `was`, so that the PTEs stay what the kernel has.
InstallResult install(vm_fault& vmf, PageRange r, Prot prot, pte_t was, Budget budget) {
    ArenaCore& arena = *vmf.arena;
    const std::uintptr_t addr = arena.page_addr(r.first);
    const std::size_t len = (r.last - r.first) << g_page_shift;
    // Nobody can write the locked pages yet; snapshots take what they need before anyone can.
    if (allows(prot, Prot::Write) && arena.snapshot_count)
        for (std::size_t i = r.first; i < r.last; ++i)
            if (const int err = preserve_for_snapshots(arena, i, arena.pte[i].load(kRelaxed), &vmf.copies)) {
                fatal(vmf, "reading the page for a snapshot", err);
                return {InstallResult::CopyFailed};
            }
    std::lock_guard guard(arena.install_lock);
    const long delta = map_count_delta(arena, r.first, r.last, prot);
    if (budget == Budget::Exceed)
        map_budget_charge(arena, delta);
    else if (!map_budget_try_charge(arena, delta))
        return {InstallResult::OverBudget};
    if (const int err = page_protect(addr, len, prot)) {
        map_budget_charge(arena, -delta);
        // ENOMEM: either RLIMIT_DATA, which counts the private memory granted write access, or
        // no mapping to spare (vm.max_map_count, with the program's own mappings): then usermm
        // holds no more than it does now, so that later faults degrade without asking.
        std::uint64_t data_limit = 0;
        InstallResult why{InstallResult::Refused, err};
        if (err == ENOMEM && allows(prot, Prot::Write) && data_limit_reached(len, &data_limit))
            why = {InstallResult::DataLimit, err};
        else if (err == ENOMEM)
            map_budget_refused();
        return page_protect(addr, len, pte_to_prot(was)) == 0 ? why : InstallResult{InstallResult::Unknown, err};
    }
    publish(vmf, r, prot);
    vmf.pages = std::uint32_t(std::min<std::size_t>(r.last - r.first, UINT32_MAX));
    return {InstallResult::Done};
}

// Shared file pages of the locked range that write access `prot` would make dirty: those not dirty
// yet. Counted (vm_fault::dirtied) by the handler that grants the write, once it is installed.
std::uint32_t pages_to_dirty(const vm_fault& vmf, PageRange r, Prot prot) {
    if (!allows(prot, Prot::Write) || vmf.vma->kind() != VmaKind::FileShared) return 0;
    std::uint32_t n = 0;
    for (std::size_t i = r.first; i < r.last; ++i) n += !(vmf.arena->pte[i].load(kRelaxed) & kPteDirtyFile);
    return n;
}

// Gives up on a fault usermm owns; the caller leaves its PTEs locked by the page-lock rule.
FaultResult fatal(vm_fault& vmf, const char* what, int err) {
    if (vmf.diag) {
        vmf.diag->str("usermm: cannot resolve ").str(access_name(vmf.access)).str(" fault at ").hex(vmf.address);
        vmf.diag->str(": ").str(what);
        if (err > 0) vmf.diag->str(" failed with errno ").dec(std::uint64_t(err));
    }
    return FaultResult::Fatal;
}

// Write access to pages [r.first, r.last) would take the process past RLIMIT_DATA, which the
// kernel applies at mmap (refusing the mapping) and usermm only when it grants write access.
FaultResult data_limit_fatal(vm_fault& vmf, PageRange r) {
    if (!vmf.diag) return FaultResult::Fatal;
    std::uint64_t limit = 0;
    data_limit_reached(0, &limit);
    RawLine& d = *vmf.diag;
    d.str("usermm: cannot resolve ").str(access_name(vmf.access)).str(" fault at ").hex(vmf.address);
    d.str(": RLIMIT_DATA (").dec(limit).str(" bytes) is reached; the kernel refused write access to [");
    d.hex(vmf.arena->page_addr(r.first)).str(", ").hex(vmf.arena->page_addr(r.last)).str(") in VMA '");
    d.str(vmf.vma->name).str("'");
    return FaultResult::Fatal;
}

// The range stays locked (see InstallResult).
FaultResult install_failed(vm_fault& vmf, InstallResult done) {
    if (done.what == InstallResult::CopyFailed) return FaultResult::Fatal;
    return done.what == InstallResult::Unknown ? fatal(vmf, "mprotect (and undoing its partial change)", done.err)
                                           : fatal(vmf, "mprotect", done.err);
}

// Even the degraded change would split a mapping, past the budget or past vm.max_map_count (which
// the program's own mappings count against too: then the kernel refused it). A change of a whole
// kernel mapping splits nothing, so the kernel does not refuse it for the count: what the access
// needs goes to every page of the kernel mapping around the fault (all have the faulting page's
// protection and backing, whatever else their states say), as far as the VMA reaches.
// Only if the mapping reaches beyond the VMA does the kernel have to split, and may refuse: then
// nothing can be done.
//
// Entered with the faulting page locked from state `cur` and its neighbours unlocked; returns by
// the page-lock rule at the top of this file.
FaultResult do_merging_fault(vm_fault& vmf, pte_t cur) {
    ArenaCore& arena = *vmf.arena;
    const Vma& vma = *vmf.vma;
    const std::size_t page = arena.page_index(vmf.address);
    const pte_t kind = cur & (kPteProt | kPteFile);
    bool busy = false;  // the mapping goes on into a page another fault holds
    auto lock = [&](std::size_t i) {
        for (pte_t v = arena.pte[i].load(kRelaxed);;) {
            // Its saved or swapped-out content goes back at its own fault first; a stack's guard
            // page (PROT_NONE in the fallback) is expand_stack's.
            if (v & (kPteSaved | kPteSwapped | kPteGuard)) return false;
            if (v & kPteLocked) {
                busy = (v & (kPteProt | kPteFile)) == kind;
                return false;
            }
            if ((v & (kPteProt | kPteFile)) != kind) return false;
            if (arena.pte[i].compare_exchange_weak(v, pte_t(v | kPteLocked), kAcquire, kRelaxed)) return true;
        }
    };
    // A page with an edge mark begins a kernel mapping: the run stops before it, or at it.
    const PageRange limit = vma_pages(arena, vma);
    PageRange run{page, page + 1};
    while (run.first > limit.first && !(arena.pte[run.first].load(kRelaxed) & kPteEdge) && lock(run.first - 1))
        --run.first;
    while (run.last < limit.last && !(arena.pte[run.last].load(kRelaxed) & kPteEdge) && lock(run.last)) ++run.last;
    // What the access needs, as a fault grants it: the run may be large, and write access to it
    // would have live snapshots take every page of it first, and count against RLIMIT_DATA.
    const Prot prot = grant_for(vmf.access, vma.prot) | pte_to_prot(cur);  // the run's pages all have cur's
    const std::uint32_t dirtied = pages_to_dirty(vmf, run, prot);
    const InstallResult done = install(vmf, run, prot, cur, Budget::Exceed);
    if (done.what == InstallResult::Done) {
        vmf.kind = FaultKind::Degraded;
        vmf.dirtied += dirtied;
        return FaultResult::Resolved;
    }
    if (done.fatal()) return install_failed(vmf, done);
    if (done.what == InstallResult::DataLimit) {
        unlock_unchanged(arena, {run.first, page});
        unlock_unchanged(arena, {page + 1, run.last});
        return data_limit_fatal(vmf, {page, page + 1});
    }
    unlock_unchanged(arena, {run.first, page});
    unlock_unchanged(arena, {page + 1, run.last});
    const bool enomem = done.what == InstallResult::Refused && done.err == ENOMEM;
    if (enomem && busy) {
        unlock_unchanged(arena, {page, page + 1});
        return FaultResult::Spurious;  // the access faults again, after the other fault
    }
    if (!enomem || !vmf.diag) return install_failed(vmf, done);
    RawLine& d = *vmf.diag;
    d.str("usermm: cannot resolve ").str(access_name(vmf.access)).str(" fault at ").hex(vmf.address);
    d.str(": vm.max_map_count (").dec(std::uint64_t(map_budget_max_map_count()));
    d.str(") is reached; the kernel refused to split a mapping in VMA '").str(vma.name).str("' [").hex(vma.start);
    d.str(", ").hex(vma.end).str(")");
    return FaultResult::Fatal;
}

// The kernel's mapping budget is spent: resolve the fault by granting the VMA's full protection to
// the whole run of pages around the fault that are in the same state as the faulting page. The
// run's neighbours are in other states, so the change merges kernel VMAs (or keeps their number)
// instead of splitting them; the price is that the kernel, not usermm, sees the first touch of the
// other pages of the run. Stats say how often this happened (degraded_faults, degraded_pages).
// Neighbours in another state may share the run's kernel mapping, though (pages restored or
// discarded hold flags untouched ones lack): if the split that then takes does not fit the budget,
// or the kernel refuses it, the whole mapping is granted (do_merging_fault).
//
// Entered with the faulting page locked from state `cur` and its neighbours unlocked; returns by
// the page-lock rule at the top of this file.
FaultResult do_degraded_fault(vm_fault& vmf, pte_t cur) {
    ArenaCore& arena = *vmf.arena;
    const std::size_t page = arena.page_index(vmf.address);
    const PageRange run = lock_neighbours(arena, {page, page + 1}, vma_pages(arena, *vmf.vma), cur, any_page);
    // A shared file page given write access counts as dirty: a read grants no write there.
    const Vma& vma = *vmf.vma;
    // What the page has stays (an instruction fetch from a writable page keeps Write).
    const Prot prot = (vma.kind() == VmaKind::FileShared ? grant_for(vmf.access, vma.prot) : vma.prot) | pte_to_prot(cur);
    std::uint32_t dirtied = pages_to_dirty(vmf, run, prot);
    InstallResult done = install(vmf, run, prot, cur, Budget::Enforce);
    // Past RLIMIT_DATA a read still gets its pages, without write access (which is not counted).
    if (done.what == InstallResult::DataLimit && vmf.access != Access::Write) {
        dirtied = 0;
        done = install(vmf, run, prot & ~Prot::Write, cur, Budget::Enforce);
    }
    if (done.what == InstallResult::Done) {
        vmf.kind = FaultKind::Degraded;
        vmf.dirtied += dirtied;
        return FaultResult::Resolved;
    }
    if (done.fatal()) return install_failed(vmf, done);
    unlock_unchanged(arena, {run.first, page});
    unlock_unchanged(arena, {page + 1, run.last});
    if (done.what == InstallResult::DataLimit) return data_limit_fatal(vmf, {page, page + 1});
    if (done.what == InstallResult::OverBudget || done.err == ENOMEM) return do_merging_fault(vmf, cur);
    return install_failed(vmf, done);
}

// Resolves `r` (all locked from `cur`) with `prot` within the map budget, else falls back: to the
// faulting page alone, then to the degraded path. Returns by the page-lock rule at the top of this
// file (a fall-back first unlocks the neighbours of `r` as found).
FaultResult install_or_degrade(vm_fault& vmf, PageRange r, Prot prot, pte_t cur, FaultKind kind) {
    ArenaCore& arena = *vmf.arena;
    const std::size_t page = arena.page_index(vmf.address);
    for (;;) {
        const InstallResult done = install(vmf, r, prot, cur, Budget::Enforce);
        if (done.what == InstallResult::Done) {
            vmf.kind = kind;
            return FaultResult::Resolved;
        }
        if (done.fatal()) return install_failed(vmf, done);
        unlock_unchanged(arena, {r.first, page});
        unlock_unchanged(arena, {page + 1, r.last});
        // Past RLIMIT_DATA only the faulting page is tried; a degraded run would ask for more.
        if (r.last - r.first == 1)
            return done.what == InstallResult::DataLimit ? data_limit_fatal(vmf, r) : do_degraded_fault(vmf, cur);
        r = {page, page + 1};
    }
}

// Past this many kernel VMAs in an arena, a fault-around window reaches further (see below): fork()
// copies every kernel VMA and a snapshot re-arms each separately, so a sparse heap of isolated
// windows (tens of thousands of VMAs) costs several times a plain heap's fork, and arming pays
// a TLB shootdown per window.
constexpr long kReachAboveMaps = 1024;
// How far: a heap of random 64-byte records in 8 GiB (one per 26 pages, perf/bench_pause) is 57,340
// kernel VMAs with 16-page windows alone, 5,900 with a reach of 64 pages, 1,080 with 128 (most of
// them made before the arena passed kReachAboveMaps). Untouched pages granted cost the kernel
// nothing until touched.
constexpr std::size_t kReachPages = 128;

// Extends a locked fault-around window over the untouched pages that separate it from a page of
// the VMA already granted `prot`, within kReachPages on each side, so that the grant joins its
// neighbour's kernel VMA instead of splitting a new one out of the PROT_NONE between them. The
// pages reached are fault-around neighbours like the window's own: the kernel sees their first
// touch. A side that reaches no such page is given back.
PageRange reach_granted_neighbours(vm_fault& vmf, PageRange r, Prot prot) {
    ArenaCore& arena = *vmf.arena;
    const PageRange vma = vma_pages(arena, *vmf.vma);
    const PageRange limit{r.first - std::min(r.first - vma.first, kReachPages), std::min(vma.last, r.last + kReachPages)};
    PageRange wide = lock_neighbours(arena, r, limit, 0, any_page);
    auto granted = [&](std::size_t i) { return pte_prot(arena.pte[i].load(kRelaxed)) == to_pte(prot); };
    if (wide.first < r.first && !(wide.first > vma.first && granted(wide.first - 1))) {
        unlock_unchanged(arena, {wide.first, r.first});
        wide.first = r.first;
    }
    if (wide.last > r.last && !(wide.last < vma.last && granted(wide.last))) {
        unlock_unchanged(arena, {r.last, wide.last});
        wide.last = r.last;
    }
    return wide;
}

// The first access to an untouched page of an anonymous VMA (the kernel's do_anonymous_page): a
// read makes it readable, so the kernel maps its shared zero page and commits nothing; a write
// makes it writable, so the kernel gives it a zeroed private page. Fault-around grants the same to
// the untouched pages of the aligned window around the fault, in the same mprotect. A page that
// is PROT_NONE with its content kept (restore() wrote it back) is granted the same way, but its
// read is no zero-page read. Entered with the page locked from `cur` (prot 0); returns by the
// page-lock rule.
FaultResult do_anonymous_fault(vm_fault& vmf, pte_t cur) {
    vmf.had_data = cur & kPtePopulated;
    ArenaCore& arena = *vmf.arena;
    const Vma& vma = *vmf.vma;
    const std::size_t page = arena.page_index(vmf.address);
    const Prot prot = grant_for(vmf.access, vma.prot);

    PageRange r{page, page + 1};
    // With a resident limit, a write's fault-around counts its whole window as resident, which the
    // kernel fills only as it is written: an overcount, corrected when reclaim finds the untouched
    // pages zero and drops them without I/O. Near the limit it would make reclaim run early, so
    // there a write grants only its page.
    const std::size_t window = vma.fault_around_pages;
    const std::uint64_t resident_limit = arena.swap ? arena.swap->limit.load(kRelaxed) : 0;
    const bool room = !resident_limit || arena.resident.load(kRelaxed) + std::int64_t(window) <=
                                             std::int64_t(resident_limit - resident_limit / 4);
    if (window > 1 && (vmf.access != Access::Write || room)) {
        const PageRange limit = clamp(around_pages(vmf, window), vma_pages(arena, vma));
        r = lock_neighbours(arena, r, limit, 0, any_page);
        if (arena.kernel_maps.load(kRelaxed) > kReachAboveMaps) r = reach_granted_neighbours(vmf, r, prot);
    }
    return install_or_degrade(vmf, r, prot, 0, FaultKind::Anonymous);
}

// The page is mapped, with fewer rights than the access needs and the VMA allows: a write to a page
// that was read first (the kernel's do_wp_page breaking its zero page into a private one), or an
// instruction fetch from a page so far only read. Entered with the page locked from `cur`;
// returns by the page-lock rule.
FaultResult do_upgrade_fault(vm_fault& vmf, pte_t cur) {
    const Prot prot = pte_to_prot(cur) | grant_for(vmf.access, vmf.vma->prot);
    const std::size_t page = vmf.arena->page_index(vmf.address);
    // An instruction fetch from a shared file page that prefault made writable without a write:
    // the grant keeps Write, and so makes the page dirty (pte_with_prot) like any write grant.
    const std::uint32_t dirtied = pages_to_dirty(vmf, {page, page + 1}, prot);
    const FaultResult r = install_or_degrade(vmf, {page, page + 1}, prot, cur, FaultKind::Upgrade);
    if (r == FaultResult::Resolved && vmf.kind == FaultKind::Upgrade) vmf.dirtied += dirtied;
    return r;
}

// --- swap: the kernel's do_swap_page, and the faults that tell the reclaimer what is used ------

// Locks the pages around `page` in the cluster and VMA, unlocked, that `fits` accepts.
template <typename Fits>
PageRange lock_in_cluster(ArenaCore& arena, std::size_t page, PageRange vma, bool backwards, Fits fits) {
    const std::size_t first = page / kClusterPages * kClusterPages;
    const PageRange limit = clamp({first, first + kClusterPages}, vma);
    auto lock = [&](std::size_t i) {
        pte_t v = arena.pte[i].load(kRelaxed);
        return !(v & kPteLocked) && fits(v) &&
               arena.pte[i].compare_exchange_strong(v, pte_t(v | kPteLocked), kAcquire, kRelaxed);
    };
    PageRange r{page, page + 1};
    while (backwards && r.first > limit.first && lock(r.first - 1)) --r.first;
    while (r.last < limit.last && lock(r.last)) ++r.last;
    return r;
}

// The store could not give the faulting page back: SIGBUS, as the kernel's swap-in error is. The
// locked range goes back as it was.
FaultResult swap_bus_error(vm_fault& vmf, PageRange r, std::uint64_t slot, int err) {
    unlock_unchanged(*vmf.arena, r);
    if (vmf.diag) {
        RawLine& d = *vmf.diag;
        d.str("usermm: SIGBUS: ").str(access_name(vmf.access)).str(" at ").hex(vmf.address).str(" in VMA '");
        d.str(vmf.vma->name).str("' of arena [").hex(vmf.arena->base).str(", ").hex(vmf.arena->end);
        d.str("): reading the swapped-out page from the store (slot ").dec(slot).str(") failed with errno ");
        d.dec(std::uint64_t(err));
    }
    return FaultResult::BusError;
}

// A touch of a swapped-out page (the kernel's do_swap_page): the page is read from the store into
// a buffer, written into the arena while it is still PROT_NONE (UFFDIO_COPY, or /proc/self/mem),
// and only then made readable: no thread sees a torn or zero page. A read keeps the store copy, so the page
// stays clean until a write (a minor fault: do_upgrade_fault, which drops the copy). Swap readahead:
// a reader that swaps in the page after the previous swap-in gets the swapped pages after it in the
// cluster too, in the same store batch, a window that doubles up to the cluster; they stay PROT_NONE
// with a readahead mark until touched (do_kept_run_fault counts the hit). Major. Entered with the
// page locked from `cur`; returns by the page-lock rule.
FaultResult do_swap_page(vm_fault& vmf, pte_t cur) {
    ArenaCore& arena = *vmf.arena;
    ArenaSwap& s = *arena.swap;
    const std::size_t page = arena.page_index(vmf.address);
    // Sequential: at or just past where the last swap-in's readahead ended (pages in between may
    // be in memory still, and need no read).
    const std::uint64_t next = s.ra_next.load(kRelaxed);
    const bool sequential = page >= next && page - next < kClusterPages;
    const std::size_t window = sequential ? std::min<std::size_t>(kClusterPages, 2 * s.ra_window.load(kRelaxed)) : 1;
    s.ra_window.store(std::uint32_t(window), kRelaxed);
    // Each page swapped in alone is a readable island in PROT_NONE memory: two kernel mappings.
    // Past half the map budget the whole cluster comes in and is granted at once, so that the
    // islands are no more than the clusters in memory (the resident limit bounds those).
    const bool whole = map_budget_used() > map_budget_limit() / 2;
    const PageRange vma = vma_pages(arena, *vmf.vma);
    const PageRange limit = whole ? vma : PageRange{vma.first, std::min(vma.last, page + window)};
    PageRange r = lock_in_cluster(arena, page, limit, whole, [](pte_t v) { return (v & kPteSwapped) != 0; });
    std::byte* buffer = swap_claim_buffer(s);
    // The batch starts with the faulting page, then its readahead in order: a store that reads in
    // the order given (one pipeline to a server) answers the page the program waits for first.
    const std::size_t at = page - r.first, count = r.last - r.first;
    PageIo ordered[kClusterPages];
    for (std::size_t k = 0; k < count; ++k) {
        const std::size_t i = r.first + (at + k) % count;
        ordered[k] = {s.slots[i].load(kRelaxed) - 1, buffer + ((i - r.first) << g_page_shift), 0};
    }
    swap_store_read(s, ordered, count);
    // Page j of the run (from r.first) is ordered[(j - at) mod count]; one array only, since this
    // runs on the alternate signal stack.
    const auto failed = [&](std::size_t j) { return ordered[(j + count - at) % count].error; };
    if (ordered[0].error) {
        swap_release_buffer(s, buffer);
        return swap_bus_error(vmf, r, ordered[0].slot, ordered[0].error);
    }
    // The others are read ahead: the run shrinks to the pages around the faulting one the store gave.
    std::size_t lo = at, hi = at + 1;
    while (lo > 0 && !failed(lo - 1)) --lo;
    while (hi < count && !failed(hi)) ++hi;
    unlock_unchanged(arena, {r.first, r.first + lo});
    unlock_unchanged(arena, {r.first + hi, r.last});
    const std::size_t read = hi - lo;
    buffer += lo << g_page_shift;
    r = {r.first + lo, r.first + hi};
    std::byte* const claimed = buffer - (lo << g_page_shift);
    // On the uffd engine the arena is registered with userfaultfd: UFFDIO_COPY fills the empty
    // pages without the kernel zeroing them first; /proc/self/mem where it cannot.
    const std::uintptr_t at_addr = arena.page_addr(r.first);
    if (tracking_engine() != TrackingEngine::Uffd || uffd_copy(at_addr, buffer, read << g_page_shift) != 0)
        if (const int err = page_write_raw(at_addr, buffer, read << g_page_shift)) {
            swap_release_buffer(s, claimed);
            return fatal(vmf, "writing the swapped-in page into the arena (/proc/self/mem)", err);
        }
    swap_release_buffer(s, claimed);
    // In memory now, still PROT_NONE: the state a kept page has, so a degraded grant may take it.
    for (std::size_t i = r.first; i < r.last; ++i) {
        const pte_t v = arena.pte[i].load(kRelaxed);
        const pte_t now = pte_t((v & ~kPteSwapped) | (i == page || whole ? 0 : kPteReadahead));
        arena.note_resident(pte_t(v & ~kPteLocked), pte_t(now & ~kPteLocked));
        arena.pte[i].store(now, kRelaxed);
    }
    s.ra_next.store(r.last, kRelaxed);
    vmf.major = true;
    vmf.swapped_in = std::uint32_t(read);
    if (whole) {  // mapped at once: read ahead and used, as a file fault's window counts
        vmf.swap_hits = std::uint32_t(read - 1);
        return install_or_degrade(vmf, r, grant_for(Access::Read, vmf.vma->prot), pte_t(cur & ~kPteSwapped),
                                  FaultKind::Swap);
    }
    unlock_unchanged(arena, {page + 1, r.last});  // read ahead, not granted
    return install_or_degrade(vmf, {page, page + 1}, grant_for(Access::Read, vmf.vma->prot), pte_t(cur & ~kPteSwapped),
                              FaultKind::Swap);
}

// A touch of a page whose content is in memory behind PROT_NONE that the reclaimer or swap
// readahead put there: `mark` is kPteInactive (the reclaimer made the cluster inaccessible to see
// whether it is still used: a hinting fault, which tells it so) or kPteReadahead (read ahead from
// the store: a readahead hit). A read gets every page of the cluster with the same mark back, read
// only, in one change (the kernel's mappings stay as few as before); a write gets its page. Minor.
// Entered with the page locked from `cur`; returns by the page-lock rule.
FaultResult do_kept_run_fault(vm_fault& vmf, pte_t cur, pte_t mark) {
    ArenaCore& arena = *vmf.arena;
    const std::size_t page = arena.page_index(vmf.address);
    const bool write = vmf.access == Access::Write;
    const PageRange r = write ? PageRange{page, page + 1}
                              : lock_in_cluster(arena, page, vma_pages(arena, *vmf.vma), true, [mark](pte_t v) {
                                    return (v & mark) && pte_prot(v) == 0 && !(v & kPteSwapped);
                                });
    const Prot prot = write ? vmf.vma->prot : grant_for(Access::Read, vmf.vma->prot);
    const FaultKind kind = mark == kPteInactive ? FaultKind::Hinting : FaultKind::SwapReadahead;
    return install_or_degrade(vmf, r, prot, cur, kind);
}

// --- file VMAs: the kernel's do_read_fault, do_cow_fault and do_shared_fault ------------------
//
// The VMA's kernel mapping is the file: the kernel reads a page when the program touches it after
// usermm granted access, so no usermm lock is held across the I/O. usermm decides the window,
// starts its readahead, and counts a fault major when its page was not in the page cache.

// The fault cannot be given the page's content: the program gets SIGBUS, as from the kernel.
// The faulting page's PTE goes back to `cur`.
FaultResult file_bus_error(vm_fault& vmf, pte_t cur, const char* what, std::uint64_t offset, int err) {
    vmf.arena->pte_of(vmf.address).store(cur, kRelease);
    if (vmf.diag) {
        RawLine& d = *vmf.diag;
        d.str("usermm: SIGBUS: ").str(access_name(vmf.access)).str(" at ").hex(vmf.address).str(" in VMA '");
        d.str(vmf.vma->name).str("': ").str(what).str(" '").str(vmf.vma->file->path).str("' at offset ").hex(offset);
        if (err) d.str(" failed with errno ").dec(std::uint64_t(err));
    }
    return FaultResult::BusError;
}

// What the page cache holds of the pages a fault looks at, asked once per fault.
struct CacheProbe {
    std::size_t first = 0;  // arena page indices [first, last)
    std::size_t last = 0;
    bool known = false;  // if mincore failed, every page counts as cached (minor)
    unsigned char vec[kFileProbePages];
    void ask(const ArenaCore& arena, PageRange r) {
        first = r.first;
        last = std::min(r.last, r.first + kFileProbePages);
        known = filemap_probe(arena.page_addr(first), last - first, vec) == 0;
    }
    bool cached(std::size_t i) const { return !known || i < first || i >= last || (vec[i - first] & 1); }
};

// The bytes of file page f that the file holds (all but the part of a last page past the end).
std::uint64_t page_bytes(const vm_fault& vmf, std::uint64_t f) {
    const std::uint64_t at = f << g_page_shift;
    return at >= vmf.file_size ? 0 : std::min<std::uint64_t>(g_page_size, vmf.file_size - at);
}

// A read of a page the VMA has not mapped: the page and its window become readable (not writable,
// so that a write is still seen). The window is the readahead window (readahead_window: it grows
// with a sequential reader, up to readahead_pages), or the fault-around window around the page,
// whichever is larger; the kernel reads the pages its page cache lacks when the program touches
// them, with its own readahead (which the VMA's advice sets: MADV_RANDOM reads the page alone), so
// usermm holds no lock across the I/O and adds no system call to it. With Random advice, or once
// faults out of sequence keep missing what was mapped around earlier ones, only pages the cache
// holds are mapped around the faulting one: a page mapped is one the kernel need not read, or the
// program's own. The fault is major if the page cache lacked its page; the pages of the window it
// lacked count as read (the faulting page's fault-around and readahead), each once per VMA: only
// the fault that locks a page counts it. Entered with the page locked from `cur` (prot 0); returns
// by the page-lock rule.
FaultResult do_read_fault(vm_fault& vmf, pte_t cur) {
    ArenaCore& arena = *vmf.arena;
    Vma& vma = *vmf.vma;
    const std::size_t page = arena.page_index(vmf.address);
    const std::uint64_t f = vma.file_page(vmf.address);
    auto file_of = [&](std::size_t i) { return i >= page ? f + (i - page) : f - (page - i); };
    auto page_of = [&](std::uint64_t x) { return x >= f ? page + std::size_t(x - f) : page - std::size_t(f - x); };
    const std::size_t window = std::clamp<std::size_t>(vma.fault_around_pages, 1, kFileProbePages / 2);
    const PageRange vma_r = vma_pages(arena, vma);
    const PageRange valid{vma_r.first, std::min<std::size_t>(vma_r.last, page_of(vmf.file_eof))};
    const PageRange around = clamp(around_pages(vmf, window), valid);
    const FileRange ra = readahead_window(vma, f, {file_of(around.first), file_of(around.last)}, vmf.file_eof);
    PageRange grant{std::min(around.first, page_of(ra.first)), std::max(around.last, page_of(ra.last))};
    grant = clamp(grant, {page >= kFileProbePages / 2 ? page - kFileProbePages / 2 : 0, page + kFileProbePages / 2});

    CacheProbe probe;
    probe.ask(arena, grant);
    const bool cached = probe.cached(page) || (cur & kPteReadahead);
    const std::uint64_t next = vma.ra_next.load(kRelaxed);
    if (!cached && f != next && vma.ra_misses.load(kRelaxed) < 10 * kReadaroundMisses)
        vma.ra_misses.fetch_add(1, kRelaxed);
    else if (const std::uint32_t misses = vma.ra_misses.load(kRelaxed); cached && misses)
        vma.ra_misses.store(misses - 1, kRelaxed);  // racy on purpose: a heuristic, like the kernel's
    readahead_update(vma, {file_of(std::max(grant.first, page)), file_of(grant.last)});

    const bool only_cached = ra.last - ra.first == 1;  // Random, or a random reader
    auto ready = [&](std::size_t i) {
        return !only_cached || probe.cached(i) || (arena.pte[i].load(kRelaxed) & kPteReadahead);
    };
    const PageRange r = lock_neighbours(arena, {page, page + 1}, grant, pte_t(cur & ~kPteReadahead), ready, kPteReadahead);
    for (std::size_t i = r.first; i < r.last; ++i) {
        if (probe.cached(i) || (arena.pte[i].load(kRelaxed) & kPteReadahead)) continue;
        ++vmf.read_pages;
        vmf.read_bytes += page_bytes(vmf, file_of(i));
        if (i != page) {
            ++vmf.readahead_pages;
            ++vmf.readahead_hits;  // read ahead and mapped at once
        }
    }
    vmf.major = !cached;
    return install_or_degrade(vmf, r, grant_for(Access::Read, vma.prot), cur, FaultKind::File);
}

// The first access to a page is a write: whether the kernel must read the page first.
void probe_written_page(vm_fault& vmf) {
    CacheProbe probe;
    const std::size_t page = vmf.arena->page_index(vmf.address);
    probe.ask(*vmf.arena, {page, page + 1});
    vmf.major = !probe.cached(page) && !(vmf.arena->pte[page].load(kRelaxed) & kPteReadahead);
    vmf.read_pages += vmf.major;
    if (vmf.major) vmf.read_bytes += page_bytes(vmf, vmf.vma->file_page(vmf.address));
}

// A write to a page of a private file VMA (untouched, or mapped read-only so far): it becomes
// writable, and the kernel copies the page cache's page into the VMA's own at the write itself;
// the file and other VMAs never see it. Entered with the page locked from `cur`; returns by the
// page-lock rule.
FaultResult do_cow_fault(vm_fault& vmf, pte_t cur) {
    if (pte_prot(cur) == 0) probe_written_page(vmf);
    const std::size_t page = vmf.arena->page_index(vmf.address);
    return install_or_degrade(vmf, {page, page + 1}, pte_to_prot(cur) | vmf.vma->prot, cur, FaultKind::File);
}

// A write to a page of a shared file VMA (untouched, or mapped read-only so far: a clean page
// after sync): it becomes writable and dirty, in the page cache that every mapping of the file
// shares; write-back takes it to the file. Entered with the page locked from `cur`; returns by the
// page-lock rule (a degraded fall-back counts the pages it dirties itself).
FaultResult do_shared_fault(vm_fault& vmf, pte_t cur) {
    if (pte_prot(cur) == 0) probe_written_page(vmf);
    const std::size_t page = vmf.arena->page_index(vmf.address);
    const Prot prot = pte_to_prot(cur) | vmf.vma->prot;
    const std::uint32_t dirtied = pages_to_dirty(vmf, {page, page + 1}, prot);
    const FaultResult r = install_or_degrade(vmf, {page, page + 1}, prot, cur, FaultKind::File);
    if (r == FaultResult::Resolved && vmf.kind == FaultKind::File) vmf.dirtied += dirtied;
    return r;
}

// A page whose write-back failed, whose content usermm holds: the copy goes back into the page
// cache (the kernel may have dropped the page and read the disk's older content) before the
// program can see the page again, while the arena's page is still PROT_NONE (no torn page). The
// copy stays until a write-back of the page succeeds.
int restore_saved(const vm_fault& vmf, std::uint64_t f, std::uint64_t size) {
    const MappedFile& file = *vmf.vma->file;
    const SavedPage* saved = file.find_saved(f);
    const std::uint64_t at = f << g_page_shift;
    if (!saved || at >= size) return 0;
    // Through a mapping of its own first: the page becomes dirty in the page cache without a write
    // request to a file system that may still refuse writes; pwrite where no mapping can be had.
    const std::size_t len = std::size_t(std::min<std::uint64_t>(g_page_size, size - at));
    if (page_write_through_mapping(file.fd, at, saved->content.get(), len) == 0) return 0;
    return page_write_file(file.fd, saved->content.get(), len, at);
}

// A fault in a file VMA, with its PTE locked from `cur`. The end of the file is looked up at every
// fault, so that a page past it (the file was truncated under the VMA) gets SIGBUS, never zeros.
// Returns by the page-lock rule.
FaultResult do_file_fault(vm_fault& vmf, pte_t cur) {
    const Vma& vma = *vmf.vma;
    const std::uint64_t f = vma.file_page(vmf.address);
    std::uint64_t size = 0;
    if (const int err = page_file_size(vma.file->fd, &size)) return file_bus_error(vmf, cur, "fstat of", 0, err);
    vmf.file_size = size;
    vmf.file_eof = (size + g_page_size - 1) >> g_page_shift;
    if (f >= vmf.file_eof) return file_bus_error(vmf, cur, "the page is past the end of", f << g_page_shift, 0);
    if (cur & kPteSaved) {
        if (const int err = restore_saved(vmf, f, size))
            return file_bus_error(vmf, cur, "writing the saved copy of the page back to", f << g_page_shift, err);
        cur = pte_t(cur & ~kPteSaved);
        vmf.arena->pte_of(vmf.address).store(pte_t(cur | kPteLocked), kRelaxed);
    }
    if (vmf.access == Access::Write)
        return vma.kind() == VmaKind::FileShared ? do_shared_fault(vmf, cur) : do_cow_fault(vmf, cur);
    // An instruction fetch from a page mapped for reading: the content is mapped already.
    return pte_prot(cur) == 0 ? do_read_fault(vmf, cur) : do_upgrade_fault(vmf, cur);
}

// The kernel refused a page usermm had granted, with SIGBUS: the page lies past the end of the
// file (it was truncated), or it could not be read (an I/O error) or given blocks (no space for a
// page of a sparse file). Passed on, as with mmap. No PTE is locked.
FaultResult do_file_sigbus(vm_fault& vmf) {
    const Vma& vma = *vmf.vma;
    const std::uint64_t at = vma.file_page(vmf.address) << g_page_shift;
    std::uint64_t size = 0;
    const int err = page_file_size(vma.file->fd, &size);
    if (vmf.diag) {
        RawLine& d = *vmf.diag;
        d.str("usermm: SIGBUS: ").str(access_name(vmf.access)).str(" at ").hex(vmf.address).str(" in VMA '");
        d.str(vma.name).str("': ");
        if (!err && at >= size)
            d.str("the page is past the end of '").str(vma.file->path).str("' (offset ").hex(at).str(", size ").hex(size).str(")");
        else
            d.str("the kernel could not read or allocate the page of '").str(vma.file->path).str("' at offset ").hex(at)
                .str(" (an I/O error, or no space for a page of a sparse file)");
    }
    return FaultResult::BusError;
}

// Locks the faulting page's PTE and dispatches on the VMA's kind and the page's state: the one
// place that decides which handler family a fault belongs to. Another thread resolving the same
// page holds the lock only for one mprotect, so waiting beats faulting again through the kernel.
FaultResult handle_pte_fault(vm_fault& vmf) {
    Pte& pte = vmf.arena->pte_of(vmf.address);
    const bool decoded = vmf.access != Access::Unknown;
    for (unsigned spins = 0;; ++spins) {
        pte_t cur = pte.load(kAcquire);
        if (cur & kPteLocked) {
            spin_backoff(spins);
            continue;
        }
        // A stack's guard page has the VMA's protection in the kernel (its marker is what faults):
        // it is expand_stack's, whatever the protection says (an access not decoded counts as a
        // write), and expand_stack locks for itself.
        if (cur & kPteGuard) {
            if (!decoded) vmf.access = Access::Write;
            if (!allows(vmf.vma->prot, needed(vmf.access))) return FaultResult::AccessError;
            return expand_stack(vmf);
        }
        if (!decoded) vmf.access = infer_access(cur, vmf.vma->prot);
        if (!allows(vmf.vma->prot, needed(vmf.access))) return FaultResult::AccessError;
        if (allows(pte_to_prot(cur), needed(vmf.access))) return FaultResult::Spurious;
        if (!pte.compare_exchange_weak(cur, cur | kPteLocked, kAcquire, kRelaxed)) continue;
        switch (vmf.vma->kind()) {
            case VmaKind::Anonymous:
                if (cur & kPteSwapped) return do_swap_page(vmf, cur);
                if (pte_prot(cur) == 0 && (cur & (kPteInactive | kPteReadahead)))
                    return do_kept_run_fault(vmf, cur, cur & kPteInactive ? kPteInactive : kPteReadahead);
                return pte_prot(cur) == 0 ? do_anonymous_fault(vmf, cur) : do_upgrade_fault(vmf, cur);
            case VmaKind::FilePrivate:
            case VmaKind::FileShared:
                return do_file_fault(vmf, cur);
        }
        __builtin_unreachable();
    }
}

// A write to a page whose write access the uffd engine withholds (userfaultfd write-protection,
// raised as SIGBUS in the writing thread): the kernel's do_wp_page. Live snapshots take the old
// content, then the mark goes and the write proceeds. A page not marked as tracked may still carry
// a stale mark from an earlier tracking (protect() to None and back keeps it in the kernel): it is
// cleared all the same, or the write would fault forever. Locks the page itself; returns by the
// page-lock rule.
FaultResult do_wp_page(vm_fault& vmf) {
    ArenaCore& arena = *vmf.arena;
    const std::size_t page = arena.page_index(vmf.address);
    Pte& pte = arena.pte[page];
    pte_t cur;
    for (unsigned spins = 0;; ++spins) {
        cur = pte.load(kAcquire);
        if (cur & kPteLocked) {
            spin_backoff(spins);
            continue;
        }
        // protect() or unmap() took write access away meanwhile: the retried access gets its answer.
        if (!allows(pte_to_prot(cur), Prot::Write)) return FaultResult::Spurious;
        if (pte.compare_exchange_weak(cur, cur | kPteLocked, kAcquire, kRelaxed)) break;
    }
    const bool tracked = cur & kPteWriteTracked;
    if (tracked && arena.snapshot_count)
        if (const int err = preserve_for_snapshots(arena, page, cur, &vmf.copies))
            return fatal(vmf, "reading the page for a snapshot", err);
    if (const int err = uffd_write_protect(arena.page_addr(page), g_page_size, false))
        return fatal(vmf, "UFFDIO_WRITEPROTECT", err);
    pte.store(pte_with_prot(cur, pte_to_prot(cur)), kRelease);
    arena.note_changed(page);
    if (!tracked) return FaultResult::Spurious;
    vmf.kind = FaultKind::WriteProtect;
    vmf.pages = 1;
    return FaultResult::Resolved;
}

// A SIGSEGV is a protection usermm set (handle_pte_fault). A SIGBUS in an arena is the kernel's
// verdict on a file page, or a userfaultfd write-protect fault of the uffd engine (file VMAs are
// not registered), or else the kernel's verdict on the mapping, which demand-zero memory never
// earns.
FaultResult handle_bus_fault(vm_fault& vmf) {
    switch (vmf.vma->kind()) {
        case VmaKind::Anonymous:
            return tracking_engine() == TrackingEngine::Uffd && allows(vmf.vma->prot, Prot::Write) ? do_wp_page(vmf)
                                                                                                  : FaultResult::AccessError;
        case VmaKind::FilePrivate:
        case VmaKind::FileShared:
            return do_file_sigbus(vmf);
    }
    __builtin_unreachable();
}

void describe_access_error(const vm_fault& vmf) {
    if (!vmf.diag) return;
    RawLine& d = *vmf.diag;
    d.str("usermm: ").str(vmf.signo == SIGBUS ? "SIGBUS" : "SIGSEGV").str(": ").str(access_name(vmf.access));
    d.str(" at ").hex(vmf.address).str(" in arena [").hex(vmf.arena->base).str(", ").hex(vmf.arena->end).str(")");
    if (!vmf.vma) {
        d.str(": no VMA there");
        return;
    }
    d.str(": VMA '").str(vmf.vma->name).str("' [").hex(vmf.vma->start).str(", ").hex(vmf.vma->end);
    if (vmf.vma->stack && (vmf.arena->pte_of(vmf.address).load(kRelaxed) & kPteGuard)) {
        d.str(") is a stack; the address is in its guard, and the stack pointer ").hex(vmf.sp).str(" is not on it");
        return;
    }
    d.str(") ").str(prot_letters(vmf.vma->prot).text).str(" does not allow it");
}

// Under the arena's read lock.
FaultResult handle_arena_fault(vm_fault& vmf) {
    Vma* vma = find_vma(*vmf.arena, vmf.address);
    if (vma && vma->start <= vmf.address) vmf.vma = vma;
    FaultResult r = FaultResult::AccessError;
    if (vmf.vma && vmf.signo == SIGSEGV)
        r = handle_pte_fault(vmf);
    else if (vmf.vma && vmf.signo == SIGBUS)
        r = handle_bus_fault(vmf);
    if (r == FaultResult::AccessError) describe_access_error(vmf);  // a BusError described itself
    if (r == FaultResult::Spurious) vmf.pte_seen = vmf.arena->pte_of(vmf.address).load(kRelaxed);
    return r;
}

}  // namespace

FaultResult handle_mm_fault(vm_fault& vmf) {
    bool self_deadlock = false;
    vmf.arena = find_arena_lock_shared(vmf.address, &self_deadlock);
    if (self_deadlock) {
        vmf.arena = nullptr;  // not locked: do not count into it
        if (vmf.diag)
            vmf.diag->str("usermm: fault at ")
                .hex(vmf.address)
                .str(" by the thread that holds an arena lock (arena memory touched inside an API call, or by a fork")
                .str(" handler registered before usermm was loaded)");
        account_fault(vmf, FaultResult::Fatal);
        return FaultResult::Fatal;
    }
    if (!vmf.arena) {
        const FaultResult r = classify_thread_overflow(vmf);
        account_fault(vmf, r);
        return r;
    }
    // At the hard resident limit the fault reclaims first, as the kernel's direct reclaim does
    // before it allocates: reclaiming after, it could wait while the reclaimer takes the page it
    // has just brought in, and the access fault again, without end.
    FaultResult r = vmf.arena->swap ? direct_reclaim(vmf) : FaultResult::Resolved;
    if (r == FaultResult::Resolved) r = handle_arena_fault(vmf);
    if (vmf.arena->swap) swap_release_slots(*vmf.arena->swap, vmf.stale_slots, vmf.stale_count);
    account_fault(vmf, r);
    vmf.arena->lock.unlock_shared();
    return r;
}

}  // namespace usermm::detail
