// The file a file VMA maps (the kernel's vm_file). The VMA's kernel mapping is the file itself, so
// the kernel's page cache holds the only copy of each page, reads it (with usermm's readahead
// advice), reclaims clean pages and keeps every mapping of the file coherent. What usermm keeps
// besides: its own descriptor (a duplicate of the caller's), the file's identity for verify(),
// the path for diagnostics, and the pages whose write-back failed.
//
// A write-back that fails leaves the kernel's pages clean (the kernel's rule: the error is reported
// once, and the page may then be dropped and read again from the disk, without the program's
// write). usermm keeps a copy of each such page until a later write-back of it succeeds: the page
// becomes PROT_NONE (kPteSaved), and the next access to it, or the next sync, writes the copy into
// the page cache first (pwrite), so that neither the program nor the file ever sees the older
// content the disk may still hold.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace usermm::detail {

inline constexpr std::size_t kPathMax = 256;

struct SavedPage {
    std::uint64_t page = 0;  // file page
    std::unique_ptr<std::byte[]> content;
};

struct MappedFile {
    int fd = -1;  // a duplicate of the caller's descriptor: the same open file description
    dev_t dev = 0;
    ino_t ino = 0;
    bool writable = false;  // open for writing (the kernel's VM_MAYWRITE for a shared VMA)
    char path[kPathMax] = {};  // for diagnostics, truncated
    // VMA nodes that refer to this file (the map_file's VMA and its splits), and write-backs in
    // progress (Arena::sync drops its reference without the arena's lock); API world only.
    std::atomic<std::size_t> refs{0};
    // Sorted by page. Changed only under the arena's write lock; faults read it under the read lock.
    std::vector<SavedPage> saved;

    const SavedPage* find_saved(std::uint64_t page) const {
        const auto it = std::lower_bound(saved.begin(), saved.end(), page,
                                         [](const SavedPage& s, std::uint64_t p) { return s.page < p; });
        return it != saved.end() && it->page == page ? &*it : nullptr;
    }
};

}  // namespace usermm::detail
