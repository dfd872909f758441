// SwapFile: the store built in (include/usermm/store.hpp). Page slots in one sparse file, a slot
// table in memory shared with forked children, and I/O that keeps swapped pages out of the kernel's
// page cache. Everything but the constructor and destructor may run in a signal handler: no
// allocation, no lock, only system calls and atomics.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include <usermm/store.hpp>

#include "arena_ops.hpp"
#include "raw_log.hpp"

namespace usermm {

namespace {

using detail::fail;

// The table is reserved whole (one bit per slot per level, two bytes of count) and paged in as
// slots are used: 2^32 slots (16 TiB of 4 KiB pages) keep the reservation near 8.5 GiB.
constexpr std::uint64_t kMaxSlots = std::uint64_t(1) << 32;
constexpr int kMaxLevels = 6;  // 64^6 > kMaxSlots
constexpr std::uint64_t kFull = ~std::uint64_t(0);
// A slot's references: the arena's, plus one per forked child that inherited it (retain).
using RefCount = std::uint16_t;
constexpr RefCount kMaxRefs = std::numeric_limits<RefCount>::max();
// Pages per vectored call: 256 KiB, the size at which the issue measured the device's O_DIRECT
// bandwidth (SwapFile's batches of 64 pages ran level with raw 256 KiB pread/pwrite here), with an
// iovec array of 1 KiB, small enough for a signal handler on usermm's alternate stack.
constexpr std::size_t kIovPages = 64;

static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free && std::atomic_ref<RefCount>::is_always_lock_free,
              "the slot table is shared between processes: its atomics must not be locks");

template <typename T>
std::atomic_ref<T> at(T& v) {
    return std::atomic_ref<T>(v);
}

}  // namespace

// The slot table: levels[0] has one bit per slot (1: in use); levels[i] one bit per word of
// levels[i-1] (1: that word is full), up to a single word. Bits past the end are set at creation,
// so they are never free. A "full" bit is a hint that is set only after the word was seen full and
// is checked again after it is set (note_full), and a release that frees a full word clears its
// parent's bit after the word's (clear_used): so a free slot is never hidden behind a full bit, and
// allocate() finds the lowest free slot by descending from the top word.
struct SwapFile::State {
    std::string path;
    int fd = -1;
    bool direct = false;
    std::size_t page = 0;
    std::uint64_t slots = 0;
    pid_t creator = 0;
    void* table = nullptr;
    std::size_t table_bytes = 0;
    std::uint64_t* in_use = nullptr;
    int depth = 0;
    std::uint64_t* levels[kMaxLevels] = {};
    std::uint64_t words[kMaxLevels] = {};
    RefCount* refs = nullptr;

    // Word `w` of level `lvl` was seen full: its bit in the level above is set, then the word is
    // read again; a release that came in meanwhile (and found the bit still clear) is seen then,
    // and the bit taken back. acq_rel orders it against clear_used's two steps.
    void note_full(int lvl, std::uint64_t w) {
        if (lvl + 1 >= depth) return;
        const std::uint64_t bit = std::uint64_t(1) << (w % 64);
        std::uint64_t& parent = levels[lvl + 1][w / 64];
        const std::uint64_t old = at(parent).fetch_or(bit, std::memory_order_acq_rel);
        if (at(levels[lvl][w]).load(std::memory_order_acquire) != kFull) {
            clear_used(lvl + 1, w / 64, bit);
            return;
        }
        if ((old | bit) == kFull && old != kFull) note_full(lvl + 1, w / 64);
    }

    void clear_used(int lvl, std::uint64_t w, std::uint64_t bit) {
        const std::uint64_t old = at(levels[lvl][w]).fetch_and(~bit, std::memory_order_acq_rel);
        if (old == kFull && lvl + 1 < depth) clear_used(lvl + 1, w / 64, std::uint64_t(1) << (w % 64));
    }

    // Claims the lowest free slots of level-0 word `w`, as many as `out` holds, with one CAS.
    std::size_t claim(std::uint64_t w, std::span<std::uint64_t> out) {
        std::uint64_t& word = levels[0][w];
        std::uint64_t v = at(word).load(std::memory_order_acquire);
        std::uint64_t mask = 0;
        do {
            mask = 0;
            std::size_t k = 0;
            for (std::uint64_t free = ~v; free != 0 && k < out.size(); ++k) {
                mask |= free & (~free + 1);
                free &= free - 1;
            }
            if (mask == 0) {
                note_full(0, w);
                return 0;
            }
        } while (!at(word).compare_exchange_weak(v, v | mask, std::memory_order_acq_rel, std::memory_order_acquire));
        std::size_t k = 0;
        for (std::uint64_t m = mask; m != 0; m &= m - 1) {
            const std::uint64_t slot = w * 64 + std::uint64_t(std::countr_zero(m));
            at(refs[slot]).store(1, std::memory_order_relaxed);
            out[k++] = slot;
        }
        at(*in_use).fetch_add(k, std::memory_order_relaxed);
        if ((v | mask) == kFull) note_full(0, w);
        return k;
    }

    std::size_t fill(int lvl, std::uint64_t w, std::span<std::uint64_t> out) {
        if (lvl == 0) return claim(w, out);
        const std::uint64_t v = at(levels[lvl][w]).load(std::memory_order_acquire);
        if (v == kFull) {
            note_full(lvl, w);  // its parent's bit was taken back by a race that has passed since
            return 0;
        }
        std::size_t got = 0;
        for (std::uint64_t free = ~v; free != 0 && got < out.size(); free &= free - 1)
            got += fill(lvl - 1, w * 64 + std::uint64_t(std::countr_zero(free)), out.subspan(got));
        return got;
    }

    // Drops one reference; false if the slot had none (nothing changed).
    bool unref(std::uint64_t slot) {
        if (slot >= slots) return false;
        RefCount c = at(refs[slot]).load(std::memory_order_relaxed);
        do {
            if (c == 0) return false;
        } while (!at(refs[slot]).compare_exchange_weak(c, RefCount(c - 1), std::memory_order_acq_rel,
                                                       std::memory_order_relaxed));
        if (c == 1) {
            clear_used(0, slot / 64, std::uint64_t(1) << (slot % 64));
            at(*in_use).fetch_sub(1, std::memory_order_relaxed);
        }
        return true;
    }

    int ref(std::uint64_t slot) {
        if (slot >= slots) return EINVAL;
        RefCount c = at(refs[slot]).load(std::memory_order_relaxed);
        do {
            if (c == 0) return EINVAL;
            if (c == kMaxRefs) return EOVERFLOW;
        } while (!at(refs[slot]).compare_exchange_weak(c, RefCount(c + 1), std::memory_order_acq_rel,
                                                       std::memory_order_relaxed));
        return 0;
    }

    // A page usermm may hand to the file: a slot in use, a page-aligned buffer (O_DIRECT needs it).
    int check(const PageIo& p) const {
        if (p.slot >= slots || p.data == nullptr || reinterpret_cast<std::uintptr_t>(p.data) % page != 0) return EINVAL;
        if (at(refs[p.slot]).load(std::memory_order_relaxed) == 0) return EINVAL;
        return 0;
    }

    // One page on its own, short transfers continued, EINTR retried.
    int page_io(bool write, PageIo& p) const {
        std::size_t done = 0;
        while (done < page) {
            char* buf = static_cast<char*>(p.data) + done;
            const off_t off = off_t(p.slot * page + done);
            const ssize_t n = write ? pwrite(fd, buf, page - done, off) : pread(fd, buf, page - done, off);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return errno;
            if (n == 0) return EIO;  // the file ends inside a slot: someone truncated it
            done += std::size_t(n);
        }
        return 0;
    }

    // Pages of a batch whose slots are consecutive: one vectored call; what it did not
    // transfer whole is done page by page, so that each page gets its own answer.
    void run_io(bool write, std::span<PageIo> run) const {
        iovec iov[kIovPages];
        for (std::size_t i = 0; i < run.size(); ++i) iov[i] = {run[i].data, page};
        const off_t off = off_t(run[0].slot * page);
        ssize_t n;
        do {
            n = write ? pwritev(fd, iov, int(run.size()), off) : preadv(fd, iov, int(run.size()), off);
        } while (n < 0 && errno == EINTR);
        const std::size_t whole = n < 0 ? 0 : std::size_t(n) / page;
        for (std::size_t i = 0; i < run.size(); ++i) run[i].error = i < whole ? 0 : page_io(write, run[i]);
    }

    void io(bool write, std::span<PageIo> pages) const {
        for (PageIo& p : pages) p.error = check(p);
        std::uint64_t lo = std::numeric_limits<std::uint64_t>::max(), hi = 0;
        for (std::size_t i = 0; i < pages.size();) {
            if (pages[i].error != 0) {
                ++i;
                continue;
            }
            std::size_t n = 1;
            while (i + n < pages.size() && n < kIovPages && pages[i + n].error == 0 &&
                   pages[i + n].slot == pages[i].slot + n)
                ++n;
            run_io(write, pages.subspan(i, n));
            lo = std::min(lo, pages[i].slot);
            hi = std::max(hi, pages[i + n - 1].slot + 1);
            i += n;
        }
        if (!direct && lo < hi) drop_cached(write, pages, lo, hi);
    }

    // Without O_DIRECT the pages went through the page cache, where they would stay and defeat the
    // arena's resident limit. Written pages are dirty and POSIX_FADV_DONTNEED skips dirty pages,
    // so they are written back first with sync_file_range, which waits for the data only (no
    // journal commit, no device flush as fdatasync would: a swap file need not survive a crash).
    // One range covers the batch: pages of other batches in it are only dropped if clean, which
    // costs them nothing. A write-back error cannot be tied to a page, so it fails every page of the
    // batch that had succeeded: they stay resident, and usermm writes them again later.
    void drop_cached(bool write, std::span<PageIo> pages, std::uint64_t lo, std::uint64_t hi) const {
        const off_t off = off_t(lo * page), len = off_t((hi - lo) * page);
        if (write) {
            int err = 0;
            while (sync_file_range(fd, off, len,
                                   SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0) {
                if (errno != EINTR) {
                    err = errno;
                    break;
                }
            }
            if (err != 0) {
                for (PageIo& p : pages)
                    if (p.error == 0) p.error = err;
                return;
            }
        }
        // Advice only: a page it leaves cached is still right, just in memory.
        posix_fadvise(fd, off, len, POSIX_FADV_DONTNEED);
    }
};

SwapFile::SwapFile(std::string path, std::uint64_t size_bytes, SwapFileOptions options)
    : state_(std::make_unique<State>()) {
    State& s = *state_;
    s.path = std::move(path);
    s.page = std::size_t(sysconf(_SC_PAGESIZE));
    if (size_bytes < s.page)
        fail(EINVAL, "usermm::SwapFile: size {} is smaller than one page ({} bytes), path {}", size_bytes, s.page, s.path);
    if (size_bytes % s.page != 0)
        fail(EINVAL, "usermm::SwapFile: size {} is not a multiple of the page size ({} bytes), path {}", size_bytes,
             s.page, s.path);
    s.slots = size_bytes / s.page;
    if (s.slots > kMaxSlots)
        fail(EFBIG, "usermm::SwapFile: size {} is {} pages, more than the slot table indexes ({}), path {}", size_bytes,
             s.slots, kMaxSlots, s.path);

    s.fd = open(s.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (s.fd < 0) fail(errno, "usermm::SwapFile: cannot create {}", s.path);
    auto undo = [&s] {
        close(s.fd);
        unlink(s.path.c_str());
        if (s.table) munmap(s.table, s.table_bytes);
    };
    if (options.direct) {
        // O_DIRECT is set after the open, so one open serves both outcomes; the kernel refuses it
        // (EINVAL) where the file system cannot do direct I/O (ramfs, ...). Where the file system
        // says its direct I/O needs more alignment than a page, it is not asked.
        struct statx sx{};
        const bool page_aligned = statx(s.fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) != 0 ||
                                  !(sx.stx_mask & STATX_DIOALIGN) ||
                                  (sx.stx_dio_offset_align <= s.page && sx.stx_dio_mem_align <= s.page);
        const int flags = fcntl(s.fd, F_GETFL);
        s.direct = page_aligned && flags >= 0 && fcntl(s.fd, F_SETFL, flags | O_DIRECT) == 0;
    }
    // Sparse: blocks come with the first write of a slot. The size is set now, so that a file
    // system that cannot hold it says so here rather than at a write.
    if (ftruncate(s.fd, off_t(size_bytes)) != 0) {
        const int err = errno;
        undo();
        fail(err, "usermm::SwapFile: cannot size {} to {} bytes", s.path, size_bytes);
    }

    std::size_t bytes = 64;  // the header: slots in use
    std::uint64_t n = s.slots;
    std::size_t level_at[kMaxLevels];
    do {
        n = (n + 63) / 64;
        s.words[s.depth] = n;
        level_at[s.depth++] = bytes;
        bytes += std::size_t(n) * sizeof(std::uint64_t);
    } while (n > 1);
    const std::size_t refs_at = bytes;
    bytes += std::size_t(s.slots) * sizeof(RefCount);
    s.table_bytes = (bytes + s.page - 1) / s.page * s.page;
    // Shared, so that a forked child and its parent see one table: each holds its own references.
    void* t = mmap(nullptr, s.table_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (t == MAP_FAILED) {
        const int err = errno;
        undo();
        fail(err, "usermm::SwapFile: cannot map a slot table of {} bytes for {} ({} pages)", s.table_bytes, s.path,
             s.slots);
    }
    s.table = t;
    char* base = static_cast<char*>(t);
    s.in_use = reinterpret_cast<std::uint64_t*>(base);
    for (int l = 0; l < s.depth; ++l) {
        s.levels[l] = reinterpret_cast<std::uint64_t*>(base + level_at[l]);
        const std::uint64_t below = l == 0 ? s.slots : s.words[l - 1];
        if (below % 64 != 0) s.levels[l][s.words[l] - 1] = kFull << (below % 64);
    }
    s.refs = reinterpret_cast<RefCount*>(base + refs_at);
    s.creator = getpid();
}

SwapFile::~SwapFile() {
    State& s = *state_;
    // A forked child holds the parent's file too: only the process that made it removes it.
    if (getpid() == s.creator) unlink(s.path.c_str());
    close(s.fd);
    munmap(s.table, s.table_bytes);
}

std::size_t SwapFile::allocate(std::span<std::uint64_t> slots) {
    State& s = *state_;
    return slots.empty() ? 0 : s.fill(s.depth - 1, 0, slots);
}

void SwapFile::release(std::span<const std::uint64_t> slots) {
    State& s = *state_;
    for (const std::uint64_t slot : slots) {
        // A slot released more often than it was referenced is usermm's bug: said, as the kernel's
        // swap_free does, and nothing changed, so that no other owner loses its slot.
        if (!s.unref(slot))
            detail::RawLine().str("usermm: release of swap slot ").dec(slot).str(" that is not in use in ").str(s.path.c_str()).emit();
    }
}

int SwapFile::retain(std::span<const std::uint64_t> slots) {
    State& s = *state_;
    for (std::size_t i = 0; i < slots.size(); ++i) {
        if (const int err = s.ref(slots[i])) {
            for (std::size_t j = 0; j < i; ++j) s.unref(slots[j]);
            return err;
        }
    }
    return 0;
}

void SwapFile::write(std::span<PageIo> pages) { state_->io(true, pages); }
void SwapFile::read(std::span<PageIo> pages) { state_->io(false, pages); }
std::uint64_t SwapFile::capacity() const { return state_->slots; }
std::string SwapFile::describe() const { return fmt::format("swap file {}", state_->path); }
std::uint64_t SwapFile::slots_in_use() const { return at(*state_->in_use).load(std::memory_order_relaxed); }
const std::string& SwapFile::path() const { return state_->path; }
bool SwapFile::direct() const { return state_->direct; }

}  // namespace usermm
