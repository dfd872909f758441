// Stacks at scale (issue 12): 100,000 Boost.Context fibers on usermm stacks of 1 MiB reserved each,
// alive at once, cost about the pages they touched plus usermm's per-page table, and few kernel
// mappings (guard markers split no kernel VMA); with the PROT_NONE fallback and a small map budget,
// making stacks ends with an error naming vm.max_map_count, not a crash.
// Boost.Context annotates its switches for ASan (BOOST_USE_ASAN) only in its ucontext
// implementation, which needs a libboost_context built for it (fiber_activation_record::current());
// Debian's is built for fcontext, so under ASan the fibers switch unannotated: ASan then warns about
// the stack switch at a noreturn call, which these tests do not make on a fiber.
#include <boost/context/fiber.hpp>

#include <doctest/doctest.h>
#include <usermm/boost_context.hpp>
#include <usermm/usermm.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "test_util.hpp"

#include "stack_test_util.hpp"

namespace {

using stack_test::addr;
using stack_test::dive;
using usermm::Arena;
using usermm::Stack;
using usermm::StackPool;

constexpr std::size_t KiB = 1024, MiB = 1024 * KiB;

[[maybe_unused]] const unsigned g_watchdog = alarm(300);

// Fewer fibers under the sanitizers: ASan's ucontext switches release the shadow of each stack
// they enter (an madvise per switch) and its frames are larger; ThreadSanitizer cannot reserve a
// 128 GiB arena beside its shadow (test_util.hpp, kSkipUnderTsan) and Boost.Context 1.74 does not
// annotate its switches for it, so it runs a small count on a small arena.
#if defined(__SANITIZE_THREAD__)
constexpr std::size_t kFibers = 2'000;
#elif defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kFibers = 10'000;
#else
constexpr std::size_t kFibers = 100'000;
#endif
constexpr std::size_t kStackSize = 1 * MiB;
// ThreadSanitizer's shadow of the stacks' ranges (it resets the shadow of whole ranges that change
// protection) is counted in RSS: 1.3 GiB for 2,000 stacks measured. The RSS bounds are checked in
// the other builds.
#if defined(__SANITIZE_THREAD__)
constexpr bool kCheckRss = false;
#else
constexpr bool kCheckRss = true;
#endif

long statm_resident_pages() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    long size = 0, resident = 0;
    if (!f || std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
    if (f) std::fclose(f);
    return resident;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

struct FiberState {
    boost::context::fiber* caller = nullptr;
    std::uintptr_t lowest = 0;  // the deepest frame's address
};

// Whether this kernel has guard markers (MADV_GUARD_INSTALL, Linux 6.13), probed with plain system
// calls before main: without them 100,000 stacks cost 200,000 kernel mappings, past the limit.
bool guard_markers() {
    const long page = sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, std::size_t(page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    const bool ok = madvise(p, std::size_t(page), 102) == 0;
    munmap(p, std::size_t(page));
    const char* forced = std::getenv("USERMM_STACK_GUARDS");
    return ok && !(forced && std::string_view(forced) == "protnone");
}
const bool g_guard_markers = guard_markers();

}  // namespace

TEST_CASE("100,000 fibers on 1 MiB usermm stacks: RSS is the pages they touched, kernel mappings stay few" *
          doctest::skip(!g_guard_markers)) {
    const std::size_t ps = usermm::page_size();
    const std::size_t arena_size =
        kFibers == 100'000 ? (1ull << 37) : ((kFibers * (kStackSize + 64 * KiB) + 256 * MiB) & ~(MiB - 1));
    Arena arena(arena_size);
    const usermm::StackStats gauges = usermm::stack_stats();
    const long maps_before = usermm_test::process_mappings();
    std::vector<boost::context::fiber> fibers;
    fibers.reserve(kFibers);
    std::vector<FiberState> states(kFibers);
    std::vector<std::size_t> depth(kFibers);
    std::mt19937_64 rng(12);
    for (auto& d : depth) d = std::uniform_int_distribution<std::size_t>(1 * KiB, 32 * KiB)(rng);
    const long rss_before = statm_resident_pages();
    {
        StackPool pool(arena, {.max_size = kStackSize, .keep_resident_pages = 2, .max_idle = 1024,
                               .stack = {.name = "fiber"}});
        const auto t0 = std::chrono::steady_clock::now();
        for (std::size_t i = 0; i < kFibers; ++i) {
            FiberState* st = &states[i];
            const std::size_t d = depth[i];
            fibers.emplace_back(std::allocator_arg, pool.allocator(), [st, d](boost::context::fiber&& caller) {
                st->caller = &caller;
                dive(stack_test::current_sp() - d,
                     [](void* p) {
                         auto* s = static_cast<FiberState*>(p);
                         s->lowest = stack_test::current_sp();
                         *s->caller = std::move(*s->caller).resume();
                     },
                     st);
                return std::move(caller);
            });
            fibers.back() = std::move(fibers.back()).resume();  // runs to its depth and yields
            REQUIRE(fibers.back());
        }
        const double t_create = seconds_since(t0);

        // All alive, each suspended at its deepest frame.
        const usermm::StackStats now = usermm::stack_stats();
        CHECK(now.live == gauges.live + kFibers);
        CHECK(now.committed_bytes >= gauges.committed_bytes + kFibers * 64 * KiB);  // committed, not resident
        const long maps = usermm_test::process_mappings();
        const long arena_maps = usermm_test::mappings_within(arena.base(), arena.size());
        const long rss = statm_resident_pages() - rss_before;
        // What the fibers touched: from the top of each stack (Boost's record and first frames lie
        // in its top page or two) down to its deepest frame.
        std::size_t touched_low = 0, touched_high = 0;
        for (std::size_t i = 0; i < kFibers; ++i) {
            REQUIRE(states[i].lowest != 0);
            touched_low += depth[i] / ps;
            touched_high += (depth[i] + 8 * KiB) / ps + 2;
        }
        // usermm's page-state table: 2 bytes per reserved page (of the part the stacks cover), and
        // its own objects per stack (the VMA, the stack's state, the pool's list), generously.
        const std::size_t pte_pages = (kFibers * (kStackSize + 64 * KiB) / ps * 2) / ps + 1;
        const std::size_t per_stack_heap_pages = kFibers * 1 * KiB / ps;
        MESSAGE("fibers " << kFibers << ": created in " << t_create << " s; RSS +" << rss * long(ps) / long(MiB)
                          << " MiB (touched " << touched_low * ps / MiB << "-" << touched_high * ps / MiB
                          << " MiB, page table " << pte_pages * ps / MiB << " MiB); kernel mappings " << maps
                          << " (arena " << arena_maps << ", before " << maps_before << ", max "
                          << usermm_test::max_map_count() << "); stack kernel maps " << now.kernel_maps);
        if (kCheckRss) CHECK(rss >= long(touched_low));
        if (kCheckRss) CHECK(rss <= long(touched_high + pte_pages + per_stack_heap_pages + 16 * MiB / ps));
        // Far below vm.max_map_count: with guard markers the stacks side by side are a handful of
        // kernel mappings; with PROT_NONE guards (USERMM_STACK_GUARDS=protnone) they would be
        // 200,000, which the budget refuses, so this test runs on markers.
        CHECK(now.mode == usermm::GuardMode::Markers);
        CHECK(now.kernel_maps == gauges.kernel_maps);
        CHECK(maps < usermm_test::max_map_count() / 4);
        CHECK(maps - maps_before < 1000);
        CHECK(arena_maps < 1000);
        const usermm::Stats s = arena.stats();
        CHECK(s.stack_overflows == 0);
        arena.verify();

        const auto t1 = std::chrono::steady_clock::now();
        for (auto& f : fibers) {
            f = std::move(f).resume();
            CHECK(!f);
        }
        fibers.clear();
        MESSAGE("finished and returned in " << seconds_since(t1) << " s");
        CHECK(pool.idle() == 1024);
        CHECK(usermm::stack_stats().live == gauges.live + 1024);
        arena.verify();
    }
    CHECK(usermm::stack_stats().live == gauges.live);
    CHECK(arena.vmas().empty());
    // The stacks' pages went back to the kernel; what stays is the page-state table (never
    // shrunk) and the heap malloc keeps.
    const std::size_t table_pages = (kFibers * (kStackSize + 64 * KiB) / ps * 2) / ps + 1;
    if (kCheckRss) CHECK(statm_resident_pages() - rss_before < long(table_pages + 96 * MiB / ps));
}

// --- the PROT_NONE fallback under a small map budget ---------------------------------------------

namespace {
constexpr const char* kInnerCase = "inner: PROT_NONE stacks until the map budget is spent";
constexpr long kBudget = 200;
bool inner_run() { return std::getenv("USERMM_STACKS_INNER") != nullptr; }
}  // namespace

// The budget is read once per process (USERMM_MAP_BUDGET, at set-up) and the guard mode before the
// first stack: the case runs in a fresh process, this executable again, with both in its
// environment. The inner case is skipped in an ordinary run.
TEST_CASE("PROT_NONE guards and a small map budget: making stacks ends with an error naming vm.max_map_count") {
    const usermm_test::ChildEnd end = usermm_test::run_in_child(
        [] {
            dup2(2, 1);
            setenv("USERMM_STACK_GUARDS", "protnone", 1);
            setenv("USERMM_MAP_BUDGET", std::to_string(kBudget).c_str(), 1);
            setenv("USERMM_STACKS_INNER", "1", 1);
            const std::string filter = std::string("--test-case=") + kInnerCase;
            execl("/proc/self/exe", "test_stacks_scale", filter.c_str(), "--no-colors", static_cast<char*>(nullptr));
            std::perror("exec");
            _exit(127);
        },
        120);
    INFO(end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    // The inner case ran (it is skipped in this process, not there), and passed.
    CHECK(end.err.find(" 1 passed") != std::string::npos);
    CHECK(end.err.find("Status: SUCCESS") != std::string::npos);
}

TEST_CASE("inner: PROT_NONE stacks until the map budget is spent" * doctest::skip(!inner_run())) {
    REQUIRE(usermm::stack_stats().mode == usermm::GuardMode::ProtNone);
    Arena arena(1ull << 32);
    const long maps_before = usermm_test::mappings_within(arena.base(), arena.size());
    std::vector<Stack> stacks;
    std::string what;
    int code = 0;
    for (std::size_t i = 0; i < 100'000; ++i) {
        try {
            stacks.push_back(arena.map_stack(kStackSize, {.name = "budgeted"}));
        } catch (const usermm::Error& e) {
            what = e.what();
            code = e.code().value();
            break;
        }
    }
    INFO(what);
    CHECK(code == ENOMEM);
    CHECK(what.find("vm.max_map_count") != std::string::npos);
    // Two kernel mappings a stack: about half the budget (less what the arena and the alternate
    // signal stack hold).
    CHECK(stacks.size() >= std::size_t(kBudget / 2 - 8));
    CHECK(stacks.size() <= std::size_t(kBudget / 2));
    for (const Stack& s : stacks) CHECK(s.guard_mode() == usermm::GuardMode::ProtNone);
    CHECK(usermm::stack_stats().kernel_maps == long(2 * stacks.size()));
    CHECK(usermm_test::mappings_within(arena.base(), arena.size()) - maps_before == long(2 * stacks.size()));
    arena.verify();

    // A pool refuses the same way, and nothing is half made.
    {
        StackPool pool(arena, {.max_size = kStackSize});
        try {
            (void)pool.acquire();
            CHECK_MESSAGE(false, "a pool made a stack past the budget");
        } catch (const usermm::Error& e) {
            CHECK(std::string(e.what()).find("vm.max_map_count") != std::string::npos);
        }
        CHECK(pool.idle() == 0);
    }
    arena.verify();

    // The stacks made work: one grows by faults (mprotect moves the boundary, no new mapping) and
    // overflows, caught.
    Stack& s = stacks.back();
    const std::uint64_t faults = arena.stats().stack_growth_faults;
    {
        stack_test::Fiber f(s, [&] { dive(addr(s.top()) - 600 * KiB, nullptr, nullptr); });
        f.run();
    }
    CHECK(arena.stats().stack_growth_faults > faults);
    CHECK(usermm_test::mappings_within(arena.base(), arena.size()) - maps_before == long(2 * stacks.size()));
    usermm::on_stack_overflow(&stack_test::record_and_leave);
    {
        sigjmp_buf env;
        stack_test::t_leave_to = &env;
        stack_test::Fiber f(s, [] { stack_test::forever(0); });
        stack_test::t_fiber = &f;
        if (sigsetjmp(env, 1) == 0) {
            f.resume();
            CHECK_MESSAGE(false, "the endless recursion ended");
        }
        stack_test::t_fiber = nullptr;
        CHECK(stack_test::g_overflow.calls == 1);
        CHECK(stack_test::g_overflow.seen.id == s.id());
        CHECK(stack_test::g_overflow.seen.name() == "budgeted");
    }
    usermm::on_stack_overflow(nullptr);
    arena.verify();

    // A stack unmapped gives its two mappings back: one more fits again, and then no more.
    stacks.erase(stacks.begin());
    CHECK_NOTHROW(stacks.push_back(arena.map_stack(kStackSize, {.name = "again"})));
    CHECK_THROWS_AS(stacks.push_back(arena.map_stack(kStackSize)), usermm::Error);
    stacks.clear();
    CHECK(usermm::stack_stats().kernel_maps == 0);
    CHECK(usermm_test::mappings_within(arena.base(), arena.size()) == maps_before);
    arena.verify();
}
