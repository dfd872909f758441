// Reclaim and swap for arenas made with a store: usermm's kswapd (one thread per arena with a
// resident limit), the page-replacement policies, eviction, and the I/O thread through which the
// fault world calls a store that may not run in a signal handler.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include <usermm/usermm.hpp>

#include "account.hpp"
#include "arena_ops.hpp"
#include "evict.hpp"
#include "vma.hpp"

namespace usermm::detail {

class Reclaimer {
public:
    // Sets up the arena's swap state (tables, buffers) for `options.store`; throws on bad input.
    Reclaimer(ArenaCore& a, const ArenaOptions& options);
    ~Reclaimer();  // stops the threads; releases every slot the arena holds
    Reclaimer(const Reclaimer&) = delete;
    Reclaimer& operator=(const Reclaimer&) = delete;

    // Without the arena's lock: the new limit (pages, 0 for none); a lower one is reclaimed down to
    // before returning.
    void set_limit(const char* call, std::uint64_t pages);
    // Under the arena's write lock: Advice::PageOut and Advice::Cold on part of an anonymous VMA.
    void page_out(const char* call, Vma& vma, Range part);
    void cold(Range part);
    // Under the arena's write lock, after a call that filled memory without faults (restore):
    // evicts down to the low watermark, so that the arena leaves the call within its limit.
    void shrink_locked();
    // The arena is being destroyed: the reclaimer stops before the arena's lock is taken for good
    // (the I/O thread stays, for snapshots that read swapped pages on the way out).
    void stop_kswapd();
    // fork(): before it, with every lock held, one more reference to each slot the arena holds
    // (false if the store refused); in the child, the threads again.
    bool retain_for_fork();
    void after_fork_child();
    // Under the arena's write lock, for Arena::verify: a cluster marked queued is in a queue, and one
    // marked chosen is in the victims ring; one marked but in neither could never be evicted again.
    void verify(const char* call);

private:
    Evicted evict(Vma& vma, std::size_t first, std::size_t last);
    bool deactivate(std::size_t cluster);
    // Under the arena's read lock: one cluster chosen by the policy and evicted, unless the arena is
    // at `target` pages or below already. False when none can be evicted.
    bool reclaim_one(std::int64_t target);
    bool reclaim_to(std::int64_t target);  // false if it stopped for want of progress
    void deliver_errors();
    void discover();
    void rescan();
    enum class Place : bool { Last, First };  // First: Advice::Cold's, first in line
    void enqueue(std::uint32_t cluster, Place place = Place::Last);
    bool pick(std::uint32_t* victim);
    bool next_victim(std::uint32_t* victim);
    void choose_ahead();
    void report(int err, std::uintptr_t addr);
    void start_threads();
    static void* kswapd_main(void* self);
    static void* io_main(void* self);

    ArenaCore& a_;
    ArenaSwap swap_;
    Policy policy_;
    std::function<void(int, const void*)> on_error_;
    std::byte* buffer_ = nullptr;  // kEvictRunPages pages: what eviction copies of pages the program may not read
    std::size_t clusters_ = 0;

    std::mutex queue_lock_;  // after the arena's lock, before its install lock
    std::deque<std::uint32_t> small_, main_, ghost_;
    std::mutex errors_lock_;  // a leaf
    std::vector<std::pair<int, std::uintptr_t>> errors_;  // to report on the reclaimer's thread
    std::mutex threads_lock_;
    std::atomic<bool> stop_{false};
    std::atomic<bool> kswapd_stop_{false};
    // The store refused to share its slots at a fork: in the child the arena stops using it (two
    // processes handing out the same slots of one device would overwrite each other's pages).
    bool unshared_ = false;
    bool detached_ = false;
    bool kswapd_running_ = false;
    bool io_running_ = false;
    pthread_t kswapd_{};
    pthread_t io_{};
};

}  // namespace usermm::detail
