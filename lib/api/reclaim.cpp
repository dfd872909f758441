#include "reclaim.hpp"

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <bit>
#include <memory>
#include <utility>
#include <vector>
#include <cstdio>
#include <cstring>

#include "account.hpp"
#include "evict.hpp"
#include "find_vma.hpp"
#include "map_budget.hpp"
#include "page_ops.hpp"
#include "page_ops_api.hpp"
#include "snapshot.hpp"
#include "swap_ops.hpp"
#include "write_tracking.hpp"

namespace usermm::detail {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr long kIdleNs = 100'000'000;  // the reclaimer looks again this often while nothing wakes it

std::uint8_t freq_of(std::uint8_t state) { return std::uint8_t((state & kClusterFreq) / kClusterFreqOne); }

// mprotect failed part way and could not be undone: the locked PTEs become what the kernel has.
void repair_from_kernel(ArenaCore& a, std::size_t first, std::size_t last) {
    for (const KernelMapping& m : kernel_mappings(a.page_addr(first), a.page_addr(last), "usermm: reclaim"))
        for (std::size_t i = std::max(first, a.page_index(m.from)); i < std::min(last, a.page_index(m.to)); ++i) {
            const pte_t v = a.pte[i].load(kRelaxed);
            a.pte[i].store(pte_t((v & ~kPteProt) | to_pte(m.prot)), kRelaxed);
        }
}

// The reclaimer calls the store itself; a user's store may throw: its pages stay then, as for an
// error it reports.
int write_catching(ArenaSwap& s, PageIo* pages, std::size_t n) {
    std::uint64_t slots[kEvictRunPages];
    std::size_t got = 0;
    try {
        return swap_write_batch(*s.store, pages, n, slots, &got);
    } catch (...) {
        try {
            s.store->release({slots, got});
        } catch (...) {
        }
        return EIO;
    }
}

constexpr EvictOps kReclaimerOps{true, write_catching, repair_from_kernel};

void* start_thread(pthread_t* t, void* (*fn)(void*), void* arg) {
    // The threads never touch arena memory and take no signal meant for the program.
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    const int err = pthread_create(t, nullptr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (err) fail(err, "usermm::Arena: cannot start the reclaimer's thread");
    return nullptr;
}

}  // namespace

Reclaimer::Reclaimer(ArenaCore& a, const ArenaOptions& options)
    : a_(a), policy_(options.policy), on_error_(options.on_store_error) {
    static constexpr const char* call = "usermm::Arena";
    const std::size_t size = a.end - a.base;
    if (!options.store)
        fail(EINVAL, "{}: resident_limit {:#x} needs a store (size {:#x})", call, options.resident_limit, size);
    const std::uint64_t limit = (options.resident_limit >> g_page_shift) / kClusterPages * kClusterPages;
    if (options.resident_limit && limit < 2 * kClusterPages)
        fail(EINVAL, "{}: resident_limit {:#x} is smaller than one batch of reclaim ({} pages of {} bytes, twice)", call,
             options.resident_limit, kClusterPages, g_page_size);
    if (unsigned(options.policy) > unsigned(Policy::S3Fifo))
        fail(EINVAL, "{}: policy {} is unknown (size {:#x})", call, unsigned(options.policy), size);
    const std::size_t pages = size >> g_page_shift;
    clusters_ = (pages + kClusterPages - 1) / kClusterPages;
    swap_.store = options.store;
    swap_.direct = options.store->async_signal_safe();
    swap_.slot_bytes = pages * sizeof(std::uint64_t);
    swap_.cluster_bytes = clusters_;
    swap_.fresh_bytes = (clusters_ + 63) / 64 * sizeof(std::uint64_t);
    const std::size_t buffer_bytes = (kSwapBuffers * kClusterPages + kEvictRunPages) << g_page_shift;
    void* slots = nullptr;
    void* clusters = nullptr;
    void* fresh = nullptr;
    void* buffers = nullptr;
    int err = page_alloc_table(swap_.slot_bytes, &slots);
    if (!err) err = page_alloc_table(swap_.cluster_bytes, &clusters);
    if (!err) err = page_alloc_table(swap_.fresh_bytes, &fresh);
    if (!err) err = page_alloc_table(buffer_bytes, &buffers);
    if (err) {
        for (auto [p, n] : {std::pair{slots, swap_.slot_bytes}, {clusters, swap_.cluster_bytes}, {fresh, swap_.fresh_bytes},
                            {buffers, buffer_bytes}})
            if (p) page_release(addr_of(p), n);
        fail(err, "{}: cannot reserve the swap tables for size {:#x}", call, size);
    }
    swap_.slots = static_cast<std::atomic<std::uint64_t>*>(slots);
    swap_.clusters = static_cast<std::atomic<std::uint8_t>*>(clusters);
    swap_.fresh = static_cast<std::atomic<std::uint64_t>*>(fresh);
    swap_.buffers = static_cast<std::byte*>(buffers);
    buffer_ = swap_.buffers + ((kSwapBuffers * kClusterPages) << g_page_shift);
    swap_.limit.store(limit, kRelaxed);
    try {
        start_threads();
    } catch (...) {
        stop_.store(true);
        swap_.io_wake.fetch_add(1);
        futex_wake(swap_.io_wake);
        if (io_running_) pthread_join(io_, nullptr);
        for (auto [p, n] : {std::pair{slots, swap_.slot_bytes}, {clusters, swap_.cluster_bytes}, {fresh, swap_.fresh_bytes},
                            {buffers, buffer_bytes}})
            page_release(addr_of(p), n);
        throw;
    }
    a.swap = &swap_;
}

Reclaimer::~Reclaimer() {
    stop_.store(true);
    swap_.wake.fetch_add(1);
    futex_wake(swap_.wake);
    swap_.io_wake.fetch_add(1);
    futex_wake(swap_.io_wake);
    if (kswapd_running_) pthread_join(kswapd_, nullptr);
    if (io_running_) pthread_join(io_, nullptr);
    // Every slot the arena still holds goes back to the store.
    std::vector<std::uint64_t> held;
    for (const PageSpan& span : pte_spans(a_, 0, a_.page_index(a_.end)))
        for (std::size_t i = span.first; i < span.last; ++i)
            if (const std::uint64_t s = swap_.slots[i].load(kRelaxed)) held.push_back(s - 1);
    if (!held.empty()) swap_.store->release(held);
    a_.swap = nullptr;
    page_release(addr_of(swap_.slots), swap_.slot_bytes);
    page_release(addr_of(swap_.clusters), swap_.cluster_bytes);
    page_release(addr_of(swap_.fresh), swap_.fresh_bytes);
    page_release(addr_of(swap_.buffers), (kSwapBuffers * kClusterPages + kEvictRunPages) << g_page_shift);
}

void Reclaimer::stop_kswapd() {
    kswapd_stop_.store(true);
    swap_.wake.fetch_add(1);
    futex_wake(swap_.wake);
    if (kswapd_running_) pthread_join(kswapd_, nullptr);
    kswapd_running_ = false;
    deliver_errors();  // what the reclaimer had not reported yet, before the arena goes
}

// The I/O thread for a store that may not run in a signal handler; the reclaimer for every arena
// with a store (it reports store errors, and reclaims once there is a limit).
void Reclaimer::start_threads() {
    std::lock_guard guard(threads_lock_);
    if (!swap_.direct && !io_running_) {
        start_thread(&io_, io_main, this);
        io_running_ = true;
    }
    if (!kswapd_running_ && !kswapd_stop_.load()) {
        start_thread(&kswapd_, kswapd_main, this);
        kswapd_running_ = true;
    }
}

void Reclaimer::set_limit(const char* call, std::uint64_t bytes) {
    if (detached_)
        fail(EINVAL, "{}: {} could not be shared with this process at fork: the arena (base {:#x}) no longer evicts", call,
             swap_.store->describe(), a_.base);
    const std::uint64_t pages = (bytes >> g_page_shift) / kClusterPages * kClusterPages;
    if (bytes && pages < 2 * kClusterPages)
        fail(EINVAL, "{}: resident limit {:#x} is smaller than one batch of reclaim ({} pages of {} bytes, twice)", call,
             bytes, kClusterPages, g_page_size);
    swap_.limit.store(pages, kRelaxed);
    start_threads();
    swap_.wake.fetch_add(1);
    futex_wake(swap_.wake);
    if (pages) reclaim_to(std::int64_t(pages - pages / 8));
}

// Counted at once; reported on the reclaimer's thread, with no lock held (deliver_errors), since a
// callback may call the arena.
void Reclaimer::report(int err, std::uintptr_t addr) {
    account_store_error(a_);
    {
        std::lock_guard guard(errors_lock_);
        errors_.push_back({err, addr});
    }
    swap_.wake.fetch_add(1);
    futex_wake(swap_.wake);
}

void Reclaimer::deliver_errors() {
    std::vector<std::pair<int, std::uintptr_t>> errors;
    {
        std::lock_guard guard(errors_lock_);
        errors.swap(errors_);
    }
    if (const int err = swap_.fault_error.exchange(0, std::memory_order_acquire))  // a fault's, counted already
        errors.push_back({err, swap_.fault_error_addr.load(kRelaxed)});
    for (auto [err, addr] : errors) {
        if (on_error_) {
            on_error_(err, reinterpret_cast<const void*>(addr));
            continue;
        }
        if (swap_.reported.exchange(true)) continue;
        std::fprintf(stderr,
                     "usermm: %s refused to take pages of arena [%#lx, %#lx) (first at %#lx): %s; they stay in memory, "
                     "over the resident limit if need be (reported once)\n",
                     swap_.store->describe().c_str(), static_cast<unsigned long>(a_.base),
                     static_cast<unsigned long>(a_.end), static_cast<unsigned long>(addr), std::strerror(err));
    }
}

// One cluster's piece, by the reclaimer: evict_pages, unless the arena stopped using its store.
Evicted Reclaimer::evict(Vma& vma, std::size_t first, std::size_t last) {
    if (detached_) {
        Evicted result;
        result.done = true;
        return result;
    }
    return evict_pages(a_, vma, first, last, buffer_, kReclaimerOps);
}

// Second chance: the cluster's pages in memory become PROT_NONE with their content kept, marked
// inactive, so that the next touch of one is a hinting fault that marks the cluster used again.
bool Reclaimer::deactivate(std::size_t c) {
    bool any = false;
    for_each_piece(a_, c, [&](Vma&, std::size_t first, std::size_t last) {
        lock_ptes(a_, first, last);
        bool granted = false;
        for (std::size_t i = first; i < last; ++i) {
            const pte_t v = a_.pte[i].load(kRelaxed);
            granted |= pte_resident(v) && pte_prot(v) != 0;
        }
        if (granted) {
            bool unknown = false;  // repair_from_kernel always knows
            any |= protect_locked(a_, first, last, Prot::None, kPteInactive, repair_from_kernel, &unknown);
        }
        unlock_ptes(a_, first, last);
    });
    return any;
}

// Clusters a fault used while the reclaimer did not know them join the policy's queues.
void Reclaimer::discover() {
    const std::size_t words = (clusters_ + 63) / 64;
    for (std::size_t w = 0; w < words; ++w) {
        std::uint64_t bits = swap_.fresh[w].load(kRelaxed);
        if (!bits) continue;
        bits = swap_.fresh[w].exchange(0, kRelaxed);
        while (bits) {
            const std::size_t c = w * 64 + std::size_t(std::countr_zero(bits));
            bits &= bits - 1;
            enqueue(std::uint32_t(c));
        }
    }
}

// The one way into the queues, so that a cluster marked queued is always in one. A chosen one is
// in the ring, next in line already: its taker decides (an entry made now would be dropped as
// stale, leaving the cluster marked queued in no queue, never to be evicted again).
void Reclaimer::enqueue(std::uint32_t c, Place place) {
    if (swap_.clusters[c].load(kRelaxed) & kClusterChosen) return;
    const std::uint8_t old = swap_.clusters[c].fetch_or(kClusterQueued, kRelaxed);
    if (place == Place::First) {
        // A stale entry further back is skipped when its turn comes (it is not queued twice in
        // effect: eviction of an empty cluster does nothing).
        (policy_ == Policy::S3Fifo ? small_ : main_).push_front(c);
        return;
    }
    if (old & kClusterQueued) return;
    if (policy_ == Policy::S3Fifo && !(old & kClusterGhost)) {
        small_.push_back(c);
    } else {
        swap_.clusters[c].fetch_and(std::uint8_t(~kClusterGhost), kRelaxed);
        main_.push_back(c);  // S3-FIFO: a refault of a cluster evicted recently skips probation
    }
}

// The next victim. FIFO: the oldest cluster. CLOCK: the oldest not used since the hand last
// passed; a used one loses its mark, is made inactive (so that its next use is seen) and goes to
// the back. S3-FIFO: from the small queue while it holds more than a tenth of the limit (a used
// cluster moves on to the main queue, an unused one is evicted and remembered in the ghost queue),
// else from the main queue, where a cluster's use count buys it that many more passes.
bool Reclaimer::pick(std::uint32_t* victim) {
    const std::size_t limit_clusters = std::max<std::uint64_t>(1, swap_.limit.load(kRelaxed) / kClusterPages);
    auto take_use = [&](std::uint32_t c) {  // folds the fault world's use bit into the count
        const std::uint8_t state = swap_.clusters[c].fetch_and(std::uint8_t(~kClusterUsed), kRelaxed);
        std::uint8_t freq = freq_of(state);
        if (state & kClusterUsed) freq = std::uint8_t(std::min(3, freq + 1));
        return freq;
    };
    auto set_freq = [&](std::uint32_t c, std::uint8_t f) {
        std::uint8_t s = swap_.clusters[c].load(kRelaxed);
        while (!swap_.clusters[c].compare_exchange_weak(s, std::uint8_t((s & ~kClusterFreq) | f * kClusterFreqOne), kRelaxed)) {
        }
    };
    auto chosen = [&](std::uint32_t c) {
        swap_.clusters[c].fetch_and(std::uint8_t(~(kClusterQueued | kClusterFreq | kClusterUsed)), kRelaxed);
        *victim = c;
        return true;
    };
    for (std::size_t budget = 2 * (small_.size() + main_.size()) + 1; budget > 0; --budget) {
        const bool from_small = policy_ == Policy::S3Fifo && !small_.empty() && (small_.size() * 10 >= limit_clusters || main_.empty());
        std::deque<std::uint32_t>& q = from_small ? small_ : main_;
        if (q.empty()) return false;
        const std::uint32_t c = q.front();
        q.pop_front();
        if (swap_.clusters[c].load(kRelaxed) & kClusterChosen) continue;  // a stale entry (Cold's) of one in the ring
        if (policy_ == Policy::Fifo) return chosen(c);
        const std::uint8_t freq = take_use(c);
        if (from_small) {
            if (freq > 0) {
                set_freq(c, 0);
                deactivate(c);
                main_.push_back(c);
                continue;
            }
            swap_.clusters[c].fetch_or(kClusterGhost, kRelaxed);
            ghost_.push_back(c);
            while (ghost_.size() > limit_clusters) {
                swap_.clusters[ghost_.front()].fetch_and(std::uint8_t(~kClusterGhost), kRelaxed);
                ghost_.pop_front();
            }
            return chosen(c);
        }
        if (freq > 0) {
            set_freq(c, policy_ == Policy::Clock ? 0 : std::uint8_t(freq - 1));
            deactivate(c);
            main_.push_back(c);
            continue;
        }
        return chosen(c);
    }
    return false;
}

// Every cluster with pages in memory that no queue holds joins one: the reclaimer's safety net
// when its queues run dry over the limit (memory filled by a path that did not mark its clusters).
// Costs what the PTE table holds, and only then.
void Reclaimer::rescan() {
    for (const PageSpan& span : pte_spans(a_, 0, a_.page_index(a_.end)))
        for (std::size_t i = span.first; i < span.last; ++i)
            if (pte_resident(a_.pte[i].load(kRelaxed))) {
                enqueue(std::uint32_t(i / kClusterPages));
                i = (i / kClusterPages + 1) * kClusterPages - 1;
            }
}

// The victims chosen ahead go first (a fault at the hard limit may have taken some); one used
// since it was chosen is given back to the queues (swap_take_victim).
bool Reclaimer::next_victim(std::uint32_t* victim) { return swap_take_victim(swap_, victim) || pick(victim); }

// Keeps kVictims clusters chosen for the faults that will find the arena at its hard limit. Only
// the reclaimer offers (under queue_lock_), so room it sees stays until it fills it.
void Reclaimer::choose_ahead() {
    const std::uint64_t held = swap_.victims_tail.load(kRelaxed) - swap_.victims_head.load(kRelaxed);
    for (std::uint32_t c = 0, room = std::uint32_t(kVictims - held); room > 0 && pick(&c); --room) {
        swap_.clusters[c].fetch_or(kClusterChosen, kRelaxed);
        swap_offer_victim(swap_, c);
    }
}

bool Reclaimer::reclaim_one(std::int64_t target) {
    std::lock_guard guard(queue_lock_);
    // Another reclaimer (kswapd and set_resident_limit's caller) got there while this one waited.
    if (a_.resident.load(kRelaxed) <= target) return true;
    discover();
    bool rescanned = false;
    for (int attempts = 0; attempts < 64; ++attempts) {
        std::uint32_t c = 0;
        if (!next_victim(&c)) {
            if (rescanned) return false;
            rescan();
            rescanned = true;
            continue;
        }
        choose_ahead();  // before this batch's I/O, which may be slow
        bool evicted = false;
        for_each_piece(a_, c, [&](Vma& vma, std::size_t first, std::size_t last) {
            const Evicted e = evict(vma, first, last);
            if (e.error) report(e.error, a_.page_addr(first));
            if (!e.done) enqueue(c);  // busy, refused or failed: it stays in line
            evicted |= e.done && e.out.dropped > 0;
        });
        if (evicted) return true;
    }
    return false;
}

bool Reclaimer::reclaim_to(std::int64_t target) {
    while (!stop_.load(kRelaxed) && !kswapd_stop_.load(kRelaxed) && a_.resident.load(kRelaxed) > target) {
        bool progress = false;
        {
            ApiGuard<SharedGuard<RwSpinLock>> guard(a_.lock);
            progress = reclaim_one(target);
        }
        swap_.progress.fetch_add(1, std::memory_order_release);
        futex_wake(swap_.progress);
        if (!progress) return false;
    }
    return true;
}

void Reclaimer::page_out(const char* call, Vma& vma, Range part) {
    std::lock_guard guard(queue_lock_);
    for (std::size_t i = a_.page_index(part.start), last = a_.page_index(part.end); i < last;) {
        const std::size_t j = std::min(last, (i / kClusterPages) * kClusterPages + kEvictRunPages);
        const Evicted e = evict(vma, i, j);
        if (e.error) report(e.error, a_.page_addr(i));
        if (!e.done && !e.error)
            fail(ENOMEM, "{}: evicting [{:#x}, {:#x}) would take the arena past its kernel mapping budget", call,
                 a_.page_addr(i), a_.page_addr(j));
        i = j;
    }
}

void Reclaimer::cold(Range part) {
    std::lock_guard guard(queue_lock_);
    discover();
    const std::size_t first = a_.page_index(part.start) / kClusterPages;
    const std::size_t last = (a_.page_index(part.end) + kClusterPages - 1) / kClusterPages;
    for (std::size_t c = last; c-- > first;) {
        swap_.clusters[c].fetch_and(std::uint8_t(~(kClusterUsed | kClusterFreq)), kRelaxed);
        enqueue(std::uint32_t(c), Place::First);
    }
}

void swap_in_for_grant(ArenaCore& a, const char* call, std::size_t first, std::size_t last) {
    ArenaSwap& s = *a.swap;
    std::unique_ptr<PageBuffer> buffer;  // one cluster's, made at the first swapped page
    PageIo io[kClusterPages];
    for (const PageSpan& span : pte_spans(a, first, last))
        for (std::size_t i = span.first; i < span.last;) {
            if (!(a.pte[i].load(kRelaxed) & kPteSwapped)) {
                ++i;
                continue;
            }
            std::size_t j = i + 1;
            while (j < span.last && j - i < kClusterPages && (a.pte[j].load(kRelaxed) & kPteSwapped)) ++j;
            if (!buffer) buffer = std::make_unique<PageBuffer>(kClusterPages);
            for (std::size_t k = i; k < j; ++k)
                io[k - i] = {s.slots[k].load(kRelaxed) - 1, buffer->data() + ((k - i) << g_page_shift), 0};
            s.store->read({io, j - i});
            for (std::size_t k = i; k < j; ++k)
                if (io[k - i].error)
                    fail(io[k - i].error, "{}: cannot read swapped-out page {:#x} back from {}", call, a.page_addr(k),
                         s.store->describe());
            if (const int err = page_write_raw(a.page_addr(i), buffer->data(), (j - i) << g_page_shift))
                fail(err, "{}: cannot write swapped-in pages [{:#x}, {:#x}) into the arena", call, a.page_addr(i),
                     a.page_addr(j));
            for (std::size_t k = i; k < j; ++k) {
                const pte_t v = a.pte[k].load(kRelaxed);
                a.note_resident(v, pte_t(v & ~kPteSwapped));
                a.pte[k].store(pte_t(v & ~kPteSwapped), kRelaxed);
                if (k == i || k % kClusterPages == 0) swap_note_use(s, k);  // in memory: the reclaimer queues it
            }
            account_swap_in(a, j - i);
            i = j;
        }
}

// A store whose slots cannot be shared (retain refuses, as a store with a slot table private to the
// process must): the arena's swapped-out pages come back into memory and give their slots up, so
// that neither process refers to a slot the other may reuse. The arena is over its limit until
// the reclaimers catch up.
bool Reclaimer::retain_for_fork() {
    std::vector<std::uint64_t> held;
    for (const PageSpan& span : pte_spans(a_, 0, a_.page_index(a_.end)))
        for (std::size_t i = span.first; i < span.last; ++i)
            if (const std::uint64_t s = swap_.slots[i].load(kRelaxed)) held.push_back(s - 1);
    if (held.empty() || swap_.store->retain(held) == 0) return true;
    unshared_ = true;
    try {
        swap_in_for_grant(a_, "usermm: fork", 0, a_.page_index(a_.end));
    } catch (const std::exception&) {
        return false;  // pages stay out: the caller says so
    }
    for (const PageSpan& span : pte_spans(a_, 0, a_.page_index(a_.end)))
        for (std::size_t i = span.first; i < span.last; ++i) swap_.slots[i].store(0, kRelaxed);
    swap_.store->release(held);
    return true;
}

void Reclaimer::verify(const char* call) {
    std::lock_guard guard(queue_lock_);
    std::vector<bool> queued(clusters_), chosen(clusters_);
    for (const std::deque<std::uint32_t>* q : {&small_, &main_})
        for (const std::uint32_t c : *q) queued[c] = true;
    for (std::uint64_t k = swap_.victims_head.load(kRelaxed); k != swap_.victims_tail.load(kRelaxed); ++k)
        chosen[swap_.victims[k % kVictims].load(kRelaxed)] = true;
    for (std::size_t c = 0; c < clusters_; ++c) {
        const std::uint8_t bits = swap_.clusters[c].load(kRelaxed);
        if ((bits & kClusterQueued) && !queued[c])
            fail(EFAULT, "{}: the cluster at {:#x} is marked queued but no queue of the reclaimer holds it", call,
                 a_.page_addr(c * kClusterPages));
        if ((bits & kClusterChosen) && !chosen[c])
            fail(EFAULT, "{}: the cluster at {:#x} is marked chosen but is not among the victims chosen ahead", call,
                 a_.page_addr(c * kClusterPages));
    }
}

void Reclaimer::shrink_locked() {
    const std::int64_t limit = std::int64_t(swap_.limit.load(kRelaxed));
    while (limit && a_.resident.load(kRelaxed) > limit - limit / 8 && reclaim_one(limit - limit / 8)) {
    }
}

void Reclaimer::after_fork_child() {
    kswapd_running_ = false;  // the parent's threads; the child has none
    io_running_ = false;
    if (std::exchange(unshared_, false)) {
        detached_ = true;
        swap_.limit.store(0, kRelaxed);
        std::fprintf(stderr, "usermm: fork: %s cannot share its slots with a child (Store::retain refused): the child's arena "
                             "[%#lx, %#lx) keeps its memory, without a resident limit\n",
                     swap_.store->describe().c_str(), static_cast<unsigned long>(a_.base), static_cast<unsigned long>(a_.end));
    }
    for (SwapRequest& r : swap_.requests) r.state.store(kIoFree, kRelaxed);
    swap_.buffers_busy.store(0, kRelaxed);
    swap_.fault_error.store(0, kRelaxed);  // the parent's to report
    start_threads();
}

void* Reclaimer::kswapd_main(void* self) {
    Reclaimer& r = *static_cast<Reclaimer*>(self);
    ArenaSwap& s = r.swap_;
    while (!r.stop_.load() && !r.kswapd_stop_.load()) {
        const std::uint32_t seen = s.wake.load(std::memory_order_acquire);
        const std::int64_t limit = std::int64_t(s.limit.load(kRelaxed));
        bool progress = false;
        try {  // a user's store or error callback may throw: the reclaimer goes on
            r.deliver_errors();
            if (limit && r.a_.resident.load(kRelaxed) > limit - limit / 16) progress = r.reclaim_to(limit - limit / 8);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "usermm: the reclaimer of arena [%#lx, %#lx): %s\n", static_cast<unsigned long>(r.a_.base),
                         static_cast<unsigned long>(r.a_.end), e.what());
        } catch (...) {
        }
        r.deliver_errors();
        if (progress) continue;
        // Under the limit, or nothing can be evicted now (the store refuses, everything is busy):
        // faults waiting at the limit go on over it, and the reclaimer looks again after a while.
        s.progress.fetch_add(1, std::memory_order_release);
        futex_wake(s.progress);
        futex_wait(s.wake, seen, kIdleNs);
    }
    return nullptr;
}

void* Reclaimer::io_main(void* self) {
    Reclaimer& r = *static_cast<Reclaimer*>(self);
    ArenaSwap& s = r.swap_;
    auto last_work = std::chrono::steady_clock::now() - std::chrono::seconds(1);
    while (!r.stop_.load()) {
        const std::uint32_t seen = s.io_wake.load(std::memory_order_acquire);
        bool any = false;
        for (SwapRequest& q : s.requests) {
            if (q.state.load(std::memory_order_acquire) != kIoPosted) continue;
            any = true;
            try {  // a user's store may throw: every page of the batch fails then
                switch (q.op) {
                    case SwapOp::Read:
                        s.store->read({q.pages, q.count});
                        break;
                    case SwapOp::Write:
                        q.error = write_catching(s, q.pages, q.count);
                        break;
                    case SwapOp::Release: {
                        std::uint64_t slots[kClusterPages];
                        for (std::size_t k = 0; k < q.count; ++k) slots[k] = q.pages[k].slot;
                        s.store->release({slots, q.count});
                        break;
                    }
                }
            } catch (...) {
                for (std::size_t k = 0; k < q.count; ++k) q.pages[k].error = EIO;
            }
            q.state.store(kIoDone, std::memory_order_release);
            futex_wake(q.state);
        }
        if (any) {
            last_work = std::chrono::steady_clock::now();
            continue;
        }
        // Faults come in runs: for a while after the last request the thread watches for the next.
        if (std::chrono::steady_clock::now() - last_work < std::chrono::nanoseconds(kIoSpinNs)) {
            cpu_relax();
            continue;
        }
        futex_wait(s.io_wake, seen, kIdleNs);
    }
    return nullptr;
}

}  // namespace usermm::detail
