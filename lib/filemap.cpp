#include "filemap.hpp"

#include <algorithm>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "fault_world.hpp"
#include "page_ops.hpp"

namespace usermm::detail {

namespace {

constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kRelaxed = std::memory_order_relaxed;

FileRange clamp(FileRange r, FileRange limit) {
    r.first = std::max(r.first, limit.first);
    r.last = std::min(r.last, limit.last);
    if (r.last < r.first) r.last = r.first;
    return r;
}

cache_state_t locked_by_me() { return kCacheLocked | (cache_state_t(getpid()) << kCacheOwnerShift); }

// A reader that holds a page's lock in another process (the page cache is shared with forked
// children) and no longer exists: its read will never finish.
bool owner_gone(cache_state_t v) {
    const pid_t owner = pid_t(v >> kCacheOwnerShift);
    return owner != getpid() && kill(owner, 0) != 0 && errno == ESRCH;
}

// Locks file page `need` for reading, or waits until another thread has filled it. Returns false
// if it is filled (nothing to read). A lock left by a dead process is taken over.
bool lock_for_read(PageCache& cache, std::uint64_t need) {
    std::atomic<cache_state_t>& st = cache.state(need);
    const cache_state_t mine = locked_by_me();
    for (unsigned spins = 0;; ++spins) {
        cache_state_t cur = st.load(kAcquire);
        if (cur & kCacheFilled) return false;
        if ((cur & kCacheLocked) && !(spins % 4096 == 4095 && owner_gone(cur))) {
            spin_backoff(spins);
            continue;
        }
        if (st.compare_exchange_weak(cur, mine, kAcquire, kRelaxed)) return true;
    }
}

bool try_lock_empty(PageCache& cache, std::uint64_t page) {
    cache_state_t empty = 0;
    return cache.state(page).compare_exchange_strong(empty, locked_by_me(), kAcquire, kRelaxed);
}

// Reads the locked pages r into the cache: the window ends where fstat saw the end of the file, and
// the last page may be partial. Returns the end of the pages read whole (or up to the end of the
// file, the rest of that page zeroed, like the kernel's); reading less than fstat promised means
// the file shrank meanwhile or the file system failed, and only what was read whole counts.
std::uint64_t read_range(PageCache& cache, FileRange r, std::uint64_t eof_bytes, FileRead* out) {
    const std::uint64_t at = r.first << g_page_shift;
    const std::uint64_t end = std::min(r.last << g_page_shift, eof_bytes);
    std::byte* dst = cache.view(r.first, g_page_shift);
    std::size_t got = 0;
    out->err = page_read_file(cache.fd, dst, std::size_t(end - at), at, &got);
    out->at = at;
    out->wanted = end - at;
    out->bytes = got;
    const std::uint64_t complete = at + got;
    if (complete < end) return complete >> g_page_shift;
    if (end % g_page_size) std::memset(dst + (end - at), 0, g_page_size - end % g_page_size);
    return r.last;
}

}  // namespace

FileRange readahead_window(const Vma& vma, std::uint64_t page, FileRange around, std::uint64_t eof) {
    const std::uint64_t most = std::max<std::uint64_t>({vma.readahead_max, vma.fault_around_pages, 1});
    FileRange w;
    switch (vma.advice) {
        case Advice::Random:
            w = {page, page + 1};
            break;
        case Advice::Sequential:
            w = {page, page + most};
            break;
        default:
            if (page == vma.ra_next.load(kRelaxed)) {
                const std::uint64_t grown = 2 * std::uint64_t(vma.ra_window.load(kRelaxed));
                w = {page, page + std::clamp<std::uint64_t>(grown, around.last - around.first, most)};
            } else if (vma.ra_misses.load(kRelaxed) > kReadaroundMisses) {
                w = {page, page + 1};  // random access: what was read around a fault went unused
            } else {
                w = around;
            }
            break;
    }
    const std::uint64_t chunk = page & ~(PageCache::kChunkPages - 1);
    const FileRange vma_pages{vma.pgoff, vma.file_page(vma.end)};
    w = clamp(clamp(clamp(w, vma_pages), {0, eof}), {chunk, chunk + PageCache::kChunkPages});
    return w;
}

int filemap_read(PageCache& cache, std::uint64_t need, FileRange window, std::uint64_t eof_bytes, FileRead* out) {
    *out = FileRead{};
    const bool needed = need != window.last;
    FileRange r;
    if (needed) {
        if (!lock_for_read(cache, need)) return 0;
        r = {need, need + 1};
    } else {
        // A readahead starts at the window's first free page and reads nothing if that is taken.
        if (window.first == window.last || !try_lock_empty(cache, window.first)) return 0;
        r = {window.first, window.first + 1};
    }
    while (r.first > window.first && try_lock_empty(cache, r.first - 1)) --r.first;
    while (r.last < window.last && try_lock_empty(cache, r.last)) ++r.last;

    std::uint64_t last = read_range(cache, r, eof_bytes, out);
    int err = out->err;
    if (needed && need >= last && r.last - r.first > 1) {
        // The window failed before the needed page: as the kernel does, the needed page is then
        // read alone, and only its own failure is the fault's.
        for (std::uint64_t p = r.first; p < r.last; ++p)
            if (p != need) cache.state(p).store(0, kRelease);
        r = {need, need + 1};
        last = read_range(cache, r, eof_bytes, out);
        err = out->err;
    }
    for (std::uint64_t p = r.first; p < r.last; ++p)
        cache.state(p).store(p >= last ? 0 : (p == need ? kCacheFilled : kCacheFilled | kCacheReadahead), kRelease);
    out->pages = {r.first, std::max(r.first, last)};
    out->need_read = needed && need < last;
    if (needed ? !out->need_read : last <= r.first) return err ? err : ENODATA;
    return 0;
}

void readahead_update(Vma& vma, const FileRead& read) {
    if (read.pages.first == read.pages.last) return;
    vma.ra_next.store(read.pages.last, kRelaxed);
    vma.ra_window.store(std::uint32_t(read.pages.last - read.pages.first), kRelaxed);
}

}  // namespace usermm::detail
