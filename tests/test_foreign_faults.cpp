// Faults and signals that are not usermm's to resolve, each in a forked child: they must end the
// way they would without usermm, by the handler the program installed before usermm's, or by the
// default action of SIGSEGV with a one-line "usermm:" diagnostic.
//
// The test process itself never creates an arena and never calls usermm::page_size() (both install
// usermm's handler in the calling process). Every child therefore starts with SIGSEGV at SIG_DFL
// and can install "the program's own" handler before its first arena, in any test order.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <functional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm_test::ChildEnd;
using usermm_test::read_byte;
using usermm_test::run_in_child;
using usermm_test::write_byte;

// Long enough for any child here, short enough that a hang (SIGALRM) keeps the file fast.
constexpr unsigned kChildSeconds = 5;
constexpr std::size_t kArenaSize = 16ull << 20;

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The page size without usermm::page_size(), which would install usermm's handler in the test process.
std::size_t page() { return usermm_test::os_page_size(); }

// Read through a volatile, so the compiler cannot see that it is null.
char* volatile g_null = nullptr;

// A load the hardware must perform, even from NULL: UBSan would otherwise end the program before
// the fault these tests are about.
__attribute__((no_sanitize("null"))) void read_at(char* p) { (void)*static_cast<volatile char*>(p); }

// Children that are meant to die neither write core files nor spend time on them.
void no_core_dump() {
    const rlimit none{0, 0};
    setrlimit(RLIMIT_CORE, &none);
}

bool sigsegv_is_default() {
    struct sigaction current {};
    sigaction(SIGSEGV, nullptr, &current);
    return !(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_DFL;
}

std::string hex(std::uintptr_t v) {
    char buf[2 + 2 * sizeof v + 1];
    std::snprintf(buf, sizeof buf, "%#jx", std::uintmax_t(v));
    return v ? buf : "0x0";
}

// True when `line` names `v` in hex as a whole number, not as the prefix of a longer one.
bool names_address(std::string_view line, std::uintptr_t v) {
    const std::string h = hex(v);
    for (std::size_t at = line.find(h); at != std::string_view::npos; at = line.find(h, at + 1)) {
        const std::size_t after = at + h.size();
        if (after == line.size() || !std::isxdigit(static_cast<unsigned char>(line[after]))) return true;
    }
    return false;
}

std::vector<std::string> usermm_lines(const std::string& err) {
    std::vector<std::string> out;
    std::istringstream in(err);
    for (std::string line; std::getline(in, line);)
        if (line.starts_with("usermm:")) out.push_back(line);
    return out;
}

// The child died of SIGSEGV (not of SIGALRM, a hang) after exactly one usermm diagnostic that names
// `fault_addr` and says `why`.
void check_died_of_fault(const ChildEnd& end, std::uintptr_t fault_addr, std::string_view why) {
    INFO("child stderr: " << end.err);
    CHECK_FALSE(end.exited);
    CHECK(end.signal == SIGSEGV);
    const std::vector<std::string> lines = usermm_lines(end.err);
    REQUIRE(lines.size() == 1);
    INFO("diagnostic: " << lines[0]);
    CHECK(names_address(lines[0], fault_addr));
    CHECK(lines[0].find(why) != std::string::npos);
}

// A word the child writes and the parent reads once the child is gone (a fault address, a pid).
struct SharedWord {
    std::uintptr_t* word = static_cast<std::uintptr_t*>(
        mmap(nullptr, sizeof(std::uintptr_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    SharedWord() { REQUIRE(word != MAP_FAILED); }
    ~SharedWord() { munmap(word, sizeof *word); }
    SharedWord(const SharedWord&) = delete;
    SharedWord& operator=(const SharedWord&) = delete;
};

// --- the program's own handlers, installed before usermm's --------------------------------------

sigjmp_buf g_escape;
std::atomic<int> g_old_calls{0};
std::atomic<int> g_old_signal{0};
std::atomic<std::uintptr_t> g_old_addr{1};  // 1 until a handler records one: 0 is the NULL fault's

void old_siginfo_handler(int sig, siginfo_t* info, void*) {
    g_old_signal.store(sig);
    g_old_addr.store(addr(info->si_addr));
    g_old_calls.fetch_add(1);
    siglongjmp(g_escape, 1);
}

void old_plain_handler(int sig) {
    g_old_signal.store(sig);
    g_old_calls.fetch_add(1);
    siglongjmp(g_escape, 1);
}

std::atomic<int> g_usr1_blocked{-1};

void old_mask_probing_handler(int) {
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, nullptr, &now);
    g_usr1_blocked.store(sigismember(&now, SIGUSR1));
    siglongjmp(g_escape, 1);
}

char* volatile g_untouched_arena_page = nullptr;

// A handler that itself touches arena memory no one has touched yet, as a crash reporter writing
// into an arena-backed buffer would.
void old_arena_touching_handler(int) {
    write_byte(g_untouched_arena_page, 0x77);
    g_old_calls.fetch_add(1);
    siglongjmp(g_escape, 1);
}

// Touches `p` in a way that must reach the program's handler, which escapes back here; false if the
// access completed instead.
bool escapes_to_old_handler(void (*access)(char*), char* p) {
    // savemask = 1: the handler ran with SIGSEGV blocked, and the arena faults after this one need it open.
    if (sigsetjmp(g_escape, 1) == 0) {
        access(p);
        return false;
    }
    return true;
}

void write_at(char* p) { write_byte(p, 1); }

// The body shared by the SA_SIGINFO and the plain previous handler: foreign faults and access
// errors in an arena go to the program's handler, resolvable arena faults never do.
void check_previous_handler_gets_what_usermm_does_not_resolve(bool siginfo) {
    const std::size_t ps = page();
    Arena arena(kArenaSize);
    char* rw = static_cast<char*>(arena.map(8 * ps, Prot::ReadWrite, {.name = "rw", .fault_around_pages = 1}));
    char* ro = static_cast<char*>(arena.map(ps, Prot::Read, {.name = "ro"}));

    for (std::size_t i = 0; i < 4; ++i) write_byte(rw + i * ps, std::uint8_t(i + 1));
    CHILD_CHECK(arena.stats().minor_faults == 4);
    CHILD_CHECK(g_old_calls.load() == 0);

    CHILD_CHECK(escapes_to_old_handler(read_at, g_null));
    CHILD_CHECK(g_old_calls.load() == 1);
    CHILD_CHECK(g_old_signal.load() == SIGSEGV);
    if (siginfo) CHILD_CHECK(g_old_addr.load() == 0);

    // Without usermm the kernel would have delivered this one to the program's handler too.
    CHILD_CHECK(escapes_to_old_handler(write_at, ro + 9));
    CHILD_CHECK(g_old_calls.load() == 2);
    if (siginfo) CHILD_CHECK(g_old_addr.load() == addr(ro + 9));

    for (std::size_t i = 4; i < 8; ++i) write_byte(rw + i * ps, std::uint8_t(i + 1));
    CHILD_CHECK(read_byte(ro) == 0);
    for (std::size_t i = 0; i < 8; ++i) CHILD_CHECK(read_byte(rw + i * ps) == i + 1);
    CHILD_CHECK(g_old_calls.load() == 2);
    CHILD_CHECK(arena.stats().minor_faults == 9);
    CHILD_CHECK(arena.stats().access_errors == 1);
    CHILD_CHECK(usermm::process_stats().foreign_faults == 1);
}

void check_survived_quietly(const ChildEnd& end) {
    INFO("child stderr: " << end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    CHECK(usermm_lines(end.err).empty());
}

}  // namespace

TEST_CASE("a NULL dereference dies by SIGSEGV") {
    const ChildEnd end = run_in_child(
        [] {
            no_core_dump();
            Arena arena(kArenaSize);
            write_byte(arena.map(page(), Prot::ReadWrite), 1);
            read_at(g_null);
        },
        kChildSeconds);
    check_died_of_fault(end, 0, "not in any arena");
}

// In a child with an arena: `setup` prepares and returns the address to touch; the access must
// kill the child by SIGSEGV with a diagnostic naming that address and `why`. Returns the child's end.
enum class Touch { Read, Write };
ChildEnd expect_death_at(const std::function<char*(Arena&)>& setup, Touch touch, std::string_view why) {
    SharedWord target;
    const ChildEnd end = run_in_child(
        [&] {
            no_core_dump();
            Arena arena(kArenaSize);
            char* at = setup(arena);
            *target.word = addr(at);
            if (touch == Touch::Write)
                write_byte(at, 1);
            else
                (void)read_byte(at);
        },
        kChildSeconds);
    check_died_of_fault(end, *target.word, why);
    return end;
}

TEST_CASE("a wild pointer into an unmapped region dies by SIGSEGV") {
    expect_death_at(
        [](Arena&) {
            // The lowest page of a large hole: a mapping made meanwhile (a sanitizer's, in the signal
            // path) goes to the top of the highest gap that fits, so it cannot cover this page.
            constexpr std::size_t hole = 16ull << 20;
            char* gone = static_cast<char*>(mmap(nullptr, hole, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
            CHILD_CHECK(gone != MAP_FAILED);
            CHILD_CHECK(munmap(gone, hole) == 0);
            return gone + 42;
        },
        Touch::Write, "not in any arena");
}

TEST_CASE("a write to a Read VMA dies by SIGSEGV") {
    const ChildEnd end = expect_death_at(
        [](Arena& arena) {
            char* ro = static_cast<char*>(arena.map(4 * page(), Prot::Read, {.name = "ro"}));
            CHILD_CHECK(read_byte(ro + page()) == 0);
            return ro + page() + 7;
        },
        Touch::Write, "write at");
    const std::vector<std::string> lines = usermm_lines(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0].find("VMA 'ro'") != std::string::npos);
    CHECK(lines[0].find("r--") != std::string::npos);
}

TEST_CASE("a read in the hole between two VMAs of an arena dies by SIGSEGV") {
    expect_death_at(
        [](Arena& arena) {
            const std::size_t ps = page();
            char* base = static_cast<char*>(arena.base());
            CHILD_CHECK(arena.map(2 * ps, Prot::ReadWrite, {.name = "below", .address = base}) == base);
            CHILD_CHECK(arena.map(2 * ps, Prot::ReadWrite, {.name = "above", .address = base + 3 * ps}) ==
                        base + 3 * ps);
            // Both edges of the hole belong to VMAs and work.
            write_byte(base + 2 * ps - 1, 1);
            write_byte(base + 3 * ps, 1);
            return base + 2 * ps + 5;
        },
        Touch::Read, "no VMA there");
}

TEST_CASE("an access to a PROT_NONE VMA dies by SIGSEGV") {
    expect_death_at(
        [](Arena& arena) { return static_cast<char*>(arena.map(2 * page(), Prot::None, {.name = "guard"})) + 100; },
        Touch::Read, "VMA 'guard'");
}

TEST_CASE("a range unmapped from an arena and touched again dies by SIGSEGV") {
    expect_death_at(
        [](Arena& arena) {
            const std::size_t ps = page();
            char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.name = "shrinking"}));
            for (std::size_t i = 0; i < 4; ++i) write_byte(p + i * ps, std::uint8_t(i + 1));
            arena.unmap(p + ps, 2 * ps);
            CHILD_CHECK(read_byte(p) == 1);
            CHILD_CHECK(read_byte(p + 3 * ps) == 4);
            return p + 2 * ps + 3;
        },
        Touch::Read, "no VMA there");
}

TEST_CASE("SIGSEGV sent by the process to itself kills it") {
    SharedWord sender;
    const ChildEnd end = run_in_child(
        [&] {
            no_core_dump();
            Arena arena(kArenaSize);
            *sender.word = std::uintptr_t(getpid());
            kill(getpid(), SIGSEGV);
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK(end.signal == SIGSEGV);
    const std::vector<std::string> lines = usermm_lines(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0] == "usermm: SIGSEGV sent by pid " + std::to_string(*sender.word));
}

TEST_CASE("SIGSEGV sent by the parent kills the child waiting in pause()") {
    int ready[2];
    REQUIRE(pipe(ready) == 0);
    // run_in_child blocks until the child is gone, so the parent's kill comes from another thread.
    std::thread killer([&] {
        pid_t child = 0;
        if (read(ready[0], &child, sizeof child) == ssize_t(sizeof child)) kill(child, SIGSEGV);
    });
    const ChildEnd end = run_in_child(
        [&] {
            no_core_dump();
            Arena arena(kArenaSize);
            const pid_t self = getpid();
            CHILD_CHECK(write(ready[1], &self, sizeof self) == ssize_t(sizeof self));
            for (;;) pause();
        },
        kChildSeconds);
    close(ready[1]);  // the killer's read ends even if the child never wrote
    killer.join();
    close(ready[0]);
    INFO("child stderr: " << end.err);
    CHECK(end.signal == SIGSEGV);
    const std::vector<std::string> lines = usermm_lines(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0] == "usermm: SIGSEGV sent by pid " + std::to_string(getpid()));
}

TEST_CASE("an SA_SIGINFO handler installed before usermm gets the faults usermm does not resolve") {
    const ChildEnd end = run_in_child(
        [] {
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_sigaction = old_siginfo_handler;
            sa.sa_flags = SA_SIGINFO;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            check_previous_handler_gets_what_usermm_does_not_resolve(true);
        },
        kChildSeconds);
    check_survived_quietly(end);
}

TEST_CASE("a plain handler installed before usermm gets the faults usermm does not resolve") {
    const ChildEnd end = run_in_child(
        [] {
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_handler = old_plain_handler;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            check_previous_handler_gets_what_usermm_does_not_resolve(false);
        },
        kChildSeconds);
    check_survived_quietly(end);
}

// The kernel honours SIG_IGN whatever the flags; a chain that trusted SA_SIGINFO would call address 1.
TEST_CASE("SIG_IGN installed with SA_SIGINFO before usermm still drops a sent SIGSEGV") {
    const ChildEnd end = run_in_child(
        [] {
            no_core_dump();
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_handler = SIG_IGN;
            sa.sa_flags = SA_SIGINFO;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            Arena arena(kArenaSize);
            CHILD_CHECK(kill(getpid(), SIGSEGV) == 0);
        },
        kChildSeconds);
    check_survived_quietly(end);
}

TEST_CASE("a one-shot (SA_RESETHAND) handler installed before usermm runs once, then a fault kills") {
    const ChildEnd end = run_in_child(
        [] {
            no_core_dump();
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_handler = old_plain_handler;
            sa.sa_flags = SA_RESETHAND;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            Arena arena(kArenaSize);
            CHILD_CHECK(escapes_to_old_handler(read_at, g_null));
            std::fputs("first fault handled\n", stderr);
            (void)escapes_to_old_handler(read_at, g_null);
            std::fputs("second fault handled\n", stderr);
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK(end.err.find("first fault handled") != std::string::npos);
    CHECK(end.err.find("second fault handled") == std::string::npos);
    CHECK(end.signal == SIGSEGV);
}

TEST_CASE("a handler installed before usermm runs with its sa_mask blocked") {
    const ChildEnd end = run_in_child(
        [] {
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_handler = old_mask_probing_handler;
            sigemptyset(&sa.sa_mask);
            sigaddset(&sa.sa_mask, SIGUSR1);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            Arena arena(kArenaSize);
            CHILD_CHECK(escapes_to_old_handler(read_at, g_null));
            CHILD_CHECK(g_usr1_blocked.load() == 1);
        },
        kChildSeconds);
    check_survived_quietly(end);
}

// With SA_NODEFER the kernel leaves SIGSEGV open inside the handler, so a fault the handler itself
// takes in an arena is usermm's to resolve like any other.
TEST_CASE("an SA_NODEFER handler installed before usermm can fault in arena memory itself") {
    const ChildEnd end = run_in_child(
        [] {
            CHILD_CHECK(sigsegv_is_default());
            struct sigaction sa {};
            sa.sa_handler = old_arena_touching_handler;
            sa.sa_flags = SA_NODEFER;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            Arena arena(kArenaSize);
            char* p = static_cast<char*>(arena.map(page(), Prot::ReadWrite, {.name = "report"}));
            g_untouched_arena_page = p;
            CHILD_CHECK(escapes_to_old_handler(read_at, g_null));
            CHILD_CHECK(g_old_calls.load() == 1);
            CHILD_CHECK(read_byte(p) == 0x77);
            CHILD_CHECK(arena.stats().write_faults == 1);
        },
        kChildSeconds);
    check_survived_quietly(end);
}

TEST_CASE("SIGSEGV ignored before usermm: a sent one is dropped, a real fault still kills") {
    const ChildEnd end = run_in_child(
        [] {
            no_core_dump();
            CHILD_CHECK(sigsegv_is_default());
            CHILD_CHECK(signal(SIGSEGV, SIG_IGN) != SIG_ERR);
            Arena arena(kArenaSize);
            char* p = static_cast<char*>(arena.map(2 * page(), Prot::ReadWrite, {.fault_around_pages = 1}));
            CHILD_CHECK(kill(getpid(), SIGSEGV) == 0);
            write_byte(p, 3);
            write_byte(p + page(), 4);
            CHILD_CHECK(read_byte(p) + read_byte(p + page()) == 7);
            CHILD_CHECK(arena.stats().minor_faults == 2);
            std::fputs("alive after kill\n", stderr);
            read_at(g_null);
        },
        kChildSeconds);
    CHECK(end.err.find("alive after kill\n") != std::string::npos);
    check_died_of_fault(end, 0, "not in any arena");
}

TEST_CASE("a forked child faults in the arenas it inherited, apart from its parent") {
    const ChildEnd end = run_in_child(
        [] {
            const std::size_t ps = page();
            Arena arena(kArenaSize);
            char* p = static_cast<char*>(arena.map(8 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            write_byte(p, 7);
            CHILD_CHECK(arena.stats().minor_faults == 1);

            const ChildEnd grandchild = run_in_child(
                [&] {
                    CHILD_CHECK(read_byte(p) == 7);
                    write_byte(p + ps, 9);
                    CHILD_CHECK(read_byte(p + ps) == 9);
                    CHILD_CHECK(read_byte(p + 2 * ps) == 0);
                    CHILD_CHECK(arena.stats().minor_faults == 3);
                    arena.verify();
                },
                kChildSeconds);
            std::fputs(grandchild.err.c_str(), stderr);
            CHILD_CHECK(grandchild.exited && grandchild.exit_code == 0);

            // The grandchild's faults changed its copy of the pages and of the counters only.
            CHILD_CHECK(arena.stats().minor_faults == 1);
            CHILD_CHECK(read_byte(p + ps) == 0);
            CHILD_CHECK(arena.stats().minor_faults == 2);

            const ChildEnd crashing = run_in_child(
                [] {
                    no_core_dump();
                    read_at(g_null);
                },
                kChildSeconds);
            CHILD_CHECK(crashing.signal == SIGSEGV);
            CHILD_CHECK(usermm_lines(crashing.err).size() == 1);
            arena.verify();
        },
        kChildSeconds);
    check_survived_quietly(end);
}
