// How much of a file a fault maps and reads ahead (the kernel's mm/filemap.c and mm/readahead.c).
// The kernel's page cache holds the pages and does the I/O; usermm decides the window, starts the
// readahead (MADV_WILLNEED, which does not wait), and asks which pages are in the cache (mincore)
// to count major faults. Fault world: no allocation, only system calls, errno values out.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vma.hpp"

namespace usermm::detail {

// File pages [first, last).
struct FileRange {
    std::uint64_t first = 0;
    std::uint64_t last = 0;
};

// The most pages one fault looks at (maps, reads ahead, asks the page cache about): 1 MiB at 4 KiB
// pages, so that the residency answer fits the handler's stack.
inline constexpr std::size_t kFileProbePages = 256;

// The pages a fault on file page `page` should read ahead, around or ahead of it (the read
// window), by the VMA's advice and the readahead state: one page for Random; the largest window
// for Sequential; otherwise a window that doubles on each sequential fault, starting from the
// aligned fault-around window `around` — or one page once faults out of sequence keep missing the
// pages read around earlier ones (Vma::ra_misses). Clamped to the VMA's file pages and to `eof`
// (the first page wholly past the end of the file).
FileRange readahead_window(const Vma& vma, std::uint64_t page, FileRange around, std::uint64_t eof);

// Records a readahead for the VMA's state: the next sequential fault will be at its end.
void readahead_update(Vma& vma, FileRange read);

// Which of the pages at [addr, addr + n pages) the page cache holds up to date (a page being read
// is not), one byte per page with bit 0 (mincore on the VMA's mapping of the file). n is at most
// kFileProbePages. For a file the process neither owns nor may write, the kernel hides its page
// cache and says every page is there.
int filemap_probe(std::uintptr_t addr, std::size_t n, unsigned char* vec);

// Starts reading the pages at [addr, addr + len) into the page cache, without waiting.
int filemap_readahead(std::uintptr_t addr, std::size_t len);

}  // namespace usermm::detail
