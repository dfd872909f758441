// Grow-down stacks (issue 12) against Boost.Context's own stack allocators, side by side in one run:
//   1. create + destroy a stack: usermm's StackPool (acquire and ~Stack; pool.allocator()), and
//      Arena::map_stack without a pool, against protected_fixedsize_stack (mmap + mprotect guard)
//      and fixedsize_stack (malloc, no guard); then the same with a fiber run on each stack, touching
//      a few pages, so that first-touch faults count too;
//   2. stacks alive before failure: protected_fixedsize_stack until its guard or its mmap fails,
//      against usermm stacks in a 1 TiB arena, each variant in a child process of its own;
//   3. resident memory of idle fibers that each touched ~8 KiB, each variant in a child;
//   4. a growth fault against the kernel's own first touch of a stack page, page by page downward.
// Usage: usermm-bench-stacks [ALIVE [FIBERS [GROW_PAGES [OPS [ROUNDS]]]]]
//   ALIVE       stacks to try to keep alive at once (part 2), default 1,000,000
//   FIBERS      idle fibers (part 3), default 100,000
//   GROW_PAGES  pages touched per pass (part 4), default 16,384
//   OPS         create + destroy per sample (part 1), default 20,000
//   ROUNDS      interleaved rounds of parts 1 and 4, their median reported, default 7
// `2000 2000 256 200 1` is the smoke run (perf/CMakeLists.txt).
//
// Timed rows run once per round, interleaved, so that the noise of a shared VM hits all alike; the
// figures that matter are the ratios, each against a floor measured in the same run. The children
// of parts 2 and 3 are this program re-executed (`--child`), so that each starts with a clean
// address space: its RSS is the variant's own, and exhausting vm.max_map_count hurts nothing else.
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/context/fiber.hpp>
#include <boost/context/fixedsize_stack.hpp>
#include <boost/context/protected_fixedsize_stack.hpp>
#include <boost/version.hpp>
#include <fmt/format.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <usermm/boost_context.hpp>
#include <usermm/usermm.hpp>

#include "bench_util.hpp"

namespace ctx = boost::context;

using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kArenaSize = 1ull << 40;
constexpr std::size_t kAliveStack = 64 << 10;   // part 2: small reservations
constexpr std::size_t kIdleStack = 1 << 20;     // part 3: the 1 MiB stacks
constexpr std::size_t kIdleTouch = 8 << 10;     // part 3: what each idle fiber touched
constexpr std::size_t kFiberTouch = 3 * 4096;   // part 1: a fiber's local buffer (4 pages with the top)
constexpr std::size_t kProtectedReach = 30000;  // part 3: a count protected_fixedsize_stack reaches

struct Config {
    std::size_t alive = 1000000;
    std::size_t fibers = 100000;
    std::size_t grow_pages = 16384;
    std::size_t ops = 20000;
    std::size_t rounds = 7;
};

// --- /proc ------------------------------------------------------------------------------------

std::size_t rss_bytes() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    unsigned long size = 0, resident = 0;
    if (!f || std::fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
    if (f) std::fclose(f);
    return resident * kPage;
}

long status_kib(const char* field) {
    FILE* f = std::fopen("/proc/self/status", "r");
    long kib = -1;
    char line[256];
    const std::size_t n = std::strlen(field);
    while (f && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, field, n) == 0 && line[n] == ':') {
            kib = std::strtol(line + n + 1, nullptr, 10);
            break;
        }
    if (f) std::fclose(f);
    return kib;
}

long maps_lines() {
    FILE* f = std::fopen("/proc/self/maps", "r");
    long n = 0;
    for (int c; f && (c = std::fgetc(f)) != EOF;) n += c == '\n';
    if (f) std::fclose(f);
    return n;
}

const char* mode_name(usermm::GuardMode m) {
    return m == usermm::GuardMode::Markers ? "markers" : m == usermm::GuardMode::ProtNone ? "protnone" : "auto";
}

// --- the children of parts 2 and 3 --------------------------------------------------------------
// A child prints one line of `key=value` words; `err=` is last and takes the rest of the line.

using Result = std::map<std::string, std::string>;

Result parse(const std::string& line) {
    Result r;
    std::size_t at = 0;
    while (at < line.size()) {
        const std::size_t eq = line.find('=', at);
        if (eq == std::string::npos) break;
        const std::string key = line.substr(at, eq - at);
        if (key == "err") {
            std::string v = line.substr(eq + 1);
            while (!v.empty() && v.back() == '\n') v.pop_back();
            r[key] = v;
            break;
        }
        std::size_t end = line.find_first_of(" \n", eq);
        if (end == std::string::npos) end = line.size();
        r[key] = line.substr(eq + 1, end - eq - 1);
        at = end + 1;
    }
    return r;
}

double num(const Result& r, const char* key) {
    const auto it = r.find(key);
    return it == r.end() ? 0.0 : std::strtod(it->second.c_str(), nullptr);
}

std::string str(const Result& r, const char* key) {
    const auto it = r.find(key);
    return it == r.end() ? std::string() : it->second;
}

// Runs this program as `--child args...`, with `env` added to the environment, and returns its line.
Result run_child(const std::vector<std::string>& args, const char* env = nullptr) {
    int fds[2];
    if (pipe(fds) != 0) {
        std::perror("pipe");
        std::exit(1);
    }
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0) {
        std::perror("fork");
        std::exit(1);
    }
    if (pid == 0) {
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        if (env) putenv(const_cast<char*>(env));
        std::vector<std::string> all = {"usermm-bench-stacks", "--child"};
        all.insert(all.end(), args.begin(), args.end());
        std::vector<char*> argv;
        for (auto& a : all) argv.push_back(a.data());
        argv.push_back(nullptr);
        execv("/proc/self/exe", argv.data());
        _exit(127);
    }
    close(fds[1]);
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) != 0;) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        out.append(buf, std::size_t(n));
    }
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    Result r = parse(out);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        r["err"] = fmt::format("child {} {}", WIFSIGNALED(status) ? "killed by signal" : "exited with",
                               WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status)) +
                   (r.count("err") ? "; " + r["err"] : std::string());
    return r;
}

// Whether the guard page of a Boost stack is there: making it PROT_NONE again costs no mapping if
// it is (and fails with ENOMEM at the mapping limit if Boost's own mprotect failed the same way;
// Boost ignores that failure in a release build, BOOST_ASSERT only).
bool guard_in_place(const ctx::stack_context& sc) {
    return mprotect(static_cast<char*>(sc.sp) - sc.size, kPage, PROT_NONE) == 0;
}

void print_line(const std::string& s) {
    std::fputs(s.c_str(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
}

// Part 2, protected_fixedsize_stack: allocate until the mmap fails or `n` are alive.
int child_alive_protected(std::size_t n, std::size_t size) {
    ctx::protected_fixedsize_stack salloc(size);
    std::vector<ctx::stack_context> alive;
    alive.reserve(n);
    std::size_t first_unguarded = 0, unguarded = 0;
    std::string err = "none";
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < n; ++i) {
        ctx::stack_context sc;
        try {
            sc = salloc.allocate();
        } catch (const std::bad_alloc&) {
            err = fmt::format("mmap failed (std::bad_alloc, errno {})", errno);
            break;
        }
        if (!guard_in_place(sc)) {
            if (!first_unguarded) first_unguarded = i + 1;
            ++unguarded;
        }
        alive.push_back(sc);
    }
    const double ns = double(now_ns() - t0) / double(std::max<std::size_t>(1, alive.size()));
    print_line(fmt::format("count={} guarded={} first_unguarded={} unguarded={} ns={:.0f} maps={} rss_mib={:.1f} err={}",
                           alive.size(), alive.size() - unguarded, first_unguarded, unguarded, ns, maps_lines(),
                           double(rss_bytes()) / (1 << 20), err));
    return 0;
}

// Part 2, usermm: map_stack until it fails or `n` are alive.
int child_alive_usermm(std::size_t n, std::size_t size) {
    usermm::Arena arena(kArenaSize);
    std::vector<usermm::Stack> alive;
    alive.reserve(n);
    std::string err = "none";
    const std::size_t rss0 = rss_bytes();
    const std::uint64_t t0 = now_ns();
    try {
        for (std::size_t i = 0; i < n; ++i) alive.push_back(arena.map_stack(size));
    } catch (const std::exception& e) {
        err = e.what();
    }
    const double ns = double(now_ns() - t0) / double(std::max<std::size_t>(1, alive.size()));
    const usermm::StackStats st = usermm::stack_stats();
    print_line(fmt::format("count={} guarded={} ns={:.0f} maps={} stack_maps={} mode={} rss_mib={:.1f} err={}",
                           alive.size(), alive.size(), ns, maps_lines(), st.kernel_maps, mode_name(st.mode),
                           double(rss_bytes() - rss0) / (1 << 20), err));
    std::fflush(stdout);
    _exit(0);  // a million stacks need not be unmapped one by one
}

// Boost's protected_fixedsize_stack, counting the stacks whose guard is missing.
struct CheckedProtected {
    ctx::protected_fixedsize_stack inner;
    std::size_t* unguarded;
    ctx::stack_context allocate() {
        ctx::stack_context sc = inner.allocate();
        if (!guard_in_place(sc)) ++*unguarded;
        return sc;
    }
    void deallocate(ctx::stack_context& sc) noexcept { inner.deallocate(sc); }
};

// An idle fiber: touches kIdleTouch of its stack, then waits for a resume that never comes.
ctx::fiber idle_fiber(ctx::fiber&& caller) {
    volatile char buf[kIdleTouch];
    for (std::size_t i = 0; i < kIdleTouch; i += 256) buf[i] = char(i);
    (void)buf[0];
    caller = std::move(caller).resume();
    return std::move(caller);
}

template <class Alloc>
std::string start_idle(std::vector<ctx::fiber>& fibers, std::size_t n, Alloc alloc) {
    try {
        for (std::size_t i = 0; i < n; ++i) {
            ctx::fiber f{std::allocator_arg, alloc, idle_fiber};
            fibers.push_back(std::move(f).resume());
        }
    } catch (const std::exception& e) {
        return e.what();
    }
    return "none";
}

// Part 3: `n` idle fibers on `size` stacks; the RSS they added.
int child_idle(bool usermm_stacks, std::size_t n, std::size_t size) {
    std::vector<ctx::fiber> fibers;
    fibers.reserve(n);
    std::size_t unguarded = 0;
    std::optional<usermm::Arena> arena;
    std::optional<usermm::StackPool> pool;
    if (usermm_stacks) {
        arena.emplace(kArenaSize);
        pool.emplace(*arena, usermm::StackPoolOptions{.max_size = size});
    }
    const std::size_t rss0 = rss_bytes();
    const long pte0 = status_kib("VmPTE");
    const std::string err = usermm_stacks ? start_idle(fibers, n, pool->allocator())
                                          : start_idle(fibers, n, CheckedProtected{ctx::protected_fixedsize_stack(size), &unguarded});
    const double added = double(rss_bytes() - rss0);
    const double count = double(std::max<std::size_t>(1, fibers.size()));
    print_line(fmt::format("count={} rss_mib={:.1f} kib_per_fiber={:.2f} pte_kib_per_fiber={:.2f} unguarded={} maps={} err={}",
                           fibers.size(), added / (1 << 20), added / 1024 / count,
                           double(status_kib("VmPTE") - pte0) / count, unguarded, maps_lines(), err));
    std::fflush(stdout);
    _exit(0);
}

int child_main(int argc, char** argv) {
    if (argc < 5) return 2;
    const std::string_view what = argv[2];
    const std::size_t n = std::strtoull(argv[3], nullptr, 10), size = std::strtoull(argv[4], nullptr, 10);
    if (what == "alive-protected") return child_alive_protected(n, size);
    if (what == "alive-usermm") return child_alive_usermm(n, size);
    if (what == "idle-protected") return child_idle(false, n, size);
    if (what == "idle-usermm") return child_idle(true, n, size);
    return 2;
}

// --- timed rows -----------------------------------------------------------------------------------

struct Row {
    std::string name;
    std::function<double()> run;
    std::vector<double> samples = {};
};

std::vector<double> run_interleaved(std::vector<Row>& rows, std::size_t rounds) {
    for (std::size_t r = 0; r < rounds; ++r)
        for (auto& row : rows) row.samples.push_back(row.run());
    std::vector<double> out;
    for (auto& row : rows) out.push_back(median(row.samples));
    return out;
}

const char* verdict(bool met) { return met ? "met" : "MISSED"; }

// --- part 1: create + destroy ---------------------------------------------------------------------

template <class Alloc>
double alloc_free(Alloc& a, std::size_t ops) {
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < ops; ++i) {
        ctx::stack_context sc = a.allocate();
        a.deallocate(sc);
    }
    return double(now_ns() - t0) / double(ops);
}

ctx::fiber touching_fiber(ctx::fiber&& caller) {
    volatile char buf[kFiberTouch];
    for (std::size_t i = 0; i < kFiberTouch; i += 1024) buf[i] = char(i);
    (void)buf[0];
    return std::move(caller);
}

// A fiber made, run to its end (touching kFiberTouch) and destroyed, `ops` times.
template <class Alloc>
double fiber_runs(Alloc a, std::size_t ops) {
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < ops; ++i) {
        ctx::fiber f{std::allocator_arg, a, touching_fiber};
        f = std::move(f).resume();
        if (f) std::abort();
    }
    return double(now_ns() - t0) / double(ops);
}

// The floor of a fiber's run: the same stack every time, its pages resident.
struct ReusedStack {
    ctx::stack_context sc;
    ctx::stack_context allocate() { return sc; }
    void deallocate(ctx::stack_context&) noexcept {}
};

void create_destroy(usermm::Arena& arena, std::size_t size, const Config& c) {
    ctx::protected_fixedsize_stack prot(size);
    ctx::fixedsize_stack fixed(size);
    usermm::StackPool pool(arena, {.max_size = size});
    usermm::StackPoolAllocator palloc = pool.allocator();
    usermm::StackPool pool4(arena, {.max_size = size, .keep_resident_pages = 4});
    usermm::StackPoolAllocator palloc4 = pool4.allocator();
    std::vector<char> reused_mem(size);
    std::memset(reused_mem.data(), 1, size);
    ReusedStack reused{};
    reused.sc.sp = reused_mem.data() + size;
    reused.sc.size = size;
    const std::size_t ops = c.ops;
    std::vector<Row> rows = {
        {"protected_fixedsize_stack (mmap+mprotect)", [&] { return alloc_free(prot, ops); }},
        {"fixedsize_stack (malloc, no guard)", [&] { return alloc_free(fixed, ops); }},
        {"usermm StackPool acquire + ~Stack", [&] {
             const std::uint64_t t0 = now_ns();
             for (std::size_t i = 0; i < ops; ++i) usermm::Stack s = pool.acquire();
             return double(now_ns() - t0) / double(ops);
         }},
        {"usermm pool.allocator() alloc + dealloc", [&] { return alloc_free(palloc, ops); }},
        {"usermm Arena::map_stack + ~Stack, no pool", [&] {
             const std::uint64_t t0 = now_ns();
             for (std::size_t i = 0; i < ops; ++i) usermm::Stack s = arena.map_stack(size);
             return double(now_ns() - t0) / double(ops);
         }},
    };
    const auto m = run_interleaved(rows, c.rounds);
    fmt::print("\ncreate + destroy a {} KiB stack                       ns/stack   vs pool\n", size >> 10);
    for (std::size_t i = 0; i < rows.size(); ++i) fmt::print("  {:<46} {:>8.0f}   {:>6.2f}x\n", rows[i].name, m[i], m[i] / m[2]);
    fmt::print("  protected / pool = {:.1f}x   target >= 10   {}\n", m[0] / m[2], verdict(m[0] / m[2] >= 10));
    fmt::print("  protected / pool.allocator() = {:.1f}x   target >= 10   {}\n", m[0] / m[3], verdict(m[0] / m[3] >= 10));

    const std::size_t fops = std::max<std::size_t>(1, ops / 2);
    std::vector<Row> frows = {
        {"floor: the same resident stack every time", [&] { return fiber_runs(reused, fops); }},
        {"protected_fixedsize_stack", [&] { return fiber_runs(prot, fops); }},
        {"fixedsize_stack", [&] { return fiber_runs(fixed, fops); }},
        {"usermm pool.allocator()", [&] { return fiber_runs(palloc, fops); }},
        {"usermm pool.allocator(), keep_resident_pages 4", [&] { return fiber_runs(palloc4, fops); }},
    };
    const auto f = run_interleaved(frows, c.rounds);
    fmt::print("  with a fiber run on it, touching {} KiB (4 pages)      ns/fiber   vs floor\n", kFiberTouch >> 10);
    for (std::size_t i = 0; i < frows.size(); ++i) fmt::print("  {:<46} {:>8.0f}   {:>6.2f}x\n", frows[i].name, f[i], f[i] / f[0]);
    fmt::print("  protected / pool = {:.1f}x, {:.1f}x with keep_resident_pages 4 (first touches included: a returned\n"
               "    stack keeps {} pages by default, the fiber touches 4)\n",
               f[1] / f[3], f[1] / f[4], usermm::StackPoolOptions{}.keep_resident_pages);
}

// --- part 2: stacks alive -------------------------------------------------------------------------

void stacks_alive(const Config& c) {
    const std::string n = std::to_string(c.alive), size = std::to_string(kAliveStack);
    fmt::print("\nstacks of {} KiB alive at once, up to {} (vm.max_map_count {}), each in a child process\n",
               kAliveStack >> 10, c.alive, [] {
                   FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r");
                   long v = -1;
                   if (f && std::fscanf(f, "%ld", &v) != 1) v = -1;
                   if (f) std::fclose(f);
                   return v;
               }());
    fmt::print("  {:<38} {:>10} {:>10} {:>8} {:>8} {:>9}\n", "", "alive", "guarded", "ns/stack", "maps", "RSS MiB");
    const Result p = run_child({"alive-protected", n, size});
    const Result u = run_child({"alive-usermm", n, size});
    const Result f = run_child({"alive-usermm", n, size}, "USERMM_STACK_GUARDS=protnone");
    auto row = [](const char* name, const Result& r) {
        fmt::print("  {:<38} {:>10.0f} {:>10.0f} {:>8.0f} {:>8.0f} {:>9.1f}\n", name, num(r, "count"), num(r, "guarded"),
                   num(r, "ns"), num(r, "maps"), num(r, "rss_mib"));
    };
    row("protected_fixedsize_stack", p);
    row(fmt::format("usermm map_stack ({})", str(u, "mode")).c_str(), u);
    row("usermm map_stack (protnone forced)", f);
    if (num(p, "first_unguarded") > 0)
        fmt::print("  protected_fixedsize_stack: its mprotect failed from stack #{:.0f} on (Boost ignores that outside\n"
                   "    debug builds): {:.0f} of its stacks handed out without a guard; then its mmap {}\n",
                   num(p, "first_unguarded"), num(p, "unguarded"),
                   str(p, "err") == "none" ? "never failed (unguarded neighbours merge)" : "failed: " + str(p, "err"));
    else if (str(p, "err") != "none")
        fmt::print("  protected_fixedsize_stack: {}\n", str(p, "err"));
    if (str(u, "err") != "none") fmt::print("  usermm: {}\n", str(u, "err"));
    if (str(f, "err") != "none") fmt::print("  usermm, protnone forced: {}\n", str(f, "err"));
    const double guarded = num(p, "guarded"), ours = num(u, "guarded");
    fmt::print("  guarded stacks: usermm / protected = {:.1f}x;  usermm {:.0f}   target >= 1,000,000   {}\n",
               ours / std::max(1.0, guarded), ours, verdict(ours >= 1000000));
}

// --- part 3: idle fibers --------------------------------------------------------------------------

void idle_fibers(const Config& c) {
    const std::size_t reach = std::min(c.fibers, kProtectedReach);
    const std::string size = std::to_string(kIdleStack);
    fmt::print("\nidle fibers on {} KiB stacks, each touched {} KiB; RSS added, each in a child process\n", kIdleStack >> 10,
               kIdleTouch >> 10);
    fmt::print("  {:<38} {:>8} {:>9} {:>10} {:>10} {:>9} {:>7}\n", "", "fibers", "RSS MiB", "KiB/fiber", "PTE KiB/f",
               "unguarded", "maps");
    std::vector<std::pair<std::string, Result>> rows;
    rows.emplace_back("usermm StackPool", run_child({"idle-usermm", std::to_string(reach), size}));
    rows.emplace_back("protected_fixedsize_stack", run_child({"idle-protected", std::to_string(reach), size}));
    if (c.fibers > reach) {
        rows.emplace_back("usermm StackPool", run_child({"idle-usermm", std::to_string(c.fibers), size}));
        rows.emplace_back("protected_fixedsize_stack", run_child({"idle-protected", std::to_string(c.fibers), size}));
    }
    for (const auto& [name, r] : rows) {
        fmt::print("  {:<38} {:>8.0f} {:>9.1f} {:>10.2f} {:>10.2f} {:>9.0f} {:>7.0f}\n", name, num(r, "count"),
                   num(r, "rss_mib"), num(r, "kib_per_fiber"), num(r, "pte_kib_per_fiber"), num(r, "unguarded"),
                   num(r, "maps"));
        if (str(r, "err") != "none") fmt::print("    {}: {}\n", name, str(r, "err"));
    }
    fmt::print("  RSS: usermm / protected at {} fibers = {:.2f}x (kernel page tables, PTE, are not in RSS)\n", reach,
               num(rows[0].second, "rss_mib") / std::max(0.1, num(rows[1].second, "rss_mib")));
    if (rows.size() > 2 && num(rows[3].second, "unguarded") > 0 && num(rows[3].second, "count") >= double(c.fibers))
        fmt::print("  protected_fixedsize_stack at {}: all made, but {:.0f} without a guard page (vm.max_map_count)\n",
                   c.fibers, num(rows[3].second, "unguarded"));
}

// --- part 4: growth faults ------------------------------------------------------------------------

// Writes one byte of each of `pages` pages below `top`, downward; returns ns per page.
__attribute__((noinline)) double touch_down(char* top, std::size_t pages) {
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 1; i <= pages; ++i) *reinterpret_cast<volatile char*>(top - i * kPage) = 1;
    return double(now_ns() - t0) / double(pages);
}

// Part 4's passes: `pages` in all, as regions of kPassPages made, touched and freed one after the
// other, so that each region gets the pages the one before it freed, warm in this VM: the first
// touch of memory the VM has not used lately costs a trip to the host, several times the fault.
constexpr std::size_t kPassPages = 256;

template <class Pass>
double passes(std::size_t pages, Pass pass) {
    const std::size_t per = std::min(pages, kPassPages), reps = std::max<std::size_t>(1, pages / per);
    warm_free_memory(64 << 20);
    double ns = 0;
    for (std::size_t r = 0; r < reps; ++r) ns += pass(per);
    return ns / double(reps);
}

double kernel_down(std::size_t pages) {
    return passes(pages, [](std::size_t n) {
        const std::size_t len = n * kPage;
        void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) std::abort();
        const double ns = touch_down(static_cast<char*>(p) + len, n);
        munmap(p, len);
        return ns;
    });
}

double usermm_down(usermm::Arena& arena, std::size_t pages, std::size_t headroom, double* growth_faults) {
    const std::uint64_t g0 = usermm::stack_stats().growth_faults;
    const std::size_t reps = std::max<std::size_t>(1, pages / std::min(pages, kPassPages));
    const double ns = passes(pages, [&](std::size_t n) {
        usermm::Stack s = arena.map_stack(n * kPage, {.headroom = headroom});
        return touch_down(static_cast<char*>(s.top()), n);
    });
    *growth_faults = double(usermm::stack_stats().growth_faults - g0) / double(reps);
    return ns;
}

// The floor of any SIGSEGV-based growth: a PROT_NONE region whose handler does nothing but mprotect
// 16 pages from the fault up (one growth per 16 pages, as usermm's default headroom).
std::uintptr_t g_floor_base;
std::size_t g_floor_len;
void floor_grow(int, siginfo_t* si, void*) {
    std::uintptr_t a;
    if (!floor_fault(si, g_floor_base, g_floor_len, &a)) return;
    const std::uintptr_t page = a & ~std::uintptr_t(kPage - 1);
    const std::uintptr_t low = page - std::min<std::uintptr_t>(page - g_floor_base, 15 * kPage);
    mprotect(reinterpret_cast<void*>(low), page + kPage - low, PROT_READ | PROT_WRITE);
}

double floor_down(std::size_t pages) {
    return passes(pages, [](std::size_t n) {
        const std::size_t len = n * kPage;
        void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) std::abort();
        g_floor_base = reinterpret_cast<std::uintptr_t>(p);
        g_floor_len = len;
        struct sigaction sa {}, saved {};
        sa.sa_sigaction = floor_grow;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &saved);
        const double ns = touch_down(static_cast<char*>(p) + len, n);
        sigaction(SIGSEGV, &saved, nullptr);
        munmap(p, len);
        return ns;
    });
}

// Recursion with 4 KiB frames on a fiber: each frame is a new page of the stack.
__attribute__((noinline)) int recurse(int depth) {
    volatile char frame[4096 - 96];
    frame[0] = char(depth);
    if (depth <= 1) return frame[0];
    return recurse(depth - 1) + frame[0];
}

constexpr int kFrames = 192;                // 768 KiB of frames
constexpr std::size_t kRecurseStack = 1 << 20;

ctx::fiber recursing_fiber(ctx::fiber&& caller) {
    if (recurse(kFrames) == 12345) std::abort();
    return std::move(caller);
}

// A fresh map_stack for each fiber: what a pool's returned stack is too, below its kept pages.
struct FreshUsermmStack {
    usermm::Arena* arena;
    std::shared_ptr<std::optional<usermm::Stack>> held;
    ctx::stack_context allocate() {
        held->emplace(arena->map_stack(kRecurseStack));
        ctx::stack_context sc;
        sc.sp = (*held)->top();
        sc.size = (*held)->size();
        return sc;
    }
    void deallocate(ctx::stack_context&) noexcept { held->reset(); }
};

template <class Alloc>
double recursion_pass(Alloc a, std::size_t pages) {
    const std::size_t fibers = std::max<std::size_t>(1, pages / kFrames);
    warm_free_memory(2 * fibers * kRecurseStack + (32 << 20));
    const std::uint64_t t0 = now_ns();
    for (std::size_t i = 0; i < fibers; ++i) {
        ctx::fiber f{std::allocator_arg, a, recursing_fiber};
        f = std::move(f).resume();
    }
    return double(now_ns() - t0) / double(fibers * kFrames);
}

void growth(usermm::Arena& arena, const Config& c) {
    const std::size_t pages = c.grow_pages;
    double g64 = 0, g4 = 0;
    std::vector<Row> rows = {
        {"kernel: fresh mmap, first touches", [&] { return kernel_down(pages); }},
        {"SIGSEGV + mprotect floor, 16 pages/fault", [&] { return floor_down(pages); }},
        {"usermm stack, headroom 64 KiB (default)", [&] { return usermm_down(arena, pages, 64 << 10, &g64); }},
        {"usermm stack, headroom 4 KiB", [&] { return usermm_down(arena, pages, 4 << 10, &g4); }},
    };
    const auto m = run_interleaved(rows, c.rounds);
    fmt::print("\nstack growth: {} pages written one by one downward, in fresh regions of {}    ns/page   vs kernel\n",
               pages, std::min(pages, kPassPages));
    for (std::size_t i = 0; i < rows.size(); ++i) fmt::print("  {:<46} {:>8.0f}   {:>6.2f}x\n", rows[i].name, m[i], m[i] / m[0]);
    fmt::print("  growth faults per region: {:.0f} (headroom 64 KiB), {:.0f} (headroom 4 KiB); the other pages are the\n"
               "    kernel's own first touches\n", g64, g4);
    const std::size_t per = std::min(pages, kPassPages);
    auto per_fault = [&](double ns, double faults) { return faults > 0 ? (ns - m[0]) * double(per) / faults : 0.0; };
    fmt::print("  one growth fault, beyond the kernel's first touch: {:.0f} ns (headroom 64 KiB), {:.0f} ns (4 KiB); "
               "floor's {:.0f} ns\n", per_fault(m[2], g64), per_fault(m[3], g4), per_fault(m[1], double((per + 15) / 16)));
    fmt::print("  usermm (64 KiB) / kernel = {:.2f}   target <= 1.30   {}\n", m[2] / m[0], verdict(m[2] / m[0] <= 1.3));
    fmt::print("  usermm (64 KiB) / SIGSEGV floor = {:.2f}\n", m[2] / m[1]);

    ctx::protected_fixedsize_stack prot(kRecurseStack);
    FreshUsermmStack fresh{&arena, std::make_shared<std::optional<usermm::Stack>>()};
    // Recycled: each stack comes back grown, gets its guard markers back, and grows again.
    usermm::StackPool pool(arena, {.max_size = kRecurseStack});
    std::vector<Row> rrows = {
        {"protected_fixedsize_stack (kernel faults)", [&] { return recursion_pass(prot, pages); }},
        {"usermm map_stack (growth faults)", [&] { return recursion_pass(fresh, pages); }},
        {"usermm StackPool (growth faults, re-guarded)", [&] { return recursion_pass(pool.allocator(), pages); }},
    };
    const auto r = run_interleaved(rrows, c.rounds);
    fmt::print("  recursion on a fiber, {} frames of 4 KiB on a fresh 1 MiB stack (made and freed with each fiber)"
               "   ns/frame   vs kernel\n", kFrames);
    for (std::size_t i = 0; i < rrows.size(); ++i)
        fmt::print("  {:<46} {:>8.0f}   {:>6.2f}x\n", rrows[i].name, r[i], r[i] / r[0]);
    fmt::print("  usermm map_stack / protected = {:.2f}   target <= 1.30   {} (map_stack + ~Stack of 1 MiB included: "
               "see above)\n", r[1] / r[0], verdict(r[1] / r[0] <= 1.3));
    fmt::print("  usermm StackPool / protected = {:.2f}   target <= 1.30   {}\n", r[2] / r[0], verdict(r[2] / r[0] <= 1.3));
}

}  // namespace

int main(int argc, char** argv) {
    if (argc >= 2 && std::string_view(argv[1]) == "--child") return child_main(argc, argv);
    Config c;
    std::size_t* fields[] = {&c.alive, &c.fibers, &c.grow_pages, &c.ops, &c.rounds};
    for (int i = 1; i < argc; ++i) {
        if (i > 5 || !*argv[i] || std::strtoull(argv[i], nullptr, 10) == 0) {
            std::fprintf(stderr, "usage: %s [ALIVE [FIBERS [GROW_PAGES [OPS [ROUNDS]]]]] (all > 0)\n", argv[0]);
            return 2;
        }
        *fields[i - 1] = std::strtoull(argv[i], nullptr, 10);
    }
    fmt::print("usermm stacks benchmark: {} KiB pages, median of {} interleaved rounds; Boost {}.{}\n", kPage >> 10,
               c.rounds, BOOST_VERSION / 100000, BOOST_VERSION / 100 % 1000);
    // The children first, while this process has no arena of its own.
    stacks_alive(c);
    idle_fibers(c);
    usermm::Arena arena(kArenaSize);
    fmt::print("\nguard mode: {}\n", mode_name(usermm::stack_stats().mode));
    create_destroy(arena, 64 << 10, c);
    create_destroy(arena, 1 << 20, c);
    growth(arena, c);
    return 0;
}
