// Signal entry: the only code that sees siginfo_t and the hardware context. It saves errno, hands
// the fault to handle_mm_fault, and returns to retry the instruction when the fault was ours.
// Everything else leaves the way the kernel would have treated it: to the handler that was
// installed before usermm's, or to the signal's default action (death, with a one-line reason).
#include "fault_entry.hpp"

#include <pthread.h>
#include <signal.h>
#include <ucontext.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <utility>

#include "account.hpp"
#include "decode.hpp"
#include "expand_stack.hpp"
#include "fault.hpp"
#include "fault_world.hpp"
#include "page_ops.hpp"
#include "pte.hpp"
#include "raw_log.hpp"

namespace usermm::detail {

namespace {

// The handlers usermm replaced, written once before its own are installed.
struct sigaction g_previous_segv;
struct sigaction g_previous_bus;
std::atomic<bool> g_installed{false};


const char* signal_name(int sig) { return sig == SIGBUS ? "SIGBUS" : "SIGSEGV"; }

// A fault on a page whose PTE already allows the access is spurious: another thread resolved it
// between the trap and the handler, and the retried access succeeds. If it faults again and again,
// the kernel's protection is not the PTE's: the program changed it behind usermm's back (its own
// mprotect, munmap or MAP_FIXED mmap on arena memory), and retrying would loop forever. A real
// race cannot lose this often in a row: each loss needs another thread to change the same page
// in between, which changes its PTE. Per thread, reset by every resolved fault, every fault on
// another page and every spurious fault that finds the page's PTE changed since the last one.
constexpr std::uint32_t kSpuriousLimit = 1000;
struct SpuriousRun {
    std::uintptr_t page;
    std::uint32_t count;
    pte_t pte;
};
thread_local constinit SpuriousRun t_spurious __attribute__((tls_model("initial-exec"))) = {0, 0, 0};

// True when this spurious fault is one too many in a row on its page, all with the same PTE.
bool spurious_loop(std::uintptr_t addr, pte_t pte) {
    const std::uintptr_t page = addr & ~(std::uintptr_t(g_page_size) - 1);
    if (t_spurious.page != page || t_spurious.pte != pte) t_spurious = {page, 0, pte};
    if (++t_spurious.count < kSpuriousLimit) return false;
    t_spurious.count = 0;
    return true;
}

struct sigaction& previous(int sig) { return sig == SIGBUS ? g_previous_bus : g_previous_segv; }

// The kernel's default action for SIGSEGV and SIGBUS: terminate with a core dump. The signal is sent
// again and stays pending until this handler returns; it is then delivered at the interrupted
// instruction, whether or not that instruction would fault again.
void die_by(int sig) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    raise(sig);
}

// The previous handler, read once. The kernel resets a one-shot (SA_RESETHAND) handler to SIG_DFL
// as it delivers the signal: of two threads that fault at once, one runs it and the other gets the
// default action. An ignored signal is not delivered, so SIG_IGN is not reset.
struct sigaction take_previous(int sig) {
    struct sigaction& prev = previous(sig);
    std::atomic_ref<void (*)(int)> slot(prev.sa_handler);
    struct sigaction taken {};
    taken.sa_flags = prev.sa_flags;  // the flags and the mask never change once installed
    taken.sa_mask = prev.sa_mask;
    taken.sa_handler = slot.load();
    if ((unsigned(taken.sa_flags) & unsigned(SA_RESETHAND)) && taken.sa_handler != SIG_DFL && taken.sa_handler != SIG_IGN)
        taken.sa_handler = slot.exchange(SIG_DFL);
    return taken;
}

// Runs the previous handler as the kernel would have: with the interrupted code's mask plus the
// handler's sa_mask plus the signal itself (unless SA_NODEFER).
void call_previous(int sig, const struct sigaction& handler, siginfo_t* info, void* ucontext) {
    sigset_t mask = static_cast<const ucontext_t*>(ucontext)->uc_sigmask, ours;
    for (int s = 1; s < NSIG; ++s)
        if (sigismember(&handler.sa_mask, s) == 1) sigaddset(&mask, s);
    if (handler.sa_flags & SA_NODEFER)
        sigdelset(&mask, sig);
    else
        sigaddset(&mask, sig);
    pthread_sigmask(SIG_SETMASK, &mask, &ours);
    if (handler.sa_flags & SA_SIGINFO)
        handler.sa_sigaction(sig, info, ucontext);
    else
        handler.sa_handler(sig);
    pthread_sigmask(SIG_SETMASK, &ours, nullptr);
}

// Passes a fault usermm does not resolve to whoever would have had it without usermm.
void pass_on(int sig, siginfo_t* info, void* ucontext, RawLine& reason) {
    const struct sigaction prev = take_previous(sig);
    const bool sent = info->si_code <= 0;  // kill(2), sigqueue(3), tgkill(2): not a fault
    // sa_handler and sa_sigaction share storage: SIG_DFL and SIG_IGN mean the same whatever the flags.
    if (prev.sa_handler == SIG_IGN) {
        if (sent) return;  // an ignored signal that was sent is dropped; a fault cannot be ignored
    } else if (prev.sa_handler != SIG_DFL) {
        call_previous(sig, prev, info, ucontext);
        return;
    }
    reason.emit();
    die_by(sig);
}

// An overflow goes to the program's handler first (no lock is held now: it may leave by
// siglongjmp), with the interrupted code's mask, so that it may fault on arena memory itself. If
// it returns, or there is none, the overflow is treated as the kernel treats one: `reason` gets
// the line, and the signal goes on.
void report_overflow(const StackOverflow& o, void* ucontext, RawLine& reason) {
    if (const StackOverflowHandler handler = g_overflow_handler.load(std::memory_order_acquire)) {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &static_cast<const ucontext_t*>(ucontext)->uc_sigmask, nullptr);
        handler(o);
        pthread_sigmask(SIG_SETMASK, &all, nullptr);
    }
    auto at = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
    reason.str("usermm: SIGSEGV: stack overflow at ").hex(at(o.address)).str(" (stack pointer ").hex(at(o.sp));
    if (o.where == StackOverflow::Where::Stack)
        reason.str(") on stack '").str(o.name_buf).str("' id ").dec(o.id);
    else
        reason.str(") on the ").str(o.name_buf).str("'s stack");
    reason.str(" [").hex(at(o.low)).str(", ").hex(at(o.high)).str(")");
}

// The alternate signal stack overflowed (an overflow handler went too deep): this handler runs at
// its top again, over the frames below, so nothing of them and no handler may run: one line, death.
void die_of_signal_stack_overflow(int sig, const StackOverflow& o, RawLine& reason) {
    const auto bytes = std::uint64_t(reinterpret_cast<std::uintptr_t>(o.high) - reinterpret_cast<std::uintptr_t>(o.low));
    reason.str("usermm: SIGSEGV: the alternate signal stack overflowed at ").hex(reinterpret_cast<std::uintptr_t>(o.address));
    reason.str(" (a stack overflow handler, or a signal handler, used more than its ").dec(bytes).str(" bytes)");
    reason.emit();
    die_by(sig);
}

extern "C" void usermm_fault_handler(int sig, siginfo_t* info, void* ucontext) {
    ErrnoSaver saved_errno;
    RawLine reason;
    vm_fault vmf;
    vmf.signo = sig;
    vmf.address = reinterpret_cast<std::uintptr_t>(info->si_addr);
    if (info->si_code <= 0) {
        account_fault(vmf, FaultResult::Foreign);
        reason.str("usermm: ").str(signal_name(sig)).str(" sent by pid ").dec(std::uint64_t(info->si_pid));
        pass_on(sig, info, ucontext, reason);
        return;
    }
    vmf.start_ns = now_ns();
    vmf.access = decode_access(ucontext);
    vmf.sp = decode_sp(ucontext);
    StackOverflow overflow;
    vmf.overflow = &overflow;
    vmf.diag = &reason;
    switch (handle_mm_fault(vmf)) {
        case FaultResult::Resolved:
            t_spurious.count = 0;
            return;
        case FaultResult::Spurious:
            if (!spurious_loop(vmf.address, vmf.pte_seen)) return;
            // Whatever made the kernel refuse the access was not usermm: what the kernel does with
            // such a fault happens now.
            reason.str("usermm: ").str(signal_name(sig)).str(" at ").hex(vmf.address).str(": ");
            reason.dec(kSpuriousLimit).str(" faults in a row for an access usermm had granted: the page's protection");
            reason.str(" was changed outside usermm (verify() names the page)");
            pass_on(sig, info, ucontext, reason);
            return;
        case FaultResult::Foreign:
            reason.str("usermm: ").str(signal_name(sig)).str(" at ").hex(vmf.address).str(": not in any arena");
            pass_on(sig, info, ucontext, reason);
            return;
        case FaultResult::AccessError:
            pass_on(sig, info, ucontext, reason);
            return;
        case FaultResult::BusError: {
            // The access trapped as SIGSEGV (the page is PROT_NONE) but means what the kernel
            // reports as SIGBUS for a file mapping: no data behind the address.
            siginfo_t bus = *info;
            bus.si_signo = SIGBUS;
            bus.si_code = BUS_ADRERR;
            pass_on(SIGBUS, &bus, ucontext, reason);
            return;
        }
        case FaultResult::StackOverflow:
            if (overflow.where == StackOverflow::Where::SignalStack) {
                die_of_signal_stack_overflow(sig, overflow, reason);
                return;
            }
            report_overflow(overflow, ucontext, reason);
            pass_on(sig, info, ucontext, reason);
            return;
        case FaultResult::Fatal:
            // A fault usermm owns but cannot resolve: retrying would loop forever.
            if (const int err = page_self_mem())
                reason.str(" (this process cannot open /proc/self/mem, errno ").dec(std::uint64_t(err))
                    .str(", through which usermm reads pages it cannot touch)");
            reason.emit();
            die_by(sig);
            return;
    }
}

int install_sigbus(const struct sigaction& sa) {
    if (const int err = std::exchange(g_test_fail_sigbus_install, 0)) return err;
    return sigaction(SIGBUS, &sa, &g_previous_bus) == 0 ? 0 : errno;
}

}  // namespace

int g_test_fail_sigbus_install = 0;

int install_fault_handlers() {
    if (g_installed.exchange(true)) return 0;
    struct sigaction sa {};
    sa.sa_sigaction = usermm_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    // Nothing asynchronous may interrupt a resolution: a handler that touched arena memory would
    // find the page locked by its own thread, or the read lock behind a waiting writer.
    sigfillset(&sa.sa_mask);
    int err = sigaction(SIGSEGV, &sa, &g_previous_segv) == 0 ? 0 : errno;
    if (!err && (err = install_sigbus(sa)) != 0)
        // Left half installed, a retry would record usermm's own handler as SIGSEGV's previous one,
        // and pass_on would pass a foreign fault on to itself until the stack ran out.
        sigaction(SIGSEGV, &g_previous_segv, nullptr);
    if (err) g_installed.store(false);
    return err;
}

}  // namespace usermm::detail
