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
// Drop the content of the range; the next touch sees zeros.
int page_discard(std::uintptr_t addr, std::size_t len);

// Copies to or from arena memory whatever its protection, through /proc/self/mem: the kernel's
// access to the process's own memory ignores PROT_NONE for private mappings, faults in nothing
// but the pages touched, and raises no signal. API world: (re)open it once per process image
// (again in a forked child, whose /proc/self is another process).
int page_open_self_mem();
int page_read_raw(std::uintptr_t addr, void* dst, std::size_t len);
int page_write_raw(std::uintptr_t addr, const void* src, std::size_t len);

}  // namespace usermm::detail
