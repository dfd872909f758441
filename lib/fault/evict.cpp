#include "evict.hpp"

#include <cerrno>
#include <mutex>

#include "fault_world.hpp"
#include "map_budget.hpp"
#include "page_ops.hpp"
#include "snapshot.hpp"
#include "swap_ops.hpp"

namespace usermm::detail {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;

// ThreadSanitizer cannot see that taking write access away (mprotect) orders the program's last
// writes to a page before the store reads it in place: its builds copy every page out through
// /proc/self/mem instead, which it does not watch.
#if defined(__SANITIZE_THREAD__)
constexpr bool kWriteInPlace = false;
#else
constexpr bool kWriteInPlace = true;
#endif
}  // namespace

void lock_ptes(ArenaCore& a, std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i)
        for (unsigned spins = 0;; ++spins) {
            pte_t v = a.pte[i].load(kRelaxed);
            if (!(v & kPteLocked) &&
                a.pte[i].compare_exchange_weak(v, pte_t(v | kPteLocked), std::memory_order_acquire, kRelaxed))
                break;
            spin_backoff(spins);
        }
}

bool try_lock_ptes(ArenaCore& a, std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) {
        pte_t v = a.pte[i].load(kRelaxed);
        if ((v & kPteLocked) ||
            !a.pte[i].compare_exchange_strong(v, pte_t(v | kPteLocked), std::memory_order_acquire, kRelaxed)) {
            unlock_ptes(a, first, i);
            return false;
        }
    }
    return true;
}

void unlock_ptes(ArenaCore& a, std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) a.pte[i].fetch_and(pte_t(~kPteLocked), std::memory_order_release);
}

bool protect_locked(ArenaCore& a, std::size_t first, std::size_t last, Prot prot, pte_t mark,
                    void (*repair)(ArenaCore&, std::size_t, std::size_t), bool* unknown) {
    std::lock_guard guard(a.install_lock);
    const long delta = map_count_delta(a, first, last, prot);
    if (!map_budget_try_charge(a, delta)) return false;
    if (page_protect(a.page_addr(first), (last - first) << g_page_shift, prot) != 0) {
        map_budget_charge(a, -delta);
        // A prefix may have changed: put every run back as the PTEs say it was.
        bool undone = true;
        for (std::size_t i = first; i < last;) {
            std::size_t j = i + 1;
            const pte_t was = pte_prot(a.pte[i].load(kRelaxed));
            while (j < last && pte_prot(a.pte[j].load(kRelaxed)) == was) ++j;
            undone &= page_protect(a.page_addr(i), (j - i) << g_page_shift, pte_to_prot(was)) == 0;
            i = j;
        }
        if (!undone) {
            if (repair)
                repair(a, first, last);
            else
                *unknown = true;
        }
        return false;
    }
    for (std::size_t i = first; i < last; ++i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        a.pte[i].store(pte_t((v & ~kPteProt) | to_pte(prot) | (pte_resident(v) ? mark : 0)), kRelaxed);
    }
    return true;
}

namespace {

// evict_pages for runs of up to N pages: the arrays below live on the caller's stack (a signal
// handler's, for a fault's direct reclaim).
template <std::size_t N>
__attribute__((noinline)) Evicted evict_run(ArenaCore& a, Vma& vma, std::size_t first, std::size_t last, std::byte* buffer,
                                           const EvictOps& ops) {
    Evicted result;
    ArenaSwap& s = *a.swap;
    if (ops.wait_for_ptes)
        lock_ptes(a, first, last);
    else if (!try_lock_ptes(a, first, last))
        return result;
    std::size_t resident = 0;
    bool tracked = false;
    for (std::size_t i = first; i < last; ++i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        resident += pte_resident(v);
        tracked |= (v & kPteWriteTracked) != 0;
    }
    if (!resident) {
        unlock_ptes(a, first, last);
        result.done = true;
        return result;
    }
    pte_t was[N];
    for (std::size_t i = first; i < last; ++i) was[i - first] = pte_t(a.pte[i].load(kRelaxed) & ~kPteLocked);
    auto put_back = [&] {
        std::lock_guard guard(a.install_lock);
        for (std::size_t i = first; i < last;) {
            std::size_t j = i + 1;
            while (j < last && pte_prot(was[j - first]) == pte_prot(was[i - first])) ++j;
            const long delta = map_count_delta(a, i, j, pte_to_prot(was[i - first]));
            if (page_protect(a.page_addr(i), (j - i) << g_page_shift, pte_to_prot(was[i - first])) == 0) {
                map_budget_charge(a, delta);
                for (std::size_t k = i; k < j; ++k) a.pte[k].store(pte_t(was[k - first] | kPteLocked), kRelaxed);
            }
            i = j;
        }
        unlock_ptes(a, first, last);
    };
    // Pages with content that the program may write lose write access before their content is
    // looked at (a writer faults and waits for the PTE lock), and keep read access: the store
    // writes those the program may read in place. Those it may not read (prot 0: inactive, read
    // ahead, or protect(None) with content kept) stay so, and are copied out through
    // /proc/self/mem into `buffer` instead; swapped-out pages stay PROT_NONE too (a reader must
    // fault, not see the kernel's zeros). All become PROT_NONE before they are dropped.
    for (std::size_t i = first; i < last;) {
        const pte_t prot = pte_prot(was[i - first]);
        if (!pte_resident(was[i - first]) || !allows(pte_to_prot(prot), Prot::Read | Prot::Write)) {
            ++i;
            continue;
        }
        std::size_t j = i + 1;
        while (j < last && pte_resident(was[j - first]) && pte_prot(was[j - first]) == prot) ++j;
        if (!protect_locked(a, i, j, pte_to_prot(prot) & ~Prot::Write, 0, ops.repair, &result.unknown)) {
            if (!result.unknown) put_back();
            return result;
        }
        i = j;
    }
    auto hidden = [&](std::size_t i) {
        return pte_resident(was[i - first]) && (pte_prot(was[i - first]) == 0 || !kWriteInPlace);
    };
    for (std::size_t i = first; i < last;) {
        if (!hidden(i)) {
            ++i;
            continue;
        }
        std::size_t j = i + 1;
        while (j < last && hidden(j)) ++j;
        if (const int err = page_read_raw(a.page_addr(i), buffer + ((i - first) << g_page_shift), (j - i) << g_page_shift)) {
            put_back();
            result.error = err;
            return result;
        }
        i = j;
    }
    std::uint32_t copies = 0;
    for (std::size_t i = first; i < last && a.snapshot_count; ++i)
        if (pte_resident(was[i - first]))
            if (const int err = preserve_for_snapshots(a, i, pte_t(was[i - first] & ~kPteProt), &copies)) {
                put_back();
                result.error = err;
                return result;
            }
    enum Fate : std::uint8_t { Keep, Zero, Clean, Write };
    Fate fate[N];
    PageIo io[N];
    std::size_t writes = 0;
    for (std::size_t i = first; i < last; ++i) {
        std::byte* page = hidden(i) ? buffer + ((i - first) << g_page_shift) : reinterpret_cast<std::byte*>(a.page_addr(i));
        if (!pte_resident(was[i - first]))
            fate[i - first] = Keep;
        else if (s.slots[i].load(kRelaxed))
            fate[i - first] = Clean;
        else if (all_zeros(page))
            fate[i - first] = Zero;
        else {
            fate[i - first] = Write;
            io[writes++] = {0, page, 0};
        }
    }
    if (writes) {
        const int err = ops.write(s, io, writes);
        if (s.store_failing.load(kRelaxed) != (err != 0)) s.store_failing.store(err != 0, kRelaxed);
        if (err) {
            put_back();
            result.error = err;
            return result;
        }
    }
    if (!protect_locked(a, first, last, Prot::None, 0, ops.repair, &result.unknown)) {
        if (result.unknown) return result;
        for (std::size_t k = 0; k < writes; ++k) swap_release_slots(s, &io[k].slot, 1);  // rare: one at a time
        put_back();
        return result;
    }
    // Past the point of no return: the tracking of the pages ends with them (a failed eviction
    // above keeps its marks). userfaultfd's marks outlive a protection change; the kernel drops an
    // anonymous page's mark with the page, but not the marker it leaves where the page was.
    if (tracked && tracking_engine() == TrackingEngine::Uffd)
        uffd_write_protect(a.page_addr(first), (last - first) << g_page_shift, false);
    page_discard(a.page_addr(first), (last - first) << g_page_shift);
    std::size_t written = 0;
    for (std::size_t i = first; i < last; ++i) {
        const pte_t v = was[i - first];
        pte_t now = pte_t(v & ~(kPteProt | kPteWriteTracked | kPteInactive | kPteReadahead));
        switch (fate[i - first]) {
            case Keep:  // untouched, swapped out already, or read-only zero page: nothing in memory now
                break;
            case Zero:
                now = pte_t(now & ~kPtePopulated);
                break;
            case Write:
                s.slots[i].store(io[written++].slot + 1, kRelaxed);
                now = pte_t(now | kPteSwapped);
                break;
            case Clean:
                result.out.wasted += (v & kPteReadahead) != 0;
                now = pte_t(now | kPteSwapped);
                break;
        }
        a.note_resident(v, now);
        a.pte[i].store(pte_t(now | kPteLocked), kRelaxed);
    }
    unlock_ptes(a, first, last);
    result.out.written = writes;
    result.out.dropped = resident;
    account_swap_out(a, vma, result.out);
    result.done = true;
    return result;
}

}  // namespace

Evicted evict_pages(ArenaCore& a, Vma& vma, std::size_t first, std::size_t last, std::byte* buffer,
                    const EvictOps& ops) {
    return last - first <= kClusterPages ? evict_run<kClusterPages>(a, vma, first, last, buffer, ops)
                                         : evict_run<kEvictRunPages>(a, vma, first, last, buffer, ops);
}

FaultResult direct_reclaim(vm_fault& vmf) {
    ArenaCore& a = *vmf.arena;
    ArenaSwap& s = *a.swap;
    const std::int64_t limit = std::int64_t(s.limit.load(kRelaxed));
    if (!limit || a.resident.load(kRelaxed) < limit || s.store_failing.load(kRelaxed)) return FaultResult::Resolved;
    s.wake.fetch_add(1, std::memory_order_release);  // the reclaimer chooses the next victims
    futex_wake(s.wake);
    static constexpr EvictOps kFaultOps{false, swap_store_write, nullptr};
    std::byte* buffer = nullptr;  // claimed before any PTE lock is taken
    bool unknown = false;
    std::uintptr_t unknown_at = 0;
    for (std::size_t tries = 0; tries < kVictims && !vmf.direct_reclaim && !unknown; ++tries) {
        std::uint32_t c = 0;
        if (!swap_take_victim(s, &c)) break;
        if (!buffer) buffer = swap_claim_buffer(s);
        bool again = false;
        for_each_piece(a, c, [&](Vma& vma, std::size_t first, std::size_t last) {
            if (unknown) return;
            const Evicted e = evict_pages(a, vma, first, last, buffer, kFaultOps);
            if (e.unknown) {
                unknown = true;
                unknown_at = a.page_addr(first);
                return;
            }
            if (e.error) {
                account_store_error(a);
                // The address first: the reclaimer reads it after it sees the error (another
                // fault's failure may overwrite it, an address that failed all the same).
                if (!s.fault_error.load(kRelaxed)) s.fault_error_addr.store(a.page_addr(first), kRelaxed);
                int none = 0;
                s.fault_error.compare_exchange_strong(none, e.error, std::memory_order_release, kRelaxed);
            }
            again |= !e.done;
            vmf.direct_reclaim |= e.done && e.out.dropped > 0;
        });
        if (again)  // busy or refused: back in the reclaimer's queues
            s.fresh[c / 64].fetch_or(std::uint64_t(1) << (c % 64), kRelaxed);
    }
    if (buffer) swap_release_buffer(s, buffer);
    if (unknown) {
        if (vmf.diag)
            vmf.diag->str("usermm: direct reclaim at ")
                .hex(unknown_at)
                .str(": mprotect failed part way and could not be undone; the pages' protection is unknown");
        return FaultResult::Fatal;
    }
    if (!vmf.direct_reclaim && a.resident.load(kRelaxed) >= limit) {
        vmf.stalled = true;
        vmf.overran = swap_wait_for_reclaim(a);
    }
    return FaultResult::Resolved;
}

}  // namespace usermm::detail
