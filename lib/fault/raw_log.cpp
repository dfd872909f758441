#include "raw_log.hpp"

#include <unistd.h>

namespace usermm::detail {

RawLine& RawLine::str(const char* s) {
    while (*s && len_ < sizeof buf_ - 1) buf_[len_++] = *s++;
    return *this;
}

RawLine& RawLine::hex(std::uintptr_t v) {
    char tmp[2 + 2 * sizeof v];
    std::size_t n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    str("0x");
    while (n && len_ < sizeof buf_ - 1) buf_[len_++] = tmp[--n];
    return *this;
}

RawLine& RawLine::dec(std::uint64_t v) {
    char tmp[20];
    std::size_t n = 0;
    do {
        tmp[n++] = char('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && len_ < sizeof buf_ - 1) buf_[len_++] = tmp[--n];
    return *this;
}

void RawLine::emit() {
    buf_[len_++] = '\n';  // str, hex and dec leave room for it
    const char* p = buf_;
    std::size_t left = len_;
    // Spent whether or not it is written: a line kept after a failed write would take a second
    // '\n' one byte past the buffer.
    len_ = 0;
    while (left) {
        ssize_t n = write(2, p, left);
        if (n <= 0) return;  // EINTR included: a diagnostic is not worth a loop in a dying process
        p += n;
        left -= std::size_t(n);
    }
}

}  // namespace usermm::detail
