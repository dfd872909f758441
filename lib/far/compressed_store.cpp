// CompressedStore (include/usermm/far.hpp): the kernel's zswap in user space. A page written to the
// tier becomes a tag (same-filled: every word equal, zeros included), compressed bytes in the pool,
// or, when it does not compress below max_compressed, a page of the store behind. The pool is
// first in, first out: when a write finds it over its budget, its oldest pages are written back to
// the store behind in one batch, as zswap's shrinker does.
//
// One mutex guards the slot table and the pool; nobody compresses, decompresses or calls the store
// behind while holding it. The tier refuses retain(), so a forked child's arena never calls it, and
// a mutex held at fork() is never needed in the child.
#include <lz4.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "far_common.hpp"

namespace usermm {

namespace {

using far::kPageBytes;

// Empty: handed out, not written yet. Pool: compressed bytes, or without bytes a same-filled page's
// word (a tag). Backing: in the store behind.
enum class Kind : std::uint8_t { Free, Empty, Pool, Backing };

struct Entry {
    Kind kind = Kind::Free;
    std::uint32_t size = 0;     // Pool: compressed bytes
    std::uint64_t value = 0;    // a tag's word; Backing: the slot of the store behind
    std::uint64_t epoch = 0;    // changes at each write and release: a FIFO place or a writeback of an older one is stale
    std::unique_ptr<char[]> bytes;
};

// A page whose 8-byte words are all equal: its word.
bool same_filled(const void* page, std::uint64_t* word) {
    const auto* w = static_cast<const std::uint64_t*>(page);
    for (std::size_t i = 1; i < kPageBytes / 8; ++i)
        if (w[i] != w[0]) return false;
    *word = w[0];
    return true;
}

void fill_word(void* page, std::uint64_t word) {
    auto* w = static_cast<std::uint64_t*>(page);
    std::fill(w, w + kPageBytes / 8, word);
}

// The codec's contexts, one per thread: zstd's cost a few hundred KiB and a malloc each.
struct ZstdContexts {
    ZSTD_CCtx* c = ZSTD_createCCtx();
    ZSTD_DCtx* d = ZSTD_createDCtx();
    ~ZstdContexts() {
        ZSTD_freeCCtx(c);
        ZSTD_freeDCtx(d);
    }
};
ZstdContexts& zstd() {
    thread_local ZstdContexts contexts;
    return contexts;
}

}  // namespace

struct CompressedStore::State {
    static constexpr const char* kCall = "usermm::CompressedStore";
    Store& backing;
    CompressedOptions options;
    std::size_t bound;  // the most bytes a page compresses to

    mutable std::mutex lock;
    std::vector<Entry> entries;
    std::vector<std::uint64_t> free;
    std::deque<std::pair<std::uint64_t, std::uint64_t>> fifo;  // (slot, epoch) of pool pages, oldest first
    std::uint64_t in_use = 0;
    CompressedStats stats;
    std::uint64_t pool_compressed_pages = 0;  // pool pages with bytes (not tags)

    State(Store& b, CompressedOptions o) : backing(b), options(o) {
        bound = options.codec == Codec::Lz4 ? std::size_t(LZ4_compressBound(int(kPageBytes))) : ZSTD_compressBound(kPageBytes);
    }

    // Compressed into `out` (bound bytes): the size, or 0 if the codec failed.
    std::size_t compress(const void* page, char* out) const {
        if (options.codec == Codec::Lz4) {
            const int n = LZ4_compress_fast(static_cast<const char*>(page), out, int(kPageBytes), int(bound),
                                            options.level > 0 ? options.level : 1);
            return n > 0 ? std::size_t(n) : 0;
        }
        const std::size_t n = ZSTD_compressCCtx(zstd().c, out, bound, page, kPageBytes,
                                                options.level ? options.level : ZSTD_CLEVEL_DEFAULT);
        return ZSTD_isError(n) ? 0 : n;
    }

    // 0, or EIO if the bytes do not make a page.
    int decompress(const char* in, std::size_t n, void* page) const {
        if (options.codec == Codec::Lz4)
            return LZ4_decompress_safe(in, static_cast<char*>(page), int(n), int(kPageBytes)) == int(kPageBytes) ? 0 : EIO;
        const std::size_t got = ZSTD_decompressDCtx(zstd().d, page, kPageBytes, in, n);
        return !ZSTD_isError(got) && got == kPageBytes ? 0 : EIO;
    }

    // Under the lock: the pool page of `slot` leaves the pool (released, or written back).
    void drop_pool_bytes(Entry& e) {
        if (e.kind != Kind::Pool) return;
        if (e.bytes) {
            stats.compressed_bytes -= e.size;
            --pool_compressed_pages;
        } else {
            --stats.same_filled;
        }
        --stats.stored_pages;
        e.bytes.reset();
        e.size = 0;
    }

    // Pages written to the store behind, one batch: each page's error; the slots in `slots`.
    void write_behind(std::vector<PageIo>& io, std::vector<std::uint64_t>& slots) {
        slots.assign(io.size(), 0);
        const std::size_t got = backing.allocate(slots);
        for (std::size_t i = 0; i < io.size(); ++i) {
            io[i].slot = slots[i];
            io[i].error = i < got ? 0 : ENOSPC;
        }
        if (got) backing.write({io.data(), got});
        std::vector<std::uint64_t> failed;
        for (std::size_t i = 0; i < got; ++i)
            if (io[i].error) failed.push_back(slots[i]);
        if (!failed.empty()) backing.release(failed);
    }

    // zswap's writeback: the oldest pool pages, at least `need` compressed bytes of them, go to the
    // store behind in one batch. Without the lock; returns the bytes freed.
    std::size_t write_back(std::size_t need) {
        struct Victim {
            std::uint64_t slot, epoch;
        };
        std::vector<Victim> victims;
        std::vector<std::unique_ptr<char[]>> copies;
        std::vector<std::uint32_t> sizes;
        {
            std::lock_guard guard(lock);
            std::size_t taken = 0;
            while (taken < need && !fifo.empty()) {
                const auto [slot, epoch] = fifo.front();
                fifo.pop_front();
                Entry& e = entries[slot];
                if (e.kind != Kind::Pool || e.epoch != epoch || !e.bytes) continue;  // released, or a tag
                victims.push_back({slot, epoch});
                auto copy = std::make_unique<char[]>(e.size);
                std::memcpy(copy.get(), e.bytes.get(), e.size);
                copies.push_back(std::move(copy));
                sizes.push_back(e.size);
                taken += e.size;
            }
        }
        if (victims.empty()) return 0;
        void* mem = std::aligned_alloc(kPageBytes, victims.size() * kPageBytes);
        if (!mem) return 0;
        std::unique_ptr<void, decltype(&std::free)> pages(mem, &std::free);
        std::vector<PageIo> io(victims.size());
        for (std::size_t i = 0; i < victims.size(); ++i) {
            io[i].data = static_cast<char*>(mem) + i * kPageBytes;
            if (decompress(copies[i].get(), sizes[i], io[i].data)) io[i].error = EIO;
        }
        std::vector<std::uint64_t> slots;
        write_behind(io, slots);
        std::vector<std::uint64_t> orphans;  // written back for a page released meanwhile
        std::size_t freed = 0;
        std::unique_lock guard(lock);
        for (std::size_t i = 0; i < victims.size(); ++i) {
            Entry& e = entries[victims[i].slot];
            const bool same = e.kind == Kind::Pool && e.epoch == victims[i].epoch;
            if (io[i].error) {
                if (same) fifo.push_back({victims[i].slot, victims[i].epoch});  // still in the pool, tried later
                continue;
            }
            if (!same) {
                orphans.push_back(slots[i]);
                continue;
            }
            freed += e.size;
            drop_pool_bytes(e);
            e.kind = Kind::Backing;
            e.value = slots[i];
            ++stats.written_back;
        }
        guard.unlock();
        if (!orphans.empty()) backing.release(orphans);
        return freed;
    }
};

CompressedStore::CompressedStore(Store& backing, CompressedOptions options) {
    if (unsigned(options.codec) > unsigned(Codec::Zstd))
        far::fail(EINVAL, "{}: codec {} is unknown", State::kCall, unsigned(options.codec));
    if (options.max_compressed == 0 || options.max_compressed > kPageBytes)
        far::fail(EINVAL, "{}: max_compressed {} is not in 1..{}", State::kCall, options.max_compressed, kPageBytes);
    if (options.budget < kPageBytes)
        far::fail(EINVAL, "{}: budget {} is less than a page", State::kCall, options.budget);
    state_ = std::make_unique<State>(backing, options);
}

CompressedStore::~CompressedStore() {
    std::vector<std::uint64_t> behind;
    for (const Entry& e : state_->entries)
        if (e.kind == Kind::Backing) behind.push_back(e.value);
    if (!behind.empty()) state_->backing.release(behind);
}

std::size_t CompressedStore::allocate(std::span<std::uint64_t> slots) {
    State& st = *state_;
    std::lock_guard guard(st.lock);
    const std::uint64_t cap = capacity();
    std::size_t n = 0;
    try {
        for (; n < slots.size() && st.in_use < cap; ++n, ++st.in_use) {
            if (!st.free.empty()) {
                slots[n] = st.free.back();
                st.free.pop_back();
            } else {
                slots[n] = st.entries.size();
                st.entries.emplace_back();
            }
            st.entries[slots[n]].kind = Kind::Empty;
            st.entries[slots[n]].value = 0;
        }
    } catch (const std::bad_alloc&) {  // the table cannot grow: fewer slots
    }
    return n;
}

void CompressedStore::release(std::span<const std::uint64_t> slots) {
    State& st = *state_;
    std::vector<std::uint64_t> behind;
    {
        std::lock_guard guard(st.lock);
        for (const std::uint64_t slot : slots) {
            if (slot >= st.entries.size() || st.entries[slot].kind == Kind::Free) continue;  // not ours: nothing changes
            Entry& e = st.entries[slot];
            if (e.kind == Kind::Backing) behind.push_back(e.value);
            st.drop_pool_bytes(e);
            e.kind = Kind::Free;
            ++e.epoch;
            try {
                st.free.push_back(slot);
            } catch (const std::bad_alloc&) {  // the slot stays unused: lost to the tier, not to the program
            }
            --st.in_use;
        }
    }
    if (!behind.empty()) st.backing.release(behind);
}

int CompressedStore::retain(std::span<const std::uint64_t>) { return ENOTSUP; }

void CompressedStore::write(std::span<PageIo> pages) {
    State& st = *state_;
    try {
        struct Packed {
            std::size_t page;
            std::uint64_t word = 0;  // a tag's
            std::unique_ptr<char[]> bytes;
            std::size_t size = 0;
        };
        std::vector<Packed> pool;
        std::vector<std::size_t> behind;  // pages for the store behind
        std::vector<char> out(st.bound);
        std::vector<std::uint64_t> replaced;  // slots behind of pages this batch rewrote
        std::size_t need = 0;
        for (std::size_t i = 0; i < pages.size(); ++i) {
            pages[i].error = 0;
            Packed p{i, 0, nullptr, 0};
            if (!same_filled(pages[i].data, &p.word)) {
                const std::size_t n = st.compress(pages[i].data, out.data());
                if (n == 0 || n > st.options.max_compressed) {
                    behind.push_back(i);
                    continue;
                }
                p.bytes = std::make_unique<char[]>(n);
                std::memcpy(p.bytes.get(), out.data(), n);
                p.size = n;
                need += n;
            }
            pool.push_back(std::move(p));
        }
        // Room for this batch's compressed bytes: the oldest pages go behind first.
        {
            std::unique_lock guard(st.lock);
            const std::uint64_t used = st.stats.compressed_bytes;
            guard.unlock();
            if (used + need > st.options.budget) st.write_back(used + need - st.options.budget);
        }
        {
            std::lock_guard guard(st.lock);
            for (Packed& p : pool) {
                const std::uint64_t slot = pages[p.page].slot;
                if (slot >= st.entries.size() || st.entries[slot].kind == Kind::Free) {
                    pages[p.page].error = EINVAL;
                    continue;
                }
                if (p.bytes && st.stats.compressed_bytes + p.size > st.options.budget) {
                    behind.push_back(p.page);  // still no room: the page goes behind as it is
                    continue;
                }
                Entry& e = st.entries[slot];
                if (e.kind == Kind::Backing) replaced.push_back(e.value);  // rewritten: the old copy goes
                st.drop_pool_bytes(e);
                ++e.epoch;  // a writeback of the old content under way must not land on the new
                e.kind = Kind::Pool;
                ++st.stats.stored_pages;
                ++st.stats.pages_in;
                if (p.bytes) {
                    e.bytes = std::move(p.bytes);
                    e.size = std::uint32_t(p.size);
                    st.stats.compressed_bytes += p.size;
                    ++st.pool_compressed_pages;
                    st.fifo.push_back({slot, e.epoch});
                } else {
                    e.value = p.word;
                    ++st.stats.same_filled;
                }
            }
        }
        if (behind.empty()) {
            if (!replaced.empty()) st.backing.release(replaced);
            return;
        }
        std::vector<PageIo> io(behind.size());
        for (std::size_t k = 0; k < behind.size(); ++k) io[k].data = pages[behind[k]].data;
        std::vector<std::uint64_t> slots;
        st.write_behind(io, slots);
        std::vector<std::uint64_t> orphans;
        std::unique_lock guard(st.lock);
        for (std::size_t k = 0; k < behind.size(); ++k) {
            PageIo& p = pages[behind[k]];
            if (io[k].error) {
                p.error = io[k].error;
                continue;
            }
            if (p.slot >= st.entries.size() || st.entries[p.slot].kind == Kind::Free) {
                orphans.push_back(slots[k]);
                p.error = EINVAL;
                continue;
            }
            Entry& e = st.entries[p.slot];
            if (e.kind == Kind::Backing) replaced.push_back(e.value);
            st.drop_pool_bytes(e);
            ++e.epoch;
            e.kind = Kind::Backing;
            e.value = slots[k];
            ++st.stats.pages_in;
            ++st.stats.rejected;
        }
        guard.unlock();
        orphans.insert(orphans.end(), replaced.begin(), replaced.end());
        if (!orphans.empty()) st.backing.release(orphans);
    } catch (const std::bad_alloc&) {
        for (PageIo& p : pages)
            if (!p.error) p.error = ENOMEM;
    }
}

void CompressedStore::read(std::span<PageIo> pages) {
    State& st = *state_;
    try {
        struct Copy {
            std::size_t page;
            std::unique_ptr<char[]> bytes;
            std::size_t size;
        };
        std::vector<Copy> copies;
        std::vector<std::size_t> behind;
        std::vector<PageIo> io;
        {
            std::lock_guard guard(st.lock);
            for (std::size_t i = 0; i < pages.size(); ++i) {
                PageIo& p = pages[i];
                p.error = 0;
                if (p.slot >= st.entries.size()) {
                    p.error = EINVAL;
                    continue;
                }
                Entry& e = st.entries[p.slot];
                switch (e.kind) {
                    case Kind::Free:
                    case Kind::Empty:
                        p.error = EINVAL;
                        break;
                    case Kind::Pool:
                        ++st.stats.pool_hits;
                        if (!e.bytes) {
                            fill_word(p.data, e.value);
                            break;
                        }
                        copies.push_back({i, std::make_unique<char[]>(e.size), e.size});
                        std::memcpy(copies.back().bytes.get(), e.bytes.get(), e.size);
                        break;
                    case Kind::Backing:
                        ++st.stats.backing_reads;
                        behind.push_back(i);
                        io.push_back({e.value, p.data, 0});
                        break;
                }
            }
        }
        for (const Copy& c : copies) pages[c.page].error = st.decompress(c.bytes.get(), c.size, pages[c.page].data);
        if (io.empty()) return;
        st.backing.read(io);
        for (std::size_t k = 0; k < behind.size(); ++k) pages[behind[k]].error = io[k].error;
    } catch (const std::bad_alloc&) {
        for (PageIo& p : pages) p.error = ENOMEM;
    }
}

// Tags take no pool bytes, so the slots are not bounded by the budget: the tier hands out as many
// as the store behind could hold, plus one per 64 bytes of budget (what a page compresses to at best).
std::uint64_t CompressedStore::capacity() const { return state_->backing.capacity() + state_->options.budget / 64; }

std::string CompressedStore::describe() const {
    return fmt::format("compressed tier ({}, {} MiB) in front of {}", state_->options.codec == Codec::Lz4 ? "lz4" : "zstd",
                       state_->options.budget >> 20, state_->backing.describe());
}

CompressedStats CompressedStore::stats() const {
    std::lock_guard guard(state_->lock);
    return state_->stats;
}

double CompressedStats::ratio() const {
    const std::uint64_t pages = stored_pages - same_filled;
    return compressed_bytes ? double(pages * far::kPageBytes) / double(compressed_bytes) : 0;
}

}  // namespace usermm
