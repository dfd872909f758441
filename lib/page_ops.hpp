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

}  // namespace usermm::detail
