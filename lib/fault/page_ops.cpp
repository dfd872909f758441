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
}  // namespace

int page_protect(std::uintptr_t addr, std::size_t len, Prot prot) {
    return result(mprotect(reinterpret_cast<void*>(addr), len, to_mmap_prot(prot)));
}

int page_resident(std::uintptr_t addr, std::size_t len, unsigned char* vec) {
    return result(mincore(reinterpret_cast<void*>(addr), len, vec));
}

int page_discard(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_DONTNEED));
}

int page_populate(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_POPULATE_WRITE));
}

// Linux 6.13's values; Debian 12's headers lack them.
constexpr int kMadvGuardInstall = 102;
constexpr int kMadvGuardRemove = 103;

int page_guard_install(std::uintptr_t addr, std::size_t len) {
    // The kernel may stop early to let a signal in (EINTR) and wants the call again.
    int err;
    while ((err = result(madvise(reinterpret_cast<void*>(addr), len, kMadvGuardInstall))) == EINTR) {}
    return err;
}

int page_guard_remove(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, kMadvGuardRemove));
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

int page_write_through_mapping(int fd, std::uint64_t off, const void* src, std::size_t len) {
    void* p = mmap(nullptr, g_page_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(off));
    if (p == MAP_FAILED) return errno;
    memcpy(p, src, len);
    return result(munmap(p, g_page_size));
}

int page_advise(std::uintptr_t addr, std::size_t len, int advice) {
    return result(madvise(reinterpret_cast<void*>(addr), len, advice));
}

namespace {
constinit std::atomic<int> g_uffd{-1};
constinit std::atomic<TrackingEngine> g_engine{TrackingEngine::Mprotect};

int ioctl_result(int rc) { return rc == 0 ? 0 : errno; }
}  // namespace

void uffd_adopt(int fd) { g_uffd.store(fd); }

TrackingEngine tracking_engine() { return g_engine.load(std::memory_order_relaxed); }
void set_tracking_engine(TrackingEngine e) { g_engine.store(e, std::memory_order_relaxed); }

int uffd_register_on(int fd, std::uintptr_t addr, std::size_t len) {
    uffdio_register reg{};
    reg.range.start = addr;
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_WP;
    return ioctl_result(ioctl(fd, UFFDIO_REGISTER, &reg));
}

int uffd_unregister_on(int fd, std::uintptr_t addr, std::size_t len) {
    uffdio_range range{};
    range.start = addr;
    range.len = len;
    return ioctl_result(ioctl(fd, UFFDIO_UNREGISTER, &range));
}

int uffd_write_protect_on(int fd, std::uintptr_t addr, std::size_t len, bool protect) {
    uffdio_writeprotect wp{};
    wp.range.start = addr;
    wp.range.len = len;
    wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return ioctl_result(ioctl(fd, UFFDIO_WRITEPROTECT, &wp));
}

int uffd_register(std::uintptr_t addr, std::size_t len) {
    return uffd_register_on(g_uffd.load(std::memory_order_relaxed), addr, len);
}

int uffd_unregister(std::uintptr_t addr, std::size_t len) {
    return uffd_unregister_on(g_uffd.load(std::memory_order_relaxed), addr, len);
}

int uffd_write_protect(std::uintptr_t addr, std::size_t len, bool protect) {
    return uffd_write_protect_on(g_uffd.load(std::memory_order_relaxed), addr, len, protect);
}

int uffd_copy(std::uintptr_t dst, const void* src, std::size_t len) {
    for (std::size_t done = 0; done < len;) {
        uffdio_copy c{};
        c.dst = dst + done;
        c.src = reinterpret_cast<std::uintptr_t>(src) + done;
        c.len = len - done;
        c.mode = UFFDIO_COPY_MODE_DONTWAKE;  // SIGBUS mode: nobody waits on the descriptor
        if (ioctl(g_uffd.load(std::memory_order_relaxed), UFFDIO_COPY, &c) == 0) return 0;
        if (errno != EAGAIN || c.copy <= 0) return errno;
        done += std::size_t(c.copy);  // interrupted part way: the rest again
    }
    return 0;
}

void uffd_forget() {
    const int fd = g_uffd.exchange(-1);
    if (fd >= 0) close(fd);
    g_engine.store(TrackingEngine::Mprotect, std::memory_order_relaxed);
}

}  // namespace usermm::detail
