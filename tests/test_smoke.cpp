#include <doctest/doctest.h>
#include <usermm/usermm.hpp>
#include <usermm/fmt.hpp>

TEST_CASE("smoke") {
    usermm::Arena arena(64ull << 30);
    auto* p = static_cast<volatile char*>(arena.map(1ull << 30, usermm::Prot::ReadWrite, {.name = "heap"}));
    CHECK(p[0] == 0);
    p[4096 * 100] = 5;
    CHECK(p[4096 * 100] == 5);
    arena.verify();
    fmt::print("{}", arena.stats());
}
