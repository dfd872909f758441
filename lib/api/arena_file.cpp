// File VMAs in the API world: map_file, write-back (sync, unmap, destruction), advice, and the
// pages whose write-back failed.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "account.hpp"
#include "dirty_async.hpp"
#include "file_vma.hpp"
#include "filemap.hpp"
#include "find_vma.hpp"
#include "probes.hpp"
#include "reclaim.hpp"
#include "stack.hpp"
#include "write_tracking.hpp"

namespace usermm {

using namespace detail;

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

std::string fd_path(int fd) {
    char link[64];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    char target[kPathMax] = {};
    const ssize_t n = readlink(link, target, sizeof target - 1);
    return n > 0 ? std::string(target, std::size_t(n)) : std::string(link);
}

std::uint64_t file_size(const MappedFile& f, const char* call) {
    std::uint64_t size = 0;
    if (const int err = page_file_size(f.fd, &size)) fail(err, "{}: fstat of '{}' failed", call, f.path);
    return size;
}

// usermm's own descriptor of the file open as `fd`, for the VMA's mapping, fstat and the writes of
// saved pages: a new open file description (through /proc/self/fd), so that the caller's O_APPEND
// or O_DIRECT never apply to usermm's writes, and so that the kernel never merges the mappings of
// two VMAs (it merges only mappings of one open file). Where the open is refused (the process has
// dropped the permissions the caller's open was granted), a duplicate of `fd` serves instead, as
// mmap(2) accepts the descriptor; unless the duplicate's flags would change usermm's writes.
int own_descriptor(int fd, int flags, bool writes, const std::string& path, const char* call) {
    char link[64];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const int own = open(link, (flags & O_ACCMODE) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (own >= 0) return own;
    const int why = errno;
    if (writes && (flags & (O_APPEND | O_DIRECT)))
        fail(why, "{}: fd {} ('{}') is open with O_APPEND or O_DIRECT, and cannot be opened again without", call, fd,
             path);
    const int dup = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup < 0) fail(errno, "{}: cannot duplicate fd {} ('{}')", call, fd, path);
    return dup;
}

// The PTE bits of pages [first, last) that have `bit`, as runs.
template <typename Fn>
void for_each_marked(const ArenaCore& a, std::size_t first, std::size_t last, pte_t bit, Fn fn) {
    for (const PageSpan& span : pte_spans(a, first, last))
        for_each_run(span.first, span.last, [&](std::size_t i) { return (a.pte[i].load(kRelaxed) & bit) ? 1 : kNoRun; },
                     [&](std::size_t i, std::size_t j, int) { fn(i, j); });
}

// Writes the saved copy of file page `page` into the page cache (a page past the end of the file
// has nothing to keep), as restore_saved does in the fault path. Returns 0 or the errno.
int put_back(const MappedFile& f, const SavedPage& s, std::uint64_t size) {
    const std::uint64_t at = s.page << g_page_shift;
    if (at >= size) return 0;
    const std::size_t len = std::size_t(std::min<std::uint64_t>(g_page_size, size - at));
    if (page_write_through_mapping(f.fd, at, s.content.get(), len) == 0) return 0;
    return page_write_file(f.fd, s.content.get(), len, at);
}

void erase_saved(MappedFile& f, std::uint64_t first, std::uint64_t last) {
    std::erase_if(f.saved, [&](const SavedPage& s) { return s.page >= first && s.page < last; });
}

}  // namespace

// --- shared with arena.cpp, arena_ops.cpp and snapshot.cpp ---------------------------------------

void detail::file_put(MappedFile* f) {
    if (!f || f->refs.fetch_sub(1) != 1) return;
    close(f->fd);
    delete f;
}

void detail::vma_free(Vma* v) {
    file_put(v->file);
    delete v->stack;  // a stack VMA never splits: the core is its own
    delete v;
}

void detail::vma_copy_attrs(Vma& to, const Vma& from) {
    static_cast<VmaAttrs&>(to) = from;
    to.pgoff = from.pgoff;
    to.ra_next.store(from.ra_next.load(kRelaxed), kRelaxed);
    to.ra_window.store(from.ra_window.load(kRelaxed), kRelaxed);
    to.ra_misses.store(from.ra_misses.load(kRelaxed), kRelaxed);
    if (to.file) to.file->refs.fetch_add(1);
}

void detail::refuse_file_vmas(ArenaCore& a, const char* call, Range r) {
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it)
        if (it->file)
            fail(ENOTSUP, "{}: range [{:#x}, {:#x}) holds file VMA '{}' at {:#x}; only anonymous memory can be "
                 "snapshotted or dirty-tracked", call, r.start, r.end, it->name, it->start);
}

void detail::put_back_saved(ArenaCore& a, Vma& v, Range part, const char* call) {
    if (!v.file || v.file->saved.empty()) return;
    MappedFile& f = *v.file;
    const std::uint64_t size = file_size(f, call);
    for_each_marked(a, a.page_index(part.start), a.page_index(part.end), kPteSaved, [&](std::size_t i, std::size_t j) {
        for (std::size_t k = i; k < j; ++k) {
            if (const SavedPage* s = f.find_saved(v.file_page(a.page_addr(k))))
                if (const int err = put_back(f, *s, size))
                    fail(err, "{}: cannot write the saved copy of page {:#x} back into '{}'", call, a.page_addr(k),
                         f.path);
            a.pte[k].fetch_and(pte_t(~kPteSaved), kRelaxed);
        }
    });
}

void detail::writeback(ArenaCore& a, Vma& v, Range part, const char* call, FileSync& out) {
    if (!v.file || v.share != Share::Shared) return;
    MappedFile& f = *v.file;
    const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
    if (!out.file) {
        out.file = &f;
        f.refs.fetch_add(1);
        out.failures = f.failures.load();
        out.range = part;
    }
    // Copies of pages whose last write-back failed, which no access has put back yet: into the page
    // cache now, where this write-back finds them.
    put_back_saved(a, v, part, call);
    // Write access goes, so that the next write after the write-back is seen: one mprotect per run
    // of mapped pages that holds a writable one (readable neighbours lose nothing). That includes
    // pages prefault() made writable without a write: the kernel writes them back only if written.
    auto mapped_as = [&a](std::size_t i) {
        const pte_t p = a.pte[i].load(kRelaxed);
        return pte_prot(p) ? int(pte_prot(p) & ~to_pte(Prot::Write)) : kNoRun;
    };
    for (const PageSpan& span : pte_spans(a, first, last))
        for_each_run(span.first, span.last, mapped_as, [&](std::size_t i, std::size_t j, int prot) {
            while (i < j && !(a.pte[i].load(kRelaxed) & to_pte(Prot::Write))) ++i;
            while (j > i && !(a.pte[j - 1].load(kRelaxed) & to_pte(Prot::Write))) --j;
            if (i == j) return;
            // A writable page that is not dirty may have been written all the same (prefault's
            // write access): if the write-back fails, it is kept with the dirty ones.
            for (std::size_t k = i; k < j; ++k) {
                const pte_t p = a.pte[k].load(kRelaxed);
                if ((p & to_pte(Prot::Write)) && !(p & kPteDirtyFile)) out.pages.push_back(k);
            }
            if (const int err = reprotect_run(a, i, j, Prot(prot)))
                fail(err, "{}: mprotect of [{:#x}, {:#x}) to {} failed", call, a.page_addr(i), a.page_addr(j),
                     to_string(Prot(prot)));
        });
    // The dirty pages are clean from here on; the fdatasync that makes them so comes in finish().
    std::uint64_t pages = 0, bytes = 0;
    const std::uint64_t size = file_size(f, call);
    for_each_marked(a, first, last, kPteDirtyFile, [&](std::size_t i, std::size_t j) {
        for (std::size_t k = i; k < j; ++k) {
            a.pte[k].fetch_and(pte_t(~kPteDirtyFile), kRelaxed);
            out.pages.push_back(k);
            const std::uint64_t at = v.file_page(a.page_addr(k)) << g_page_shift;
            // Past the end of the file (it was truncated) there is nothing to write, as in the kernel.
            if (at < size) bytes += std::min<std::uint64_t>(g_page_size, size - at);
        }
        pages += j - i;
    });
    account_writeback(a, v, pages, bytes, false);
}

int detail::FileSync::finish() {
    if (!file) return 0;
    if (const int err = page_sync_file(file->fd)) {
        file->failures.fetch_add(1);
        return err;
    }
    return file->failures.load() != failures ? EIO : 0;
}

void detail::keep_failed(ArenaCore& a, const FileSync& s) {
    account_writeback_error(a);
    MappedFile& f = *s.file;
    // The pages recorded clean are dirty again; with them, every page of the file's VMAs that is
    // dirty or writable (prefault's write access: written or not, nobody knows) may have been in
    // the failed fdatasync, which wrote the whole file.
    for (const std::size_t k : s.pages) {
        const std::uintptr_t addr = a.page_addr(k);
        const Vma* v = find_vma(a, addr);
        if (v && v->start <= addr && v->file == &f) a.pte[k].fetch_or(kPteDirtyFile, kRelaxed);
    }
    std::uint64_t size = 0;
    if (page_file_size(f.fd, &size) != 0) return;
    for (Vma& v : a.tree) {
        if (v.file != &f) continue;
        auto at_risk = [&a](std::size_t i) {
            const pte_t p = a.pte[i].load(kRelaxed);
            return (p & kPteDirtyFile) || (p & to_pte(Prot::Write)) ? 1 : kNoRun;
        };
        for (const PageSpan& span : pte_spans(a, a.page_index(v.start), a.page_index(v.end)))
            for_each_run(span.first, span.last, at_risk, [&](std::size_t i, std::size_t j, int) {
                // PROT_NONE first: then the copy is the page's last content, and nothing can write
                // it before the copy is back in the page cache. Where the kernel refuses (the map
                // limit), the pages stay as they are, dirty for the next write-back.
                if (reprotect_run(a, i, j, Prot::None) != 0) return;
                for (std::size_t k = i; k < j; ++k) {
                    const std::uint64_t page = v.file_page(a.page_addr(k));
                    SavedPage copy{page, std::make_unique<std::byte[]>(g_page_size)};
                    std::size_t got = 0;
                    a.pte[k].fetch_or(kPteDirtyFile, kRelaxed);
                    // Past the end of the file, or unreadable, the page has nothing to keep.
                    if (page_read_file(f.fd, copy.content.get(), g_page_size, page << g_page_shift, &got) != 0 ||
                        got == 0)
                        continue;
                    erase_saved(f, page, page + 1);
                    const auto pos = std::lower_bound(f.saved.begin(), f.saved.end(), page,
                                                      [](const SavedPage& x, std::uint64_t p) { return x.page < p; });
                    f.saved.insert(pos, std::move(copy));
                    a.pte[k].fetch_or(kPteSaved, kRelaxed);
                }
            });
    }
    a.last_hit.store(nullptr, kRelaxed);
}

void detail::writeback_now(ArenaCore& a, Vma& v, Range part, const char* call) {
    FileSync s;
    writeback(a, v, part, call, s);
    if (const int err = s.finish()) {
        keep_failed(a, s);
        fail(err, "{}: write-back of '{}' failed for [{:#x}, {:#x}); usermm keeps the pages for the next write-back",
             call, v.file->path, part.start, part.end);
    }
}

void detail::forget_saved_after_fork(ArenaCore& a) {
    for (Vma& v : a.tree) {
        if (!v.file || v.file->saved.empty()) continue;
        v.file->saved.clear();
        for_each_marked(a, a.page_index(v.start), a.page_index(v.end), kPteSaved, [&a](std::size_t i, std::size_t j) {
            for (std::size_t k = i; k < j; ++k) a.pte[k].fetch_and(pte_t(~kPteSaved), kRelaxed);
        });
    }
}

void detail::release_file_pages(ArenaCore& a, Vma& v, Range part, const char* call) {
    if (!v.file) return;
    put_back_saved(a, v, part, call);
    erase_saved(*v.file, v.file_page(part.start), v.file_page(part.end));
    std::uint64_t wasted = 0;
    for_each_marked(a, a.page_index(part.start), a.page_index(part.end), kPteReadahead,
                    [&](std::size_t i, std::size_t j) { wasted += j - i; });
    account_readahead_wasted(&a, &v, wasted);
}

int detail::unmap_file_part(ArenaCore& a, Range part, bool* replaced) {
    const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
    const long before = long(mappings_around(a, first, last).size());
    const int err = page_reserve_fixed(part.start, part.end - part.start, write_tracker().registers, replaced);
    if (!*replaced) return err;
    for (std::size_t i = first; i < last; ++i) a.pte[i].fetch_and(pte_t(~(kPteFile | kPteEdge)), kRelaxed);
    settle_edges(a, first, last, before);
    return err;
}

namespace {

// Calls fn(arena page, file offset) for each page of [first, last) the page cache lacks (mincore),
// and returns how many and their bytes (the part of a last page past `size` excluded); false if
// the kernel would not say.
template <typename Fn>
bool for_each_uncached(const ArenaCore& a, const Vma& v, std::size_t first, std::size_t last, std::uint64_t size,
                       std::uint64_t& pages, std::uint64_t& bytes, Fn fn) {
    std::vector<unsigned char> cached(kFileProbePages);
    for (std::size_t i = first; i < last; i += kFileProbePages) {
        const std::size_t n = std::min(kFileProbePages, last - i);
        if (filemap_probe(a.page_addr(i), n, cached.data()) != 0) return false;
        for (std::size_t k = 0; k < n; ++k) {
            if (cached[k] & 1) continue;
            const std::uint64_t at = v.file_page(a.page_addr(i + k)) << g_page_shift;
            ++pages;
            bytes += at < size ? std::min<std::uint64_t>(g_page_size, size - at) : 0;
            fn(i + k);
        }
    }
    return true;
}

}  // namespace

void detail::readahead_file(ArenaCore& a, Vma& v, Range part) {
    std::uint64_t size = 0;
    if (page_file_size(v.file->fd, &size) != 0) return;  // advice: nothing to read
    const std::uint64_t eof = (size + g_page_size - 1) >> g_page_shift;
    const std::size_t first = a.page_index(part.start);
    const std::size_t last = first + std::size_t(std::min<std::uint64_t>(
                                         a.page_index(part.end) - first,
                                         eof > v.file_page(part.start) ? eof - v.file_page(part.start) : 0));
    std::uint64_t pages = 0, bytes = 0;
    for_each_uncached(a, v, first, last, size, pages, bytes, [&a](std::size_t i) {
        const pte_t p = a.pte[i].load(kRelaxed);
        if (pte_prot(p) == 0 && !(p & kPteSaved)) a.pte[i].store(pte_t(p | kPteReadahead), kRelaxed);
    });
    if (last > first) filemap_readahead(a.page_addr(first), (last - first) << g_page_shift);
    account_file_read(a, v, pages, bytes);
}

void detail::count_prefault_reads(ArenaCore& a, Vma& v, Range part, const char* call) {
    MappedFile& f = *v.file;
    const std::uint64_t size = file_size(f, call);
    const std::uint64_t eof = (size + g_page_size - 1) >> g_page_shift;
    if (v.file_page(part.end) > eof)
        fail(EFAULT, "{}: addr {:#x} is past the end of '{}' (size {:#x})", call,
             v.start + ((std::max(eof, v.file_page(part.start)) - v.pgoff) << g_page_shift), f.path, size);
    std::uint64_t pages = 0, bytes = 0;
    for_each_uncached(a, v, a.page_index(part.start), a.page_index(part.end), size, pages, bytes, [](std::size_t) {});
    account_file_read(a, v, pages, bytes);
}

void detail::advise_file(ArenaCore& a, Vma& v, Range part, Advice advice, const char* call) {
    const int kernel = advice == Advice::Random ? MADV_RANDOM : advice == Advice::Sequential ? MADV_SEQUENTIAL : MADV_NORMAL;
    const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
    const long before = long(mappings_around(a, first, last).size());
    if (const int err = page_advise(part.start, part.end - part.start, kernel)) {
        settle_edges(a, first, last, before, Across::Apart, Across::Apart);
        fail(err, "{}: madvise of [{:#x}, {:#x}) failed", call, part.start, part.end);
    }
    // Across each end: another mapping, or this file's mapping with the neighbour VMA's advice.
    auto across = [&](std::uintptr_t addr) {
        const Vma* n = addr >= a.base && addr < a.end ? find_vma(a, addr) : nullptr;
        if (!n || n->start > addr || n->file != v.file) return Across::Apart;
        return n->advice == advice ? Across::Same : Across::Apart;
    };
    settle_edges(a, first, last, before, across(part.start - g_page_size), across(part.end));
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
    // O_NONBLOCK: a FIFO or a device must not block the open; map_file_as refuses them.
    const int fd = open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
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
    const std::uintptr_t want = addr_of(options.address);
    prot = check_prot(call, prot, want);
    const std::size_t len = round_up_length(call, length, want);
    if (offset & (g_page_size - 1)) fail(EINVAL, "{}: offset {:#x} of '{}' is not page-aligned", call, offset, path);
    if (share != Share::Private && share != Share::Shared)
        fail(EINVAL, "{}: share {} is neither Private nor Shared (offset {:#x})", call, unsigned(share), offset);
    if (len > std::uint64_t(INT64_MAX) || offset > std::uint64_t(INT64_MAX) - len)
        fail(EOVERFLOW, "{}: offset {:#x} + length {:#x} is beyond the largest file offset", call, offset, length);
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

    auto file = std::make_unique<MappedFile>();
    file->fd = own_descriptor(fd, flags, share == Share::Shared && may_write, path, call);
    file->dev = st.st_dev;
    file->ino = st.st_ino;
    file->writable = may_write;
    file->refs.store(1);
    std::snprintf(file->path, sizeof file->path, "%s", path.c_str());
    struct FileGuard {
        std::unique_ptr<MappedFile>& f;
        ~FileGuard() {
            if (f) close(f->fd);
        }
    } file_guard{file};
    auto vma = std::make_unique<Vma>();
    vma->pgoff = offset >> g_page_shift;
    vma->share = share;
    vma->may_write = share == Share::Private || may_write;
    vma->prot = prot;
    vma->fault_around_pages = std::uint32_t(options.fault_around_pages);
    vma->readahead_max = std::uint32_t(options.readahead_pages);
    vma->ra_next.store(vma->pgoff, kRelaxed);
    set_name(*vma, options.name.empty() ? std::string_view(file->path) : options.name);

    // A private mapping is made, and written once through /proc/self/mem, before the lock (the
    // write reads the first page): see page_prepare_file_mapping.
    if (share == Share::Private) require_self_mem(call);
    void* prepared = nullptr;
    if (const int err = page_prepare_file_mapping(file->fd, offset, len, share == Share::Shared, &prepared))
        fail(err, "{}: cannot map '{}' (fd {}, offset {:#x})", call, path, fd, offset);
    struct Prepared {
        void*& p;
        std::size_t len;
        ~Prepared() {
            if (p) page_release(addr_of(p), len);
        }
    } prepared_guard{prepared, len};

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    const std::uintptr_t start = place_vma(a, call, want, len, length);
    const std::size_t first = a.page_index(start), last = a.page_index(start + len);
    for (std::size_t k = 0; k < a.snapshot_count; ++k)
        if (!a.snapshots[k]->anonymous_only && a.snapshots[k]->first < last && a.snapshots[k]->last > first)
            fail(EBUSY, "{}: range [{:#x}, {:#x}) is inside live snapshot {}; snapshots cover anonymous memory only",
                 call, start, start + len, a.snapshots[k]->sequence);
    preserve_range(a, call, {start, start + len});  // whole-arena snapshots read zeros there
    async_leave(a, call, {start, start + len});      // the file's mapping has no userfaultfd context
    const long before = long(mappings_around(a, first, last).size());
    void* moving = std::exchange(prepared, nullptr);  // page_place_file_mapping takes it, or unmaps it
    if (const int err = page_place_file_mapping(start, len, file->fd, offset, share == Share::Shared, moving)) {
        // A refused mmap leaves the reservation as it was (Linux 6.12 and later); else what the
        // kernel left there becomes reservation again, a piece of its own.
        const std::vector<KernelMapping> there = kernel_mappings(start, start + len, call);
        const bool intact = !there.empty() && there.front().from == start && there.back().to == start + len &&
                            std::none_of(there.begin(), there.end(), [](const KernelMapping& m) { return m.file(); });
        bool replaced = false;
        const int again = intact ? 0 : page_reserve_fixed(start, len, write_tracker().registers, &replaced);
        settle_edges(a, first, last, before);
        if (again) fail(again, "{}: [{:#x}, {:#x}) is lost to the arena after a failed mmap", call, start, start + len);
        fail(err, "{}: cannot map '{}' (fd {}, offset {:#x}) at {:#x}", call, path, fd, offset, start);
    }
    for (std::size_t i = first; i < last; ++i) a.pte[i].fetch_or(kPteFile, kRelaxed);
    settle_edges(a, first, last, before);
    vma->file = file.release();
    insert_vma(a, vma.release(), start, len);
    return ptr_of(start);
}

void Arena::sync(void* addr, std::size_t length) {
    static constexpr const char* call = "usermm::Arena::sync";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    USERMM_PROBE(sync_begin, a.base, r.start, r.end - r.start);
    AtScopeExit probe_end{[&a, r, t0 = now_ns()] { USERMM_PROBE(sync_end, a.base, r.start, r.end - r.start, now_ns() - t0); }};
    std::vector<FileSync> pending;
    // Keeps the pages of the write-backs whose fdatasync failed, under the write lock.
    auto keep = [&a](const std::vector<const FileSync*>& failed) {
        ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
        for (const FileSync* s : failed) keep_failed(a, *s);
    };
    // The write-protection under the arena's lock; the write-back itself without it, so that faults
    // go on meanwhile (msync, likewise, does not hold mmap_lock across its fsync).
    {
        ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
        const std::vector<Vma*> vmas = covering_vmas(a, call, r);
        pending.reserve(vmas.size());
        try {
            for (Vma* v : vmas) {
                pending.emplace_back();
                writeback(a, *v, {std::max(v->start, r.start), std::min(v->end, r.end)}, call, pending.back());
            }
        } catch (...) {
            // The pages recorded clean so far are not written yet: dirty again, and kept.
            for (const FileSync& s : pending)
                if (s.file) keep_failed(a, s);
            throw;
        }
    }
    int first_err = 0;
    std::string path;
    Range failed{};
    std::vector<const FileSync*> to_keep;
    for (FileSync& s : pending) {
        const int err = s.finish();
        if (!err) continue;
        to_keep.push_back(&s);
        if (!first_err) {
            first_err = err;
            path = s.file->path;
            failed = s.range;
        }
    }
    if (!to_keep.empty()) keep(to_keep);
    if (first_err)
        fail(first_err, "{}: write-back of '{}' failed for [{:#x}, {:#x}); usermm keeps the pages for the next "
             "write-back", call, path, failed.start, failed.end);
    // A successful write-back of the range ends the copies kept from failed ones (the pages still
    // marked saved were not part of it: they were kept again meanwhile).
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it) {
        Vma& v = *it;
        if (!v.file || v.file->saved.empty()) continue;
        const Range part{std::max(v.start, r.start), std::min(v.end, r.end)};
        std::erase_if(v.file->saved, [&](const SavedPage& s) {
            if (s.page < v.file_page(part.start) || s.page >= v.file_page(part.end)) return false;
            const std::uintptr_t at = part.start + std::uintptr_t((s.page - v.file_page(part.start)) << g_page_shift);
            return !(a.pte_of(at).load(kRelaxed) & kPteSaved);
        });
    }
}

void Arena::advise(void* addr, std::size_t length, Advice advice) {
    static constexpr const char* call = "usermm::Arena::advise";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    if (unsigned(advice) > unsigned(Advice::Cold))
        fail(EINVAL, "{}: advice {} is unknown (addr {:#x})", call, unsigned(advice), r.start);
    if ((advice == Advice::PageOut || advice == Advice::Cold) && !a.reclaimer)
        fail(EINVAL, "{}: PageOut and Cold need an arena with a store (addr {:#x})", call, r.start);
    SplitSpares spares;
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    const std::vector<Vma*> vmas = covering_vmas(a, call, r);
    refuse_stack_vmas(vmas, call);
    auto part_of = [&r](const Vma* v) { return Range{std::max(v->start, r.start), std::min(v->end, r.end)}; };
    switch (advice) {
        case Advice::Normal:
        case Advice::Random:
        case Advice::Sequential:
            // A property of the VMA, as in the kernel: the range becomes VMAs of its own.
            change_vmas(a, call, r, spares, [&](Vma& v) {
                if (v.file && v.advice != advice) advise_file(a, v, part_of(&v), advice, call);
                v.advice = advice;
                v.ra_window.store(0, kRelaxed);
                v.ra_misses.store(0, kRelaxed);
            });
            return;
        case Advice::WillNeed:
            for (Vma* v : vmas)
                if (v->file) readahead_file(a, *v, part_of(v));
            return;
        case Advice::DontNeed:
            for (Vma* v : vmas) writeback_now(a, *v, part_of(v), call);  // nothing written is lost
            for (Vma* v : vmas) {
                release_file_pages(a, *v, part_of(v), call);
                discard_range(a, call, part_of(v));
            }
            return;
        case Advice::PageOut:  // file VMAs: their pages are the kernel's page cache, which reclaims them
            for (Vma* v : vmas)
                if (v->kind() == VmaKind::Anonymous) a.reclaimer->page_out(call, *v, part_of(v));
            return;
        case Advice::Cold:
            for (Vma* v : vmas)
                if (v->kind() == VmaKind::Anonymous) a.reclaimer->cold(part_of(v));
            return;
    }
}

}  // namespace usermm
