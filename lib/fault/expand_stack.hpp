// expand_stack: a fault on a stack VMA's guard pages grows the stack or is an overflow; a fault
// outside every arena may be an overflow of a thread's own stack (watch_thread_stacks).
#pragma once

#include <atomic>
#include <cstdint>

#include "fault.hpp"
#include "stack.hpp"

namespace usermm::detail {

// A fault on a guard page (kPteGuard) of a stack VMA, not locked: commits the pages from the fault
// up to the committed part, plus the stack's headroom (Resolved, kind StackGrow), or fills
// vmf.overflow (StackOverflow) when the code running on the stack went past its end, or describes
// a wild access by code running elsewhere (AccessError). Under the arena's read lock.
FaultResult expand_stack(vm_fault& vmf);

// Commits [low, committed_low) of the stack (low clamped at its floor and rounded down to a page):
// guard markers removed (or PROT_NONE made Read+Write), the PTEs published populated. Under the
// arena's read lock, with no PTE of the range locked by the caller. Returns 0 or the errno of the
// kernel call (nothing changed then); *pages gets the pages committed. API world too (ensure).
int stack_commit(ArenaCore& arena, StackCore& stack, std::uintptr_t low, std::uint32_t* pages, std::uint32_t* copies);

// The overflow handler (on_stack_overflow), and whether thread stacks are watched.
inline std::atomic<StackOverflowHandler> g_overflow_handler{nullptr};
inline std::atomic<bool> g_watch_threads{false};
inline std::atomic<bool> g_stacks_made{false};  // a usermm stack has existed in this process
// The main thread's stack ([stack] in /proc/self/maps): its end, and the lowest address it may
// grow to (RLIMIT_STACK), recorded by watch_thread_stacks.
inline std::atomic<std::uintptr_t> g_main_stack_end{0};
inline std::atomic<std::uintptr_t> g_main_stack_limit{0};

// The guard below the alternate signal stack usermm gave this thread (install_signal_stack), so
// that its overflow (by an overflow handler, which runs there with SIGSEGV unblocked) is told
// apart: the kernel delivers that second SIGSEGV at the top of the alternate stack again, since
// the stack pointer has left it.
struct SignalStackGuard {
    std::uintptr_t lo;   // the guard [lo, hi)
    std::uintptr_t hi;   // the stack [hi, top)
    std::uintptr_t top;
};
extern thread_local constinit SignalStackGuard t_signal_stack_guard __attribute__((tls_model("initial-exec")));

// A fault outside every arena, with thread stacks watched: an overflow of the faulting thread's
// own stack (the main thread's [stack], or a pthread stack's guard) fills vmf.overflow and returns
// StackOverflow; so does a fault in the guard of this thread's alternate signal stack, watched or
// not (Where::SignalStack). Anything else stays Foreign. No lock.
FaultResult classify_thread_overflow(vm_fault& vmf);

}  // namespace usermm::detail
