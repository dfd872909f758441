// The kernel's limits on mappings, met head-on: usermm's count of the kernel mappings an arena
// consists of is exact (verify() compares it with /proc/self/maps), and a kernel that refuses
// another mapping (vm.max_map_count, used up by usermm or by the program itself) makes faults
// degrade, never die, while anything can be done.
#include <doctest/doctest.h>

#include <sys/mman.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "map_budget.hpp"
#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

TEST_CASE("verify() compares usermm's count of kernel mappings with the kernel's") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.fault_around_pages = 16}));
    write_byte(p, 1);  // pages [0, 16) become writable: the arena is two kernel mappings
    arena.verify();
    // A VMA flag the protections cannot show splits the kernel mapping in three behind usermm's back.
    REQUIRE(madvise(p + 4 * ps, ps, MADV_DONTDUMP) == 0);
    try {
        arena.verify();
        FAIL("verify() passed with a kernel mapping usermm does not know of");
    } catch (const usermm::Error& e) {
        const std::string what = e.what();
        INFO(what);
        CHECK(what.find("the kernel has 4 mappings") != std::string::npos);
        CHECK(what.find("usermm counts 2") != std::string::npos);
    }
    REQUIRE(madvise(p + 4 * ps, ps, MADV_DODUMP) == 0);  // the kernel merges the pieces again
    arena.verify();
}

TEST_CASE("the count stays exact in a forked child, where pieces split after the fork merge again") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(1024 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    for (std::size_t i = 0; i < 1024; i += 64) write_byte(p + i * ps, std::uint8_t(i));
    arena.verify();
    const ChildEnd end = run_in_child([&] {
        arena.verify();
        // New pieces in the child: a write in the middle of a PROT_NONE piece splits it in three,
        // and taking the page's access away again merges them (they share the child's anon_vma).
        write_byte(p + 32 * ps, 7);
        arena.verify();
        arena.protect(p + 32 * ps, ps, Prot::None);
        arena.verify();
        arena.protect(p + 32 * ps, ps, Prot::ReadWrite);
        // The pieces inherited from the parent never merge, whatever their protections become.
        arena.protect(p, 1024 * ps, Prot::Read);
        arena.verify();
        if (read_byte(p + 64 * ps) != 64) std::_Exit(3);
    });
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
    arena.verify();
}
