// Decode: which access faulted, from the hardware's own record of it in the signal context.
#pragma once


#include <cstddef>
#include <cstdint>

#include "fault.hpp"

namespace usermm::detail {

// For the machine this library was built for; Access::Unknown when the context does not say, and
// handle_mm_fault then infers the access from the page's state.
Access decode_access(const void* ucontext);
// The interrupted code's stack pointer, 0 where the context does not say.
std::uintptr_t decode_sp(const void* ucontext);

// The per-architecture parsers, built on every architecture so that tests can feed them synthetic
// contexts.
// x86-64: the page-fault error code the kernel stores in uc_mcontext.gregs[REG_ERR].
Access decode_x86_64_error_code(std::uint64_t err);
// aarch64: the records in uc_mcontext.__reserved; the ESR record (magic 0x45535201) holds the
// exception syndrome.
Access decode_aarch64_reserved(const unsigned char* reserved, std::size_t size);
Access decode_aarch64_esr(std::uint64_t esr);

}  // namespace usermm::detail
