// File VMAs when the file system fails: read errors and short reads (SIGBUS with a diagnostic, and
// never a zero or half-read page), write-back errors from the kernel (RLIMIT_FSIZE's EFBIG, a full
// tmpfs's ENOSPC) and from a hook (ENOSPC, EIO) that sync, unmap, advice and the destructor report
// without losing the dirty pages, and bad map_file / sync / advise arguments that change nothing.
//
// I/O errors on demand come from usermm::detail::set_file_io_hooks, which replaces the pread and
// pwrite of usermm's file I/O. The hooks below model a disk: a read that reaches a bad page returns
// the bytes before it (a short count) and the next read, at the bad page, fails; a failing write
// likewise writes what lies before the bad range first.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "file_test_util.hpp"
#include "page_ops.hpp"
#include "test_util.hpp"

namespace {

using usermm::Advice;
using usermm::Arena;
using usermm::Prot;
using usermm::Share;
using usermm_test::pattern_byte;
using usermm_test::read_byte;
using usermm_test::TempFile;
using usermm_test::write_byte;

[[maybe_unused]] const unsigned g_watchdog = alarm(60);

const std::size_t kPage = usermm::page_size();

std::string hex(std::uint64_t v) { return fmt::format("{:#x}", v); }
std::string hex(const void* p) { return hex(reinterpret_cast<std::uintptr_t>(p)); }
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
// Built with fmt: GCC 12 warns (-Wrestrict, a false positive) on "literal" + std::string.
std::string quoted(const std::string& path) { return fmt::format("'{}'", path); }
std::string byte_range(std::uint64_t from, std::uint64_t to) { return fmt::format("[{:#x}, {:#x})", from, to); }

// --- I/O hooks -----------------------------------------------------------------------------------
// Plain atomics: the read hook runs inside usermm's fault handler.

constexpr std::uint64_t kNever = UINT64_MAX;
constexpr unsigned char kPoison = 0xa5;  // what a failed or short read leaves in usermm's buffer

std::atomic<std::uint64_t> g_read_bad{kNever};    // media error: the page at this offset cannot be read
std::atomic<int> g_read_errno{EIO};
std::atomic<std::uint64_t> g_read_end{kNever};    // short read: reads stop here, before fstat's size
std::atomic<unsigned> g_read_calls{0};
std::atomic<unsigned> g_read_failures{0};

std::atomic<std::uint64_t> g_write_bad_from{kNever};  // writes reaching [from, to) fail
std::atomic<std::uint64_t> g_write_bad_to{kNever};
std::atomic<int> g_write_errno{EIO};                  // 0: the write makes no progress (returns 0)
std::atomic<std::uint64_t> g_write_ino{0};            // only writes to this inode fail (0: any)
std::atomic<unsigned> g_write_failures{0};

// A disk with a bad page at g_read_bad and (or) whose reads end at g_read_end. What it does not
// return is poisoned in the buffer, so that a page usermm wrongly took as read shows.
long disk_read(int fd, void* buf, std::size_t len, std::uint64_t off) {
    g_read_calls.fetch_add(1);
    const std::uint64_t bad = g_read_bad.load();
    const std::uint64_t end = g_read_end.load();
    std::size_t n = len;
    if (bad != kNever && off + len > bad && off < bad + kPage) {
        if (off >= bad) {
            std::memset(buf, kPoison, len);
            g_read_failures.fetch_add(1);
            errno = g_read_errno.load();
            return -1;
        }
        n = std::size_t(bad - off);
    }
    if (end != kNever) n = off >= end ? 0 : std::min<std::uint64_t>(n, end - off);
    const long got = n ? long(pread(fd, buf, n, off_t(off))) : 0;
    if (got >= 0) std::memset(static_cast<char*>(buf) + got, kPoison, len - std::size_t(got));
    return got;
}

long disk_write(int fd, const void* buf, std::size_t len, std::uint64_t off) {
    bool refuse = true;
    if (const std::uint64_t ino = g_write_ino.load()) {
        struct stat st;
        refuse = fstat(fd, &st) == 0 && std::uint64_t(st.st_ino) == ino;
    }
    const std::uint64_t from = g_write_bad_from.load(), to = g_write_bad_to.load();
    if (refuse && off + len > from && off < to) {
        if (off < from) return long(pwrite(fd, buf, std::size_t(from - off), off_t(off)));
        g_write_failures.fetch_add(1);
        if (const int err = g_write_errno.load()) {
            errno = err;
            return -1;
        }
        return 0;
    }
    return long(pwrite(fd, buf, len, off_t(off)));
}

// Installs the hooks for a scope; the real system calls come back at its end, whatever happens.
struct Hooks {
    Hooks(bool read, bool write) {
        reset();
        usermm::detail::set_file_io_hooks(read ? disk_read : nullptr, write ? disk_write : nullptr);
    }
    ~Hooks() {
        usermm::detail::set_file_io_hooks(nullptr, nullptr);
        reset();
    }
    Hooks(const Hooks&) = delete;
    Hooks& operator=(const Hooks&) = delete;
    static void reset() {
        g_read_bad = kNever;
        g_read_errno = EIO;
        g_read_end = kNever;
        g_read_calls = 0;
        g_read_failures = 0;
        g_write_bad_from = kNever;
        g_write_bad_to = kNever;
        g_write_errno = EIO;
        g_write_ino = 0;
        g_write_failures = 0;
    }
};

// --- helpers ---------------------------------------------------------------------------------------

struct Failure {
    bool thrown = false;
    int code = 0;
    std::string what;
};

template <typename Call>
Failure failure_of(Call&& call) {
    try {
        call();
    } catch (const usermm::Error& e) {
        return {true, e.code().value(), e.what()};
    }
    return {};
}

void expect_one_of(const Failure& f, std::initializer_list<int> codes, std::initializer_list<std::string> parts) {
    INFO("what(): ", f.what);
    REQUIRE_MESSAGE(f.thrown, "no usermm::Error was thrown");
    bool known = false;
    for (const int code : codes) known |= f.code == code;
    CHECK_MESSAGE(known, "errno ", f.code, " (", std::strerror(f.code), ")");
    for (const std::string& part : parts) CHECK_MESSAGE(contains(f.what, part), "missing ", part);
}

void expect(const Failure& f, int code, std::initializer_list<std::string> parts) { expect_one_of(f, {code}, parts); }

// Everything vmas() reports, counters included: a refused call changes none of it.
std::string listing(const Arena& arena) {
    std::string out;
    for (const usermm::VmaInfo& v : arena.vmas())
        out += fmt::format("{}+{:#x} {} '{}' fa {} file '{}' at {:#x} {}\n{}", v.start, v.length,
                           usermm::to_string(v.prot), v.name, v.fault_around_pages, v.file, v.offset,
                           v.share == Share::Shared ? "shared" : "private", usermm::format_stats(v.stats));
    return out;
}

// The layout alone, for calls that may count an error but must not change the VMAs.
std::string layout(const Arena& arena) {
    std::string out;
    for (const usermm::VmaInfo& v : arena.vmas())
        out += fmt::format("{}+{:#x} {} '{}' file '{}' at {:#x} {}\n", v.start, v.length, usermm::to_string(v.prot),
                           v.name, v.file, v.offset, v.share == Share::Shared ? "shared" : "private");
    return out;
}

usermm::Stats vma_stats(const Arena& arena) {
    const auto v = arena.vmas();
    REQUIRE(v.size() == 1);
    return v[0].stats;
}

int open_fds() {
    DIR* d = opendir("/proc/self/fd");
    REQUIRE(d != nullptr);
    int n = 0;
    while (readdir(d)) ++n;
    closedir(d);
    return n;
}

// The offset of the first byte of the page at file offset `off` that differs from the file's
// pattern, or -1 if the whole page matches.
long first_mismatch(const char* p, std::uint64_t off) {
    for (std::size_t i = 0; i < kPage; ++i)
        if (read_byte(p + off + i) != pattern_byte(off + i)) return long(off + i);
    return -1;
}

// Exit codes of children that must not get where they got.
constexpr int kSurvived = 70;  // an access that had to raise SIGBUS returned
constexpr int kThrew = 71;
constexpr int kWrongData = 72;

// run_in_child for bodies that use usermm: an exception must not carry the child back into doctest.
usermm_test::ChildEnd in_child(const std::function<void()>& body) {
    return usermm_test::run_in_child([&] {
        const rlimit no_core{0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        try {
            body();
        } catch (...) {
            _exit(kThrew);
        }
    });
}

// RLIMIT_FSIZE lowered for a scope, with SIGXFSZ ignored so that a write past it fails with EFBIG
// instead of killing the process; both restored at the end.
struct FsizeLimit {
    rlimit old{};
    struct sigaction old_action {};
    explicit FsizeLimit(std::uint64_t bytes) {
        struct sigaction ignore {};
        ignore.sa_handler = SIG_IGN;
        sigemptyset(&ignore.sa_mask);
        REQUIRE(sigaction(SIGXFSZ, &ignore, &old_action) == 0);
        REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
        const rlimit lower{rlim_t(bytes), old.rlim_max};
        REQUIRE(setrlimit(RLIMIT_FSIZE, &lower) == 0);
    }
    ~FsizeLimit() {
        setrlimit(RLIMIT_FSIZE, &old);
        sigaction(SIGXFSZ, &old_action, nullptr);
    }
};

}  // namespace

// --- read errors ---------------------------------------------------------------------------------

// Protects: an I/O error reading the page an access needs is SIGBUS, with a diagnostic naming the
// file and the offset, and leaves no page filled: the child shares the page cache (memfd and page
// states) with this process, which then reads the page from the file, by a major fault.
TEST_CASE("a read error on the page an access needs is SIGBUS naming file and offset, and fills nothing") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "disk"}));
    const std::uint64_t bad = 5 * kPage;
    const auto end = in_child([&] {
        Hooks hooks(true, false);
        g_read_bad = bad;
        (void)read_byte(p + bad + 17);
        _exit(kSurvived);
    });
    CHECK(end.signal == SIGBUS);
    INFO("child's stderr: ", end.err);
    CHECK(contains(end.err, fmt::format("usermm: SIGBUS: read at {}", hex(p + bad + 17))));
    CHECK(contains(end.err, quoted(file.path())));
    CHECK(contains(end.err, fmt::format("at offset {:#x}", bad)));

    CHECK(arena.stats().major_faults == 0);
    CHECK(first_mismatch(p, bad) == -1);  // the poison the hook left would show here
    CHECK(arena.stats().major_faults == 1);
    CHECK(arena.stats().file_pages_read >= 1);
    arena.verify();
}

// Protects: the same for a write as the first access of a shared VMA: SIGBUS, and neither the page
// cache nor the file gets anything.
TEST_CASE("a read error on a write fault of a shared VMA is SIGBUS, and the file keeps its bytes") {
    TempFile file(8 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    const std::uint64_t bad = 3 * kPage;
    const auto end = in_child([&] {
        Hooks hooks(true, false);
        g_read_bad = bad;
        write_byte(p + bad + 1, 0x42);
        _exit(kSurvived);
    });
    CHECK(end.signal == SIGBUS);
    INFO("child's stderr: ", end.err);
    CHECK(contains(end.err, fmt::format("usermm: SIGBUS: write at {}", hex(p + bad + 1))));
    CHECK(contains(end.err, fmt::format("at offset {:#x}", bad)));
    CHECK(first_mismatch(p, bad) == -1);
    arena.sync(p, file.size());
    CHECK(file.content() == file.expected());
    CHECK(vma_stats(arena).pages_dirtied == 0);
}

// Protects: the API's reads (prefault) throw on a read error instead of granting access; the pages
// read whole before the bad one stay in the page cache (as the kernel keeps them), the bad one does
// not, and after the error goes every page reads correctly.
TEST_CASE("prefault over a page that cannot be read throws its errno and grants nothing") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "disk"}));
    const std::string before = layout(arena);
    {
        Hooks hooks(true, false);
        g_read_bad = 5 * kPage;
        expect(failure_of([&] { arena.prefault(p + 5 * kPage, kPage, Prot::Read); }), EIO,
               {"usermm::Arena::prefault", quoted(file.path()), fmt::format("offset {:#x}", 5 * kPage)});
        expect(failure_of([&] { arena.prefault(p, 8 * kPage, Prot::Read); }), EIO,
               {"usermm::Arena::prefault", quoted(file.path()), fmt::format("offset {:#x}", 5 * kPage)});
        g_read_errno = ENXIO;  // whatever the errno, it is passed on
        expect(failure_of([&] { arena.prefault(p + 5 * kPage, kPage, Prot::Read); }), ENXIO, {file.path()});
        CHECK(g_read_failures.load() >= 3);  // each call met the bad page at least once
    }
    CHECK(layout(arena) == before);
    CHECK(vma_stats(arena).prefault_pages == 0);
    CHECK(vma_stats(arena).file_pages_read == 5);  // pages 0-4, read whole before the bad one
    arena.verify();
    CHECK(first_mismatch(p, 5 * kPage) == -1);
    CHECK(arena.stats().major_faults == 1);  // the bad page was not cached: its access reads the file
    for (std::size_t i = 0; i < 16; ++i) CHECK(first_mismatch(p, i * kPage) == -1);
}

// Protects: WillNeed is advice: a read error under it throws nothing and fills no page it could not
// read, so that the bad page is read from the file when it is accessed.
TEST_CASE("WillNeed over a page that cannot be read throws nothing and leaves that page unread") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    {
        Hooks hooks(true, false);
        g_read_bad = 5 * kPage;
        CHECK_NOTHROW(arena.advise(p, file.size(), Advice::WillNeed));
        CHECK(g_read_failures > 0);
    }
    CHECK(vma_stats(arena).file_pages_read < 16);
    const std::uint64_t majors = vma_stats(arena).major_faults;
    CHECK(first_mismatch(p, 5 * kPage) == -1);
    CHECK(vma_stats(arena).major_faults == majors + 1);
    for (std::size_t i = 0; i < 16; ++i) CHECK(first_mismatch(p, i * kPage) == -1);
    CHECK(vma_stats(arena).file_pages_read == 16);
    arena.verify();
}

// Protects: a bad page in a read-ahead window does not take its neighbours with it. The kernel reads
// the faulting page alone when its read-ahead fails, and gives SIGBUS only if that fails too.
// Once a bug: a read that failed after a short count was thrown away whole.
TEST_CASE("a read error in the read-ahead window does not kill an access to a good page") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    const auto end = in_child([&] {
        Hooks hooks(true, false);
        g_read_bad = 5 * kPage;
        if (first_mismatch(p, 0) != -1) _exit(kWrongData);
    });
    INFO("child's stderr: ", end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

// Protects: a read error is reported as one, with its errno, not as a short read.
// Once a bug: every EIO of a read that did not complete was called a short read.
TEST_CASE("a read error's diagnostic gives the errno and does not call it a short read") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(
        arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.fault_around_pages = 1}));
    arena.advise(p, file.size(), Advice::Random);  // the read is the faulting page alone
    const auto end = in_child([&] {
        Hooks hooks(true, false);
        g_read_bad = 5 * kPage;
        (void)read_byte(p + 5 * kPage);
        _exit(kSurvived);
    });
    REQUIRE(end.signal == SIGBUS);
    INFO("child's stderr: ", end.err);
    CHECK(contains(end.err, "errno 5"));
    CHECK(!contains(end.err, "short read"));
}

// --- short reads ---------------------------------------------------------------------------------

// Protects: a read that ends before the size fstat gave (the file shrank, or the file system lies)
// is SIGBUS for the page it did not reach, with a diagnostic saying so, and the half-read page is
// not filled for anyone.
TEST_CASE("a short read before the page an access needs is SIGBUS naming the short read; the half page is not kept") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "short"}));
    const std::uint64_t stop = 5 * kPage + 100;
    const auto end = in_child([&] {
        Hooks hooks(true, false);
        g_read_end = stop;
        (void)read_byte(p + 5 * kPage + 200);
        _exit(kSurvived);
    });
    CHECK(end.signal == SIGBUS);
    INFO("child's stderr: ", end.err);
    CHECK(contains(end.err, fmt::format("usermm: SIGBUS: read at {}", hex(p + 5 * kPage + 200))));
    CHECK(contains(end.err, "short read"));
    CHECK(contains(end.err, quoted(file.path())));
    CHECK(contains(end.err, fmt::format("at offset {:#x}", stop)));

    CHECK(first_mismatch(p, 5 * kPage) == -1);
    CHECK(arena.stats().major_faults == 1);
    arena.verify();
}

// Protects: a short read in a read-ahead window keeps the whole pages before the end of the data
// and neither fills nor maps the half page: once the reads are whole again, it is read anew.
TEST_CASE("a short read in a read-ahead window keeps the whole pages before it and exposes no half page") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    {
        Hooks hooks(true, false);
        g_read_end = 5 * kPage + 100;
        for (std::size_t i = 0; i < 5; ++i) CHECK(first_mismatch(p, i * kPage) == -1);
        CHECK(g_read_calls > 0);
        const usermm::Stats s = vma_stats(arena);
        CHECK(s.file_pages_read == 5);
        CHECK(s.major_faults == 1);
    }
    CHECK(first_mismatch(p, 5 * kPage) == -1);  // zeros or poison after byte 100 if the half page were kept
    CHECK(vma_stats(arena).major_faults == 2);
    for (std::size_t i = 6; i < 16; ++i) CHECK(first_mismatch(p, i * kPage) == -1);
    CHECK(vma_stats(arena).file_pages_read == 16);
    arena.verify();
}

// --- write-back errors ---------------------------------------------------------------------------

// Protects: a write-back past RLIMIT_FSIZE (a real EFBIG from the kernel) throws EFBIG naming the
// file and the byte range, keeps the pages dirty (a write after it is kept and counted once), and
// the next sync under the old limit makes the file match byte for byte.
TEST_CASE("sync past RLIMIT_FSIZE throws EFBIG naming file and range; the pages stay dirty for the next sync") {
    TempFile file(8 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    auto put = [&](std::size_t off, std::uint8_t v) {
        write_byte(p + off, v);
        want[off] = v;
    };
    put(kPage + 3, 0x11);
    put(6 * kPage + 9, 0x66);
    REQUIRE(vma_stats(arena).pages_dirtied == 2);
    Failure f;
    {
        FsizeLimit limit(4 * kPage);  // the file is 8 pages: page 6 lies past it
        f = failure_of([&] { arena.sync(p, file.size()); });
    }
    expect(f, EFBIG, {"usermm::Arena::sync", quoted(file.path()), byte_range(6 * kPage, 7 * kPage)});
    usermm::Stats s = vma_stats(arena);
    CHECK(s.writeback_errors == 1);
    CHECK(s.pages_written_back == 0);
    CHECK(file.content()[6 * kPage + 9] == pattern_byte(6 * kPage + 9));
    arena.verify();

    put(6 * kPage + 10, 0x67);  // the page is dirty already: not dirtied again
    CHECK(vma_stats(arena).pages_dirtied == 2);
    arena.sync(p, file.size());
    CHECK(file.content() == want);
    s = vma_stats(arena);
    CHECK(s.pages_written_back == 2);
    CHECK(s.bytes_written_back == 2 * kPage);
    CHECK(s.writeback_errors == 1);
    arena.verify();
}

// Protects: write-back errors from the file system (ENOSPC, EIO, a write that makes no progress)
// are thrown with their errno and the range, counted in writeback_errors, and lose nothing: the
// pages stay dirty through repeated failures and the first sync that can write them does.
TEST_CASE("sync: ENOSPC and EIO from the write are thrown and counted, and the pages stay dirty until written") {
    struct Mode {
        int hook_errno;
        int thrown;
    };
    for (const Mode mode : {Mode{ENOSPC, ENOSPC}, Mode{EIO, EIO}, Mode{0, EIO}}) {
        CAPTURE(mode.hook_errno);
        TempFile file(8 * kPage);
        std::vector<std::uint8_t> want = file.expected();
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        for (std::size_t off : {2 * kPage, 3 * kPage + 1, 6 * kPage + 2, 6 * kPage + kPage - 1}) {
            write_byte(p + off, 0xc3);
            want[off] = 0xc3;
        }
        {
            Hooks hooks(false, true);
            g_write_bad_from = 6 * kPage;
            g_write_bad_to = 7 * kPage;
            g_write_errno = mode.hook_errno;
            const std::string range = byte_range(6 * kPage, 7 * kPage);
            expect(failure_of([&] { arena.sync(p, file.size()); }), mode.thrown,
                   {"usermm::Arena::sync", quoted(file.path()), range, "dirty"});
            CHECK(arena.stats().writeback_errors == 1);
            CHECK(vma_stats(arena).writeback_errors == 1);
            // Still dirty: the next sync tries again, and fails again.
            expect(failure_of([&] { arena.sync(p + 4 * kPage, 4 * kPage); }), mode.thrown, {range});
            CHECK(vma_stats(arena).writeback_errors == 2);
            CHECK(g_write_failures == 2);
            // Pages the failing range does not hold are written on their own.
            arena.sync(p, 4 * kPage);
            CHECK(vma_stats(arena).pages_written_back == 2);
        }
        CHECK(file.content()[6 * kPage + 2] == pattern_byte(6 * kPage + 2));
        arena.verify();
        arena.sync(p, file.size());
        CHECK(file.content() == want);
        const usermm::Stats s = vma_stats(arena);
        CHECK(s.pages_written_back == 3);
        CHECK(s.writeback_errors == 2);
    }
}

// Protects: unmap writes back before it unmaps, and a failing write-back leaves the range mapped
// whole (no split), readable with the data written to it, and dirty.
TEST_CASE("unmap whose write-back fails throws and leaves the mapping intact, readable and dirty") {
    TempFile file(8 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    write_byte(p + 4 * kPage + 5, 0x99);
    want[4 * kPage + 5] = 0x99;
    const std::string before = layout(arena);
    {
        Hooks hooks(false, true);
        g_write_bad_from = 0;
        g_write_errno = ENOSPC;
        expect(failure_of([&] { arena.unmap(p + 2 * kPage, 4 * kPage); }), ENOSPC,
               {"usermm::Arena::unmap", quoted(file.path())});
        expect(failure_of([&] { arena.unmap(p, file.size()); }), ENOSPC, {"usermm::Arena::unmap", file.path()});
        CHECK(vma_stats(arena).writeback_errors == 2);
    }
    CHECK(layout(arena) == before);
    arena.verify();
    CHECK(read_byte(p + 4 * kPage + 5) == 0x99);
    CHECK(read_byte(p + 2 * kPage + 5) == pattern_byte(2 * kPage + 5));
    CHECK(file.content()[4 * kPage + 5] == pattern_byte(4 * kPage + 5));
    arena.sync(p, file.size());  // still dirty
    CHECK(vma_stats(arena).pages_written_back == 1);
    CHECK(file.content() == want);
    arena.unmap(p, file.size());
    CHECK(arena.vmas().empty());
    arena.verify();
}

// Protects: DontNeed writes dirty shared pages back before dropping them; if that fails it throws
// and drops nothing.
TEST_CASE("DontNeed whose write-back fails throws and drops nothing") {
    TempFile file(8 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    write_byte(p + kPage, 0x77);
    want[kPage] = 0x77;
    const std::string before = layout(arena);
    {
        Hooks hooks(false, true);
        g_write_bad_from = 0;
        expect(failure_of([&] { arena.advise(p, file.size(), Advice::DontNeed); }), EIO,
               {"usermm::Arena::advise", quoted(file.path())});
    }
    CHECK(layout(arena) == before);
    arena.verify();
    const std::uint64_t majors = vma_stats(arena).major_faults;
    CHECK(read_byte(p + kPage) == 0x77);
    CHECK(vma_stats(arena).major_faults == majors);  // not dropped: no read of the file
    arena.sync(p, file.size());
    CHECK(file.content() == want);
}

// Protects: the destructor cannot throw, so a failed write-back is reported on stderr with the file,
// the range and the error; the other files are still written.
TEST_CASE("the arena's destructor reports a failed write-back on stderr and writes the other files") {
    TempFile bad(4 * kPage), good(4 * kPage);
    struct stat st;
    REQUIRE(fstat(bad.fd(), &st) == 0);
    const auto end = in_child([&] {
        Hooks hooks(false, true);  // outlives the arena
        Arena arena(1 << 24);
        char* b = static_cast<char*>(arena.map_file(bad.path(), 0, bad.size(), Prot::ReadWrite, Share::Shared));
        char* g = static_cast<char*>(arena.map_file(good.path(), 0, good.size(), Prot::ReadWrite, Share::Shared));
        write_byte(b + kPage + 1, 0x5a);
        write_byte(g + 2 * kPage + 1, 0x5b);
        g_write_ino = std::uint64_t(st.st_ino);
        g_write_bad_from = 0;
        g_write_errno = ENOSPC;
    });
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    INFO("child's stderr: ", end.err);
    CHECK(contains(end.err, "usermm::Arena::~Arena"));
    CHECK(contains(end.err, quoted(bad.path())));
    CHECK(contains(end.err, byte_range(kPage, 2 * kPage)));
    CHECK(contains(end.err, std::strerror(ENOSPC)));
    CHECK(!contains(end.err, good.path()));
    CHECK(bad.content() == bad.expected());
    std::vector<std::uint8_t> want = good.expected();
    want[2 * kPage + 1] = 0x5b;
    CHECK(good.content() == want);
}

// --- a real ENOSPC -------------------------------------------------------------------------------

namespace {

// A tmpfs of `bytes` in a mount namespace of this process's own (unshared once, with private
// propagation so that nothing leaks to the host), unmounted at the end.
class TinyTmpfs {
public:
    explicit TinyTmpfs(std::size_t bytes) {
        static const int ns_err = [] {
            if (unshare(CLONE_NEWNS) != 0) return errno;
            if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return errno;
            return 0;
        }();
        if (ns_err) {
            why_ = std::string("unshare(CLONE_NEWNS): ") + std::strerror(ns_err);
            return;
        }
        const char* tmp = std::getenv("TMPDIR");
        dir_ = std::string(tmp && *tmp ? tmp : "/tmp") + "/usermm-tmpfs-XXXXXX";
        if (!mkdtemp(dir_.data())) {
            why_ = std::string("mkdtemp: ") + std::strerror(errno);
            dir_.clear();
            return;
        }
        const std::string opts = fmt::format("size={},mode=0700", bytes);
        if (mount("tmpfs", dir_.c_str(), "tmpfs", 0, opts.c_str()) != 0) {
            why_ = std::string("mount: ") + std::strerror(errno);
            return;
        }
        mounted_ = true;
    }
    ~TinyTmpfs() {
        if (mounted_) umount2(dir_.c_str(), MNT_DETACH);
        if (!dir_.empty()) rmdir(dir_.c_str());
    }
    TinyTmpfs(const TinyTmpfs&) = delete;
    TinyTmpfs& operator=(const TinyTmpfs&) = delete;
    bool ok() const { return mounted_; }
    const std::string& why() const { return why_; }
    std::string path(const char* name) const { return dir_ + "/" + name; }

private:
    std::string dir_;
    std::string why_;
    bool mounted_ = false;
};

std::vector<std::uint8_t> read_all(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    struct stat st;
    REQUIRE(fstat(fd, &st) == 0);
    std::vector<std::uint8_t> out(std::size_t(st.st_size));
    REQUIRE(pread(fd, out.data(), out.size(), 0) == ssize_t(out.size()));
    close(fd);
    return out;
}

}  // namespace

// Protects: a real ENOSPC (not a hook): dirty pages of a sparse file on a full tmpfs make sync throw
// ENOSPC; once another file is deleted, the next sync writes them all and the file matches.
TEST_CASE("a full tmpfs: sync of a sparse file throws ENOSPC, and succeeds once space is freed") {
    const std::size_t pages = 16;
    TinyTmpfs fs(pages * kPage);
    if (!fs.ok()) {
        MESSAGE("skipped: cannot mount a small tmpfs here (" << fs.why() << ")");
        return;
    }
    const std::string filler = fs.path("filler"), data = fs.path("data");
    {
        const int fd = open(filler.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        REQUIRE(fd >= 0);
        const std::vector<char> block(pages / 2 * kPage, 'x');
        REQUIRE(pwrite(fd, block.data(), block.size(), 0) == ssize_t(block.size()));
        close(fd);
        const int dfd = open(data.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
        REQUIRE(dfd >= 0);
        REQUIRE(ftruncate(dfd, off_t(pages * kPage)) == 0);  // sparse: no blocks yet
        close(dfd);
    }
    struct statvfs vfs;
    REQUIRE(statvfs(data.c_str(), &vfs) == 0);
    REQUIRE(std::uint64_t(vfs.f_bavail) * vfs.f_frsize < pages * kPage);  // the data cannot all fit

    std::vector<std::uint8_t> want(pages * kPage);
    {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(data, 0, pages * kPage, Prot::ReadWrite, Share::Shared));
        for (std::size_t i = 0; i < pages * kPage; i += 64) {
            const std::uint8_t v = std::uint8_t(pattern_byte(i) | 1);
            write_byte(p + i, v);
            want[i] = v;
        }
        expect(failure_of([&] { arena.sync(p, pages * kPage); }), ENOSPC,
               {"usermm::Arena::sync", quoted(data), "dirty"});
        CHECK(vma_stats(arena).writeback_errors == 1);
        REQUIRE(unlink(filler.c_str()) == 0);
        const Failure again = failure_of([&] { arena.sync(p, pages * kPage); });
        CHECK_MESSAGE(!again.thrown, again.what);
        CHECK(read_all(data) == want);
        const usermm::Stats s = vma_stats(arena);
        CHECK(s.pages_written_back == pages);
        CHECK(s.writeback_errors == 1);
        arena.unmap(p, pages * kPage);  // usermm's descriptors go before the unmount
    }
}

// --- bad input -----------------------------------------------------------------------------------

// Protects: map_file refuses what mmap(2) refuses (overflowing offset + length, length 0, a
// write-only or O_PATH descriptor, unknown prot or share), names it, and changes nothing: same VMAs
// and counters, verify() passes, no descriptor kept.
TEST_CASE("map_file refuses bad arguments, names them, and changes nothing") {
    TempFile file(4 * kPage);
    Arena arena(1 << 24);
    char* anon = static_cast<char*>(arena.map(4 * kPage, Prot::ReadWrite, {.name = "anon"}));
    write_byte(anon, 1);
    char* f = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    write_byte(f + kPage, 0x42);
    const int wo = open(file.path().c_str(), O_WRONLY | O_CLOEXEC);
    const int op = open(file.path().c_str(), O_PATH | O_CLOEXEC);
    REQUIRE(wo >= 0);
    REQUIRE(op >= 0);
    const std::string before = listing(arena);
    const int fds = open_fds();
    auto unchanged = [&] {
        CHECK(listing(arena) == before);
        CHECK_NOTHROW(arena.verify());
        CHECK(open_fds() == fds);
    };

    const std::uint64_t top = UINT64_MAX & ~std::uint64_t(kPage - 1);
    expect(failure_of([&] { arena.map_file(file.fd(), top, kPage, Prot::Read, Share::Private); }), EOVERFLOW,
           {"usermm::Arena::map_file", "offset", hex(top)});
    unchanged();
    expect(failure_of([&] { arena.map_file(file.path(), top, kPage, Prot::Read, Share::Private); }), EOVERFLOW,
           {"offset", hex(top)});
    unchanged();
    // Neither overflows alone; their sum does.
    const std::size_t huge = SIZE_MAX - 4 * kPage + 1;
    expect(failure_of([&] { arena.map_file(file.fd(), 8 * kPage, huge, Prot::Read, Share::Private); }), EOVERFLOW,
           {"offset", hex(8 * kPage), "length", hex(huge)});
    unchanged();
    // An offset mmap(2) would see as negative.
    expect(failure_of([&] { arena.map_file(file.fd(), std::uint64_t(1) << 63, kPage, Prot::Read, Share::Private); }),
           EOVERFLOW, {"offset", hex(std::uint64_t(1) << 63)});
    unchanged();
    expect(failure_of([&] { arena.map_file(file.fd(), 0, 0, Prot::Read, Share::Private); }), EINVAL,
           {"usermm::Arena::map_file", "length"});
    unchanged();
    expect(failure_of([&] { arena.map_file(wo, 0, kPage, Prot::Read, Share::Private); }), EACCES,
           {"usermm::Arena::map_file", fmt::format("fd {}", wo), "reading"});
    unchanged();
    expect(failure_of([&] { arena.map_file(wo, 0, kPage, Prot::ReadWrite, Share::Shared); }), EACCES,
           {fmt::format("fd {}", wo)});
    unchanged();
    // mmap(2) says EBADF for an O_PATH descriptor; usermm says it is not open for reading.
    expect_one_of(failure_of([&] { arena.map_file(op, 0, kPage, Prot::Read, Share::Private); }), {EACCES, EBADF},
                  {"usermm::Arena::map_file", fmt::format("fd {}", op)});
    unchanged();
    expect(failure_of([&] { arena.map_file(file.fd(), 0, kPage, Prot(8), Share::Private); }), EINVAL,
           {"usermm::Arena::map_file", "prot", "0x8"});
    unchanged();
    expect(failure_of([&] { arena.map_file(file.fd(), 0, kPage, Prot(0x11), Share::Shared); }), EINVAL,
           {"prot", "0x11"});
    unchanged();
    expect(failure_of([&] { arena.map_file(file.fd(), 0, kPage, Prot::Read, Share(2)); }), EINVAL,
           {"usermm::Arena::map_file", "share"});
    unchanged();
    close(wo);
    close(op);
    // The data written before is intact and reaches the file.
    CHECK(read_byte(f + kPage) == 0x42);
    CHECK(read_byte(anon) == 1);
    arena.sync(f, file.size());
    CHECK(file.content()[kPage] == 0x42);
}

// Protects: sync and advise validate before acting: an unknown advice is EINVAL, a range not wholly
// mapped is ENOMEM (as msync and madvise say), and a refused call neither writes nor drops nor splits.
TEST_CASE("sync and advise: unknown advice is EINVAL, an unmapped range is ENOMEM, and nothing changes") {
    TempFile file(8 * kPage);
    Arena arena(1 << 24);
    char* base = static_cast<char*>(arena.base());
    char* p = static_cast<char*>(
        arena.map_file(file.path(), 0, 4 * kPage, Prot::ReadWrite, Share::Shared, {.address = base + 8 * kPage}));
    write_byte(p + 3 * kPage, 0x33);
    const std::string before = listing(arena);
    const std::vector<std::uint8_t> content = file.content();
    auto unchanged = [&] {
        CHECK(listing(arena) == before);
        CHECK_NOTHROW(arena.verify());
        CHECK(file.content() == content);
    };

    for (const unsigned advice : {5u, 0x80000000u}) {
        expect(failure_of([&] { arena.advise(p, kPage, Advice(advice)); }), EINVAL,
               {"usermm::Arena::advise", "advice", std::to_string(advice)});
        unchanged();
    }
    char* const past = p + 4 * kPage;
    // Across the end of the VMA, wholly outside it, and from a hole into it.
    const std::initializer_list<std::pair<char*, std::size_t>> ranges = {
        {p + 3 * kPage, 2 * kPage}, {past, kPage}, {p - kPage, 2 * kPage}};
    for (const auto& [addr, length] : ranges) {
        CAPTURE(hex(addr));
        const std::string hole = hex(addr < p ? addr : past);
        expect(failure_of([&] { arena.sync(addr, length); }), ENOMEM, {"usermm::Arena::sync", "not mapped", hole});
        unchanged();
        for (const Advice advice : {Advice::DontNeed, Advice::WillNeed, Advice::Random}) {
            CAPTURE(unsigned(advice));
            expect(failure_of([&] { arena.advise(addr, length, advice); }), ENOMEM,
                   {"usermm::Arena::advise", "not mapped", hole});
            unchanged();
        }
    }
    // The dirty page was neither written nor dropped: it holds the write, and sync takes it now.
    CHECK(read_byte(p + 3 * kPage) == 0x33);
    arena.sync(p, 4 * kPage);
    CHECK(file.content()[3 * kPage] == 0x33);
    CHECK(vma_stats(arena).pages_written_back == 1);
}
