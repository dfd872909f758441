// usermm-demo far [TABLE_MIB LIMIT_MIB TIER_MIB]: a table larger than its resident limit, its
// evicted pages in a compressed tier in front of a pool of 3 memcached servers started here on
// loopback, each page on two of them. One server is killed halfway: every record still checks.
#include "far_demo.hpp"

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <usermm/far.hpp>
#include <usermm/usermm.hpp>

#include "../tests/far_test_util.hpp"

namespace fardemo {

namespace {

// A record names its key and version; its text is words, as a table of strings holds (the tier
// compresses it); its checksum covers the rest.
struct Record {
    std::uint64_t key;
    std::uint64_t version;
    char text[40];
    std::uint64_t checksum;
};
static_assert(sizeof(Record) == 64);

std::uint64_t checksum_of(const Record& r) {
    std::uint64_t h = 0xcbf29ce484222325ull ^ r.key ^ (r.version << 32);
    for (char c : r.text) h = (h ^ std::uint64_t(std::uint8_t(c))) * 0x100000001b3ull;
    return h;
}

void make(Record& r, std::uint64_t key, std::uint64_t version) {
    static const char* words[] = {"page", "fault", "kernel", "memory", "store", "swap", "cache", "far"};
    r.key = key;
    r.version = version;
    std::size_t at = 0;
    for (std::uint64_t x = key * 0x9e3779b97f4a7c15ull + version; at < sizeof r.text - 1; x = x * 6364136223846793005ull + 1) {
        for (const char* w = words[(x >> 60) & 7]; *w && at < sizeof r.text - 1; ++w) r.text[at++] = *w;
        if (at < sizeof r.text - 1) r.text[at++] = ' ';
    }
    r.text[sizeof r.text - 1] = 0;
    r.checksum = checksum_of(r);
}

bool checks(const Record& r, std::uint64_t key) { return r.key == key && r.checksum == checksum_of(r); }

void where(const char* when, usermm::Arena& arena, const usermm::CompressedStore& tier, const usermm::MemcachedStore& far) {
    const std::size_t page = usermm::page_size();
    const usermm::CompressedStats t = tier.stats();
    fmt::print("{}:\n  resident   {:>8} pages ({} MiB)\n  compressed {:>8} pages in {} MiB (ratio {:.2f}; {} same-filled, {} "
               "rejected, {} written back)\n",
               when, arena.stats().resident_pages, arena.stats().resident_pages * page >> 20, t.stored_pages,
               t.compressed_bytes >> 20, t.ratio(), t.same_filled, t.rejected, t.written_back);
    for (const usermm::FarServer& s : far.servers())
        fmt::print("  {:<21} {:>8} pages{}\n", s.address, s.pages, s.up ? "" : "  (down)");
    const usermm::FarStats f = far.stats();
    fmt::print("  memcached: {} pages sent, {} received, {} round trips, p50 {} us, p99 {} us, {} failovers, {} retries, {} lost\n",
               f.pages_sent, f.pages_received, f.round_trips, f.latency_percentile_us(0.5), f.latency_percentile_us(0.99),
               f.failovers, f.retries, f.lost_pages);
}

}  // namespace

int run(std::size_t table_mib, std::size_t limit_mib, std::size_t tier_mib) {
    if (!usermm_test::g_have_memcached) {
        std::fprintf(stderr, "usermm-demo far: memcached is not installed (apt-get install memcached)\n");
        return 1;
    }
    const std::size_t records = (table_mib << 20) / sizeof(Record);
    // Each server holds two thirds of the table at most (two copies over three servers), plus room.
    const unsigned server_mib = unsigned(table_mib * 2 / 3 + 64);
    std::vector<usermm_test::ServerProcess> pool;
    for (int i = 0; i < 3; ++i) pool.push_back(usermm_test::start_memcached(server_mib));
    usermm::FarOptions fo;
    fo.replicas = 1;
    usermm::MemcachedStore far(usermm_test::addresses(pool), fo);
    usermm::CompressedOptions co;
    co.budget = tier_mib << 20;
    usermm::CompressedStore tier(far, co);
    usermm::ArenaOptions ao;
    ao.resident_limit = limit_mib << 20;
    ao.store = &tier;
    usermm::Arena arena(std::size_t(1) << 40, ao);
    fmt::print("a {} MiB table of {} records, resident limit {} MiB, a {} MiB lz4 tier in front of\n  {}\n", table_mib,
               records, limit_mib, tier_mib, far.describe());
    auto* table = static_cast<Record*>(arena.map(table_mib << 20, usermm::Prot::ReadWrite, {.name = "table"}));

    const auto t0 = std::chrono::steady_clock::now();
    const auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
    for (std::size_t i = 0; i < records; ++i) make(table[i], i, 1);
    fmt::print("filled in {:.1f} s\n", seconds());
    where("after the fill", arena, tier, far);

    // Lookups and updates from 2 threads; halfway, one server is killed.
    std::atomic<std::size_t> wrong{0}, done{0};
    const auto work = [&](unsigned seed, std::size_t n) {
        std::mt19937_64 rng(seed);
        for (std::size_t k = 0; k < n; ++k) {
            const std::size_t i = rng() % records;
            if (k % 5 == 0)
                make(table[i], i, table[i].version + 1);
            else
                wrong += !checks(table[i], i);
        }
        done += n;
    };
    // Random lookups each swap a page in (one round trip): a few tens of thousands show it.
    const std::size_t per_half = 20000;
    for (int half = 0; half < 2; ++half) {
        const double from = seconds();
        std::thread a(work, 2 * half + 1, per_half), b(work, 2 * half + 2, per_half);
        a.join();
        b.join();
        fmt::print("{} lookups and updates from 2 threads in {:.1f} s\n", 2 * per_half, seconds() - from);
        if (half == 0) {
            where(fmt::format("after {} lookups and updates", done.load()).c_str(), arena, tier, far);
            fmt::print("killing memcached at {}\n", pool[1].address());
            pool[1].kill();
        }
    }
    const double scan_from = seconds();
    for (std::size_t i = 0; i < records; ++i) wrong += !checks(table[i], i);
    fmt::print("scanned every record in {:.1f} s\n", seconds() - scan_from);
    where(fmt::format("after {} more and a scan of every record", done.load() / 2).c_str(), arena, tier, far);
    fmt::print("{} records checked, {} wrong, in {:.1f} s\n", records, wrong.load(), seconds());
    arena.unmap(table, table_mib << 20);
    return wrong == 0 ? 0 : 1;
}

}  // namespace fardemo
