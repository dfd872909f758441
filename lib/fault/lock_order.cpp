#include "lock_order.hpp"

#ifndef NDEBUG

#include <signal.h>

#include <cstddef>

#include "raw_log.hpp"

namespace usermm::detail {

namespace {

struct Held {
    const void* lock;
    LockRank rank;
    std::uintptr_t key;
};

// Deeper than any path nests (registry, arenas at fork, install), with room for the arenas fork
// takes all at once.
constexpr std::size_t kMaxHeld = 64;
// initial-exec: no __tls_get_addr (which may allocate) on the fault path.
__attribute__((tls_model("initial-exec"))) thread_local Held t_held[kMaxHeld];
__attribute__((tls_model("initial-exec"))) thread_local std::size_t t_count = 0;

const char* rank_name(LockRank r) {
    switch (r) {
        case LockRank::Registry:
            return "the arena registry's lock";
        case LockRank::Arena:
            return "an arena's lock";
        default:
            return "an arena's install lock";
    }
}

[[noreturn]] void inverted(const Held& held, LockRank rank, std::uintptr_t key) {
    RawLine d;
    d.str("usermm: lock order inverted: taking ").str(rank_name(rank)).str(" (key ").hex(key).str(") while holding ");
    d.str(rank_name(held.rank)).str(" (key ").hex(held.key).str("); the order is registry, arenas by base, install");
    d.emit();
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGABRT, &dfl, nullptr);
    for (;;) raise(SIGABRT);
}

}  // namespace

void lock_order_acquire(const void* lock, LockRank rank, std::uintptr_t key) {
    for (std::size_t i = 0; i < t_count; ++i) {
        const Held& h = t_held[i];
        if (h.rank > rank || (h.rank == rank && h.key >= key)) inverted(h, rank, key);
    }
    if (t_count < kMaxHeld) t_held[t_count++] = {lock, rank, key};
}

void lock_order_release(const void* lock) {
    for (std::size_t i = t_count; i-- > 0;)
        if (t_held[i].lock == lock) {
            for (std::size_t j = i + 1; j < t_count; ++j) t_held[j - 1] = t_held[j];
            --t_count;
            return;
        }
}

}  // namespace usermm::detail

#endif
