// Signal entry and its raw log in the corners no other test reaches: an install that failed half
// way, a line emitted again after its write failed, and two threads faulting at once into a
// one-shot previous handler.
//
// The test process itself never creates an arena and never calls usermm::page_size(): every child
// starts with SIGSEGV at SIG_DFL and installs "the program's own" handler before usermm's.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <new>
#include <string>
#include <thread>

#include "fault_entry.hpp"
#include "raw_log.hpp"
#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm_test::ChildEnd;
using usermm_test::run_in_child;

constexpr unsigned kChildSeconds = 5;
constexpr std::size_t kArenaSize = 16ull << 20;

char* volatile g_null = nullptr;

// A load the hardware must perform, even from NULL: UBSan would otherwise end the program first.
__attribute__((no_sanitize("null"))) void read_at(char* p) { (void)*static_cast<volatile char*>(p); }

void no_core_dump() {
    const rlimit none{0, 0};
    setrlimit(RLIMIT_CORE, &none);
}

struct sigaction current_action(int sig) {
    struct sigaction now {};
    sigaction(sig, nullptr, &now);
    return now;
}

// A counter the child increments and the parent reads once the child is gone.
struct SharedCount {
    std::atomic<int>* count = static_cast<std::atomic<int>*>(
        mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    SharedCount() {
        REQUIRE(count != MAP_FAILED);
        new (count) std::atomic<int>(0);
    }
    ~SharedCount() { munmap(count, sizeof *count); }
    SharedCount(const SharedCount&) = delete;
    SharedCount& operator=(const SharedCount&) = delete;
};

std::atomic<int>* g_runs = nullptr;
sigjmp_buf g_escape;

void counting_handler(int) {
    g_runs->fetch_add(1);
    siglongjmp(g_escape, 1);
}

}  // namespace

// A retry after a half-done install recorded usermm's own SIGSEGV handler as the previous one:
// the first foreign fault then passed itself on to itself until the stack ran out.
// Skipped under TSan: the child's own handler leaves the fault with siglongjmp, which TSan's
// signal interception does not survive (the child dies without a word).
TEST_CASE("an install that fails at SIGBUS leaves SIGSEGV as it was, and a retry chains to the program's handler" *
          doctest::skip(usermm_test::kSkipUnderTsan)) {
    SharedCount runs;
    const ChildEnd end = run_in_child(
        [&] {
            g_runs = runs.count;
            struct sigaction sa {};
            sa.sa_handler = counting_handler;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            usermm::detail::g_test_fail_sigbus_install = EINVAL;
            CHILD_EXPECT_ERROR(usermm::page_size(), EINVAL, "cannot install the SIGSEGV/SIGBUS handlers");
            CHILD_CHECK(current_action(SIGSEGV).sa_handler == counting_handler);
            CHILD_CHECK(current_action(SIGBUS).sa_handler == SIG_DFL);

            Arena arena(kArenaSize);
            CHILD_CHECK(current_action(SIGSEGV).sa_handler != counting_handler);
            if (sigsetjmp(g_escape, 1) == 0) read_at(g_null);
            CHILD_CHECK(runs.count->load() == 1);
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    CHECK(runs.count->load() == 1);
}

// A full line, emitted with stderr closed, then emitted again with stderr open.
TEST_CASE("a line emitted again after its write failed stays within its buffer") {
    const ChildEnd end = run_in_child(
        [] {
            const int saved = dup(2);
            CHILD_CHECK(saved >= 0);
            usermm::detail::RawLine line;
            for (int i = 0; i < 300; ++i) line.str("x");
            close(2);
            line.emit();
            CHILD_CHECK(dup2(saved, 2) == 2);
            line.emit();
        },
        kChildSeconds);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    CHECK(end.err == "\n");
}

namespace {

int g_stderr_reader = -1;
std::atomic<int> g_at_start{0};

// The program's one-shot handler: it counts its run, then makes room in the full pipe that is
// stderr, where a diagnostic written before a death waits. It returns: the access faults again.
void one_shot_handler(int) {
    g_runs->fetch_add(1);
    char buf[4096];
    (void)!read(g_stderr_reader, buf, sizeof buf);
}

void fault_with_the_other_thread() {
    g_at_start.fetch_add(1);
    while (g_at_start.load() < 2) {
    }
    read_at(g_null);
}

// One process whose two threads fault at once on NULL, into a SA_RESETHAND handler installed
// before usermm's. No thread can die before the handler has counted its run: a death is preceded
// by a diagnostic on stderr, a pipe kept full until the handler drains it.
ChildEnd race_into_one_shot_handler(std::atomic<int>* runs) {
    return run_in_child(
        [runs] {
            no_core_dump();
            g_runs = runs;
            struct sigaction sa {};
            sa.sa_handler = one_shot_handler;
            sa.sa_flags = SA_RESETHAND;
            sigemptyset(&sa.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
            Arena arena(kArenaSize);
            int fds[2];
            CHILD_CHECK(pipe(fds) == 0);
            CHILD_CHECK(fcntl(fds[1], F_SETFL, O_NONBLOCK) == 0);
            static char filler[4096];
            while (write(fds[1], filler, sizeof filler) > 0) {
            }
            CHILD_CHECK(errno == EAGAIN);
            CHILD_CHECK(fcntl(fds[1], F_SETFL, 0) == 0);
            g_stderr_reader = fds[0];
            CHILD_CHECK(dup2(fds[1], 2) == 2);
            std::thread a(fault_with_the_other_thread), b(fault_with_the_other_thread);
            a.join();
            b.join();
        },
        kChildSeconds);
}

}  // namespace

// The kernel resets a SA_RESETHAND handler to SIG_DFL as it delivers the signal: of two threads
// that fault at once, one runs the handler and the other gets the default action, death. A handler
// read and reset in two steps ran twice only when both threads read it before either reset it:
// about one attempt in 8 on an idle machine, one in 25 under load, hence 500 attempts.
TEST_CASE("two threads faulting at once into a one-shot previous handler: it runs once, then the fault kills") {
    SharedCount runs;
    for (int attempt = 0; attempt < 500; ++attempt) {
        runs.count->store(0);
        const ChildEnd end = race_into_one_shot_handler(runs.count);
        INFO("attempt " << attempt << ", child stderr: " << end.err);
        CHECK_FALSE(end.exited);
        CHECK(end.signal == SIGSEGV);
        CHECK(runs.count->load() == 1);
        if (end.signal != SIGSEGV || runs.count->load() != 1) break;
    }
}
