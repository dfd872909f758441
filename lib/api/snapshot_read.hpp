// Reading a snapshot while the arena keeps changing: each page comes from the snapshot's store if
// it was copied there, or from the arena if it has not changed, with its slot locked meanwhile.
// API world; used by Snapshot::read, for_each_page and the image writer.
#pragma once

#include <cstring>
#include <vector>

#include "arena_ops.hpp"
#include "snapshot.hpp"

namespace usermm::detail {

// Pages read out of the arena at once, their slots held meanwhile.
inline constexpr std::size_t kReadBatch = 64;

// Copies pages [first, first + n) of the snapshot, whose slots the caller locked, out of the arena,
// and says which were empty. While a slot is locked no write to its page can start, nor a discard:
// every writer gives the snapshot the page first, and waits for the slot to do so.
inline void read_locked_from_arena(const SnapshotCore& s, std::size_t first, std::size_t n, std::byte* dst, bool* zero) {
    const ArenaCore& a = *s.arena;
    // Populated means write access was granted; a page granted it by fault-around and never
    // written holds nothing, and reads as zeros. A page read before maps the kernel's zero page:
    // its content says so.
    // The PTEs first: a page seen swapped out is read from the store, whose copy stays while the
    // slot is held even if a read fault swaps the page in meanwhile; asked in the other order, a
    // page swapped in between would count as not held, and read as zeros.
    pte_t ptes[kReadBatch];
    for (std::size_t k = 0; k < n; ++k) ptes[k] = a.pte[first + k].load(std::memory_order_acquire);
    unsigned char held[kReadBatch];
    const bool known = n <= sizeof held;
    if (known) page_held(a.page_addr(first), n << g_page_shift, held);
    bool swapped[kReadBatch];
    for (std::size_t k = 0; k < n; ++k) {
        swapped[k] = ptes[k] & kPteSwapped;  // in the store: the kernel holds nothing for it
        zero[k] = !swapped[k] && (!(ptes[k] & kPtePopulated) || (known && !(held[k] & 1)));
    }
    for (std::size_t k = 0; k < n; ++k) {
        const std::size_t page = first + k;
        std::byte* out = dst + (k << g_page_shift);
        if (zero[k]) {
            std::memset(out, 0, g_page_size);
            continue;
        }
        if (swapped[k]) {
            PageIo io{a.swap->slots[page].load(std::memory_order_relaxed) - 1, out, 0};
            swap_store_read(*a.swap, &io, 1);
            if (io.error) {
                for (std::size_t u = 0; u < n; ++u) s.slot(first + u).store(kSlotInArena, std::memory_order_release);
                fail(io.error, "usermm::Snapshot: cannot read swapped-out arena page {:#x} from the store", a.page_addr(page));
            }
            zero[k] = all_zeros(out);
            continue;
        }
        std::size_t run = 1;  // populated neighbours come in one read
        while (k + run < n && !zero[k + run] && !swapped[k + run]) ++run;
        if (const int err = page_read_raw(a.page_addr(page), out, run << g_page_shift)) {
            for (std::size_t u = 0; u < n; ++u) s.slot(first + u).store(kSlotInArena, std::memory_order_release);
            fail(err, "usermm::Snapshot: cannot read arena page {:#x}", a.page_addr(page));
        }
        for (std::size_t u = k; u < k + run; ++u) zero[u] = all_zeros(dst + (u << g_page_shift));
        k += run - 1;
    }
    for (std::size_t k = 0; k < n; ++k) s.slot(first + k).store(kSlotInArena, std::memory_order_release);
}

// Whether `content` (zero: all zeros) is what snapshot `base` holds for `page`. The change records
// of an increment list every page granted write access, also those never written since (their
// neighbours' fault-around, prefault, a degraded fault); an increment from `base` skips them.
inline bool same_as_snapshot(const SnapshotCore& base, std::size_t page, const std::byte* content, bool zero) {
    switch (slot_content(settled_slot(base, page))) {
        case kSlotInArena: return true;  // unchanged in the arena since `base`, so since then
        case kSlotZero: return zero || all_zeros(content);
        default: return !zero && std::memcmp(base.stored(page), content, g_page_size) == 0;
    }
}

// Visits the snapshot's pages [first, last) in order with their content: fn(page, bytes, zero).
// Pages still in the arena are read in batches of up to kReadBatch with their slots locked.
// Asynchronous signals stay blocked throughout (fn included): a handler that wrote a page whose
// slot this thread holds would wait for this thread forever.
// A page whose slot and PTE both lie in untouched parts of their tables was zero at the snapshot
// (nothing populated it before, and whatever changes it now copies or zeroes its slot first); such
// pages are visited as zero only if `visit_zeros`, so that images and for_each_page cost what was
// touched, not what the snapshot covers.
template <typename Fn>
void visit_snapshot_pages(const SnapshotCore& s, std::size_t first, std::size_t last, Fn fn, bool visit_zeros = true) {
    AsyncSignalsBlocked blocked;
    const PageBuffer buffer(kReadBatch);  // aligned: swapped-out pages are read into it from the store
    std::vector<PageSpan> spans = slot_spans(s, first, last);
    if (s.arena) spans = span_union(std::move(spans), pte_spans(*s.arena, first, last));
    spans.push_back({last, last});
    std::size_t page = first;
    for (const PageSpan& span : spans) {
        for (; visit_zeros && page < span.first; ++page) fn(page, nullptr, true);
        for (page = span.first; page < span.last;) {
            const slot_t state = slot_content(s.arena ? lock_slot_if_in_arena(s, page) : settled_slot(s, page));
            if (state == kSlotCopied) {
                fn(page, s.stored(page), false);
                ++page;
                continue;
            }
            if (state == kSlotZero || !s.arena) {
                fn(page, nullptr, true);
                ++page;
                continue;
            }
            std::size_t n = 1;
            while (n < kReadBatch && page + n < span.last && lock_slot_if_in_arena(s, page + n) == kSlotTaken) ++n;
            // The loop above stops after a page whose slot was settled; that page is visited next.
            bool zero[kReadBatch];
            read_locked_from_arena(s, page, n, buffer.data(), zero);
            for (std::size_t k = 0; k < n; ++k) fn(page + k, buffer.data() + (k << g_page_shift), zero[k]);
            page += n;
        }
    }
}

}  // namespace usermm::detail
