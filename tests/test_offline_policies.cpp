// The offline half of issue 11's replacement benchmark (perf/refstring.hpp, perf/offline_policies.hpp):
// the simulators against the textbook's answers, against each other where theory orders them, and
// against plain simulations written with standard containers straight from the policies'
// descriptions; the generators against the distributions they claim.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <list>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "../perf/offline_policies.hpp"
#include "../perf/refstring.hpp"

using namespace usermm_offline;
using namespace usermm_refstring;

namespace {

using Refs = std::vector<std::uint32_t>;

Refs random_refs(std::uint64_t seed, std::uint32_t pages, std::size_t n) {
    Uniform g(pages, seed);
    return take(g, n).pages;
}

std::size_t distinct(const Refs& refs) { return std::set<std::uint32_t>(refs.begin(), refs.end()).size(); }

// The optimum by exhaustive search over every choice of victim: what OPT must equal.
std::uint64_t exhaustive_min(const Refs& refs, std::size_t at, std::vector<std::uint32_t>& frames,
                             std::size_t capacity) {
    if (at == refs.size()) return 0;
    const std::uint32_t p = refs[at];
    if (std::find(frames.begin(), frames.end(), p) != frames.end()) return exhaustive_min(refs, at + 1, frames, capacity);
    if (frames.size() < capacity) {
        frames.push_back(p);
        const std::uint64_t rest = exhaustive_min(refs, at + 1, frames, capacity);
        frames.pop_back();
        return 1 + rest;
    }
    std::uint64_t best = UINT64_MAX;
    for (std::uint32_t& f : frames) {
        const std::uint32_t victim = f;
        f = p;
        best = std::min(best, exhaustive_min(refs, at + 1, frames, capacity));
        f = victim;
    }
    return 1 + best;
}

// Plain simulations, O(frames) per reference, each from its policy's description.
std::uint64_t plain_lru(const Refs& refs, std::size_t k) {
    std::list<std::uint32_t> recency;  // most recent first
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        const auto it = std::find(recency.begin(), recency.end(), p);
        if (it != recency.end()) {
            recency.erase(it);
        } else {
            ++faults;
            if (recency.size() == k) recency.pop_back();
        }
        recency.push_front(p);
    }
    return faults;
}

std::uint64_t plain_fifo(const Refs& refs, std::size_t k) {
    std::deque<std::uint32_t> q;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (std::find(q.begin(), q.end(), p) != q.end()) continue;
        ++faults;
        if (q.size() == k) q.pop_front();
        q.push_back(p);
    }
    return faults;
}

// Second chance as a queue: the oldest page, if referenced, goes to the back with its bit cleared.
std::uint64_t plain_clock(const Refs& refs, std::size_t k) {
    struct Entry {
        std::uint32_t page;
        bool referenced;
    };
    std::deque<Entry> q;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        const auto it = std::find_if(q.begin(), q.end(), [&](const Entry& e) { return e.page == p; });
        if (it != q.end()) {
            it->referenced = true;
            continue;
        }
        ++faults;
        if (q.size() == k) {
            while (q.front().referenced) {
                q.push_back({q.front().page, false});
                q.pop_front();
            }
            q.pop_front();
        }
        q.push_back({p, false});
    }
    return faults;
}

std::uint64_t plain_sieve(const Refs& refs, std::size_t k) {
    struct Entry {
        std::uint32_t page;
        bool visited;
    };
    std::list<Entry> q;  // head (newest) at the front
    auto hand = q.end();   // end(): start from the tail
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        const auto it = std::find_if(q.begin(), q.end(), [&](const Entry& e) { return e.page == p; });
        if (it != q.end()) {
            it->visited = true;
            continue;
        }
        ++faults;
        if (q.size() == k) {
            auto victim = hand == q.end() ? std::prev(q.end()) : hand;
            while (victim->visited) {
                victim->visited = false;
                victim = victim == q.begin() ? std::prev(q.end()) : std::prev(victim);
            }
            hand = victim == q.begin() ? q.end() : std::prev(victim);
            q.erase(victim);
        }
        q.push_front({p, false});
    }
    return faults;
}

std::uint64_t plain_s3fifo(const Refs& refs, std::size_t k) {
    struct Entry {
        std::uint32_t page;
        int hits;
    };
    const std::size_t small_target = std::max<std::size_t>(1, k / 10), main_target = k - small_target;
    std::deque<Entry> small, main;  // oldest at the front
    // G holds the last main_target pages evicted from S; one that comes back leaves it, its place
    // (kGone) aging with the others.
    constexpr std::uint32_t kGone = UINT32_MAX;
    std::deque<std::uint32_t> ghost;
    const auto find = [](std::deque<Entry>& q, std::uint32_t p) {
        return std::find_if(q.begin(), q.end(), [&](const Entry& e) { return e.page == p; });
    };
    const auto evict_main = [&] {
        for (;;) {
            Entry t = main.front();
            main.pop_front();
            if (t.hits == 0) return;
            --t.hits;
            main.push_back(t);
        }
    };
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        auto it = find(small, p);
        if (it == small.end()) it = find(main, p);
        if (it != small.end() && it != main.end()) {
            it->hits = std::min(it->hits + 1, 3);
            continue;
        }
        ++faults;
        if (small.size() + main.size() == k) {
            bool done = false;
            if (small.size() >= small_target) {
                while (!small.empty()) {
                    const Entry t = small.front();
                    small.pop_front();
                    if (t.hits == 0) {
                        ghost.push_back(t.page);
                        if (ghost.size() > main_target) ghost.pop_front();
                        done = true;
                        break;
                    }
                    main.push_back({t.page, 0});
                    if (main.size() > main_target) break;
                }
            }
            if (!done) evict_main();
        }
        if (std::find(ghost.begin(), ghost.end(), p) != ghost.end()) {
            std::replace(ghost.begin(), ghost.end(), p, kGone);
            main.push_back({p, 0});
        } else {
            small.push_back({p, 0});
        }
    }
    return faults;
}

const Refs kTextbook = {7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1};

}  // namespace

TEST_CASE("the textbook string with 3 frames: FIFO 15 faults, LRU 12, OPT 9") {
    CHECK(fifo_faults(kTextbook, 3) == 15);
    CHECK(lru_faults(kTextbook, 3) == 12);
    CHECK(opt_faults(kTextbook, 3) == 9);
    std::vector<std::uint32_t> frames;
    CHECK(exhaustive_min(kTextbook, 0, frames, 3) == 9);
}

TEST_CASE("Belady's anomaly: FIFO takes 9 faults with 3 frames and 10 with 4; LRU and OPT do not grow") {
    const Refs refs = {1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5};
    CHECK(fifo_faults(refs, 3) == 9);
    CHECK(fifo_faults(refs, 4) == 10);
    CHECK(lru_faults(refs, 4) <= lru_faults(refs, 3));
    CHECK(opt_faults(refs, 4) <= opt_faults(refs, 3));
}

TEST_CASE("OPT equals an exhaustive search over every victim on small random strings") {
    for (std::uint64_t seed = 1; seed <= 100; ++seed) {
        const Refs refs = random_refs(seed, 6, 12);
        for (std::size_t k = 1; k <= 3; ++k) {
            std::vector<std::uint32_t> frames;
            CHECK(opt_faults(refs, k) == exhaustive_min(refs, 0, frames, k));
        }
    }
}

TEST_CASE("the array simulators equal plain simulations with standard containers") {
    for (std::uint64_t seed = 1; seed <= 30; ++seed) {
        // Zipf strings as well as uniform ones, so that pages are hit often enough to be kept.
        Zipf zipf(64, 0.99, seed);
        for (const Refs& refs : {random_refs(seed, 40, 3000), take(zipf, 3000).pages}) {
            for (const std::size_t k : {1, 2, 3, 7, 10, 20, 39}) {
                CAPTURE(seed);
                CAPTURE(k);
                CHECK(lru_faults(refs, k) == plain_lru(refs, k));
                CHECK(fifo_faults(refs, k) == plain_fifo(refs, k));
                CHECK(clock_faults(refs, k) == plain_clock(refs, k));
                CHECK(sieve_faults(refs, k) == plain_sieve(refs, k));
                CHECK(s3fifo_faults(refs, k) == plain_s3fifo(refs, k));
            }
        }
    }
}

TEST_CASE("OPT takes no more faults than any policy, and LRU's and OPT's faults never grow with frames") {
    for (std::uint64_t seed = 1; seed <= 40; ++seed) {
        Zipf zipf(200, 0.8, seed);
        for (const Refs& refs : {random_refs(seed, 50, 2000), take(zipf, 3000).pages}) {
            std::uint64_t lru_before = UINT64_MAX, opt_before = UINT64_MAX;
            for (std::size_t k = 1; k <= 60; k += 4) {
                CAPTURE(seed);
                CAPTURE(k);
                const std::uint64_t opt = opt_faults(refs, k), lru = lru_faults(refs, k);
                for (const Policy p : kPolicies) CHECK(opt <= faults(p, refs, k));
                CHECK(lru <= lru_before);
                CHECK(opt <= opt_before);
                lru_before = lru;
                opt_before = opt;
            }
        }
    }
}

TEST_CASE("with as many frames as distinct pages, every policy takes only the cold misses") {
    for (std::uint64_t seed = 1; seed <= 20; ++seed) {
        const Refs refs = random_refs(seed, 300, 20000);
        const std::size_t d = distinct(refs);
        for (const std::size_t k : {d, d + 1, 2 * d})
            for (const Policy p : kPolicies) CHECK(faults(p, refs, k) == d);
        CHECK(lru_faults(refs, d - 1) > d);
        CHECK(opt_faults(refs, d - 1) > d);
    }
}

TEST_CASE("a loop longer than memory: LRU, FIFO, CLOCK and SIEVE fault on every reference, OPT on few") {
    constexpr std::uint32_t kFrames = 100;
    for (const std::uint32_t length : {kFrames + 1, kFrames * 11 / 10, 2 * kFrames}) {
        Loop loop(length, 1);
        const Refs refs = take(loop, 50 * length).pages;
        CHECK(lru_faults(refs, kFrames) == refs.size());
        CHECK(fifo_faults(refs, kFrames) == refs.size());
        CHECK(clock_faults(refs, kFrames) == refs.size());
        CHECK(sieve_faults(refs, kFrames) == refs.size());
        // OPT evicts the page used just before the faulting one, needed again the farthest ahead, and
        // so after the first pass faults on about L - k of every L - 1 references.
        const double expected = double(length) + double(refs.size() - length) * double(length - kFrames) /
                                                     double(length - 1);
        CHECK(double(opt_faults(refs, kFrames)) == doctest::Approx(expected).epsilon(0.02));
    }
}

TEST_CASE("a scan mixed into a Zipf working set: SIEVE and S3-FIFO fault less than LRU") {
    constexpr std::uint32_t kFrames = 2000;
    // The working set fits; scans of a cold region twice the memory, a quarter of all references,
    // push it out of LRU.
    ScanMix mix(kFrames, 0.99, 2 * kFrames, 0.25, kFrames / 4, 7);
    const Refs refs = take(mix, 2'000'000).pages;
    const std::uint64_t lru = lru_faults(refs, kFrames);
    CHECK(sieve_faults(refs, kFrames) < lru);
    CHECK(s3fifo_faults(refs, kFrames) < lru);
    CHECK(opt_faults(refs, kFrames) < sieve_faults(refs, kFrames));
}

TEST_CASE("Zipf ranks follow P(k) = k^-s / H(n, s): chi-square over the top ranks") {
    constexpr std::size_t kSamples = 2'000'000, kBins = 100;
    for (const double s : {0.5, 0.99, 1.0, 1.5}) {
        for (const std::uint32_t n : {1000u, 1u << 20}) {
            CAPTURE(s);
            CAPTURE(n);
            ZipfRanks ranks(n, s);
            std::mt19937_64 rng(42);
            std::vector<std::size_t> count(kBins + 1);  // the last bin: every rank past kBins
            std::uint32_t lowest = n, highest = 1;
            for (std::size_t i = 0; i < kSamples; ++i) {
                const std::uint32_t k = ranks(rng);
                lowest = std::min(lowest, k);
                highest = std::max(highest, k);
                ++count[std::clamp<std::size_t>(k, 1, kBins + 1) - 1];
            }
            REQUIRE(lowest >= 1);
            REQUIRE(highest <= n);
            double norm = 0;
            for (std::uint32_t k = n; k >= 1; --k) norm += std::pow(double(k), -s);
            double chi2 = 0, top = 0;
            for (std::size_t b = 0; b <= kBins; ++b) {
                const double p = b < kBins ? std::pow(double(b + 1), -s) / norm : 1 - top;
                if (b < kBins) top += p;
                const double expected = p * double(kSamples);
                chi2 += (double(count[b]) - expected) * (double(count[b]) - expected) / expected;
                // The hottest ranks, one by one: within 4 standard deviations of their expected count.
                if (b < 5) CHECK(std::abs(double(count[b]) - expected) < 4 * std::sqrt(expected * (1 - p)));
            }
            // 100 degrees of freedom: P(chi2 > 149.4) = 0.001.
            CHECK(chi2 < 149.4);
        }
    }
}

TEST_CASE("the generators are deterministic, and their pages do not depend on the write fraction") {
    Zipf a(5000, 0.99, 3), b(5000, 0.99, 3, 0.3), c(5000, 0.99, 4);
    const RefString ra = take(a, 100000), rb = take(b, 100000), rc = take(c, 100000);
    CHECK(ra.pages == rb.pages);
    CHECK(ra.pages != rc.pages);
    CHECK(std::count(ra.writes.begin(), ra.writes.end(), true) == 0);
    CHECK(double(std::count(rb.writes.begin(), rb.writes.end(), true)) == doctest::Approx(30000).epsilon(0.02));
    Zipf a2(5000, 0.99, 3);
    CHECK(take(a2, 100000).pages == ra.pages);
}

TEST_CASE("Zipf pages are a permutation of the ranks, the hottest scattered; unpermuted rank k is page k - 1") {
    constexpr std::uint32_t kPages = 10000;
    Zipf permuted(kPages, 0.99, 5), plain(kPages, 0.99, 5, 0, false);
    std::vector<std::uint32_t> pages;
    for (std::uint32_t k = 1; k <= kPages; ++k) {
        pages.push_back(permuted.page_of_rank(k));
        CHECK(plain.page_of_rank(k) == k - 1);
    }
    std::vector<std::uint32_t> sorted = pages;
    std::sort(sorted.begin(), sorted.end());
    for (std::uint32_t i = 0; i < kPages; ++i) REQUIRE(sorted[i] == i);
    int adjacent = 0;
    for (std::uint32_t k = 1; k < 64; ++k) adjacent += std::abs(int(pages[k]) - int(pages[k - 1])) == 1;
    CHECK(adjacent < 4);
    // The string follows the ranks through the permutation: the hottest page is rank 1's.
    const RefString r = take(permuted, 200000);
    std::vector<std::size_t> count(kPages);
    for (const std::uint32_t p : r.pages) ++count[p];
    CHECK(std::max_element(count.begin(), count.end()) - count.begin() == permuted.page_of_rank(1));
}

TEST_CASE("the scan mix: the scan fraction of references are sequential runs through the cold region") {
    constexpr std::uint32_t kHot = 1000, kCold = 5000, kScan = 100;
    ScanMix mix(kHot, 0.99, kCold, 0.3, kScan, 9);
    CHECK(mix.page_count() == kHot + kCold);
    const Refs refs = take(mix, 1'000'000).pages;
    std::size_t cold = 0;
    std::uint32_t expect_next = kHot;  // the scans continue one another
    std::size_t run = 0, outside = 0, cut_short = 0, out_of_order = 0;
    for (const std::uint32_t p : refs) {
        outside += p >= kHot + kCold;
        if (p < kHot) {
            // A scan is never cut short by a working-set reference.
            cut_short += run % kScan != 0;
            continue;
        }
        ++cold;
        ++run;
        out_of_order += p != expect_next;
        expect_next = p + 1 == kHot + kCold ? kHot : p + 1;
    }
    CHECK(outside == 0);
    CHECK(cut_short == 0);
    CHECK(out_of_order == 0);
    CHECK(double(cold) / double(refs.size()) == doctest::Approx(0.3).epsilon(0.03));
}

TEST_CASE("bad parameters are refused") {
    CHECK_THROWS_AS(lru_faults(kTextbook, 0), std::invalid_argument);
    CHECK_THROWS_AS(ZipfRanks(0, 1), std::invalid_argument);
    CHECK_THROWS_AS(ZipfRanks(10, 0), std::invalid_argument);
    CHECK_THROWS_AS(Uniform(0, 1), std::invalid_argument);
    CHECK_THROWS_AS(Zipf(10, 1, 1, 1.5), std::invalid_argument);
    CHECK_THROWS_AS(ScanMix(10, 1, 10, 0.99, 1, 1), std::invalid_argument);
}
