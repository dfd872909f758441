// Signal entry: the handlers usermm installs for SIGSEGV and SIGBUS.
#pragma once

namespace usermm::detail {

// API world. Installs the handlers once (SA_SIGINFO | SA_ONSTACK) and remembers the ones they
// replace, to which faults that are not usermm's are passed on. Returns 0 or an errno value.
int install_fault_handlers();

}  // namespace usermm::detail
