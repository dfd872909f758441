// The only code that asks the kernel to change memory. Each call returns 0 or an errno value, never
// logs, never throws, and is async-signal-safe, so that both worlds use the same layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

// Reserve `len` bytes of PROT_NONE address space that commits nothing.
int page_reserve(std::size_t len, void** out);
// The same at `addr` exactly, where nothing may be mapped yet (EEXIST otherwise).
int page_reserve_at(std::uintptr_t addr, std::size_t len);
// Anonymous read-write memory the kernel fills with zeros on demand (for metadata tables).
int page_alloc_table(std::size_t len, void** out);
int page_release(std::uintptr_t addr, std::size_t len);
int page_protect(std::uintptr_t addr, std::size_t len, Prot prot);
// Which pages of the range are in memory now (mincore). vec gets one byte per page, bit 0 set.
int page_resident(std::uintptr_t addr, std::size_t len, unsigned char* vec);
// Which pages of the range hold data of their own: present or swapped out, as /proc/self/pagemap
// says (mincore says "not resident" for a swapped-out page, whose data is not lost). A page granted
// write access but never touched holds nothing, whatever usermm's populated bit says. vec gets one
// byte per page, bit 0 set where the page may hold data: every page, when pagemap cannot be read.
void page_held(std::uintptr_t addr, std::size_t len, unsigned char* vec);
// Ask for transparent huge pages in the range (MADV_HUGEPAGE).
int page_advise_huge(std::uintptr_t addr, std::size_t len);
// Commit memory for the range now (MADV_POPULATE_WRITE), so that first writes do not fault.
int page_populate(std::uintptr_t addr, std::size_t len);
// Drop the content of the range; the next touch sees zeros.
int page_discard(std::uintptr_t addr, std::size_t len);

// Copies to or from arena memory whatever its protection, through /proc/self/mem: the kernel's
// access to the process's own memory ignores PROT_NONE for private mappings, faults in nothing
// but the pages touched, and raises no signal. Each process uses only a descriptor it opened
// itself (opened at the first need, in either world); where it cannot open one (EMFILE, or EACCES
// in a non-dumpable process, whose /proc/self belongs to root) these calls return that errno.
// 0 when this process has its descriptor (opening it now if need be), else the errno of the open.
int page_self_mem();
// A forked child, before anything else: closes the descriptor inherited from the parent, if any
// (true then).
bool page_forget_self_mem();
int page_read_raw(std::uintptr_t addr, void* dst, std::size_t len);
int page_write_raw(std::uintptr_t addr, const void* src, std::size_t len);
// Writes n pages, each from its own buffer, to the consecutive pages from addr: one pwritev per
// up to 256 pages instead of a write per page. API world.
int page_write_raw_pages(std::uintptr_t addr, const std::byte* const* pages, std::size_t n);

// --- files ----------------------------------------------------------------------------------

// Reads up to len bytes of the file at off into buf, as many as the file has: *done < len only at
// the end of the file. Returns 0 or the errno of a failed read.
int page_read_file(int fd, void* buf, std::size_t len, std::uint64_t off, std::size_t* done);
// Writes all of buf to the file at off, or returns the errno (a write that makes no progress is EIO).
int page_write_file(int fd, const void* buf, std::size_t len, std::uint64_t off);
int page_file_size(int fd, std::uint64_t* size);
int page_sync_file(int fd);  // fdatasync
// Writes len bytes (at most a page) into the file open as fd at page-aligned offset off through a
// mapping of its own (MAP_SHARED, unmapped again): the page cache's page becomes dirty without a
// write request to the file system, which may be refusing writes. The file must be open for
// writing.
int page_write_through_mapping(int fd, std::uint64_t off, const void* src, std::size_t len);
// madvise(2) on the range, for the advice values the kernel's page cache takes (MADV_WILLNEED reads
// ahead without waiting, MADV_RANDOM / MADV_SEQUENTIAL / MADV_NORMAL set the kernel's own
// readahead, MADV_POPULATE_READ reads and maps the pages and waits).
int page_advise(std::uintptr_t addr, std::size_t len, int advice);

// A file VMA's kernel mapping, PROT_NONE, of the file open as fd from off, in two steps so that its
// I/O happens before the arena's lock is taken. page_prepare_file_mapping makes a private mapping
// anywhere and writes it once while it is one piece, for the same reason as page_reserve: its
// pieces must share one anon_vma to merge again after splits (the write reads the first page,
// MADV_RANDOM: that page alone, and leaves the page cache as it was); *out stays null for a shared
// mapping, or where the first page lies past the end of the file (nothing to write). Then
// page_place_file_mapping replaces [addr, addr + len) of an arena by it (moving the prepared one:
// mapped in place, a private mapping could merge into a neighbour first, and whether it merged
// with the other later would depend on whose anon_vma it took) or by a new mapping made in place.
int page_prepare_file_mapping(int fd, std::uint64_t off, std::size_t len, bool shared, void** out);
int page_place_file_mapping(std::uintptr_t addr, std::size_t len, int fd, std::uint64_t off, bool shared,
                            void* prepared);
// Puts a fresh piece of PROT_NONE anonymous reservation at [addr, addr + len), written once while
// whole (see page_reserve), and registered for userfaultfd write-protection first if `uffd` (the
// registration changes the piece's flags: registered after the write, the piece would keep an
// anon_vma of its own and never merge with its registered neighbours).
// *replaced says whether the old mapping is gone (the anonymous piece is there) when it fails.
int page_reserve_fixed(std::uintptr_t addr, std::size_t len, bool uffd, bool* replaced = nullptr);

// How write access is withheld from pages whose next write must be seen (snapshots, dirty
// tracking):
//  - Mprotect: the page's protection loses write; the write faults with SIGSEGV. Portable, but each
//    page given write back alone splits a kernel VMA, so large sparse sets run into the map budget.
//  - Uffd: userfaultfd write-protection in SIGBUS mode: the protection stays, the kernel marks the
//    page table entry, and the write raises SIGBUS in the writing thread. No VMA splits.
enum class TrackingEngine { Mprotect, Uffd };

// API world, once: opens a userfaultfd and asks the running kernel (not the headers) for SIGBUS
// mode, write-protect and WP_UNPOPULATED (without which write-protect silently skips pages never
// touched). Returns 0, or the errno that makes the uffd engine unusable here.
int uffd_probe();
TrackingEngine tracking_engine();
void set_tracking_engine(TrackingEngine e);
// Registers an arena's reservation for write-protect faults.
int uffd_register(std::uintptr_t addr, std::size_t len);
// Sets or clears userfaultfd write-protection on a range.
int uffd_write_protect(std::uintptr_t addr, std::size_t len, bool protect);
// In a forked child: the inherited descriptor belongs to the parent's address space, and the
// kernel dropped the child's registrations and write-protect marks. The child continues with the
// mprotect engine.
void uffd_forget();

}  // namespace usermm::detail
