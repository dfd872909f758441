// Snapshots: the state a fault needs to keep a point-in-time view of arena pages.
//
// A snapshot covers pages [first, last) of its arena. For each of them a slot says where the
// snapshot's content of that page is now:
//  - kSlotInArena: the arena page has not changed since the snapshot; read it there. Write access
//    to such a page is withheld (write-tracked) until the slot changes.
//  - kSlotCopied: the old content was copied into the snapshot's store (copy-before-write).
//  - kSlotZero: the page held nothing at the snapshot (never written, or discarded since).
//  - kSlotCopiedSynced / kSlotZeroSynced: as kSlotCopied / kSlotZero, and restore() has made the
//    arena page equal to it again. The next change of the page only drops "synced" (nothing to
//    copy), and a later restore() skips the page. Copies in the store are never rewritten, so a
//    reader may use one without holding the slot.
// A slot is locked (kSlotBusy) while its content moves, by a fault copying it or by a reader
// copying from the arena, so that a reader never sees half a write.
//
// The store is a log: address space reserved with MAP_NORESERVE for one page per covered page,
// filled from the start in the order pages are copied, so that only pages actually copied cost
// memory, and so that the log can be populated a chunk ahead of the copies (one kernel call per
// kStoreChunk copies instead of a page fault each). A store may come from the store pool, its first
// pages still there from the snapshot that used it before: those need no populating. Store, index and slots exist before the
// snapshot is visible to any fault.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "counters.hpp"
#include "vma.hpp"

namespace usermm::detail {

using slot_t = std::uint8_t;
inline constexpr slot_t kSlotInArena = 0;
inline constexpr slot_t kSlotCopied = 1;
inline constexpr slot_t kSlotZero = 2;
inline constexpr slot_t kSlotCopiedSynced = 3;
inline constexpr slot_t kSlotZeroSynced = 4;

// What the snapshot holds for a settled slot: kSlotInArena, kSlotCopied or kSlotZero.
inline constexpr slot_t slot_content(slot_t v) {
    return v == kSlotCopiedSynced ? kSlotCopied : v == kSlotZeroSynced ? kSlotZero : v;
}
inline constexpr slot_t kSlotBusy = 0x80;

inline constexpr std::size_t kStoreChunk = 64;  // store pages populated at once, at most

struct SnapshotCore {
    // nullptr once the arena is gone: every slot then holds its content, kSlotInArena meaning zero
    // (a page of which the arena held nothing, see ~Arena).
    ArenaCore* arena = nullptr;
    std::uintptr_t arena_base = 0;
    std::size_t arena_size = 0;
    std::uint64_t arena_id = 0;  // which arena, even after it is gone and its addresses reused
    std::array<std::uint64_t, 2> chain{};  // the arena's identity when the snapshot was taken
    std::size_t first = 0;       // arena page indices
    std::size_t last = 0;
    std::uint64_t sequence = 0;  // 1, 2, ... per arena, in the order snapshots were taken
    // A whole-arena snapshot: the anonymous VMAs only. The pages of file VMAs are zero slots from the
    // start, so nothing copies them, and restore() leaves file VMAs as they are.
    bool anonymous_only = false;
    std::byte* store = nullptr;  // (last - first) pages at least (store_pages), MAP_NORESERVE
    std::size_t store_pages = 0;
    // The store's first pages, written by the copies of a released snapshot whose store this one
    // reuses (store_pool.hpp): a copy there needs no page populated, unless a fork shared them with
    // a child since (store_shared): then they are populated ahead as fresh ones are, which takes
    // their copy-on-write in one call per chunk instead of a fault per copy.
    std::size_t store_backed = 0;
    bool store_shared = false;
    std::uint64_t store_forks = 0;  // store_pool.hpp's count when the store was taken
    std::uint32_t* index = nullptr;  // per covered page: where in the store its copy is
    std::atomic<std::uint32_t> used{0};  // store pages handed out
    std::atomic<slot_t>* slots = nullptr;
    Counters stats;  // cow_faults, cow_bytes_copied, pages_restored of this snapshot
    // API world only: the VMAs of the range when the snapshot was taken, for restore and images.
    struct VmaRecord {
        std::uintptr_t start;
        std::uintptr_t end;
        Prot prot;
        std::uint32_t fault_around_pages;
        char name[kVmaNameMax];
    };
    std::vector<VmaRecord> vmas;

    bool covers(std::size_t page) const { return page >= first && page < last; }
    std::atomic<slot_t>& slot(std::size_t page) const { return slots[page - first]; }
    // The copy of a page whose slot is kSlotCopied.
    std::byte* stored(std::size_t page) const { return store + (std::size_t(index[page - first]) << g_page_shift); }
    std::uintptr_t page_addr(std::size_t page) const { return arena_base + (std::uintptr_t(page) << g_page_shift); }
};

// Whether a page's bytes are all zeros: a snapshot records such a page as zero rather than copy it.
// It reads arena pages that writers may write as soon as their protection is lifted: the kernel
// orders the two, which ThreadSanitizer cannot see. Left uninstrumented, it also gives no shadow
// memory to every page it checks (a prefault of gigabytes would need gigabytes of it). A stack's
// page holds AddressSanitizer's poisoned redzones, which a snapshot copies as they are.
__attribute__((no_sanitize("thread", "address"))) inline bool all_zeros(const std::byte* page) {
    const auto* words = reinterpret_cast<const std::uint64_t*>(page);
    for (std::size_t k = 0; k < g_page_size / sizeof *words; ++k)
        if (words[k]) return false;
    return true;
}

// Copies an arena page, for the same reasons uninstrumented, and not through memcpy, which the
// sanitizers intercept. On x86-64 as the kernel copies a page for copy-on-write, with `rep movsb`
// (moved by whole cache lines on processors with ERMS): a page from and to memory out of the cache,
// as a first write's copy is, took 0.65-0.7 us this way against 1.0 us by a loop of word moves.
__attribute__((no_sanitize("thread", "address"), optimize("no-tree-loop-distribute-patterns"))) inline void
copy_arena_page(std::byte* dst, const std::byte* page) {
#if defined(__x86_64__)
    std::size_t n = g_page_size;
    asm volatile("rep movsb" : "+D"(dst), "+S"(page), "+c"(n) : : "memory");
#else
    auto* to = reinterpret_cast<std::uint64_t*>(dst);
    const auto* from = reinterpret_cast<const std::uint64_t*>(page);
    const std::size_t words = g_page_size / sizeof *to;
    for (std::size_t k = 0; k < words; ++k) to[k] = from[k];
#endif
}

// The state of a page's slot once nobody holds it: a reader copying the page out of the arena holds
// it only for that copy, and takes no lock that the caller may hold.
inline slot_t settled_slot(const SnapshotCore& s, std::size_t page) {
    for (unsigned spins = 0;; ++spins) {
        const slot_t v = s.slot(page).load(std::memory_order_acquire);
        if (!(v & kSlotBusy)) return v;
        spin_backoff(spins);
    }
}

// What lock_slot_if_in_arena() returns when it took the slot: the caller holds it now.
inline constexpr slot_t kSlotTaken = kSlotBusy;

// Takes the slot of `page` if the page's snapshot content is still in the arena (returns
// kSlotTaken); otherwise returns the settled state, which the caller does not hold.
inline slot_t lock_slot_if_in_arena(const SnapshotCore& s, std::size_t page) {
    for (;;) {
        slot_t v = settled_slot(s, page);
        if (v != kSlotInArena) return v;
        if (s.slot(page).compare_exchange_weak(v, kSlotBusy, std::memory_order_acquire, std::memory_order_relaxed))
            return kSlotTaken;
    }
}

// Fault world (also used by the API under the write lock). Before arena page `page`, whose PTE is
// `pte`, can change (write access, discard, restore; the caller holds the PTE lock or the write
// lock): every live snapshot that still reads the page from the arena gets its content now.
// Adds the number of copies made to *copies; returns 0 or the errno of a failed read of the page.
int preserve_for_snapshots(ArenaCore& arena, std::size_t page, pte_t pte, std::uint32_t* copies);

}  // namespace usermm::detail
