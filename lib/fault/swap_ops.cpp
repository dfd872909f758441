#include "swap_ops.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>

#include "fault_world.hpp"

namespace usermm::detail {

namespace {
constexpr auto kRelaxed = std::memory_order_relaxed;

std::uint32_t* futex_word(std::atomic<std::uint32_t>& word) { return reinterpret_cast<std::uint32_t*>(&word); }

std::int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Hands a batch to the I/O thread and waits for it; the batch's error for a write.
int through_io_thread(ArenaSwap& s, PageIo* pages, std::size_t n, SwapOp op) {
    for (unsigned spins = 0;; ++spins) {
        for (SwapRequest& r : s.requests) {
            std::uint32_t free = kIoFree;
            if (!r.state.compare_exchange_strong(free, kIoClaimed, std::memory_order_acquire, kRelaxed)) continue;
            r.pages = pages;
            r.count = n;
            r.op = op;
            r.error = 0;
            r.state.store(kIoPosted, std::memory_order_release);
            s.io_wake.fetch_add(1, std::memory_order_release);
            futex_wake(s.io_wake);
            // A far store answers in tens of microseconds: a thread that sleeps at once pays a
            // wake-up on top (several µs on a VM), so it watches for the answer a while first.
            for (const std::int64_t until = now_ns() + kIoSpinNs;
                 r.state.load(std::memory_order_acquire) != kIoDone && now_ns() < until;)
                cpu_relax();
            while (r.state.load(std::memory_order_acquire) != kIoDone) futex_wait(r.state, kIoPosted, 0);
            const int err = r.error;
            r.state.store(kIoFree, std::memory_order_release);
            return err;
        }
        spin_backoff(spins);  // every request slot is taken: another fault's batch finishes first
    }
}
}  // namespace

void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t seen, long timeout_ns) {
    timespec ts{timeout_ns / 1000000000, timeout_ns % 1000000000};
    syscall(SYS_futex, futex_word(word), FUTEX_WAIT_PRIVATE, seen, timeout_ns ? &ts : nullptr, nullptr, 0);
}

void futex_wake(std::atomic<std::uint32_t>& word) {
    syscall(SYS_futex, futex_word(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

void swap_store_read(ArenaSwap& s, PageIo* pages, std::size_t n) {
    if (s.direct)
        s.store->read({pages, n});
    else
        through_io_thread(s, pages, n, SwapOp::Read);
}

std::uint64_t swap_take_copy(ArenaSwap& s, std::size_t page) { return s.slots[page].exchange(0, kRelaxed); }

void swap_release_slots(ArenaSwap& s, std::uint64_t* slots, std::size_t n) {
    if (!n) return;
    if (s.direct) {
        s.store->release({slots, n});
        return;
    }
    PageIo io[kClusterPages];
    for (std::size_t done = 0; done < n;) {
        const std::size_t k = std::min(n - done, kClusterPages);
        for (std::size_t i = 0; i < k; ++i) io[i] = {slots[done + i], nullptr, 0};
        through_io_thread(s, io, k, SwapOp::Release);
        done += k;
    }
}

void swap_drop_copy(ArenaSwap& s, std::size_t page) {
    if (std::uint64_t held = swap_take_copy(s, page)) {
        --held;
        swap_release_slots(s, &held, 1);
    }
}

std::byte* swap_claim_buffer(ArenaSwap& s) {
    for (unsigned spins = 0;; ++spins) {
        std::uint32_t busy = s.buffers_busy.load(kRelaxed);
        const std::uint32_t free = ~busy & ((1u << kSwapBuffers) - 1);
        if (free) {
            const std::uint32_t bit = free & -free;
            if (s.buffers_busy.compare_exchange_weak(busy, busy | bit, std::memory_order_acquire, kRelaxed))
                return s.buffers + std::size_t(std::countr_zero(bit)) * (kClusterPages << g_page_shift);
            continue;
        }
        spin_backoff(spins);
    }
}

void swap_release_buffer(ArenaSwap& s, std::byte* buffer) {
    const std::size_t i = std::size_t(buffer - s.buffers) / (kClusterPages << g_page_shift);
    s.buffers_busy.fetch_and(~(1u << i), std::memory_order_release);
}

void swap_note_use(ArenaSwap& s, std::size_t page) {
    const std::size_t c = page / kClusterPages;
    const std::uint8_t old = s.clusters[c].fetch_or(kClusterUsed, kRelaxed);
    if (!(old & kClusterQueued)) s.fresh[c / 64].fetch_or(std::uint64_t(1) << (c % 64), kRelaxed);
}

int swap_write_batch(Store& store, PageIo* pages, std::size_t n, std::uint64_t* slots, std::size_t* got) {
    *got = store.allocate({slots, n});
    for (std::size_t k = 0; k < *got; ++k) pages[k].slot = slots[k];
    int err = *got == n ? 0 : ENOSPC;
    if (!err) store.write({pages, n});
    for (std::size_t k = 0; k < n && !err; ++k) err = pages[k].error;
    if (err) {
        const std::size_t allocated = *got;
        *got = 0;  // released here: a caller that catches a throw from release() must not again
        store.release({slots, allocated});
    }
    return err;
}

int swap_store_write(ArenaSwap& s, PageIo* pages, std::size_t n) {
    if (!s.direct) return through_io_thread(s, pages, n, SwapOp::Write);
    std::uint64_t slots[kClusterPages];
    std::size_t got = 0;
    return swap_write_batch(*s.store, pages, n, slots, &got);
}

bool swap_offer_victim(ArenaSwap& s, std::uint32_t cluster) {
    const std::uint64_t tail = s.victims_tail.load(kRelaxed);
    if (tail - s.victims_head.load(std::memory_order_acquire) >= kVictims) return false;
    s.victims[tail % kVictims].store(cluster, kRelaxed);
    s.victims_tail.store(tail + 1, std::memory_order_release);
    return true;
}

bool swap_take_victim(ArenaSwap& s, std::uint32_t* cluster) {
    std::uint64_t head = s.victims_head.load(kRelaxed);
    for (;;) {
        if (head == s.victims_tail.load(std::memory_order_acquire)) return false;
        // The place cannot be filled again before head moves past it, so a successful CAS means
        // the value read is the one offered there.
        const std::uint32_t c = s.victims[head % kVictims].load(kRelaxed);
        if (!s.victims_head.compare_exchange_weak(head, head + 1, std::memory_order_acq_rel, kRelaxed)) continue;
        const std::uint8_t old = s.clusters[c].fetch_and(std::uint8_t(~kClusterChosen), kRelaxed);
        if (!(old & kClusterUsed)) {
            *cluster = c;
            return true;
        }
        // Used since it was chosen: back to the reclaimer's queues, and the next one.
        s.fresh[c / 64].fetch_or(std::uint64_t(1) << (c % 64), kRelaxed);
        head = s.victims_head.load(kRelaxed);
    }
}

bool swap_wait_for_reclaim(ArenaCore& a) {
    ArenaSwap& s = *a.swap;
    const std::int64_t limit = std::int64_t(s.limit.load(kRelaxed));
    // A few rounds of the reclaimer's batches at most: a reclaimer that cannot make progress (the
    // store refuses writes) must not stop the program, only let it run over the limit.
    for (int round = 0; round < 8 && limit && a.resident.load(kRelaxed) >= limit; ++round) {
        const std::uint32_t seen = s.progress.load(std::memory_order_acquire);
        s.wake.fetch_add(1, std::memory_order_release);
        futex_wake(s.wake);
        futex_wait(s.progress, seen, 2000000);
    }
    return limit && a.resident.load(kRelaxed) >= limit;
}

}  // namespace usermm::detail
