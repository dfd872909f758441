// USERMM_STATS=1 prints the process's counters to stderr at exit. The variable is read when the
// process creates its first arena, so the check runs in a child of a process that has none.
#include <doctest/doctest.h>

#include <cstdlib>
#include <regex>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;

TEST_CASE("USERMM_STATS=1 prints the process's stats at exit") {
    const ChildEnd end = run_in_child([] {
        setenv("USERMM_STATS", "1", 1);
        usermm::Arena arena(1ull << 30);
        char* p = static_cast<char*>(arena.map(8 * usermm::page_size(), usermm::Prot::ReadWrite));
        write_byte(p, 1);
        std::exit(0);  // runs atexit handlers, unlike the helper's _exit
    });
    CHECK(end.exit_code == 0);
    CHECK(end.err.find("usermm process stats") != std::string::npos);
    CHECK(std::regex_search(end.err, std::regex("\n  minor_faults +1  ")));
    CHECK(std::regex_search(end.err, std::regex("\n  fault_around_pages +7  ")));
}

TEST_CASE("without USERMM_STATS nothing is printed") {
    const ChildEnd end = run_in_child([] {
        unsetenv("USERMM_STATS");
        usermm::Arena arena(1ull << 30);
        write_byte(arena.map(usermm::page_size(), usermm::Prot::ReadWrite), 1);
        std::exit(0);
    });
    CHECK(end.exit_code == 0);
    CHECK(end.err.empty());
}
