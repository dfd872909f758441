// doctest's own SIGSEGV handler would sit in front of usermm's and report every demand-zero fault
// as a crash, so the test main turns it off.
#define DOCTEST_CONFIG_NO_POSIX_SIGNALS
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <dlfcn.h>
#include <signal.h>

#include <bit>
#include <cstdio>

namespace {

void* image_base(void* code) {
    Dl_info info{};
    return dladdr(code, &info) ? info.dli_fbase : nullptr;
}

// The signal whose handler lies in this executable at main, or 0. Nothing of the tests installs
// one during static initialisation, so such a handler is usermm's (linked in as a static library):
// something at namespace scope set the process up before main, which the tests of the process's
// set-up (test_process, test_foreign_faults, test_stats_at_exit) rely on nothing doing.
int signal_taken_before_main() {
    void* const self = image_base(std::bit_cast<void*>(&image_base));
    for (const int sig : {SIGSEGV, SIGBUS}) {
        struct sigaction sa {};
        if (sigaction(sig, nullptr, &sa) != 0 || sa.sa_handler == SIG_DFL || sa.sa_handler == SIG_IGN) continue;
        void* const handler = sa.sa_flags & SA_SIGINFO ? std::bit_cast<void*>(sa.sa_sigaction)
                                                       : std::bit_cast<void*>(sa.sa_handler);
        if (self && image_base(handler) == self) return sig;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (const int sig = signal_taken_before_main()) {
        std::fprintf(stderr, "%s: a %s handler of this program's own is installed before main: usermm was set up "
                     "during static initialisation (a call into usermm at namespace scope?)\n",
                     argc > 0 ? argv[0] : "test", sig == SIGSEGV ? "SIGSEGV" : "SIGBUS");
        return 1;
    }
    return doctest::Context(argc, argv).run();
}
