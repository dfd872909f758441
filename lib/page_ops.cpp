#include "page_ops.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "pte.hpp"

namespace usermm::detail {

namespace {
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

int page_protect(std::uintptr_t addr, std::size_t len, Prot prot) {
    return result(mprotect(reinterpret_cast<void*>(addr), len, to_mmap_prot(prot)));
}

int page_resident(std::uintptr_t addr, std::size_t len, unsigned char* vec) {
    return result(mincore(reinterpret_cast<void*>(addr), len, vec));
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

int page_populate(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_POPULATE_WRITE));
}

int page_discard(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_DONTNEED));
}

namespace {
// The descriptor of /proc/self/mem and the process that opened it, as pid << 32 | fd in one word,
// so that a process never uses a descriptor of another process's memory: a forked child inherits
// its parent's, which still refers to the parent (also where fork's handlers did not run, as after
// a raw clone(2)).
constexpr std::uint64_t kNoSelfMem = ~std::uint64_t(0);
constinit std::atomic<std::uint64_t> g_self_mem{kNoSelfMem};

int self_mem_fd(int* fd) {
    const std::uint64_t pid = std::uint64_t(getpid());
    for (;;) {
        std::uint64_t cur = g_self_mem.load(std::memory_order_acquire);
        if (cur != kNoSelfMem && cur >> 32 == pid) {
            *fd = int(cur & 0xffffffffu);
            return 0;
        }
        // Another process's descriptor is left open, not closed: its number may belong to the
        // program by now. page_forget_self_mem closes it where that is known to be safe.
        const int mine = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
        if (mine < 0) return errno;
        if (g_self_mem.compare_exchange_strong(cur, pid << 32 | std::uint32_t(mine), std::memory_order_acq_rel)) {
            *fd = mine;
            return 0;
        }
        close(mine);  // another thread of this process opened it first
    }
}

// pread/pwrite until done; a short transfer means part of the range is not mapped.
template <typename Io, typename Buf>
int transfer(Io io, std::uintptr_t addr, Buf buf, std::size_t len) {
    int fd = -1;
    if (const int err = self_mem_fd(&fd)) return err;
    while (len) {
        const ssize_t n = io(fd, buf, len, off_t(addr));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return EFAULT;
        addr += std::size_t(n);
        buf += n;
        len -= std::size_t(n);
    }
    return 0;
}
}  // namespace

int page_self_mem() {
    int fd = -1;
    return self_mem_fd(&fd);
}

bool page_forget_self_mem() {
    const std::uint64_t old = g_self_mem.exchange(kNoSelfMem);
    if (old != kNoSelfMem) close(int(old & 0xffffffffu));
    return old != kNoSelfMem;
}

int page_read_raw(std::uintptr_t addr, void* dst, std::size_t len) {
    return transfer(pread, addr, static_cast<char*>(dst), len);
}

int page_write_raw(std::uintptr_t addr, const void* src, std::size_t len) {
    return transfer(pwrite, addr, static_cast<const char*>(src), len);
}

int page_write_raw_pages(std::uintptr_t addr, const std::byte* const* pages, std::size_t n) {
    int fd = -1;
    if (const int err = self_mem_fd(&fd)) return err;
    constexpr std::size_t kMaxIov = 256;  // well under IOV_MAX, and a small stack frame
    iovec iov[kMaxIov];
    while (n) {
        const std::size_t k = n < kMaxIov ? n : kMaxIov;
        for (std::size_t i = 0; i < k; ++i) iov[i] = {const_cast<std::byte*>(pages[i]), g_page_size};
        const ssize_t w = pwritev(fd, iov, int(k), off_t(addr));
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return errno;
        const std::size_t done = std::size_t(w) / g_page_size;
        if (done == 0) return EFAULT;
        // A short write ends on a page boundary or not; either way the rest is written again.
        addr += done * g_page_size;
        pages += done;
        n -= done;
    }
    return 0;
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

int page_write_file(int fd, const void* buf, std::size_t len, std::uint64_t off) {
    const char* p = static_cast<const char*>(buf);
    while (len) {
        const ssize_t n = pwrite(fd, p, len, off_t(off));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return EIO;
        p += n;
        off += std::uint64_t(n);
        len -= std::size_t(n);
    }
    return 0;
}

int page_file_size(int fd, std::uint64_t* size) {
    struct stat st;
    if (fstat(fd, &st) != 0) return errno;
    *size = std::uint64_t(st.st_size);
    return 0;
}

int page_sync_file(int fd) { return result(fdatasync(fd)); }

int page_write_through_mapping(int fd, std::uint64_t off, const void* src, std::size_t len) {
    void* p = mmap(nullptr, g_page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(off));
    if (p == MAP_FAILED) return errno;
    memcpy(p, src, len);
    return result(munmap(p, g_page_size));
}

int page_advise(std::uintptr_t addr, std::size_t len, int advice) {
    return result(madvise(reinterpret_cast<void*>(addr), len, advice));
}

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

namespace {
// Debian 12's headers (linux-libc-dev 6.1) predate it; the kernel is asked at run time.
constexpr std::uint64_t kFeatureWpUnpopulated = 1ull << 13;

constinit std::atomic<int> g_uffd{-1};
constinit std::atomic<TrackingEngine> g_engine{TrackingEngine::Mprotect};

int ioctl_result(int rc) { return rc == 0 ? 0 : errno; }
}  // namespace

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
    g_uffd.store(fd);
    return 0;
}

TrackingEngine tracking_engine() { return g_engine.load(std::memory_order_relaxed); }
void set_tracking_engine(TrackingEngine e) { g_engine.store(e, std::memory_order_relaxed); }

int uffd_register(std::uintptr_t addr, std::size_t len) {
    uffdio_register reg{};
    reg.range.start = addr;
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    return ioctl_result(ioctl(g_uffd.load(std::memory_order_relaxed), UFFDIO_REGISTER, &reg));
}

int uffd_write_protect(std::uintptr_t addr, std::size_t len, bool protect) {
    uffdio_writeprotect wp{};
    wp.range.start = addr;
    wp.range.len = len;
    wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return ioctl_result(ioctl(g_uffd.load(std::memory_order_relaxed), UFFDIO_WRITEPROTECT, &wp));
}

void uffd_forget() {
    const int fd = g_uffd.exchange(-1);
    if (fd >= 0) close(fd);
    g_engine.store(TrackingEngine::Mprotect, std::memory_order_relaxed);
}

}  // namespace usermm::detail
