// Replacement quality offline (issue 11's benchmark, the half that needs no arena): the faults of
// Belady's OPT, exact LRU, FIFO, CLOCK, SIEVE and S3-FIFO on the same page reference strings, each
// as a ratio to LRU's, the floor being OPT's. The strings (perf/refstring.hpp): a loop 1.1 times the
// frames, then over 2 and 4 times the frames: uniform, Zipf 0.99 (pages permuted), a loop, and a
// scan mix (Zipf 0.99 over half the pages, sequential scans of 1/4 of the frames through the other
// half making up a quarter of the references). The faults include the cold misses.
// Usage: usermm-bench-policies [frames (131072: 512 MiB of 4 KiB pages)] [references (10^7)];
// `256 20000` is a smoke run.
#include <fmt/format.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.hpp"
#include "offline_policies.hpp"
#include "refstring.hpp"

using usermm_bench::now_ns;
using usermm_offline::kPolicies;
using usermm_offline::Policy;

namespace {

constexpr std::size_t kPolicyCount = std::size(kPolicies);

struct Row {
    std::string name;
    std::uint32_t pages;
    std::uint64_t faults[kPolicyCount];
};

std::vector<double> simulate_ms(kPolicyCount);

template <class Generator>
Row run(std::string name, Generator g, std::size_t refs, std::size_t frames) {
    const usermm_refstring::RefString s = usermm_refstring::take(g, refs);
    Row row{std::move(name), s.page_count, {}};
    for (std::size_t i = 0; i < kPolicyCount; ++i) {
        const std::uint64_t t0 = now_ns();
        row.faults[i] = usermm_offline::faults(kPolicies[i], s.pages, frames);
        simulate_ms[i] += double(now_ns() - t0) / 1e6;
    }
    return row;
}

std::size_t arg(int argc, char** argv, int i, std::size_t fallback) {
    return argc > i ? std::size_t(std::strtoull(argv[i], nullptr, 10)) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
    const std::size_t frames = arg(argc, argv, 1, 131072), refs = arg(argc, argv, 2, 10'000'000);
    if (frames < 16 || refs == 0) {
        fmt::print(stderr, "usage: {} [frames >= 16] [references > 0]\n", argv[0]);
        return 2;
    }
    const auto k = std::uint32_t(frames);
    std::vector<Row> rows;
    rows.push_back(run("loop 1.1x", usermm_refstring::Loop(k + k / 10, 1), refs, frames));
    for (const std::uint32_t times : {2u, 4u}) {
        const std::uint32_t pages = times * k;
        const std::string x = fmt::format(" {}x", times);
        rows.push_back(run("uniform" + x, usermm_refstring::Uniform(pages, times), refs, frames));
        rows.push_back(run("zipf 0.99" + x, usermm_refstring::Zipf(pages, 0.99, times), refs, frames));
        rows.push_back(run("loop" + x, usermm_refstring::Loop(pages, times), refs, frames));
        rows.push_back(run("scan mix" + x,
                           usermm_refstring::ScanMix(pages / 2, 0.99, pages / 2, 0.25, k / 4, times), refs,
                           frames));
    }

    fmt::print("page replacement offline: {} frames, {} references per string; faults, and /LRU\n", frames, refs);
    fmt::print("  {:<14} {:>8}", "string", "pages");
    for (const Policy p : kPolicies) fmt::print(" {:>10} {:>5}", usermm_offline::name(p), "/LRU");
    fmt::print("\n");
    for (const Row& r : rows) {
        fmt::print("  {:<14} {:>8}", r.name, r.pages);
        const double lru = double(r.faults[1]);
        for (std::size_t i = 0; i < kPolicyCount; ++i)
            fmt::print(" {:>10} {:>5.3f}", r.faults[i], double(r.faults[i]) / lru);
        fmt::print("\n");
    }
    fmt::print("  {:<23}", "simulation ms/string");
    for (std::size_t i = 0; i < kPolicyCount; ++i) fmt::print(" {:>16.0f}", simulate_ms[i] / double(rows.size()));
    fmt::print("\n");
}
