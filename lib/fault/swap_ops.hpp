// The fault world's side of reclaim and swap: store calls, swap-in buffers, the cluster a fault
// used, and the wait of a fault that finds its arena at the resident limit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vma.hpp"

namespace usermm::detail {

// Futexes on 32-bit atomics (async-signal-safe: one system call each). futex_wait returns when the
// value is no longer `seen`, at a wake, or after timeout_ns (0: none).
void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen, long timeout_ns);
void futex_wake(std::atomic<std::uint32_t>& word);

// Reads a batch from the arena's store: directly if the store may run in a signal handler, else
// through usermm's I/O thread, waiting for it. Each page's `error` says how it went.
void swap_store_read(ArenaSwap& s, PageIo* pages, std::size_t n);
// Gives a page's store copy up (a write is about to make it stale, or the page is discarded).
void swap_drop_copy(ArenaSwap& s, std::size_t page);
// The same in two steps, for a fault that holds the install lock: the copy stops counting at
// once (0, or the slot + 1 to release), and the slots are released once the lock is let go.
std::uint64_t swap_take_copy(ArenaSwap& s, std::size_t page);
void swap_release_slots(ArenaSwap& s, std::uint64_t* slots, std::size_t n);

// A buffer of kClusterPages pages for one swap-in, waited for if all are taken.
std::byte* swap_claim_buffer(ArenaSwap& s);
void swap_release_buffer(ArenaSwap& s, std::byte* buffer);

// A fault resolved page `page`: its cluster is used, and queued by the reclaimer if it is new.
void swap_note_use(ArenaSwap& s, std::size_t page);

// Allocates a slot per page and writes the batch (a direct store's, or the I/O thread's call):
// 0, or the batch's error (ENOSPC: too few slots; else the first page's), with every slot it
// allocated released again. *got: the slots allocated so far (for a caller that catches a throw).
int swap_write_batch(Store& store, PageIo* pages, std::size_t n, std::uint64_t* slots, std::size_t* got);
// The same from the fault world (a cluster at most): directly, or through the I/O thread.
int swap_store_write(ArenaSwap& s, PageIo* pages, std::size_t n);

// The victims the reclaimer chose ahead, first chosen first taken: it offers (false when all
// kVictims places are taken; only the reclaimer offers), whichever reclaims next takes one (false
// when there is none). One used since it was chosen is not taken but given back to the reclaimer.
bool swap_offer_victim(ArenaSwap& s, std::uint32_t cluster);
bool swap_take_victim(ArenaSwap& s, std::uint32_t* cluster);

// Under the arena's read lock, when the arena is at its resident limit and nothing could be
// evicted at once: wakes the reclaimer and waits for its progress, a bounded time (the read lock
// held keeps the arena alive; a writer waiting meanwhile waits no longer than that). Returns
// whether the arena is still at its limit: the fault goes on over it.
bool swap_wait_for_reclaim(ArenaCore& a);

}  // namespace usermm::detail
