// Threads: many faults at once, on the same pages, while other threads change the arena, and
// fork() while faults are in flight.
#include <doctest/doctest.h>

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

namespace {
constexpr unsigned kThreads = 4;
}

TEST_CASE("threads faulting the same pages at the same moment: one resolution each, values survive") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 64;
    constexpr int kRounds = 40;
    std::barrier sync(kThreads);
    std::atomic<char*> region{nullptr};

    auto worker = [&](unsigned id) {
        for (int round = 0; round < kRounds; ++round) {
            if (id == 0) region = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            sync.arrive_and_wait();
            char* base = region.load();
            // Every thread writes its own word of every page, so each page is faulted by all of them.
            for (std::size_t p = 0; p < kPages; ++p)
                write_u64(base + p * ps + id * 8, (std::uint64_t(round) << 32) | (p << 8) | id);
            sync.arrive_and_wait();
            if (id == 0) {
                for (std::size_t p = 0; p < kPages; ++p)
                    for (unsigned t = 0; t < kThreads; ++t)
                        REQUIRE(read_u64(base + p * ps + t * 8) == ((std::uint64_t(round) << 32) | (p << 8) | t));
                arena.unmap(base, kPages * ps);
            }
            sync.arrive_and_wait();
        }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
    for (auto& t : threads) t.join();

    const usermm::Stats s = arena.stats();
    // Each page was resolved exactly once, by a write; every other thread that trapped on it found
    // it resolved (spurious) or did not trap at all.
    CHECK(s.minor_faults == kPages * kRounds);
    CHECK(s.write_faults == kPages * kRounds);
    CHECK(s.read_faults == 0);
    CHECK(s.spurious_faults <= (kThreads - 1) * kPages * kRounds);
    arena.verify();
}

TEST_CASE("faults in one VMA while another thread maps, protects and unmaps other ranges") {
    usermm::Arena arena(1ull << 32);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 4096;
    char* data = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "data"}));
    std::atomic<bool> stop{false};
    std::atomic<long> churn{0};

    std::thread changer([&] {
        while (!stop.load()) {
            char* p = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.name = "churn"}));
            arena.protect(p + 16 * ps, 16 * ps, Prot::Read);
            arena.protect(p, 64 * ps, Prot::None);
            arena.protect(p, 32 * ps, Prot::ReadWrite);
            arena.unmap(p, 64 * ps);
            churn.fetch_add(1);
        }
    });
    std::vector<std::thread> faulters;
    for (unsigned t = 0; t < 2; ++t)
        faulters.emplace_back([&, t] {
            // Handshake: the tree is already changing when the faults start, however the threads
            // are scheduled.
            while (churn.load() == 0) std::this_thread::yield();
            for (std::size_t p = t; p < kPages; p += 2) write_u64(data + p * ps, p * 7 + 1);
            for (std::size_t p = t; p < kPages; p += 2) REQUIRE(read_u64(data + p * ps) == p * 7 + 1);
        });
    for (auto& t : faulters) t.join();
    stop = true;
    changer.join();

    CHECK(churn.load() > 0);
    for (std::size_t p = 0; p < kPages; ++p) REQUIRE(read_u64(data + p * ps) == p * 7 + 1);
    const auto vmas = arena.vmas();
    REQUIRE(vmas.size() == 1);
    CHECK(vmas[0].name == "data");
    arena.verify();
}

TEST_CASE("fork() while other threads are mid-fault: the child can still fault") {
    usermm::Arena arena(1ull << 34);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 1 << 16;
    char* data = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    std::atomic<bool> stop{false};
    std::vector<std::thread> faulters;
    for (unsigned t = 0; t < 2; ++t)
        faulters.emplace_back([&, t] {
            for (std::size_t p = t; p < kPages / 2 && !stop.load(); p += 2) write_byte(data + p * ps, 1);
        });

    std::vector<ChildEnd> ends;
    for (int forks = 0; forks < 20; ++forks) {
        // The child touches pages no thread of the parent touches, and both pages it was given and
        // pages in flight in the parent at the moment of the fork.
        ChildEnd end = run_in_child(
            [&] {
                for (std::size_t p = kPages / 2; p < kPages / 2 + 256; ++p) write_byte(data + p * ps, 2);
                for (std::size_t p = 0; p < 256; ++p) (void)read_byte(data + p * ps);
                arena.verify();
            },
            10);
        ends.push_back(end);
        if (!end.exited || end.exit_code != 0) break;
    }
    stop = true;
    for (auto& t : faulters) t.join();
    for (const ChildEnd& end : ends) {
        INFO(end.err);
        REQUIRE(end.exited);
        REQUIRE(end.exit_code == 0);
    }
    // The child's writes stayed in the child.
    for (std::size_t p = kPages / 2; p < kPages / 2 + 256; ++p) REQUIRE(read_byte(data + p * ps) == 0);
    arena.verify();
}
