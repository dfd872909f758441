// The file a file VMA maps (the kernel's vm_file). The VMA's kernel mapping is the file itself, so
// the kernel's page cache holds the only copy of each page, reads it (with usermm's readahead
// advice), reclaims clean pages and keeps every mapping of the file coherent. What usermm keeps
// besides: its own descriptor (a duplicate of the caller's), the file's identity for verify(),
// the path for diagnostics, and the pages whose write-back failed.
//
// A write-back that fails leaves the kernel's pages clean (the kernel's rule: the error is reported
// once, to one open file, and the page may then be dropped and read again from the disk, without
// the program's write). fdatasync writes every dirty page of the file, so after a failure usermm
// keeps a copy of every page of the file's VMAs in the arena that was dirty or writable, until a
// later write-back of it succeeds: the page becomes PROT_NONE (kPteSaved) before the copy is
// taken, so that the copy is the page's last content, and the next access to it, or the next
// sync, puts the copy back into the page cache first, so that neither the program nor the file
// ever sees the older content the disk may still hold. (A write made after the failure through
// another mapping of the file is not seen by usermm, and the copy then replaces it.)
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
    // Write-backs of the file that failed: one that began before another failed is in doubt too
    // (the kernel reports an error only once, and the failed fdatasync marked its pages clean).
    std::atomic<std::uint64_t> failures{0};
    // Sorted by page. Changed only under the arena's write lock; faults read it under the read lock.
    std::vector<SavedPage> saved;

    const SavedPage* find_saved(std::uint64_t page) const {
        const auto it = std::lower_bound(saved.begin(), saved.end(), page,
                                         [](const SavedPage& s, std::uint64_t p) { return s.page < p; });
        return it != saved.end() && it->page == page ? &*it : nullptr;
    }
};

}  // namespace usermm::detail
