// collect_dirty through the kernel's asynchronous write-protection (see dirty_async.hpp).
//
// What the kernel does, read from fs/userfaultfd.c, fs/proc/task_mmu.c (pagemap_scan_*) and
// mm/memory.c (Linux 6.7 on): in a VMA registered for write-protect with a WP_ASYNC context, a
// write to a protected page is resolved in the fault (the mark dropped, no message, no signal);
// PAGEMAP_SCAN's PAGE_IS_WRITTEN is "present or swapped, without the mark"; PM_SCAN_WP_MATCHING
// puts the mark back on the pages it reports; PM_SCAN_CHECK_WPASYNC refuses (EPERM) a VMA that is
// not registered so. A page table hole, or a none entry without a marker, is not written, and a
// scan does not mark it: a page whose content is discarded (MADV_DONTNEED drops an anonymous
// page's marker too) and then mapped again is unprotected, which is why usermm counts a kernel
// report only for a populated page (a write needs write access, which usermm grants only with P;
// a discarded page loses P and goes through ArenaCore::discarded instead; the zero page a read
// maps there reads as written, and P tells it apart).
#include "dirty_async.hpp"

#include <algorithm>
#include <cstdio>
#include <span>
#include <utility>

#include "account.hpp"
#include "page_ops_api.hpp"
#include "snapshot.hpp"
#include "write_tracking.hpp"

namespace usermm::detail {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
using Ranges = std::vector<std::pair<std::size_t, std::size_t>>;

// The parts of [first, last) inside (or outside) the asynchronous ranges.
std::vector<PageSpan> async_parts(const ArenaCore& a, std::size_t first, std::size_t last) {
    std::vector<PageSpan> out;
    for (const auto& [lo, hi] : a.async_ranges)
        if (lo < last && hi > first) out.push_back({std::max(lo, first), std::min(hi, last)});
    return out;
}

std::vector<PageSpan> other_parts(const ArenaCore& a, std::size_t first, std::size_t last) {
    std::vector<PageSpan> out;
    std::size_t at = first;
    for (const PageSpan& p : async_parts(a, first, last)) {
        if (p.first > at) out.push_back({at, p.first});
        at = p.last;
    }
    if (at < last) out.push_back({at, last});
    return out;
}

void add_range(ArenaCore& a, std::size_t first, std::size_t last) {
    Ranges& r = a.async_ranges;
    r.emplace_back(first, last);
    std::sort(r.begin(), r.end());
    Ranges merged;
    for (const auto& p : r) {
        if (!merged.empty() && merged.back().second >= p.first)
            merged.back().second = std::max(merged.back().second, p.second);
        else
            merged.push_back(p);
    }
    r = std::move(merged);
}

void remove_range(ArenaCore& a, std::size_t first, std::size_t last) {
    Ranges kept;
    for (const auto& [lo, hi] : a.async_ranges) {
        if (hi <= first || lo >= last) {
            kept.emplace_back(lo, hi);
            continue;
        }
        if (lo < first) kept.emplace_back(lo, first);
        if (hi > last) kept.emplace_back(last, hi);
    }
    a.async_ranges = std::move(kept);
}

// Every PAGEMAP_SCAN answer for [first, last), the written regions in pieces of `buffer`, as page
// ranges fn(i, j). 0 or the errno. Each call walks from where the last stopped, and costs a setup of
// its own: scattered writes want a buffer of thousands of regions (a thread's own, kept: a fresh
// one would cost its first touches at every collection), fork's prepare handler its fixed one.
template <typename Fn>
int scan_written(const ArenaCore& a, std::size_t first, std::size_t last, bool rearm, std::span<WrittenRegion> buffer,
                 Fn fn) noexcept {
    std::uintptr_t at = a.page_addr(first);
    const std::uintptr_t end = a.page_addr(last);
    while (at < end) {
        std::size_t n = 0;
        std::uintptr_t walk_end = end;
        if (const int err = pagemap_scan_written(at, end - at, rearm, buffer.data(), buffer.size(), &n, &walk_end))
            return err;
        for (std::size_t k = 0; k < n; ++k) fn(a.page_index(buffer[k].start), a.page_index(buffer[k].end));
        if (walk_end <= at) return EIO;  // no progress: never expected of the kernel
        at = walk_end;
    }
    return 0;
}

std::span<WrittenRegion> scan_buffer() {
    thread_local std::vector<WrittenRegion> buffer(16384);
    return buffer;
}

// The pages the kernel let a write through since they were protected: populated (see the top).
// Marked changed for snapshots (and for collect_dirty with `collect`), reported to `out` if given.
template <typename Out>
void fold_written(ArenaCore& a, std::size_t i, std::size_t j, pte_t marks, Out out) noexcept {
    for (std::size_t k = i; k < j; ++k) {
        const pte_t v = a.pte[k].load(kRelaxed);
        if (!(v & kPtePopulated) || (v & kPteGuard)) continue;
        a.pte[k].store(pte_t(v | marks), kRelaxed);
        a.note_changed(k);
        out(k);
    }
}

// The runs of writable pages of [first, last), by protection: made read-only while a range has no
// write-protection (see dirty_async.hpp), then given their protection back.
struct Run {
    std::size_t first;
    std::size_t last;
    Prot prot;
};
std::vector<Run> writable_runs(const ArenaCore& a, std::size_t first, std::size_t last) {
    std::vector<Run> runs;
    auto key = [&a](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        return (v & to_pte(Prot::Write)) && !(v & kPteGuard) ? int(pte_prot(v)) : kNoRun;
    };
    for (const PageSpan& span : pte_spans(a, first, last))
        for_each_run(span.first, span.last, key,
                     [&](std::size_t i, std::size_t j, int prot) { runs.push_back({i, j, pte_to_prot(pte_t(prot))}); });
    return runs;
}

// Both directions only change protections, without the map budget's charge: a guard lasts one
// call, and the kernel mappings it splits where a run ends inside one (a range that is part of a
// VMA) merge again when it goes. What the switch leaves split, settle_edges counts.
int guard(const ArenaCore& a, const std::vector<Run>& runs, bool on, std::size_t* done) {
    for (*done = 0; *done < runs.size(); ++*done) {
        const Run& r = runs[*done];
        if (const int err =
                page_protect(a.page_addr(r.first), (r.last - r.first) << g_page_shift, on ? r.prot & ~Prot::Write : r.prot))
            return err;
    }
    return 0;
}

// Giving write access back splits a kernel mapping where a guarded run merged with a read-only
// neighbour, which the kernel may refuse (ENOMEM at its mapping limit): the PTEs of the runs left
// then take the kernel's protection, so that their next write is an upgrade fault usermm resolves
// (and sees) rather than a fault on a page it believes writable.
void settle_unguarded(ArenaCore& a, const std::vector<Run>& runs, std::size_t from) {
    for (std::size_t k = from; k < runs.size(); ++k) resync_ptes(a, runs[k].first, runs[k].last);
}

// Counts the kernel mappings a failed step left split or merged. Across the range's ends lies
// another userfaultfd context where the switch was made (Apart), or the same one where it was
// undone as far as the kernel let it (Same).
void settle_after_failure(ArenaCore& a, std::size_t first, std::size_t last, long before, Across ends) noexcept {
    try {
        settle_edges(a, first, last, before, ends, ends);
    } catch (...) {
        // The count stays off until a refused protection change recounts it (protect_run); verify() says so.
    }
}

// A switch that failed part way keeps the guard, which every run has: the pages stay read-only,
// in their PTEs too, and untracked, so that every later write is an upgrade fault that usermm
// resolves and marks, whatever userfaultfd registrations and marks the failure left or took. (A
// mark left on such a page costs its first write one more fault, do_wp_page's stale-mark case.)
// The pages written before keep their marks, or got them from the kernel's written bits: none is
// lost.
void keep_guard(ArenaCore& a, std::size_t first, std::size_t last, long before, const std::vector<Run>& runs) noexcept {
    for (const Run& r : runs)
        for (std::size_t i = r.first; i < r.last; ++i) {
            const pte_t v = a.pte[i].load(kRelaxed);
            a.pte[i].store(pte_t(pte_with_prot(v, r.prot & ~Prot::Write) & ~kPteWriteTracked), kRelaxed);
            a.note_changed(i);
        }
    settle_after_failure(a, first, last, before, Across::Same);
}

void unguard(ArenaCore& a, const char* call, const std::vector<Run>& runs, std::size_t count) {
    std::size_t done = 0;
    const std::vector<Run> part(runs.begin(), runs.begin() + std::ptrdiff_t(count));
    if (const int err = guard(a, part, false, &done)) {
        const Run failed = part[done];
        settle_unguarded(a, part, done);
        fail(err, "{}: mprotect({:#x}, {:#x}, {}) giving write access back after a userfaultfd switch failed", call,
             a.page_addr(failed.first), (failed.last - failed.first) << g_page_shift, to_string(failed.prot));
    }
}

// The guard over [first, last), or an error with nothing changed but the kernel mappings that the
// refused call split (counted: `before` is mappings_around's count before the guard).
void guard_or_fail(ArenaCore& a, const char* call, std::size_t first, std::size_t last, long before,
                   const std::vector<Run>& runs) {
    std::size_t done = 0;
    if (const int err = guard(a, runs, true, &done)) {
        const Run& r = runs[done];
        try {
            unguard(a, call, runs, done);
        } catch (...) {
            settle_after_failure(a, first, last, before, Across::Same);
            throw;
        }
        settle_after_failure(a, first, last, before, Across::Same);
        fail(err, "{}: mprotect({:#x}, {:#x}, {}) before a userfaultfd switch failed", call, a.page_addr(r.first),
             (r.last - r.first) << g_page_shift, to_string(r.prot & ~Prot::Write));
    }
}

// Gives write access back at the end of a switch that succeeded, and counts the kernel mappings
// it changed; a refusal there leaves those runs read-only (settle_unguarded), which loses nothing.
void finish_switch(ArenaCore& a, const char* call, std::size_t first, std::size_t last, long before,
                   const std::vector<Run>& runs) {
    try {
        unguard(a, call, runs, runs.size());
    } catch (...) {
        settle_after_failure(a, first, last, before, Across::Apart);
        throw;
    }
    settle_edges(a, first, last, before);
}

// Pages [first, last) as runs of populated pages: what the asynchronous context must protect when
// it takes a range over (the others fault into usermm at their next write, or hold nothing).
template <typename Fn>
void for_each_populated_run(const ArenaCore& a, std::size_t first, std::size_t last, Fn fn) {
    auto key = [&a](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        return (v & kPtePopulated) && !(v & kPteGuard) ? 1 : kNoRun;
    };
    for (const PageSpan& span : pte_spans(a, first, last)) for_each_run(span.first, span.last, key, [&](std::size_t i, std::size_t j, int) { fn(i, j); });
}

// Pages [first, last), none asynchronous, go to the asynchronous context.
void enter(ArenaCore& a, const char* call, std::size_t first, std::size_t last) {
    const std::uintptr_t at = a.page_addr(first), len = (last - first) << g_page_shift;
    const long before = long(mappings_around(a, first, last).size());
    const std::vector<Run> runs = writable_runs(a, first, last);
    guard_or_fail(a, call, first, last, before, runs);
    // Each step that fails is undone as far as the kernel lets it, and the guard stays (keep_guard).
    int err = 0;
    const char* what = nullptr;
    std::uintptr_t err_at = at, err_end = at + len;
    if ((err = uffd_unregister(at, len))) {
        what = "UFFDIO_UNREGISTER from the synchronous userfaultfd";
        uffd_register(at, len);  // the part it unregistered before the refusal
    } else if ((err = uffd_async_register(at, len))) {
        what = "UFFDIO_REGISTER with the asynchronous userfaultfd";
        uffd_async_unregister(at, len);
        uffd_register(at, len);
    } else {
        for_each_populated_run(a, first, last, [&](std::size_t i, std::size_t j) {
            if (!err && (err = uffd_async_write_protect(a.page_addr(i), (j - i) << g_page_shift))) {
                what = "UFFDIO_WRITEPROTECT with the asynchronous userfaultfd";
                err_at = a.page_addr(i);
                err_end = a.page_addr(j);
            }
        });
        if (err) {
            uffd_async_unregister(at, len);
            uffd_register(at, len);
        }
    }
    if (err) {
        keep_guard(a, first, last, before, runs);
        fail(err, "{}: {} of [{:#x}, {:#x}) failed; the range's pages stay read-only until written", call, what, err_at,
             err_end);
    }
    // Tracked by the kernel now, not by usermm; the range's ends are kernel mappings apart now (one
    // userfaultfd context each side).
    for (const PageSpan& span : pte_spans(a, first, last))
        for (std::size_t i = span.first; i < span.last; ++i) a.pte[i].fetch_and(pte_t(~kPteWriteTracked), kRelaxed);
    add_range(a, first, last);
    finish_switch(a, call, first, last, before, runs);
}

// Pages [first, last), all asynchronous, go back to the synchronous context.
void leave(ArenaCore& a, const char* call, std::size_t first, std::size_t last) {
    const std::uintptr_t at = a.page_addr(first), len = (last - first) << g_page_shift;
    const long before = long(mappings_around(a, first, last).size());
    const std::vector<Run> runs = writable_runs(a, first, last);
    guard_or_fail(a, call, first, last, before, runs);
    // The marks collect_dirty left here are grants, whose writes the kernel saw: its written bits
    // become the marks.
    for (const PageSpan& span : pte_spans(a, first, last))
        for (std::size_t i = span.first; i < span.last; ++i) a.pte[i].fetch_and(pte_t(~kPteDirtyCollect), kRelaxed);
    const int scanned = scan_written(a, first, last, false, scan_buffer(), [&a](std::size_t i, std::size_t j) {
        fold_written(a, i, j, kPteDirty, [](std::size_t) {});
    });
    if (scanned) {  // still asynchronous, the kernel's written bits as they were
        finish_switch(a, call, first, last, before, runs);
        fail(scanned, "{}: PAGEMAP_SCAN of [{:#x}, {:#x}) for written pages failed", call, at, at + len);
    }
    // From here the marks hold every write so far: a step that fails leaves the range synchronous
    // as far as the kernel lets it, and guarded (keep_guard).
    remove_range(a, first, last);
    auto fall_back = [&](int err, const char* what, std::uintptr_t from, std::uintptr_t to) {
        keep_guard(a, first, last, before, runs);
        fail(err, "{}: {} of [{:#x}, {:#x}) failed; the range's pages stay read-only until written", call, what, from, to);
    };
    if (const int err = uffd_async_unregister(at, len)) {
        // The mappings it let go of before the refusal go back, which splits nothing (the kernel
        // refuses an unregistration through the other context, and a registration over a mapping
        // of the other): the range stays asynchronous. Its pages there lost their marks, so the
        // next scan reports them as written, which loses nothing.
        if (uffd_async_register(at, len) == 0) {
            add_range(a, first, last);
            finish_switch(a, call, first, last, before, runs);
            fail(err, "{}: UFFDIO_UNREGISTER from the asynchronous userfaultfd of [{:#x}, {:#x}) failed", call, at,
                 at + len);
        }
        fall_back(err, "UFFDIO_UNREGISTER from the asynchronous userfaultfd", at, at + len);
    }
    if (const int err = uffd_register(at, len)) fall_back(err, "UFFDIO_REGISTER with the synchronous userfaultfd", at, at + len);
    // The clean writable pages are tracked as collect_dirty leaves them on the synchronous engine;
    // the others are dirty-collect already, and dirty-snapshot with their change bits set for the next
    // snapshot, which arms them.
    const WriteTracker& tracker = write_tracker();
    auto clean = [&a](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        return (v & to_pte(Prot::Write)) && !(v & (kPteDirtyCollect | kPteWriteTracked | kPteGuard)) ? int(pte_prot(v))
                                                                                                        : kNoRun;
    };
    for (const PageSpan& span : pte_spans(a, first, last))
        for_each_run(span.first, span.last, clean, [&](std::size_t i, std::size_t j, int prot) {
            if (const int err = tracker.arm(a, i, j, pte_to_prot(pte_t(prot))))
                fall_back(err, "UFFDIO_WRITEPROTECT", a.page_addr(i), a.page_addr(j));
            for (std::size_t k = i; k < j; ++k) {
                const pte_t v = a.pte[k].load(kRelaxed);
                a.pte[k].store(pte_t((v & kPteFlags) | kPteWriteTracked | tracker.armed_prot(pte_prot(v))), kRelaxed);
            }
        });
    finish_switch(a, call, first, last, before, runs);
}

}  // namespace

std::vector<PageSpan> sync_parts(const ArenaCore& a, std::size_t first, std::size_t last) {
    return other_parts(a, first, last);
}

std::vector<PageSpan> async_spans(const ArenaCore& a, std::size_t first, std::size_t last) {
    return async_parts(a, first, last);
}

bool async_eligible(const ArenaCore& a, Range r) {
    if (!uffd_async_available() || tracking_engine() != TrackingEngine::Uffd || a.swap || a.reclaimer) return false;
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    for (std::size_t i = 0; i < a.snapshot_count; ++i)
        if (a.snapshots[i]->first < last && a.snapshots[i]->last > first) return false;
    if (a.stack_count)
        for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it)
            if (it->stack) return false;
    return true;
}

void async_collect(ArenaCore& a, const char* call, Range r, std::vector<std::size_t>& dirty) {
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    for (const PageSpan& p : other_parts(a, first, last)) enter(a, call, p.first, p.last);
    // The written pages, protected again in the same call; a write that lands after the walk passed
    // its page is the next collection's. If a later call fails, the pages found by the earlier ones
    // are in `dirty` already, which collect_dirty keeps for the next collection.
    if (const int err = scan_written(a, first, last, true, scan_buffer(), [&](std::size_t i, std::size_t j) {
            fold_written(a, i, j, kPteDirtySnapshot, [&dirty](std::size_t k) { dirty.push_back(k); });
        }))
        fail(err, "{}: PAGEMAP_SCAN of [{:#x}, {:#x}) for written pages (and write-protecting them again) failed", call,
             r.start, r.end);
    account_dirty_async(a);
}

void async_leave(ArenaCore& a, const char* call, Range r) {
    for (const PageSpan& p : async_parts(a, a.page_index(r.start), a.page_index(r.end))) leave(a, call, p.first, p.last);
}

// The guard first, so that no write lands between the fold and fork's copy of the page tables
// (the child, which cannot ask the kernel, would never see it): writes by other threads fault into
// usermm and wait for the arena's lock, which fork holds. The child keeps the guard as its
// mprotect tracking; the parent takes it away after the fork.
void async_fold_before_fork(ArenaCore& a) noexcept {
    bool guarded = true;
    try {
        std::vector<Run> runs;
        for (const auto& [lo, hi] : a.async_ranges) {
            const std::vector<Run> part = writable_runs(a, lo, hi);
            runs.insert(runs.end(), part.begin(), part.end());
        }
        std::size_t done = 0;
        if (guard(a, runs, true, &done) != 0) {
            guarded = false;
            guard(std::as_const(a), std::vector<Run>(runs.begin(), runs.begin() + std::ptrdiff_t(done)), false, &done);
        }
    } catch (...) {
        guarded = false;
    }
    for (const auto& [lo, hi] : a.async_ranges) {
        // The marks there are stale (grants whose writes the kernel saw, see collect_dirty): the
        // child must inherit only what was written since the last collection.
        try {
            for (const PageSpan& span : pte_spans(a, lo, hi))
                for (std::size_t i = span.first; i < span.last; ++i) a.pte[i].fetch_and(pte_t(~kPteDirtyCollect), kRelaxed);
        } catch (...) {
            for (std::size_t i = lo; i < hi; ++i) a.pte[i].fetch_and(pte_t(~kPteDirtyCollect), kRelaxed);
        }
        // Not protected again: the parent's next scan reports them too (its marks there are the
        // kernel's to tell, see collect_dirty), and the child, which has no scan, its marks.
        WrittenRegion regions[256];
        const int err = scan_written(a, lo, hi, false, regions, [&a](std::size_t i, std::size_t j) {
            fold_written(a, i, j, kPteDirty, [](std::size_t) {});
        });
        if (err || !guarded)
            std::fprintf(stderr,
                         "usermm: fork: %s [%#lx, %#lx) failed (errno %d); the child's collect_dirty may miss pages "
                         "written just before the fork\n",
                         err ? "PAGEMAP_SCAN of" : "the read-only guard of", static_cast<unsigned long>(a.page_addr(lo)),
                         static_cast<unsigned long>(a.page_addr(hi)), err ? err : ENOMEM);
    }
}

void async_after_fork_parent(ArenaCore& a) noexcept {
    for (const auto& [lo, hi] : a.async_ranges) {
        try {
            std::size_t done = 0;
            const std::vector<Run> runs = writable_runs(a, lo, hi);
            if (const int err = guard(a, runs, false, &done)) {
                settle_unguarded(a, runs, done);
                std::fprintf(stderr, "usermm: fork: giving write access back to [%#lx, %#lx) failed (errno %d)\n",
                             static_cast<unsigned long>(a.page_addr(lo)), static_cast<unsigned long>(a.page_addr(hi)), err);
            }
        } catch (...) {
            std::fprintf(stderr, "usermm: fork: out of memory giving write access back to [%#lx, %#lx)\n",
                         static_cast<unsigned long>(a.page_addr(lo)), static_cast<unsigned long>(a.page_addr(hi)));
        }
    }
}

void async_after_fork_child(ArenaCore& a) {
    for (const auto& [lo, hi] : a.async_ranges) {
        for (const Run& run : writable_runs(a, lo, hi)) {
            const Prot next = run.prot & ~Prot::Write;
            if (reprotect_run(a, run.first, run.last, next) != 0) {
                std::fprintf(stderr, "usermm: fork: the child cannot write-protect [%#lx, %#lx); its collect_dirty may miss writes there\n",
                             static_cast<unsigned long>(a.page_addr(run.first)), static_cast<unsigned long>(a.page_addr(run.last)));
                continue;
            }
            for (std::size_t k = run.first; k < run.last; ++k) a.pte[k].fetch_or(kPteWriteTracked, kRelaxed);
        }
    }
    a.async_ranges.clear();
}

}  // namespace usermm::detail
