// The lock between the two worlds: a writer-preferring reader-writer spin lock on one atomic word.
//
// Faults take the read side for the lookup and the whole resolution of a fault (as the kernel holds
// mmap_lock for reading), so an API call that changes VMAs or protections never interleaves with a
// resolution that read the old state. API calls take the write side and never touch arena pages
// while holding it; the holder's thread is recorded so that a fault under the write side (a bug)
// becomes a diagnostic instead of a deadlock.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cstdint>
#include <mutex>  // std::lock_guard takes the write side

#include "fault_world.hpp"
#include "lock_order.hpp"

namespace usermm::detail {

class RwSpinLock {
public:
    constexpr explicit RwSpinLock(LockRank rank) : rank_(rank) {}
    // Orders locks of one rank (an arena's: its base address); see lock_order.hpp.
    void set_order_key(std::uintptr_t key) { key_ = key; }

    void lock_shared() {
        lock_order_acquire(this, rank_, key_);
        for (unsigned spins = 0;; ++spins) {
            std::uint32_t s = state_.load(std::memory_order_relaxed);
            if (!(s & kWriter) && state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire))
                return;
            spin_backoff(spins);
        }
    }
    void unlock_shared() {
        state_.fetch_sub(1, std::memory_order_release);
        lock_order_release(this);
    }
    // The read side if no writer holds or waits for it; false at once otherwise (for an observer
    // that would rather come back later than spin through a writer's section).
    bool try_lock_shared() {
        std::uint32_t s = state_.load(std::memory_order_relaxed);
        while (!(s & kWriter))
            if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire)) {
                lock_order_acquire(this, rank_, key_);
                return true;
            }
        return false;
    }

    void lock() {
        lock_order_acquire(this, rank_, key_);
        for (unsigned spins = 0;; ++spins) {
            std::uint32_t s = state_.load(std::memory_order_relaxed);
            if (!(s & kWriter) && state_.compare_exchange_weak(s, s | kWriter, std::memory_order_acquire))
                break;
            spin_backoff(spins);
        }
        // New readers now wait; the ones inside finish their fault.
        for (unsigned spins = 0; state_.load(std::memory_order_acquire) & kReaders; ++spins) spin_backoff(spins);
        owner_.store(pthread_self(), std::memory_order_relaxed);
    }
    void unlock() {
        owner_.store(kNoOwner, std::memory_order_relaxed);
        state_.fetch_and(~kWriter, std::memory_order_release);
        lock_order_release(this);
    }

    // True when the calling thread holds the write side. Only the owner ever stores its own id and
    // it clears it before unlocking, so a thread reads its own id here only while it is the owner.
    bool held_by_me() const { return owner_.load(std::memory_order_relaxed) == pthread_self(); }

private:
    static constexpr std::uint32_t kWriter = 1u << 31;
    static constexpr std::uint32_t kReaders = kWriter - 1;

    static constexpr pthread_t kNoOwner = 0;  // glibc's pthread_t is a pointer, never 0 for a thread

    std::atomic<std::uint32_t> state_{0};
    std::atomic<pthread_t> owner_{kNoOwner};
    LockRank rank_;
    std::uintptr_t key_ = 0;
};

// A plain spin lock for short sections of the fault path that must not interleave.
class SpinLock {
public:
    constexpr explicit SpinLock(LockRank rank) : rank_(rank) {}
    void lock() {
        lock_order_acquire(this, rank_, 0);
        unsigned spins = 0;
        while (locked_.exchange(true, std::memory_order_acquire))
            while (locked_.load(std::memory_order_relaxed)) spin_backoff(spins++);
    }
    void unlock() {
        locked_.store(false, std::memory_order_release);
        lock_order_release(this);
    }

private:
    std::atomic<bool> locked_{false};
    LockRank rank_;
};

// The write side is taken with std::lock_guard. The read side has no standard guard without
// std::shared_lock's ownership checks, which throw (the fault world is built without exceptions).
template <class Lock>
class SharedGuard {
public:
    explicit SharedGuard(Lock& l) : l_(l) { l_.lock_shared(); }
    ~SharedGuard() { l_.unlock_shared(); }
    SharedGuard(const SharedGuard&) = delete;
    SharedGuard& operator=(const SharedGuard&) = delete;

private:
    Lock& l_;
};

}  // namespace usermm::detail
