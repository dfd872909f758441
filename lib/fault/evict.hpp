// Eviction of anonymous pages to the arena's store: the one implementation both reclaimers run,
// usermm's kswapd (lib/api/reclaim.cpp) and a fault's direct reclaim at the hard limit
// (swap_direct_reclaim). The kernel's shrink_folio_list for one cluster.
#pragma once

#include <cstddef>
#include <cstdint>

#include "account.hpp"
#include "fault.hpp"
#include "vma.hpp"

namespace usermm::detail {

// How the caller's world shapes an eviction.
struct EvictOps {
    // Wait for faults that hold one of the pages' PTE locks (the reclaimer), or give the pages up at
    // once (a fault's direct reclaim, which must never wait on another fault).
    bool wait_for_ptes;
    // Allocates a slot for each page and writes the batch to the store; 0, or the batch's error
    // (ENOSPC: the store is full; else the first page's error), with no slot kept on failure.
    int (*write)(ArenaSwap& s, PageIo* pages, std::size_t n);
    // mprotect failed part way and putting the pages back failed too: make the (locked) PTEs what
    // the kernel has. Null where that cannot be known (the fault world): the PTEs stay locked and
    // the eviction reports `unknown`.
    void (*repair)(ArenaCore& a, std::size_t first, std::size_t last);
};

struct Evicted {
    SwapOut out;
    int error = 0;         // the store's, for a batch that could not be written: nothing changed
    bool done = false;     // false: nothing could be done now (busy, the map budget, an error)
    bool unknown = false;  // the kernel's protection of the pages is unknown; their PTEs stay locked
};

// The longest run one eviction takes (PageOut's: 1 MiB of 4 KiB pages in one store batch); the
// reclaimers evict a cluster at a time.
inline constexpr std::size_t kEvictRunPages = 8 * kClusterPages;

// Pages [first, last) of `vma` (at most kEvictRunPages) leave memory: those that hold data go to
// the store, unless it holds them already (swapped in by a read, not written since); zero pages
// are dropped. The store reads the pages the program may read where they are, read-only from
// before their content is looked at until they are dropped (no write can slip between the copy
// and the drop); those it may not read are copied into `buffer` (last - first pages) first and
// stay inaccessible. Then PROT_NONE. Their PTEs are locked meanwhile, so a fault on one waits and
// then finds it swapped out. Live snapshots take what they still need first. A store that refuses
// any page leaves them all as they were. Under the arena's read lock.
Evicted evict_pages(ArenaCore& a, Vma& vma, std::size_t first, std::size_t last, std::byte* buffer, const EvictOps& ops);

// Gives the locked pages [first, last) `prot`, counting the kernel mappings the change makes
// against the map budget as a fault's install() does; their PTEs get it, and those with content
// gain `mark`. False if the budget or the kernel refuses: then the pages are as they were, or,
// where even that failed, as `repair` found them (*unknown set where it cannot).
bool protect_locked(ArenaCore& a, std::size_t first, std::size_t last, Prot prot, pte_t mark,
                    void (*repair)(ArenaCore&, std::size_t, std::size_t), bool* unknown);

// Takes the PTE locks of pages [first, last), waiting for faults that hold one: a fault never waits
// for a second PTE while it holds one, so waiting here cannot close a cycle.
void lock_ptes(ArenaCore& a, std::size_t first, std::size_t last);
// The same without waiting: false, with none of them locked, if another thread holds one.
bool try_lock_ptes(ArenaCore& a, std::size_t first, std::size_t last);
void unlock_ptes(ArenaCore& a, std::size_t first, std::size_t last);

// Before a fault is resolved, under the arena's read lock and holding no PTE lock: an arena at its
// hard resident limit reclaims a batch in the faulting thread, as the kernel's direct reclaim does
// before it allocates a page (so that the page the fault brings in is not exposed to a reclaimer
// while the fault waits): the next victim the
// reclaimer chose (a cluster used since is passed over), evicted here with the store called
// directly or through the I/O thread. With no victim ready (the reclaimer has not chosen yet, or
// every one was busy) the fault waits for the reclaimer a bounded time. Fatal only if the kernel's
// protection of the pages became unknown.
FaultResult direct_reclaim(vm_fault& vmf);

// Every anonymous VMA piece of cluster c, in address order: fn(vma, first page, last page).
template <typename Fn>
void for_each_piece(ArenaCore& a, std::size_t c, Fn fn) {
    const std::size_t first = c * kClusterPages;
    const std::size_t last = first + kClusterPages < a.page_index(a.end) ? first + kClusterPages : a.page_index(a.end);
    for (auto it = a.tree.upper_bound(a.page_addr(first)); it != a.tree.end() && it->start < a.page_addr(last); ++it) {
        if (it->kind() != VmaKind::Anonymous) continue;
        const std::size_t lo = a.page_index(it->start), hi = a.page_index(it->end);
        fn(*it, lo > first ? lo : first, hi < last ? hi : last);
    }
}

}  // namespace usermm::detail
