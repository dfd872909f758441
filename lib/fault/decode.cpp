#include "decode.hpp"

#include <ucontext.h>

#include <cstring>

namespace usermm::detail {

Access decode_x86_64_error_code(std::uint64_t err) {
    constexpr std::uint64_t kWrite = 1u << 1;
    constexpr std::uint64_t kInstructionFetch = 1u << 4;
    if (err & kInstructionFetch) return Access::Exec;
    return (err & kWrite) ? Access::Write : Access::Read;
}

Access decode_aarch64_esr(std::uint64_t esr) {
    const unsigned ec = unsigned(esr >> 26) & 0x3f;
    constexpr unsigned kInstrAbortLower = 0x20, kInstrAbortSame = 0x21;
    constexpr unsigned kDataAbortLower = 0x24, kDataAbortSame = 0x25;
    constexpr std::uint64_t kWnR = 1u << 6;           // write, not read
    constexpr std::uint64_t kCacheMaintenance = 1u << 8;  // reported as a write, but it reads
    if (ec == kInstrAbortLower || ec == kInstrAbortSame) return Access::Exec;
    if (ec == kDataAbortLower || ec == kDataAbortSame)
        return ((esr & kWnR) && !(esr & kCacheMaintenance)) ? Access::Write : Access::Read;
    return Access::Unknown;
}

Access decode_aarch64_reserved(const unsigned char* reserved, std::size_t size) {
    constexpr std::uint32_t kEsrMagic = 0x45535201;
    std::size_t off = 0;
    // Each record starts with {u32 magic, u32 size}; a zero record ends the list.
    while (off + 8 <= size) {
        std::uint32_t magic, rec_size;
        std::memcpy(&magic, reserved + off, 4);
        std::memcpy(&rec_size, reserved + off + 4, 4);
        if (magic == 0 || rec_size < 8 || rec_size > size - off) break;
        if (magic == kEsrMagic && rec_size >= 16) {
            std::uint64_t esr;
            std::memcpy(&esr, reserved + off + 8, 8);
            return decode_aarch64_esr(esr);
        }
        off += rec_size;
    }
    return Access::Unknown;
}

Access decode_access(const void* ucontext) {
    const auto* uc = static_cast<const ucontext_t*>(ucontext);
#if defined(__x86_64__)
    return decode_x86_64_error_code(std::uint64_t(uc->uc_mcontext.gregs[REG_ERR]));
#elif defined(__aarch64__)
    return decode_aarch64_reserved(uc->uc_mcontext.__reserved, sizeof uc->uc_mcontext.__reserved);
#else
    (void)uc;
    return Access::Unknown;
#endif
}

std::uintptr_t decode_sp(const void* ucontext) {
    const auto* uc = static_cast<const ucontext_t*>(ucontext);
#if defined(__x86_64__)
    return std::uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
#elif defined(__aarch64__)
    return std::uintptr_t(uc->uc_mcontext.sp);
#else
    (void)uc;
    return 0;
#endif
}

}  // namespace usermm::detail
