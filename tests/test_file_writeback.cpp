// Write-back that loses nothing, through a real file system that fails writes on command: failfs
// (tests/failfs/failfs.cpp), a FUSE mount passing through to a backing directory. A failed sync
// throws the errno naming the file and a byte range and counts the error; the next sync writes
// what the program wrote, also when the page cache was dropped in between, when the program wrote
// the page again, and when the VMA goes (unmap, the arena's destruction) instead. The backing file
// is read directly, not through FUSE, so what is checked is what reached the disk.
//
// The kernel's own mmap + msync on the same file system is the baseline: its msync reports the EIO
// once, marks the pages clean, and the data never reaches the file.
//
// failfs is mounted once per process at static initialisation, before any thread exists, in a
// mount namespace of the process's own with private propagation, so that nothing leaks onto the
// host. Without libfuse3 at build time, root, /dev/fuse or the mount, every case here is skipped.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "file_test_util.hpp"
#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm::Share;
using usermm_test::pattern_byte;

[[maybe_unused]] const unsigned g_watchdog = alarm(60);

const std::size_t kPage = usermm_test::os_page_size();
constexpr long kFuseSuperMagic = 0x65735546;

// The failfs mount of this process, or why there is none.
class FailFs {
public:
    FailFs() : owner_(getpid()) {
#ifdef USERMM_FAILFS
        if (geteuid() != 0) {
            why_not_ = "not root";
            return;
        }
        if (access("/dev/fuse", R_OK | W_OK) != 0) {
            why_not_ = fmt::format("/dev/fuse: {}", std::strerror(errno));
            return;
        }
        if (unshare(CLONE_NEWNS) != 0 || mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
            why_not_ = fmt::format("a private mount namespace: {}", std::strerror(errno));
            return;
        }
        const char* tmp = std::getenv("TMPDIR");
        root_ = std::string(tmp && *tmp ? tmp : "/tmp") + "/usermm-failfs-XXXXXX";
        if (!mkdtemp(root_.data())) {
            why_not_ = fmt::format("mkdtemp: {}", std::strerror(errno));
            root_.clear();
            return;
        }
        backing_ = root_ + "/backing";
        mnt_ = root_ + "/mnt";
        if (mkdir(backing_.c_str(), 0700) != 0 || mkdir(mnt_.c_str(), 0700) != 0) {
            why_not_ = fmt::format("mkdir: {}", std::strerror(errno));
            return;
        }
        start(USERMM_FAILFS);
#else
        why_not_ = "built without libfuse3";
#endif
    }
    ~FailFs() {
        if (getpid() != owner_) return;  // a forked child that exit()s leaves the parent's mount alone
        if (daemon_ > 0) {
            // The daemon ends when its file system is unmounted; if something still holds it, the
            // detached mount goes with the last reference and SIGTERM ends the daemon.
            if (umount2(mnt_.c_str(), 0) != 0) {
                umount2(mnt_.c_str(), MNT_DETACH);
                kill(daemon_, SIGTERM);
            }
            int status = 0;
            while (waitpid(daemon_, &status, 0) < 0 && errno == EINTR) {
            }
        }
        std::error_code ec;
        if (!root_.empty()) std::filesystem::remove_all(root_, ec);
    }
    FailFs(const FailFs&) = delete;
    FailFs& operator=(const FailFs&) = delete;

    bool up() const { return daemon_ > 0; }
    const std::string& why_not() const { return why_not_; }
    std::string path(const std::string& name) const { return mnt_ + "/" + name; }
    std::string backing_path(const std::string& name) const { return backing_ + "/" + name; }

    // Applies a failfs command ("EIO 3", "ENOSPC all", "off"): failfs has when this returns true.
    bool command(const std::string& cmd) const {
        const int fd = open(path(".failctl").c_str(), O_WRONLY | O_CLOEXEC);
        const ssize_t n = fd >= 0 ? write(fd, cmd.data(), cmd.size()) : -1;
        if (n != ssize_t(cmd.size())) std::fprintf(stderr, "failfs command '%s': %s\n", cmd.c_str(), std::strerror(errno));
        if (fd >= 0) close(fd);
        return n == ssize_t(cmd.size());
    }

    // failfs's counts of WRITE requests written and failed, FSYNC requests, and writes since the
    // last fsync.
    struct Status {
        unsigned long writes = 0, failed = 0, fsyncs = 0, unsynced = 0, reads = 0, reads_in_flight = 0;
    };
    Status status() const {
        const int fd = open(path(".failctl").c_str(), O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        char buf[256] = {};
        const ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        REQUIRE(n > 0);
        Status s;
        REQUIRE(std::sscanf(buf, "writes %lu failed %lu fsyncs %lu unsynced %lu reads %lu inflight %lu", &s.writes,
                            &s.failed, &s.fsyncs, &s.unsynced, &s.reads, &s.reads_in_flight) == 6);
        return s;
    }

private:
    // Starts the daemon, which writes one byte to the pipe once the kernel has mounted the file
    // system; the daemon's end closing without it means the mount failed.
    void start(const char* binary) {
        int ready[2];
        if (pipe2(ready, O_CLOEXEC) != 0) {
            why_not_ = fmt::format("pipe: {}", std::strerror(errno));
            return;
        }
        const pid_t pid = fork();
        if (pid < 0) {
            why_not_ = fmt::format("fork: {}", std::strerror(errno));
            return;
        }
        if (pid == 0) {
            // The daemon must not outlive the test (a namespace of its own keeps the mount alive).
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != owner_) _exit(1);
            fcntl(ready[1], F_SETFD, 0);
            const std::string fd = std::to_string(ready[1]);
            execl(binary, "failfs", backing_.c_str(), mnt_.c_str(), fd.c_str(), static_cast<char*>(nullptr));
            _exit(127);
        }
        close(ready[1]);
        pollfd pfd{ready[0], POLLIN, 0};
        char byte = 0;
        const bool ready_seen = poll(&pfd, 1, 20'000) == 1 && read(ready[0], &byte, 1) == 1;
        close(ready[0]);
        struct statfs sfs {};
        if (ready_seen && statfs(mnt_.c_str(), &sfs) == 0 && long(sfs.f_type) == kFuseSuperMagic) {
            daemon_ = pid;
            return;
        }
        why_not_ = "failfs did not mount";
        kill(pid, SIGTERM);
        int status = 0;
        waitpid(pid, &status, 0);
    }

    pid_t owner_;
    pid_t daemon_ = -1;
    std::string root_, backing_, mnt_;
    std::string why_not_;
};

FailFs g_fs;

bool failfs_up() {
    if (!g_fs.up()) std::fprintf(stderr, "test_file_writeback: skipped, failfs unavailable: %s\n", g_fs.why_not().c_str());
    return g_fs.up();
}
const bool g_failfs_up = failfs_up();

// Whether `echo 1 > /proc/sys/vm/drop_caches` can work here (a read-only /proc/sys refuses it).
bool drop_caches_writable() {
    const int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return false;
    close(fd);
    return true;
}

// Writes fail with `cmd` ("EIO all") for this object's lifetime: a check that fails in between
// must not leave the file system failing for the next case.
class FailingWrites {
public:
    explicit FailingWrites(const std::string& cmd) { REQUIRE(g_fs.command(cmd)); }
    ~FailingWrites() { CHECK(g_fs.command("off")); }
    FailingWrites(const FailingWrites&) = delete;
    FailingWrites& operator=(const FailingWrites&) = delete;
};

// A file on failfs, written through the mount with the offset pattern; removed at the end.
class FuseFile {
public:
    FuseFile(const std::string& name, std::size_t pages) : name_(name), size_(pages * kPage) {
        const int fd = open(path().c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        REQUIRE(fd >= 0);
        const std::vector<std::uint8_t> bytes = expected();
        REQUIRE(pwrite(fd, bytes.data(), bytes.size(), 0) == ssize_t(bytes.size()));
        close(fd);
    }
    ~FuseFile() { unlink(path().c_str()); }
    FuseFile(const FuseFile&) = delete;
    FuseFile& operator=(const FuseFile&) = delete;

    std::string path() const { return g_fs.path(name_); }
    std::size_t size() const { return size_; }
    std::vector<std::uint8_t> expected() const {
        std::vector<std::uint8_t> out(size_);
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = pattern_byte(i);
        return out;
    }
    // What reached the disk: the backing file, read beside FUSE.
    std::vector<std::uint8_t> on_disk() const { return usermm_test::read_file(g_fs.backing_path(name_)); }
    // Drops the file's clean pages from the page cache (those no mapping holds), as reclaim would.
    void fadvise_dontneed() const {
        const int fd = open(path().c_str(), O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        CHECK(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0);
        close(fd);
    }

private:
    std::string name_;
    std::size_t size_;
};

// The program's writes: page `page` filled with `value`, in the mapping and in `want`.
void fill_page(char* p, std::vector<std::uint8_t>& want, std::size_t page, std::uint8_t value) {
    std::memset(p + page * kPage, value, kPage);
    std::memset(want.data() + page * kPage, value, kPage);
}

struct Thrown {
    bool threw = false;
    int code = 0;
    std::string what;
};

Thrown error_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const usermm::Error& e) {
        return {true, e.code().value(), e.what()};
    }
    return {};
}

// The error's errno, and the file it names.
void check_error(const Thrown& t, int err, const FuseFile& file) {
    INFO("error: ", t.what);
    REQUIRE(t.threw);
    CHECK(t.code == err);
    CHECK(t.what.find(file.path()) != std::string::npos);
}

// Those, and a range it names ("[0x1000, 0x3000)", as every usermm error names one) that holds one
// of the pages whose write-back failed: bytes of the file, or the addresses of the VMA that maps
// it at `p`.
void check_names(const Thrown& t, int err, const FuseFile& file, const char* p,
                 std::initializer_list<std::size_t> failed_pages) {
    check_error(t, err, file);
    INFO("error: ", t.what);
    const std::regex range(R"(\[0x([0-9a-f]+), 0x([0-9a-f]+)\))");
    const auto base = reinterpret_cast<std::uintptr_t>(p);
    bool named = false;
    for (auto it = std::sregex_iterator(t.what.begin(), t.what.end(), range); it != std::sregex_iterator(); ++it) {
        const std::uint64_t from = std::stoull((*it)[1].str(), nullptr, 16), to = std::stoull((*it)[2].str(), nullptr, 16);
        for (std::size_t page : failed_pages)
            for (const std::uint64_t start : {std::uint64_t(0), std::uint64_t(base)})
                named = named || (from < to && start + page * kPage >= from && start + (page + 1) * kPage <= to &&
                                  to <= start + file.size());
    }
    CHECK(named);
}

// The page cache loses the file's clean pages, as under memory pressure: those no mapping holds
// (fadvise) and the VMA's own (the kernel's reclaim).
void drop_pages(const FuseFile& file, char* p) {
    file.fadvise_dontneed();
    CHECK(madvise(p, file.size(), MADV_PAGEOUT) == 0);
}

const char* errno_name(int err) { return err == EIO ? "EIO" : "ENOSPC"; }

// How the page cache loses the pages between the failed and the next sync: not at all; by
// POSIX_FADV_DONTNEED or drop_caches, which drop the clean pages no mapping holds; or by the
// kernel's reclaim of the VMA's own pages (MADV_PAGEOUT), as memory pressure would take them.
enum class Drop { Nothing, Fadvise, DropCaches, Reclaim };

// Dirty pages 1, 2 and 5 of a shared VMA, a sync whose writes all fail with `err`, the page cache
// dropped or not, then a sync that can write: the file holds what the program wrote.
void failed_sync_then_sync(int err, Drop drop) {
    FuseFile file(fmt::format("{}-{}", errno_name(err), int(drop)), 8);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 1, 0x11);
    fill_page(p, want, 2, 0x22);
    fill_page(p, want, 5, 0x55);
    const usermm::Stats before = arena.stats();
    const FailFs::Status fs_before = g_fs.status();
    {
        FailingWrites failing(fmt::format("{} all", errno_name(err)));
        check_names(error_of([&] { arena.sync(p, file.size()); }), err, file, p, {1, 2, 5});
    }
    CHECK(arena.stats().writeback_errors > before.writeback_errors);
    CHECK(g_fs.status().failed > fs_before.failed);
    CHECK(file.on_disk() == file.expected());  // failfs refused every write

    if (drop != Drop::Nothing) file.fadvise_dontneed();
    if (drop == Drop::DropCaches) {
        const int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        CHECK(write(fd, "1", 1) == 1);
        close(fd);
    }
    if (drop == Drop::Reclaim) CHECK(madvise(p, file.size(), MADV_PAGEOUT) == 0);
    const usermm::Stats failed = arena.stats();
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
    CHECK(g_fs.status().unsynced == 0);
    CHECK(arena.stats().pages_written_back - failed.pages_written_back >= 3);
    CHECK(std::memcmp(p, want.data(), want.size()) == 0);  // and the program still reads its writes
}

}  // namespace

// --- failfs itself and the kernel's baseline -----------------------------------------------------

// Protects: the mechanism. failfs fails exactly the writes it is told to, with the errno it is
// told, and passes the others to the backing file.
TEST_CASE("failfs fails the next N writes with the errno it is told, then writes again" * doctest::skip(!g_failfs_up)) {
    FuseFile file("count", 2);
    const int fd = open(file.path().c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    const char x = 'x';
    {
        FailingWrites failing("ENOSPC 2");
        for (int i = 0; i < 2; ++i) {
            errno = 0;
            CHECK(pwrite(fd, &x, 1, 0) == -1);
            CHECK(errno == ENOSPC);
        }
        CHECK(pwrite(fd, &x, 1, 0) == 1);  // the third write goes through
    }
    close(fd);
    std::vector<std::uint8_t> want = file.expected();
    want[0] = 'x';
    CHECK(file.on_disk() == want);
}

// Protects: the kernel's shared mmap works on failfs (write, msync, the file has it), and shows
// what usermm must do better. After a failed write-back the kernel marks the page clean: msync
// reports EIO once, the next msync succeeds writing nothing, and once reclaim takes the page, the
// program's write is gone from memory too (Linux's behaviour: the error is reported once, through
// the errseq of 4.13, and the data is not kept).
TEST_CASE("the kernel's mmap on failfs: msync reports EIO once, then the write is lost" * doctest::skip(!g_failfs_up)) {
    FuseFile file("kernel", 4);
    std::vector<std::uint8_t> want = file.expected();
    const int fd = open(file.path().c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    void* m = mmap(nullptr, file.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    REQUIRE(m != MAP_FAILED);
    char* p = static_cast<char*>(m);
    fill_page(p, want, 1, 0x11);
    REQUIRE(msync(p, file.size(), MS_SYNC) == 0);
    CHECK(file.on_disk() == want);

    const std::vector<std::uint8_t> before_failure = want;
    fill_page(p, want, 2, 0x22);
    {
        FailingWrites failing("EIO all");
        errno = 0;
        CHECK(msync(p, file.size(), MS_SYNC) == -1);
        CHECK(errno == EIO);
    }
    CHECK(msync(p, file.size(), MS_SYNC) == 0);
    CHECK(std::memcmp(p, want.data(), want.size()) == 0);  // still in memory ...
    CHECK(file.on_disk() == before_failure);                // ... but never written
    // Reclaim, as memory pressure would: the clean page goes, and the mapping reads the disk's.
    // MADV_PAGEOUT is best effort (a page still in a CPU's LRU batch is not isolated), so it is
    // asked again until mincore says the pages are gone.
    auto resident = [&] {
        std::vector<unsigned char> vec(file.size() / kPage);
        REQUIRE(mincore(p, file.size(), vec.data()) == 0);
        return std::any_of(vec.begin(), vec.end(), [](unsigned char c) { return c & 1; });
    };
    for (int tries = 0; tries < 100 && resident(); ++tries) {
        CHECK(madvise(p, file.size(), MADV_PAGEOUT) == 0);
        sched_yield();
    }
    REQUIRE_FALSE(resident());
    CHECK(std::memcmp(p, before_failure.data(), before_failure.size()) == 0);
    munmap(m, file.size());
    close(fd);
}

// --- usermm's sync --------------------------------------------------------------------------------

// Protects: sync makes the pages durable: the file system sees their writes, then an fsync.
TEST_CASE("sync writes the dirty pages, then fsyncs them" * doctest::skip(!g_failfs_up)) {
    FuseFile file("durable", 4);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 3, 0x33);
    const FailFs::Status before = g_fs.status();
    arena.sync(p, file.size());
    const FailFs::Status after = g_fs.status();
    CHECK(after.writes > before.writes);
    CHECK(after.fsyncs > before.fsyncs);
    CHECK(after.unsynced == 0);
    CHECK(after.failed == before.failed);
    CHECK(file.on_disk() == want);
}

// Protects: contract item 5 for EIO: the error, its message and count, and nothing lost.
TEST_CASE("a sync failing with EIO throws it naming file and range; the next sync writes everything" *
          doctest::skip(!g_failfs_up)) {
    failed_sync_then_sync(EIO, Drop::Nothing);
}

TEST_CASE("a sync failing with ENOSPC throws it naming file and range; the next sync writes everything" *
          doctest::skip(!g_failfs_up)) {
    failed_sync_then_sync(ENOSPC, Drop::Nothing);
}

// Protects: the kernel marks the pages clean after the failed write-back; a page cache drop then
// takes the program's data away unless usermm kept it.
TEST_CASE("a failed sync, the page cache dropped (fadvise), then a sync: nothing lost" * doctest::skip(!g_failfs_up)) {
    failed_sync_then_sync(EIO, Drop::Fadvise);
    failed_sync_then_sync(ENOSPC, Drop::Fadvise);
}

TEST_CASE("a failed sync, the page cache dropped (drop_caches), then a sync: nothing lost" *
          doctest::skip(!g_failfs_up || !drop_caches_writable())) {
    failed_sync_then_sync(EIO, Drop::DropCaches);
}

TEST_CASE("a failed sync, the VMA's pages reclaimed (MADV_PAGEOUT), then a sync: nothing lost" *
          doctest::skip(!g_failfs_up)) {
    failed_sync_then_sync(EIO, Drop::Reclaim);
}

// Protects: the failed write of one range does not stop, and is not confused with, the write of
// another: with only the first write request failing, the next sync still writes every page.
TEST_CASE("a sync of which one write fails: the error names a failed page, the next sync writes all" *
          doctest::skip(!g_failfs_up)) {
    FuseFile file("one", 8);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 1, 0x11);
    fill_page(p, want, 6, 0x66);
    {
        FailingWrites failing("EIO 1");
        check_names(error_of([&] { arena.sync(p, file.size()); }), EIO, file, p, {1, 6});
    }
    CHECK(file.on_disk() != want);
    drop_pages(file, p);
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
}

// Protects: what the next sync writes after a failure is the newest content, not a copy taken at
// the failure, and a write after the failure changes the program's page, not the disk's.
TEST_CASE("a page written again after a failed sync: the file ends with the newest content" *
          doctest::skip(!g_failfs_up)) {
    FuseFile file("rewrite", 8);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 1, 0x11);
    fill_page(p, want, 3, 0x33);
    {
        FailingWrites failing("EIO all");
        check_names(error_of([&] { arena.sync(p, file.size()); }), EIO, file, p, {1, 3});
    }
    drop_pages(file, p);  // the rewrite of part of page 3 must build on what the program wrote
    fill_page(p, want, 1, 0x12);
    std::memset(p + 3 * kPage + 100, 0x34, 10);
    std::memset(want.data() + 3 * kPage + 100, 0x34, 10);
    drop_pages(file, p);
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
}

// Protects: unmap writes back first; a failing write-back makes unmap throw and unmap nothing, and
// the unmap that can write loses nothing of what the failed sync did not write.
TEST_CASE("unmap after a failed sync: throws while writes fail, then writes everything" * doctest::skip(!g_failfs_up)) {
    FuseFile file("unmap", 8);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 2, 0x22);
    fill_page(p, want, 7, 0x77);
    {
        FailingWrites failing("ENOSPC all");
        check_names(error_of([&] { arena.sync(p, file.size()); }), ENOSPC, file, p, {2, 7});
        check_error(error_of([&] { arena.unmap(p, file.size()); }), ENOSPC, file);
    }
    CHECK(std::memcmp(p, want.data(), want.size()) == 0);  // still mapped, with the program's data
    drop_pages(file, p);
    arena.unmap(p, file.size());
    CHECK(file.on_disk() == want);
}

// Protects: the arena's destructor writes back what a failed sync left, or says on stderr that it
// could not: never silent.
TEST_CASE("the arena's destruction after a failed sync writes everything" * doctest::skip(!g_failfs_up)) {
    FuseFile file("destroy", 8);
    std::vector<std::uint8_t> want = file.expected();
    {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        fill_page(p, want, 0, 0x01);
        fill_page(p, want, 4, 0x44);
        {
            FailingWrites failing("EIO all");
            check_names(error_of([&] { arena.sync(p, file.size()); }), EIO, file, p, {0, 4});
        }
        drop_pages(file, p);
    }
    CHECK(file.on_disk() == want);
}

TEST_CASE("the arena's destruction whose write-back fails says so on stderr, naming the file" *
          doctest::skip(!g_failfs_up)) {
    FuseFile file("destroy-fails", 4);
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            FailingWrites failing("EIO all");  // outlives the arena
            Arena arena(1 << 24);
            char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
            std::memset(p + kPage, 0x5a, kPage);
        },
        30);
    usermm_test::check_survived(end);
    CHECK(end.err.find(file.path()) != std::string::npos);
    CHECK(end.err.find(std::strerror(EIO)) != std::string::npos);
}

// --- reads: errors and a slow disk ----------------------------------------------------------------

namespace {

// Sets failfs's read behaviour for a scope; reads are good (and released) again at the end.
class ReadMode {
public:
    explicit ReadMode(const std::string& cmd) { REQUIRE(g_fs.command(cmd)); }
    ~ReadMode() { g_fs.command("read-off"); }
    ReadMode(const ReadMode&) = delete;
    ReadMode& operator=(const ReadMode&) = delete;
};

}  // namespace

// Protects "I/O errors while reading give SIGBUS with a diagnostic, never a zero page, and pages
// already good stay good": the kernel reads the page after usermm granted it, fails, and raises
// SIGBUS at the access, which usermm recognises in a file VMA and passes on, naming the file.
TEST_CASE("a read error is SIGBUS naming the file and the offset; pages read before stay good" *
          doctest::skip(!g_failfs_up)) {
    FuseFile file("read-error", 16);
    file.fadvise_dontneed();
    const usermm_test::ChildEnd end = usermm_test::run_in_child([&] {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private,
                                                    {.fault_around_pages = 1}));
        arena.advise(p, file.size(), usermm::Advice::Random);
        CHILD_CHECK(usermm_test::read_byte(p + 2 * kPage + 7) == pattern_byte(2 * kPage + 7));
        REQUIRE(g_fs.command(fmt::format("read-EIO {}", 9 * kPage + 100)));
        CHILD_CHECK(usermm_test::read_byte(p + 2 * kPage + 8) == pattern_byte(2 * kPage + 8));
        (void)usermm_test::read_byte(p + 9 * kPage);
        _exit(0);
    });
    g_fs.command("read-off");
    INFO("child stderr: ", end.err);
    CHECK(end.signal == SIGBUS);
    CHECK(end.err.find("SIGBUS") != std::string::npos);
    CHECK(end.err.find(file.path()) != std::string::npos);
    CHECK(end.err.find(fmt::format("offset {:#x}", 9 * kPage)) != std::string::npos);
    CHECK(end.err.find("could not read") != std::string::npos);
}

// Protects "no usermm lock is held across I/O": behind a read the disk holds until released, the
// same arena's protect(), an anonymous first touch and another file page already cached go on.
// The read is seen to be at the disk (failfs counts it) before they start, and is released only
// after they are done.
TEST_CASE("a stalled read holds no lock: protect and other faults in the arena go on meanwhile" *
          doctest::skip(!g_failfs_up)) {
    FuseFile file("slow-read", 64);
    file.fadvise_dontneed();
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private,
                                                {.fault_around_pages = 1}));
    arena.advise(p, file.size(), usermm::Advice::Random);
    CHECK(usermm_test::read_byte(p) == pattern_byte(0));  // cached now
    char* anon = static_cast<char*>(arena.map(16 * kPage, Prot::ReadWrite));
    std::uint8_t seen = 0;
    {
        ReadMode stalled("read-hold");
        std::thread reader([&] { seen = usermm_test::read_byte(p + 40 * kPage); });
        // The handshake: failfs reports the reader's READ as waiting (its fault is resolved and the
        // kernel is at the disk). Each status read is itself a FUSE request; bounded by a count.
        bool in_flight = false;
        for (int i = 0; i < 200000 && !(in_flight = g_fs.status().reads_in_flight > 0); ++i) {
        }
        if (!in_flight) g_fs.command("read-release");  // let the reader go before failing
        REQUIRE(in_flight);
        arena.protect(anon, kPage, Prot::Read);
        usermm_test::write_byte(anon + 4 * kPage, 1);
        CHECK(usermm_test::read_byte(p + 5) == pattern_byte(5));
        CHECK(g_fs.status().reads_in_flight > 0);  // all of that while the read was still held
        REQUIRE(g_fs.command("read-release"));
        reader.join();
    }
    CHECK(seen == pattern_byte(40 * kPage));
    arena.verify();
}

// --- what a failed fdatasync takes with it (an independent review's cases) ------------------------
// fdatasync writes every dirty page of the file and reports the error once: what is kept after a
// failure is every page of the file's VMAs that was dirty or writable, not only those of the range.

// Protects: one sync over VMAs of one map_file (split by advice), the first write-back failing.
TEST_CASE("a failed sync over split VMAs of one file keeps the pages of all of them" * doctest::skip(!g_failfs_up)) {
    FuseFile file("split", 4);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    arena.advise(p + kPage, kPage, usermm::Advice::Random);  // three VMAs of one file
    for (std::size_t page : {0, 1, 2}) fill_page(p, want, page, std::uint8_t('A' + page));
    {
        FailingWrites failing("EIO all");
        check_error(error_of([&] { arena.sync(p, file.size()); }), EIO, file);
    }
    drop_pages(file, p);
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
}

// Protects: a page prefault made writable and the program wrote (not known dirty), and a dirty
// page outside the synced range, both written by the failed fdatasync.
TEST_CASE("a failed sync keeps prefault's written pages and dirty pages outside its range" * doctest::skip(!g_failfs_up)) {
    FuseFile file("outside", 4);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    arena.prefault(p, kPage, Prot::Write);
    fill_page(p, want, 0, 'P');  // no usermm fault: the write is the kernel's alone
    fill_page(p, want, 3, 'O');  // dirty, outside the range synced below
    {
        FailingWrites failing("EIO all");
        check_error(error_of([&] { arena.sync(p, 2 * kPage); }), EIO, file);
    }
    drop_pages(file, p);
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
}

// Protects: prefault grants access to a page whose write-back failed only with its content back,
// so a write after it is not replaced by the older copy at the next sync.
TEST_CASE("prefault after a failed sync: the program's next write survives the next sync" * doctest::skip(!g_failfs_up)) {
    FuseFile file("prefault", 2);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 0, 'A');
    {
        FailingWrites failing("EIO all");
        check_error(error_of([&] { arena.sync(p, file.size()); }), EIO, file);
    }
    arena.prefault(p, file.size(), Prot::Write);
    fill_page(p, want, 0, 'Z');
    arena.sync(p, file.size());
    CHECK(std::memcmp(p, want.data(), want.size()) == 0);
    CHECK(file.on_disk() == want);
}

// Protects: a forked child does not put the parent's copies back: the parent restores its own,
// writes the page again, and the child's read of the shared page changes nothing.
TEST_CASE("fork after a failed sync: the child's read does not undo the parent's write" * doctest::skip(!g_failfs_up)) {
    FuseFile file("fork", 2);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 0, 'A');
    {
        FailingWrites failing("EIO all");
        check_error(error_of([&] { arena.sync(p, file.size()); }), EIO, file);
    }
    int go[2];
    REQUIRE(pipe(go) == 0);
    std::fflush(nullptr);
    const pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        char byte;
        if (read(go[0], &byte, 1) != 1) _exit(2);
        _exit(usermm_test::read_byte(p) == 'Z' ? 0 : 1);
    }
    fill_page(p, want, 0, 'Z');
    REQUIRE(write(go[1], "x", 1) == 1);
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));  // the child saw the parent's write
    CHECK(usermm_test::read_byte(p) == 'Z');
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
    close(go[0]);
    close(go[1]);
}

// Protects: the copy is taken once the page can no longer be written (PROT_NONE first): a thread
// that writes the page while the sync fails has its every write in the page afterwards.
TEST_CASE("a writer racing a failing sync: every word it wrote is in the page afterwards" * doctest::skip(!g_failfs_up)) {
    for (int round = 0; round < 20; ++round) {
        FuseFile file("race", 2);
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        auto* words = reinterpret_cast<volatile std::uint64_t*>(p);
        words[0] = 0;
        std::atomic<bool> go{false};
        std::thread writer([&] {
            while (!go.load()) {
            }
            for (std::size_t k = 0; k < kPage / 8; ++k) words[k] = 0x1111111111111111ull;
        });
        {
            FailingWrites failing("EIO 1");
            go = true;
            error_of([&] { arena.sync(p, file.size()); });
            writer.join();
        }
        std::size_t lost = 0;
        for (std::size_t k = 0; k < kPage / 8; ++k) lost += words[k] != 0x1111111111111111ull;
        INFO("round ", round);
        REQUIRE(lost == 0);
        arena.sync(p, file.size());
    }
}

// Protects: after a failed sync, while the file system still refuses writes, an access to the page
// is not SIGBUS: its copy goes back into the page cache through a mapping, not a write request.
TEST_CASE("a page kept after a failed sync reads and writes while writes still fail" * doctest::skip(!g_failfs_up)) {
    FuseFile file("still-failing", 2);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    fill_page(p, want, 0, 'A');
    {
        FailingWrites failing("EIO all");
        check_error(error_of([&] { arena.sync(p, file.size()); }), EIO, file);
        CHECK(usermm_test::read_byte(p + 10) == 'A');
        usermm_test::write_byte(p + 11, 'B');
        want[11] = 'B';
    }
    error_of([&] { arena.sync(p, file.size()); });  // may report the kernel's own failed write-back
    arena.sync(p, file.size());
    CHECK(file.on_disk() == want);
}
