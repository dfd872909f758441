// Diagnostics from the fault world: a line is built in a fixed buffer on the stack and leaves with
// one write(2) to stderr, so that lines of different threads do not interleave.
#pragma once

#include <cstddef>
#include <cstdint>

namespace usermm::detail {

class RawLine {
public:
    RawLine& str(const char* s);
    RawLine& hex(std::uintptr_t v);
    RawLine& dec(std::uint64_t v);
    // Appends '\n' and writes the line to fd 2; the line is then empty, written or not. Long lines
    // are cut, never overrun.
    void emit();

private:
    char buf_[256];
    std::size_t len_ = 0;
};

}  // namespace usermm::detail
