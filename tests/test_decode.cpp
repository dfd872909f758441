// Decode: the access type from the hardware's record, per architecture, on synthetic contexts; and
// the fallback that infers it from the page's state when the hardware says nothing.
#include <doctest/doctest.h>

#include <signal.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <usermm/usermm.hpp>

#include "decode.hpp"
#include "fault.hpp"
#include "test_util.hpp"

using namespace usermm::detail;
using usermm::Prot;

TEST_CASE("x86-64 page-fault error code") {
    CHECK(decode_x86_64_error_code(0x4) == Access::Read);           // user, not present, read
    CHECK(decode_x86_64_error_code(0x5) == Access::Read);           // user, protection, read
    CHECK(decode_x86_64_error_code(0x6) == Access::Write);          // user, not present, write
    CHECK(decode_x86_64_error_code(0x7) == Access::Write);          // user, protection, write
    CHECK(decode_x86_64_error_code(0x14) == Access::Exec);          // user, instruction fetch
    CHECK(decode_x86_64_error_code(0x15) == Access::Exec);
}

namespace {

constexpr std::uint32_t kEsrMagic = 0x45535201;
constexpr std::uint32_t kFpsimdMagic = 0x46508001;

void put_record(std::vector<unsigned char>& buf, std::uint32_t magic, std::uint32_t size, std::uint64_t payload) {
    const std::size_t off = buf.size();
    buf.resize(off + std::max<std::size_t>(size, 8));  // the terminating record is {0, 0}, 8 bytes
    std::memcpy(&buf[off], &magic, 4);
    std::memcpy(&buf[off + 4], &size, 4);
    if (size >= 16) std::memcpy(&buf[off + 8], &payload, 8);
}

std::uint64_t esr(unsigned ec, std::uint64_t iss) { return (std::uint64_t(ec) << 26) | iss; }

// A __reserved area as the kernel lays it out: an FP/SIMD record first, then the ESR record.
Access decode_with_esr(std::uint64_t value) {
    std::vector<unsigned char> buf;
    put_record(buf, kFpsimdMagic, 528, 0);
    put_record(buf, kEsrMagic, 16, value);
    put_record(buf, 0, 0, 0);
    buf.resize(4096);
    return decode_aarch64_reserved(buf.data(), buf.size());
}

}  // namespace

TEST_CASE("aarch64 ESR record") {
    CHECK(decode_with_esr(esr(0x24, 0)) == Access::Read);             // data abort from EL0, read
    CHECK(decode_with_esr(esr(0x24, 1u << 6)) == Access::Write);      // WnR
    CHECK(decode_with_esr(esr(0x25, 1u << 6)) == Access::Write);
    CHECK(decode_with_esr(esr(0x24, (1u << 6) | (1u << 8))) == Access::Read);  // cache maintenance
    CHECK(decode_with_esr(esr(0x20, 0)) == Access::Exec);             // instruction abort
    CHECK(decode_with_esr(esr(0x21, 1u << 6)) == Access::Exec);
    CHECK(decode_with_esr(esr(0x15, 0)) == Access::Unknown);          // an SVC: not a fault

    SUBCASE("no ESR record") {
        std::vector<unsigned char> buf;
        put_record(buf, kFpsimdMagic, 528, 0);
        put_record(buf, 0, 0, 0);
        buf.resize(4096);
        CHECK(decode_aarch64_reserved(buf.data(), buf.size()) == Access::Unknown);
    }
    SUBCASE("a record claiming more than the area holds") {
        std::vector<unsigned char> buf;
        put_record(buf, kFpsimdMagic, 16, 0);
        std::uint32_t huge = 1u << 20;
        std::memcpy(&buf[4], &huge, 4);
        buf.resize(64);
        CHECK(decode_aarch64_reserved(buf.data(), buf.size()) == Access::Unknown);
    }
}

TEST_CASE("an unknown access is inferred from the page's state, weakest right first") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));

    // The handler's entry point, called directly as a fault whose access the hardware did not say.
    auto fault = [&](const void* addr) {
        vm_fault vmf;
        vmf.address = reinterpret_cast<std::uintptr_t>(addr);
        vmf.signo = SIGSEGV;
        return handle_mm_fault(vmf);
    };
    CHECK(fault(p) == FaultResult::Resolved);  // guessed read: the page is readable, not writable
    auto vmas = arena.vmas();
    CHECK(vmas[0].stats.read_faults == 1);
    CHECK(vmas[0].stats.zero_page_reads == 1);
    arena.verify();
    CHECK(fault(p) == FaultResult::Resolved);  // the access needed more: now a write
    CHECK(arena.vmas()[0].stats.write_faults == 1);
    usermm_test::write_byte(p, 7);             // and the write goes through without a fault
    CHECK(arena.stats().minor_faults == 2);
    CHECK(fault(p) == FaultResult::AccessError);  // nothing left that the VMA allows
    arena.verify();
}
