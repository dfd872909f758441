// The kernel calls only the API world makes (reservations, tables, file mappings, the userfaultfd
// probe): the same rules as page_ops.cpp (0 or an errno, never logs, never throws), without the
// signal handler's: these may block, and may call what a handler may not.
#include "page_ops_api.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "pte.hpp"

namespace usermm::detail {

namespace {
// Debian 12's headers (linux-libc-dev 6.1) predate it; the kernel is asked at run time.
constexpr std::uint64_t kFeatureWpUnpopulated = 1ull << 13;

int result(int rc) { return rc == 0 ? 0 : errno; }

// The one write that gives a fresh private mapping its anon_vma goes through /proc/self/mem, so the
// mapping is PROT_NONE from the start: no other thread can slip a write in meanwhile.
int write_once_and_discard(void* p) {
    const char zero = 0;
    if (const int err = page_write_raw(reinterpret_cast<std::uintptr_t>(p), &zero, 1)) return err;
    return madvise(p, g_page_size, MADV_DONTNEED) == 0 ? 0 : errno;
}
}  // namespace

// The kernel merges neighbouring pieces of a private mapping only if they share one anon_vma, and
// creates the anon_vma at the first write into a piece. If that first write happened after the
// reservation was split by mprotect, every written piece would get its own anon_vma and never merge
// with its neighbours again, which defeats the map budget. So the reservation is written once while
// it is still one piece (through /proc/self/mem: it is PROT_NONE from the start, so it does not
// count against RLIMIT_DATA, which counts private writable mappings), and that page emptied again.
int page_reserve(std::size_t len, void** out) {
    void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return errno;
    if (const int err = write_once_and_discard(p)) {
        munmap(p, len);
        return err;
    }
    *out = p;
    return 0;
}

int page_reserve_fixed(std::uintptr_t addr, std::size_t len, bool uffd, bool* replaced) {
    void* p = mmap(reinterpret_cast<void*>(addr), len, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (replaced) *replaced = p != MAP_FAILED;
    if (p == MAP_FAILED) return errno;
    if (uffd)
        if (const int err = uffd_register(addr, len)) return err;
    return write_once_and_discard(p);
}

int page_reserve_at(std::uintptr_t addr, std::size_t len) {
    void* p = mmap(reinterpret_cast<void*>(addr), len, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED) return errno;
    if (p != reinterpret_cast<void*>(addr)) {  // a kernel before 4.17 takes the flag for a hint
        munmap(p, len);
        return EEXIST;
    }
    if (const int err = write_once_and_discard(p)) {
        munmap(p, len);
        return err;
    }
    return 0;
}

int page_alloc_table(std::size_t len, void** out) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return errno;
    *out = p;
    return 0;
}

int page_release(std::uintptr_t addr, std::size_t len) { return result(munmap(reinterpret_cast<void*>(addr), len)); }

int page_free_lazily(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_FREE));
}

void page_held(std::uintptr_t addr, std::size_t len, unsigned char* vec) {
    constexpr std::uint64_t kHeld = (std::uint64_t(1) << 63) | (std::uint64_t(1) << 62);  // present, swapped
    const std::size_t pages = len >> g_page_shift;
    const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    std::uint64_t entries[64];
    std::size_t done = 0;
    while (fd >= 0 && done < pages) {
        const std::size_t n = pages - done < 64 ? pages - done : 64;
        const off_t at = off_t(((addr >> g_page_shift) + done) * sizeof(std::uint64_t));
        if (pread(fd, entries, n * sizeof(std::uint64_t), at) != ssize_t(n * sizeof(std::uint64_t))) break;
        for (std::size_t k = 0; k < n; ++k) vec[done + k] = (entries[k] & kHeld) ? 1 : 0;
        done += n;
    }
    for (; done < pages; ++done) vec[done] = 1;
    if (fd >= 0) close(fd);
}

int page_advise_huge(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_HUGEPAGE));
}

int page_name_anon(std::uintptr_t addr, std::size_t len, const char* name) {
    return result(prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, addr, len, name));
}

bool page_names_supported() {
    void* p = mmap(nullptr, g_page_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    const bool ok = page_name_anon(reinterpret_cast<std::uintptr_t>(p), g_page_size, "usermm-probe") == 0;
    munmap(p, g_page_size);
    return ok;
}

int page_read_file(int fd, void* buf, std::size_t len, std::uint64_t off, std::size_t* done) {
    char* p = static_cast<char*>(buf);
    *done = 0;
    while (*done < len) {
        const ssize_t n = pread(fd, p + *done, len - *done, off_t(off + *done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) break;
        *done += std::size_t(n);
    }
    return 0;
}

int page_sync_file(int fd) { return result(fdatasync(fd)); }

int page_prepare_file_mapping(int fd, std::uint64_t off, std::size_t len, bool shared, void** out) {
    *out = nullptr;
    if (shared) return 0;
    void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_NORESERVE, fd, off_t(off));
    if (p == MAP_FAILED) return errno;
    unsigned char cached = 1;
    mincore(p, g_page_size, &cached);
    madvise(p, len, MADV_RANDOM);
    if (write_once_and_discard(p) != 0) {  // past the end of the file: nothing to copy
        munmap(p, len);
        return 0;
    }
    madvise(p, len, MADV_NORMAL);
    if (!(cached & 1)) posix_fadvise(fd, off_t(off), off_t(g_page_size), POSIX_FADV_DONTNEED);
    *out = p;
    return 0;
}

int page_place_file_mapping(std::uintptr_t addr, std::size_t len, int fd, std::uint64_t off, bool shared,
                            void* prepared) {
    void* want = reinterpret_cast<void*>(addr);
    if (prepared) {
        const int err = mremap(prepared, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, want) == MAP_FAILED ? errno : 0;
        if (err) munmap(prepared, len);
        return err;
    }
    const int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED | MAP_NORESERVE;
    return mmap(want, len, PROT_NONE, flags, fd, off_t(off)) == MAP_FAILED ? errno : 0;
}

int uffd_probe() {
    const int fd = int(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
    if (fd < 0) return errno;
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP | kFeatureWpUnpopulated;
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        const int err = errno;
        close(fd);
        return err == EINVAL ? EOPNOTSUPP : err;  // EINVAL: a feature this kernel lacks
    }
    uffd_adopt(fd);
    return 0;
}

// --- The asynchronous context and PAGEMAP_SCAN -----------------------------------------------------
// Debian 12's headers (linux-libc-dev 6.1) have none of this (Linux 6.7, include/uapi/linux/fs.h and
// userfaultfd.h); the layout is the kernel's ABI, and the probe asks the running kernel.
namespace {
constexpr std::uint64_t kFeatureWpAsync = 1ull << 15;
struct PmScanArg {
    std::uint64_t size;
    std::uint64_t flags;
    std::uint64_t start;
    std::uint64_t end;
    std::uint64_t walk_end;
    std::uint64_t vec;
    std::uint64_t vec_len;
    std::uint64_t max_pages;
    std::uint64_t category_inverted;
    std::uint64_t category_mask;
    std::uint64_t category_anyof_mask;
    std::uint64_t return_mask;
};
static_assert(sizeof(PmScanArg) == 96 && sizeof(WrittenRegion) == 24);
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
constexpr std::uint64_t kScanWpMatching = 1u << 0;
constexpr std::uint64_t kScanCheckWpAsync = 1u << 1;
constexpr std::uint64_t kPageIsWritten = 1u << 1;

int g_async_uffd = -1;   // set once by the probe (before any arena exists), closed in a fork child
int g_pagemap = -1;      // /proc/self/pagemap, which PAGEMAP_SCAN is asked on
std::atomic<bool> g_async{false};  // the mode may be used (probed, allowed, not a fork child)

int scan(int pagemap, std::uintptr_t addr, std::size_t len, bool rearm, WrittenRegion* out, std::size_t capacity,
         std::size_t* regions, std::uintptr_t* walk_end) {
    PmScanArg arg{};
    arg.size = sizeof arg;
    arg.flags = kScanCheckWpAsync | (rearm ? kScanWpMatching : 0);
    arg.start = addr;
    arg.end = addr + len;
    arg.vec = reinterpret_cast<std::uintptr_t>(out);
    arg.vec_len = capacity;
    arg.category_mask = kPageIsWritten;
    arg.return_mask = kPageIsWritten;
    const int n = ioctl(pagemap, kPagemapScan, &arg);
    if (n < 0) return errno;
    *regions = std::size_t(n);
    *walk_end = std::uintptr_t(arg.walk_end);
    return 0;
}

// What the kernel must do for collect_dirty to trust it, on two scratch pages: a written page that
// is write-protected reads as not written, a write lands without a signal and reads as written
// (that page alone), and the scan that reported it protected it again.
int probe_scan(int fd, int pagemap) {
    const std::size_t len = 2 * g_page_size;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return errno;
    auto* bytes = static_cast<volatile char*>(p);
    const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p);
    int err = uffd_register_on(fd, at, len);
    if (!err) {
        bytes[0] = 1;
        err = uffd_write_protect_on(fd, at, len, true);
    }
    WrittenRegion r[2];
    std::size_t n = 0;
    std::uintptr_t end = 0;
    if (!err) err = scan(pagemap, at, len, true, r, 2, &n, &end);
    if (!err && (n != 0 || end != at + len)) err = EOPNOTSUPP;
    if (!err) {
        bytes[g_page_size] = 1;
        err = scan(pagemap, at, len, true, r, 2, &n, &end);
    }
    if (!err && (n != 1 || r[0].start != at + g_page_size || r[0].end != at + len)) err = EOPNOTSUPP;
    if (!err) err = scan(pagemap, at, len, false, r, 2, &n, &end);
    if (!err && n != 0) err = EOPNOTSUPP;
    munmap(p, len);
    return err;
}
}  // namespace

int uffd_async_probe() {
    const int fd = int(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
    if (fd < 0) return errno;
    uffdio_api api{};
    api.api = UFFD_API;
    // SIGBUS: a fault the context would hand to a reader (none should be) fails rather than waits.
    api.features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP | kFeatureWpUnpopulated | kFeatureWpAsync;
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        const int err = errno;
        close(fd);
        return err == EINVAL ? EOPNOTSUPP : err;
    }
    const int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0) {
        const int err = errno;
        close(fd);
        return err;
    }
    if (const int err = probe_scan(fd, pagemap)) {
        close(pagemap);
        close(fd);
        return err == EINVAL || err == ENOTTY ? EOPNOTSUPP : err;  // a kernel before 6.7
    }
    g_async_uffd = fd;
    g_pagemap = pagemap;
    g_async = true;
    return 0;
}

bool uffd_async_available() { return g_async.load(std::memory_order_relaxed); }

void uffd_async_allow(bool on) { g_async.store(on && g_async_uffd >= 0, std::memory_order_relaxed); }

void uffd_async_forget() {
    g_async = false;
    if (g_async_uffd >= 0) close(g_async_uffd);
    if (g_pagemap >= 0) close(g_pagemap);
    g_async_uffd = g_pagemap = -1;
}

int uffd_async_register(std::uintptr_t addr, std::size_t len) { return uffd_register_on(g_async_uffd, addr, len); }

int uffd_async_unregister(std::uintptr_t addr, std::size_t len) { return uffd_unregister_on(g_async_uffd, addr, len); }

int uffd_async_write_protect(std::uintptr_t addr, std::size_t len) {
    return uffd_write_protect_on(g_async_uffd, addr, len, true);
}

int pagemap_scan_written(std::uintptr_t addr, std::size_t len, bool rearm, WrittenRegion* out, std::size_t capacity,
                         std::size_t* regions, std::uintptr_t* walk_end) {
    return scan(g_pagemap, addr, len, rearm, out, capacity, regions, walk_end);
}

}  // namespace usermm::detail
