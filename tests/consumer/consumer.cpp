#include <usermm/fmt.hpp>
#include <usermm/usermm.hpp>

int main() {
    usermm::Arena arena(1ull << 30);
    auto* p = static_cast<volatile char*>(arena.map(1 << 20, usermm::Prot::ReadWrite, {.name = "consumer"}));
    p[0] = 42;
    const usermm::Stats s = arena.stats();
    fmt::print("consumer: {} minor fault(s), byte {}\n", s.minor_faults, int(p[0]));
    return s.minor_faults == 1 && p[0] == 42 ? 0 : 1;
}
