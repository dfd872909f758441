// Far memory (issue 13's benchmark): every figure side by side with its floor, in the same run,
// on memcached servers the benchmark starts on loopback.
//  a. Swap-in latency: touches of random swapped-out pages of an arena on a MemcachedStore, each
//     timed, against the floor: a raw 4 KiB get with libmemcached of a key on the same server
//     (and MemcachedStore::read of one page, the store's own share).
//  b. Eviction throughput: a PageOut of the whole arena (batches of a cluster, one pipelined
//     multi-set per server) against one libmemcached set per page.
//  c. A Zipf 0.99 workload (10% writes) over 4 times the resident limit: time with a pool of 3
//     memcached servers against the same workload on a local SwapFile, and without a limit.
//  d. The compressed tier: its ratio and cost per page (write + read, store level) on a heap of
//     integers and on text, against LZ4_compress_default + LZ4_decompress_safe of the same pages.
// Usage: usermm-bench-far [limit pages (2048: 8 MiB)] [touches for a (2000)] [references for c
//        (200000)]; `64 200 2000` is a smoke run.
#include <libmemcached/memcached.h>
#include <lz4.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <usermm/far.hpp>
#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include "../tests/far_test_util.hpp"
#include "bench_util.hpp"
#include "refstring.hpp"

using usermm::Advice;
using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kCluster = 32;

usermm::ArenaOptions limited(usermm::Store* store, std::size_t limit_pages) {
    usermm::ArenaOptions o;
    o.resident_limit = limit_pages * kPage;
    o.store = store;
    return o;
}

char* map_aligned(usermm::Arena& arena, std::size_t pages) {
    const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(arena.base()), span = kCluster * kPage;
    const std::uintptr_t at = (base + span - 1) / span * span;
    return static_cast<char*>(arena.map(pages * kPage, usermm::Prot::ReadWrite, {.address = reinterpret_cast<void*>(at)}));
}

void fill(char* p, std::size_t pages, std::uint64_t seed) {
    for (std::size_t i = 0; i < pages; ++i) {
        auto* w = reinterpret_cast<std::uint64_t*>(p + i * kPage);
        for (std::size_t k = 0; k < kPage / 8; ++k) w[k] = (seed + i) * 0x9e3779b97f4a7c15ull + k;
    }
}

struct Libmemcached {
    memcached_st* m = memcached_create(nullptr);
    explicit Libmemcached(int port) {
        memcached_server_add(m, "127.0.0.1", in_port_t(port));
        memcached_behavior_set(m, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
    }
    ~Libmemcached() { memcached_free(m); }
};

[[noreturn]] void die(const std::string& what) {
    std::fprintf(stderr, "usermm-bench-far: %s\n", what.c_str());
    std::exit(1);
}

// a: median ns of a touch of a random swapped-out page, of a raw get, of a one-page store read.
void swap_in_latency(const std::vector<usermm_test::ServerProcess>& pool, std::size_t limit, std::size_t touches) {
    usermm::MemcachedStore store({pool[0].address()});
    const std::size_t pages = std::max<std::size_t>(4 * limit, touches + 200);
    usermm::Arena arena(std::size_t(1) << 36, limited(&store, limit));
    char* p = map_aligned(arena, pages);
    fill(p, pages, 1);
    arena.advise(p, pages * kPage, Advice::PageOut);
    std::mt19937_64 rng(7);
    std::vector<std::size_t> order(pages);
    for (std::size_t i = 0; i < pages; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    // The floor: libmemcached's get of a 4 KiB value on the same server; and the store alone, a
    // one-page read of a slot of its own. The three are timed in turn in one loop, so that the
    // machine's moods (the floor here moves between ~15 and ~30 us from one run to the next) fall
    // on all three alike.
    Libmemcached raw(pool[0].port());
    std::vector<char> value(kPage, 'x');
    for (std::size_t k = 0; k < 256; ++k) {
        const std::string key = fmt::format("floor:{}", k);
        if (memcached_set(raw.m, key.data(), key.size(), value.data(), kPage, 0, 0) != MEMCACHED_SUCCESS)
            die("libmemcached set failed");
    }
    std::uint64_t slot = 0;
    if (store.allocate({&slot, 1}) != 1) die("allocate failed");
    void* buf = std::aligned_alloc(kPage, kPage);
    usermm::PageIo io{slot, buf, 0};
    store.write({&io, 1});
    // Touches of pages far apart, each a swap-in alone (no readahead: never the page after the
    // last one). Rounds of 100: back to back (usermm's I/O thread is still watching for work), then
    // each fault after a raw get and a store read (the I/O thread has gone to sleep: the fault pays
    // its wake-up), the floor measured alongside in both.
    std::vector<double> fault_run, fault_alone, get_run, get_alone, read;
    volatile std::uint64_t sink = 0;
    std::size_t k = 0;
    const auto touch = [&](std::vector<double>& into) {
        const std::uint64_t t0 = now_ns();
        sink = sink + *reinterpret_cast<volatile std::uint64_t*>(p + order[k++] * kPage);
        into.push_back(double(now_ns() - t0));
    };
    const auto get = [&](std::vector<double>& into) {
        const std::string key = fmt::format("floor:{}", k % 256);
        std::size_t len = 0;
        std::uint32_t flags = 0;
        memcached_return_t rc;
        const std::uint64_t t0 = now_ns();
        char* v = memcached_get(raw.m, key.data(), key.size(), &len, &flags, &rc);
        into.push_back(double(now_ns() - t0));
        if (!v || len != kPage) die("libmemcached get failed");
        std::free(v);
    };
    while (k + 200 <= touches) {
        for (int i = 0; i < 100; ++i) touch(fault_run);
        for (int i = 0; i < 100; ++i) get(get_run);
        for (int i = 0; i < 100; ++i) {
            touch(fault_alone);
            get(get_alone);
            const std::uint64_t t0 = now_ns();
            store.read({&io, 1});
            read.push_back(double(now_ns() - t0));
            if (io.error) die("store read failed");
        }
    }
    store.release({&slot, 1});
    std::free(buf);
    const double fr = median(fault_run), fa = median(fault_alone), gr = median(get_run), ga = median(get_alone);
    const double r = median(read);
    std::printf("a. swap-in of a random page through memcached (medians of %zu)\n", fault_run.size());
    std::printf("   usermm fault, back to back      %8.1f us   %.2fx the floor (target <= 1.2x)\n", fr / 1e3, fr / gr);
    std::printf("   usermm fault, after other work  %8.1f us   %.2fx\n", fa / 1e3, fa / ga);
    std::printf("   MemcachedStore::read            %8.1f us   %.2fx\n", r / 1e3, r / ga);
    std::printf("   floor: libmemcached get of 4 KiB %7.1f us back to back, %.1f us between the others\n", gr / 1e3,
                ga / 1e3);
    arena.unmap(p, pages * kPage);
}

// b: pages per second of a PageOut against one set per page.
void eviction_throughput(const std::vector<usermm_test::ServerProcess>& pool, std::size_t limit) {
    const std::size_t pages = 4 * limit;
    usermm::MemcachedStore store({pool[0].address()});
    usermm::Arena arena(std::size_t(1) << 36, limited(&store, 0));
    char* p = map_aligned(arena, pages);
    fill(p, pages, 2);
    std::uint64_t t0 = now_ns();
    arena.advise(p, pages * kPage, Advice::PageOut);
    const double batched = double(pages) / (double(now_ns() - t0) / 1e9);
    const usermm::FarStats s = store.stats();
    Libmemcached raw(pool[0].port());
    t0 = now_ns();
    for (std::size_t i = 0; i < pages; ++i) {
        const std::string key = fmt::format("one:{}", i);
        if (memcached_set(raw.m, key.data(), key.size(), p + i * kPage, kPage, 0, 0) != MEMCACHED_SUCCESS)
            die("libmemcached set failed");
    }
    const double single = double(pages) / (double(now_ns() - t0) / 1e9);
    std::printf("b. eviction of %zu pages to memcached\n", pages);
    std::printf("   PageOut, batched      %8.0f pages/s  %.1fx one set per page (target >= 5x); %llu round trips\n",
                batched, batched / single, static_cast<unsigned long long>(s.round_trips));
    std::printf("   floor: one libmemcached set per page %8.0f pages/s\n", single);
    arena.unmap(p, pages * kPage);
}

// c: seconds of a Zipf workload on a store (nullptr: no limit).
double zipf_run(usermm::Store* store, std::size_t limit, std::size_t refs) {
    const std::size_t pages = 4 * limit;
    usermm::Arena arena(std::size_t(1) << 36, limited(store, store ? limit : 0));
    char* p = map_aligned(arena, pages);
    fill(p, pages, 3);
    if (store) arena.advise(p, pages * kPage, Advice::PageOut);
    usermm_refstring::Zipf z(std::uint32_t(pages), 0.99, 11, 0.1);
    const usermm_refstring::RefString string = usermm_refstring::take(z, refs);
    volatile std::uint64_t sink = 0;
    const std::uint64_t t0 = now_ns();
    for (std::size_t k = 0; k < string.pages.size(); ++k) {
        auto* w = reinterpret_cast<volatile std::uint64_t*>(p + std::size_t(string.pages[k]) * kPage);
        if (string.writes[k])
            w[1] = w[1] + 1;
        else
            sink = sink + w[0];
    }
    const double s = double(now_ns() - t0) / 1e9;
    arena.unmap(p, pages * kPage);
    return s;
}

void zipf(const std::vector<usermm_test::ServerProcess>& pool, std::size_t limit, std::size_t refs) {
    usermm::MemcachedStore far(usermm_test::addresses(pool));
    const std::string dir = std::getenv("USERMM_BENCH_DIR") ? std::getenv("USERMM_BENCH_DIR") : "/var/tmp";
    const std::string path = fmt::format("{}/usermm-bench-far-{}", dir, getpid());
    double m = 0, l = 0, none = 0;
    {
        usermm::SwapFile local(path, 4 * limit * kPage * 2);
        none = zipf_run(nullptr, limit, refs);
        m = zipf_run(&far, limit, refs);
        l = zipf_run(&local, limit, refs);
    }
    std::printf("c. Zipf 0.99, 10%% writes, %zu references over %zu pages (4x the limit of %zu)\n", refs, 4 * limit,
                limit);
    std::printf("   memcached pool (3)    %8.3f s    %.2fx the local SwapFile\n", m, m / l);
    std::printf("   local SwapFile        %8.3f s\n", l);
    std::printf("   no limit              %8.3f s\n", none);
}

// d: the tier's ratio and ns per page (write + read) against lz4 on the same pages.
void compressed(const char* name, const std::vector<char>& heap, usermm::Codec codec) {
    const std::size_t pages = heap.size() / kPage;
    const std::string path = fmt::format("/var/tmp/usermm-bench-far-tier-{}", getpid());
    usermm::SwapFile backing(path, 64 << 20);
    usermm::CompressedOptions o;
    o.budget = heap.size() * 2;
    o.codec = codec;
    usermm::CompressedStore tier(backing, o);
    std::vector<std::uint64_t> slots(pages);
    if (tier.allocate(slots) != pages) die("tier allocate failed");
    void* mem = std::aligned_alloc(kPage, heap.size());
    char* in = static_cast<char*>(mem);
    std::memcpy(in, heap.data(), heap.size());
    std::vector<usermm::PageIo> io(pages);
    for (std::size_t i = 0; i < pages; ++i) io[i] = {slots[i], in + i * kPage, 0};
    std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < pages; i += kCluster) tier.write({io.data() + i, std::min(kCluster, pages - i)});
    const double w = double(now_ns() - t0) / double(pages);
    const usermm::CompressedStats s = tier.stats();
    std::memset(in, 0, heap.size());
    t0 = now_ns();
    for (std::size_t i = 0; i < pages; i += kCluster) tier.read({io.data() + i, std::min(kCluster, pages - i)});
    const double r = double(now_ns() - t0) / double(pages);
    if (std::memcmp(in, heap.data(), heap.size()) != 0) die("the tier gave back other bytes");
    tier.release(slots);
    // lz4 alone on the same pages.
    std::vector<char> out(std::size_t(LZ4_compressBound(int(kPage))) * pages), back(kPage);
    std::vector<int> sizes(pages);
    std::size_t total = 0;
    t0 = now_ns();
    for (std::size_t i = 0; i < pages; ++i) {
        sizes[i] = LZ4_compress_default(heap.data() + i * kPage, out.data() + i * std::size_t(LZ4_compressBound(int(kPage))),
                                        int(kPage), LZ4_compressBound(int(kPage)));
        total += std::size_t(sizes[i]);
    }
    const double lw = double(now_ns() - t0) / double(pages);
    t0 = now_ns();
    for (std::size_t i = 0; i < pages; ++i)
        LZ4_decompress_safe(out.data() + i * std::size_t(LZ4_compressBound(int(kPage))), back.data(), sizes[i], int(kPage));
    const double lr = double(now_ns() - t0) / double(pages);
    std::printf("   %-4s %-4s tier: ratio %5.2f, write %6.0f ns, read %6.0f ns per page (%llu tags, %llu rejected); "
                "lz4: ratio %5.2f, %6.0f + %6.0f ns; cost %.2fx lz4's\n",
                name, codec == usermm::Codec::Lz4 ? "lz4" : "zstd", s.ratio(), w, r, static_cast<unsigned long long>(s.same_filled),
                static_cast<unsigned long long>(s.rejected), double(heap.size()) / double(total), lw, lr,
                (w + r) / (lw + lr));
    std::free(mem);
}

void compressed_tier(std::size_t pages) {
    std::printf("d. compressed tier on %zu pages, store level, against lz4 alone on the same pages\n", pages);
    std::vector<char> ints(pages * kPage);
    std::mt19937_64 rng(5);
    // A heap of 32-bit integers: ascending keys with small random steps, as a sorted index holds.
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < ints.size() / 4; ++i) {
        v += std::uint32_t(rng() % 16);
        std::memcpy(ints.data() + i * 4, &v, 4);
    }
    compressed("ints", ints, usermm::Codec::Lz4);
    compressed("ints", ints, usermm::Codec::Zstd);
    // Text: words drawn from a small vocabulary with Zipf-like weights.
    static const char* words[] = {"the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with",
                                  "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which",
                                  "but", "have", "an", "had", "they", "page", "memory", "fault", "kernel", "store"};
    std::vector<char> text;
    text.reserve(pages * kPage);
    while (text.size() < pages * kPage) {
        const std::size_t k = std::size_t(rng() % 35) * std::size_t(rng() % 35) / 35;
        for (const char* c = words[k]; *c && text.size() < pages * kPage; ++c) text.push_back(*c);
        if (text.size() < pages * kPage) text.push_back(rng() % 12 == 0 ? '\n' : ' ');
    }
    compressed("text", text, usermm::Codec::Lz4);
    compressed("text", text, usermm::Codec::Zstd);
}

}  // namespace

int main(int argc, char** argv) {
    if (!usermm_test::g_have_memcached) die("memcached is not installed (/usr/bin/memcached)");
    const std::size_t limit = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2048;
    // Part a times rounds of 100 touches of each kind: 200 at least.
    const std::size_t touches = std::max<std::size_t>(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 2000, 200);
    const std::size_t refs = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 200000;
    if (limit < 2 * kCluster) die("the limit must be two clusters (64 pages) or more");
    std::vector<usermm_test::ServerProcess> pool;
    for (int i = 0; i < 3; ++i) pool.push_back(usermm_test::start_memcached(1024));
    warm_free_memory(limit * kPage * 16);
    swap_in_latency(pool, limit, touches);
    eviction_throughput(pool, limit);
    zipf(pool, limit, refs);
    compressed_tier(std::min<std::size_t>(4096, 4 * limit));
    return 0;
}
