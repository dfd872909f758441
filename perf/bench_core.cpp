// The core benchmark: first-touch cost of demand-zero memory against the kernel and against the
// cheapest possible SIGSEGV handler, and find_vma's cost with few and many VMAs.
// USERMM_BENCH_CORE_PAGES (pages per first-touch pass, default 32768), USERMM_BENCH_CORE_VMAS (VMAs
// of the large tree, default 100,000) and USERMM_BENCH_ROUNDS (default 9) set the sizes;
// USERMM_BENCH_CORE_PAGES=256 USERMM_BENCH_CORE_VMAS=1000 USERMM_BENCH_ROUNDS=1 is a smoke run.
//
// Every variant runs once per round, interleaved with the others, and the median of the rounds is
// reported, so that the noise of a shared VM hits all of them alike; the figures that matter are
// the ratios.
#include <signal.h>
#include <sys/mman.h>
#include <time.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

#include "find_vma.hpp"

using usermm::Prot;

using usermm_bench::env_or;
using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

// The sizes of the run, set by main.
std::size_t g_pages = 32768;  // per first-touch pass: 128 MiB with 4 KiB pages
std::size_t g_many = 100000;
std::size_t g_rounds = 9;

// Touches one byte of each page in order; returns ns per page.
double touch(char* p, std::size_t pages, bool write) {
    const std::uint64_t t0 = now_ns();
    if (write) {
        for (std::size_t i = 0; i < pages; ++i) *reinterpret_cast<volatile char*>(p + i * kPage) = 1;
    } else {
        for (std::size_t i = 0; i < pages; ++i) (void)*reinterpret_cast<volatile char*>(p + i * kPage);
    }
    return double(now_ns() - t0) / double(pages);
}

// (a) The kernel's own demand paging.
double kernel_anonymous(bool write) {
    void* p =
        mmap(nullptr, g_pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    const double ns = touch(static_cast<char*>(p), g_pages, write);
    munmap(p, g_pages * kPage);
    return ns;
}

// (b) The floor for any SIGSEGV-based runtime: a handler that does nothing but mprotect the page.
void floor_handler(int, siginfo_t* si, void*) {
    const auto page = reinterpret_cast<std::uintptr_t>(si->si_addr) & ~std::uintptr_t(kPage - 1);
    mprotect(reinterpret_cast<void*>(page), kPage, PROT_READ | PROT_WRITE);
}

double minimal_handler(bool write) {
    struct sigaction sa {}, saved {};
    sa.sa_sigaction = floor_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &saved);
    void* p = mmap(nullptr, g_pages * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    const double ns = touch(static_cast<char*>(p), g_pages, write);
    munmap(p, g_pages * kPage);
    sigaction(SIGSEGV, &saved, nullptr);
    return ns;
}

// (c), (d) usermm.
double usermm_touch(usermm::Arena& arena, std::size_t fault_around, bool write) {
    void* p = arena.map(g_pages * kPage, Prot::ReadWrite, {.fault_around_pages = fault_around});
    const double ns = touch(static_cast<char*>(p), g_pages, write);
    arena.unmap(p, g_pages * kPage);
    return ns;
}

struct Row {
    std::string name;
    std::function<double()> run;
    std::vector<double> samples;
};

std::vector<double> run_interleaved(std::vector<Row>& rows) {
    for (std::size_t r = 0; r < g_rounds; ++r)
        for (auto& row : rows) row.samples.push_back(row.run());
    std::vector<double> out;
    for (auto& row : rows) out.push_back(median(row.samples));
    return out;
}

const char* verdict(double ratio, double target) { return ratio <= target ? "met" : "MISSED"; }

void first_touch(usermm::Arena& arena, bool write) {
    std::vector<Row> rows = {
        {"(a) kernel anonymous memory", [=] { return kernel_anonymous(write); }, {}},
        {"(b) SIGSEGV + mprotect floor", [=] { return minimal_handler(write); }, {}},
        {"(c) usermm, fault-around off", [&arena, write] { return usermm_touch(arena, 1, write); }, {}},
        {"(d) usermm, fault-around 16", [&arena, write] { return usermm_touch(arena, 16, write); }, {}},
    };
    const auto m = run_interleaved(rows);
    fmt::print("\nfirst touch, sequential {} of {} pages           ns/page\n", write ? "writes" : "reads", g_pages);
    for (std::size_t i = 0; i < rows.size(); ++i) fmt::print("  {:<40} {:>8.0f}\n", rows[i].name, m[i]);
    fmt::print("  (c)/(b) = {:.2f}   target <= 1.15   {}\n", m[2] / m[1], verdict(m[2] / m[1], 1.15));
    fmt::print("  (d)/(a) = {:.2f}   target <= 1.50   {}\n", m[3] / m[0], verdict(m[3] / m[0], 1.5));
}

// An arena holding `count` one-page VMAs, each followed by a one-page hole so that none merge.
struct ManyVmas {
    usermm::Arena arena;
    std::vector<char*> starts;
    explicit ManyVmas(std::size_t count, std::size_t pages_each)
        : arena((count * (pages_each + 1) + 1) * kPage) {
        char* base = static_cast<char*>(arena.base());
        for (std::size_t i = 0; i < count; ++i) {
            char* at = base + i * (pages_each + 1) * kPage;
            starts.push_back(static_cast<char*>(
                arena.map(pages_each * kPage, Prot::ReadWrite, {.address = at, .fault_around_pages = 1})));
        }
    }
};

// ns per find_vma over `addrs`, as the fault path does it: under the arena's read lock.
double lookups(ManyVmas& m, const std::vector<std::uintptr_t>& addrs) {
    auto& core = usermm::detail::ArenaAccess::core(m.arena);
    std::uintptr_t sum = 0;
    const std::uint64_t t0 = now_ns();
    for (std::uintptr_t a : addrs) {
        core.lock.lock_shared();
        sum += usermm::detail::find_vma(core, a)->start;
        core.lock.unlock_shared();
    }
    const std::uint64_t t = now_ns() - t0;
    if (sum == 0) std::abort();
    return double(t) / double(addrs.size());
}

// The floor of a lookup that returns its VMA: the same loop reading each VMA's start from a
// pointer known already, so that only the VMA node's own cache miss is left. The reads are
// independent, and the processor overlaps the misses of several; `chained` makes each read wait
// for the previous one (its start, a user address, shifted to 0), as a lookup's own read of the
// node waits for the index.
template <bool chained>
double node_reads(ManyVmas& m, const std::vector<std::uintptr_t>& addrs) {
    auto& core = usermm::detail::ArenaAccess::core(m.arena);
    std::vector<const usermm::detail::Vma*> vmas;
    vmas.reserve(addrs.size());
    for (std::uintptr_t a : addrs) vmas.push_back(usermm::detail::find_vma(core, a));
    std::uintptr_t sum = 0, wait = 0;
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < vmas.size(); ++i) {
        core.lock.lock_shared();
        const std::uintptr_t start = vmas[i + wait]->start;
        if constexpr (chained) wait = start >> 62;
        sum += start;
        core.lock.unlock_shared();
    }
    const std::uint64_t t = now_ns() - t0;
    if (sum == 0) std::abort();
    return double(t) / double(vmas.size());
}

void vma_lookup() {
    constexpr std::size_t kFew = 10, kLookups = 1 << 20;
    const std::size_t faults = std::min<std::size_t>(10000, g_many / 10);
    ManyVmas few(kFew, 1), many(g_many, 1);
    std::mt19937_64 rng(1);
    auto random_addrs = [&](const ManyVmas& vmas) {
        std::vector<std::uintptr_t> v(kLookups);
        for (auto& a : v) a = reinterpret_cast<std::uintptr_t>(vmas.starts[rng() % vmas.starts.size()]) + 100;
        return v;
    };
    // Each lookup in the VMA after the previous one's, as a scan through memory faults.
    auto ordered_addrs = [&](const ManyVmas& vmas) {
        std::vector<std::uintptr_t> v(kLookups);
        for (std::size_t i = 0; i < kLookups; ++i)
            v[i] = reinterpret_cast<std::uintptr_t>(vmas.starts[i % vmas.starts.size()]) + 100;
        return v;
    };
    const auto few_random = random_addrs(few), many_random = random_addrs(many);
    const auto few_ordered = ordered_addrs(few), many_ordered = ordered_addrs(many);
    std::vector<Row> rows = {
        {"10 VMAs, random", [&] { return lookups(few, few_random); }, {}},
        {fmt::format("{} VMAs, random", g_many), [&] { return lookups(many, many_random); }, {}},
        {"10 VMAs, in address order", [&] { return lookups(few, few_ordered); }, {}},
        {fmt::format("{} VMAs, in address order", g_many), [&] { return lookups(many, many_ordered); }, {}},
        {fmt::format("{} VMAs, random, VMA node only", g_many),
         [&] { return node_reads<false>(many, many_random); }, {}},
        {"  the same, one miss at a time", [&] { return node_reads<true>(many, many_random); }, {}},
    };
    const auto m = run_interleaved(rows);
    fmt::print("\nfind_vma (under the read lock, last-hit cache included)   ns/lookup\n");
    for (std::size_t i = 0; i < rows.size(); ++i) fmt::print("  {:<40} {:>8.1f}\n", rows[i].name, m[i]);
    fmt::print("  random:   {} / 10 = {:.2f}   target <= 2.00   {}\n", g_many, m[1] / m[0], verdict(m[1] / m[0], 2.0));
    fmt::print("  in order: {} / 10 = {:.2f}   target <= 1.50   {}\n", g_many, m[3] / m[2], verdict(m[3] / m[2], 1.5));
    fmt::print("  random, the VMA node's read alone (the floor): {} / 10 = {:.2f}, one miss at a time {:.2f}\n",
               g_many, m[4] / m[0], m[5] / m[0]);

    // The same lookup inside whole faults: first writes to the same 10,000 random pages in both
    // arenas, every other page of the same span: 10 big VMAs, or 100,000 one-page VMAs with a hole
    // after each (a tenth of them written). The kernel then does the same work in both (each
    // written page a kernel mapping of its own between PROT_NONE ones, the same page tables), and
    // the difference is usermm's: the lookup, and the VMA's own counters.
    auto fault_pass = [&](std::size_t count) {
        const std::size_t span_pages = 2 * g_many;
        ManyVmas vmas(count, span_pages / count - 1);
        char* base = vmas.starts[0];
        std::vector<char*> targets;
        for (std::size_t i = 0; i < faults; ++i) targets.push_back(base + 2 * ((i * 7919) % g_many) * kPage);
        std::shuffle(targets.begin(), targets.end(), rng);
        const std::uint64_t t0 = now_ns();
        for (char* t : targets) *reinterpret_cast<volatile char*>(t) = 1;
        return double(now_ns() - t0) / double(faults);
    };
    std::vector<Row> fault_rows = {
        {fmt::format("10 VMAs, {} random first writes", faults), [&] { return fault_pass(kFew); }, {}},
        {fmt::format("{} VMAs, {} random first writes", g_many, faults), [&] { return fault_pass(g_many); }, {}},
    };
    const auto f = run_interleaved(fault_rows);
    fmt::print("\nwhole fault, random pages (fault-around off)               ns/fault\n");
    for (std::size_t i = 0; i < fault_rows.size(); ++i) fmt::print("  {:<40} {:>8.0f}\n", fault_rows[i].name, f[i]);
    fmt::print("  {} / 10 = {:.2f}\n", g_many, f[1] / f[0]);
}

}  // namespace

int main() {
    g_pages = std::max<std::size_t>(1, env_or("USERMM_BENCH_CORE_PAGES", g_pages));
    g_many = std::max<std::size_t>(10, env_or("USERMM_BENCH_CORE_VMAS", g_many)) / 10 * 10;  // the whole-fault rows split its span in ten
    g_rounds = std::max<std::size_t>(1, env_or("USERMM_BENCH_ROUNDS", g_rounds));
    usermm::Arena arena(64ull << 30);
    warm_free_memory(8 * g_pages * kPage);  // the VM backs guest memory lazily
    fmt::print("usermm core benchmark: {} KiB pages, median of {} interleaved rounds\n", kPage >> 10, g_rounds);
    first_touch(arena, true);
    first_touch(arena, false);
    vma_lookup();
    return 0;
}
