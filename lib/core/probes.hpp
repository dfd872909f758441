// USDT probes (<sys/sdt.h>): the places `perf probe`, bpftrace and SystemTap can attach to, named
// usermm:NAME (README, "Observability"). Each is one nop in the code and a note in the ELF file
// (.note.stapsdt) saying where its arguments are; nothing runs unless a tool arms it, when the
// kernel's uprobe takes the trap without a signal. Probes without semaphores: a semaphore is a
// counter in .probes that the tool increments, and would be one more memory read on every fault
// for arguments that are already in registers. Async-signal-safe: they are fit for the fault world.
//
// Without <sys/sdt.h> (USERMM_PROBES undefined) a probe compiles to nothing.
#pragma once

#ifdef USERMM_PROBES
#define SDT_USE_VARIADIC 1
#include <sys/sdt.h>
#define USERMM_PROBE(name, ...) STAP_PROBEV(usermm, name, __VA_ARGS__)
#else
#define USERMM_PROBE(name, ...) ((void)0)
#endif

namespace usermm::detail {

// Runs `end` when the scope is left, also by an exception: an API call's *_end probe, and what
// measures the time a call holds a lock.
template <typename End>
struct AtScopeExit {
    End end;
    ~AtScopeExit() { end(); }
};
template <typename End>
AtScopeExit(End) -> AtScopeExit<End>;

}  // namespace usermm::detail
