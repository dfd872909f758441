// Copy-before-write: the part of the kernel's do_wp_page that a snapshot needs. Runs in the fault
// world, and in the API world under the arena's write lock.
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "account.hpp"
#include "page_ops.hpp"
#include "snapshot.hpp"
#include "swap_ops.hpp"

namespace usermm::detail {

namespace {

// A readable page is copied directly; one whose protection forbids reading (it was protected
// None, or reset by restore) is read through the kernel, since touching it here would fault
// inside the fault handler; one swapped out is read from the arena's store.
int copy_page(ArenaCore& arena, std::size_t page, pte_t pte, std::byte* dst) {
    const std::uintptr_t addr = arena.page_addr(page);
    if (pte & kPteSwapped) {
        PageIo io{arena.swap->slots[page].load(std::memory_order_relaxed) - 1, dst, 0};
        swap_store_read(*arena.swap, &io, 1);
        return io.error;
    }
    if (allows(pte_to_prot(pte), Prot::Read)) {
        copy_arena_page(dst, reinterpret_cast<const std::byte*>(addr));
        return 0;
    }
    return page_read_raw(addr, dst, g_page_size);
}

// A page that holds no data: never written since it was granted write access (fault-around,
// prefault, a degraded fault grant whole windows), or only read, so that it maps the kernel's zero
// page. Such a page is recorded as zero: copying it would cost a store page and put a page of zeros
// into every image. Its content says so; residency (mincore) would not: a page swapped out reads
// as not resident, and would be lost. A page that cannot be read directly is checked after its
// copy (see preserve_for_snapshots).
bool holds_no_data(std::uintptr_t addr, pte_t pte) {
    return allows(pte_to_prot(pte), Prot::Read) && all_zeros(reinterpret_cast<const std::byte*>(addr));
}

}  // namespace

int preserve_for_snapshots(ArenaCore& arena, std::size_t page, pte_t pte, std::uint32_t* copies) {
    const std::uintptr_t addr = arena.page_addr(page);
    for (std::size_t i = 0; i < arena.snapshot_count; ++i) {
        SnapshotCore& snap = *arena.snapshots[i];
        if (!snap.covers(page)) continue;
        const slot_t state = lock_slot_if_in_arena(snap, page);
        std::atomic<slot_t>& slot = snap.slot(page);
        if (state == kSlotCopiedSynced || state == kSlotZeroSynced) {
            // The snapshot has the page already; only "synced" goes. A plain store is enough: pages
            // are preserved one at a time (under their PTE lock or the arena's write lock), and
            // readers leave settled slots alone.
            slot.store(slot_content(state), std::memory_order_release);
            continue;
        }
        if (state != kSlotTaken) continue;  // copied or zero already
        if (!(pte & kPtePopulated) || holds_no_data(addr, pte)) {
            slot.store(kSlotZero, std::memory_order_release);
            continue;
        }
        const std::uint32_t at = snap.used.fetch_add(1, std::memory_order_relaxed);
        if (at >= snap.last - snap.first) {  // only after failed copies, each of which is fatal
            slot.store(kSlotInArena, std::memory_order_release);
            return ENOSPC;
        }
        std::byte* dst = snap.store + (std::size_t(at) << g_page_shift);
        // Past the pages a pooled store brings, the store is populated ahead of the copies in steps
        // that double up to kStoreChunk (at 0, 1, 2, 4, ..., then every kStoreChunk), so that a
        // snapshot given few copies commits few pages.
        const std::size_t backed = snap.store_shared ? 0 : snap.store_backed;
        if (at >= backed && (at == backed || (at < kStoreChunk ? (at & (at - 1)) == 0 : at % kStoreChunk == 0))) {
            const std::size_t step = at < kStoreChunk ? std::max<std::size_t>(at, 1) : kStoreChunk;
            const std::size_t n = std::min<std::size_t>(step, snap.last - snap.first - at);
            page_populate(reinterpret_cast<std::uintptr_t>(dst), n << g_page_shift);  // a miss only costs faults
        }
        if (const int err = copy_page(arena, page, pte, dst)) {
            slot.store(kSlotInArena, std::memory_order_release);
            return err;
        }
        if (all_zeros(dst)) {
            // Its store page goes back unless another copy took the next one meanwhile.
            std::uint32_t next = at + 1;
            snap.used.compare_exchange_strong(next, at, std::memory_order_relaxed);
            slot.store(kSlotZero, std::memory_order_release);
            continue;
        }
        snap.index[page - snap.first] = at;
        slot.store(kSlotCopied, std::memory_order_release);
        account_snapshot_copy(snap, at < snap.store_backed);
        ++*copies;
    }
    return 0;
}

}  // namespace usermm::detail
