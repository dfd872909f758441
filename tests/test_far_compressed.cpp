// CompressedStore in front of a SwapFile: tags, compressed pages, incompressible pages sent behind,
// writeback when the pool is full, an arena four times its limit on both codecs, a store behind
// that refuses, and fork.
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <usermm/far.hpp>
#include <usermm/usermm.hpp>

#include "swap_test_util.hpp"
#include "test_util.hpp"

using namespace usermm;
using namespace usermm_swap_test;

namespace {

// What page `i` of version `v` holds, by kind: i % 4 == 0 zeros, 1 one repeated word, 2 text
// (compressible), 3 random (incompressible).
void make(char* p, std::size_t i, std::uint64_t v) {
    auto* w = reinterpret_cast<std::uint64_t*>(p);
    switch (i % 4) {
        case 0:
            std::memset(p, 0, page());
            break;
        case 1:
            for (std::size_t k = 0; k < page() / 8; ++k) w[k] = 0x0101010101010101ull * (v + i);
            break;
        case 2:
            for (std::size_t k = 0; k < page(); ++k) p[k] = "the page fault of a kernel "[(k + i + v) % 27];
            break;
        default: {
            std::mt19937_64 rng(i * 1000003 + v);
            for (std::size_t k = 0; k < page() / 8; ++k) w[k] = rng();
        }
    }
}

bool is(const char* p, std::size_t i, std::uint64_t v) {
    std::vector<char> want(page());
    make(want.data(), i, v);
    return std::memcmp(p, want.data(), page()) == 0;
}

struct Buffers {
    void* mem;
    char* at(std::size_t i) const { return static_cast<char*>(mem) + i * page(); }
    explicit Buffers(std::size_t n) : mem(std::aligned_alloc(page(), n * page())) {}
    ~Buffers() { std::free(mem); }
};

}  // namespace

TEST_CASE("compressed tier: zero and same-filled pages are tags, text is compressed, random pages go behind") {
    SwapFile behind(swap_path(), 16 << 20);
    CompressedStore tier(behind);
    CHECK(tier.describe().find("lz4") != std::string::npos);
    constexpr std::size_t n = 4;
    Buffers b(n);
    std::vector<std::uint64_t> slots(n);
    REQUIRE(tier.allocate(slots) == n);
    std::vector<PageIo> io(n);
    for (std::size_t i = 0; i < n; ++i) {
        make(b.at(i), i, 1);
        io[i] = {slots[i], b.at(i), -1};
    }
    tier.write(io);
    for (const PageIo& x : io) CHECK(x.error == 0);
    CompressedStats s = tier.stats();
    CHECK(s.pages_in == 4);
    CHECK(s.stored_pages == 3);
    CHECK(s.same_filled == 2);
    CHECK(s.rejected == 1);
    CHECK(s.compressed_bytes > 0);
    CHECK(s.compressed_bytes < page() / 4);
    CHECK(s.ratio() > 4);
    CHECK(behind.slots_in_use() == 1);
    std::memset(b.mem, 0xee, n * page());
    for (PageIo& x : io) x.error = -1;
    tier.read(io);
    for (std::size_t i = 0; i < n; ++i) {
        CHECK(io[i].error == 0);
        CHECK(is(b.at(i), i, 1));
    }
    s = tier.stats();
    CHECK(s.pool_hits == 3);
    CHECK(s.backing_reads == 1);
    tier.release(slots);
    s = tier.stats();
    CHECK(s.stored_pages == 0);
    CHECK(s.compressed_bytes == 0);
    CHECK(behind.slots_in_use() == 0);
    // Bad input changes nothing: a slot never handed out, one released.
    PageIo bad{slots[0], b.at(0), 0};
    tier.read({&bad, 1});
    CHECK(bad.error == EINVAL);
    tier.release(slots);
    CHECK(tier.retain(slots) == ENOTSUP);
    CHECK_THROWS_AS(CompressedStore(behind, {.budget = 1}), std::system_error);
}

TEST_CASE("compressed tier: a full pool writes its oldest pages back in batches, never over its budget") {
    for (Codec codec : {Codec::Lz4, Codec::Zstd}) {
        CAPTURE(int(codec));
        SwapFile behind(swap_path(), 16 << 20);
        CompressedOptions o;
        o.budget = 16 << 10;  // a text page compresses to ~60 bytes: the pool holds a quarter of them
        o.codec = codec;
        CompressedStore tier(behind, o);
        constexpr std::size_t n = 1024, batch = 32;
        Buffers b(n);
        std::vector<std::uint64_t> slots(n);
        REQUIRE(tier.allocate(slots) == n);
        std::vector<PageIo> io(n);
        for (std::size_t i = 0; i < n; ++i) {
            make(b.at(i), 4 * i + 2, 1);  // text pages, each a little different
            io[i] = {slots[i], b.at(i), -1};
        }
        for (std::size_t i = 0; i < n; i += batch) {
            tier.write({io.data() + i, batch});
            CHECK(tier.stats().compressed_bytes <= o.budget);
        }
        for (const PageIo& x : io) CHECK(x.error == 0);
        const CompressedStats s = tier.stats();
        CHECK(s.written_back > 0);
        CHECK(s.rejected == 0);
        CHECK(s.stored_pages + s.written_back == n);
        CHECK(behind.slots_in_use() == s.written_back);
        std::memset(b.mem, 0, n * page());
        tier.read(io);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += io[i].error != 0 || !is(b.at(i), 4 * i + 2, 1);
        CHECK(wrong == 0);
        tier.release(slots);
        CHECK(behind.slots_in_use() == 0);
    }
}

TEST_CASE("compressed tier under an arena four times its limit: four threads, both codecs, content intact") {
    for (Codec codec : {Codec::Lz4, Codec::Zstd}) {
        CAPTURE(int(codec));
        SwapFile behind(swap_path(), 64 << 20);
        CompressedOptions o;
        o.budget = 256 << 10;
        o.codec = codec;
        CompressedStore tier(behind, o);
        constexpr std::size_t limit = 8 * kCluster, n = 4 * limit;
        Arena arena(64 << 20, options(&tier, limit));
        char* p = map_aligned(arena, n);
        std::atomic<std::size_t> wrong{0};
        for (std::uint64_t v = 1; v <= 2; ++v) {
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < 4; ++t)
                ts.emplace_back([&, t] {
                    for (std::size_t i = t; i < n; i += 4) make(p + i * page(), i, v);
                    for (std::size_t i = t; i < n; i += 4) wrong += !is(p + i * page(), i, v);
                });
            for (std::thread& t : ts) t.join();
        }
        CHECK(wrong == 0);
        const CompressedStats s = tier.stats();
        CHECK(arena.stats().pages_swapped_out > 0);
        CHECK(arena.stats().pages_swapped_in > 0);
        CHECK(s.same_filled > 0);
        CHECK(s.rejected > 0);
        CHECK(s.pages_in > 0);
        CHECK(s.compressed_bytes <= o.budget);
        arena.verify();
        arena.unmap(p, n * page());
        CHECK(tier.stats().stored_pages == 0);
        CHECK(behind.slots_in_use() == 0);
    }
}

TEST_CASE("compressed tier: a store behind that is full keeps incompressible pages resident and intact") {
    SwapFile behind(swap_path(), 8 * page());  // eight slots
    CompressedOptions o;
    o.budget = 16 << 10;
    CompressedStore tier(behind, o);
    constexpr std::size_t limit = 2 * kCluster, n = 8 * kCluster;
    ArenaOptions ao = options(&tier, limit);
    std::atomic<int> reported{0};
    ao.on_store_error = [&](int, const void*) { ++reported; };
    Arena arena(64 << 20, ao);
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) make(p + i * page(), 4 * i + 3, 1);  // all random
    arena.advise(p, n * page(), Advice::PageOut);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += !is(p + i * page(), 4 * i + 3, 1);
    CHECK(wrong == 0);
    CHECK(arena.stats().store_errors > 0);
    CHECK(arena.stats().resident_pages > n - 8 - kCluster);
    arena.unmap(p, n * page());
}

// Skipped under TSan: the forked child starts usermm's threads again, which TSan refuses after a
// multi-threaded fork.
TEST_CASE("compressed tier and fork: the tier refuses to share, its pages come back before the child exists" *
          doctest::skip(usermm_test::kSkipUnderTsan)) {
    SwapFile behind(swap_path(), 16 << 20);
    CompressedStore tier(behind);
    constexpr std::size_t limit = 2 * kCluster, n = 8 * kCluster;
    Arena arena(64 << 20, options(&tier, limit));
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) make(p + i * page(), i, 1);
    arena.advise(p, n * page(), Advice::PageOut);
    CHECK(tier.stats().pages_in > 0);
    const auto child = usermm_test::run_guarded(
        [&] {
            std::size_t bad = 0;
            for (std::size_t i = 0; i < n; ++i) bad += !is(p + i * page(), i, 1);
            CHILD_CHECK(bad == 0);
            CHILD_CHECK(arena.resident_limit() == 0);
        },
        20);
    check_survived(child);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += !is(p + i * page(), i, 1);
    CHECK(wrong == 0);
    arena.unmap(p, n * page());
    CHECK(tier.stats().stored_pages == 0);
}
