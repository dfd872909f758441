// Reclaim and swap, one thread at a time: PageOut and the counters of eviction (data written, zero
// pages dropped, clean pages dropped without I/O), do_swap_page (a major fault that brings the
// content back), Cold, the resident limit and its bound, bad input, stores that fail writes and
// reads, a user-defined store that is not async-signal-safe (and cannot share its slots across
// fork), SwapFile's slots reused, and snapshots and restore over swapped pages.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include "file_test_util.hpp"
#include "swap_test_util.hpp"
#include "test_util.hpp"

namespace {

using namespace usermm_swap_test;
using usermm::Advice;
using usermm::Arena;
using usermm::PageIo;
using usermm::Policy;
using usermm::Prot;
using usermm::Stats;
using usermm::SwapFile;
using usermm_test::check_survived;

constexpr Policy kPolicies[] = {Policy::Fifo, Policy::Clock, Policy::S3Fifo};

std::string name(Policy p) { return p == Policy::Fifo ? "Fifo" : p == Policy::Clock ? "Clock" : "S3Fifo"; }

// A store in front of a SwapFile that refuses writes (EIO) for the next `fail_writes` pages, and
// every read while `fail_reads` is set. It does not claim async-signal-safety (it allocates), so
// usermm calls it from its own I/O thread.
class FlakyStore final : public usermm::Store {
public:
    explicit FlakyStore(SwapFile& inner) : inner_(inner) {}
    std::atomic<std::int64_t> fail_writes{0};
    std::atomic<bool> fail_reads{false};
    std::atomic<std::uint64_t> refused{0};

    std::size_t allocate(std::span<std::uint64_t> slots) override { return inner_.allocate(slots); }
    void release(std::span<const std::uint64_t> slots) override { inner_.release(slots); }
    int retain(std::span<const std::uint64_t> slots) override { return inner_.retain(slots); }
    void write(std::span<PageIo> pages) override {
        std::vector<PageIo> pass;
        std::vector<std::size_t> from;
        for (std::size_t i = 0; i < pages.size(); ++i) {
            if (take_failure()) {
                pages[i].error = EIO;
                refused.fetch_add(1);
            } else {
                pass.push_back(pages[i]);
                from.push_back(i);
            }
        }
        inner_.write(pass);
        for (std::size_t i = 0; i < pass.size(); ++i) pages[from[i]].error = pass[i].error;
    }
    void read(std::span<PageIo> pages) override {
        if (!fail_reads.load()) return inner_.read(pages);
        for (PageIo& io : pages) io.error = EIO;
    }
    std::uint64_t capacity() const override { return inner_.capacity(); }
    std::string describe() const override { return "flaky " + inner_.describe(); }

private:
    bool take_failure() {
        std::int64_t left = fail_writes.load();
        while (left > 0 && !fail_writes.compare_exchange_weak(left, left - 1)) {
        }
        return left > 0;
    }
    SwapFile& inner_;
};

// A user-defined store with a mutex and a vector: the kind usermm must never call from its
// signal handler. It remembers the threads that called read() and write(), and counts calls on
// slots not allocated (a read of a released slot, a double release) instead of crashing. Its page
// data lies in shared memory (as a store on a device would be shared with a child) but its slot
// table is the process's own, handed out lowest slot first: so retain() refuses, and the contract
// says that fork() then reads the slots back into the arena before the child exists; otherwise a
// child that frees and reuses a slot overwrites a page its parent still has there.
class MemoryStore final : public usermm::Store {
public:
    explicit MemoryStore(std::size_t pages)
        : capacity_(pages),
          data_(static_cast<std::byte*>(
              mmap(nullptr, pages * page(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0))),
          used_(pages, false) {
        if (data_ == MAP_FAILED) std::abort();
    }
    ~MemoryStore() override { munmap(data_, capacity_ * page()); }
    MemoryStore(const MemoryStore&) = delete;
    MemoryStore& operator=(const MemoryStore&) = delete;

    std::size_t allocate(std::span<std::uint64_t> slots) override {
        std::lock_guard lock(mu_);
        std::size_t n = 0;
        for (std::uint64_t s = 0; s < capacity_ && n < slots.size(); ++s)
            if (!used_[s]) {
                used_[s] = true;
                slots[n++] = s;
                ++in_use_;
            }
        return n;
    }
    void release(std::span<const std::uint64_t> slots) override {
        std::lock_guard lock(mu_);
        for (std::uint64_t s : slots) {
            if (!allocated(s)) {
                ++misuse_;
                continue;
            }
            used_[s] = false;
            --in_use_;
        }
    }
    int retain(std::span<const std::uint64_t>) override { return ENOTSUP; }
    void write(std::span<PageIo> pages) override {
        std::lock_guard lock(mu_);
        callers_.push_back(std::this_thread::get_id());
        ++writes_;
        for (PageIo& io : pages) {
            io.error = allocated(io.slot) ? 0 : EINVAL;
            if (io.error == 0) std::memcpy(data_ + io.slot * page(), io.data, page());
            misuse_ += io.error != 0;
        }
    }
    void read(std::span<PageIo> pages) override {
        std::lock_guard lock(mu_);
        callers_.push_back(std::this_thread::get_id());
        ++reads_;
        for (PageIo& io : pages) {
            io.error = allocated(io.slot) ? 0 : EINVAL;
            if (io.error == 0) std::memcpy(io.data, data_ + io.slot * page(), page());
            misuse_ += io.error != 0;
        }
    }
    std::uint64_t capacity() const override { return capacity_; }
    std::string describe() const override { return "memory store of the test"; }

    std::vector<std::thread::id> callers() const {
        std::lock_guard lock(mu_);
        return callers_;
    }
    std::uint64_t reads() const {
        std::lock_guard lock(mu_);
        return reads_;
    }
    std::uint64_t writes() const {
        std::lock_guard lock(mu_);
        return writes_;
    }
    std::size_t in_use() const {
        std::lock_guard lock(mu_);
        return in_use_;
    }
    std::uint64_t misuse() const {
        std::lock_guard lock(mu_);
        return misuse_;
    }

private:
    bool allocated(std::uint64_t slot) const { return slot < capacity_ && used_[slot]; }

    mutable std::mutex mu_;
    const std::size_t capacity_;
    std::byte* const data_;
    std::vector<bool> used_;
    std::vector<std::thread::id> callers_;
    std::uint64_t reads_ = 0, writes_ = 0, misuse_ = 0;
    std::size_t in_use_ = 0;
};

bool within(const char* p, std::size_t pages, const void* addr) {
    return p && static_cast<const char*>(addr) >= p && static_cast<const char*>(addr) < p + pages * page();
}

// Writes every page of [p, p + pages) at `version` in a shuffled order, then reads them all back
// in another; the largest resident_pages seen (sampled every few pages) is returned.
std::uint64_t write_then_read(Arena& arena, char* p, std::size_t pages, std::uint64_t version, std::uint64_t seed,
                              std::size_t& wrong) {
    std::vector<std::size_t> order(pages);
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(seed);
    std::uint64_t peak = 0;
    for (int pass = 0; pass < 2; ++pass) {
        std::shuffle(order.begin(), order.end(), rng);
        for (std::size_t k = 0; k < pages; ++k) {
            const std::size_t i = order[k];
            if (pass == 0)
                fill(p + i * page(), i, version);
            else if (!holds(p + i * page(), i, version))
                ++wrong;
            if (k % 8 == 0) peak = std::max(peak, arena.stats().resident_pages);
        }
    }
    return peak;
}

}  // namespace

TEST_CASE("PageOut writes the pages that hold data, drops zero and clean pages without I/O; a read swaps in") {
    SwapFile swap(swap_path(), 16 << 20);
    Arena arena(64 << 20, options(&swap));
    constexpr std::size_t n = 4 * kCluster;
    char* p = map_aligned(arena, n);
    arena.prefault(p, n * page(), Prot::Write);
    // Every fourth page stays as prefault left it: write access, never written.
    auto has_data = [](std::size_t i) { return i % 4 != 3; };
    constexpr std::size_t data_pages = n - n / 4;
    for (std::size_t i = 0; i < n; ++i)
        if (has_data(i)) fill(p + i * page(), i, 1);
    const Stats s0 = arena.stats();
    CHECK(s0.resident_pages == n);
    arena.verify();

    arena.advise(p, n * page(), Advice::PageOut);
    const Stats out = minus(arena.stats(), s0);
    CHECK(out.pages_swapped_out == data_pages);
    CHECK(out.swap_bytes_written == data_pages * page());
    CHECK(out.pages_reclaimed == n);
    CHECK(arena.stats().resident_pages == 0);
    CHECK(kernel_resident(p, n) == 0);
    CHECK(swap.slots_in_use() == data_pages);
    arena.verify();

    // do_swap_page: the content comes back, through major faults, each swapped page read once.
    auto read_all = [&] {
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, has_data(i) ? 1 : 0);
        return wrong;
    };
    const Stats s1 = arena.stats();
    CHECK(read_all() == 0);
    const Stats in = minus(arena.stats(), s1);
    CHECK(in.major_faults >= 1);
    CHECK(in.major_faults <= data_pages);
    CHECK(in.pages_swapped_in == data_pages);
    CHECK(in.swap_bytes_read == data_pages * page());
    CHECK(in.pages_swapped_out == 0);
    CHECK(swap.slots_in_use() == data_pages);  // a read keeps the store copy
    arena.verify();

    // Pages only read since they came back are clean: their store copy is still valid.
    const Stats s2 = arena.stats();
    arena.advise(p, n * page(), Advice::PageOut);
    const Stats again = minus(arena.stats(), s2);
    CHECK(again.pages_swapped_out == 0);
    CHECK(again.swap_bytes_written == 0);
    CHECK(again.pages_reclaimed >= data_pages);
    CHECK(kernel_resident(p, n) == 0);
    CHECK(arena.stats().resident_pages == 0);
    CHECK(swap.slots_in_use() == data_pages);
    arena.verify();

    // A write after a read's swap-in is a minor fault, and makes the page dirty again.
    CHECK(holds(p + 5 * page(), 5, 1));
    const Stats s3 = arena.stats();
    fill(p + 5 * page(), 5, 2);
    const Stats w = minus(arena.stats(), s3);
    CHECK(w.major_faults == 0);
    CHECK(w.minor_faults == 1);
    CHECK(w.write_faults == 1);
    arena.verify();

    const Stats s4 = arena.stats();
    arena.advise(p, n * page(), Advice::PageOut);
    const Stats dirty = minus(arena.stats(), s4);
    CHECK(dirty.pages_swapped_out == 1);
    CHECK(dirty.swap_bytes_written == page());
    CHECK(kernel_resident(p, n) == 0);
    CHECK(swap.slots_in_use() == data_pages);
    CHECK(holds(p + 5 * page(), 5, 2));
    for (std::size_t i = 0; i < n; ++i)
        if (i != 5) CHECK(holds(p + i * page(), i, has_data(i) ? 1 : 0));
    arena.verify();

    arena.unmap(p, n * page());
    CHECK(arena.stats().resident_pages == 0);
    CHECK(swap.slots_in_use() == 0);
}

TEST_CASE("Cold clusters are the first evicted when a limit is set") {
    for (Policy policy : kPolicies) {
        CAPTURE(name(policy));
        SwapFile swap(swap_path(), 16 << 20);
        Arena arena(64 << 20, options(&swap, 0, policy));
        constexpr std::size_t clusters = 8, n = clusters * kCluster;
        char* p = map_aligned(arena, n);
        for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 1);
        REQUIRE(arena.stats().resident_pages == n);
        // Touched last and in the middle of the first-touch order: only Cold puts them first.
        const std::size_t cold[] = {2, 3, 5};
        for (std::size_t c : cold) arena.advise(p + c * kCluster * page(), kCluster * page(), Advice::Cold);
        CHECK(kernel_resident(p, n) == n);  // Cold evicts nothing now
        // Down to 7 clusters: at most 2 evicted, even to the low watermark (the limit less 1/8).
        arena.set_resident_limit((clusters - 1) * kCluster * page());
        CHECK(arena.resident_limit() == (clusters - 1) * kCluster * page());
        CHECK(arena.stats().resident_pages <= (clusters - 1) * kCluster);
        std::size_t cold_evicted = 0;
        for (std::size_t c = 0; c < clusters; ++c) {
            CAPTURE(c);
            const std::size_t resident = kernel_resident(p + c * kCluster * page(), kCluster);
            if (std::find(std::begin(cold), std::end(cold), c) != std::end(cold))
                cold_evicted += kCluster - resident;
            else
                CHECK(resident == kCluster);
        }
        CHECK(cold_evicted >= kCluster);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 1);
        CHECK(wrong == 0);
        arena.verify();
    }
}

TEST_CASE("bad input: a limit without a store or under two clusters, PageOut, Cold and limits without a store") {
    SwapFile swap(swap_path(), 16 << 20);
    CHECK(error_of([] { Arena a(1 << 24, options(nullptr, 256)); }) == EINVAL);
    CHECK(error_of([&] { Arena a(1 << 24, options(&swap, 2 * kCluster - 1)); }) ==
          EINVAL);
    {
        // Rounded down to clusters; two clusters is the smallest limit.
        Arena a(1 << 24, options(&swap, 2 * kCluster + 5));
        CHECK(a.resident_limit() == 2 * kCluster * page());
        CHECK(error_of([&] { a.set_resident_limit(kCluster * page()); }) == EINVAL);
        CHECK(a.resident_limit() == 2 * kCluster * page());
        a.set_resident_limit(3 * kCluster * page() + 1);
        CHECK(a.resident_limit() == 3 * kCluster * page());
        a.set_resident_limit(0);
        CHECK(a.resident_limit() == 0);
    }
    {
        // A store without a limit: PageOut works, nothing runs in the background.
        Arena a(1 << 24, options(&swap));
        CHECK(a.resident_limit() == 0);
        char* p = map_aligned(a, kCluster);
        fill(p, 0, 1);
        a.advise(p, kCluster * page(), Advice::PageOut);
        CHECK(a.stats().pages_swapped_out == 1);
        CHECK(holds(p, 0, 1));
    }
    Arena plain(1 << 24);
    char* p = map_aligned(plain, kCluster);
    fill(p, 0, 1);
    CHECK(error_of([&] { plain.advise(p, kCluster * page(), Advice::PageOut); }) == EINVAL);
    CHECK(error_of([&] { plain.advise(p, kCluster * page(), Advice::Cold); }) == EINVAL);
    CHECK(error_of([&] { plain.set_resident_limit(1 << 20); }) == EINVAL);
    CHECK(plain.resident_limit() == 0);
    CHECK(holds(p, 0, 1));
    const Stats s = plain.stats();
    CHECK(s.pages_swapped_out == 0);
    CHECK(s.pages_reclaimed == 0);
}

TEST_CASE("PageOut over a file VMA skips it and evicts the anonymous VMAs around it") {
    usermm_test::TempFile file(kCluster * page());
    SwapFile swap(swap_path(), 16 << 20);
    Arena arena(64 << 20, options(&swap));
    char* a = map_aligned(arena, kCluster, 0);
    char* f = static_cast<char*>(arena.map_file(file.fd(), 0, kCluster * page(), Prot::Read, usermm::Share::Private,
                                                {.address = a + kCluster * page()}));
    char* b = map_aligned(arena, kCluster, 2);
    REQUIRE(f + kCluster * page() == b);
    for (std::size_t i = 0; i < kCluster; ++i) {
        fill(a + i * page(), i, 1);
        fill(b + i * page(), kCluster + i, 1);
    }
    std::size_t file_wrong = 0;
    for (std::size_t off = 0; off < kCluster * page(); off += 512)
        file_wrong += usermm_test::read_byte(f + off) != usermm_test::pattern_byte(off);
    CHECK(file_wrong == 0);
    const Stats s0 = arena.stats();
    arena.advise(a, 3 * kCluster * page(), Advice::PageOut);
    const Stats d = minus(arena.stats(), s0);
    CHECK(d.pages_swapped_out == 2 * kCluster);
    CHECK(kernel_resident(a, kCluster) == 0);
    CHECK(kernel_resident(b, kCluster) == 0);
    // The file's pages keep their access: reading them again is no fault at all.
    const Stats s1 = arena.stats();
    for (std::size_t off = 0; off < kCluster * page(); off += 512)
        file_wrong += usermm_test::read_byte(f + off) != usermm_test::pattern_byte(off);
    CHECK(file_wrong == 0);
    const Stats r = minus(arena.stats(), s1);
    CHECK(r.minor_faults + r.major_faults == 0);
    for (const usermm::VmaInfo& v : arena.vmas())
        if (!v.file.empty()) CHECK(v.stats.pages_reclaimed == 0);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < kCluster; ++i)
        wrong += !holds(a + i * page(), i, 1) + !holds(b + i * page(), kCluster + i, 1);
    CHECK(wrong == 0);
    arena.verify();
}

TEST_CASE("a resident limit holds a working set four times larger: the count stays under it, the content intact") {
    for (Policy policy : kPolicies) {
        CAPTURE(name(policy));
        constexpr std::size_t limit = 16 * kCluster, n = 4 * limit;
        SwapFile swap(swap_path(), 64 << 20);
        Arena arena(64 << 20, options(&swap, limit, policy));
        char* p = map_aligned(arena, n);
        std::size_t wrong = 0;
        std::uint64_t peak = write_then_read(arena, p, n, 1, 1, wrong);
        CHECK(wrong == 0);
        // Overwrites of pages that were swapped in, then read back again.
        peak = std::max(peak, write_then_read(arena, p, n, 2, 2, wrong));
        CHECK(wrong == 0);
        // One faulting thread: the limit plus two clusters.
        CHECK(peak <= limit + 2 * kCluster);
        const Stats s = arena.stats();
        CHECK(s.resident_pages <= limit + 2 * kCluster);
        CHECK(s.pages_swapped_out > 0);
        CHECK(s.pages_swapped_in > 0);
        CHECK(s.major_faults > 0);
        CHECK(s.pages_reclaimed >= s.pages_swapped_out);
        CHECK(s.swap_bytes_read == s.pages_swapped_in * page());
        CHECK(s.swap_bytes_written == s.pages_swapped_out * page());
        arena.verify();
        arena.unmap(p, n * page());
        CHECK(arena.stats().resident_pages == 0);
        CHECK(swap.slots_in_use() == 0);
    }
}

// A store in front of a SwapFile whose first write blocks until the test opens the gate: in the
// test below that is the reclaimer's first batch, so that the faults that follow find the arena at
// its hard limit with the reclaimer stuck. Not async-signal-safe (a mutex): usermm calls it on its
// own threads.
class GateStore final : public usermm::Store {
public:
    explicit GateStore(SwapFile& inner) : inner_(inner) {}
    std::size_t allocate(std::span<std::uint64_t> slots) override { return inner_.allocate(slots); }
    void release(std::span<const std::uint64_t> slots) override { inner_.release(slots); }
    int retain(std::span<const std::uint64_t> slots) override { return inner_.retain(slots); }
    void read(std::span<PageIo> pages) override { inner_.read(pages); }
    void write(std::span<PageIo> pages) override {
        {
            std::unique_lock lock(mu_);
            if (!first_taken_) {
                first_taken_ = true;
                cv_.notify_all();
                cv_.wait(lock, [&] { return open_; });
            }
        }
        inner_.write(pages);
    }
    std::uint64_t capacity() const override { return inner_.capacity(); }
    std::string describe() const override { return "gated " + inner_.describe(); }

    bool wait_blocked() {
        std::unique_lock lock(mu_);
        return cv_.wait_for(lock, std::chrono::seconds(20), [&] { return first_taken_; });
    }
    void open() {
        std::lock_guard lock(mu_);
        open_ = true;
        cv_.notify_all();
    }

private:
    SwapFile& inner_;
    std::mutex mu_;
    std::condition_variable cv_;
    bool first_taken_ = false;
    bool open_ = false;
};

TEST_CASE("direct reclaim: with the reclaimer stuck in the store, faults at the limit evict batches themselves") {
    for (Policy policy : kPolicies) {
        CAPTURE(name(policy));
        constexpr std::size_t limit = 16 * kCluster, n = 2 * limit;
        SwapFile swap(swap_path(), 64 << 20);
        GateStore gate(swap);
        Arena arena(64 << 20, options(&gate, limit, policy));
        char* p = map_aligned(arena, n);
        // Past the high watermark (the limit less a sixteenth), under the limit: the reclaimer
        // starts, and its first batch blocks in the store.
        const std::size_t start = limit - kCluster / 2;
        for (std::size_t i = 0; i < start; ++i) fill(p + i * page(), i, 1);
        REQUIRE(gate.wait_blocked());
        const Stats before = arena.stats();
        std::uint64_t peak = 0;
        const std::size_t end = limit + 4 * kCluster;
        for (std::size_t i = start; i < end; ++i) {
            fill(p + i * page(), i, 1);
            peak = std::max(peak, arena.stats().resident_pages);
        }
        const Stats d = minus(arena.stats(), before);
        CHECK(d.direct_reclaims >= 4);
        CHECK(d.reclaim_stalls == 0);
        CHECK(peak <= limit);
        CHECK(d.pages_swapped_out >= 4 * kCluster);
        gate.open();
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < end; ++i) wrong += !holds(p + i * page(), i, 1);
        CHECK(wrong == 0);
        CHECK(arena.stats().store_errors == 0);
        arena.verify();
    }
}

TEST_CASE("a store that refuses writes: pages stay resident and intact, the error is counted and reported, then recovery") {
    SwapFile inner(swap_path(), 16 << 20);
    FlakyStore store(inner);
    std::atomic<int> reports{0}, wrong_reports{0};
    constexpr std::size_t n = 2 * kCluster;
    char* p = nullptr;
    {
        usermm::ArenaOptions o = options(&store);
        o.on_store_error = [&](int err, const void* addr) {
            reports.fetch_add(1);
            if (err != EIO || !within(p, n, addr)) wrong_reports.fetch_add(1);
        };
        Arena arena(64 << 20, o);
        p = map_aligned(arena, n);
        for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 1);
        store.fail_writes.store(std::int64_t(1) << 40);
        const Stats s0 = arena.stats();
        arena.advise(p, n * page(), Advice::PageOut);
        const Stats d = minus(arena.stats(), s0);
        CHECK(d.store_errors >= 1);
        CHECK(d.pages_swapped_out == 0);
        CHECK(kernel_resident(p, n) == n);
        CHECK(arena.stats().resident_pages == n);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 1);
        CHECK(wrong == 0);
        arena.verify();

        store.fail_writes.store(0);
        arena.advise(p, n * page(), Advice::PageOut);
        CHECK(minus(arena.stats(), s0).pages_swapped_out == n);
        CHECK(kernel_resident(p, n) == 0);
        for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 1);
        CHECK(wrong == 0);
        arena.verify();
    }
    // The callback runs on usermm's thread: the arena's destruction has waited for it.
    CHECK(store.refused.load() > 0);
    CHECK(reports.load() >= 1);
    CHECK(wrong_reports.load() == 0);
}

TEST_CASE("under a limit, a store that refuses a few hundred writes loses nothing and the arena comes back under it") {
    SwapFile inner(swap_path(), 64 << 20);
    FlakyStore store(inner);
    std::atomic<int> reports{0};
    constexpr std::size_t limit = 4 * kCluster, n = 4 * limit;
    {
        usermm::ArenaOptions o = options(&store, limit);
        o.on_store_error = [&](int, const void*) { reports.fetch_add(1); };
        Arena arena(64 << 20, o);
        char* p = map_aligned(arena, n);
        store.fail_writes.store(std::int64_t(3 * limit));
        std::size_t wrong = 0;
        write_then_read(arena, p, n, 1, 3, wrong);
        CHECK(wrong == 0);
        const Stats s = arena.stats();
        CHECK(s.store_errors > 0);
        CHECK(s.pages_swapped_out > 0);
        CHECK(s.major_faults > 0);
        CHECK(store.fail_writes.load() == 0);
        // The last faults waited for the reclaimer, whose writes succeed again.
        CHECK(s.resident_pages <= limit);
        arena.verify();
    }
    CHECK(store.refused.load() == 3 * limit);
    CHECK(reports.load() >= 1);
}

TEST_CASE("a store read that fails is SIGBUS, naming the address and the errno") {
    const std::string path = swap_path();
    const auto end = usermm_test::run_guarded(
        [&] {
            SwapFile inner(path, 16 << 20);
            FlakyStore store(inner);
            Arena arena(64 << 20, options(&store));
            char* p = map_aligned(arena, kCluster);
            for (std::size_t i = 0; i < kCluster; ++i) fill(p + i * page(), i, 1);
            arena.advise(p, kCluster * page(), Advice::PageOut);
            CHILD_CHECK(arena.stats().pages_swapped_out == kCluster);
            store.fail_reads.store(true);
            std::fprintf(stderr, "reading %s\n", fmt::format("{}", static_cast<void*>(p + 5 * page())).c_str());
            (void)usermm_test::read_byte(p + 5 * page());
            std::fprintf(stderr, "child check failed: the read of a page the store refused returned %#llx\n",
                         static_cast<unsigned long long>(first_word(p + 5 * page())));
        },
        20);
    unlink(path.c_str());
    INFO("child stderr: " << end.err);
    CHECK(end.signal == SIGBUS);
    CHECK(end.err.find("child check failed") == std::string::npos);
    const std::size_t at = end.err.find("reading 0x");
    REQUIRE(at != std::string::npos);
    const std::string addr = end.err.substr(at + 8, end.err.find('\n', at) - at - 8);
    const std::size_t line = end.err.find("usermm: SIGBUS");
    REQUIRE(line != std::string::npos);
    const std::string diag = end.err.substr(line, end.err.find('\n', line) - line);
    CHECK(diag.find(addr) != std::string::npos);
    CHECK((diag.find("errno 5") != std::string::npos || diag.find("EIO") != std::string::npos ||
           diag.find("Input/output error") != std::string::npos));
}

// Skipped under TSan: the forked child starts usermm's threads again, which TSan refuses after a
// multi-threaded fork ("starting new threads after multi-threaded fork is not supported").
TEST_CASE("a user-defined store that is not async-signal-safe runs on usermm's threads, end to end and across fork" *
          doctest::skip(usermm_test::kSkipUnderTsan)) {
    MemoryStore store(4096);
    constexpr std::size_t limit = 2 * kCluster, n = 8 * limit;
    Arena arena(64 << 20, options(&store, limit));
    char* p = map_aligned(arena, n);
    std::size_t wrong = 0;
    const std::uint64_t peak = write_then_read(arena, p, n, 1, 4, wrong);
    CHECK(wrong == 0);
    CHECK(peak <= limit + 2 * kCluster);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > 0);
    CHECK(s.pages_swapped_in > 0);
    CHECK(s.major_faults > 0);
    CHECK(store.writes() > 0);
    CHECK(store.reads() > 0);
    const std::vector<std::thread::id> callers = store.callers();
    CHECK(std::count(callers.begin(), callers.end(), std::this_thread::get_id()) == 0);
    CHECK(store.in_use() <= n);
    arena.verify();

    // retain() refuses: the pages are read back before the child exists. The child reads them
    // all, then overwrites them and pages them out (reusing the lowest slots of its own table);
    // the parent's pages must not change.
    CHECK(store.in_use() > 0);
    // The child, whose slots would collide with the parent's on the shared data, stops using the
    // store: it keeps its memory, without a limit. The parent starts over its limit (every page
    // came back in) and comes back within it as it goes on.
    const auto child = usermm_test::run_guarded(
        [&] {
            std::size_t bad = 0;
            for (std::size_t i = 0; i < n; ++i) bad += !holds(p + i * page(), i, 1);
            CHILD_CHECK(bad == 0);
            CHILD_CHECK(arena.resident_limit() == 0);
            CHILD_CHECK(arena.stats().resident_pages == n);
            for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 2);
            arena.advise(p, n * page(), Advice::PageOut);
            for (std::size_t i = 0; i < n; ++i) bad += !holds(p + i * page(), i, 2);
            CHILD_CHECK(bad == 0);
        },
        20);
    check_survived(child);
    for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 1);
    CHECK(wrong == 0);
    CHECK(arena.stats().resident_pages <= limit + 2 * kCluster);
    arena.verify();
    arena.unmap(p, n * page());
    CHECK(store.in_use() == 0);
    CHECK(store.misuse() == 0);
    CHECK(arena.stats().resident_pages == 0);
}

TEST_CASE("SwapFile slots are reused: in use never more than the pages swapped out at once, the file as large") {
    constexpr std::size_t limit = 4 * kCluster, n = 4 * limit;
    SwapFile swap(swap_path(), 64 << 20);
    Arena arena(64 << 20, options(&swap, limit));
    char* p = map_aligned(arena, n);
    std::vector<std::uint64_t> version(n, 0);
    std::mt19937_64 rng(5);
    std::uint64_t most_slots = 0;
    std::size_t wrong = 0;
    // Every page evicted and swapped in again many times, dirty (written) and clean (read).
    for (int round = 0; round < 12; ++round) {
        for (std::size_t k = 0; k < n; ++k) {
            const std::size_t i = rng() % n;
            if (rng() % 2) {
                fill(p + i * page(), i, ++version[i]);
            } else {
                wrong += !holds(p + i * page(), i, version[i]);
            }
            most_slots = std::max(most_slots, swap.slots_in_use());
        }
    }
    CHECK(wrong == 0);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > 2 * n);  // far more pages written than slots ever in use: reused
    CHECK(most_slots <= n);
    struct stat st {};
    REQUIRE(stat(swap.path().c_str(), &st) == 0);
    CHECK(std::uint64_t(st.st_blocks) * 512 <= n * page() + (64 << 10));
    arena.unmap(p, n * page());
    CHECK(swap.slots_in_use() == 0);
    CHECK(arena.stats().resident_pages == 0);
}

// Each order of snapshot, eviction, swap-in and write, one thread, so that a failure names it.
TEST_CASE("a snapshot's content is right whatever was swapped out before or after it, and restore brings it back") {
    constexpr std::size_t n = 2 * kCluster;
    auto all = [&](auto&& fn) {
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += !fn(i);
        return wrong;
    };
    SwapFile swap(swap_path(), 16 << 20);
    Arena arena(64 << 20, options(&swap));
    char* p = map_aligned(arena, n);
    auto write_all = [&](std::uint64_t v) {
        for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, v);
    };
    auto page_out = [&] { arena.advise(p, n * page(), Advice::PageOut); };
    std::vector<std::uint8_t> image(n * page());
    auto snapshot_holds = [&](const usermm::Snapshot& s, std::uint64_t v) {
        s.read(p, image.data(), image.size());
        return all([&](std::size_t i) { return holds(image.data() + i * page(), i, v); });
    };
    auto arena_holds = [&](std::uint64_t v) { return all([&](std::size_t i) { return holds(p + i * page(), i, v); }); };

    SUBCASE("swapped out, then the snapshot, then written") {
        write_all(1);
        page_out();
        usermm::Snapshot s = arena.snapshot(p, n * page());
        CHECK(snapshot_holds(s, 1) == 0);
        write_all(2);
        CHECK(snapshot_holds(s, 1) == 0);
        page_out();
        CHECK(snapshot_holds(s, 1) == 0);
        CHECK(arena_holds(2) == 0);
    }
    SUBCASE("the snapshot, then swapped out, then written") {
        write_all(1);
        usermm::Snapshot s = arena.snapshot(p, n * page());
        page_out();
        CHECK(snapshot_holds(s, 1) == 0);
        write_all(2);
        CHECK(snapshot_holds(s, 1) == 0);
        CHECK(arena_holds(2) == 0);
    }
    SUBCASE("swapped in clean, then the snapshot, dropped clean, then written") {
        write_all(1);
        page_out();
        CHECK(arena_holds(1) == 0);
        usermm::Snapshot s = arena.snapshot(p, n * page());
        page_out();
        write_all(2);
        CHECK(snapshot_holds(s, 1) == 0);
        CHECK(arena_holds(2) == 0);
    }
    SUBCASE("restore over swapped-out pages, and restored pages swapped out") {
        write_all(1);
        usermm::Snapshot s = arena.snapshot(p, n * page());
        write_all(2);
        page_out();
        arena.restore(s);
        CHECK(arena_holds(1) == 0);
        page_out();
        CHECK(arena_holds(1) == 0);
        write_all(3);
        page_out();
        CHECK(snapshot_holds(s, 1) == 0);
        arena.restore(s);
        CHECK(arena_holds(1) == 0);
    }
    arena.verify();
    arena.unmap(p, n * page());
    CHECK(arena.stats().resident_pages == 0);
    CHECK(swap.slots_in_use() == 0);
}

// restore() writes back every page changed since the snapshot: under a limit, it must leave the
// arena within it (evicting as it goes, or restoring into the store), or the next fault waits
// for a reclaimer that has nothing it may evict.
TEST_CASE("restore under a resident limit stays within it, and the arena goes on") {
    constexpr std::size_t limit = 4 * kCluster, n = 4 * limit;
    SwapFile swap(swap_path(), 64 << 20);
    Arena arena(64 << 20, options(&swap, limit));
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 1);
    usermm::Snapshot snap = arena.snapshot(p, n * page());
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 2);
    arena.restore(snap);
    const Stats s = arena.stats();
    CHECK(s.pages_restored == n);
    // Past this, an arena over its limit with nothing to evict would hang the reads below.
    REQUIRE(s.resident_pages <= limit + 2 * kCluster);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 1);
    CHECK(wrong == 0);
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 3);
    for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, 3);
    CHECK(wrong == 0);
    CHECK(arena.stats().resident_pages <= limit + 2 * kCluster);
    arena.verify();
}
