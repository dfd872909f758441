// The process around the arenas: environment variables, descriptors running out, moved-from Arena
// objects. Environment variables are read once, when the first arena sets the process up, so the
// test process itself never creates an arena: every case runs in a forked child of its own.
#include <doctest/doctest.h>
#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <link.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "map_budget.hpp"
#include "page_ops_api.hpp"
#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm_test::check_survived;
using usermm_test::ChildEnd;
using usermm_test::format_an_error;
using usermm_test::run_guarded;
using usermm_test::run_in_child;
using usermm_test::write_byte;

constexpr unsigned kChildSeconds = 10;
constexpr std::size_t kArenaSize = 16ull << 20;

std::size_t page() { return std::size_t(sysconf(_SC_PAGESIZE)); }

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
            CHILD_EXPECT_ERROR((void)from.find_vma("x"), EINVAL, "usermm::Arena::find_vma", kMoved);
            CHILD_EXPECT_ERROR((void)from.map_span<int>(4, Prot::ReadWrite), EINVAL, "usermm::Arena::map", kMoved);
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
            format_an_error(arena);
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

namespace {

// A thread whose signal handlers run on an alternate stack of `size` bytes (with an inaccessible
// page below it, so an overflow kills instead of corrupting), filled with a pattern; `work` runs
// on it and the result is how many bytes of the alternate stack were written at the deepest point.
std::size_t altstack_high_water(std::size_t size, const std::function<void()>& work) {
    const std::size_t ps = page();
    const std::size_t len = (size + ps - 1) / ps * ps;
    auto* region = static_cast<unsigned char*>(
        mmap(nullptr, len + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    CHILD_CHECK(region != MAP_FAILED);
    CHILD_CHECK(mprotect(region, ps, PROT_NONE) == 0);
    unsigned char* stack = region + ps + (len - size);  // the stack's top is the region's end
    std::memset(stack, 0xA5, size);
    std::thread t([&] {
        stack_t ss{};
        ss.ss_sp = stack;
        ss.ss_size = size;
        CHILD_CHECK(sigaltstack(&ss, nullptr) == 0);
        work();
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        CHILD_CHECK(sigaltstack(&off, nullptr) == 0);
    });
    t.join();
    std::size_t untouched = 0;
    while (untouched < size && stack[untouched] == 0xA5) ++untouched;
    munmap(region, len + ps);
    return size - untouched;
}

volatile int g_signal_seen = 0;
void on_signal_onstack(int) { g_signal_seen = 1; }

sigjmp_buf g_escape;
char* volatile g_unmapped = reinterpret_cast<char*>(16);  // volatile: the compiler cannot see it
void escape_fault(int) { siglongjmp(g_escape, 1); }

// True when the main program was linked with BIND_NOW (DF_BIND_NOW or DF_1_NOW).
bool program_binds_now() {
    bool now = false;
    dl_iterate_phdr(
        [](dl_phdr_info* info, std::size_t, void* out) {
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                if (info->dlpi_phdr[i].p_type != PT_DYNAMIC) continue;
                const auto* d = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
                for (; d->d_tag != DT_NULL; ++d)
                    if ((d->d_tag == DT_FLAGS && (d->d_un.d_val & DF_BIND_NOW)) ||
                        (d->d_tag == DT_FLAGS_1 && (d->d_un.d_val & DF_1_NOW)))
                        *static_cast<bool*>(out) = true;
            }
            return 1;  // the first object is the main program
        },
        &now);
    return now;
}

}  // namespace

TEST_CASE("the programs that link usermm bind their symbols at load time (no lazy binding in a fault)") {
    CHECK(program_binds_now());
}

// Once a bug: the README said the handler needs "well under MINSIGSTKSZ" of alternate stack; it
// needed ~1.15 KB beyond the kernel's frame, ~4.3 KB on first calls under lazy binding. The
// documented size, usermm::signal_stack_size(), is enough for every kind of fault, with the
// measured depth below it.
TEST_CASE("faults of every kind run on an alternate stack of usermm::signal_stack_size() bytes") {
    const ChildEnd end = run_guarded(
        [] {
            const std::size_t ps = page();
            // The program's own handler, before usermm's: a foreign fault is passed on to it.
            struct sigaction escape {};
            escape.sa_handler = escape_fault;
            escape.sa_flags = SA_ONSTACK | SA_NODEFER;
            sigemptyset(&escape.sa_mask);
            CHILD_CHECK(sigaction(SIGSEGV, &escape, nullptr) == 0);
            struct sigaction plain {};
            plain.sa_handler = on_signal_onstack;
            plain.sa_flags = SA_ONSTACK;
            sigemptyset(&plain.sa_mask);
            CHILD_CHECK(sigaction(SIGUSR1, &plain, nullptr) == 0);

            Arena arena(kArenaSize);
            char path[] = "/tmp/usermm-altstack-XXXXXX";
            const int fd = mkstemp(path);
            CHILD_CHECK(fd >= 0);
            unlink(path);
            CHILD_CHECK(ftruncate(fd, off_t(64 * ps)) == 0);
            char* file = static_cast<char*>(arena.map_file(fd, 0, 64 * ps, Prot::ReadWrite, usermm::Share::Private));
            char* p = static_cast<char*>(arena.map(256 * ps, Prot::ReadWrite));
            write_byte(p + 200 * ps, 1);
            std::optional<usermm::Snapshot> armed;
            {
                const usermm::Snapshot first = arena.snapshot(p + 200 * ps, ps);
                write_byte(p + 200 * ps, 2);
                arena.restore(first);  // PROT_NONE with content: its copy goes through /proc/self/mem
            }
            write_byte(p + 100 * ps, 3);
            armed.emplace(arena.snapshot(p, 256 * ps));
            // Swapped out: its next read is do_swap_page, a store read into a buffer on the way.
            char swap_path[] = "/var/tmp/usermm-altstack-swap-XXXXXX";
            const int swap_fd = mkstemp(swap_path);
            CHILD_CHECK(swap_fd >= 0);
            close(swap_fd);
            usermm::SwapFile swap(swap_path, 1 << 20);
            unlink(swap_path);
            usermm::ArenaOptions with_swap;
            with_swap.store = &swap;
            Arena swapped(kArenaSize, with_swap);
            char* q = static_cast<char*>(swapped.map(32 * ps, Prot::ReadWrite));
            write_byte(q, 9);
            swapped.advise(q, 32 * ps, usermm::Advice::PageOut);
            CHILD_CHECK(swapped.stats().pages_swapped_out == 1);

            const std::uint64_t cow_before = arena.stats().cow_faults;
            const std::size_t size = usermm::signal_stack_size();
            // The kernel's frame and a handler that does nothing: the floor.
            const std::size_t floor = altstack_high_water(size, [] { raise(SIGUSR1); });
            CHILD_CHECK(g_signal_seen == 1);
            const std::size_t used = altstack_high_water(size, [&] {
                CHILD_CHECK(usermm_test::read_byte(p) == 0);         // zero-page read with fault-around
                write_byte(p, 4);                                    // upgrade
                write_byte(p + 50 * ps, 5);                          // first write
                write_byte(p + 100 * ps, 6);                         // copy-before-write
                write_byte(p + 200 * ps, 7);                         // copy-before-write of a PROT_NONE page
                CHILD_CHECK(usermm_test::read_byte(file) == 0);      // a file read (major fault)
                write_byte(file + 32 * ps, 8);                       // a private file write
                CHILD_CHECK(usermm_test::read_byte(q) == 9);         // a swap-in (major fault)
                if (sigsetjmp(g_escape, 1) == 0) usermm_test::read_byte(g_unmapped);  // passed on
            });
            std::fprintf(stderr, "signal_stack_size %zu, AT_MINSIGSTKSZ %lu, floor %zu, usermm %zu (+%zu)\n", size,
                         getauxval(AT_MINSIGSTKSZ), floor, used, used - floor);
            CHILD_CHECK(used < size);
            CHILD_CHECK(used > floor);  // the faults did run on the alternate stack
            CHILD_CHECK(arena.stats().cow_faults == cow_before + 2);  // both copies happened on it
            CHILD_CHECK(swapped.stats().pages_swapped_in == 1);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
            // The handler's own depth: ~1.2 KiB for the first-half faults; ~2.9 KiB for a swap-in,
            // whose page list and the SwapFile's I/O vector live on this stack.
            CHILD_CHECK(used - floor < 3584);
#endif
        },
        kChildSeconds);
    MESSAGE(end.err);
    check_survived(end);
}

// Once a limit written nowhere: the 1,025th arena failed with ENOMEM. Each arena holds at least
// three kernel mappings, so vm.max_map_count (65,530) allows some 21,000; usermm allows 16,384.
TEST_CASE("a process may hold more than 1,024 arenas, each faulting apart") {
    const ChildEnd end = run_guarded(
        [] {
            std::vector<Arena> arenas;
            arenas.reserve(1100);
            for (int i = 0; i < 1100; ++i) arenas.emplace_back(page());
            for (std::size_t i = 0; i < arenas.size(); ++i)
                write_byte(arenas[i].map(page(), Prot::ReadWrite), std::uint8_t(i));
            for (std::size_t i = 0; i < arenas.size(); i += 99) {
                CHILD_CHECK(usermm_test::read_byte(arenas[i].base()) == std::uint8_t(i));
                CHILD_CHECK(arenas[i].stats().minor_faults == 1);
                arenas[i].verify();
            }
        },
        kChildSeconds);
    check_survived(end);
}
