// failfs: a FUSE file system for the tests whose writes fail on command.
//
// Write-back errors cannot be had on demand from a real disk: no local file system can be told to
// fail its next write with EIO (nor a read, nor stall on command); a full tmpfs fails a shared mapping's write at the fault (SIGBUS),
// when it allocates the page, and RLIMIT_FSIZE only a write(2) past the limit, so neither reaches
// the kernel's write-back of an mmap'ed page; device-mapper's error and flakey targets would, but
// these machines have no device-mapper (no /dev/mapper/control). failfs is a real file system in
// the kernel's sense (a FUSE mount, with the kernel's page cache, mmap, msync and write-back of
// its own) that passes every request through to a backing directory, except that the WRITE
// requests the kernel sends it can be made to fail, and READ requests to fail or to wait until
// released: the test then sees what a program sees when a disk fails, including the kernel marking
// the pages clean after the failed write-back, or when a disk stalls.
//
//   failfs BACKING_DIR MOUNTPOINT READY_FD
//
// runs in the foreground, multi-threaded (a held READ must not hold up the control file), until
// the file system is unmounted (or SIGTERM). Once
// the kernel has sent FUSE_INIT, the mount is usable and failfs writes one byte to READY_FD and
// closes it: the test's handshake (EOF without the byte: the mount failed).
//
// Control: write a command to /.failctl in the mount (write(2) returns only once failfs has
// applied it; the file is opened direct_io so that nothing caches it):
//   "EIO 3"       the next 3 WRITE requests to regular files fail with EIO
//   "ENOSPC all"  every WRITE request fails with ENOSPC until "off"
//   "off"         writes succeed again
//   "read-EIO P"  READ requests that cover byte offset P of a file fail with EIO
//   "read-hold"   READ requests wait, answered only at "read-release" (a disk that stalls)
//   "read-release" the waiting READs are answered, and later ones at once
//   "read-off"    reads are good again (and released)
// Anything else is EINVAL. Reading /.failctl gives
//   "writes W failed F fsyncs S unsynced U reads R inflight I\n"
// the WRITE requests written and failed, the FSYNC requests, the writes since the last fsync (of
// any file): what a test needs to see that a write-back was made durable, in that order; and the
// READ requests answered and those being answered now.
//
// Caching is that of a local file system: the page cache is kept across opens (kernel_cache) and
// when the file's attributes change (no auto_inval_data), and write-back caching is off, so that write(2) reaches failfs at once while a shared mapping's
// dirty pages reach it at msync/fsync or by the kernel's flusher, as WRITE requests.
#define FUSE_USE_VERSION 31
#include <fuse.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <string_view>

namespace {

constexpr std::string_view kControl = "/.failctl";

std::string g_backing;
int g_ready_fd = -1;

// Requests run on several threads: the write and read state is under one mutex.
std::mutex g_mutex;
int g_fail_errno = 0;
unsigned long g_fail_left = 0;  // WRITE requests still to fail; ULONG_MAX: all
unsigned long g_writes = 0, g_failed = 0, g_fsyncs = 0, g_unsynced = 0;
long long g_read_bad = -1;  // a byte offset READs must not cover, or -1
bool g_read_hold = false;
std::condition_variable g_read_released;
unsigned long g_reads = 0, g_reads_in_flight = 0;

std::string backing_path(const char* path) { return g_backing + path; }
bool is_control(const char* path) { return path && path == kControl; }
int neg_errno() { return -errno; }

int apply_command(std::string_view cmd) {
    while (!cmd.empty() && (cmd.back() == '\n' || cmd.back() == ' ')) cmd.remove_suffix(1);
    const std::lock_guard lock(g_mutex);
    if (cmd == "read-off" || cmd == "read-release") {
        if (cmd == "read-off") g_read_bad = -1;
        g_read_hold = false;
        g_read_released.notify_all();
        return 0;
    }
    if (cmd == "read-hold") {
        g_read_hold = true;
        return 0;
    }
    if (cmd == "off") {
        g_fail_errno = 0;
        g_fail_left = 0;
        return 0;
    }
    const std::size_t space = cmd.find(' ');
    if (space == std::string_view::npos) return -EINVAL;
    const std::string_view name = cmd.substr(0, space), count = cmd.substr(space + 1);
    if (name == "read-EIO") {
        long long v = 0;
        const auto [end, ec] = std::from_chars(count.data(), count.data() + count.size(), v);
        if (ec != std::errc() || end != count.data() + count.size() || v < 0) return -EINVAL;
        g_read_bad = v;
        return 0;
    }
    int err = 0;
    if (name == "EIO") err = EIO;
    else if (name == "ENOSPC") err = ENOSPC;
    else return -EINVAL;
    unsigned long n = 0;
    if (count == "all") {
        n = std::numeric_limits<unsigned long>::max();
    } else {
        const auto [end, ec] = std::from_chars(count.data(), count.data() + count.size(), n);
        if (ec != std::errc() || end != count.data() + count.size() || n == 0) return -EINVAL;
    }
    g_fail_errno = err;
    g_fail_left = n;
    return 0;
}

void* ff_init(fuse_conn_info* conn, fuse_config* cfg) {
    cfg->kernel_cache = 1;
    cfg->hard_remove = 1;  // unlink removes the backing file, no .fuse_hidden rename
    conn->want &= ~unsigned(FUSE_CAP_WRITEBACK_CACHE);
    // A local file system keeps clean pages until reclaim; with automatic invalidation the kernel
    // would drop the whole page cache of the file whenever its mtime moved (every write-back).
    conn->want &= ~unsigned(FUSE_CAP_AUTO_INVAL_DATA);
    const char ready = 1;
    if (write(g_ready_fd, &ready, 1) != 1) std::perror("failfs: ready fd");
    close(g_ready_fd);
    return nullptr;
}

int ff_getattr(const char* path, struct stat* st, fuse_file_info* fi) {
    if (is_control(path)) {
        *st = {};
        st->st_mode = S_IFREG | 0600;
        st->st_nlink = 1;
        return 0;
    }
    const int rc = fi ? fstat(int(fi->fh), st) : lstat(backing_path(path).c_str(), st);
    return rc == 0 ? 0 : neg_errno();
}

int ff_open(const char* path, fuse_file_info* fi) {
    if (is_control(path)) {
        fi->direct_io = 1;
        return 0;
    }
    const int fd = open(backing_path(path).c_str(), fi->flags);
    if (fd < 0) return neg_errno();
    fi->fh = std::uint64_t(fd);
    return 0;
}

int ff_create(const char* path, mode_t mode, fuse_file_info* fi) {
    if (is_control(path)) return -EEXIST;
    const int fd = open(backing_path(path).c_str(), fi->flags | O_CREAT, mode);
    if (fd < 0) return neg_errno();
    fi->fh = std::uint64_t(fd);
    return 0;
}

int ff_read(const char* path, char* buf, std::size_t size, off_t off, fuse_file_info* fi) {
    if (is_control(path)) {
        std::string status;
        {
            const std::lock_guard lock(g_mutex);
            status = "writes " + std::to_string(g_writes) + " failed " + std::to_string(g_failed) + " fsyncs " +
                     std::to_string(g_fsyncs) + " unsynced " + std::to_string(g_unsynced) + " reads " +
                     std::to_string(g_reads) + " inflight " + std::to_string(g_reads_in_flight) + "\n";
        }
        if (std::size_t(off) >= status.size()) return 0;
        const std::size_t n = std::min(size, status.size() - std::size_t(off));
        std::memcpy(buf, status.data() + off, n);
        return int(n);
    }
    bool bad = false;
    {
        std::unique_lock lock(g_mutex);
        bad = g_read_bad >= off && g_read_bad < off + off_t(size);
        ++g_reads_in_flight;
        // A stalled disk: the request waits for the test's release, while the others go on.
        g_read_released.wait(lock, [] { return !g_read_hold; });
    }
    const ssize_t n = bad ? -1 : pread(int(fi->fh), buf, size, off);
    const int err = bad ? EIO : errno;
    const std::lock_guard lock(g_mutex);
    --g_reads_in_flight;
    ++g_reads;
    return n >= 0 ? int(n) : -err;
}

int ff_write(const char* path, const char* buf, std::size_t size, off_t off, fuse_file_info* fi) {
    if (is_control(path)) {
        const int rc = apply_command(std::string_view(buf, size));
        return rc == 0 ? int(size) : rc;
    }
    const std::lock_guard lock(g_mutex);
    if (g_fail_left > 0) {
        if (g_fail_left != std::numeric_limits<unsigned long>::max()) --g_fail_left;
        ++g_failed;
        return -g_fail_errno;
    }
    const ssize_t n = pwrite(int(fi->fh), buf, size, off);
    if (n < 0) return neg_errno();
    ++g_writes;
    ++g_unsynced;
    return int(n);
}

int ff_truncate(const char* path, off_t size, fuse_file_info* fi) {
    if (is_control(path)) return 0;
    const int rc = fi ? ftruncate(int(fi->fh), size) : truncate(backing_path(path).c_str(), size);
    return rc == 0 ? 0 : neg_errno();
}

int ff_fsync(const char* path, int datasync, fuse_file_info* fi) {
    if (is_control(path)) return 0;
    const int rc = datasync ? fdatasync(int(fi->fh)) : fsync(int(fi->fh));
    if (rc != 0) return neg_errno();
    const std::lock_guard lock(g_mutex);
    ++g_fsyncs;
    g_unsynced = 0;
    return 0;
}

// Nothing to flush: failfs keeps no data of its own, and the backing descriptor closes at release.
int ff_flush(const char*, fuse_file_info*) { return 0; }

int ff_release(const char* path, fuse_file_info* fi) {
    if (!is_control(path)) close(int(fi->fh));
    return 0;
}

int ff_unlink(const char* path) {
    if (is_control(path)) return -EPERM;
    return unlink(backing_path(path).c_str()) == 0 ? 0 : neg_errno();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: failfs BACKING_DIR MOUNTPOINT READY_FD\n");
        return 2;
    }
    g_backing = argv[1];
    g_ready_fd = std::atoi(argv[3]);
    fuse_operations ops{};
    ops.init = ff_init;
    ops.getattr = ff_getattr;
    ops.open = ff_open;
    ops.create = ff_create;
    ops.read = ff_read;
    ops.write = ff_write;
    ops.truncate = ff_truncate;
    ops.fsync = ff_fsync;
    ops.flush = ff_flush;
    ops.release = ff_release;
    ops.unlink = ff_unlink;
    char prog[] = "failfs", fg[] = "-f", o[] = "-o", opts[] = "fsname=failfs,subtype=failfs,max_threads=8";
    char* fuse_argv[] = {prog, fg, o, opts, argv[2], nullptr};
    return fuse_main(5, fuse_argv, &ops, nullptr);
}
