// Helpers shared by the tests: deaths in forked children, volatile accesses the compiler cannot
// drop, and the kernel's own fault counters.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

namespace usermm_test {

// The page size from libc alone, for constants at namespace scope: usermm::page_size() sets the
// process up (signal handlers, engine, environment), which must wait for main.
inline std::size_t os_page_size() { return std::size_t(sysconf(_SC_PAGESIZE)); }

// ThreadSanitizer keeps most of the address space for its shadow (an arena of 1 TiB, or a 64 GiB
// snapshot store, cannot be reserved) and its allocator draws from RLIMIT_DATA: tests that need
// either are skipped there (doctest counts them as skipped; README, "Sanitizers").
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kSkipUnderTsan = true;
#else
inline constexpr bool kSkipUnderTsan = false;
#endif

// The sanitizers' allocators map memory of their own as they go, where malloc falls back to brk:
// in a process at vm.max_map_count their allocations fail (ENOMEM), and they die of it. Tests
// that allocate there are skipped under them.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSkipAtTheMappingLimit = true;
#else
inline constexpr bool kSkipAtTheMappingLimit = false;
#endif

// The store pool emptied and off while the object lives: a test of what snapshot copies cost in
// memory sees every copy commit a page of its own, whatever earlier cases released.
class NoStorePool {
public:
    NoStorePool() : limit_(usermm::set_snapshot_store_pool(0)) {}
    ~NoStorePool() { usermm::set_snapshot_store_pool(limit_); }
    NoStorePool(const NoStorePool&) = delete;
    NoStorePool& operator=(const NoStorePool&) = delete;

private:
    std::size_t limit_;
};

// A directory of the test's own, removed with the object even when a check fails. Under /tmp by
// default; /var/tmp for files that must be on a disk (a tmpfs would hold "evicted" pages in memory).
// Its path is canonical, as the kernel names files in /proc/self/fd and /proc/self/maps.
class TempDir {
public:
    explicit TempDir(const std::string& parent = "/tmp") {
        std::string pattern = parent + "/usermm-test-XXXXXX";
        if (!mkdtemp(pattern.data())) std::abort();
        path_ = std::filesystem::canonical(pattern).string();
    }
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    const std::string& path() const { return path_; }
    std::string file(std::string_view name) const { return path_ + "/" + std::string(name); }

private:
    std::string path_;
};

// How a forked child ended, with everything it wrote to stderr.
struct ChildEnd {
    bool exited = false;
    int exit_code = -1;
    int signal = 0;  // the signal that killed it, or 0
    std::string err;
};

// Runs `body` in a forked child whose stderr is captured. The child exits 0 if `body` returns;
// SIGALRM after `seconds` turns a hang into a death the test can tell from the expected one.
inline ChildEnd run_in_child(const std::function<void()>& body, unsigned seconds = 20) {
    int fds[2];
    if (pipe(fds) != 0) std::abort();
    std::fflush(nullptr);  // or the child would write the parent's buffered output again
    const pid_t pid = fork();
    if (pid < 0) std::abort();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        alarm(seconds);
        body();
        _exit(0);
    }
    close(fds[1]);
    ChildEnd end;
    char buf[4096];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) end.err.append(buf, std::size_t(n));
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    end.exited = WIFEXITED(status);
    if (end.exited) end.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) end.signal = WTERMSIG(status);
    return end;
}

inline std::uint8_t read_byte(const void* p) { return *static_cast<const volatile std::uint8_t*>(p); }
inline void write_byte(void* p, std::uint8_t v) { *static_cast<volatile std::uint8_t*>(p) = v; }
inline std::uint64_t read_u64(const void* p) { return *static_cast<const volatile std::uint64_t*>(p); }
inline void write_u64(void* p, std::uint64_t v) { *static_cast<volatile std::uint64_t*>(p) = v; }

inline void* at(void* base, std::size_t offset) { return static_cast<char*>(base) + offset; }

// Minor page faults the kernel counted for this thread (getrusage(RUSAGE_THREAD)).
inline long kernel_minor_faults() {
    rusage ru{};
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_minflt;
}

// vm.max_map_count: how many kernel mappings the process may hold.
inline long max_map_count() {
    FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r");
    long v = 65530;
    if (f) {
        if (std::fscanf(f, "%ld", &v) != 1) v = 65530;
        std::fclose(f);
    }
    return v;
}

// Maps single pages of the program's own, alternately readable and not so that none merge, until
// the kernel refuses one (vm.max_map_count); then gives `spare` of them back. The vector is
// reserved first: growing it later would take mappings itself.
inline std::vector<void*> use_up_mappings(std::size_t spare) {
    const std::size_t ps = os_page_size();
    std::vector<void*> mine;
    mine.reserve(std::size_t(max_map_count()) + 16);
    for (;;) {
        void* m = mmap(nullptr, ps, mine.size() % 2 ? PROT_READ : PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            if (errno != ENOMEM) std::_Exit(20);
            break;
        }
        mine.push_back(m);
    }
    // Unmapping a single page between two others leaves one mapping fewer.
    for (std::size_t i = 0; i < spare; ++i) munmap(mine[mine.size() / 2 + 2 * i], ps);
    return mine;
}

// Kernel mappings of the process (lines of /proc/self/maps).
inline long process_mappings() {
    FILE* f = std::fopen("/proc/self/maps", "r");
    long n = 0;
    for (int c; (c = std::fgetc(f)) != EOF;) n += c == '\n';
    std::fclose(f);
    return n;
}

// doctest's bookkeeping dies with a child, so a check inside one ends it with the failed expression
// on stderr, which the parent shows.
inline void child_check(bool ok, const char* what, int line) {
    if (ok) return;
    std::fprintf(stderr, "child check failed at line %d: %s\n", line, what);
    _exit(1);
}
#define CHILD_CHECK(cond) usermm_test::child_check(bool(cond), #cond, __LINE__)

// run_in_child, with an exception that escapes `body` ending the child with its message (rather
// than unwinding into the test runner's copy in the child).
inline ChildEnd run_guarded(const std::function<void()>& body, unsigned seconds) {
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

// Kernel mappings that lie inside [base, base + size), from /proc/self/maps.
inline long mappings_within(const void* base, std::size_t size) {
    const auto lo = reinterpret_cast<unsigned long>(base), hi = lo + size;
    FILE* f = std::fopen("/proc/self/maps", "r");
    if (!f) std::abort();
    long n = 0;
    unsigned long from, to;
    char line[512];
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "%lx-%lx", &from, &to) == 2 && from >= lo && to <= hi) ++n;
    std::fclose(f);
    return n;
}

// Runs `fn`, which must throw usermm::Error with `err` and a message containing every one of `parts`.
inline void child_expect_error(const std::function<void()>& fn, int err, std::initializer_list<std::string_view> parts,
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
#define CHILD_EXPECT_ERROR(expr, err, ...) usermm_test::child_expect_error([&] { expr; }, err, {__VA_ARGS__}, __LINE__)

// A child that returned from its body: exited 0 (its stderr shown otherwise).
inline void check_survived(const ChildEnd& end) {
    INFO("child stderr: " << end.err);
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
}

// UBSan's vptr check probes memory through pipe(2) at each miss of its type cache, which fails
// under EMFILE and then reads as an object of the wrong type: one error formatted while
// descriptors are free fills the cache for the types usermm's messages (and these tests) use.
inline void format_an_error(usermm::Arena& arena) {
    try {
        arena.map(0, usermm::Prot::Read);
    } catch (const usermm::Error& e) {
        const std::string what = e.what();  // and the calls the checks make on errors
        CHILD_CHECK(e.code().value() == EINVAL && !what.empty());
    }
}

}  // namespace usermm_test
