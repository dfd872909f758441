// The kernel calls a signal handler may make (the API world's own are in lib/api/page_ops_api.hpp):
// together the only code that asks the kernel to change memory. Each call returns 0 or an errno
// value, never logs, never throws, and is async-signal-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

int page_protect(std::uintptr_t addr, std::size_t len, Prot prot);
// Which pages of the range are in memory now (mincore). vec gets one byte per page, bit 0 set.
int page_resident(std::uintptr_t addr, std::size_t len, unsigned char* vec);
// Drop the content of the range (MADV_DONTNEED); the next touch sees zeros.
int page_discard(std::uintptr_t addr, std::size_t len);
// Commit memory for the range now (MADV_POPULATE_WRITE), so that first writes do not fault.
int page_populate(std::uintptr_t addr, std::size_t len);
// Guard markers (MADV_GUARD_INSTALL, Linux 6.13): an access to the range raises SIGSEGV whatever the
// mapping's protection, without a kernel VMA of their own; installing drops the pages' content.
// Markers survive MADV_DONTNEED and mprotect; removing them leaves the pages empty (zeros).
int page_guard_install(std::uintptr_t addr, std::size_t len);
int page_guard_remove(std::uintptr_t addr, std::size_t len);

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

// Writes all of buf to the file at off, or returns the errno (a write that makes no progress is EIO).
int page_write_file(int fd, const void* buf, std::size_t len, std::uint64_t off);
int page_file_size(int fd, std::uint64_t* size);
// Writes len bytes (at most a page) into the file open as fd at page-aligned offset off through a
// mapping of its own (MAP_SHARED, unmapped again): the page cache's page becomes dirty without a
// write request to the file system, which may be refusing writes. The file must be open for
// writing.
int page_write_through_mapping(int fd, std::uint64_t off, const void* src, std::size_t len);
// madvise(2) on the range, for the advice values the kernel's page cache takes (MADV_WILLNEED reads
// ahead without waiting, MADV_RANDOM / MADV_SEQUENTIAL / MADV_NORMAL set the kernel's own
// readahead, MADV_POPULATE_READ reads and maps the pages and waits).
int page_advise(std::uintptr_t addr, std::size_t len, int advice);

// How write access is withheld from pages whose next write must be seen (snapshots, dirty
// tracking):
//  - Mprotect: the page's protection loses write; the write faults with SIGSEGV. Portable, but each
//    page given write back alone splits a kernel VMA, so large sparse sets run into the map budget.
//  - Uffd: userfaultfd write-protection in SIGBUS mode: the protection stays, the kernel marks the
//    page table entry, and the write raises SIGBUS in the writing thread. No VMA splits.
enum class TrackingEngine { Mprotect, Uffd };

// The userfaultfd uffd_probe opened, for the calls below.
void uffd_adopt(int fd);
TrackingEngine tracking_engine();
void set_tracking_engine(TrackingEngine e);
// Registers an arena's reservation for write-protect faults.
int uffd_register(std::uintptr_t addr, std::size_t len);
// Takes a range away from it (API world: collect_dirty hands the range to the kernel's own
// write-protect resolution, dirty_async.cpp). The kernel drops the range's write-protect marks.
int uffd_unregister(std::uintptr_t addr, std::size_t len);
// Sets or clears userfaultfd write-protection on a range.
int uffd_write_protect(std::uintptr_t addr, std::size_t len, bool protect);
// The same three on another userfaultfd (the asynchronous one of dirty_async.cpp, or a probe's).
int uffd_register_on(int fd, std::uintptr_t addr, std::size_t len);
int uffd_unregister_on(int fd, std::uintptr_t addr, std::size_t len);
int uffd_write_protect_on(int fd, std::uintptr_t addr, std::size_t len, bool protect);
// Fills pages of a registered range that are not in memory with a copy of src, atomically per page
// and whatever their protection (UFFDIO_COPY): cheaper than /proc/self/mem, which makes the kernel
// zero each page before the copy. EEXIST if a page is in memory already.
int uffd_copy(std::uintptr_t dst, const void* src, std::size_t len);
// In a forked child: the inherited descriptor belongs to the parent's address space, and the
// kernel dropped the child's registrations and write-protect marks. The child continues with the
// mprotect engine.
void uffd_forget();

}  // namespace usermm::detail
