// The rules of the fault world.
//
// Everything reachable from the SIGSEGV/SIGBUS handler runs at an arbitrary instruction of an
// arbitrary thread: maybe inside malloc, maybe holding a lock of libc, maybe on a tiny alternate
// stack. Code in the fault world therefore:
//  - allocates nothing (no malloc, no operator new, no std::string, no containers that grow);
//  - takes no mutex and waits on nothing but the atomics of this library, and only on ones whose
//    holder cannot be waiting for this thread;
//  - throws nothing (the files build with -fno-exceptions) and calls nothing that may throw;
//  - calls only async-signal-safe functions: raw system calls, clock_gettime, write(2);
//  - preserves errno for the interrupted code (ErrnoSaver at the entry);
//  - writes diagnostics only through raw_log (write(2) from a fixed buffer), never stdio or fmt;
//  - keeps its stack small (well under MINSIGSTKSZ), since it may run on an alternate stack.
// The API world creates every piece of metadata a fault could need before a fault can need it.
#pragma once

#include <sched.h>

#include <cerrno>

namespace usermm::detail {

class ErrnoSaver {
public:
    ErrnoSaver() : saved_(errno) {}
    ~ErrnoSaver() { errno = saved_; }
    ErrnoSaver(const ErrnoSaver&) = delete;
    ErrnoSaver& operator=(const ErrnoSaver&) = delete;

private:
    int saved_;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield" ::: "memory");
#endif
}

// Waiting in the fault world: spin briefly, then yield, since the thread we wait for may be
// preempted on our core.
inline void spin_backoff(unsigned spins) {
    if (spins < 64)
        cpu_relax();
    else
        sched_yield();
}

}  // namespace usermm::detail
