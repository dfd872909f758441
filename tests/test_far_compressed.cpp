// CompressedStore (include/usermm/far.hpp), the compressed tier in front of a SwapFile: what each
// kind of page becomes (a tag, compressed bytes, or a page behind), the pool's budget and its
// writeback, an arena under a resident limit on the tier from several threads with both codecs, a
// store behind that runs out of room or fails reads, and fork() (the tier cannot share its slots).
#include <doctest/doctest.h>

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <usermm/far.hpp>
#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include "swap_test_util.hpp"
#include "test_util.hpp"

namespace {

using namespace usermm_swap_test;
using usermm::Advice;
using usermm::Arena;
using usermm::Codec;
using usermm::CompressedOptions;
using usermm::CompressedStats;
using usermm::CompressedStore;
using usermm::PageIo;
using usermm::Stats;
using usermm::SwapFile;
using usermm_test::TempDir;

CompressedOptions tier_options(std::uint64_t budget, Codec codec = Codec::Lz4) {
    CompressedOptions o;
    o.budget = budget;
    o.codec = codec;
    return o;
}

const char* name(Codec c) { return c == Codec::Lz4 ? "lz4" : "zstd"; }

// Page-aligned buffers, as usermm hands a store (SwapFile may use O_DIRECT on them).
struct Pages {
    explicit Pages(std::size_t n)
        : count(n), data(static_cast<std::byte*>(std::aligned_alloc(page(), n * page()))) {
        if (!data) std::abort();
        std::memset(data, 0, n * page());
    }
    ~Pages() { std::free(data); }
    Pages(const Pages&) = delete;
    Pages& operator=(const Pages&) = delete;
    std::byte* operator[](std::size_t i) const { return data + i * page(); }
    std::size_t count;
    std::byte* data;
};

// What a page holds. Every page's content names its index and version, so that a page read from the
// wrong slot or an old copy shows.
enum class Kind { Zero, Same, Text, Ints, Random };

Kind kind_of(std::size_t index) {
    constexpr Kind kinds[] = {Kind::Zero, Kind::Same, Kind::Text, Kind::Ints, Kind::Random};
    return kinds[index % 5];
}

const char* const kWords[] = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
    "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you",
    "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will",
    "would", "who", "so", "no", "memory", "page", "kernel", "fault", "process", "thread", "store", "swap",
    "arena", "limit", "resident", "compressed", "pool", "written", "back", "read", "machine", "server"};

void fill_text(std::byte* p, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::size_t at = 0;
    bool start = true;
    while (at < page()) {
        std::string word = kWords[rng() % std::size(kWords)];
        if (start) word[0] = char(word[0] - 'a' + 'A');
        start = rng() % 12 == 0;
        word += start ? ". " : " ";
        const std::size_t n = std::min(word.size(), page() - at);
        std::memcpy(p + at, word.data(), n);
        at += n;
    }
}

void make_page(std::byte* p, Kind kind, std::size_t index, std::uint64_t version) {
    const std::uint64_t seed = mix((std::uint64_t(index) << 20) ^ version) | 1;
    switch (kind) {
        case Kind::Zero:
            std::memset(p, 0, page());
            break;
        case Kind::Same:
            for (std::size_t off = 0; off < page(); off += 8) std::memcpy(p + off, &seed, 8);
            break;
        case Kind::Text:
            fill_text(p, seed);
            break;
        case Kind::Ints:  // a sorted array of 32-bit integers, as a heap holds
            for (std::size_t i = 0; i < page() / 4; ++i) {
                const std::uint32_t v = std::uint32_t(seed) + std::uint32_t(i * 3);
                std::memcpy(p + i * 4, &v, 4);
            }
            break;
        case Kind::Random: {
            std::mt19937_64 rng(seed);
            for (std::size_t off = 0; off < page(); off += 8) {
                const std::uint64_t w = rng();
                std::memcpy(p + off, &w, 8);
            }
            break;
        }
    }
}

bool page_holds(const void* p, Kind kind, std::size_t index, std::uint64_t version, std::byte* scratch) {
    make_page(scratch, kind, index, version);
    return std::memcmp(p, scratch, page()) == 0;
}

std::vector<std::uint64_t> allocate(usermm::Store& store, std::size_t n) {
    std::vector<std::uint64_t> slots(n);
    REQUIRE(store.allocate(slots) == n);
    return slots;
}

std::vector<PageIo> batch(const std::vector<std::uint64_t>& slots, const Pages& pages, std::size_t first = 0) {
    std::vector<PageIo> io;
    for (std::size_t k = 0; k < slots.size(); ++k) io.push_back({slots[k], pages[first + k], 0});
    return io;
}

// A store in front of a SwapFile whose reads fail (EIO) while `fail_reads` is set.
class ReadFailStore final : public usermm::Store {
public:
    explicit ReadFailStore(SwapFile& inner) : inner_(inner) {}
    std::atomic<bool> fail_reads{false};
    std::size_t allocate(std::span<std::uint64_t> slots) override { return inner_.allocate(slots); }
    void release(std::span<const std::uint64_t> slots) override { inner_.release(slots); }
    int retain(std::span<const std::uint64_t> slots) override { return inner_.retain(slots); }
    void write(std::span<PageIo> pages) override { inner_.write(pages); }
    void read(std::span<PageIo> pages) override {
        if (!fail_reads.load()) return inner_.read(pages);
        for (PageIo& io : pages) io.error = EIO;
    }
    std::uint64_t capacity() const override { return inner_.capacity(); }
    std::string describe() const override { return "read-failing " + inner_.describe(); }

private:
    SwapFile& inner_;
};

}  // namespace

TEST_CASE("store level: a zero and a same-filled page are tags, text is compressed, random bytes go behind") {
    for (Codec codec : {Codec::Lz4, Codec::Zstd}) {
        CAPTURE(name(codec));
        TempDir dir("/var/tmp");
        SwapFile backing(dir.file("swap"), 16 << 20);
        CompressedStore tier(backing, tier_options(1 << 20, codec));
        CHECK(tier.describe() ==
              fmt::format("compressed tier ({}, 1 MiB) in front of {}", name(codec), backing.describe()));
        CHECK(tier.capacity() >= backing.capacity());

        Pages in(4), out(4);
        std::memset(in[0], 0, page());
        std::memset(in[1], 0x01, page());
        const std::string sentence = "All work and no play makes Jack a dull boy. ";
        for (std::size_t off = 0; off < page(); ++off) in[2][off] = std::byte(sentence[off % sentence.size()]);
        make_page(in[3], Kind::Random, 3, 1);

        const std::vector<std::uint64_t> slots = allocate(tier, 4);
        std::vector<PageIo> io = batch(slots, in);
        tier.write(io);
        for (const PageIo& p : io) CHECK(p.error == 0);
        CompressedStats st = tier.stats();
        CHECK(st.pages_in == 4);
        CHECK(st.stored_pages == 3);
        CHECK(st.same_filled == 2);
        CHECK(st.rejected == 1);
        CHECK(st.written_back == 0);
        CHECK(st.compressed_bytes > 0);
        CHECK(st.compressed_bytes < page() / 8);  // a repeated sentence compresses far
        CHECK(st.ratio() > 8);
        CHECK(backing.slots_in_use() == 1);

        // One batch mixing the pool's pages and the one behind; then each on its own.
        std::vector<PageIo> back = batch(slots, out);
        tier.read(back);
        for (std::size_t i = 0; i < 4; ++i) {
            CAPTURE(i);
            CHECK(back[i].error == 0);
            CHECK(std::memcmp(in[i], out[i], page()) == 0);
        }
        std::memset(out.data, 0xee, 4 * page());
        for (std::size_t i = 0; i < 4; ++i) {
            std::vector<PageIo> one = {{slots[i], out[i], 0}};
            tier.read(one);
            CHECK(one[0].error == 0);
            CHECK(std::memcmp(in[i], out[i], page()) == 0);
        }
        st = tier.stats();
        CHECK(st.pool_hits == 6);
        CHECK(st.backing_reads == 2);

        CHECK(tier.retain(slots) == ENOTSUP);

        // Releases free the pool's bytes, the tags and the slot behind, one kind at a time.
        tier.release({&slots[2], 1});
        st = tier.stats();
        CHECK(st.stored_pages == 2);
        CHECK(st.compressed_bytes == 0);
        CHECK(st.ratio() == 0);
        tier.release({&slots[3], 1});
        CHECK(backing.slots_in_use() == 0);
        tier.release({&slots[0], 2});
        st = tier.stats();
        CHECK(st.stored_pages == 0);
        CHECK(st.same_filled == 0);
        // A released slot is not readable, and it is handed out again.
        std::vector<PageIo> gone = {{slots[0], out[0], 0}};
        tier.read(gone);
        CHECK(gone[0].error != 0);
        const std::vector<std::uint64_t> again = allocate(tier, 4);
        for (std::uint64_t s : again) CHECK(std::find(slots.begin(), slots.end(), s) != slots.end());
        tier.release(again);
    }
}

TEST_CASE("a small budget: the oldest pages are written back in batches, the pool never over budget, all intact") {
    for (Codec codec : {Codec::Lz4, Codec::Zstd}) {
        CAPTURE(name(codec));
        TempDir dir("/var/tmp");
        SwapFile backing(dir.file("swap"), 16 << 20);
        constexpr std::uint64_t budget = 64 << 10;
        CompressedStore tier(backing, tier_options(budget, codec));
        constexpr std::size_t n = 512, per_write = 32;
        Pages in(n), out(n);
        for (std::size_t i = 0; i < n; ++i) make_page(in[i], i % 2 ? Kind::Text : Kind::Ints, i, 1);
        const std::vector<std::uint64_t> slots = allocate(tier, n);
        std::size_t errors = 0;
        std::uint64_t peak = 0;
        for (std::size_t first = 0; first < n; first += per_write) {
            const std::vector<std::uint64_t> some(slots.begin() + long(first), slots.begin() + long(first + per_write));
            std::vector<PageIo> io = batch(some, in, first);
            tier.write(io);
            for (const PageIo& p : io) errors += p.error != 0;
            peak = std::max(peak, tier.stats().compressed_bytes);
        }
        CHECK(errors == 0);
        CHECK(peak <= budget);
        CompressedStats st = tier.stats();
        CHECK(st.written_back > 0);
        CHECK(st.pages_in == n);
        // Every page is in the pool or behind it, nowhere else.
        CHECK(st.stored_pages + backing.slots_in_use() == n);
        CHECK(backing.slots_in_use() == st.written_back + st.rejected);
        CHECK(st.ratio() > 1);

        std::vector<PageIo> io = batch(slots, out);
        tier.read(io);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < n; ++i) wrong += io[i].error != 0 || std::memcmp(in[i], out[i], page()) != 0;
        CHECK(wrong == 0);
        st = tier.stats();
        CHECK(st.pool_hits + st.backing_reads == n);
        CHECK(st.backing_reads >= st.written_back);

        tier.release(slots);
        st = tier.stats();
        CHECK(st.stored_pages == 0);
        CHECK(st.compressed_bytes == 0);
        CHECK(backing.slots_in_use() == 0);
    }
}

TEST_CASE("threads writing, reading and releasing at once over a small budget: every page reads back its own") {
    TempDir dir("/var/tmp");
    SwapFile backing(dir.file("swap"), 16 << 20);
    constexpr std::uint64_t budget = 32 << 10;
    CompressedStore tier(backing, tier_options(budget));
    constexpr std::size_t threads = 4, rounds = 24, per_batch = 16;
    std::atomic<std::size_t> wrong{0}, errors{0}, over{0};
    const auto run = [&](std::size_t t) {
        Pages in(per_batch), out(per_batch);
        std::vector<std::uint64_t> kept;  // released a round later, so that writeback meets releases
        for (std::size_t r = 0; r < rounds; ++r) {
            std::vector<std::uint64_t> slots(per_batch);
            if (tier.allocate(slots) != per_batch) {
                errors += 1;
                return;
            }
            const std::size_t base = (t * rounds + r) * per_batch;
            for (std::size_t k = 0; k < per_batch; ++k) make_page(in[k], kind_of(base + k), base + k, 1);
            std::vector<PageIo> io = batch(slots, in);
            tier.write(io);
            for (const PageIo& p : io) errors += p.error != 0;
            over += tier.stats().compressed_bytes > budget;
            // Once rewritten: a slot's content is its last write's.
            make_page(in[0], Kind::Text, base, 2);
            std::vector<PageIo> again = {{slots[0], in[0], 0}};
            tier.write(again);
            errors += again[0].error != 0;
            std::vector<PageIo> back = batch(slots, out);
            tier.read(back);
            for (std::size_t k = 0; k < per_batch; ++k)
                wrong += back[k].error != 0 || std::memcmp(in[k], out[k], page()) != 0;
            tier.release(kept);
            kept = slots;
        }
        tier.release(kept);
    };
    std::vector<std::thread> pool;
    for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(run, t);
    for (std::thread& t : pool) t.join();
    CHECK(errors.load() == 0);
    CHECK(wrong.load() == 0);
    CHECK(over.load() == 0);
    const CompressedStats st = tier.stats();
    CHECK(st.written_back > 0);
    CHECK(st.stored_pages == 0);
    CHECK(st.compressed_bytes == 0);
    CHECK(backing.slots_in_use() == 0);
}

TEST_CASE("an arena four times its resident limit on the tier, four threads, both codecs: content intact") {
    for (Codec codec : {Codec::Lz4, Codec::Zstd}) {
        CAPTURE(name(codec));
        TempDir dir("/var/tmp");
        SwapFile backing(dir.file("swap"), 64 << 20);
        // Room for about a hundred text pages: writeback runs too, concurrently with hits.
        CompressedStore tier(backing, tier_options(256 << 10, codec));
        constexpr std::size_t limit = 8 * kCluster, n = 4 * limit, threads = 4;
        std::vector<int> errors;
        std::mutex errors_mu;
        usermm::ArenaOptions o = options(&tier, limit);
        o.on_store_error = [&](int err, const void*) {
            std::lock_guard lock(errors_mu);
            errors.push_back(err);
        };
        {
            Arena arena(64 << 20, o);
            char* p = map_aligned(arena, n);
            std::atomic<std::size_t> wrong{0};
            const auto run = [&](std::size_t t, std::uint64_t version) {
                Pages scratch(1);
                for (std::size_t i = t; i < n; i += threads)
                    make_page(reinterpret_cast<std::byte*>(p + i * page()), kind_of(i), i, version);
                for (std::size_t i = t; i < n; i += threads)
                    wrong += !page_holds(p + i * page(), kind_of(i), i, version, scratch[0]);
            };
            for (std::uint64_t version : {1, 2}) {
                std::vector<std::thread> pool;
                for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(run, t, version);
                for (std::thread& t : pool) t.join();
                CHECK(wrong.load() == 0);
            }
            // Everything out at once, so that the tier holds every kind; then everything back.
            arena.advise(p, n * page(), Advice::PageOut);
            const CompressedStats st = tier.stats();
            CHECK(st.same_filled > 0);
            CHECK(st.stored_pages > st.same_filled);
            CHECK(st.ratio() > 1);
            CHECK(st.rejected > 0);
            CHECK(st.written_back > 0);
            CHECK(st.compressed_bytes <= 256 << 10);
            Pages scratch(1);
            for (std::size_t i = 0; i < n; ++i) wrong += !page_holds(p + i * page(), kind_of(i), i, 2, scratch[0]);
            CHECK(wrong.load() == 0);
            const Stats s = arena.stats();
            CHECK(s.pages_swapped_out > 0);
            CHECK(s.pages_swapped_in > 0);
            CHECK(s.store_errors == 0);
            CHECK(tier.stats().pool_hits > 0);
            CHECK(tier.stats().backing_reads > 0);
            arena.verify();
            arena.unmap(p, n * page());
        }
        CHECK(errors.empty());
        CHECK(tier.stats().stored_pages == 0);
        CHECK(backing.slots_in_use() == 0);
    }
}

TEST_CASE("the store behind full: the tier's writes fail with ENOSPC, the arena's pages stay resident and intact") {
    TempDir dir("/var/tmp");
    // Four pages behind, 8 KiB of pool: a cluster of 32 text pages cannot all go anywhere.
    SwapFile backing(dir.file("swap"), 4 * page());
    constexpr std::uint64_t budget = 8 << 10;
    CompressedStore tier(backing, tier_options(budget));

    SUBCASE("store level: what was taken reads back, what was refused says ENOSPC") {
        constexpr std::size_t n = 64;
        Pages in(n), out(n);
        for (std::size_t i = 0; i < n; ++i) make_page(in[i], Kind::Text, i, 1);
        const std::vector<std::uint64_t> slots = allocate(tier, n);
        std::vector<PageIo> io = batch(slots, in);
        tier.write(io);
        std::size_t ok = 0, full = 0;
        for (const PageIo& p : io) {
            ok += p.error == 0;
            full += p.error == ENOSPC;
        }
        CHECK(ok > 0);
        CHECK(full > 0);
        CHECK(ok + full == n);
        CHECK(tier.stats().compressed_bytes <= budget);
        CHECK(backing.slots_in_use() == 4);
        std::vector<PageIo> back;
        for (std::size_t i = 0; i < n; ++i)
            if (io[i].error == 0) back.push_back({slots[i], out[i], 0});
        tier.read(back);
        std::size_t wrong = 0;
        for (const PageIo& b : back) {
            const std::size_t i = std::size_t(std::find(slots.begin(), slots.end(), b.slot) - slots.begin());
            wrong += b.error != 0 || std::memcmp(in[i], out[i], page()) != 0;
        }
        CHECK(wrong == 0);
        tier.release(slots);
        CHECK(tier.stats().stored_pages == 0);
        CHECK(backing.slots_in_use() == 0);
    }

    SUBCASE("arena: PageOut of text and random pages fails, nothing is lost, nothing leaks") {
        std::atomic<int> reports{0}, other{0};
        constexpr std::size_t n = 4 * kCluster;
        {
            usermm::ArenaOptions o = options(&tier);
            o.on_store_error = [&](int err, const void*) {
                reports.fetch_add(1);
                if (err != ENOSPC) other.fetch_add(1);
            };
            Arena arena(64 << 20, o);
            char* p = map_aligned(arena, n);
            const auto kind = [](std::size_t i) { return i < 2 * kCluster ? Kind::Text : Kind::Random; };
            for (std::size_t i = 0; i < n; ++i) make_page(reinterpret_cast<std::byte*>(p + i * page()), kind(i), i, 1);
            const Stats s0 = arena.stats();
            arena.advise(p, n * page(), Advice::PageOut);
            const Stats d = minus(arena.stats(), s0);
            CHECK(d.store_errors >= 1);
            CHECK(d.pages_swapped_out == 0);
            CHECK(kernel_resident(p, n) == n);
            Pages scratch(1);
            std::size_t wrong = 0;
            for (std::size_t i = 0; i < n; ++i) wrong += !page_holds(p + i * page(), kind(i), i, 1, scratch[0]);
            CHECK(wrong == 0);
            // usermm released the slots of every batch that failed: the tier and the file hold nothing.
            CHECK(tier.stats().stored_pages == 0);
            CHECK(backing.slots_in_use() == 0);
            arena.verify();
        }
        CHECK(reports.load() >= 1);
        CHECK(other.load() == 0);
        // The tier saw the pages; the incompressible ones count as rejected only once written
        // behind, which holds four.
        CHECK(tier.stats().pages_in > 0);
        CHECK(tier.stats().rejected <= 4);
    }
}

TEST_CASE("a read the store behind fails is an error for its page alone") {
    TempDir dir("/var/tmp");
    SwapFile inner(dir.file("swap"), 4 << 20);
    ReadFailStore backing(inner);
    CompressedStore tier(backing, tier_options(1 << 20));
    Pages in(3), out(3);
    make_page(in[0], Kind::Same, 0, 1);
    make_page(in[1], Kind::Text, 1, 1);
    make_page(in[2], Kind::Random, 2, 1);
    const std::vector<std::uint64_t> slots = allocate(tier, 3);
    std::vector<PageIo> io = batch(slots, in);
    tier.write(io);
    for (const PageIo& p : io) REQUIRE(p.error == 0);
    backing.fail_reads.store(true);
    std::vector<PageIo> back = batch(slots, out);
    tier.read(back);
    CHECK(back[0].error == 0);
    CHECK(back[1].error == 0);
    CHECK(back[2].error == EIO);
    CHECK(std::memcmp(in[0], out[0], 2 * page()) == 0);
    backing.fail_reads.store(false);
    tier.read(back);
    for (const PageIo& p : back) CHECK(p.error == 0);
    CHECK(std::memcmp(in.data, out.data, 3 * page()) == 0);
    tier.release(slots);
    CHECK(inner.slots_in_use() == 0);
}

// Skipped under TSan: the forked child starts usermm's threads again, which TSan refuses after a
// multi-threaded fork.
TEST_CASE("fork with an arena on the tier: its pages come back before the child exists, which reads them all" *
          doctest::skip(usermm_test::kSkipUnderTsan)) {
    TempDir dir("/var/tmp");
    SwapFile backing(dir.file("swap"), 16 << 20);
    CompressedStore tier(backing, tier_options(128 << 10));
    constexpr std::size_t limit = 2 * kCluster, n = 8 * limit;
    Arena arena(64 << 20, options(&tier, limit));
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) make_page(reinterpret_cast<std::byte*>(p + i * page()), kind_of(i), i, 1);
    arena.advise(p, n * page(), Advice::PageOut);
    REQUIRE(tier.stats().stored_pages > 0);
    REQUIRE(backing.slots_in_use() > 0);

    const auto child = usermm_test::run_guarded(
        [&] {
            Pages scratch(1);
            std::size_t bad = 0;
            for (std::size_t i = 0; i < n; ++i) bad += !page_holds(p + i * page(), kind_of(i), i, 1, scratch[0]);
            CHILD_CHECK(bad == 0);
            // Without a store the child keeps its memory, without a limit.
            CHILD_CHECK(arena.resident_limit() == 0);
            for (std::size_t i = 0; i < n; ++i)
                make_page(reinterpret_cast<std::byte*>(p + i * page()), kind_of(i), i, 2);
            for (std::size_t i = 0; i < n; ++i) bad += !page_holds(p + i * page(), kind_of(i), i, 2, scratch[0]);
            CHILD_CHECK(bad == 0);
        },
        20);
    usermm_test::check_survived(child);
    // The parent's pages came back and gave their slots up; the tier holds only what the parent
    // evicted again since.
    Pages scratch(1);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += !page_holds(p + i * page(), kind_of(i), i, 1, scratch[0]);
    CHECK(wrong == 0);
    arena.verify();
    arena.unmap(p, n * page());
    CHECK(tier.stats().stored_pages == 0);
    CHECK(backing.slots_in_use() == 0);
}
