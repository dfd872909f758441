// Bad arguments: every API call throws usermm::Error with an errno a caller of mmap / mprotect /
// munmap would expect and a message naming the call, the bad argument and the address, and leaves
// the arena exactly as it was: same VMAs, same kernel protections, no fault or prefault counted,
// data intact.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <system_error>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

namespace {

using usermm::Prot;
using usermm_test::read_byte;
using usermm_test::write_byte;

constexpr std::size_t kMax = std::numeric_limits<std::size_t>::max();

std::string hex(std::uintptr_t v) { return fmt::format("{:#x}", v); }
std::string hex(const void* p) { return hex(reinterpret_cast<std::uintptr_t>(p)); }

struct Failure {
    int code = 0;
    std::string what;
};

template <typename Call>
Failure failure_of(Call&& call) {
    try {
        call();
    } catch (const usermm::Error& e) {
        CHECK(e.code().category() == std::generic_category());
        return {e.code().value(), e.what()};
    }
    FAIL("no usermm::Error was thrown");
    return {};
}

void expect_one_of(const Failure& f, std::initializer_list<int> codes, std::initializer_list<std::string> parts) {
    INFO("what(): ", f.what);
    bool known = false;
    for (const int code : codes) known |= f.code == code;
    CHECK_MESSAGE(known, "errno ", f.code, " (", std::strerror(f.code), ")");
    for (const std::string& part : parts) CHECK_MESSAGE(f.what.find(part) != std::string::npos, "missing ", part);
}

void expect(const Failure& f, int code, std::initializer_list<std::string> parts) { expect_one_of(f, {code}, parts); }

// Pages of a 64-page arena:
//   [8, 16)  data  rw-  written
//   [16, 20) ro    r--  read, right after data
//   [20, 32)       hole
//   [32, 36) none  ---
struct Arena64 {
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena{64 * ps};
    char* const base = static_cast<char*>(arena.base());
    char* const end = base + arena.size();
    char* const data =
        static_cast<char*>(arena.map(8 * ps, Prot::ReadWrite, {.name = "data", .address = base + 8 * ps}));
    char* const ro = static_cast<char*>(arena.map(4 * ps, Prot::Read, {.name = "ro", .address = base + 16 * ps}));
    char* const hole = base + 20 * ps;
    char* const none = static_cast<char*>(arena.map(4 * ps, Prot::None, {.name = "none", .address = base + 32 * ps}));
    std::string vmas_before;
    usermm::Stats stats_before;

    Arena64() {
        for (std::size_t i = 0; i < 8; ++i) {
            write_byte(data + i * ps, std::uint8_t(0x10 + i));
            write_byte(data + i * ps + ps - 1, std::uint8_t(0x90 + i));
        }
        for (std::size_t i = 0; i < 4; ++i) (void)read_byte(ro + i * ps);
        vmas_before = vmas();
        stats_before = arena.stats();
    }

    std::string vmas() const {
        std::string out;
        for (const usermm::VmaInfo& v : arena.vmas())
            out += fmt::format("{}+{:#x} {} '{}' fa {}\n", v.start, v.length, usermm::to_string(v.prot), v.name,
                               v.fault_around_pages);
        return out;
    }

    void check_unchanged() const {
        // A call that failed halfway through a prefault would have counted pages.
        check_stats();
        CHECK_NOTHROW(arena.verify());
        CHECK(vmas() == vmas_before);
        for (std::size_t i = 0; i < 8; ++i) {
            CHECK(read_byte(data + i * ps) == 0x10 + i);
            CHECK(read_byte(data + i * ps + ps - 1) == 0x90 + i);
        }
        // The data was written before, so reading it faults only if a failed call took rights away
        // from its pages, which neither verify() nor vmas() can see.
        check_stats();
    }

    void check_stats() const {
        CHECK_MESSAGE(arena.stats() == stats_before, "before:\n", usermm::format_stats(stats_before), "now:\n",
                      usermm::format_stats(arena.stats()));
    }
};

}  // namespace

// As mmap(2) and munmap(2) answer; mprotect(2) would succeed doing nothing.
TEST_CASE_FIXTURE(Arena64, "a zero length is EINVAL") {
    expect(failure_of([&] { arena.map(0, Prot::Read); }), EINVAL, {"usermm::Arena::map", "length"});
    expect(failure_of([&] { arena.map(0, Prot::Read, {.address = hole}); }), EINVAL, {"length", hex(hole)});
    expect(failure_of([&] { arena.protect(data, 0, Prot::Read); }), EINVAL,
           {"usermm::Arena::protect", "length", hex(data)});
    expect(failure_of([&] { arena.unmap(data, 0); }), EINVAL, {"usermm::Arena::unmap", "length", hex(data)});
    expect(failure_of([&] { arena.prefault(data, 0, Prot::Read); }), EINVAL,
           {"usermm::Arena::prefault", "length", hex(data)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "an address that is not page-aligned is EINVAL") {
    expect(failure_of([&] { arena.map(ps, Prot::Read, {.address = hole + 1}); }), EINVAL, {"addr", hex(hole + 1)});
    expect(failure_of([&] { arena.protect(data + 1, ps, Prot::Read); }), EINVAL, {"addr", hex(data + 1)});
    expect(failure_of([&] { arena.unmap(data + ps / 2, ps); }), EINVAL, {"addr", hex(data + ps / 2)});
    expect(failure_of([&] { arena.prefault(ro + ps - 1, 1, Prot::Read); }), EINVAL, {"addr", hex(ro + ps - 1)});
    check_unchanged();
}

// mprotect(2) says ENOMEM for addresses nothing maps; these are not the arena's to manage at all,
// like addresses past the user address space, for which munmap(2) says EINVAL.
TEST_CASE_FIXTURE(Arena64, "a range that is not all inside the arena is EINVAL") {
    // Below the base, at the end, and across the end: the last page is free, so only the part past
    // the end is wrong.
    for (auto [addr, length] : {std::pair{base - ps, ps}, {end, ps}, {end - ps, 2 * ps}, {base - ps, 2 * ps}}) {
        CAPTURE(hex(addr));
        CAPTURE(length);
        const std::initializer_list<std::string> parts = {"addr", hex(addr), "length", hex(length), "outside"};
        expect(failure_of([&] { arena.map(length, Prot::Read, {.address = addr}); }), EINVAL, parts);
        expect(failure_of([&] { arena.protect(addr, length, Prot::Read); }), EINVAL, parts);
        expect(failure_of([&] { arena.unmap(addr, length); }), EINVAL, parts);
        expect(failure_of([&] { arena.prefault(addr, length, Prot::None); }), EINVAL, parts);
    }
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "mapping over an existing VMA is EEXIST, like MAP_FIXED_NOREPLACE") {
    // Exactly over one, into one from below, around two, from the last page of one into the hole.
    for (auto [addr, length] :
         {std::pair{data, 8 * ps}, {data - 2 * ps, 3 * ps}, {data - ps, 14 * ps}, {ro + 3 * ps, 2 * ps}, {none, 1}}) {
        CAPTURE(hex(addr));
        expect(failure_of([&] { arena.map(length, Prot::ReadWrite, {.address = addr}); }), EEXIST,
               {"usermm::Arena::map", "addr", hex(addr), "length", hex(length), "overlaps"});
    }
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "a VMA may end where the next one begins and start where the previous one ends") {
    CHECK(arena.map(2 * ps, Prot::Read, {.address = data - 2 * ps}) == data - 2 * ps);
    CHECK(arena.map(12 * ps, Prot::Read, {.address = hole}) == hole);
    arena.verify();
    CHECK(arena.vmas().size() == 5);
}

TEST_CASE_FIXTURE(Arena64, "a length that overflows, alone or added to the address, is refused") {
    // The kernel says ENOMEM for mmap and mprotect and EINVAL for munmap; either is a fair answer.
    expect_one_of(failure_of([&] { arena.map(kMax, Prot::Read); }), {EINVAL, ENOMEM}, {"length", hex(kMax)});
    expect_one_of(failure_of([&] { arena.protect(data, kMax, Prot::Read); }), {EINVAL, ENOMEM},
                  {"length", hex(kMax), "addr", hex(data)});
    expect_one_of(failure_of([&] { arena.unmap(data, kMax); }), {EINVAL, ENOMEM},
                  {"length", hex(kMax), "addr", hex(data)});
    expect_one_of(failure_of([&] { arena.prefault(data, kMax, Prot::Read); }), {EINVAL, ENOMEM},
                  {"length", hex(kMax), "addr", hex(data)});

    // Page-aligned, below the overflow limit, and data + wrap is page 1 of the address space.
    const std::size_t wrap = kMax - reinterpret_cast<std::uintptr_t>(data) + 1 + ps;
    CAPTURE(hex(wrap));
    expect_one_of(failure_of([&] { arena.protect(data, wrap, Prot::Read); }), {EINVAL, ENOMEM},
                  {"length", hex(wrap), "addr", hex(data)});
    expect_one_of(failure_of([&] { arena.unmap(data, wrap); }), {EINVAL, ENOMEM},
                  {"length", hex(wrap), "addr", hex(data)});
    expect_one_of(failure_of([&] { arena.prefault(ro, wrap - 8 * ps, Prot::Read); }), {EINVAL, ENOMEM},
                  {"length", hex(wrap - 8 * ps), "addr", hex(ro)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "map: a length or window the arena cannot hold") {
    expect(failure_of([&] { arena.map(arena.size() + 1, Prot::Read); }), ENOMEM,
           {"usermm::Arena::map", "length", hex(arena.size() + 1)});
    // Free runs are 8, 12 and 28 pages long.
    expect(failure_of([&] { arena.map(29 * ps, Prot::Read); }), ENOMEM, {"usermm::Arena::map", "length", hex(29 * ps)});
    expect(failure_of([&] { arena.map(ps, Prot::Read, {.address = hole, .fault_around_pages = (1u << 20) + 1}); }),
           EINVAL, {"fault_around_pages", hex(hole)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "map: a length the arena cannot hold, at a fixed address, names both") {
    const std::size_t wrap = kMax - reinterpret_cast<std::uintptr_t>(hole) + 1 + ps;
    expect_one_of(failure_of([&] { arena.map(wrap, Prot::Read, {.address = hole}); }), {EINVAL, ENOMEM},
                  {"length", hex(wrap), "addr", hex(hole)});
    expect(failure_of([&] { arena.map(arena.size() + 1, Prot::Read, {.address = hole}); }), ENOMEM,
           {"length", hex(arena.size() + 1), "addr", hex(hole)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "unmap of a range with a hole is ENOMEM and unmaps nothing") {
    // munmap(2) would succeed on a hole; usermm documents that the range must lie inside VMAs, and
    // answers like mprotect(2).
    expect(failure_of([&] { arena.unmap(hole, ps); }), ENOMEM, {"usermm::Arena::unmap", "not mapped", hex(hole)});
    expect(failure_of([&] { arena.unmap(data, 13 * ps); }), ENOMEM, {"not mapped", hex(hole)});
    expect(failure_of([&] { arena.unmap(data - ps, 2 * ps); }), ENOMEM, {"not mapped", hex(data - ps)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "protect and prefault of a range with a hole inside are ENOMEM and change nothing") {
    // Unlike mprotect(2), which changes the VMAs before the hole and then fails.
    expect(failure_of([&] { arena.protect(data, 28 * ps, Prot::None); }), ENOMEM,
           {"usermm::Arena::protect", "not mapped", hex(hole)});
    expect(failure_of([&] { arena.protect(ro, 20 * ps, Prot::ReadWrite); }), ENOMEM, {"not mapped", hex(hole)});
    expect(failure_of([&] { arena.prefault(data, 13 * ps, Prot::Read); }), ENOMEM,
           {"usermm::Arena::prefault", "not mapped", hex(hole)});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "prefault of an access a VMA forbids is EACCES and prefaults nothing") {
    expect(failure_of([&] { arena.prefault(ro, 4 * ps, Prot::Write); }), EACCES,
           {"usermm::Arena::prefault", "addr", hex(ro), "'ro'"});
    // data allows the write and comes first; it must not be prefaulted either (stats say so).
    expect(failure_of([&] { arena.prefault(data, 12 * ps, Prot::ReadWrite); }), EACCES, {"addr", hex(ro), "'ro'"});
    expect(failure_of([&] { arena.prefault(ro + ps, ps, Prot::Exec); }), EACCES, {"addr", hex(ro + ps)});
    expect(failure_of([&] { arena.prefault(none, 4 * ps, Prot::Read); }), EACCES, {"addr", hex(none), "'none'"});
    check_unchanged();
}

TEST_CASE_FIXTURE(Arena64, "unknown prot bits are EINVAL") {
    expect(failure_of([&] { arena.map(ps, Prot(8)); }), EINVAL, {"usermm::Arena::map", "prot", "0x8"});
    expect(failure_of([&] { arena.map(ps, Prot(15), {.address = hole}); }), EINVAL, {"prot", "0xf", hex(hole)});
    expect(failure_of([&] { arena.protect(data, ps, Prot(8)); }), EINVAL,
           {"usermm::Arena::protect", "prot", "0x8", hex(data)});
    expect(failure_of([&] { arena.prefault(data, ps, Prot(0x10) | Prot::Read); }), EINVAL,
           {"usermm::Arena::prefault", "0x11", hex(data)});
    check_unchanged();
}

TEST_CASE("an arena of no bytes, or of more than the address space") {
    expect(failure_of([] { usermm::Arena a(0); }), EINVAL, {"usermm::Arena", "zero"});
    expect_one_of(failure_of([] { usermm::Arena a(kMax); }), {EINVAL, ENOMEM}, {"usermm::Arena", hex(kMax)});
    // 4 EiB: page-aligned and far beyond any user address space, so the reservation itself fails.
    expect(failure_of([] { usermm::Arena a(std::size_t(1) << 62); }), ENOMEM,
           {"usermm::Arena", hex(std::size_t(1) << 62)});
}
