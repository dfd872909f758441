// File VMAs in the API world: the registry of page caches (one per file in the process), map_file,
// write-back (sync, unmap, destruction), advice, and reading ahead of faults.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "account.hpp"
#include "file_vma.hpp"
#include "filemap.hpp"
#include "find_vma.hpp"

namespace usermm {

using namespace detail;

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

// A range of a file that a VMA shows, as map_file created it (splits of the VMA do not change
// it; unmap trims it). DontNeed drops cached pages only where no other user shows them.
struct CacheUser {
    const ArenaCore* arena;
    std::uintptr_t start;
    std::uintptr_t end;
    std::uint64_t pgoff;
    std::uint64_t first_page() const { return pgoff; }
    std::uint64_t last_page() const { return pgoff + ((end - start) >> g_page_shift); }
};

struct CacheEntry {
    std::unique_ptr<PageCache> cache;
    std::vector<CacheUser> users;
    bool forked = false;  // a fork() copied its memfd's mappings into another process
};

// Everything here is under the mutex, except PageCache::refs, which a split of a VMA (holding one
// reference already) raises without it.
struct CacheRegistry {
    std::mutex mutex;
    std::vector<std::unique_ptr<CacheEntry>> entries;
};

// fork_prepare takes the registry's mutex too: a signal handler that forks while its thread holds
// the mutex would wait for itself, so the mutex is held with the asynchronous signals blocked.
struct RegistryLock {
    AsyncSignalsBlocked blocked;  // first: restored after the unlock
    std::lock_guard<std::mutex> lock;
    explicit RegistryLock(std::mutex& m) : lock(m) {}
};

CacheRegistry& caches() {
    static CacheRegistry* r = new CacheRegistry;  // outlives static destructors: arenas may too
    return *r;
}

// Under the registry's mutex.
CacheEntry& entry_of(const PageCache* c) {
    for (auto& e : caches().entries)
        if (e->cache.get() == c) return *e;
    std::abort();  // a VMA refers to a cache the registry does not know: memory corruption
}

void close_fd(int& fd) {
    if (fd >= 0) close(fd);
    fd = -1;
}

std::size_t chunk_bytes() { return std::size_t(PageCache::kChunkPages) << g_page_shift; }
constexpr std::size_t kStateBytes = PageCache::kChunkPages * sizeof(cache_state_t);
constexpr long kMapsPerChunk = 2;  // the view and the state table, outside every arena

// Gives the cache chunks for file pages [0, last).
void add_chunks(PageCache& c, std::uint64_t last, const char* call) {
    const std::size_t need = std::size_t((last + PageCache::kChunkPages - 1) >> PageCache::kChunkShift);
    if (need <= c.chunk_count) return;
    if (const int err = page_memfd_resize(c.memfd, std::uint64_t(need) * chunk_bytes()))
        fail(err, "{}: cannot grow the page cache of '{}' to {:#x} bytes", call, c.path, need * chunk_bytes());
    for (std::size_t k = c.chunk_count; k < need; ++k) {
        auto chunk = std::make_unique<PageCache::Chunk>();
        void* view = nullptr;
        void* state = nullptr;
        if (const int err = page_map_view(c.memfd, std::uint64_t(k) * chunk_bytes(), chunk_bytes(), &view))
            fail(err, "{}: cannot map the page cache of '{}'", call, c.path);
        if (const int err = page_alloc_shared_table(kStateBytes, &state)) {
            page_release(addr_of(view), chunk_bytes());
            fail(err, "{}: cannot allocate the page cache state of '{}'", call, c.path);
        }
        chunk->view = static_cast<std::byte*>(view);
        chunk->state = static_cast<std::atomic<cache_state_t>*>(state);
        c.chunks[k].store(chunk.release(), std::memory_order_release);
        c.chunk_count = k + 1;
        map_budget_charge_process(kMapsPerChunk);
    }
}

// Frees what the cache holds; read-ahead pages never mapped count as wasted (into `a` if known).
void destroy(ArenaCore* a, PageCache& c) {
    std::uint64_t wasted = 0;
    // Only the state table's pages that exist hold marks: reading the others would create them.
    const std::size_t per_page = g_page_size / sizeof(cache_state_t);
    std::vector<unsigned char> resident(kStateBytes / g_page_size);
    for (std::size_t k = 0; k < c.chunk_count; ++k) {
        PageCache::Chunk* chunk = c.chunks[k].load(kRelaxed);
        const bool known = page_resident(addr_of(chunk->state), kStateBytes, resident.data()) == 0;
        for (std::size_t t = 0; t < resident.size(); ++t) {
            if (known && !(resident[t] & 1)) continue;
            for (std::size_t i = t * per_page; i < (t + 1) * per_page; ++i)
                wasted += (chunk->state[i].load(kRelaxed) & kCacheReadahead) != 0;
        }
        page_release(addr_of(chunk->view), chunk_bytes());
        page_release(addr_of(chunk->state), kStateBytes);
        delete chunk;
    }
    map_budget_charge_process(-kMapsPerChunk * long(c.chunk_count));
    account_readahead_wasted(a, nullptr, wasted);
    int write_fd = c.write_fd.exchange(-1);
    close_fd(c.fd);
    close_fd(write_fd);
    close_fd(c.memfd);
}

// usermm's own descriptor of the file open as `fd`: a new open file description (through
// /proc/self/fd), so that the caller's O_APPEND, O_DIRECT or O_NONBLOCK never apply to usermm's
// reads and write-back, and the caller's later fcntl() cannot change them.
int reopen(int fd, bool writable, const std::string& path, const char* call) {
    char link[64];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const int own = open(link, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (own < 0) fail(errno, "{}: cannot open fd {} ('{}') again for usermm's own use", call, fd, path);
    return own;
}

// The cache of the file open as `fd` (created on first use), with chunks up to file page `last`
// and a descriptor for writing if `writable`; one more VMA refers to it.
PageCache& cache_get(int fd, const std::string& path, bool writable, std::uint64_t last, const char* call) {
    struct stat st;
    if (fstat(fd, &st) != 0) fail(errno, "{}: fd {} ('{}'): fstat failed", call, fd, path);
    CacheRegistry& reg = caches();
    RegistryLock lock(reg.mutex);
    CacheEntry* e = nullptr;
    for (auto& candidate : reg.entries)
        if (candidate->cache->dev == st.st_dev && candidate->cache->ino == st.st_ino) e = candidate.get();
    if (!e) {
        auto fresh = std::make_unique<CacheEntry>();
        fresh->cache = std::make_unique<PageCache>();
        PageCache& c = *fresh->cache;
        c.dev = st.st_dev;
        c.ino = st.st_ino;
        std::snprintf(c.path, sizeof c.path, "%s", path.c_str());
        c.fd = reopen(fd, false, path, call);
        const std::string name = "usermm:" + path.substr(path.find_last_of('/') + 1);
        if (const int err = page_memfd_create(name.c_str(), 0, &c.memfd)) {
            close_fd(c.fd);
            fail(err, "{}: cannot create the page cache (memfd) of '{}'", call, path);
        }
        reg.entries.push_back(std::move(fresh));
        e = reg.entries.back().get();
    }
    PageCache& c = *e->cache;
    try {
        add_chunks(c, last, call);
        if (writable && c.write_fd.load() < 0) c.write_fd.store(reopen(fd, true, path, call));
    } catch (...) {
        if (c.refs.load() == 0) {  // a fresh cache nobody uses: it goes again
            destroy(nullptr, c);
            std::erase_if(reg.entries, [e](const auto& x) { return x.get() == e; });
        }
        throw;
    }
    c.refs.fetch_add(1);
    return c;
}

void cache_put(ArenaCore* a, PageCache* c) {
    CacheRegistry& reg = caches();
    RegistryLock lock(reg.mutex);
    if (c->refs.fetch_sub(1) != 1) return;
    destroy(a, *c);
    std::erase_if(reg.entries, [c](const auto& x) { return x->cache.get() == c; });
}

// Forgets that arena `a` shows [r.start, r.end) of the cache's file (unmap, destruction).
void forget_users(const ArenaCore& a, const PageCache* c, Range r) {
    CacheRegistry& reg = caches();
    RegistryLock lock(reg.mutex);
    std::vector<CacheUser>& users = entry_of(c).users;
    std::vector<CacheUser> kept;
    for (const CacheUser& u : users) {
        if (u.arena != &a || u.end <= r.start || u.start >= r.end) {
            kept.push_back(u);
            continue;
        }
        if (u.start < r.start) kept.push_back({u.arena, u.start, r.start, u.pgoff});
        if (u.end > r.end) kept.push_back({u.arena, r.end, u.end, u.pgoff + ((r.end - u.start) >> g_page_shift)});
    }
    users = std::move(kept);
}

std::string fd_path(int fd) {
    char link[64];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    char target[kPathMax] = {};
    const ssize_t n = readlink(link, target, sizeof target - 1);
    return n > 0 ? std::string(target, std::size_t(n)) : std::string(link);
}

std::uint64_t file_size(const PageCache& c, const char* call) {
    std::uint64_t size = 0;
    if (const int err = page_file_size(c.fd, &size)) fail(err, "{}: fstat of '{}' failed", call, c.path);
    return size;
}

std::uint64_t pages_of(std::uint64_t bytes) { return (bytes + g_page_size - 1) >> g_page_shift; }

// The file pages of an address range of a file VMA.
FileRange file_pages(const Vma& v, Range part) { return {v.file_page(part.start), v.file_page(part.end)}; }

}  // namespace

// --- shared with arena.cpp, arena_ops.cpp and snapshot.cpp ---------------------------------------

void detail::vma_free(ArenaCore* a, Vma* v) {
    if (v->file) cache_put(a, v->file);
    delete v;
}

void detail::vma_copy_file(Vma& to, const Vma& from) {
    to.file = from.file;
    to.pgoff = from.pgoff;
    to.share = from.share;
    to.advice = from.advice;
    to.may_write = from.may_write;
    to.readahead_max = from.readahead_max;
    to.ra_next.store(from.ra_next.load(kRelaxed), kRelaxed);
    to.ra_window.store(from.ra_window.load(kRelaxed), kRelaxed);
    to.ra_misses.store(from.ra_misses.load(kRelaxed), kRelaxed);
    if (to.file) to.file->refs.fetch_add(1);
}

void detail::write_protect_shared_files(ArenaCore& a) {
    for (const Vma& v : a.tree) {
        if (!v.file || v.share != Share::Shared) continue;
        auto writable = [&a](std::size_t i) {
            const pte_t p = a.pte[i].load(kRelaxed);
            return allows(pte_to_prot(p), Prot::Write) ? int(pte_prot(p)) : kNoRun;
        };
        // On a refusal protect_run re-read the PTEs from the kernel; the pages stay writable.
        for_each_run(a.page_index(v.start), a.page_index(v.end), writable, [&a](std::size_t i, std::size_t j, int prot) {
            reprotect_run(a, i, j, Prot(prot) & ~Prot::Write);
        });
    }
}

void detail::refuse_file_vmas(ArenaCore& a, const char* call, Range r) {
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it)
        if (it->file)
            fail(ENOTSUP, "{}: range [{:#x}, {:#x}) holds file VMA '{}' at {:#x}; only anonymous memory can be "
                 "snapshotted or dirty-tracked", call, r.start, r.end, it->name, it->start);
}

void detail::recount_kernel_maps(ArenaCore& a) {
    map_budget_charge(a, long(kernel_mappings(a.base, a.end).size()) + 2 - a.kernel_maps.load());
}

void detail::page_caches_fork_prepare() { caches().mutex.lock(); }

void detail::page_caches_fork_done() {
    for (auto& e : caches().entries) e->forked = true;
    caches().mutex.unlock();
}

void detail::writeback(ArenaCore& a, Vma& v, Range part, const char* call, FileSync* later) {
    if (!v.file || v.share != Share::Shared) return;
    PageCache& c = *v.file;
    const std::uint64_t eof = file_size(c, call);
    const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
    // Write access goes first, so that the next write after the write-back is seen: one mprotect
    // per run of mapped pages that holds a writable one (readable neighbours lose nothing).
    auto mapped_as = [&a](std::size_t i) {
        const pte_t p = a.pte[i].load(kRelaxed);
        return pte_prot(p) ? int(pte_prot(p) & ~to_pte(Prot::Write)) : kNoRun;
    };
    for_each_run(first, last, mapped_as, [&](std::size_t i, std::size_t j, int prot) {
        while (i < j && !(a.pte[i].load(kRelaxed) & to_pte(Prot::Write))) ++i;
        while (j > i && !(a.pte[j - 1].load(kRelaxed) & to_pte(Prot::Write))) --j;
        if (i == j) return;
        if (const int err = reprotect_run(a, i, j, Prot(prot)))
            fail(err, "{}: mprotect of [{:#x}, {:#x}) to {} failed", call, a.page_addr(i), a.page_addr(j),
                 to_string(Prot(prot)));
    });
    // Then one write per run of dirty pages (within a chunk of the cache's view): dirty through this
    // VMA, or through any shared VMA of the file (the page cache's mark, like msync's). A page is
    // clean once its write succeeded; the ones after a failure stay dirty. Another VMA that may
    // still write the page without a fault keeps its own mark and writes it back itself.
    std::vector<std::pair<std::size_t, std::size_t>> written;
    auto cache_state = [&](std::size_t i) -> std::atomic<cache_state_t>& { return c.state(v.file_page(a.page_addr(i))); };
    auto dirty = [&](std::size_t i) {
        return (a.pte[i].load(kRelaxed) & kPteDirtyFile) || (cache_state(i).load(kRelaxed) & kCacheDirty) ? 1 : kNoRun;
    };
    std::uint64_t pages = 0, bytes = 0;
    auto mark = [&](std::size_t i, std::size_t j, bool is_dirty) {
        for (std::size_t k = i; k < j; ++k) {
            if (is_dirty) {
                a.pte[k].fetch_or(kPteDirtyFile, kRelaxed);
                cache_state(k).fetch_or(kCacheDirty, kRelaxed);
            } else {
                a.pte[k].fetch_and(pte_t(~kPteDirtyFile), kRelaxed);
                cache_state(k).fetch_and(cache_state_t(~kCacheDirty), kRelaxed);
            }
        }
    };
    try {
        for_each_run(first, last, dirty, [&](std::size_t i, std::size_t j, int) {
            for (std::size_t lo = i; lo < j;) {
                const std::uint64_t f = v.file_page(a.page_addr(lo));
                const std::size_t in_chunk = std::size_t(PageCache::kChunkPages - (f & (PageCache::kChunkPages - 1)));
                const std::size_t hi = std::min(j, lo + in_chunk);
                const std::uint64_t at = f << g_page_shift;
                // Past the end of the file (it was truncated) there is nothing to write, as in the kernel.
                const std::uint64_t end = std::min<std::uint64_t>(at + ((hi - lo) << g_page_shift), std::max(eof, at));
                if (end > at) {
                    if (const int err = page_write_file(c.write_fd, c.view(f, g_page_shift), std::size_t(end - at), at)) {
                        account_writeback(a, v, 0, 0, true);
                        fail(err, "{}: writing '{}' bytes [{:#x}, {:#x}) from addr {:#x} failed; the pages stay dirty",
                             call, c.path, at, end, a.page_addr(lo));
                    }
                }
                mark(lo, hi, false);
                written.push_back({lo, hi});
                pages += hi - lo;
                bytes += end - at;
                lo = hi;
            }
        });
        if (!written.empty() && later) {
            later->cache = &c;
            c.refs.fetch_add(1);
            later->range = part;
            for (const auto& [i, j] : written) later->pages.push_back({v.file_page(a.page_addr(i)), v.file_page(a.page_addr(j))});
        } else if (!written.empty())
            if (const int err = page_sync_file(c.write_fd)) {
                account_writeback(a, v, 0, 0, true);
                fail(err, "{}: fdatasync of '{}' failed after writing [{:#x}, {:#x}); the pages stay dirty", call,
                     c.path, part.start, part.end);
            }
    } catch (const Error&) {
        // fdatasync reports an error once: the pages written before it are not known to be on the
        // disk, so they are dirty again for the next attempt.
        for (const auto& [i, j] : written) mark(i, j, true);
        throw;
    }
    account_writeback(a, v, pages, bytes, false);
}

int detail::FileSync::finish(ArenaCore& a) {
    if (!cache) return 0;
    const int err = page_sync_file(cache->write_fd);
    if (err) {
        for (const auto& [first, last] : pages)
            for (std::uint64_t p = first; p < last; ++p) cache->state(p).fetch_or(kCacheDirty, kRelaxed);
        account_writeback_error(a);
    }
    cache_put(&a, cache);
    cache = nullptr;
    return err;
}

void detail::read_file_pages(ArenaCore& a, Vma& v, Range part, const char* call, bool must) {
    PageCache& c = *v.file;
    const std::uint64_t size = file_size(c, call);
    const std::uint64_t eof = pages_of(size);
    const FileRange want = file_pages(v, part);
    if (must && want.last > eof)
        fail(EFAULT, "{}: addr {:#x} is past the end of '{}' (size {:#x})", call,
             v.start + ((std::max(eof, want.first) - v.pgoff) << g_page_shift), c.path, size);
    constexpr std::uint64_t kMaxRead = 256;  // pages per read system call
    std::uint64_t pages = 0, bytes = 0;
    for (std::uint64_t p = want.first; p < std::min(want.last, eof);) {
        if (c.state(p).load(std::memory_order_acquire) & kCacheFilled) {
            ++p;
            continue;
        }
        const std::uint64_t chunk_end = (p & ~(PageCache::kChunkPages - 1)) + PageCache::kChunkPages;
        const FileRange window{p, std::min({p + kMaxRead, want.last, eof, chunk_end})};
        FileRead rd;
        // With `must`, page p is needed: a read of it by another thread (a fault in another arena)
        // is waited for, and the loop sees p filled next, or reads it itself.
        const int err = filemap_read(c, must ? p : window.last, window, size, &rd);
        if (err && must) {
            account_file_read(a, v, pages + (rd.pages.last - rd.pages.first), bytes + rd.bytes);
            if (err == ENODATA)
                fail(EIO, "{}: short read of '{}' at offset {:#x} (the file ended early)", call, c.path, rd.at + rd.bytes);
            fail(err, "{}: reading '{}' at offset {:#x} failed", call, c.path, rd.at + rd.bytes);
        }
        pages += rd.pages.last - rd.pages.first;
        bytes += rd.bytes;
        p = must ? std::max(p, rd.pages.last) : std::max(p + 1, rd.pages.last);
    }
    account_file_read(a, v, pages, bytes);
}

int detail::unmap_file_part(ArenaCore& a, Vma& v, Range part) {
    if (const int err = page_reserve_fixed(part.start, part.end - part.start)) return err;
    const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
    for (std::size_t i = first; i < last; ++i) a.pte[i].fetch_and(pte_t(~(kPteFile | kPteEdge)), kRelaxed);
    settle_edges(a, first, last);  // the fresh piece's own anon_vma never merges with the arena's
    forget_users(a, v.file, part);
    if (tracking_engine() == TrackingEngine::Uffd) return uffd_register(part.start, part.end - part.start);
    return 0;
}

void detail::forget_file_users(const ArenaCore& a, const Vma& v) { forget_users(a, v.file, {v.start, v.end}); }

void detail::drop_cached_pages(ArenaCore& a, Vma& v, Range part) {
    PageCache& c = *v.file;
    const FileRange mine = file_pages(v, part);
    // Under the mutex throughout: another VMA of the file registers itself (map_file) before it
    // can fault, so none can map these pages while they go.
    CacheRegistry& reg = caches();
    RegistryLock lock(reg.mutex);
    const CacheEntry& e = entry_of(&c);
    if (e.forked) return;
    for (const CacheUser& u : e.users) {
        const bool this_range = u.arena == &a && u.start <= part.start && u.end >= part.end;
        if (!this_range && u.first_page() < mine.last && u.last_page() > mine.first) return;
    }
    if (page_memfd_punch(c.memfd, mine.first << g_page_shift, (mine.last - mine.first) << g_page_shift) != 0) return;
    std::uint64_t wasted = 0;
    for (std::uint64_t p = mine.first; p < mine.last; ++p)
        wasted += (c.state(p).exchange(0, kRelaxed) & kCacheReadahead) != 0;
    account_readahead_wasted(&a, &v, wasted);
}

// --- Arena ---------------------------------------------------------------------------------------

void* Arena::map_file(int fd, std::uint64_t offset, std::size_t length, Prot prot, Share share,
                      const MapOptions& options) {
    init_process();
    return map_file_as(fd, fd_path(fd), offset, length, prot, share, options);
}

void* Arena::map_file(const std::string& path, std::uint64_t offset, std::size_t length, Prot prot, Share share,
                      const MapOptions& options) {
    static constexpr const char* call = "usermm::Arena::map_file";
    init_process();
    const bool writable = share == Share::Shared && allows(prot, Prot::Write);
    const int fd = open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) fail(errno, "{}: cannot open '{}' (offset {:#x})", call, path, offset);
    struct Closer {
        int fd;
        ~Closer() { close(fd); }
    } closer{fd};
    return map_file_as(fd, path, offset, length, prot, share, options);
}

void* Arena::map_file_as(int fd, const std::string& path, std::uint64_t offset, std::size_t length, Prot prot,
                         Share share, const MapOptions& options) {
    static constexpr const char* call = "usermm::Arena::map_file";
    ArenaCore& a = live_arena(core_, call);
    require_self_mem(call);  // a private mapping's first write, and any unmap, go through it
    const std::uintptr_t want = addr_of(options.address);
    prot = check_prot(call, prot, want);
    const std::size_t len = round_up_length(call, length, want);
    if (offset & (g_page_size - 1)) fail(EINVAL, "{}: offset {:#x} of '{}' is not page-aligned", call, offset, path);
    if (share != Share::Private && share != Share::Shared)
        fail(EINVAL, "{}: share {} is neither Private nor Shared (offset {:#x})", call, unsigned(share), offset);
    const std::uint64_t last_page = (offset >> g_page_shift) + (len >> g_page_shift);
    if (offset > UINT64_MAX - len || last_page > PageCache::kMaxChunks * PageCache::kChunkPages)
        fail(EOVERFLOW, "{}: offset {:#x} + length {:#x} is beyond the largest file usermm maps", call, offset, length);
    if (len > a.end - a.base)
        fail(ENOMEM, "{}: length {:#x} exceeds the arena's size {:#x} (addr {:#x})", call, length, a.end - a.base, want);
    if (options.fault_around_pages > (std::size_t(1) << 20) || options.readahead_pages > (std::size_t(1) << 20))
        fail(EINVAL, "{}: fault_around_pages {} or readahead_pages {} is above 2^20", call, options.fault_around_pages,
             options.readahead_pages);
    const int flags = fcntl(fd, F_GETFL);
    if (flags < 0) fail(EBADF, "{}: fd {} is not an open file (offset {:#x})", call, fd, offset);
    const int mode = flags & O_ACCMODE;
    if (mode == O_WRONLY || (flags & O_PATH))
        fail(EACCES, "{}: fd {} ('{}') is not open for reading", call, fd, path);
    const bool may_write = mode == O_RDWR;
    if (share == Share::Shared && allows(prot, Prot::Write) && !may_write)
        fail(EACCES, "{}: fd {} ('{}') is not open for writing, as a writable shared VMA needs", call, fd, path);
    struct stat st;
    if (fstat(fd, &st) != 0) fail(errno, "{}: fd {} ('{}'): fstat failed", call, fd, path);
    if (!S_ISREG(st.st_mode)) fail(ENODEV, "{}: fd {} ('{}') is not a regular file", call, fd, path);
    if (want) check_range(a, call, options.address, length);

    PageCache& cache = cache_get(fd, path, share == Share::Shared && may_write, last_page, call);
    auto free_vma = [&a](Vma* v) { vma_free(&a, v); };
    auto vma = std::unique_ptr<Vma, decltype(free_vma)>(new Vma, free_vma);
    vma->file = &cache;
    vma->pgoff = offset >> g_page_shift;
    vma->share = share;
    vma->may_write = share == Share::Private || may_write;
    vma->prot = prot;
    vma->fault_around_pages = std::uint32_t(options.fault_around_pages);
    vma->readahead_max = std::uint32_t(options.readahead_pages);
    vma->ra_next.store(vma->pgoff, kRelaxed);
    set_name(*vma, options.name.empty() ? std::string_view(cache.path) : options.name);

    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    const std::uintptr_t start = place_vma(a, call, want, len, length);
    const std::size_t first = a.page_index(start), last = a.page_index(start + len);
    for (std::size_t k = 0; k < a.snapshot_count; ++k)
        if (!a.snapshots[k]->anonymous_only && a.snapshots[k]->first < last && a.snapshots[k]->last > first)
            fail(EBUSY, "{}: range [{:#x}, {:#x}) is inside live snapshot {}; snapshots cover anonymous memory only",
                 call, start, start + len, a.snapshots[k]->sequence);
    preserve_range(a, call, {start, start + len});  // whole-arena snapshots read zeros there
    if (const int err = page_map_file_fixed(start, len, cache.memfd, offset, share == Share::Shared)) {
        // Whatever the kernel left there becomes reservation again, a piece of its own.
        const int again = page_reserve_fixed(start, len);
        settle_edges(a, first, last);
        if (again) fail(again, "{}: [{:#x}, {:#x}) is lost to the arena after a failed mmap", call, start, start + len);
        fail(err, "{}: cannot map the page cache of '{}' at {:#x}", call, path, start);
    }
    for (std::size_t i = first; i < last; ++i) a.pte[i].fetch_or(kPteFile, kRelaxed);
    settle_edges(a, first, last);
    {
        CacheRegistry& reg = caches();
        RegistryLock lock(reg.mutex);
        entry_of(&cache).users.push_back({&a, start, start + len, offset >> g_page_shift});
    }
    insert_vma(a, vma.release(), start, len);
    return ptr_of(start);
}

void Arena::sync(void* addr, std::size_t length) {
    static constexpr const char* call = "usermm::Arena::sync";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    std::vector<FileSync> pending;
    // The writes under the arena's lock; the wait for the disk without it, so that faults go on
    // meanwhile (msync, likewise, does not hold mmap_lock across its fsync).
    {
        ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
        const std::vector<Vma*> vmas = covering_vmas(a, call, r);
        pending.reserve(vmas.size());
        try {
            for (Vma* v : vmas) {
                pending.emplace_back();
                writeback(a, *v, {std::max(v->start, r.start), std::min(v->end, r.end)}, call, &pending.back());
            }
        } catch (...) {
            for (FileSync& s : pending) s.finish(a);
            throw;
        }
    }
    int first_err = 0;
    Range failed{};
    std::string path;
    for (FileSync& s : pending) {
        const std::string name = s.cache ? s.cache->path : "";
        if (const int err = s.finish(a); err && !first_err) {
            first_err = err;
            failed = s.range;
            path = name;
        }
    }
    if (first_err)
        fail(first_err, "{}: fdatasync of '{}' failed after writing [{:#x}, {:#x}); the pages stay dirty", call, path,
             failed.start, failed.end);
}

void Arena::advise(void* addr, std::size_t length, Advice advice) {
    static constexpr const char* call = "usermm::Arena::advise";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    if (unsigned(advice) > unsigned(Advice::DontNeed))
        fail(EINVAL, "{}: advice {} is unknown (addr {:#x})", call, unsigned(advice), r.start);
    auto lower_spare = std::make_unique<Vma>();
    auto upper_spare = std::make_unique<Vma>();
    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    const std::vector<Vma*> vmas = covering_vmas(a, call, r);
    auto part_of = [&r](const Vma* v) { return Range{std::max(v->start, r.start), std::min(v->end, r.end)}; };
    switch (advice) {
        case Advice::Normal:
        case Advice::Random:
        case Advice::Sequential:
            // A property of the VMA, as in the kernel: the range becomes VMAs of its own.
            split_at(a, r.start, lower_spare);
            split_at(a, r.end, upper_spare);
            for (Vma* v : covering_vmas(a, call, r)) {
                v->advice = advice;
                v->ra_window.store(0, kRelaxed);
                v->ra_misses.store(0, kRelaxed);
            }
            merge_range(a, r.start, r.end);
            a.last_hit.store(nullptr, kRelaxed);
            return;
        case Advice::WillNeed:
            for (Vma* v : vmas)
                if (v->file) read_file_pages(a, *v, part_of(v), call, false);
            return;
        case Advice::DontNeed:
            for (Vma* v : vmas) writeback(a, *v, part_of(v), call);  // nothing written is lost
            for (Vma* v : vmas) {
                const Range part = part_of(v);
                preserve_range(a, call, part);
                change_pages(a, call, part, [](Prot) { return Prot::None; });
                page_discard(part.start, part.end - part.start);
                clear_ptes(a, part);
                if (v->file) drop_cached_pages(a, *v, part);
            }
            return;
    }
}

}  // namespace usermm
