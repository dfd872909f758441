// expand_stack, as mm/mmap.c's: a fault just below a stack's committed part commits pages, one
// further down or past the stack's floor is an overflow (or a wild access), never a silent grant.
// A usermm stack is a Read+Write VMA whose uncommitted part and permanent guard carry guard
// markers (or are PROT_NONE, the fallback): growth removes markers and moves an atomic floor,
// under a lock of the stack's own, so that a growing stack never waits for the tree's writers or
// for another stack's thread.
#include "expand_stack.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "fault_world.hpp"
#include "map_budget.hpp"
#include "page_ops.hpp"
#include "procmap.hpp"
#include "snapshot.hpp"

namespace usermm::detail {

namespace {

constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;
constexpr auto kRelaxed = std::memory_order_relaxed;

std::uintptr_t page_down(std::uintptr_t a) { return a & ~(std::uintptr_t(g_page_size) - 1); }

// The stack's own lock, for growth.
class GrowGuard {
public:
    explicit GrowGuard(StackCore& s) : s_(s) {
        for (unsigned spins = 0; s_.growing.exchange(true, kAcquire); ++spins) spin_backoff(spins);
    }
    ~GrowGuard() { s_.growing.store(false, kRelease); }
    GrowGuard(const GrowGuard&) = delete;
    GrowGuard& operator=(const GrowGuard&) = delete;

private:
    StackCore& s_;
};

void lower_to(std::atomic<std::uintptr_t>& v, std::uintptr_t to) {
    std::uintptr_t cur = v.load(kRelaxed);
    while (to < cur && !v.compare_exchange_weak(cur, to, kRelaxed)) {}
}

// The copy an overflow report carries: everything read now, under the arena's read lock, so that
// the handler can run after it is released (and leave by siglongjmp).
void fill_overflow(const vm_fault& vmf, const StackCore& s) {
    StackOverflow& o = *vmf.overflow;
    o.where = StackOverflow::Where::Stack;
    o.id = s.id;
    o.address = reinterpret_cast<const void*>(vmf.address);
    o.sp = reinterpret_cast<const void*>(vmf.sp);
    o.low = reinterpret_cast<const void*>(s.floor);
    o.high = reinterpret_cast<const void*>(s.end);
    o.peak = s.end - s.lowest.load(kRelaxed);
    std::memcpy(o.name_buf, s.name, std::min(sizeof o.name_buf, sizeof s.name));
    o.name_buf[sizeof o.name_buf - 1] = 0;
}

}  // namespace

// Locks the guard pages of [low, committed_low) (nobody else locks guard pages but a grower of
// the same stack, which holds `growing`: no reclaimer runs in an arena with stacks, map_stack
// refuses one with a store), makes the kernel grant them, and publishes them populated with the
// VMA's Read+Write. Pages that gain write access give live snapshots their old content first
// (none: a guard page reads as zeros).
int stack_commit(ArenaCore& arena, StackCore& s, std::uintptr_t low, std::uint32_t* pages, std::uint32_t* copies) {
    *pages = 0;
    low = std::max(page_down(low), s.floor);
    GrowGuard grow(s);
    const std::uintptr_t top = s.committed_low.load(kAcquire);
    if (low >= top) return 0;
    const std::size_t first = arena.page_index(low), last = arena.page_index(top);
    for (std::size_t i = first; i < last; ++i)
        for (unsigned spins = 0; arena.pte[i].fetch_or(kPteLocked, kAcquire) & kPteLocked; ++spins) spin_backoff(spins);
    auto unlock = [&] {
        for (std::size_t i = first; i < last; ++i) arena.pte[i].fetch_and(pte_t(~kPteLocked), kRelease);
    };
    if (arena.snapshot_count)
        for (std::size_t i = first; i < last; ++i)
            if (const int err = preserve_for_snapshots(arena, i, pte_t(arena.pte[i].load(kRelaxed) & ~kPteLocked), copies)) {
                unlock();
                return err;
            }
    const std::size_t len = (last - first) << g_page_shift;
    if (s.markers) {
        if (const int err = page_guard_remove(low, len)) {
            unlock();
            return err;
        }
    } else {
        // The boundary between the PROT_NONE part and the committed one moves: the count stays,
        // but it is counted under the install lock like every other change of protection.
        std::lock_guard guard(arena.install_lock);
        const long delta = map_count_delta(arena, first, last, Prot::ReadWrite);
        if (const int err = page_protect(low, len, Prot::ReadWrite)) {
            unlock();
            return err;
        }
        map_budget_charge(arena, delta);
    }
    for (std::size_t i = first; i < last; ++i) {
        const pte_t old = pte_t(arena.pte[i].load(kRelaxed) & ~kPteLocked);
        const pte_t now = pte_with_prot(old, Prot::ReadWrite);
        arena.note_resident(old, now);
        arena.pte[i].store(now, kRelease);
    }
    arena.note_changed(first, last);
    s.committed_low.store(low, kRelease);
    lower_to(s.lowest, low);
    g_stack_gauges.committed_pages.fetch_add(std::int64_t(last - first), kRelaxed);
    *pages = std::uint32_t(last - first);
    return 0;
}

FaultResult expand_stack(vm_fault& vmf) {
    StackCore& s = *vmf.vma->stack;
    const std::uintptr_t page = page_down(vmf.address);
    const std::uintptr_t committed = s.committed_low.load(kAcquire);
    if (page >= committed) return FaultResult::Spurious;  // another thread grew it meanwhile
    const bool on_stack = vmf.sp >= s.start && vmf.sp < s.end;
    const bool grows = page >= s.floor && (committed - page <= s.gap || (on_stack && vmf.address + kStackPointerReach >= vmf.sp));
    if (!grows) {
        if (!on_stack || !vmf.overflow) return FaultResult::AccessError;  // described by describe_access_error
        fill_overflow(vmf, s);
        g_stack_gauges.overflows.fetch_add(1, kRelaxed);
        return FaultResult::StackOverflow;
    }
    const std::uintptr_t headroom = std::uintptr_t(s.headroom_pages) << g_page_shift;
    const std::uintptr_t low = page - s.floor > headroom ? page - headroom : s.floor;
    std::uint32_t pages = 0;
    if (const int err = stack_commit(*vmf.arena, s, low, &pages, &vmf.copies)) {
        if (vmf.diag)
            vmf.diag->str("usermm: growing stack '").str(s.name).str("' to ").hex(low).str(" failed, errno ").dec(std::uint64_t(err));
        return FaultResult::Fatal;
    }
    if (!pages) return FaultResult::Spurious;
    // The faulting page is written the moment the fault returns: allocated now, in the same system
    // call's neighbourhood, it spares the retried write the kernel's own fault (an exception more,
    // the dearer part on a VM). A failure leaves that to the retried write.
    if (vmf.access == Access::Write) page_populate(page, g_page_size);
    lower_to(s.deepest, page);
    g_stack_gauges.growth_faults.fetch_add(1, kRelaxed);
    vmf.kind = FaultKind::StackGrow;
    vmf.pages = pages;
    return FaultResult::Resolved;
}

thread_local constinit SignalStackGuard t_signal_stack_guard __attribute__((tls_model("initial-exec"))) = {0, 0, 0};

namespace {

struct MapsEntry {
    std::uintptr_t start, end;
    std::uint64_t flags;
};

// The kernel's mapping covering `addr`, or the next one above it.
bool query_covering_or_next(int fd, std::uintptr_t addr, MapsEntry* out) {
    ProcmapQuery q{};
    q.size = sizeof q;
    q.query_flags = kQueryCoveringOrNext;
    q.query_addr = addr;
    if (ioctl(fd, kProcmapQuery, &q) != 0) return false;
    *out = {std::uintptr_t(q.vma_start), std::uintptr_t(q.vma_end), q.vma_flags};
    return true;
}

FaultResult thread_overflow(vm_fault& vmf, StackOverflow::Where where, std::uintptr_t low, std::uintptr_t high) {
    StackOverflow& o = *vmf.overflow;
    o.where = where;
    o.id = 0;
    o.address = reinterpret_cast<const void*>(vmf.address);
    o.sp = reinterpret_cast<const void*>(vmf.sp);
    o.low = reinterpret_cast<const void*>(low);
    o.high = reinterpret_cast<const void*>(high);
    o.peak = 0;  // not known for thread stacks
    static constexpr char kMain[] = "main thread", kThread[] = "thread", kSignal[] = "alternate signal stack";
    if (where == StackOverflow::Where::MainThread)
        std::memcpy(o.name_buf, kMain, sizeof kMain);
    else if (where == StackOverflow::Where::Thread)
        std::memcpy(o.name_buf, kThread, sizeof kThread);
    else
        std::memcpy(o.name_buf, kSignal, sizeof kSignal);
    g_stack_gauges.overflows.fetch_add(1, kRelaxed);
    return FaultResult::StackOverflow;
}

}  // namespace

// The main thread's stack is the kernel's grow-down [stack] mapping: a fault below it that the
// kernel refused to grow into (RLIMIT_STACK, or a neighbour within stack_guard_gap) lies in the
// gap under it, with the stack pointer at most kStackPointerReach above. A pthread stack (glibc,
// musl) is one mapping whose lowest part is a PROT_NONE guard, a kernel mapping of its own: an
// overflow lands in it, with the stack pointer in the guard or in the stack just above. The stack
// pointer makes it the faulting thread's own stack: a wild pointer into someone's guard is not.
FaultResult classify_thread_overflow(vm_fault& vmf) {
    if (!vmf.overflow) return FaultResult::Foreign;
    if (vmf.address >= t_signal_stack_guard.lo && vmf.address < t_signal_stack_guard.hi)
        return thread_overflow(vmf, StackOverflow::Where::SignalStack, t_signal_stack_guard.hi, t_signal_stack_guard.top);
    if (!g_watch_threads.load(kRelaxed) || !vmf.sp) return FaultResult::Foreign;
    // Opened for each fault: a forked child's /proc/self is its own only when opened there.
    const int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return FaultResult::Foreign;
    FaultResult r = FaultResult::Foreign;
    MapsEntry v{}, w{};
    const std::uintptr_t a = vmf.address, sp = vmf.sp;
    const std::uintptr_t main_end = g_main_stack_end.load(kRelaxed);
    if (query_covering_or_next(fd, a, &v)) {
        // The overflowing access is a push below the stack pointer, or a store into a frame just
        // allocated above it (sub rsp first): both with the stack pointer below the stack's end.
        if (v.end == main_end && a < v.start && sp < main_end && a + kStackPointerReach >= sp)
            r = thread_overflow(vmf, StackOverflow::Where::MainThread, g_main_stack_limit.load(kRelaxed), main_end);
        else if (v.start <= a && !(v.flags & (kQueryReadable | kQueryWritable | kQueryExecutable)) &&
                 query_covering_or_next(fd, v.end, &w) && w.start == v.end && (w.flags & kQueryWritable) &&
                 sp >= v.start && sp < w.end)
            r = thread_overflow(vmf, StackOverflow::Where::Thread, w.start, w.end);
    }
    close(fd);
    return r;
}

}  // namespace usermm::detail
