// The only code that asks the kernel to change memory. Each call returns 0 or an errno value, never
// logs, never throws, and is async-signal-safe, so that both worlds use the same layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include <usermm/usermm.hpp>

namespace usermm::detail {

// Reserve `len` bytes of PROT_NONE address space that commits nothing.
int page_reserve(std::size_t len, void** out);
// Anonymous read-write memory the kernel fills with zeros on demand (for metadata tables).
int page_alloc_table(std::size_t len, void** out);
int page_release(std::uintptr_t addr, std::size_t len);
int page_protect(std::uintptr_t addr, std::size_t len, Prot prot);
// Which pages of the range the kernel holds (mincore): a page granted write access but never
// touched holds nothing, whatever usermm's populated bit says. vec gets one byte per page.
int page_resident(std::uintptr_t addr, std::size_t len, unsigned char* vec);
// Ask for transparent huge pages in the range (MADV_HUGEPAGE).
int page_advise_huge(std::uintptr_t addr, std::size_t len);
// Commit memory for the range now (MADV_POPULATE_WRITE), so that first writes do not fault.
int page_populate(std::uintptr_t addr, std::size_t len);
// Drop the content of the range; the next touch sees zeros.
int page_discard(std::uintptr_t addr, std::size_t len);

// Copies to or from arena memory whatever its protection, through /proc/self/mem: the kernel's
// access to the process's own memory ignores PROT_NONE for private mappings, faults in nothing
// but the pages touched, and raises no signal. API world: (re)open it once per process image
// (again in a forked child, whose /proc/self is another process).
int page_open_self_mem();
int page_read_raw(std::uintptr_t addr, void* dst, std::size_t len);
int page_write_raw(std::uintptr_t addr, const void* src, std::size_t len);
// Writes n pages, each from its own buffer, to the consecutive pages from addr: one pwritev per
// up to 256 pages instead of a write per page. API world.
int page_write_raw_pages(std::uintptr_t addr, const std::byte* const* pages, std::size_t n);

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
