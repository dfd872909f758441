// Signal entry: the handlers usermm installs for SIGSEGV and SIGBUS.
#pragma once

namespace usermm::detail {

// API world. Installs the handlers once (SA_SIGINFO | SA_ONSTACK) and remembers the ones they
// replace, to which faults that are not usermm's are passed on. Returns 0, or an errno value with
// neither installed, so that a later call starts again from the program's own handlers.
int install_fault_handlers();

// Test hook (tests/test_fault_entry.cpp), the only way to reach a half-done install: no real
// condition makes sigaction(SIGBUS) fail once sigaction(SIGSEGV) has succeeded. When nonzero, the
// next install fails with this errno in place of installing the SIGBUS handler, and clears it.
extern int g_test_fail_sigbus_install;

}  // namespace usermm::detail
