// Costs that must follow what is touched, not what is reserved: verify() and unmap of arenas from
// 1 GiB to 64 TiB, each with one page written. The floor is the same call on the 1 GiB arena,
// measured in the same run; the ratios should stay near 1 (the PTE table of 64 TiB is 32 GiB, of
// which one page was ever touched).
#include <fmt/format.h>

#include <cstddef>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr int kRounds = 5;

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
    *reinterpret_cast<volatile char*>(p + (size / 3 & ~std::size_t(0xfff))) = 1;
    const std::uint64_t t0 = now_ns();
    arena.verify();
    const std::uint64_t t1 = now_ns();
    arena.unmap(p, size);
    const std::uint64_t t2 = now_ns();
    return {double(t1 - t0) / 1e6, double(t2 - t1) / 1e6};
}

}  // namespace

int main() {
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
}
