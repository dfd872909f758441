// The page cache of one file (the kernel's address_space): the file's pages as usermm has read
// them, shared by every file VMA of the file in the process, in any arena.
//
// The pages live in a memfd that mirrors the file's layout (memfd offset = file offset). Every file
// VMA maps the memfd into its arena: MAP_SHARED for Share::Shared, so that all shared VMAs of the
// file see one copy of each page; MAP_PRIVATE for Share::Private, so that the kernel gives a VMA its
// own copy at the first write and the file's page stays as read. The runtime reads the file through
// a second, runtime-private view of the same memfd, while the arena's pages of it are still
// PROT_NONE: a page becomes accessible only once its whole content is there ("no torn page").
//
// Per file page, one state word: filled (the content is complete), locked (a thread is reading
// it, with the reader's process id, so that a reader that died in a forked child is noticed),
// readahead (read ahead of any access and not mapped since), dirty (written through a shared VMA,
// in this process or a forked one, since the page was last written back). State and view come in chunks
// that the API world adds before a VMA can fault on them and never takes away while the cache
// lives, so the fault world reads them without a lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <sys/types.h>

namespace usermm::detail {

using cache_state_t = std::uint32_t;
inline constexpr cache_state_t kCacheFilled = 0x1;
inline constexpr cache_state_t kCacheLocked = 0x2;
inline constexpr cache_state_t kCacheReadahead = 0x4;
inline constexpr cache_state_t kCacheDirty = 0x8;
inline constexpr unsigned kCacheOwnerShift = 8;  // the locking reader's pid, above the flags

inline constexpr std::size_t kPathMax = 256;

struct PageCache {
    static constexpr unsigned kChunkShift = 18;  // pages per chunk: 1 GiB of file at 4 KiB pages
    static constexpr std::uint64_t kChunkPages = std::uint64_t(1) << kChunkShift;
    static constexpr std::size_t kMaxChunks = std::size_t(1) << 12;  // files up to 4 TiB at 4 KiB

    struct Chunk {
        std::atomic<cache_state_t>* state = nullptr;  // kChunkPages entries
        std::byte* view = nullptr;                    // kChunkPages pages of the memfd, read-write
    };

    dev_t dev = 0;
    ino_t ino = 0;
    int fd = -1;  // read side, usermm's own descriptor
    // Opened for writing once a writable shared VMA needs it (then never changes); else -1.
    std::atomic<int> write_fd{-1};
    int memfd = -1;
    char path[kPathMax] = {};  // for diagnostics, truncated
    std::atomic<Chunk*> chunks[kMaxChunks] = {};
    // API world only.
    std::atomic<std::size_t> refs{0};  // VMA nodes that refer to this cache
    std::size_t chunk_count = 0;       // under the registry's mutex

    std::atomic<cache_state_t>& state(std::uint64_t page) const {
        return chunks[page >> kChunkShift].load(std::memory_order_acquire)->state[page & (kChunkPages - 1)];
    }
    std::byte* view(std::uint64_t page, std::size_t page_shift) const {
        return chunks[page >> kChunkShift].load(std::memory_order_acquire)->view +
               ((page & (kChunkPages - 1)) << page_shift);
    }
};

}  // namespace usermm::detail
