// The process around the arenas: environment variables, descriptors running out, moved-from Arena
// objects. Environment variables are read once, when the first arena sets the process up, so the
// test process itself never creates an arena: every case runs in a forked child of its own.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "map_budget.hpp"
#include "page_ops.hpp"
#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm_test::ChildEnd;
using usermm_test::run_in_child;
using usermm_test::write_byte;

constexpr unsigned kChildSeconds = 10;
constexpr std::size_t kArenaSize = 16ull << 20;

std::size_t page() { return std::size_t(sysconf(_SC_PAGESIZE)); }

void child_check(bool ok, const char* what, int line) {
    if (ok) return;
    std::fprintf(stderr, "child check failed at line %d: %s\n", line, what);
    _exit(1);
}
#define CHILD_CHECK(cond) child_check(bool(cond), #cond, __LINE__)

// run_in_child, with an exception that escapes `body` ending the child with its message (rather
// than unwinding into the test runner's copy in the child).
ChildEnd run_guarded(const std::function<void()>& body, unsigned seconds) {
    return run_in_child(
        [&] {
            try {
                body();
            } catch (const std::exception& e) {
                std::fprintf(stderr, "child threw: %s\n", e.what());
                _exit(1);
            }
        },
        seconds);
}

// Runs `fn`, which must throw usermm::Error with `err` and a message containing every one of `parts`.
void child_expect_error(const std::function<void()>& fn, int err, std::initializer_list<std::string_view> parts,
                        int line) {
    try {
        fn();
    } catch (const usermm::Error& e) {
        const std::string what = e.what();
        bool ok = e.code().value() == err;
        for (std::string_view part : parts) ok = ok && what.find(part) != std::string::npos;
        if (!ok) std::fprintf(stderr, "child check failed at line %d: unexpected error: %s\n", line, what.c_str());
        if (!ok) _exit(1);
        return;
    }
    std::fprintf(stderr, "child check failed at line %d: no error\n", line);
    _exit(1);
}
#define CHILD_EXPECT_ERROR(expr, err, ...) child_expect_error([&] { expr; }, err, {__VA_ARGS__}, __LINE__)

void check_survived(const ChildEnd& end) {
    INFO("child stderr: " << end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) out.push_back(line);
    return out;
}

// In a child with `name`=`value`: the first arena sets the process up; `check` then looks at it.
// The child leaves through exit() so that atexit handlers (USERMM_STATS) run.
ChildEnd with_environment(const char* name, const char* value, const std::function<void()>& check) {
    return run_guarded(
        [&] {
            setenv(name, value, 1);
            {
                Arena arena(kArenaSize);
                write_byte(arena.map(page(), Prot::ReadWrite), 1);
                check();
            }
            std::exit(0);
        },
        kChildSeconds);
}

bool uffd_engine() { return usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd; }

}  // namespace

// Once a bug: size() of a moved-from Arena crashed with SIGSEGV at 0x8.
TEST_CASE("every call on a moved-from Arena fails with EINVAL saying so") {
    const ChildEnd end = run_guarded(
        [] {
            const std::size_t ps = page();
            Arena from(kArenaSize);
            Arena to(std::move(from));
            void* p = to.map(ps, Prot::ReadWrite);
            const usermm::Snapshot snap = to.snapshot(p, ps);
            char path[] = "/tmp/usermm-process-XXXXXX";
            const int fd = mkstemp(path);
            CHILD_CHECK(fd >= 0);
            CHILD_CHECK(ftruncate(fd, off_t(ps)) == 0);
            constexpr const char* kMoved = "the arena was moved from";
            CHILD_EXPECT_ERROR((void)from.base(), EINVAL, "usermm::Arena::base", kMoved);
            CHILD_EXPECT_ERROR((void)from.size(), EINVAL, "usermm::Arena::size", kMoved);
            CHILD_EXPECT_ERROR((void)from.contains(p), EINVAL, "usermm::Arena::contains", kMoved);
            CHILD_EXPECT_ERROR(from.map(ps, Prot::ReadWrite), EINVAL, "usermm::Arena::map", kMoved);
            CHILD_EXPECT_ERROR(from.map_file(fd, 0, ps, Prot::Read, usermm::Share::Private), EINVAL,
                               "usermm::Arena::map_file", kMoved);
            CHILD_EXPECT_ERROR(from.map_file(std::string(path), 0, ps, Prot::Read, usermm::Share::Private), EINVAL,
                               "usermm::Arena::map_file", kMoved);
            CHILD_EXPECT_ERROR(from.sync(p, ps), EINVAL, "usermm::Arena::sync", kMoved);
            CHILD_EXPECT_ERROR(from.advise(p, ps, usermm::Advice::Random), EINVAL, "usermm::Arena::advise", kMoved);
            CHILD_EXPECT_ERROR(from.protect(p, ps, Prot::Read), EINVAL, "usermm::Arena::protect", kMoved);
            CHILD_EXPECT_ERROR(from.unmap(p, ps), EINVAL, "usermm::Arena::unmap", kMoved);
            CHILD_EXPECT_ERROR(from.prefault(p, ps, Prot::Read), EINVAL, "usermm::Arena::prefault", kMoved);
            CHILD_EXPECT_ERROR((void)from.snapshot(), EINVAL, "usermm::Arena::snapshot", kMoved);
            CHILD_EXPECT_ERROR((void)from.snapshot(p, ps), EINVAL, "usermm::Arena::snapshot", kMoved);
            CHILD_EXPECT_ERROR(from.restore(snap), EINVAL, "usermm::Arena::restore", kMoved);
            CHILD_EXPECT_ERROR((void)from.collect_dirty(p, ps), EINVAL, "usermm::Arena::collect_dirty", kMoved);
            CHILD_EXPECT_ERROR((void)from.stats(), EINVAL, "usermm::Arena::stats", kMoved);
            CHILD_EXPECT_ERROR((void)from.vmas(), EINVAL, "usermm::Arena::vmas", kMoved);
            CHILD_EXPECT_ERROR(from.verify(), EINVAL, "usermm::Arena::verify", kMoved);
            // Assigning to it makes it an arena again; the one it had goes with the assignment.
            from = std::move(to);
            CHILD_CHECK(from.contains(p));
            from.verify();
            unlink(path);
        },
        kChildSeconds);
    check_survived(end);
}

// One rule for bad environment values: a one-line diagnostic on stderr, and the default.
TEST_CASE("USERMM_ENGINE with a bad value: a one-line diagnostic and the default engine") {
    const ChildEnd end = with_environment("USERMM_ENGINE", "bogus", [] {
        CHILD_CHECK(uffd_engine() == (usermm::detail::uffd_probe() == 0));
    });
    check_survived(end);
    const std::vector<std::string> lines = lines_of(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0] == "usermm: USERMM_ENGINE is 'bogus'; it must be 'mprotect' or 'uffd': the default applies");
}

TEST_CASE("USERMM_MAP_BUDGET with a bad value: a one-line diagnostic and the default budget") {
    long fallback = 0;
    const ChildEnd good = with_environment("USERMM_MAP_BUDGET", "5000", [] {
        CHILD_CHECK(usermm::detail::map_budget_limit() == 5000);
    });
    check_survived(good);
    CHECK(good.err.empty());
    for (const char* bad : {"abc", "12abc", "0", "-3", "99999999999999999999999"}) {
        CAPTURE(bad);
        const ChildEnd end = with_environment("USERMM_MAP_BUDGET", bad, [] {
            // The default is what the process had left of vm.max_map_count, less a reserve.
            const long limit = usermm::detail::map_budget_limit();
            CHILD_CHECK(limit > 64 && limit < usermm_test::max_map_count());
        });
        check_survived(end);
        const std::vector<std::string> lines = lines_of(end.err);
        REQUIRE(lines.size() == 1);
        CHECK(lines[0] == "usermm: USERMM_MAP_BUDGET is '" + std::string(bad) +
                              "'; it must be a positive number of kernel mappings: the default applies");
        ++fallback;
    }
    CHECK(fallback == 5);
}

TEST_CASE("USERMM_STATS with a bad value: a one-line diagnostic and no table at exit") {
    const ChildEnd on = with_environment("USERMM_STATS", "1", [] {});
    check_survived(on);
    CHECK(on.err.starts_with("usermm process stats\n"));
    const ChildEnd off = with_environment("USERMM_STATS", "0", [] {});
    check_survived(off);
    CHECK(off.err.empty());
    const ChildEnd end = with_environment("USERMM_STATS", "yes", [] {});
    check_survived(end);
    const std::vector<std::string> lines = lines_of(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0] == "usermm: USERMM_STATS is 'yes'; it must be '0' or '1': the default applies");
}

// Once a bug: with no descriptor left, /proc/self/maps could not be opened and was read as empty,
// so verify() reported an arena with no kernel mapping (false corruption).
TEST_CASE("verify() with descriptors exhausted fails with EMFILE, not with a false corruption") {
    const ChildEnd end = run_guarded(
        [] {
            Arena arena(kArenaSize);
            write_byte(arena.map(4 * page(), Prot::ReadWrite), 1);
            arena.verify();
            const rlimit low{64, 64};
            CHILD_CHECK(setrlimit(RLIMIT_NOFILE, &low) == 0);
            std::vector<int> fillers;
            for (int fd; (fd = dup(0)) >= 0;) fillers.push_back(fd);
            CHILD_CHECK(errno == EMFILE);
            CHILD_EXPECT_ERROR(arena.verify(), EMFILE, "usermm::Arena::verify", "/proc/self/maps");
            close(fillers.back());
            arena.verify();
        },
        kChildSeconds);
    check_survived(end);
}

// Prot::None grants nothing: prefault of it would be a no-op that looks like work, and once granted
// read access.
TEST_CASE("prefault with Prot::None fails with EINVAL and grants nothing") {
    const ChildEnd end = run_guarded(
        [] {
            Arena arena(kArenaSize);
            void* p = arena.map(4 * page(), Prot::ReadWrite);
            CHILD_EXPECT_ERROR(arena.prefault(p, 4 * page(), Prot::None), EINVAL, "usermm::Arena::prefault",
                               "Prot::None");
            CHILD_CHECK(arena.stats().prefault_pages == 0);
            for (const usermm::VmaInfo& v : arena.vmas()) CHILD_CHECK(v.stats.prefault_pages == 0);
            arena.verify();
        },
        kChildSeconds);
    check_survived(end);
}

// Once a bug: a page whose protection the program changed behind usermm's back (its own mprotect
// on arena memory) made the next access fault forever, each fault spurious to usermm.
TEST_CASE("a page mprotected behind usermm's back: the access dies by SIGSEGV saying so, instead of looping") {
    const ChildEnd end = run_guarded(
        [] {
            const rlimit no_core{0, 0};
            setrlimit(RLIMIT_CORE, &no_core);
            Arena arena(kArenaSize);
            char* p = static_cast<char*>(arena.map(4 * page(), Prot::ReadWrite, {.fault_around_pages = 1}));
            write_byte(p, 1);
            CHILD_CHECK(mprotect(p, page(), PROT_NONE) == 0);
            CHILD_EXPECT_ERROR(arena.verify(), EFAULT, "is --- in the kernel but rw- in usermm");
            write_byte(p, 2);
            std::fprintf(stderr, "the access went on\n");
        },
        kChildSeconds);
    INFO("child stderr: " << end.err);
    CHECK_FALSE(end.exited);
    CHECK(end.signal == SIGSEGV);
    const std::vector<std::string> lines = lines_of(end.err);
    REQUIRE(lines.size() == 1);
    CHECK(lines[0].starts_with("usermm: SIGSEGV at 0x"));
    CHECK(lines[0].find("1000 faults in a row for an access usermm had granted: the page's protection was changed "
                        "outside usermm") != std::string::npos);
}
