// The API world's side of file VMAs: the process's page caches, and what map_file, sync, advise,
// unmap, prefault and the arena's destruction do to file pages. Under the arena's write lock unless
// a comment says otherwise.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "arena_ops.hpp"
#include "page_cache.hpp"

namespace usermm::detail {

// Deletes a VMA node of arena `a` (null once the arena is gone), dropping its reference to its
// page cache (which takes the registry's mutex).
void vma_free(ArenaCore* a, Vma* v);
// A new node shares the page cache of `from` (a split): one more reference, no mutex.
void vma_copy_file(Vma& to, const Vma& from);

// Throws ENOTSUP if [r.start, r.end) holds a file VMA: snapshots, restore and collect_dirty cover
// anonymous memory only.
void refuse_file_vmas(ArenaCore& a, const char* call, Range r);

// Writes the dirty pages of `part` (inside shared file VMA `v`) back to the file and makes them
// durable (fdatasync): see Arena::sync. With `later`, the fdatasync is left to the caller, to do
// after it released the arena's lock (see FileSync); the written pages are recorded there.
struct FileSync;
void writeback(ArenaCore& a, Vma& v, Range part, const char* call, FileSync* later = nullptr);

// Written pages of one file whose fdatasync is still to come, holding a reference to its cache.
struct FileSync {
    PageCache* cache = nullptr;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> pages;  // file pages [first, last)
    Range range{};  // the addresses written, for the error message
    // fdatasync without any lock; on failure the pages are dirty again in the page cache (any
    // shared VMA of the file writes them at its next write-back) and it returns the errno.
    int finish(ArenaCore& a);
};
// Reads the file pages of `part` (inside file VMA `v`) into the page cache. With `must`, throws if
// a page cannot be read or lies past the end of the file; without, reads what it can (advice).
void read_file_pages(ArenaCore& a, Vma& v, Range part, const char* call, bool must);
// After the pages of `part` were made PROT_NONE and discarded: gives the range back to the arena's
// anonymous reservation (unmap; returns 0 or the errno of a step that failed, after which the PTEs
// still agree with the kernel), or, for advice, drops the page cache's copies if no other VMA in
// the process maps them.
int unmap_file_part(ArenaCore& a, Vma& v, Range part);
void drop_cached_pages(ArenaCore& a, Vma& v, Range part);
// The arena is going: its VMA no longer shows the file.
void forget_file_users(const ArenaCore& a, const Vma& v);

// Recounts the arena's kernel VMAs from /proc/self/maps, after a change the PTEs cannot predict.
void recount_kernel_maps(ArenaCore& a);

// Around fork(), after the arenas' locks: the registry is locked while the address space is copied.
// Afterwards, in both processes, the memfds of the page caches that existed are shared with the
// other process, so their pages are never dropped (the other process may map them).
void page_caches_fork_prepare();
// Before fork(), under the arena's write lock: writable pages of shared file VMAs lose write access,
// so that the next write in either process faults and marks the page dirty in the shared page
// cache, where either process's write-back finds it (as the kernel's shared page cache would).
void write_protect_shared_files(ArenaCore& a);
void page_caches_fork_done();

}  // namespace usermm::detail
