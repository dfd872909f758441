// Reclaim and swap state an arena with a store shares between the worlds: its store, the slot of
// each page whose content the store holds, what the reclaimer knows of each cluster, and the
// resident count the limit is checked against. Arenas without a store have none of it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <usermm/store.hpp>

namespace usermm::detail {

// The unit of reclaim: an aligned cluster of pages (the kernel's SWAP_CLUSTER_MAX), evicted with one
// protection change, one store batch and one MADV_DONTNEED, so that the kernel's mappings stay few.
inline constexpr std::size_t kClusterPages = 32;

// ArenaSwap::clusters bits. Used: a fault resolved a page of the cluster since the reclaimer last
// looked (the fault world sets it; the reclaimer clears it). The rest belong to the reclaimer.
inline constexpr std::uint8_t kClusterUsed = 0x01;
inline constexpr std::uint8_t kClusterQueued = 0x02;  // in one of the policy's queues
inline constexpr std::uint8_t kClusterGhost = 0x04;   // evicted recently (S3-FIFO's ghost queue)
inline constexpr std::uint8_t kClusterFreq = 0x18;    // S3-FIFO's use count, 0..3
inline constexpr std::uint8_t kClusterFreqOne = 0x08;
// In the ring of victims chosen ahead (ArenaSwap::victims): no queue takes it meanwhile; whoever
// takes it from the ring clears the bit, and queues it again (its fresh bit) if it was used since.
inline constexpr std::uint8_t kClusterChosen = 0x20;

// A store call the fault world hands to usermm's I/O thread, for a store that may not run in a
// signal handler. The faulting thread fills it, bumps `state` to kIoPosted and waits (futex) until
// the I/O thread sets kIoDone.
inline constexpr std::uint32_t kIoFree = 0, kIoClaimed = 1, kIoPosted = 2, kIoDone = 3;
enum class SwapOp : std::uint8_t { Read, Write, Release };  // Write: allocate slots, then write
struct SwapRequest {
    std::atomic<std::uint32_t> state{kIoFree};
    SwapOp op = SwapOp::Read;
    int error = 0;  // Write: the batch's error (EvictOps::write)
    PageIo* pages = nullptr;
    std::size_t count = 0;
};
inline constexpr std::size_t kSwapRequests = 16;
// How long a faulting thread watches for its request's answer, and the I/O thread for the next
// request, before each sleeps on its futex: a wake-up costs more than a loopback round trip's
// share of it, and a fault on a far store waits about one round trip.
inline constexpr std::int64_t kIoSpinNs = 100'000;
// Buffers a fault reads a cluster into before the pages become accessible: claimed with a bit each.
inline constexpr std::size_t kSwapBuffers = 8;
// Victims the reclaimer chose ahead, for a fault's direct reclaim (and its own next batches).
inline constexpr std::size_t kVictims = 8;

struct ArenaSwap {
    Store* store = nullptr;
    bool direct = false;  // store->async_signal_safe(): faults call it themselves
    // One per page: the slot + 1 while the store holds the page's content (swapped out, or swapped
    // in by a read and not written since: then evicting it again needs no write), else 0.
    std::atomic<std::uint64_t>* slots = nullptr;
    std::size_t slot_bytes = 0;
    std::atomic<std::uint8_t>* clusters = nullptr;  // one per cluster of the arena
    std::size_t cluster_bytes = 0;
    // One bit per cluster: used by a fault while not queued, so that the reclaimer queues it.
    std::atomic<std::uint64_t>* fresh = nullptr;
    std::size_t fresh_bytes = 0;
    std::atomic<std::uint64_t> limit{0};  // pages; 0: no limit
    // Futexes: the reclaimer sleeps on `wake`; faults at the limit sleep on `progress`, which the
    // reclaimer bumps after each batch.
    std::atomic<std::uint32_t> wake{0};
    std::atomic<std::uint32_t> progress{0};
    // Swap readahead: the page after the last swap-in, and the window that follows a sequential reader.
    std::atomic<std::uint64_t> ra_next{0};
    std::atomic<std::uint32_t> ra_window{1};
    std::byte* buffers = nullptr;  // kSwapBuffers × kClusterPages pages, page-aligned
    std::atomic<std::uint32_t> buffers_busy{0};
    SwapRequest requests[kSwapRequests];
    std::atomic<std::uint32_t> io_wake{0};  // futex: the I/O thread sleeps on it
    std::atomic<bool> reported{false};      // the first store error was reported
    // The next clusters to evict, in the policy's order, taken by whichever reclaims first: the
    // policy's queues live in the API world, so the reclaimer chooses for the faults that will
    // find the arena at its hard limit. A ring: the reclaimer alone fills it at victims_tail;
    // reclaimers take at victims_head with a CAS (64-bit counts do not wrap).
    std::atomic<std::uint32_t> victims[kVictims];
    std::atomic<std::uint64_t> victims_head{0};
    std::atomic<std::uint64_t> victims_tail{0};
    // A store error met by a fault's direct reclaim, for the reclaimer's thread to report (errors
    // met while one waits are counted, and reported with it).
    std::atomic<int> fault_error{0};
    // The store's last write batch failed: faults at the limit neither evict nor wait (every one
    // would fail or stall in turn) until a batch succeeds again; the arena runs over its limit.
    std::atomic<bool> store_failing{false};
    std::atomic<std::uintptr_t> fault_error_addr{0};
};

}  // namespace usermm::detail
