// Reading file pages into the page cache, and deciding how much to read (the kernel's
// mm/filemap.c and mm/readahead.c). Fault world, except where a comment says otherwise: no
// allocation, only system calls, errno values out.
#pragma once

#include <cstdint>

#include "page_cache.hpp"
#include "vma.hpp"

namespace usermm::detail {

// File pages [first, last).
struct FileRange {
    std::uint64_t first = 0;
    std::uint64_t last = 0;
};

// What a read did, for the caller's diagnostics and counters.
struct FileRead {
    FileRange pages;              // the pages read (empty if another thread had filled `need`)
    std::uint64_t bytes = 0;      // bytes read from the file
    std::uint64_t wanted = 0;     // bytes the read asked for
    std::uint64_t at = 0;         // file offset of the read
    int err = 0;                  // errno of the read system call, if it failed
    bool need_read = false;       // this read filled `need` (a major fault, for a fault)
};

// The pages a fault on file page `page` should read, around or ahead of it (the read window), by
// the VMA's advice and the readahead state: one page for Random; the largest window for
// Sequential; otherwise a window that doubles on each sequential fault, starting from the aligned
// fault-around window `around` — or one page once faults out of sequence keep missing the pages
// read around earlier ones (Vma::ra_misses). Clamped to the VMA's file pages, to `eof` (the first page wholly
// past the end of the file) and to the chunk of `page`.
FileRange readahead_window(const Vma& vma, std::uint64_t page, FileRange around, std::uint64_t eof);

// Makes file page `need` of the window filled: reads every page of `window` around `need` that is
// neither filled nor being read, in one read, into the cache, unless another thread fills `need`
// meanwhile (then waits for it and reads nothing). Pages other than `need` are marked read-ahead.
// If the read fails or ends early before `need`, `need` is read again alone. Only pages read whole
// (or up to the end of the file) become filled.
// `need` == window.last means "no page is needed": a readahead of whatever of the window is free.
// `eof_bytes` is the file's size; the window must end at or before the page that contains its end.
// Returns 0 once `need` (or, for a readahead, some page) is filled; else the errno of the read, or
// ENODATA for a short read (the file ended before fstat said).
int filemap_read(PageCache& cache, std::uint64_t need, FileRange window, std::uint64_t eof_bytes, FileRead* out);

// Records a read for the VMA's readahead state: the next sequential fault will be at its end.
void readahead_update(Vma& vma, const FileRead& read);

}  // namespace usermm::detail
