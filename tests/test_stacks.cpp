// Grow-down stacks (issue 12): a usermm stack grows by faults like the kernel's expand_stack, a
// pool shrinks the stacks given back without a new kernel mapping, an overflow of a usermm stack,
// of the main thread's stack or of a pthread's is reported on the alternate signal stack and can
// be left by siglongjmp again and again, accesses that are not overflows die by SIGSEGV as the
// kernel would kill them, system calls into committed headroom (or what ensure() commits) do not
// see EFAULT, and stacks survive fork() and snapshots. Every death happens in a forked child.
// ctest runs this file three times: on the default engine, on the mprotect engine, and with
// USERMM_STACK_GUARDS=protnone (the PROT_NONE fallback instead of guard markers).
// Boost.Context annotates its switches for ASan (BOOST_USE_ASAN) only in its ucontext
// implementation, which needs a libboost_context built for it (fiber_activation_record::current());
// Debian's is built for fcontext, so under ASan the fibers switch unannotated: ASan then warns about
// the stack switch at a noreturn call, which these tests do not make on a fiber.
#include <boost/context/fiber.hpp>

#include <doctest/doctest.h>
#include <usermm/boost_context.hpp>
#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include <alloca.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "test_util.hpp"

#include "stack_test_util.hpp"

namespace {

using stack_test::addr;
using stack_test::dive;
using stack_test::Fiber;
using stack_test::forever;
using stack_test::g_overflow;
using usermm::Arena;
using usermm::Prot;
using usermm::Stack;
using usermm::StackOverflow;
using usermm::StackPool;

constexpr std::size_t KiB = 1024;

// A fault usermm cannot get past repeats forever: SIGALRM ends the file visibly instead.
[[maybe_unused]] const unsigned g_watchdog = alarm(120);

// ThreadSanitizer intercepts signals and runs the program's SIGUSR1 handler from its own wrapper:
// an overflow inside it dies silently there. Its mappings (shadow) also grow with memory touched.
#if defined(__SANITIZE_THREAD__)
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif


std::size_t page() { return usermm::page_size(); }

// Resident pages of the kernel mappings inside [start, start + length) (smaps' page-table walk).
long resident_pages(const void* start, std::size_t length) {
    // mincore, not smaps: the kernel may merge the arena's mappings with a neighbour outside it.
    constexpr std::size_t kChunk = std::size_t(1) << 30;
    std::vector<unsigned char> vec(kChunk / page());
    long n = 0;
    for (std::size_t off = 0; off < length; off += kChunk) {
        const std::size_t len = std::min(kChunk, length - off);
        REQUIRE(mincore(static_cast<char*>(const_cast<void*>(start)) + off, len, vec.data()) == 0);
        for (std::size_t i = 0; i < len / page(); ++i) n += vec[i] & 1;
    }
    return n;
}

// A memfd holding `n` bytes of a pattern, at offset 0.
int pattern_file(std::size_t n) {
    const int fd = memfd_create("usermm-stack-read", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    std::vector<char> data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = char(i * 31 + 7);
    REQUIRE(pwrite(fd, data.data(), n, 0) == ssize_t(n));
    return fd;
}

bool matches_pattern(const char* p, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
        if (p[i] != char(i * 31 + 7)) return false;
    return true;
}

// Runs an endless recursion on `s` in a fiber; the overflow handler (record_and_leave) jumps back
// here. Returns true if it came back by the jump.
bool overflow_on(Stack& s) {
    sigjmp_buf env;
    stack_test::t_leave_to = &env;
    Fiber f(s, [] { forever(0); });
    stack_test::t_fiber = &f;
    const int calls = g_overflow.calls;
    if (sigsetjmp(env, 1) == 0) {
        f.resume();
        stack_test::t_fiber = nullptr;
        return false;  // the endless recursion ended
    }
    stack_test::t_fiber = nullptr;
    stack_test::t_leave_to = nullptr;
    return g_overflow.calls == calls + 1;
}

// The checks of one overflow report against the usermm stack it happened on.
void child_check_stack_report(const Stack& s, std::size_t guard, std::string_view name) {
    const StackOverflow& o = g_overflow.seen;
    CHILD_CHECK(o.where == StackOverflow::Where::Stack);
    CHILD_CHECK(o.name() == name);
    CHILD_CHECK(o.id == s.id());
    CHILD_CHECK(addr(o.address) >= addr(s.bottom()) - guard && addr(o.address) < addr(s.bottom()));
    CHILD_CHECK(addr(o.sp) >= addr(s.bottom()) - guard && addr(o.sp) < addr(s.top()));
    CHILD_CHECK(o.low == s.bottom() && o.high == s.top());
    CHILD_CHECK(o.peak >= s.size() - 8 * page() && o.peak <= s.size());
    // The handler ran on the alternate signal stack, not on the stack that overflowed.
    CHILD_CHECK(g_overflow.on_alt_stack);
    CHILD_CHECK(g_overflow.handler_frame < addr(s.bottom()) - guard || g_overflow.handler_frame >= addr(s.top()));
}

}  // namespace

// --- 1. growth --------------------------------------------------------------------------------

TEST_CASE("deep recursion on a fresh stack grows it page by page; committed and peak follow") {
    Arena arena(256ull << 20);
    const usermm::Stats before = arena.stats();
    const usermm::StackStats gauges_before = usermm::stack_stats();
    Stack s = arena.map_stack(2ull << 20, {.name = "deep"});
    CHECK(s.size() == 2ull << 20);
    CHECK(addr(s.top()) - addr(s.bottom()) == s.size());
    CHECK(s.name() == "deep");
    CHECK(s.committed() == 64 * KiB);  // the headroom, nothing more
    CHECK(s.peak() == 0);
    CHECK(usermm::stack_stats().live == gauges_before.live + 1);
    arena.verify();

    constexpr std::size_t kDepth = 1024 * KiB;
    struct At {
        Fiber* f;
        Stack* s;
        Arena* arena;
        std::size_t committed = 0, peak = 0;
    } at{nullptr, &s, &arena};
    std::uintptr_t entry = 0;
    Fiber f(s, [&] {
        entry = stack_test::current_sp();
        dive(addr(s.top()) - kDepth, [](void* p) { static_cast<At*>(p)->f->yield(); }, &at);
    });
    at.f = &f;
    f.resume();  // the fiber is at its deepest, suspended
    REQUIRE(!f.done());
    CHECK(entry > addr(s.top()) - 4 * KiB);
    const usermm::Stats deep = arena.stats();
    const std::size_t committed = s.committed(), peak = s.peak();
    INFO("committed " << committed << " peak " << peak << " growth faults "
                      << deep.stack_growth_faults - before.stack_growth_faults);
    CHECK(committed >= kDepth);
    CHECK(committed <= kDepth + 64 * KiB + 64 * KiB + 4 * page());  // the headroom below the deepest page
    CHECK(peak >= kDepth);
    CHECK(peak <= kDepth + 4 * page());
    // One growth fault per headroom's worth at least (each commits the page and 64 KiB below),
    // never more than one per page.
    const std::uint64_t faults = deep.stack_growth_faults - before.stack_growth_faults;
    CHECK(faults >= (kDepth - 64 * KiB) / (68 * KiB));
    CHECK(faults <= kDepth / page());
    CHECK(deep.stack_pages_grown - before.stack_pages_grown == (committed - 64 * KiB) / page());
    CHECK(deep.stack_overflows == before.stack_overflows);
    CHECK(usermm::stack_stats().growth_faults - gauges_before.growth_faults == faults);
    CHECK(usermm::stack_stats().committed_bytes >= gauges_before.committed_bytes + committed);
    arena.verify();  // a stack suspended at its deepest

    f.resume();
    CHECK(f.done());
    // Nothing shrinks a map_stack stack by itself.
    CHECK(s.committed() == committed);
    CHECK(s.peak() == peak);
    arena.verify();
    // A second descent to the same depth finds everything committed: no new growth.
    Fiber again(s, [&] { dive(addr(s.top()) - kDepth, nullptr, nullptr); });
    again.run();
    CHECK(arena.stats().stack_growth_faults == deep.stack_growth_faults);
    s = Stack{};
    CHECK(usermm::stack_stats().live == gauges_before.live);
    arena.verify();
}

TEST_CASE("a Boost.Context fiber on a pool's stack grows it by faults") {
    Arena arena(256ull << 20);
    StackPool pool(arena, {.max_size = 1ull << 20});
    const usermm::Stats before = arena.stats();
    constexpr std::size_t kDepth = 600 * KiB;
    std::uintptr_t entry = 0;
    boost::context::fiber f{std::allocator_arg, pool.allocator(), [&](boost::context::fiber&& caller) {
                                entry = stack_test::current_sp();
                                struct Arg {
                                    boost::context::fiber* caller;
                                } arg{&caller};
                                dive(entry - kDepth,
                                     [](void* p) {
                                         auto* a = static_cast<Arg*>(p);
                                         *a->caller = std::move(*a->caller).resume();
                                     },
                                     &arg);
                                return std::move(caller);
                            }};
    f = std::move(f).resume();
    REQUIRE(f);
    // The fiber runs on the pool's one stack: the arena's only VMA, with the fiber's frames in it.
    const std::vector<usermm::VmaInfo> vmas = arena.vmas();
    REQUIRE(vmas.size() == 1);
    const std::uintptr_t vma_end = addr(vmas[0].start) + vmas[0].length;
    CHECK(entry < vma_end);
    CHECK(entry > vma_end - 8 * KiB);
    CHECK(vmas[0].length == (1ull << 20) + 64 * KiB);  // the stack and its guard
    const usermm::Stats deep = arena.stats();
    CHECK(deep.stack_growth_faults > before.stack_growth_faults);
    CHECK(deep.stack_pages_grown >= (kDepth - 64 * KiB) / page());
    CHECK(resident_pages(arena.base(), arena.size()) >= long(kDepth / page()));
    CHECK(resident_pages(arena.base(), arena.size()) <= long(kDepth / page()) + 8);
    arena.verify();
    f = std::move(f).resume();
    CHECK(!f);
    CHECK(pool.idle() == 1);
    arena.verify();
}

// --- 2. pools -----------------------------------------------------------------------------------

TEST_CASE("a stack given back to its pool is shrunk; acquire reuses it without a new kernel mapping") {
    Arena arena(256ull << 20);
    StackPool pool(arena, {.max_size = 1ull << 20, .keep_resident_pages = 2});
    CHECK(pool.idle() == 0);
    CHECK(pool.stack_size() == 1ull << 20);
    Stack s = pool.acquire();
    const void* top = s.top();
    const std::uint64_t id = s.id();
    {
        Fiber f(s, [&] { dive(addr(s.top()) - 500 * KiB, nullptr, nullptr); });
        f.run();
    }
    CHECK(s.committed() >= 500 * KiB);
    CHECK(s.peak() >= 500 * KiB);
    CHECK(resident_pages(arena.base(), arena.size()) >= long(500 * KiB / page()));
    s = Stack{};  // back to the pool
    CHECK(pool.idle() == 1);
    // Its memory went back to the kernel, but for the pages it keeps from the top.
    CHECK(resident_pages(arena.base(), arena.size()) <= 2);
    arena.verify();

    Stack again = pool.acquire();
    CHECK(pool.idle() == 0);
    CHECK(again.top() == top);
    CHECK(again.id() == id);
    CHECK(again.committed() == 64 * KiB);
    CHECK(again.peak() <= 2 * page());
    // It grows again from the headroom, by faults, and its guard markers (or PROT_NONE) are back:
    // a second descent needs growth faults again.
    const std::uint64_t faults = arena.stats().stack_growth_faults;
    {
        Fiber f(again, [&] { dive(addr(again.top()) - 300 * KiB, nullptr, nullptr); });
        f.run();
    }
    CHECK(arena.stats().stack_growth_faults > faults);
    CHECK(again.peak() >= 300 * KiB);
    again = Stack{};
    CHECK(pool.idle() == 1);

    // Many cycles of acquire, growth and return: no kernel mapping is added (no mmap, and the
    // guards' mprotect, where they are PROT_NONE, moves a boundary without adding one).
    const long maps_before = usermm_test::process_mappings();
    const long arena_maps_before = usermm_test::mappings_within(arena.base(), arena.size());
    for (int i = 0; i < 300; ++i) {
        Stack t = pool.acquire();
        Fiber f(t, [&] { dive(addr(t.top()) - std::size_t(100 + i % 7 * 50) * KiB, nullptr, nullptr); });
        f.run();
    }
    for (int i = 0; i < 300; ++i) {
        boost::context::fiber bf{std::allocator_arg, pool.allocator(), [](boost::context::fiber&& c) {
                                     dive(stack_test::current_sp() - 200 * KiB, nullptr, nullptr);
                                     return std::move(c);
                                 }};
        bf = std::move(bf).resume();
        CHECK(!bf);
    }
    CHECK(pool.idle() == 1);
    if (!kTsan) CHECK(usermm_test::process_mappings() <= maps_before);
    CHECK(usermm_test::mappings_within(arena.base(), arena.size()) == arena_maps_before);
    CHECK(resident_pages(arena.base(), arena.size()) <= 2);
    arena.verify();

    // Two stacks out at once: the second one is a new stack, and both come back.
    {
        Stack a = pool.acquire(), b = pool.acquire();
        CHECK(a.top() != b.top());
        CHECK(pool.idle() == 0);
    }
    CHECK(pool.idle() == 2);
}

TEST_CASE("a pool keeps at most max_idle stacks; the rest are unmapped") {
    Arena arena(256ull << 20);
    const std::size_t live = usermm::stack_stats().live;
    {
        StackPool pool(arena, {.max_size = 256 * KiB, .max_idle = 3});
        {
            std::vector<Stack> out;
            for (int i = 0; i < 8; ++i) out.push_back(pool.acquire());
            CHECK(usermm::stack_stats().live == live + 8);
        }
        CHECK(pool.idle() == 3);
        CHECK(usermm::stack_stats().live == live + 3);
        arena.verify();
    }
    CHECK(usermm::stack_stats().live == live);
    CHECK(arena.vmas().empty());
}

// --- 3. overflow of a usermm stack ---------------------------------------------------------------

TEST_CASE("an overflow of a usermm stack is caught on the alternate stack and left by siglongjmp twice") {
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [] {
            Arena arena(256ull << 20);
            constexpr std::size_t kGuard = 64 * KiB;
            Stack s = arena.map_stack(512 * KiB, {.name = "overflow-me", .guard = kGuard});
            Stack other = arena.map_stack(256 * KiB, {.name = "second"});
            usermm::on_stack_overflow(&stack_test::record_and_leave);
            const usermm::StackStats gauges = usermm::stack_stats();
            for (int round = 0; round < 2; ++round) {
                CHILD_CHECK(overflow_on(s));
                child_check_stack_report(s, kGuard, "overflow-me");
                CHILD_CHECK(arena.stats().stack_overflows == std::uint64_t(round + 1));
            }
            CHILD_CHECK(usermm::stack_stats().overflows == gauges.overflows + 2);
            // Another stack, and the first one again: nothing was left locked or blocked.
            CHILD_CHECK(overflow_on(other));
            child_check_stack_report(other, 64 * KiB, "second");
            CHILD_CHECK(overflow_on(s));
            child_check_stack_report(s, kGuard, "overflow-me");
            CHILD_CHECK(g_overflow.calls == 4);
            // The stack still works after its overflows.
            Fiber f(s, [&] { dive(addr(s.top()) - 100 * KiB, nullptr, nullptr); });
            f.run();
            CHILD_CHECK(f.done());
            arena.verify();
        },
        60);
    usermm_test::check_survived(end);
}

// --- 4. thread stacks -----------------------------------------------------------------------------

// The main thread's overflow under ThreadSanitizer: the child dies without a word (TSan's signal
// wrapper on a main stack at its limit). The pthread case runs everywhere.
#if defined(__SANITIZE_THREAD__)
constexpr bool kSkipThreadStacks = true;
#else
constexpr bool kSkipThreadStacks = false;
#endif
namespace {
// Recursion whose only stores are the calls' pushes: the access that overflows lies just below the
// stack pointer (a push writes before it moves it).
__attribute__((noinline)) void push_forever(int n) {
    if (stack_test::g_never) return;
    push_forever(n + 1);
    asm volatile("" ::: "memory");  // not a tail call
}

// Recursion with an 8 KiB frame whose first store is 64 bytes above the new stack pointer: the
// frame spans the limit, so the access that overflows lies ABOVE the stack pointer, as a store
// into a freshly allocated frame (sub rsp; mov [rsp+x]) does.
__attribute__((noinline)) int frame_forever(int n) {
    volatile char buf[8192];
    buf[64] = char(n);
    buf[8000] = char(n);
    if (stack_test::g_never) return n;
    return frame_forever(n + 1) + buf[64];
}

// In a child: RLIMIT_STACK of 8 MiB (the kernel refuses to grow past it, so the overflow comes
// soon whatever the shell's limit), thread stacks watched, `overflow` run `rounds` times on the
// main thread, each caught and checked.
void child_main_thread_overflows(void (*overflow)(), int rounds) {
    rlimit rl{};
    getrlimit(RLIMIT_STACK, &rl);
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, 8ull << 20);
    CHILD_CHECK(setrlimit(RLIMIT_STACK, &rl) == 0);
    usermm::watch_thread_stacks();
    usermm::watch_thread_stacks();  // idempotent
    usermm::on_stack_overflow(&stack_test::record_and_leave);
    const std::uintptr_t sp = stack_test::current_sp();
    for (int round = 0; round < rounds; ++round) {
        sigjmp_buf env;
        stack_test::t_leave_to = &env;
        if (sigsetjmp(env, 1) == 0) {
            overflow();
            CHILD_CHECK(false);
        }
        const StackOverflow& o = g_overflow.seen;
        CHILD_CHECK(g_overflow.calls == round + 1);
        CHILD_CHECK(o.where == StackOverflow::Where::MainThread);
        CHILD_CHECK(o.name() == "main thread");
        CHILD_CHECK(o.id == 0);
        CHILD_CHECK(addr(o.high) > sp);
        CHILD_CHECK(addr(o.address) < sp && addr(o.address) < addr(o.high));
        CHILD_CHECK(addr(o.sp) < sp);
        // The kernel stopped the stack at RLIMIT_STACK: the fault is within a few pages of the
        // limit below the stack's top.
        CHILD_CHECK(addr(o.high) - addr(o.address) >= rl.rlim_cur - 4 * page());
        CHILD_CHECK(addr(o.high) - addr(o.address) <= rl.rlim_cur + 4 * page());
        CHILD_CHECK(g_overflow.on_alt_stack);
    }
}
}  // namespace

TEST_CASE("an overflow of the main thread's stack (by a call) is caught after watch_thread_stacks, twice" *
          doctest::skip(kSkipThreadStacks)) {
    const usermm_test::ChildEnd end =
        usermm_test::run_guarded([] { child_main_thread_overflows([] { push_forever(0); }, 2); }, 60);
    usermm_test::check_survived(end);
}

// The usual way code overflows: a frame allocated first (sub rsp), then a store into it, above the
// stack pointer.
TEST_CASE("an overflow of the main thread's stack by a store into a new frame is caught" *
          doctest::skip(kSkipThreadStacks)) {
    const usermm_test::ChildEnd end =
        usermm_test::run_guarded([] { child_main_thread_overflows([] { frame_forever(0); }, 2); }, 60);
    usermm_test::check_survived(end);
}

TEST_CASE("an overflow of the main thread's stack by any recursion is caught" * doctest::skip(kSkipThreadStacks)) {
    const usermm_test::ChildEnd end =
        usermm_test::run_guarded([] { child_main_thread_overflows([] { forever(0); }, 2); }, 60);
    usermm_test::check_survived(end);
}

namespace {
struct ThreadResult {
    int caught = 0;
    bool fields_ok = true;
    std::uintptr_t low = 0, high = 0, guard = 0;
    char what[200] = {};
};

void* overflow_thread(void* p) {
    auto* r = static_cast<ThreadResult*>(p);
    pthread_attr_t attr;
    pthread_getattr_np(pthread_self(), &attr);
    void* stackaddr = nullptr;
    std::size_t stacksize = 0, guardsize = 0;
    pthread_attr_getstack(&attr, &stackaddr, &stacksize);
    pthread_attr_getguardsize(&attr, &guardsize);
    pthread_attr_destroy(&attr);
    r->low = addr(stackaddr);
    r->high = addr(stackaddr) + stacksize;
    r->guard = guardsize;
    for (int round = 0; round < 2; ++round) {
        sigjmp_buf env;
        stack_test::t_leave_to = &env;
        if (sigsetjmp(env, 1) == 0) {
            forever(0);
            return nullptr;
        }
        const StackOverflow& o = g_overflow.seen;
        auto fail = [&](const char* why) {
            r->fields_ok = false;
            std::snprintf(r->what, sizeof r->what, "%s (address %p sp %p low %p high %p)", why, o.address, o.sp,
                          o.low, o.high);
        };
        if (o.where != StackOverflow::Where::Thread) fail("where");
        if (o.name() != "thread") fail("name");
        if (addr(o.address) >= r->low || addr(o.address) < r->low - r->guard) fail("address not in the guard");
        if (addr(o.sp) < r->low - r->guard || addr(o.sp) >= r->high) fail("sp");
        if (addr(o.low) != r->low || addr(o.high) < r->high) fail("bounds");
        if (!g_overflow.on_alt_stack) fail("not on the alternate stack");
        ++r->caught;
    }
    return nullptr;
}
}  // namespace

TEST_CASE("an overflow of a pthread's stack is caught after watch_thread_stacks, twice") {
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [] {
            usermm::watch_thread_stacks();
            usermm::on_stack_overflow(&stack_test::record_and_leave);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstacksize(&attr, 1ull << 20);
            ThreadResult r;
            pthread_t t;
            CHILD_CHECK(pthread_create(&t, &attr, overflow_thread, &r) == 0);
            CHILD_CHECK(pthread_join(t, nullptr) == 0);
            pthread_attr_destroy(&attr);
            if (!r.fields_ok) std::fprintf(stderr, "thread: %s\n", r.what);
            CHILD_CHECK(r.fields_ok);
            CHILD_CHECK(r.caught == 2);
            // And a std::thread (created through libstdc++, which calls pthread_create too).
            ThreadResult r2;
            {
                pthread_t t2;
                CHILD_CHECK(pthread_create(&t2, nullptr, overflow_thread, &r2) == 0);
                CHILD_CHECK(pthread_join(t2, nullptr) == 0);
            }
            CHILD_CHECK(r2.fields_ok);
            CHILD_CHECK(r2.caught == 2);
        },
        60);
    usermm_test::check_survived(end);
}

// --- 5. classification ------------------------------------------------------------------------------

namespace {
// An address in the page at 0, through a volatile so that the compiler neither drops the store nor
// turns it into a trap (UBSan would report a store to nullptr itself; libsigsegv's test stores to
// NULL, which is the same page).
std::uint32_t* volatile g_null_page = reinterpret_cast<std::uint32_t*>(std::uintptr_t(64));

void count_and_exit(const StackOverflow&) { _exit(42); }

// A child with the overflow handler installed (which exits 42) that runs `bad`.
usermm_test::ChildEnd classify(const std::function<void(Arena&)>& bad) {
    return usermm_test::run_in_child(
        [&] {
            usermm::on_stack_overflow(&count_and_exit);
            usermm::watch_thread_stacks();
            Arena arena(256ull << 20);
            bad(arena);
            _exit(0);
        },
        30);
}
}  // namespace

TEST_CASE("a NULL store, a write to a Read VMA and a wild write into a stack's guard are not overflows") {
    SUBCASE("a NULL store on the main stack") {
        const auto end = classify([](Arena&) { *g_null_page = 1; });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
    }
    SUBCASE("a NULL store on a usermm stack") {
        const auto end = classify([](Arena& arena) {
            Stack s = arena.map_stack(256 * KiB, {.name = "nullstore"});
            Fiber f(s, [] { *g_null_page = 1; });
            f.run();
        });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
    }
    SUBCASE("a write to a Read VMA, from a usermm stack") {
        const auto end = classify([](Arena& arena) {
            char* ro = static_cast<char*>(arena.map(4 * page(), Prot::Read, {.name = "readonly"}));
            CHILD_CHECK(usermm_test::read_byte(ro) == 0);
            Stack s = arena.map_stack(256 * KiB, {.name = "writer"});
            Fiber f(s, [ro] { usermm_test::write_byte(ro + 100, 1); });
            f.run();
        });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
        CHECK(end.err.find("readonly") != std::string::npos);
    }
    SUBCASE("a write into another stack's guard, from the main stack") {
        const auto end = classify([](Arena& arena) {
            Stack victim = arena.map_stack(256 * KiB, {.name = "victim"});
            usermm_test::write_byte(static_cast<char*>(victim.bottom()) - 100, 1);
        });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
        CHECK(end.err.find("victim") != std::string::npos);
    }
    SUBCASE("a write into another stack's guard, from a usermm stack") {
        const auto end = classify([](Arena& arena) {
            Stack victim = arena.map_stack(256 * KiB, {.name = "victim"});
            Stack runner = arena.map_stack(256 * KiB, {.name = "runner"});
            char* target = static_cast<char*>(victim.bottom()) - 100;
            Fiber f(runner, [target] { usermm_test::write_byte(target, 1); });
            f.run();
        });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
    }
    SUBCASE("a write far below a stack's committed part, by a thread not on it") {
        const auto end = classify([](Arena& arena) {
            Stack victim = arena.map_stack(1ull << 20, {.name = "victim"});
            usermm_test::write_byte(static_cast<char*>(victim.bottom()) + page(), 1);
        });
        INFO(end.err);
        CHECK(end.signal == SIGSEGV);
    }
    SUBCASE("control: an overflow in the same child goes to the handler") {
        const auto end = classify([](Arena& arena) {
            Stack s = arena.map_stack(256 * KiB, {.name = "control"});
            Fiber f(s, [] { forever(0); });
            f.run();
        });
        INFO(end.err);
        CHECK(end.exited);
        CHECK(end.exit_code == 42);
    }
}

// --- 6. no handler ------------------------------------------------------------------------------------

namespace {
// A child whose fiber on stack `name` recurses without end, with `handler` installed (or none).
usermm_test::ChildEnd overflow_in_child(const char* name, usermm::StackOverflowHandler handler) {
    return usermm_test::run_in_child(
        [name, handler] {
            if (handler) usermm::on_stack_overflow(handler);
            Arena arena(256ull << 20);
            Stack s = arena.map_stack(256 * KiB, {.name = name});
            Fiber f(s, [] { forever(0); });
            f.run();
            _exit(0);
        },
        30);
}
}  // namespace

TEST_CASE("without a handler, an overflow writes one line naming the stack and dies by SIGSEGV") {
    const usermm_test::ChildEnd end = overflow_in_child("noisy-fiber", nullptr);
    INFO(end.err);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("stack overflow") != std::string::npos);
    CHECK(end.err.find("noisy-fiber") != std::string::npos);
    std::size_t lines = 0;
    for (std::size_t at = 0; (at = end.err.find("stack overflow", at)) != std::string::npos; ++at) ++lines;
    CHECK(lines == 1);
    // The line is one line: it ends with a newline, and nothing of it is on a second.
    const std::size_t from = end.err.rfind('\n', end.err.find("stack overflow"));
    const std::size_t to = end.err.find('\n', end.err.find("stack overflow"));
    CHECK(to != std::string::npos);
    CHECK(end.err.substr(from == std::string::npos ? 0 : from + 1, to).find("noisy-fiber") != std::string::npos);
}

TEST_CASE("a handler that returns leaves the overflow to the default: one line and SIGSEGV") {
    const usermm_test::ChildEnd end = overflow_in_child("returning", [](const StackOverflow&) {});
    INFO(end.err);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("returning") != std::string::npos);
}

// --- 7. overflow in a signal handler ---------------------------------------------------------------

namespace {
void recurse_in_handler(int) { forever(0); }
}  // namespace

TEST_CASE("an overflow inside a signal handler running on the overflowing stack is caught" * doctest::skip(kTsan)) {
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [] {
            struct sigaction sa {};
            sa.sa_handler = recurse_in_handler;  // no SA_ONSTACK: it runs on the interrupted stack
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGUSR1, &sa, nullptr) == 0);
            usermm::on_stack_overflow(&stack_test::record_and_leave);
            Arena arena(256ull << 20);
            Stack s = arena.map_stack(512 * KiB, {.name = "signalled"});
            for (int round = 0; round < 2; ++round) {
                sigjmp_buf env;
                stack_test::t_leave_to = &env;
                Fiber f(s, [] { raise(SIGUSR1); });
                stack_test::t_fiber = &f;
                if (sigsetjmp(env, 1) == 0) {
                    f.resume();
                    CHILD_CHECK(false);
                }
                stack_test::t_fiber = nullptr;
                CHILD_CHECK(g_overflow.calls == round + 1);
                child_check_stack_report(s, 64 * KiB, "signalled");
                // SIGUSR1 is unblocked again (sigsetjmp saved the mask): the next round needs it.
                sigset_t now;
                pthread_sigmask(SIG_SETMASK, nullptr, &now);
                CHILD_CHECK(!sigismember(&now, SIGUSR1));
            }
        },
        60);
    usermm_test::check_survived(end);
}

// --- 8. system calls into the stack ----------------------------------------------------------------

namespace {
__attribute__((noinline)) ssize_t read_into_local_16k(int fd, bool* ok) {
    char buf[16 * 1024];
    const ssize_t n = pread(fd, buf, sizeof buf, 0);
    *ok = n == ssize_t(sizeof buf) && matches_pattern(buf, sizeof buf);
    return n < 0 ? -errno : n;
}
__attribute__((noinline)) ssize_t read_into_local_200k(int fd, bool* ok) {
    char buf[200 * 1024];
    const ssize_t n = pread(fd, buf, sizeof buf, 0);
    *ok = n == ssize_t(sizeof buf) && matches_pattern(buf, sizeof buf);
    return n < 0 ? -errno : n;
}
}  // namespace

TEST_CASE("read(2) into a 16 KiB local buffer on a fresh stack works; ensure() covers a 200 KiB one") {
    Arena arena(256ull << 20);
    const int fd = pattern_file(200 * KiB);
    Stack s = arena.map_stack(1ull << 20, {.name = "reader"});
    ssize_t small = 0, below = 0, after = 0, big = 0;
    bool small_ok = false, big_ok = false;
    std::size_t committed_fresh = 0, committed_ensured = 0;
    std::vector<char> copy(4096);
    Fiber f(s, [&] {
        committed_fresh = s.committed();
        small = read_into_local_16k(fd, &small_ok);
        // 200 KiB below the stack pointer is past the headroom: the kernel cannot grow a usermm
        // stack, so a system call there sees EFAULT (README) until ensure() commits it.
        char* deep = reinterpret_cast<char*>((stack_test::current_sp() - 200 * KiB) & ~std::uintptr_t(4095));
        below = pread(fd, deep, 4096, 0);
        if (below < 0) below = -errno;
        s.ensure(256 * KiB);
        committed_ensured = s.committed();
        after = pread(fd, deep, 4096, 0);
        if (after < 0) after = -errno;
        big = read_into_local_200k(fd, &big_ok);
    });
    f.run();
    close(fd);
    CHECK(committed_fresh == 64 * KiB);
    CHECK(small == ssize_t(16 * KiB));
    CHECK(small_ok);
    CHECK(below == -EFAULT);
    CHECK(committed_ensured >= 256 * KiB);
    CHECK(after == 4096);
    CHECK(big == ssize_t(200 * KiB));
    CHECK(big_ok);
    arena.verify();

    // ensure() from a thread not on the stack commits below top(); too much is ENOMEM.
    Stack t = arena.map_stack(1ull << 20, {.name = "ensured"});
    t.ensure(512 * KiB);
    CHECK(t.committed() >= 512 * KiB);
    CHECK(t.peak() == 0);  // committed is not touched
    try {
        t.ensure(2ull << 20);
        CHECK_MESSAGE(false, "ensure past the bottom did not throw");
    } catch (const usermm::Error& e) {
        CHECK(e.code().value() == ENOMEM);
    }
    arena.verify();
}

// --- 9. fork ----------------------------------------------------------------------------------------

TEST_CASE("fork with live stacks: the child runs on and grows an inherited stack, and guards still fault") {
    Arena arena(256ull << 20);
    Stack s = arena.map_stack(1ull << 20, {.name = "inherited"});
    Stack fresh = arena.map_stack(512 * KiB, {.name = "inherited-fresh"});
    struct Deep {
        Fiber* f;
        std::size_t second = 0;
    } deep{nullptr};
    Fiber f(s, [&] {
        dive(addr(s.top()) - 200 * KiB, [](void* p) { static_cast<Deep*>(p)->f->yield(); }, &deep);
        dive(addr(s.top()) - 700 * KiB, [](void* p) { static_cast<Deep*>(p)->f->yield(); }, &deep);
    });
    deep.f = &f;
    f.resume();  // suspended 200 KiB down
    const std::size_t committed = s.committed();
    REQUIRE(committed >= 200 * KiB);
    REQUIRE(committed < 700 * KiB);

    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            const std::uint64_t faults = arena.stats().stack_growth_faults;
            f.resume();  // the child's copy of the fiber goes on, 700 KiB down
            CHILD_CHECK(!f.done());
            CHILD_CHECK(s.committed() >= 700 * KiB);
            CHILD_CHECK(s.peak() >= 700 * KiB);
            CHILD_CHECK(arena.stats().stack_growth_faults > faults);
            f.resume();
            CHILD_CHECK(f.done());
            arena.verify();
            usermm::on_stack_overflow(&stack_test::record_and_leave);
            CHILD_CHECK(overflow_on(fresh));
            child_check_stack_report(fresh, 64 * KiB, "inherited-fresh");
            CHILD_CHECK(overflow_on(s));
            child_check_stack_report(s, 64 * KiB, "inherited");
        },
        60);
    usermm_test::check_survived(end);
    // The parent's stack is as it was, and its fiber goes on.
    CHECK(s.committed() == committed);
    f.resume();
    CHECK(s.committed() >= 700 * KiB);
    f.resume();
    CHECK(f.done());
    arena.verify();
}

// --- 10. errors -----------------------------------------------------------------------------------------

namespace {
int error_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const usermm::Error& e) {
        return e.code().value();
    }
    return 0;
}
}  // namespace

TEST_CASE("protect, advise and unmap refuse a stack's range; map_stack refuses bad sizes") {
    Arena arena(64ull << 20);
    Stack s = arena.map_stack(256 * KiB, {.name = "owned"});
    char* const low = static_cast<char*>(s.bottom());
    CHECK(error_of([&] { arena.protect(low, s.size(), Prot::Read); }) == EINVAL);
    CHECK(error_of([&] { arena.protect(static_cast<char*>(s.top()) - page(), page(), Prot::None); }) == EINVAL);
    CHECK(error_of([&] { arena.advise(low, s.size(), usermm::Advice::DontNeed); }) == EINVAL);
    CHECK(error_of([&] { arena.unmap(low, s.size()); }) == EINVAL);
    CHECK(error_of([&] { arena.unmap(low - 64 * KiB, s.size() + 64 * KiB); }) == EINVAL);
    // A range that starts in a neighbouring VMA and reaches into the stack.
    void* before = arena.map(4 * page(), Prot::ReadWrite);
    if (addr(before) + 4 * page() == addr(low) - 64 * KiB)
        CHECK(error_of([&] { arena.protect(before, 4 * page() + 64 * KiB + page(), Prot::Read); }) == EINVAL);
    // The stack still is what it was.
    CHECK(s.committed() == 64 * KiB);
    arena.verify();

    CHECK(error_of([&] { arena.map_stack(0); }) == EINVAL);
    CHECK(error_of([&] { arena.map_stack(arena.size()); }) == ENOMEM);  // no room for its guard
    CHECK(error_of([&] { arena.map_stack(arena.size() + page()); }) == ENOMEM);
    CHECK(error_of([&] { arena.map_stack(std::size_t(-1)); }) != 0);
    CHECK(error_of([&] { arena.map_stack(page(), {.guard = arena.size()}); }) == ENOMEM);
    CHECK(error_of([&] { arena.map_stack(page(), {.guard_mode = usermm::GuardMode(7)}); }) == EINVAL);
    CHECK(error_of([&] { StackPool pool(arena, {.max_size = 0}); }) == EINVAL);
    // A moved-from or empty Stack refuses everything.
    Stack moved = std::move(s);
    CHECK(!s);
    CHECK(bool(moved));
    CHECK(error_of([&] { (void)s.top(); }) == EINVAL);
    CHECK(error_of([&] { (void)s.committed(); }) == EINVAL);
    CHECK(error_of([&] { s.ensure(page()); }) == EINVAL);
    moved = Stack{};  // a stack must not outlive its arena's core, which moves on below
    Arena gone = std::move(arena);
    CHECK(error_of([&] { arena.map_stack(page()); }) == EINVAL);
    gone.verify();
}

// --- 11. snapshots ------------------------------------------------------------------------------------

TEST_CASE("a snapshot of an arena with a stack reads the stack's old content while the fiber writes and grows") {
    Arena arena(256ull << 20);
    Stack s = arena.map_stack(1ull << 20, {.name = "snapped"});
    struct State {
        Fiber* f = nullptr;
        char* shallow = nullptr;  // a local array near the top
        char* deep = nullptr;     // one 400 KiB down, in pages grown after the snapshot
        char tag = 'a';
    } st;
    Fiber f(s, [&] {
        char local[8192];
        std::memset(local, st.tag, sizeof local);
        st.shallow = local;
        st.f->yield();  // the snapshot is taken now
        std::memset(local, 'b', sizeof local);
        dive(addr(s.top()) - 400 * KiB,
             [](void* p) {
                 auto* state = static_cast<State*>(p);
                 char deep[4096];
                 std::memset(deep, 'c', sizeof deep);
                 state->deep = deep;
                 state->f->yield();
                 usermm_test::write_byte(deep, deep[1]);
             },
             &st);
        usermm_test::write_byte(local, local[1]);
    });
    st.f = &f;
    f.resume();
    REQUIRE(st.shallow);
    const std::size_t committed = s.committed();
    usermm::Snapshot snap = arena.snapshot();
    usermm::Snapshot ranged = arena.snapshot(static_cast<char*>(s.bottom()) - 64 * KiB, s.size() + 64 * KiB);
    f.resume();
    REQUIRE(st.deep);
    CHECK(s.committed() > committed);
    std::vector<char> old(8192), now(8192);
    snap.read(st.shallow, old.data(), old.size());
    CHECK(std::all_of(old.begin(), old.end(), [](char c) { return c == 'a'; }));
    ranged.read(st.shallow, old.data(), old.size());
    CHECK(std::all_of(old.begin(), old.end(), [](char c) { return c == 'a'; }));
    std::memcpy(now.data(), st.shallow, now.size());
    CHECK(std::all_of(now.begin(), now.end(), [](char c) { return c == 'b'; }));
    // The deep page was a guard when the snapshot was taken: it reads as zeros there.
    std::vector<char> deep_old(4096);
    snap.read(st.deep, deep_old.data(), deep_old.size());
    CHECK(std::all_of(deep_old.begin(), deep_old.end(), [](char c) { return c == 0; }));
    CHECK(std::equal(st.deep, st.deep + 4096, std::vector<char>(4096, 'c').begin()));
    CHECK(snap.stats().cow_faults > 0);
    arena.verify();
    f.resume();
    CHECK(f.done());
    arena.verify();
}

// --- 12. usermm calls made on a usermm stack ------------------------------------------------------

// A fiber's own stack is never write-protected: a snapshot taken from the fiber copies its
// committed pages at once, and the fiber goes on writing them (under the snapshot's write lock too).
TEST_CASE("a fiber takes a snapshot of its own arena, and the snapshot holds its stack as it was") {
    Arena arena(1ull << 30);
    Stack s = arena.map_stack(1 << 20, {.name = "snapshotter"});
    void* heap = arena.map(64 * KiB, Prot::ReadWrite);
    std::memset(heap, 'h', 64 * KiB);
    char* local = nullptr;
    std::optional<usermm::Snapshot> snap;
    Fiber f(s, [&] {
        char buf[8192];
        std::memset(buf, 'x', sizeof buf);
        local = buf;
        snap.emplace(arena.snapshot());
        std::memset(buf, 'y', sizeof buf);  // after the snapshot: the snapshot keeps 'x'
        void* more = arena.map(64 * KiB, Prot::ReadWrite);
        usermm_test::write_byte(more, 1);
        arena.unmap(more, 64 * KiB);
        usermm::Snapshot second = arena.snapshot();  // and again, with the first live
        buf[0] = 'z';
        f.yield();
    });
    f.resume();
    REQUIRE(snap);
    std::vector<char> old(8192);
    snap->read(local, old.data(), old.size());
    CHECK(std::all_of(old.begin(), old.end(), [](char c) { return c == 'x'; }));
    CHECK(local[0] == 'z');
    CHECK(local[1] == 'y');
    arena.verify();
    f.run();
}

// A stack page is not write-tracked, so collect_dirty reports it at every collection that finds it
// in memory: nothing written is missed.
TEST_CASE("collect_dirty reports a stack's pages written after the collection") {
    Arena arena(1ull << 30);
    Stack s = arena.map_stack(256 * KiB);
    char* page_top = static_cast<char*>(s.top()) - page();
    page_top[0] = 1;
    (void)arena.collect_dirty(s.bottom(), s.size());
    page_top[0] = 2;
    const usermm::DirtySet dirty = arena.collect_dirty(s.bottom(), s.size());
    CHECK(dirty.contains(page_top));
    arena.verify();
}

// A usermm call on a fiber commits what it may need below the stack pointer first, stopping at
// the stack's floor: on a small stack, and on a stack with a tiny headroom calling another arena.
TEST_CASE("usermm calls from a fiber on a 16 KiB stack, and on a stack of another arena, do not fault under a lock") {
    Arena arena(1ull << 30), other(1ull << 30);
    Stack small = arena.map_stack(16 * KiB, {.name = "small"});
    Fiber f(small, [&] {
        const usermm::Stats st = arena.stats();
        CHECK(st.version == usermm::kStatsVersion);
        void* p = arena.map(page(), Prot::ReadWrite);
        arena.unmap(p, page());
    });
    f.run();
    Stack tight = arena.map_stack(1 << 20, {.name = "tight", .headroom = 4 * KiB});
    Fiber g(tight, [&] {
        // Down to where the committed part ends, then into the other arena's calls.
        dive(addr(tight.top()) - 200 * KiB, [](void* o) {
            auto& other_arena = *static_cast<Arena*>(o);
            void* p = other_arena.map(page(), Prot::ReadWrite);
            other_arena.protect(p, page(), Prot::Read);
            other_arena.unmap(p, page());
            other_arena.verify();
        }, &other);
    });
    g.run();
    arena.verify();
}

TEST_CASE("map_stack refuses an arena with a store (ENOTSUP): its reclaimer would evict pages a thread runs on") {
    char dir[] = "/tmp/usermm-stack-store-XXXXXX";
    REQUIRE(mkdtemp(dir));
    const std::string path = std::string(dir) + "/swap";
    {
        usermm::SwapFile store(path, 64ull << 20);
        Arena arena(1ull << 30, {.resident_limit = 16ull << 20, .store = &store});
        try {
            (void)arena.map_stack(1 << 20);
            FAIL("map_stack in an arena with a store did not throw");
        } catch (const usermm::Error& e) {
            CHECK(e.code().value() == ENOTSUP);
            CHECK(std::string(e.what()).find("usermm::Arena::map_stack") != std::string::npos);
        }
    }
    unlink(path.c_str());
    rmdir(dir);
}

// The overflow handler runs on the alternate signal stack: one that overflows that stack is an
// emergency, one line and death, never a loop.
TEST_CASE("an overflow handler that overflows the alternate signal stack dies with one line" *
          doctest::skip(kTsan)) {
    const usermm_test::ChildEnd end = usermm_test::run_in_child([] {
        // The promise is for usermm's own alternate stack, the one with a guard below it. A thread
        // that has a large enough one keeps it (ASan's runtime gives every thread 4 x SIGSTKSZ,
        // 191 KiB on a CPU with AVX-512 state), and the recursion would run off its end unseen;
        // on_stack_overflow gives the thread usermm's, or puts back the one an earlier case gave.
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        REQUIRE(sigaltstack(&off, nullptr) == 0);
        Arena arena(1ull << 30);
        usermm::on_stack_overflow([](const StackOverflow&) { forever(0); });
        Stack s = arena.map_stack(256 * KiB, {.name = "doomed"});
        Fiber f(s, [] { forever(0); });
        f.resume();
        _exit(3);  // never: the process dies in the handler
    }, 60);
    INFO("the child's stderr: ", end.err);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("alternate signal stack overflowed") != std::string::npos);
    CHECK(std::count(end.err.begin(), end.err.end(), '\n') == 1);
}

TEST_CASE("install_signal_stack puts usermm's stack back after the program disabled it") {
    usermm::install_signal_stack();
    stack_t off{};
    off.ss_flags = SS_DISABLE;
    REQUIRE(sigaltstack(&off, nullptr) == 0);
    usermm::install_signal_stack();
    stack_t cur{};
    REQUIRE(sigaltstack(nullptr, &cur) == 0);
    CHECK((cur.ss_flags & SS_DISABLE) == 0);
    CHECK(cur.ss_size >= usermm::signal_stack_size());
    usermm::install_signal_stack();  // the same stack again, not a second one
    stack_t again{};
    REQUIRE(sigaltstack(nullptr, &again) == 0);
    CHECK(again.ss_sp == cur.ss_sp);
}

// --- 13. second review's cases ----------------------------------------------------------------------

// A stack made inside a live snapshot's range: the snapshot reads its pages as zeros, whatever the
// stack writes later (its pages are never write-tracked).
TEST_CASE("a snapshot taken before a stack is made reads the stack's pages as zeros") {
    Arena arena(64ull << 20);
    usermm::Snapshot snap = arena.snapshot();
    Stack s = arena.map_stack(1 << 20);
    char* top_page = static_cast<char*>(s.top()) - page();
    std::memset(top_page, 0xab, page());
    unsigned char seen[16] = {};
    snap.read(top_page, seen, sizeof seen);
    CHECK(seen[0] == 0);
    usermm::Snapshot second = arena.snapshot();
    std::memset(top_page, 0xcd, page());
    snap.read(top_page, seen, sizeof seen);
    CHECK(seen[0] == 0);
    second.read(top_page, seen, sizeof seen);
    CHECK(seen[0] == 0xab);
    arena.verify();
}

namespace {
struct ForkAt {
    Stack* stack;
    std::size_t above;  // bytes between the stack pointer and the committed part's end at fork()
    int status = -1;
    Fiber* fiber = nullptr;
};
}  // namespace

// fork() from a fiber whose stack pointer is just above the committed part: usermm's fork handlers
// hold every lock, and commit below the stack pointer before they take them.
TEST_CASE("fork from a fiber with little committed below its stack pointer: the child lives") {
    Arena arena(256ull << 20);
    for (std::size_t above = 0; above < 12 * KiB; above += 768) {
        Stack s = arena.map_stack(1 << 20, {.headroom = 4 * KiB});
        ForkAt at{&s, above};
        Fiber f(s, [&at] {
            const std::uintptr_t sp = stack_test::current_sp();
            const std::uintptr_t low = addr(at.stack->top()) - at.stack->committed();
            // Down to `above` over the committed part's end, with nothing below it touched.
            if (sp - low > at.above + 1024) {
                volatile char* p = static_cast<volatile char*>(alloca(sp - low - at.above - 512));
                p[0] = 1;
            }
            const pid_t pid = fork();
            if (pid == 0) _exit(0);
            waitpid(pid, &at.status, 0);
        });
        f.run();
        INFO("above " << above);
        CHECK((WIFEXITED(at.status) && WEXITSTATUS(at.status) == 0));
    }
}

// A pooled stack's shrink empties pages below those it keeps: collect_dirty reports them changed.
TEST_CASE("collect_dirty reports the pages a pool's shrink emptied") {
    Arena arena(64ull << 20);
    StackPool pool(arena, {.max_size = 1 << 20, .keep_resident_pages = 2});
    (void)arena.collect_dirty(arena.base(), arena.size());
    char* emptied = nullptr;
    {
        Stack s = pool.acquire();
        char* top = static_cast<char*>(s.top());
        emptied = top - 8 * page();  // in the headroom, below the kept pages
        std::memset(emptied, 0xab, page());
        CHECK(arena.collect_dirty(arena.base(), arena.size()).contains(emptied));
        usermm_test::write_byte(top - s.committed() - page(), 1);  // a growth: shrunk at once when given back
    }
    CHECK(arena.collect_dirty(arena.base(), arena.size()).contains(emptied));
    arena.verify();
}
