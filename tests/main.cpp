// doctest's own SIGSEGV handler would sit in front of usermm's and report every demand-zero fault
// as a crash, so the test main turns it off.
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
