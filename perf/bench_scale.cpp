// Costs that must follow what is touched, not what is reserved: verify() and unmap of arenas from
// 1 GiB to 64 TiB, and the snapshot calls (snapshot, its release, restore, collect_dirty, write_to,
// fork, the arena's destruction with a snapshot alive) on arenas from 1 GiB to 8 TiB (a snapshot
// covers at most 2^32 pages), each with one page written. The floor is the same call on the 1 GiB
// arena, measured in the same run; the ratios should stay near 1 (the PTE table of 64 TiB is
// 32 GiB, of which one page was ever touched).
// Usage: usermm-bench-scale [rounds [largest snapshot arena in TiB]] (defaults 5 and 8); `1 1` is a
// smoke run.
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

struct Row {
    std::size_t size;
    const char* name;
};

struct Costs {
    double verify_ms;
    double unmap_ms;
};

Costs measure(std::size_t size) {
    usermm::Arena arena(size);
    char* p = static_cast<char*>(arena.map(size, usermm::Prot::ReadWrite, {.name = "scale"}));
    *reinterpret_cast<volatile char*>(p + (size / 3 & ~(kPage - 1))) = 1;
    const std::uint64_t t0 = now_ns();
    arena.verify();
    const std::uint64_t t1 = now_ns();
    arena.unmap(p, size);
    const std::uint64_t t2 = now_ns();
    return {double(t1 - t0) / 1e6, double(t2 - t1) / 1e6};
}

constexpr std::array<const char*, 7> kSnapshotOps = {"snapshot",     "release", "restore", "collect_dirty",
                                                     "write_to",     "fork",    "~Arena"};
using SnapshotCosts = std::array<double, kSnapshotOps.size()>;

double ms_since(std::uint64_t t0) { return double(now_ns() - t0) / 1e6; }

SnapshotCosts measure_snapshots(std::size_t size) {
    SnapshotCosts c{};
    std::optional<usermm::Arena> arena(std::in_place, size);
    char* p = static_cast<char*>(arena->map(size, usermm::Prot::ReadWrite, {.name = "scale"}));
    auto* page = reinterpret_cast<volatile char*>(p + (size / 3 & ~(kPage - 1)));
    *page = 1;
    std::uint64_t t = now_ns();
    std::optional<usermm::Snapshot> snap(arena->snapshot());
    c[0] = ms_since(t);
    *page = 2;
    t = now_ns();
    snap.reset();
    c[1] = ms_since(t);
    snap.emplace(arena->snapshot());
    *page = 3;
    t = now_ns();
    arena->restore(*snap);
    c[2] = ms_since(t);
    *page = 4;
    t = now_ns();
    (void)arena->collect_dirty(p, size);
    c[3] = ms_since(t);
    FILE* image = std::tmpfile();
    if (!image) std::abort();
    t = now_ns();
    snap->write_to(fileno(image));
    c[4] = ms_since(t);
    std::fclose(image);
    t = now_ns();
    const pid_t pid = fork();
    if (pid == 0) _exit(0);
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) std::abort();
    c[5] = ms_since(t);
    t = now_ns();
    arena.reset();
    c[6] = ms_since(t);
    return c;
}

}  // namespace

int main(int argc, char** argv) {
    const int kRounds = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
    const std::size_t largest_tib = argc > 2 ? std::size_t(std::max(1, std::atoi(argv[2]))) : 8;
    const std::vector<Row> rows = {{1ull << 30, "1 GiB"}, {1ull << 40, "1 TiB"}, {64ull << 40, "64 TiB"}};
    std::vector<std::vector<double>> verify(rows.size()), unmap(rows.size());
    for (int round = 0; round < kRounds; ++round)  // interleaved, so that drift hits all sizes alike
        for (std::size_t i = 0; i < rows.size(); ++i) {
            const Costs c = measure(rows[i].size);
            verify[i].push_back(c.verify_ms);
            unmap[i].push_back(c.unmap_ms);
        }
    fmt::print("usermm scale benchmark: one page written, median of {} interleaved rounds\n", kRounds);
    fmt::print("  {:<8} {:>12} {:>8} {:>12} {:>8}\n", "reserved", "verify ms", "/1 GiB", "unmap ms", "/1 GiB");
    const double v0 = median(verify[0]), u0 = median(unmap[0]);
    for (std::size_t i = 0; i < rows.size(); ++i) {
        const double v = median(verify[i]), u = median(unmap[i]);
        fmt::print("  {:<8} {:>12.3f} {:>8.1f} {:>12.3f} {:>8.1f}\n", rows[i].name, v, v / v0, u, u / u0);
    }

    const std::string largest = fmt::format("{} TiB", largest_tib);
    std::vector<Row> snap_rows = {{1ull << 30, "1 GiB"}, {1ull << 40, "1 TiB"}};
    if (largest_tib > 1) snap_rows.push_back({largest_tib << 40, largest.c_str()});
    std::vector<std::array<std::vector<double>, kSnapshotOps.size()>> costs(snap_rows.size());
    for (int round = 0; round < kRounds; ++round)
        for (std::size_t i = 0; i < snap_rows.size(); ++i) {
            const SnapshotCosts c = measure_snapshots(snap_rows[i].size);
            for (std::size_t op = 0; op < c.size(); ++op) costs[i][op].push_back(c[op]);
        }
    fmt::print("\n  {:<14}", "ms, reserved:");
    for (const Row& r : snap_rows) fmt::print(" {:>10}", r.name);
    fmt::print(" {:>12}\n", fmt::format("{}/1 GiB", snap_rows.back().name));
    for (std::size_t op = 0; op < kSnapshotOps.size(); ++op) {
        fmt::print("  {:<14}", kSnapshotOps[op]);
        for (std::size_t i = 0; i < snap_rows.size(); ++i) fmt::print(" {:>10.3f}", median(costs[i][op]));
        fmt::print(" {:>12.1f}\n", median(costs.back()[op]) / median(costs[0][op]));
    }
}
