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

#include "fault_world.hpp"

namespace usermm::detail {

class RwSpinLock {
public:
    void lock_shared() {
        for (unsigned spins = 0;; ++spins) {
            std::uint32_t s = state_.load(std::memory_order_relaxed);
            if (!(s & kWriter) && state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire))
                return;
            backoff(spins);
        }
    }
    void unlock_shared() { state_.fetch_sub(1, std::memory_order_release); }

    void lock() {
        for (unsigned spins = 0;; ++spins) {
            std::uint32_t s = state_.load(std::memory_order_relaxed);
            if (!(s & kWriter) && state_.compare_exchange_weak(s, s | kWriter, std::memory_order_acquire))
                break;
            backoff(spins);
        }
        // New readers now wait; the ones inside finish their fault.
        for (unsigned spins = 0; state_.load(std::memory_order_acquire) & kReaders; ++spins) backoff(spins);
        owner_.store(pthread_self(), std::memory_order_relaxed);
        owned_.store(true, std::memory_order_relaxed);
    }
    void unlock() {
        owned_.store(false, std::memory_order_relaxed);
        state_.fetch_and(~kWriter, std::memory_order_release);
    }

    // True when the calling thread holds the write side.
    bool held_by_me() const {
        return owned_.load(std::memory_order_relaxed) &&
               pthread_equal(owner_.load(std::memory_order_relaxed), pthread_self());
    }

private:
    static constexpr std::uint32_t kWriter = 1u << 31;
    static constexpr std::uint32_t kReaders = kWriter - 1;

    static void backoff(unsigned spins) {
        if (spins < 64)
            cpu_relax();
        else
            sched_yield();  // the other side may be preempted on our core
    }

    std::atomic<std::uint32_t> state_{0};
    std::atomic<pthread_t> owner_{};
    std::atomic<bool> owned_{false};
};

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

template <class Lock>
class ExclusiveGuard {
public:
    explicit ExclusiveGuard(Lock& l) : l_(l) { l_.lock(); }
    ~ExclusiveGuard() { l_.unlock(); }
    ExclusiveGuard(const ExclusiveGuard&) = delete;
    ExclusiveGuard& operator=(const ExclusiveGuard&) = delete;

private:
    Lock& l_;
};

}  // namespace usermm::detail
