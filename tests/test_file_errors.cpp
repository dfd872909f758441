// File VMAs when the file system fails, with the kernel's own mechanisms: a sparse file's page that
// a full tmpfs cannot give a block gets SIGBUS at the write, as with mmap, with a diagnostic; and bad
// map_file / sync / advise arguments that change nothing. Write-back errors on command come from a
// FUSE file system of the tests' own (tests/failfs, test_file_writeback.cpp).
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

const std::size_t kPage = usermm_test::os_page_size();

std::string hex(std::uint64_t v) { return fmt::format("{:#x}", v); }
std::string hex(const void* p) { return hex(reinterpret_cast<std::uintptr_t>(p)); }
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
// Built with fmt: GCC 12 warns (-Wrestrict, a false positive) on "literal" + std::string.
std::string quoted(const std::string& path) { return fmt::format("'{}'", path); }

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

}  // namespace

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

// Whether a small tmpfs can be mounted here (root, a mount namespace of the process's own): asked
// once at start-up, before any thread, so that a case that needs one is reported skipped.
const bool g_tmpfs_ok = [] { return TinyTmpfs(1 << 20).ok(); }();

}  // namespace

// Protects: a real ENOSPC (no injection): writes to the holes of a sparse file on a full tmpfs get
// pages until the file system has no more; the write that finds none dies by SIGBUS, as with mmap,
// naming the file and the page, and the pages written before it are in the file.
TEST_CASE("a full tmpfs: a write to a hole that gets no page is SIGBUS naming the file; earlier writes stay" *
          doctest::skip(!g_tmpfs_ok)) {
    const std::size_t pages = 16;
    TinyTmpfs fs(pages * kPage);
    REQUIRE_MESSAGE(fs.ok(), fs.why());
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

    int progress[2];
    REQUIRE(pipe(progress) == 0);
    const usermm_test::ChildEnd end = in_child([&] {
        close(progress[0]);
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(data, 0, pages * kPage, Prot::ReadWrite, Share::Shared));
        for (std::size_t i = 0; i < pages; ++i) {
            write_byte(p + i * kPage, std::uint8_t(i + 1));
            const unsigned char done = static_cast<unsigned char>(i + 1);
            if (write(progress[1], &done, 1) != 1) _exit(kThrew);
        }
        _exit(kSurvived);
    });
    close(progress[1]);
    unsigned char last = 0;
    for (unsigned char b; read(progress[0], &b, 1) == 1;) last = b;
    close(progress[0]);
    INFO("child stderr: ", end.err);
    CHECK(end.signal == SIGBUS);
    CHECK(contains(end.err, "SIGBUS"));
    CHECK(contains(end.err, quoted(data)));
    CHECK(contains(end.err, "no space"));
    REQUIRE(last > 0);
    REQUIRE(last < pages);
    const std::vector<std::uint8_t> content = usermm_test::read_file(data);
    for (std::size_t i = 0; i < last; ++i) CHECK(content[i * kPage] == i + 1);
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

    for (const unsigned advice : {unsigned(Advice::Cold) + 1, 0x80000000u}) {
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
