// The kernel calls only the API world makes: reservations and tables, file mappings, write-back,
// the userfaultfd probe. Each returns 0 or an errno value, never logs, never throws; unlike the
// fault world's (page_ops.hpp), they may block.
#pragma once

#include <cstddef>
#include <cstdint>

#include "page_ops.hpp"

namespace usermm::detail {

// Reserve `len` bytes of PROT_NONE address space that commits nothing.
int page_reserve(std::size_t len, void** out);
// The same at `addr` exactly, where nothing may be mapped yet (EEXIST otherwise).
int page_reserve_at(std::uintptr_t addr, std::size_t len);
// Anonymous read-write memory the kernel fills with zeros on demand (for metadata tables).
int page_alloc_table(std::size_t len, void** out);
int page_release(std::uintptr_t addr, std::size_t len);
// Lets the kernel take the range's pages whenever it needs memory (MADV_FREE): until then they stay,
// and a write keeps one; once taken, the next touch faults in a zeroed page.
int page_free_lazily(std::uintptr_t addr, std::size_t len);
// Which pages of the range hold data of their own: present or swapped out, as /proc/self/pagemap
// says (mincore says "not resident" for a swapped-out page, whose data is not lost). A page granted
// write access but never touched holds nothing, whatever usermm's populated bit says. vec gets one
// byte per page, bit 0 set where the page may hold data: every page, when pagemap cannot be read.
void page_held(std::uintptr_t addr, std::size_t len, unsigned char* vec);
// Ask for transparent huge pages in the range (MADV_HUGEPAGE).
int page_advise_huge(std::uintptr_t addr, std::size_t len);
// The name /proc/PID/maps shows for anonymous memory in the range, "[anon:NAME]" (PR_SET_VMA_ANON_NAME);
// nullptr removes it. EINVAL where the kernel lacks CONFIG_ANON_VMA_NAME, or for a name it refuses.
int page_name_anon(std::uintptr_t addr, std::size_t len, const char* name);
// Whether the running kernel names anonymous memory at all: a scratch mapping named once.
bool page_names_supported();
// Reads up to len bytes of the file at off into buf, as many as the file has: *done < len only at
// the end of the file. Returns 0 or the errno of a failed read.
int page_read_file(int fd, void* buf, std::size_t len, std::uint64_t off, std::size_t* done);
int page_sync_file(int fd);  // fdatasync
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
// API world, once: opens a userfaultfd and asks the running kernel (not the headers) for SIGBUS
// mode, write-protect and WP_UNPOPULATED (without which write-protect silently skips pages never
// touched). Returns 0, or the errno that makes the uffd engine unusable here.
int uffd_probe();

// The second userfaultfd, for collect_dirty (dirty_async.cpp): write-protect faults the kernel
// resolves itself (UFFD_FEATURE_WP_ASYNC, Linux 6.7), whose written pages PAGEMAP_SCAN on
// /proc/self/pagemap reports and write-protects again in one call. A property of a whole
// userfaultfd context, and a kernel VMA is registered with one context at a time: so a context of
// its own beside uffd_probe's. uffd_async_probe opens it and checks, on a scratch mapping, that
// write-protect, a write and PAGEMAP_SCAN with write-protect matching behave as documented;
// 0, or the errno that leaves collect_dirty on the synchronous path.
int uffd_async_probe();
bool uffd_async_available();
// For benchmarks and tests that compare both paths in one process: collect_dirty uses the
// asynchronous mode only while allowed (and available); ranges it holds go back at their next
// collection. Under no arena's lock; set between API calls.
void uffd_async_allow(bool on);
// In a forked child: the descriptors refer to the parent's context and memory. Closed; the child
// never uses the asynchronous mode.
void uffd_async_forget();
int uffd_async_register(std::uintptr_t addr, std::size_t len);
int uffd_async_unregister(std::uintptr_t addr, std::size_t len);
int uffd_async_write_protect(std::uintptr_t addr, std::size_t len);
// One PAGEMAP_SCAN of [addr, addr + len) for pages written since their write-protection (the kernel's
// PAGE_IS_WRITTEN), write-protecting them again if `rearm`, into out[0, capacity): *regions filled,
// *walk_end where the walk stopped (the caller asks again from there while it is below the end).
// Checks that every VMA walked is registered with the asynchronous context (EPERM otherwise).
struct WrittenRegion {
    std::uint64_t start;
    std::uint64_t end;
    std::uint64_t categories;
};
int pagemap_scan_written(std::uintptr_t addr, std::size_t len, bool rearm, WrittenRegion* out, std::size_t capacity,
                         std::size_t* regions, std::uintptr_t* walk_end);

}  // namespace usermm::detail
