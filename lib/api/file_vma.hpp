// The API world's side of file VMAs: what map_file, sync, advise, unmap, prefault and the arena's
// destruction do to file pages. Under the arena's write lock unless a comment says otherwise.
#pragma once

#include <cstdint>
#include <vector>

#include "arena_ops.hpp"
#include "mapped_file.hpp"

namespace usermm::detail {

// Deletes a VMA node, dropping its reference to its file (closed with the last one).
void vma_free(Vma* v);
// A new node is what `from` is, at the same file offset (a split): its attributes, its readahead
// state, and one more reference to its file.
void vma_copy_attrs(Vma& to, const Vma& from);
// Drops a reference to a file (FileSync's, or a VMA's).
void file_put(MappedFile* f);

// Throws ENOTSUP if [r.start, r.end) holds a file VMA: snapshots, restore and collect_dirty cover
// anonymous memory only.
void refuse_file_vmas(ArenaCore& a, const char* call, Range r);

// One write-back of a shared file VMA's part, in two steps: writeback() under the arena's write
// lock (copies of earlier failed write-backs go back into the page cache, dirty pages lose write
// access so that the next write is seen, and are recorded as clean), then finish() without any
// lock (fdatasync: the kernel writes the file's dirty pages and waits). If finish() fails,
// keep_failed(), under the write lock again, keeps the file's pages (see mapped_file.hpp).
struct FileSync {
    MappedFile* file = nullptr;  // holds a reference
    std::uint64_t failures = 0;  // the file's failure count when the write-back began
    std::vector<std::size_t> pages;  // arena pages recorded clean, or writable and maybe written
    Range range{};  // the addresses written back, for the error message
    // 0, the errno of the fdatasync, or EIO if another write-back of the file failed meanwhile.
    int finish();
    ~FileSync() { file_put(file); }
    FileSync() = default;
    FileSync(FileSync&& o) noexcept
        : file(o.file), failures(o.failures), pages(std::move(o.pages)), range(o.range) {
        o.file = nullptr;
    }
    FileSync& operator=(FileSync&&) = delete;
};
void writeback(ArenaCore& a, Vma& v, Range part, const char* call, FileSync& out);
void keep_failed(ArenaCore& a, const FileSync& s);
// writeback, finish and keep_failed in one, under the write lock (unmap, DontNeed, destruction);
// throws naming `call`, the file, the range and the errno if the write-back failed.
void writeback_now(ArenaCore& a, Vma& v, Range part, const char* call);
// Puts the saved copies of the pages of `part` back into the page cache (they stay PROT_NONE),
// before something grants them access without a fault (prefault) or writes them back.
void put_back_saved(ArenaCore& a, Vma& v, Range part, const char* call);
// In a forked child: the copies are the parent's to put back (the page cache is shared); the
// child's pages are plain dirty pages of its own.
void forget_saved_after_fork(ArenaCore& a);

// Before file pages of `part` lose their mapping (unmap, DontNeed, destruction): saved copies go
// into the page cache (nothing written is lost), and pages read ahead but never mapped count as
// wasted.
void release_file_pages(ArenaCore& a, Vma& v, Range part, const char* call);
// After the pages of `part` were made PROT_NONE and discarded: gives the range back to the arena's
// anonymous reservation (unmap). Returns 0 or the errno of a step that failed, after which the PTEs
// still agree with the kernel; *replaced says whether the file's mapping is gone (if not, the VMA
// must stay, or anonymous memory placed there later would be the file's).
int unmap_file_part(ArenaCore& a, Range part, bool* replaced);

// Starts reading the file pages of `part` into the page cache without waiting (advice); they are
// counted as read ahead.
void readahead_file(ArenaCore& a, Vma& v, Range part);
// Counts the file pages of `part` the page cache lacks as read for prefault, which is about to
// read them; throws EFAULT if part of it lies past the end of the file.
void count_prefault_reads(ArenaCore& a, Vma& v, Range part, const char* call);
// Sets the kernel's readahead flags for the file pages of `part` (MADV_NORMAL, MADV_RANDOM,
// MADV_SEQUENTIAL), which splits the kernel's mapping where they change.
void advise_file(ArenaCore& a, Vma& v, Range part, Advice advice, const char* call);

}  // namespace usermm::detail
