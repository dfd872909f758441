// map_file given the inputs mmap(2) has its own answer for (issue 9's trials): a FIFO (ENODEV at
// once, never a blocked open), /proc, sysfs and character devices (the kernel's errno), basenames up
// to the file system's 255 characters, a descriptor opened before the process dropped root, files
// under RLIMIT_FSIZE, map_file + unmap in a loop (no kernel mapping left behind), one page at 4 TiB
// of a sparse file (a few kernel mappings, a small arena), a tmpfs file and an unlinked one.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <fmt/format.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/magic.h>

#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "file_test_util.hpp"
#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm::Share;
using usermm_test::pattern_byte;
using usermm_test::read_byte;
using usermm_test::TempFile;
using usermm_test::write_byte;

[[maybe_unused]] const unsigned g_watchdog = alarm(120);

const std::size_t kPage = usermm_test::os_page_size();
constexpr std::uint64_t kFourTiB = std::uint64_t(1) << 42;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string tmp_base() {
    const char* dir = std::getenv("TMPDIR");
    return dir && *dir ? dir : "/tmp";
}

// Creates `path` holding TempFile's pattern: `size` bytes, each a function of its offset.
void write_pattern(const std::string& path, std::uint64_t size) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    std::vector<std::uint8_t> bytes(size);
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = pattern_byte(i);
    REQUIRE(pwrite(fd, bytes.data(), bytes.size(), 0) == ssize_t(bytes.size()));
    close(fd);
}

// How many of the `length` bytes at `p` differ from the file's pattern from offset `from` on.
std::size_t pattern_mismatches(const void* p, std::uint64_t from, std::size_t length) {
    std::size_t bad = 0;
    for (std::size_t i = 0; i < length; ++i) bad += read_byte(static_cast<const char*>(p) + i) != pattern_byte(from + i);
    return bad;
}

std::optional<usermm::Error> failure_of(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const usermm::Error& e) {
        return e;
    }
    return std::nullopt;
}

// What mmap(2) says of one page of `fd`: 0 if it maps it, else its errno.
int kernel_mmap_errno(int fd, bool shared) {
    void* p = mmap(nullptr, kPage, PROT_READ, shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return errno;
    munmap(p, kPage);
    return 0;
}

std::string fd_link(int fd) {
    std::error_code ec;
    return std::filesystem::read_symlink(fmt::format("/proc/self/fd/{}", fd), ec).string();
}

long open_fds() {
    long n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
    return n;
}

// The process's address space (VmSize in /proc/self/status), in KiB.
long vm_size_kib() {
    FILE* f = std::fopen("/proc/self/status", "r");
    REQUIRE(f);
    long kib = -1;
    char line[256];
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "VmSize: %ld kB", &kib) == 1) break;
    std::fclose(f);
    return kib;
}

// The kernel mapping that holds `p`, as /proc/self/maps shows it.
struct KernelMapping {
    std::uint64_t offset = 0;
    unsigned long inode = 0;
    std::string path;
};
std::optional<KernelMapping> kernel_mapping_at(const void* p) {
    const auto addr = reinterpret_cast<unsigned long>(p);
    FILE* f = std::fopen("/proc/self/maps", "r");
    REQUIRE(f);
    std::optional<KernelMapping> found;
    char line[8192];
    while (!found && std::fgets(line, sizeof line, f)) {
        unsigned long from = 0, to = 0;
        unsigned long long offset = 0;
        KernelMapping m;
        int path_at = 0;
        if (std::sscanf(line, "%lx-%lx %*s %llx %*s %lu %n", &from, &to, &offset, &m.inode, &path_at) != 4) continue;
        if (addr < from || addr >= to) continue;
        m.offset = offset + (addr - from);
        m.path = line + path_at;
        if (!m.path.empty() && m.path.back() == '\n') m.path.pop_back();
        found = m;
    }
    std::fclose(f);
    return found;
}

// A forked child watched from the parent: one that has not ended `bound` after the fork is killed
// with SIGKILL and counts as overran, whatever it blocks in or masks (a SIGALRM of its own would
// not end a child that blocks every signal). An exception escaping `body` ends it with its message.
struct WatchedEnd {
    usermm_test::ChildEnd end;
    bool overran = false;
};
WatchedEnd run_watched(const std::function<void()>& body, std::chrono::seconds bound) {
    int fds[2];
    REQUIRE(pipe2(fds, O_CLOEXEC) == 0);
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 2);
        try {
            body();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child threw: %s\n", e.what());
            _exit(1);
        }
        _exit(0);
    }
    close(fds[1]);
    WatchedEnd w;
    const auto deadline = std::chrono::steady_clock::now() + bound;
    // The pipe reaches end-of-file when the child is gone, the only holder of its write end.
    for (char buf[4096];;) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
        if (left <= 0) {
            kill(pid, SIGKILL);
            w.overran = true;
            break;
        }
        pollfd pfd{fds[0], POLLIN, 0};
        if (poll(&pfd, 1, int(left)) <= 0) continue;
        const ssize_t n = read(fds[0], buf, sizeof buf);
        if (n <= 0) break;
        w.end.err.append(buf, std::size_t(n));
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    w.end.exited = WIFEXITED(status);
    if (w.end.exited) w.end.exit_code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) w.end.signal = WTERMSIG(status);
    return w;
}

// --- probes (static initialisation: no arena work) -------------------------------------------------

const bool g_root = geteuid() == 0;

bool sparse_files_reach_4tib() {
    std::string path = tmp_base() + "/usermm-probe-XXXXXX";
    const int fd = mkostemp(path.data(), O_CLOEXEC);
    if (fd < 0) return false;
    const bool ok = ftruncate(fd, off_t(kFourTiB)) == 0;
    close(fd);
    unlink(path.c_str());
    return ok;
}
const bool g_sparse_4tib = sparse_files_reach_4tib();

bool dev_shm_is_tmpfs() {
    struct statfs st;
    return statfs("/dev/shm", &st) == 0 && st.f_type == TMPFS_MAGIC && access("/dev/shm", W_OK) == 0;
}
const bool g_dev_shm = dev_shm_is_tmpfs();

// --- FIFO -------------------------------------------------------------------------------------------

// Protects: map_file(path) of a FIFO whose other end nobody opens fails with ENODEV and returns at
// once (open(O_RDONLY) of such a FIFO blocks until a writer comes; the trial's map_file blocked
// forever), and map_file(fd) of a FIFO fails as mmap(2) does.
TEST_CASE("map_file of a FIFO fails with ENODEV at once, by path and by descriptor") {
    const usermm_test::TempDir dir(tmp_base());
    const std::string fifo = dir.path() + "/fifo";
    REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
    const WatchedEnd w = run_watched(
        [&] {
            Arena arena(1 << 24);
            CHILD_EXPECT_ERROR(arena.map_file(fifo, 0, kPage, Prot::Read, Share::Private), ENODEV, "map_file", fifo);
            CHILD_EXPECT_ERROR(arena.map_file(fifo, 0, kPage, Prot::Read, Share::Shared), ENODEV, "map_file", fifo);
            CHILD_EXPECT_ERROR(arena.map_file(fifo, 0, kPage, Prot::ReadWrite, Share::Shared), ENODEV, "map_file",
                               fifo);
            // O_RDWR opens a FIFO without waiting for a peer (fifo(7)).
            const int fd = open(fifo.c_str(), O_RDWR | O_CLOEXEC);
            CHILD_CHECK(fd >= 0);
            CHILD_CHECK(kernel_mmap_errno(fd, false) == ENODEV);
            CHILD_EXPECT_ERROR(arena.map_file(fd, 0, kPage, Prot::Read, Share::Private), ENODEV, "map_file", fifo);
            CHILD_EXPECT_ERROR(arena.map_file(fd, 0, kPage, Prot::ReadWrite, Share::Shared), ENODEV, "map_file", fifo);
            close(fd);
            CHILD_CHECK(arena.vmas().empty());
        },
        std::chrono::seconds(10));
    INFO("child stderr: " << w.end.err);
    CHECK_FALSE(w.overran);
    CHECK(w.end.signal == 0);
    usermm_test::check_survived(w.end);
}

// --- /proc, sysfs, character devices ----------------------------------------------------------------

// Protects: files mmap(2) refuses are refused by map_file with the kernel's errno (ENODEV for
// /proc/<pid>/ files, /proc/sys, sysfs and character devices; EIO for /proc files of the older
// proc_ops kind such as /proc/version), by path and by descriptor, naming the call and the file, and
// keeping no VMA or descriptor. The trial's map_file accepted them and then SIGBUSed at every access.
TEST_CASE("map_file refuses /proc, sysfs and character-device files with mmap's errno") {
    std::vector<std::string> paths = {"/proc/self/status", "/proc/self/maps",    "/proc/version",
                                      "/proc/meminfo",     "/proc/sys/vm/max_map_count",
                                      "/sys/devices/system/cpu/online",
                                      "/sys/kernel/mm/transparent_hugepage/enabled", "/dev/null", "/dev/urandom"};
    std::erase_if(paths, [](const std::string& p) { return access(p.c_str(), R_OK) != 0; });
    REQUIRE(paths.size() >= 8);  // transparent_hugepage aside, every Linux has them
    Arena arena(1 << 24);
    const long fds = open_fds();
    for (const std::string& path : paths) {
        CAPTURE(path);
        const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        const int private_err = kernel_mmap_errno(fd, false), shared_err = kernel_mmap_errno(fd, true);
        CAPTURE(private_err);
        CAPTURE(shared_err);
        // The kernel refuses every one of them; usermm must say the same.
        CHECK(private_err != 0);
        CHECK(shared_err != 0);
        if (path.starts_with("/proc/self/") || path.starts_with("/proc/sys/") || path.starts_with("/sys/") ||
            path.starts_with("/dev/"))
            CHECK(private_err == ENODEV);

        const auto by_path = failure_of([&] { arena.map_file(path, 0, kPage, Prot::Read, Share::Private); });
        REQUIRE(by_path.has_value());
        CHECK(by_path->code().value() == private_err);
        CHECK(contains(by_path->what(), "map_file"));
        CHECK(contains(by_path->what(), path));
        const auto shared = failure_of([&] { arena.map_file(path, 0, kPage, Prot::Read, Share::Shared); });
        REQUIRE(shared.has_value());
        CHECK(shared->code().value() == shared_err);

        const std::string link = fd_link(fd);
        const auto by_fd = failure_of([&] { arena.map_file(fd, 0, kPage, Prot::Read, Share::Private); });
        REQUIRE(by_fd.has_value());
        CHECK(by_fd->code().value() == private_err);
        CHECK(contains(by_fd->what(), "map_file"));
        CHECK(contains(by_fd->what(), link));
        close(fd);
        CHECK(arena.vmas().empty());
    }
    CHECK(open_fds() == fds);
}

// --- long basenames -----------------------------------------------------------------------------------

// Protects: basenames of 243 to 255 characters (NAME_MAX; the trial's map_file failed from 243 on)
// map by path and by descriptor, read the file's bytes, and are named as the header promises:
// VmaInfo::file keeps at most 255 bytes of the path (a prefix of it here, where the whole path is
// longer), /proc/self/maps shows the whole path over the VMA, and a relative path of 255 bytes is
// kept whole.
TEST_CASE("basenames of 243, 250 and 255 characters map, read their file and are named") {
    const usermm_test::TempDir dir(tmp_base());
    const std::size_t size = 4 * kPage;
    for (const std::size_t length : {std::size_t(243), std::size_t(250), std::size_t(255)}) {
        CAPTURE(length);
        const std::string name = fmt::format("{:x<{}}", fmt::format("n{}-", length), length);
        REQUIRE(name.size() == length);
        const std::string path = dir.path() + "/" + name;
        write_pattern(path, size);
        Arena arena(1 << 24);

        char* p = static_cast<char*>(arena.map_file(path, 0, size, Prot::Read, Share::Private));
        CHECK(pattern_mismatches(p, 0, size) == 0);
        const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        REQUIRE(fd >= 0);
        char* q = static_cast<char*>(arena.map_file(fd, kPage, size - kPage, Prot::Read, Share::Shared));
        close(fd);
        CHECK(pattern_mismatches(q, kPage, size - kPage) == 0);

        const std::vector<usermm::VmaInfo> vmas = arena.vmas();
        REQUIRE(vmas.size() == 2);
        for (const usermm::VmaInfo& v : vmas) {
            CAPTURE(v.file);
            CHECK_FALSE(v.file.empty());
            CHECK(v.file.size() <= 255);
            CHECK(path.starts_with(v.file));
        }
        for (const char* at : {p, p + size - 1, q, q + size - kPage - 1}) {
            const auto m = kernel_mapping_at(at);
            REQUIRE(m.has_value());
            CHECK(m->path == path);
        }
    }
    // Relative to the working directory, the path of 255 bytes is what map_file was given.
    const std::string name(255, 'r');
    write_pattern(dir.path() + "/" + name, size);
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            CHILD_CHECK(chdir(dir.path().c_str()) == 0);
            Arena arena(1 << 24);
            const char* p = static_cast<const char*>(arena.map_file(name, 0, size, Prot::Read, Share::Private));
            CHILD_CHECK(pattern_mismatches(p, 0, size) == 0);
            const std::vector<usermm::VmaInfo> vmas = arena.vmas();
            CHILD_CHECK(vmas.size() == 1 && vmas[0].file == name);
        },
        20);
    usermm_test::check_survived(end);
}

// --- after dropping root --------------------------------------------------------------------------------

// Protects: a descriptor opened while root, of a file only root may open (0600, owned by root),
// maps after the process has become nobody, as mmap(2) maps it: usermm uses the descriptor itself
// (the trial's reopening through /proc/self/fd checked the permissions again: EACCES). The arena
// exists before the drop, as a daemon's would.
TEST_CASE("a descriptor opened as root maps after the process drops root" * doctest::skip(!g_root)) {
    TempFile file(16 * kPage);
    REQUIRE(fchmod(file.fd(), 0600) == 0);
    REQUIRE(fchown(file.fd(), 0, 0) == 0);
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            Arena arena(1 << 24);
            const int ro = open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
            CHILD_CHECK(ro >= 0);
            CHILD_CHECK(setgroups(0, nullptr) == 0);
            CHILD_CHECK(setresgid(65534, 65534, 65534) == 0);
            CHILD_CHECK(setresuid(65534, 65534, 65534) == 0);
            // The file is closed to the process now, but not to its descriptors.
            CHILD_CHECK(open(file.path().c_str(), O_RDONLY | O_CLOEXEC) < 0 && errno == EACCES);
            CHILD_CHECK(kernel_mmap_errno(ro, false) == 0);
            CHILD_CHECK(kernel_mmap_errno(file.fd(), true) == 0);

            const char* p =
                static_cast<const char*>(arena.map_file(ro, 0, file.size(), Prot::Read, Share::Private));
            const char* s = static_cast<const char*>(arena.map_file(ro, 0, file.size(), Prot::Read, Share::Shared));
            close(ro);  // usermm holds the file through its own reference
            CHILD_CHECK(pattern_mismatches(p, 0, file.size()) == 0);
            CHILD_CHECK(pattern_mismatches(s, 0, file.size()) == 0);
            // The read-write descriptor opened before the drop writes through a shared VMA.
            char* w = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Shared));
            write_byte(w + 3 * kPage + 7, 0xc3);
            arena.sync(w, file.size());
        },
        20);
    usermm_test::check_survived(end);
    CHECK(file.content()[3 * kPage + 7] == 0xc3);
}

// Protects: an arena created after the drop works too, as mmap(2) does. Changing the effective uid
// makes the process non-dumpable, which gives its /proc/self files to root: an arena that needs
// /proc/self/mem cannot open it then (EACCES), where mmap needs nothing of the kind.
TEST_CASE("an arena created after the process drops root maps a descriptor opened before" *
          doctest::skip(!g_root)) {
    TempFile file(16 * kPage);
    REQUIRE(fchmod(file.fd(), 0600) == 0);
    REQUIRE(fchown(file.fd(), 0, 0) == 0);
    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            const int ro = open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
            CHILD_CHECK(ro >= 0);
            CHILD_CHECK(setgroups(0, nullptr) == 0);
            CHILD_CHECK(setresgid(65534, 65534, 65534) == 0);
            CHILD_CHECK(setresuid(65534, 65534, 65534) == 0);
            Arena arena(1 << 24);
            char* anon = static_cast<char*>(arena.map(4 * kPage, Prot::ReadWrite));
            write_byte(anon + kPage, 9);
            CHILD_CHECK(read_byte(anon + kPage) == 9);
            const char* p =
                static_cast<const char*>(arena.map_file(ro, 0, file.size(), Prot::Read, Share::Private));
            close(ro);
            CHILD_CHECK(pattern_mismatches(p, 0, file.size()) == 0);
            char* w = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Private));
            write_byte(w + kPage, 0x3c);  // a private copy
            CHILD_CHECK(read_byte(w + kPage) == 0x3c);
        },
        20);
    usermm_test::check_survived(end);
    CHECK(file.content() == file.expected());
}

// --- RLIMIT_FSIZE ---------------------------------------------------------------------------------------

// Protects: under RLIMIT_FSIZE of 1 MiB with SIGXFSZ at its default (a write past the limit kills),
// map_file of an 8-byte file and of a 4 MiB one reads them, and a shared writable VMA of a small file
// writes back: mapping a file extends nothing (the trial's map_file died of SIGXFSZ even for 8 bytes).
TEST_CASE("under RLIMIT_FSIZE of 1 MiB map_file reads small and large files and writes back") {
    constexpr rlim_t kLimit = 1 << 20;
    TempFile tiny(8), big(4 << 20), small(4 * kPage);
    auto limit = [] {
        signal(SIGXFSZ, SIG_DFL);
        const rlimit lim{kLimit, kLimit};
        CHILD_CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    };
    // The limit bites: growing a file past it kills the process.
    const usermm_test::ChildEnd control = usermm_test::run_guarded(
        [&] {
            limit();
            CHILD_CHECK(pwrite(small.fd(), "x", 1, off_t(kLimit)) == 1);
        },
        20);
    CHECK(control.signal == SIGXFSZ);
    REQUIRE(small.content().size() == small.size());

    const usermm_test::ChildEnd end = usermm_test::run_guarded(
        [&] {
            limit();
            Arena arena(1 << 26);
            const char* t = static_cast<const char*>(arena.map_file(tiny.path(), 0, 8, Prot::Read, Share::Private));
            CHILD_CHECK(pattern_mismatches(t, 0, 8) == 0);
            CHILD_CHECK(read_byte(t + 8) == 0 && read_byte(t + kPage - 1) == 0);  // the rest of the page
            const char* t2 = static_cast<const char*>(arena.map_file(tiny.fd(), 0, 8, Prot::Read, Share::Shared));
            CHILD_CHECK(pattern_mismatches(t2, 0, 8) == 0);
            const char* b =
                static_cast<const char*>(arena.map_file(big.path(), 0, big.size(), Prot::Read, Share::Private));
            CHILD_CHECK(pattern_mismatches(b, 0, big.size()) == 0);
            char* s = static_cast<char*>(arena.map_file(small.path(), 0, small.size(), Prot::ReadWrite, Share::Shared));
            write_byte(s + kPage + 5, 0x5a);
            arena.sync(s, small.size());
            arena.unmap(s, small.size());
        },
        20);
    CHECK(end.signal == 0);  // SIGXFSZ: something grew a file past the limit
    usermm_test::check_survived(end);
    const std::vector<std::uint8_t> now = small.content();
    REQUIRE(now.size() == small.size());
    CHECK(now[kPage + 5] == 0x5a);
    CHECK(now[kPage + 4] == pattern_byte(kPage + 4));
}

// --- map_file + unmap cycles ------------------------------------------------------------------------------

// Protects: a cycle of map_file, one touched page and unmap leaves the process's kernel mappings as
// they were (the trial leaked one per cycle), for a private read-only VMA and a shared writable one
// whose writes reach the file.
TEST_CASE("1000 cycles of map_file and unmap do not grow the kernel's mapping count") {
    constexpr int kCycles = 1000;
    constexpr std::size_t kPages = 4;
    TempFile file(kPages * kPage);
    Arena arena(1 << 24);
    auto cycle = [&](int i, Prot prot, Share share) {
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), prot, share));
        const std::size_t page = std::size_t(i) % kPages * kPage;
        bool ok = true;
        if (share == Share::Shared)
            write_byte(p + page + 1, std::uint8_t(i));
        else
            ok = read_byte(p + page) == pattern_byte(page);
        arena.unmap(p, file.size());
        return ok;
    };
    SUBCASE("private, read-only") {
        REQUIRE(cycle(0, Prot::Read, Share::Private));
        const long after_first = usermm_test::process_mappings();
        int bad = 0;
        for (int i = 1; i < kCycles; ++i) bad += !cycle(i, Prot::Read, Share::Private);
        CHECK(bad == 0);
        const long now = usermm_test::process_mappings();
        CAPTURE(after_first);
        CHECK(std::abs(now - after_first) <= 2);
    }
    SUBCASE("shared, writable") {
        cycle(0, Prot::ReadWrite, Share::Shared);
        const long after_first = usermm_test::process_mappings();
        for (int i = 1; i < kCycles; ++i) cycle(i, Prot::ReadWrite, Share::Shared);
        const long now = usermm_test::process_mappings();
        CAPTURE(after_first);
        CHECK(std::abs(now - after_first) <= 2);
        const std::vector<std::uint8_t> content = file.content();
        for (std::size_t k = 0; k < kPages; ++k)  // the last cycle that wrote page k
            CHECK(content[k * kPage + 1] == std::uint8_t(kCycles - kPages + k));
    }
    CHECK(arena.vmas().empty());
}

// --- one page at 4 TiB ------------------------------------------------------------------------------------

// Protects: a one-page VMA at 4 TiB - 4 KiB of a sparse file costs a few kernel mappings and about
// its page of address space, in a 1 MiB arena, and shows that page of the file (the kernel's mapping
// at the right offset); 8 such files at once too. The trial's cost grew with the offset: 8,193
// kernel mappings and 4 TiB of address space each, and the 8th file failed.
TEST_CASE("one page at 4 TiB - 4 KiB of a sparse file is cheap, and 8 such files work" *
          doctest::skip(!g_sparse_4tib)) {
    constexpr std::size_t kFiles = 8;
    const std::uint64_t offset = kFourTiB - kPage;
    std::vector<std::unique_ptr<TempFile>> files;
    for (std::size_t k = 0; k < kFiles; ++k) {
        files.push_back(std::make_unique<TempFile>(0));
        REQUIRE(ftruncate(files.back()->fd(), off_t(kFourTiB)) == 0);
        // One byte that tells the files, and the offset, apart: everything else reads zeros.
        const std::uint8_t mark = std::uint8_t(0x80 + k);
        REQUIRE(pwrite(files.back()->fd(), &mark, 1, off_t(offset + 100 + k)) == 1);
    }
    Arena arena(1 << 20);
    const long mappings = usermm_test::process_mappings();
    const long vm_kib = vm_size_kib();
    std::vector<char*> pages;
    for (std::size_t k = 0; k < kFiles; ++k) {
        CAPTURE(k);
        char* p = k % 2 ? static_cast<char*>(arena.map_file(files[k]->fd(), offset, kPage, Prot::Read, Share::Private))
                        : static_cast<char*>(arena.map_file(files[k]->path(), offset, kPage, Prot::Read, Share::Private));
        pages.push_back(p);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < kPage; ++i)
            wrong += read_byte(p + i) != (i == 100 + k ? std::uint8_t(0x80 + k) : std::uint8_t(0));
        CHECK(wrong == 0);
        const auto m = kernel_mapping_at(p);
        REQUIRE(m.has_value());
        CHECK(m->offset == offset);
        CHECK(m->path == files[k]->path());
        CHECK(usermm_test::process_mappings() - mappings <= long(4 * (k + 1)));
    }
    // The arena's 1 MiB was reserved before: 8 pages and usermm's bookkeeping are all that grew.
    CHECK(vm_size_kib() - vm_kib <= 4 * 1024);
    for (char* p : pages) arena.unmap(p, kPage);
    CHECK(std::abs(usermm_test::process_mappings() - mappings) <= 2);
}

// --- tmpfs and unlinked files -------------------------------------------------------------------------------

// Protects: a file in /dev/shm (tmpfs) maps private and shared, and shared writes reach it.
TEST_CASE("map_file maps a file in /dev/shm" * doctest::skip(!g_dev_shm)) {
    const usermm_test::TempDir dir("/dev/shm");
    const std::string path = dir.path() + "/data";
    const std::size_t size = 8 * kPage;
    write_pattern(path, size);
    Arena arena(1 << 24);
    const char* p = static_cast<const char*>(arena.map_file(path, 0, size, Prot::Read, Share::Private));
    CHECK(pattern_mismatches(p, 0, size) == 0);
    char* s = static_cast<char*>(arena.map_file(path, 0, size, Prot::ReadWrite, Share::Shared));
    CHECK(pattern_mismatches(s, 0, size) == 0);
    write_byte(s + 2 * kPage, 0x11);
    arena.sync(s, size);
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    std::uint8_t byte = 0;
    CHECK(pread(fd, &byte, 1, off_t(2 * kPage)) == 1);
    close(fd);
    CHECK(byte == 0x11);
    const auto m = kernel_mapping_at(s);
    REQUIRE(m.has_value());
    CHECK(m->path == path);
}

// Protects: an unlinked file maps through a descriptor (VmaInfo::file ends in " (deleted)", as the
// header says), and a file unlinked after map_file(path) still reads and writes back.
TEST_CASE("map_file maps a file already unlinked, and one unlinked after mapping") {
    const std::size_t size = 8 * kPage;
    TempFile gone(size), later(size);
    Arena arena(1 << 24);
    REQUIRE(unlink(gone.path().c_str()) == 0);
    const char* g = static_cast<const char*>(arena.map_file(gone.fd(), 0, size, Prot::Read, Share::Private));
    CHECK(pattern_mismatches(g, 0, size) == 0);
    const auto vma = arena.vmas();
    REQUIRE(vma.size() == 1);
    CAPTURE(vma[0].file);
    CHECK(vma[0].file.ends_with(" (deleted)"));

    char* s = static_cast<char*>(arena.map_file(later.path(), 0, size, Prot::ReadWrite, Share::Shared));
    REQUIRE(unlink(later.path().c_str()) == 0);
    CHECK(pattern_mismatches(s, 0, size) == 0);  // first touched after the unlink
    write_byte(s + 5 * kPage + 9, 0x77);
    arena.sync(s, size);
    CHECK(later.content()[5 * kPage + 9] == 0x77);
}

}  // namespace
