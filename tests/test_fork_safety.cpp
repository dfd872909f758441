// fork() and usermm: a child never reaches its parent's memory, whatever the child cannot open,
// and fork() is safe from signal handlers and pthread_atfork handlers that touch arena memory.
//
// Every case runs in a forked "trial" process of its own (run_in_child), which in turn forks the
// child under test: the trial changes process-wide things (descriptor limits, its uid) that the
// test process must keep. The test process itself never creates an arena, so each trial sets up
// usermm itself.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm::Snapshot;
using usermm_test::check_survived;
using usermm_test::ChildEnd;
using usermm_test::format_an_error;
using usermm_test::read_byte;
using usermm_test::run_guarded;
using usermm_test::run_in_child;
using usermm_test::write_byte;

constexpr unsigned kChildSeconds = 10;
constexpr std::size_t kArenaSize = 16ull << 20;

std::size_t page() { return std::size_t(sysconf(_SC_PAGESIZE)); }

// Forks a child that runs `body` and exits 0; waits for it and checks that it did.
void fork_and_wait(const std::function<void()>& body) {
    std::fflush(nullptr);
    const pid_t pid = fork();
    CHILD_CHECK(pid >= 0);
    if (pid == 0) {
        body();
        _exit(0);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    CHILD_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

// A child that cannot open anything: the trial fills every free descriptor number below kFdLimit
// before its first arena (so usermm's descriptors get numbers above it), then lowers RLIMIT_NOFILE
// to kFdLimit around fork(). A descriptor the child closes above the limit frees nothing it can
// use; closing one of the fillers does.
constexpr int kFdLimit = 64;

std::vector<int> fill_low_descriptors() {
    std::vector<int> fillers;
    for (int fd; (fd = dup(0)) >= 0;) {
        if (fd >= kFdLimit) {
            close(fd);
            break;
        }
        fillers.push_back(fd);
    }
    return fillers;
}

// Forks `body` with RLIMIT_NOFILE at kFdLimit; returns the child's wait status.
int fork_with_descriptors_exhausted(const std::function<void()>& body) {
    rlimit old{};
    CHILD_CHECK(getrlimit(RLIMIT_NOFILE, &old) == 0);
    const rlimit low{kFdLimit, old.rlim_max};
    CHILD_CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
    CHILD_CHECK(dup(0) < 0 && errno == EMFILE);
    std::fflush(nullptr);
    const pid_t pid = fork();
    CHILD_CHECK(pid >= 0);
    if (pid == 0) {
        body();
        _exit(0);
    }
    CHILD_CHECK(setrlimit(RLIMIT_NOFILE, &old) == 0);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    return status;
}

// Gives up root for good: the process becomes non-dumpable, so its /proc/self (mem included)
// belongs to root and it can no longer open /proc/self/mem.
void become_nobody() {
    CHILD_CHECK(prctl(PR_SET_DUMPABLE, 0) == 0);
    CHILD_CHECK(setresgid(65534, 65534, 65534) == 0);
    CHILD_CHECK(setresuid(65534, 65534, 65534) == 0);
    CHILD_CHECK(open("/proc/self/mem", O_RDWR | O_CLOEXEC) < 0 && errno == EACCES);
}

// A fork handler registered before usermm was loaded (a constructor that runs before usermm's):
// its prepare runs after usermm's, with the arenas' locks held. What it does is set per case.
enum class EarlyPrepare { Nothing, RaiseSignal, TouchArena };
std::atomic<EarlyPrepare> g_early_prepare{EarlyPrepare::Nothing};

// Arena pages the handlers below write, each a fresh one: every write is a first-touch fault.
char* volatile g_pages = nullptr;
std::atomic<int> g_pages_written{0};
void write_next_page() { write_byte(g_pages + std::size_t(g_pages_written.fetch_add(1)) * page(), 1); }

void early_prepare() {
    switch (g_early_prepare.load()) {
        case EarlyPrepare::Nothing:
            return;
        case EarlyPrepare::RaiseSignal:
            raise(SIGUSR1);
            return;
        case EarlyPrepare::TouchArena:
            write_next_page();
            return;
    }
}

[[gnu::constructor(101)]] void register_early_fork_handler() { pthread_atfork(early_prepare, nullptr, nullptr); }

// TSan calls an asynchronous signal's handler with SIGSEGV and SIGBUS blocked, and a fault with
// SIGSEGV blocked kills the process: the handler unblocks the two (a no-op without TSan).
void on_sigusr1(int) {
    sigset_t faults;
    sigemptyset(&faults);
    sigaddset(&faults, SIGSEGV);
    sigaddset(&faults, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &faults, nullptr);
    write_next_page();
}

}  // namespace

// Once a bug: a child forked with no descriptor left kept its parent's /proc/self/mem, and its
// restore() wrote the snapshot into the parent.
TEST_CASE("fork with descriptors exhausted: the child's restore fails with EMFILE and never writes the parent") {
    const ChildEnd end = run_guarded(
        [] {
            const std::size_t ps = page();
            std::vector<int> fillers = fill_low_descriptors();
            Arena arena(kArenaSize);
            format_an_error(arena);
            char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            write_byte(p, 0xAA);
            const Snapshot snap = arena.snapshot(p, 4 * ps);
            write_byte(p, 0xBB);
            const int status = fork_with_descriptors_exhausted([&] {
                CHILD_EXPECT_ERROR(arena.restore(snap), EMFILE, "usermm::Arena::restore", "/proc/self/mem");
                char buf = 0;
                CHILD_EXPECT_ERROR(snap.read(p, &buf, 1), EMFILE, "usermm::Snapshot::read", "/proc/self/mem");
                CHILD_EXPECT_ERROR((void)arena.snapshot(p, ps), EMFILE, "usermm::Arena::snapshot", "/proc/self/mem");
                CHILD_CHECK(read_byte(p) == 0xBB);
                // With a descriptor free again the child opens its own, and restores its own memory.
                close(fillers.back());
                arena.restore(snap);
                CHILD_CHECK(read_byte(p) == 0xAA);
            });
            CHILD_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
            CHILD_CHECK(read_byte(p) == 0xBB);  // the parent's memory is its own
            arena.verify();
        },
        kChildSeconds);
    check_survived(end);
}

// A fault that must read a page it cannot touch (a snapshot's copy of a PROT_NONE page) dies with a
// diagnostic in a child that has no /proc/self/mem, instead of reading the parent's page.
TEST_CASE("fork with descriptors exhausted: a fault that needs /proc/self/mem dies with a diagnostic") {
    const ChildEnd end = run_guarded(
        [] {
            const std::size_t ps = page();
            fill_low_descriptors();
            Arena arena(kArenaSize);
            format_an_error(arena);
            char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            write_byte(p, 0x11);
            {
                const Snapshot first = arena.snapshot(p, ps);
                write_byte(p, 0x22);
                arena.restore(first);  // the page is PROT_NONE now, with content
            }
            const Snapshot snap = arena.snapshot(p, ps);
            const rlimit no_core{0, 0};
            setrlimit(RLIMIT_CORE, &no_core);
            const int status = fork_with_descriptors_exhausted([&] { write_byte(p, 0x33); });
            CHILD_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
            CHILD_CHECK(read_byte(p) == 0x11);
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    CHECK(end.err.find("usermm: cannot resolve write fault at ") != std::string::npos);
    CHECK(end.err.find("cannot open /proc/self/mem, errno 24") != std::string::npos);
}

// Once a bug: a non-dumpable process (any uid change makes one) cannot open /proc/self/mem, so its
// children kept the parent's; a child's restore wrote the parent, and a child's private map_file
// zeroed a byte of the parent's page at the new VMA's address.
TEST_CASE("fork of a non-dumpable process: the child's restore and map_file fail with EACCES, the parent is untouched") {
    const ChildEnd end = run_guarded(
        [] {
            const std::size_t ps = page();
            char path[] = "/tmp/usermm-fork-safety-XXXXXX";
            const int fd = mkstemp(path);
            CHILD_CHECK(fd >= 0);
            unlink(path);
            CHILD_CHECK(ftruncate(fd, off_t(ps)) == 0);
            Arena arena(kArenaSize);
            char* p = static_cast<char*>(arena.map(ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            char* q = static_cast<char*>(arena.map(ps, Prot::ReadWrite, {.fault_around_pages = 1}));
            // A file VMA: its page cache exists, so a child's map_file of the file opens nothing.
            arena.map_file(fd, 0, ps, Prot::Read, usermm::Share::Private);
            write_byte(p, 0xAA);
            write_byte(q, 0x33);
            become_nobody();
            {
                const Snapshot snap = arena.snapshot(p, ps);
                write_byte(p, 0xBB);
                fork_and_wait([&] {
                    CHILD_EXPECT_ERROR(arena.restore(snap), EACCES, "usermm::Arena::restore", "/proc/self/mem");
                    CHILD_CHECK(read_byte(p) == 0xBB);
                });
                CHILD_CHECK(read_byte(p) == 0xBB);
            }
            fork_and_wait([&] {
                arena.unmap(q, ps);  // no snapshot, no file: nothing to reach through /proc/self/mem
                CHILD_EXPECT_ERROR(
                    arena.map_file(fd, 0, ps, Prot::Read, usermm::Share::Private, {.address = q}), EACCES,
                    "usermm::Arena::map_file", "/proc/self/mem");
                CHILD_EXPECT_ERROR(Arena{kArenaSize}, EACCES, "usermm::Arena", "/proc/self/mem");
            });
            CHILD_CHECK(read_byte(q) == 0x33);
        },
        kChildSeconds);
    check_survived(end);
}

// Once a bug: a signal handler (a profiler's, say) that wrote arena memory while its thread was
// inside fork() faulted into the arena locks its own thread held there, and killed the process.
TEST_CASE("fork: a signal that arrives while usermm holds the arenas for fork() is handled after, and may touch arena memory") {
    const ChildEnd end = run_guarded(
        [] {
            Arena arena(kArenaSize);
            g_pages = static_cast<char*>(arena.map(64 * page(), Prot::ReadWrite, {.fault_around_pages = 1}));
            struct sigaction sa {};
            sa.sa_handler = on_sigusr1;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGUSR1, &sa, nullptr) == 0);
            g_early_prepare.store(EarlyPrepare::RaiseSignal);
            fork_and_wait([] { CHILD_CHECK(g_pages_written.load() == 0); });  // pending signals stay with the parent
            g_early_prepare.store(EarlyPrepare::Nothing);
            CHILD_CHECK(g_pages_written.load() == 1);
            CHILD_CHECK(read_byte(g_pages) == 1);
            arena.verify();
        },
        kChildSeconds);
    check_survived(end);
}

// Once a bug: pthread_atfork handlers registered before the first arena ran their prepare after
// usermm's (which holds the arenas' locks) and their child handler before usermm's, so touching
// arena memory in them killed the process. usermm registers its handlers when it is loaded.
TEST_CASE("fork: pthread_atfork handlers registered before the first arena may touch arena memory") {
    const ChildEnd end = run_guarded(
        [] {
            CHILD_CHECK(pthread_atfork(write_next_page, write_next_page, write_next_page) == 0);
            Arena arena(kArenaSize);
            g_pages = static_cast<char*>(arena.map(64 * page(), Prot::ReadWrite, {.fault_around_pages = 1}));
            fork_and_wait([&] {
                CHILD_CHECK(g_pages_written.load() == 2);  // prepare, then the child's handler
                CHILD_CHECK(read_byte(g_pages + page()) == 1);
                arena.verify();
            });
            CHILD_CHECK(g_pages_written.load() == 2);  // prepare, then the parent's handler
            CHILD_CHECK(read_byte(g_pages + page()) == 1);
            arena.verify();
        },
        kChildSeconds);
    check_survived(end);
}

// The one order usermm cannot come first in: a fork handler registered before usermm was loaded
// runs its prepare while usermm holds the arenas. Touching arena memory there dies with a
// diagnostic that says so, rather than deadlocking.
TEST_CASE("fork: a prepare handler registered before usermm was loaded that touches arena memory dies saying so") {
    const ChildEnd end = run_guarded(
        [] {
            const rlimit no_core{0, 0};
            setrlimit(RLIMIT_CORE, &no_core);
            Arena arena(kArenaSize);
            g_pages = static_cast<char*>(arena.map(64 * page(), Prot::ReadWrite, {.fault_around_pages = 1}));
            g_early_prepare.store(EarlyPrepare::TouchArena);
            std::fflush(nullptr);
            fork();
            std::fprintf(stderr, "fork returned\n");
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK_FALSE(end.exited);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("by the thread that holds an arena lock") != std::string::npos);
    CHECK(end.err.find("fork handler registered before usermm was loaded") != std::string::npos);
}
