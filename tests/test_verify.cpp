// verify() is the oracle of many tests (invariant 3: metadata agrees with the kernel), so it is
// tested itself: changes made behind usermm's back must be caught.
#include <doctest/doctest.h>

#include <sys/mman.h>

#include <usermm/usermm.hpp>

#include "page_ops_api.hpp"
#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

TEST_CASE("verify() catches a protection changed behind usermm's back") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(16 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    write_byte(p + 3 * ps, 1);
    arena.verify();
    SUBCASE("more than usermm granted") {
        REQUIRE(mprotect(p + 5 * ps, ps, PROT_READ) == 0);
        CHECK_THROWS_AS(arena.verify(), usermm::Error);
        REQUIRE(mprotect(p + 5 * ps, ps, PROT_NONE) == 0);
    }
    SUBCASE("less than usermm granted") {
        REQUIRE(mprotect(p + 3 * ps, ps, PROT_READ) == 0);
        CHECK_THROWS_AS(arena.verify(), usermm::Error);
        REQUIRE(mprotect(p + 3 * ps, ps, PROT_READ | PROT_WRITE) == 0);
    }
    arena.verify();
}

TEST_CASE("verify() catches a write-tracked page made writable behind usermm's back") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(16 * ps, Prot::ReadWrite));
    write_byte(p, 1);
    const usermm::Snapshot snap = arena.snapshot();
    arena.verify();
    const auto page = reinterpret_cast<std::uintptr_t>(p);
    // Each engine withholds write access its own way; each way is undone here.
    if (usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd) {
        REQUIRE(usermm::detail::uffd_write_protect(page, ps, false) == 0);
        CHECK_THROWS_AS(arena.verify(), usermm::Error);
        REQUIRE(usermm::detail::uffd_write_protect(page, ps, true) == 0);
    } else {
        REQUIRE(mprotect(p, ps, PROT_READ | PROT_WRITE) == 0);
        CHECK_THROWS_AS(arena.verify(), usermm::Error);
        REQUIRE(mprotect(p, ps, PROT_READ) == 0);
    }
    arena.verify();
}
