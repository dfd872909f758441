// Snapshots while other threads run: point-in-time images streamed under two writers, restore()
// under readers, same-page races on copy-before-write, and restores racing each other.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

namespace {

using namespace usermm_test;
using usermm::Prot;
using Bytes = std::vector<std::uint8_t>;

std::uint64_t mix(std::uint64_t x) {
    x ^= x >> 31;
    x *= 0x9e3779b97f4a7c15ull;
    return x ^ (x >> 29);
}

// A page written by the writers: word 0 counts the writes to the page, word 1 is a checksum of
// word 0 and the payload (every other word), which is derived from the page index and the count.
std::uint64_t checksum(const std::uint64_t* words, std::size_t n) {
    std::uint64_t sum = mix(words[0]);
    for (std::size_t i = 2; i < n; ++i) sum = mix(sum ^ words[i]) + i;
    return sum;
}

void compose_page(std::uint64_t* words, std::size_t n, std::size_t page, std::uint64_t count) {
    words[0] = count;
    for (std::size_t i = 2; i < n; ++i) words[i] = mix((std::uint64_t(page) << 40) ^ (count << 12) ^ i);
    words[1] = checksum(words, n);
}

bool consistent(const void* page) {
    const std::size_t n = usermm::page_size() / 8;
    std::vector<std::uint64_t> words(n);
    std::memcpy(words.data(), page, usermm::page_size());
    return words[0] != 0 && words[1] == checksum(words.data(), n);
}

// Several threads write words of a page whose write protection another thread lifts after copying
// the page for a snapshot. The kernel orders the copy before the writes (none can land while the
// protection stands), which ThreadSanitizer cannot see; these writes are hidden from it so that it
// does not report the copy as a race.
__attribute__((no_sanitize("thread"))) void store_u64(void* p, std::uint64_t v) {
    *static_cast<volatile std::uint64_t*>(p) = v;
}

class MemFd {
public:
    MemFd() : fd_(memfd_create("usermm-test-image", MFD_CLOEXEC)) { REQUIRE(fd_ >= 0); }
    MemFd(MemFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
    MemFd& operator=(MemFd&&) = delete;
    ~MemFd() {
        if (fd_ >= 0) close(fd_);
    }
    int get() const { return fd_; }

private:
    int fd_;
};

usermm::Arena load(const std::vector<MemFd>& images) {
    std::vector<int> fds;
    for (const MemFd& m : images) {
        lseek(m.get(), 0, SEEK_SET);
        fds.push_back(m.get());
    }
    return usermm::Arena::load(fds);
}

}  // namespace

TEST_CASE("write_to streams the snapshot instant while two writers keep rewriting every page") {
    const std::size_t ps = usermm::page_size();
    const std::size_t pages = (16u << 20) / ps;
    usermm::Arena arena(pages * ps);
    char* const base = static_cast<char*>(arena.map(pages * ps, Prot::ReadWrite, {.name = "table"}));
    std::atomic<bool> stop{false}, pause{false};
    std::atomic<std::uint64_t> pages_written{0};
    std::atomic<unsigned> full_sweeps{0};
    std::barrier sync(3);

    // Writer t owns the pages t, t + 2, ... and rewrites them in turn, whole pages at a time; it
    // pauses between pages when asked, on the barrier, so that the main thread can take the
    // snapshot and note the expected content with nobody writing.
    auto writer = [&](std::size_t t) {
        std::vector<std::uint64_t> counts(pages), words(ps / 8);
        bool swept = false;
        for (std::size_t i = t; !stop.load(std::memory_order_relaxed);) {
            if (pause.load(std::memory_order_acquire)) {
                sync.arrive_and_wait();
                sync.arrive_and_wait();
            }
            compose_page(words.data(), words.size(), i, ++counts[i]);
            std::memcpy(base + i * ps, words.data(), ps);
            pages_written.fetch_add(1, std::memory_order_relaxed);
            if ((i += 2) >= pages) {
                i = t;
                if (!swept) full_sweeps.fetch_add(1);
                swept = true;
            }
        }
    };
    std::thread w0(writer, 0), w1(writer, 1);
    while (full_sweeps.load() < 2) std::this_thread::yield();

    std::vector<MemFd> images;
    std::optional<usermm::Snapshot> previous;
    for (int round = 0; round < 3; ++round) {
        INFO("round ", round);
        pause.store(true, std::memory_order_release);
        sync.arrive_and_wait();
        pause.store(false, std::memory_order_relaxed);
        usermm::Snapshot snap = arena.snapshot();
        Bytes expected(pages * ps);
        std::memcpy(expected.data(), base, expected.size());
        sync.arrive_and_wait();

        // The image goes through a pipe whose reader takes each chunk only after the writers have
        // written more pages, so that the stream and the writers interleave on any scheduler.
        int pipe_fds[2];
        REQUIRE(pipe2(pipe_fds, O_CLOEXEC) == 0);
        std::string stream_error;
        std::thread streamer([&] {
            try {
                if (previous)
                    snap.write_to(pipe_fds[1], *previous);
                else
                    snap.write_to(pipe_fds[1]);
            } catch (const std::exception& e) {
                stream_error = e.what();
            }
            close(pipe_fds[1]);
        });
        images.emplace_back();
        std::vector<char> chunk(1 << 16);
        for (;;) {
            const std::uint64_t mark = pages_written.load();
            while (pages_written.load() < mark + 8) std::this_thread::yield();
            const ssize_t n = read(pipe_fds[0], chunk.data(), chunk.size());
            if (n <= 0) break;
            REQUIRE(write(images.back().get(), chunk.data(), std::size_t(n)) == n);
        }
        streamer.join();
        close(pipe_fds[0]);
        CHECK(stream_error.empty());
        CHECK(snap.stats().cow_faults > 0);

        const usermm::Arena loaded = load(images);
        REQUIRE(loaded.size() == arena.size());
        const auto* lbase = static_cast<const char*>(loaded.base());
        std::size_t torn = 0, different = 0;
        for (std::size_t i = 0; i < pages; ++i) {
            torn += !consistent(lbase + i * ps);
            different += std::memcmp(lbase + i * ps, expected.data() + i * ps, ps) != 0;
        }
        CHECK_MESSAGE(torn == 0, torn, " pages of the image are not internally consistent");
        CHECK_MESSAGE(different == 0, different, " pages of the image differ from the snapshot instant");
        previous = std::move(snap);
    }
    stop = true;
    w0.join();
    w1.join();
    arena.verify();
}

TEST_CASE("restore() under readers: each page is seen whole, old or restored, never a mix") {
    const std::size_t ps = usermm::page_size();
    const std::size_t words = ps / 8;
    constexpr std::size_t kPages = 32, kOutside = 64;
    usermm::Arena arena((kPages + kOutside) * ps);
    char* const range = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "restored"}));
    char* const outside = static_cast<char*>(arena.map(kOutside * ps, Prot::ReadWrite, {.name = "outside"}));
    // Each page of the range holds one value repeated: A or B, per page.
    auto value = [](std::size_t page, unsigned which) { return mix(page * 2 + which + 1) | 1; };
    auto fill = [&](unsigned which) {
        for (std::size_t p = 0; p < kPages; ++p)
            for (std::size_t i = 0; i < words; ++i) write_u64(range + p * ps + i * 8, value(p, which));
    };
    fill(0);
    const usermm::Snapshot a = arena.snapshot(range, kPages * ps);
    fill(1);
    const usermm::Snapshot b = arena.snapshot(range, kPages * ps);
    arena.restore(a);

    // gen is 2k while no restore runs and k have completed, 2k + 1 while restore k + 1 runs. Restore
    // k makes the range B if k is odd, A if even.
    std::atomic<std::uint64_t> gen{0};
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> reads{0}, between{0}, overlapped{0}, mixed{0}, foreign{0}, torn{0}, stale{0}, images{0};
    auto reader = [&](std::size_t t) {
        std::vector<std::uint64_t> seen(words);
        for (std::size_t n = t; !stop.load(std::memory_order_relaxed); ++n) {
            const std::size_t p = n % kPages;
            const std::uint64_t g1 = gen.load(std::memory_order_acquire);
            for (std::size_t i = 0; i < words; ++i) seen[i] = read_u64(range + p * ps + i * 8);
            // A read-modify-write, not a load, so that the page reads above are ordered before it
            // (GCC's ThreadSanitizer does not take fences).
            const std::uint64_t g2 = gen.fetch_add(0, std::memory_order_acq_rel);
            std::size_t switches = 0, strangers = 0;
            for (std::size_t i = 0; i < words; ++i) {
                strangers += seen[i] != value(p, 0) && seen[i] != value(p, 1);
                switches += i > 0 && seen[i] != seen[i - 1];
            }
            foreign.fetch_add(strangers, std::memory_order_relaxed);
            reads.fetch_add(1, std::memory_order_relaxed);
            if (switches) mixed.fetch_add(1, std::memory_order_relaxed);
            if (g1 == g2 && g1 % 2 == 0) {
                // No restore overlapped the read: the page is whole and is the last restore's.
                between.fetch_add(1, std::memory_order_relaxed);
                if (switches || seen[0] != value(p, (g1 / 2) % 2)) stale.fetch_add(1);
                continue;
            }
            overlapped.fetch_add(1, std::memory_order_relaxed);
            // With one restore overlapping (restore k + 1), the read may cross its switch once: old
            // words, then restored ones, as the reader waits in the fault path. Restored words
            // followed by old ones mean the reader saw a page half restored.
            const bool one_restore = g1 % 2 == 0 ? g2 - g1 <= 2 : g2 - g1 <= 1;
            if (!one_restore) continue;
            const std::uint64_t k = g1 / 2, old_value = value(p, k % 2), new_value = value(p, (k + 1) % 2);
            bool restored = false;
            for (std::size_t i = 0; i < words; ++i) {
                if (seen[i] == new_value) restored = true;
                if (seen[i] == old_value && restored) {
                    torn.fetch_add(1);
                    break;
                }
            }
        }
    };
    // Writers elsewhere in the arena keep going through the restores and lose nothing.
    std::vector<std::uint64_t> last_written(kOutside);
    auto writer = [&] {
        for (std::uint64_t n = 1; !stop.load(std::memory_order_relaxed); ++n)
            for (std::size_t p = 0; p < kOutside; ++p) {
                write_u64(outside + p * ps + (n % words) * 8, n);
                last_written[p] = n;
            }
    };
    // Images of B taken meanwhile are B.
    auto imager = [&] {
        while (!stop.load(std::memory_order_relaxed)) {
            std::vector<MemFd> image(1);
            b.write_to(image[0].get());
            const usermm::Arena loaded = load(image);
            const auto* lrange = static_cast<const char*>(loaded.base()) + (range - static_cast<char*>(arena.base()));
            std::size_t strangers = 0;
            for (std::size_t p = 0; p < kPages; ++p)
                for (std::size_t i = 0; i < words; i += 61)
                    strangers += read_u64(lrange + p * ps + i * 8) != value(p, 1);
            foreign.fetch_add(strangers, std::memory_order_relaxed);
            images.fetch_add(1);
        }
    };
    std::vector<std::thread> threads;
    threads.emplace_back(reader, 0);
    threads.emplace_back(reader, kPages / 2);
    threads.emplace_back(writer);
    threads.emplace_back(imager);

    // At least kRestores, and on until the readers have overlapped restores (bounded in time).
    constexpr std::uint64_t kRestores = 300;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    std::uint64_t done = 0;
    while (done < kRestores || ((overlapped.load() < 100 || between.load() < 100 || images.load() == 0) &&
                                std::chrono::steady_clock::now() < deadline)) {
        gen.fetch_add(1);
        arena.restore(++done % 2 ? b : a);
        gen.fetch_add(1);
        if (done % 50 == 0) arena.verify();
        // Now and then a pause, so that readers also read between restores.
        if (done % 8 == 0)
            for (const std::uint64_t r = reads.load();
                 reads.load() < r + 4 && std::chrono::steady_clock::now() < deadline;)
                std::this_thread::yield();
    }
    stop = true;
    for (auto& t : threads) t.join();

    MESSAGE(reads.load(), " reads: ", between.load(), " between restores, ", overlapped.load(), " overlapping one, ",
            mixed.load(), " crossing one; ", images.load(), " images");
    CHECK(between.load() > 0);
    CHECK(overlapped.load() > 0);
    CHECK(images.load() > 0);
    CHECK(foreign.load() == 0);
    CHECK(torn.load() == 0);
    CHECK(stale.load() == 0);
    for (std::size_t p = 0; p < kPages; ++p)
        for (std::size_t i = 0; i < words; ++i) REQUIRE(read_u64(range + p * ps + i * 8) == value(p, done % 2));
    for (std::size_t p = 0; p < kOutside; ++p) {
        const std::uint64_t n = last_written[p];
        REQUIRE(read_u64(outside + p * ps + (n % words) * 8) == n);
    }
    arena.verify();
}

TEST_CASE("threads writing the same pages right after a snapshot: one copy per page, the old content kept") {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 64, kThreads = 4;
    constexpr int kRounds = 60;
    usermm::Arena arena(kPages * ps);
    char* const base =
        static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "shared", .fault_around_pages = 1}));
    for (std::size_t p = 0; p < kPages; ++p)
        for (std::size_t i = 0; i < ps / 8; ++i) write_u64(base + p * ps + i * 8, mix(p * 1000 + i) | 1);
    std::barrier sync(kThreads + 1);

    // All threads write all pages, each its own word, starting at different pages so that several
    // threads reach each page together.
    auto worker = [&](std::size_t t) {
        for (int round = 0; round < kRounds; ++round) {
            sync.arrive_and_wait();
            for (std::size_t k = 0; k < kPages; ++k) {
                const std::size_t p = (k + t * kPages / kThreads) % kPages;
                store_u64(base + p * ps + t * 8, (std::uint64_t(round) << 32) | (p << 8) | t);
            }
            sync.arrive_and_wait();
        }
    };
    // Meanwhile a reader reads the round's snapshot over and over, from before the writers start
    // until they are done, so that first writes also meet it copying the same page out of the arena.
    constexpr int kIdle = -1, kExit = -2;
    std::atomic<int> read_round{kIdle}, reading{kIdle}, done_reading{kIdle};
    std::atomic<const usermm::Snapshot*> current{nullptr};
    std::atomic<std::uint64_t> stale_reads{0}, reads{0};
    Bytes expected(kPages * ps);
    std::thread reader([&] {
        Bytes old(kPages * ps);
        for (int last = kIdle;;) {
            const int r = read_round.load();
            if (r == kExit) break;
            if (r == kIdle || r == last) {
                std::this_thread::yield();
                continue;
            }
            reading.store(r);
            while (read_round.load() == r) {
                current.load()->read(base, old.data(), old.size());
                reads.fetch_add(1, std::memory_order_relaxed);
                if (std::memcmp(old.data(), expected.data(), old.size()) != 0) stale_reads.fetch_add(1);
            }
            done_reading.store(r);
            last = r;
        }
    });
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);

    for (int round = 0; round < kRounds; ++round) {
        INFO("round ", round);
        std::memcpy(expected.data(), base, expected.size());
        const usermm::Stats before = arena.stats();
        const usermm::Snapshot snap = arena.snapshot();
        current.store(&snap);
        read_round.store(round);
        while (reading.load() != round) std::this_thread::yield();
        sync.arrive_and_wait();
        sync.arrive_and_wait();
        read_round.store(kIdle);
        while (done_reading.load() != round) std::this_thread::yield();

        const usermm::Stats after = arena.stats();
        CHECK(after.cow_faults - before.cow_faults == kPages);
        CHECK(after.cow_bytes_copied - before.cow_bytes_copied == kPages * ps);
        CHECK(snap.stats().cow_faults == kPages);
        Bytes old(kPages * ps);
        snap.read(base, old.data(), old.size());
        CHECK(std::memcmp(old.data(), expected.data(), old.size()) == 0);
        std::size_t wrong = 0;
        for (std::size_t p = 0; p < kPages; ++p)
            for (std::size_t i = 0; i < ps / 8; ++i) {
                std::uint64_t before_word;
                std::memcpy(&before_word, expected.data() + p * ps + i * 8, 8);
                const std::uint64_t want = i < kThreads ? (std::uint64_t(round) << 32) | (p << 8) | i : before_word;
                wrong += read_u64(base + p * ps + i * 8) != want;
            }
        CHECK(wrong == 0);
    }
    read_round.store(kExit);
    reader.join();
    for (auto& t : threads) t.join();
    CHECK(reads.load() >= std::uint64_t(kRounds));
    CHECK(stale_reads.load() == 0);
    arena.verify();
}

TEST_CASE("a restore while another restore runs fails with EBUSY, and the arena stays consistent") {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 256;
    constexpr int kTries = 200;
    usermm::Arena arena(kPages * ps);
    char* const base = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "data"}));
    for (std::size_t p = 0; p < kPages; ++p) write_u64(base + p * ps, p + 1);
    const usermm::Snapshot snap = arena.snapshot();
    Bytes then(kPages * ps);
    std::memcpy(then.data(), base, then.size());
    // A first restore ends the write protection the snapshot set, so that the writer below never
    // meets it in the middle of a restore (a race of its own, tested separately).
    arena.restore(snap);

    // A writer keeps changing pages, so that every restore has work to do.
    std::atomic<bool> stop{false};
    std::thread writer([&] {
        for (std::uint64_t n = 1; !stop.load(std::memory_order_relaxed); ++n)
            write_u64(base + (n % kPages) * ps + 8, n);
    });
    std::atomic<int> succeeded{0}, busy{0}, other{0};
    auto restorer = [&] {
        for (int i = 0; i < kTries; ++i) {
            try {
                arena.restore(snap);
                succeeded.fetch_add(1);
            } catch (const usermm::Error& e) {
                (e.code().value() == EBUSY ? busy : other).fetch_add(1);
            }
        }
    };
    std::thread r0(restorer), r1(restorer);
    r0.join();
    r1.join();
    stop = true;
    writer.join();

    MESSAGE(succeeded.load(), " restores succeeded, ", busy.load(), " met another one running (EBUSY)");
    CHECK(other.load() == 0);
    CHECK(succeeded.load() > 0);
    CHECK(succeeded.load() + busy.load() == 2 * kTries);
    arena.verify();
    arena.restore(snap);
    arena.verify();
    CHECK(std::memcmp(base, then.data(), then.size()) == 0);
}

// On the userfaultfd engine a write that meets a snapshot's write-protect mark raises SIGBUS; if
// restore() holds the arena's lock at that moment, it makes the page PROT_NONE before the fault gets
// the lock. The fault is then stale and must be retried, not passed on as an access error (which it
// once was, killing the process). It runs in the test's own process: a forked child would have
// fallen back to the mprotect engine.
TEST_CASE("a write that meets a snapshot's write protection while restore() runs is not passed on") {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 64;
    constexpr int kRounds = 500;
    usermm::Arena arena(kPages * ps);
    char* const base = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "data"}));
    // Spinning, not a barrier: the writer must start at the very moment the restore does.
    std::atomic<int> go{-1}, done{-1};
    std::thread writer([&] {
        for (int round = 0; round < kRounds; ++round) {
            while (go.load() != round) {
            }
            for (std::size_t p = 0; p < kPages; ++p) write_u64(base + p * ps + 8, std::uint64_t(round));
            done.store(round);
        }
    });
    for (int round = 0; round < kRounds; ++round) {
        for (std::size_t p = 0; p < kPages; ++p) write_u64(base + p * ps, p + 1);
        const usermm::Snapshot snap = arena.snapshot();
        go.store(round);
        arena.restore(snap);
        while (done.load() != round) {
        }
    }
    writer.join();
    arena.verify();
    for (std::size_t p = 0; p < kPages; ++p) CHECK(read_u64(base + p * ps) == p + 1);
}
