// Building blocks of the API world, shared by arena.cpp and snapshot.cpp: argument checks, page
// protection changes and VMA tree surgery. Unless a comment says otherwise they run with the
// arena's write lock held, so no fault is in flight and no PTE is locked.
#pragma once

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <new>
#include <string_view>
#include <vector>

#include "map_budget.hpp"
#include "page_ops_api.hpp"
#include "snapshot.hpp"
#include "swap_ops.hpp"
#include "vma.hpp"

namespace usermm::detail {

template <typename... Args>
[[noreturn]] void fail(int err, fmt::format_string<Args...> format, Args&&... args) {
    throw Error(err, fmt::format(format, std::forward<Args>(args)...));
}

// Blocks the asynchronous signals for a scope. A signal handler that touched arena memory while
// this thread holds an usermm lock or a snapshot slot would fault into something its own thread
// holds; the kernel, likewise, never runs a handler while it holds mmap_lock. Synchronous signals
// stay deliverable: blocking them would not stop them, only make the kernel kill the process.
inline sigset_t async_signals() {
    sigset_t all;
    sigfillset(&all);
    for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS}) sigdelset(&all, sig);
    return all;
}

class AsyncSignalsBlocked {
public:
    AsyncSignalsBlocked() {
        const sigset_t all = async_signals();
        pthread_sigmask(SIG_BLOCK, &all, &saved_);
    }
    ~AsyncSignalsBlocked() { pthread_sigmask(SIG_SETMASK, &saved_, nullptr); }
    AsyncSignalsBlocked(const AsyncSignalsBlocked&) = delete;
    AsyncSignalsBlocked& operator=(const AsyncSignalsBlocked&) = delete;

private:
    sigset_t saved_;
};

// An API call running on a usermm stack (a fiber's) could need a growth fault while it holds an
// arena's lock, which that fault takes too (behind a waiting writer: a deadlock; the write side: a
// fatal diagnostic). So the outermost usermm lock a thread takes is preceded by committing what
// the call may use below its stack pointer, the way Stack::ensure commits (in stack.cpp). Only
// threads whose stack pointer lies where usermm stacks have been made pay more than a compare.
void prepare_api_stack();
class ApiStackPrepared {
public:
    ApiStackPrepared() {
        if (t_depth++ == 0) prepare_api_stack();
    }
    ~ApiStackPrepared() { --t_depth; }
    ApiStackPrepared(const ApiStackPrepared&) = delete;
    ApiStackPrepared& operator=(const ApiStackPrepared&) = delete;

private:
    static inline thread_local unsigned t_depth = 0;
};

// Holds one of usermm's locks with the asynchronous signals blocked.
template <typename Guard>
class ApiGuard {
public:
    explicit ApiGuard(RwSpinLock& lock) : guard_(lock) {}
    ApiGuard(const ApiGuard&) = delete;
    ApiGuard& operator=(const ApiGuard&) = delete;

private:
    ApiStackPrepared stack_;       // before anything is held
    AsyncSignalsBlocked blocked_;  // restored after the lock is released
    Guard guard_;
};

// The environment's one rule for every USERMM_* variable: an empty value is no value, and a value
// usermm cannot use gets a one-line diagnostic on stderr and the default, as the kernel treats a
// bad boot parameter.
inline const char* environment_value(const char* name) {
    const char* v = std::getenv(name);
    return v && *v ? v : nullptr;
}
inline void environment_refused(const char* name, const char* value, const char* expected) {
    std::fprintf(stderr, "usermm: %s is '%s'; it must be %s: the default applies\n", name, value, expected);
}
// A switch: "1" or "0" sets *on, anything else is refused and leaves it.
inline void environment_switch(const char* name, bool* on) {
    const char* v = environment_value(name);
    if (!v) return;
    if ((v[0] == '0' || v[0] == '1') && v[1] == '\0')
        *on = v[0] == '1';
    else
        environment_refused(name, v, "'0' or '1'");
}

// Once per process: page size, handlers, map budget, fork handlers, USERMM_STATS.
void init_process();
// USERMM_TRACE (lib/api/trace.cpp), at the end of init_process.
void start_trace_from_environment();
// A random identity for an arena's snapshot chain (getrandom), in image.cpp.
std::array<std::uint64_t, 2> new_arena_identity();

// The arena behind an Arena object: a moved-from one has none, and every call on it says so.
inline ArenaCore& live_arena(const std::unique_ptr<ArenaCore>& core, const char* call) {
    if (!core) fail(EINVAL, "{}: the arena was moved from", call);
    return *core;
}

// Calls that may reach arena pages through /proc/self/mem (page_ops.hpp) check first that this
// process has a descriptor of its own: a forked child may have none (EMFILE at the fork), and a
// non-dumpable process cannot open one.
inline void require_self_mem(const char* call) {
    if (const int err = page_self_mem())
        fail(err, "{}: this process (pid {}) cannot open /proc/self/mem, through which usermm reaches arena pages", call,
             getpid());
}

inline std::uintptr_t addr_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
inline void* ptr_of(std::uintptr_t a) { return reinterpret_cast<void*>(a); }

// A validated, page-rounded byte range inside the arena.
struct Range {
    std::uintptr_t start;
    std::uintptr_t end;
};
// Where the kernel names anonymous memory (MapOptions::name): after restore() rebuilt the VMAs of
// `r`, the names of `gone` (anonymous VMAs it removed) are taken back and those of the VMAs now
// there given (arena.cpp).
void renew_kernel_names(ArenaCore& a, Range r, const std::vector<Range>& gone);

std::size_t round_up_length(const char* call, std::size_t length, std::uintptr_t addr, const char* name = "length");
Range check_range(const ArenaCore& a, const char* call, const void* addr, std::size_t length);
Prot check_prot(const char* call, Prot prot, std::uintptr_t addr);
// The VMAs covering r in order; throws if any byte of it is not mapped.
std::vector<Vma*> covering_vmas(ArenaCore& a, const char* call, Range r);
// Throws EINVAL if one of them is a stack VMA, which only its Stack changes (in stack.cpp).
void refuse_stack_vmas(const std::vector<Vma*>& vmas, const char* call);
// verify()'s part for stack VMAs: guard pages exactly below the committed part, in usermm and (on
// kernels whose pagemap shows guard markers) in the kernel. Under the write lock.
void verify_stacks(const ArenaCore& a, const char* call);

// The kernel's mappings overlapping [lo, hi), clipped to it, in address order: PROCMAP_QUERY where
// the kernel has it (a cost that grows with the mappings asked about, not with the process's), else
// one read of /proc/self/maps; the only reader of either.
struct KernelMapping {
    std::uintptr_t from;
    std::uintptr_t to;
    Prot prot;
    bool shared;
    std::uint64_t inode;   // of the file mapped, 0 for anonymous memory
    std::uint64_t dev;
    std::uint64_t offset;  // into the file, of `from`
    bool file() const { return inode != 0; }
};
// Throws (naming `call`) if the mappings cannot be read.
std::vector<KernelMapping> kernel_mappings(std::uintptr_t lo, std::uintptr_t hi, const char* call = "usermm");
// The kernel's mappings of pages [first, last) and one page on each side (within the arena).
std::vector<KernelMapping> mappings_around(const ArenaCore& a, std::size_t first, std::size_t last);
// After a change the PTEs cannot predict (a file mapped or unmapped at pages [first, last), the
// kernel's advice flags changed there): edge marks (kPteEdge) at the boundaries in and around the
// range where the kernel keeps neighbouring mappings apart whatever their protections, read from
// the kernel; and the arena's count changes by the mappings there now less `before`,
// mappings_around's count before the change. What lies across each end decides its mark:
enum class Across {
    Apart,  // another kernel mapping (each file VMA maps its own open file, anonymous pieces have
            // anon_vmas of their own), or the same one with other madvise flags: a boundary there
            // stays until the next settle_edges
    Same,   // the same mapping with the same flags: apart only where equal protections stay apart
};
void settle_edges(ArenaCore& a, std::size_t first, std::size_t last, long before, Across lo = Across::Apart,
                  Across hi = Across::Apart);
// In a forked child: edge marks at every boundary the kernel has, from `maps`, and the arena's
// count becomes the kernel's.
void inherit_edges(ArenaCore& a, const std::vector<KernelMapping>& maps);
// Pages [first, last) as the spans whose PTEs may be non-zero, in order: those whose page of the
// PTE table the kernel holds (present or swapped out, as /proc/self/pagemap says). A page of the
// table that was never touched is all zero, so the scans of the API world cost what was touched,
// not what is reserved. A short range is one span, without asking.
struct PageSpan {
    std::size_t first;
    std::size_t last;
};
std::vector<PageSpan> pte_spans(const ArenaCore& a, std::size_t first, std::size_t last);
// The same for any table in NORESERVE anonymous memory, by entry index: `table` is page-aligned and
// holds `entry_bytes`-byte entries, and an entry of a page the kernel never held is zero.
std::vector<PageSpan> held_spans(const void* table, std::size_t entry_bytes, std::size_t first, std::size_t last);
// Pages [first, last) of snapshot s (arena page indices) whose slots may be other than kSlotInArena.
std::vector<PageSpan> slot_spans(const SnapshotCore& s, std::size_t first, std::size_t last);
// Of sorted span lists: the pages in either (sorted, merged), the pages in both.
std::vector<PageSpan> span_union(std::vector<PageSpan> a, const std::vector<PageSpan>& b);
std::vector<PageSpan> span_intersection(const std::vector<PageSpan>& a, const std::vector<PageSpan>& b);
void resync_ptes(ArenaCore& a, std::size_t first, std::size_t last);
void clear_ptes(ArenaCore& a, Range r);
// Records that the populated pages of [first, last) are about to lose their content, for the next
// collect_dirty(): a discarded page has changed, though nothing wrote it.
void note_discarded(ArenaCore& a, std::size_t first, std::size_t last);
void preserve_range(ArenaCore& a, const char* call, Range r);
// Uffd engine: pages of r whose write access is withheld by a userfaultfd mark get it back now,
// after live snapshots took them (system calls writing into a marked page fail with EFAULT).
// Returns how many pages changed.
std::size_t unmark_tracked(ArenaCore& a, const char* call, Range r);

void set_name(Vma& v, std::string_view name);
// The only changes of an arena's set of VMAs: each puts a VMA into, or takes it out of, both the
// tree and the index (vma_index.hpp), so that neither is ever stale while the write lock is
// released. A VMA's end must not change between the two. vma_unlink returns the VMA after it.
void vma_link(ArenaCore& a, Vma& v);
VmaTree::iterator vma_unlink(ArenaCore& a, Vma& v);
void split_at(ArenaCore& a, std::uintptr_t at, std::unique_ptr<Vma>& spare);
void merge_range(ArenaCore& a, std::uintptr_t start, std::uintptr_t end);

// The two nodes a range's VMAs may need when split at both ends, allocated before the arena's
// lock is taken (so that nothing allocates, and can fail, half-way through a change).
struct SplitSpares {
    std::unique_ptr<Vma> lower = std::make_unique<Vma>();
    std::unique_ptr<Vma> upper = std::make_unique<Vma>();
};
void split_range(ArenaCore& a, Range r, SplitSpares& spares);
// A change of VMA attributes over r (protect, advice): the VMAs are split at both ends of r,
// change(v) runs for each VMA inside it, and neighbours merge again where the kernel would.
template <typename Change>
void change_vmas(ArenaCore& a, const char* call, Range r, SplitSpares& spares, Change change) {
    split_range(a, r, spares);
    for (Vma* v : covering_vmas(a, call, r)) change(*v);
    merge_range(a, r.start, r.end);
    a.last_hit.store(nullptr, std::memory_order_relaxed);
}
// The pages of r lose their content and access (unmap, DontNeed): live snapshots take what they
// still read from them, the kernel drops them, and their PTEs are cleared. Shared file pages must
// have been written back and their saved copies put back before (writeback_now,
// release_file_pages).
void discard_range(ArenaCore& a, const char* call, Range r);
bool range_free(ArenaCore& a, std::uintptr_t start, std::size_t len);
std::uintptr_t find_free(ArenaCore& a, std::uintptr_t hint, std::size_t len);

// Calls fn(first, last, key) for every maximal run of pages in [first, last) whose key(page) is the
// same, skipping pages whose key is kNoRun. The run loops of the API world all have this shape.
inline constexpr int kNoRun = -1;
template <typename Key, typename Fn>
void for_each_run(std::size_t first, std::size_t last, Key key, Fn fn) {
    for (std::size_t i = first; i < last;) {
        const int k = key(i);
        if (k == kNoRun) {
            ++i;
            continue;
        }
        std::size_t j = i + 1;
        while (j < last && key(j) == k) ++j;
        fn(i, j, k);
        i = j;
    }
}

// Asks the kernel for `prot` on pages [first, last) and charges the map budget for it. On a
// refusal (which may have changed a prefix of the range, or split a mapping it then left as it
// was) the PTEs, the edge marks of such splits and the arena's kernel-mapping count are re-read
// from the kernel; the PTEs of a success are the caller's to update. Returns 0 or the errno.
int protect_run(ArenaCore& a, std::size_t first, std::size_t last, Prot prot);
// protect_run, and on success the PTEs of the run take `prot`, keeping their flags (no dirty or
// populated bits set, unlike change_pages: for taking write access away).
int reprotect_run(ArenaCore& a, std::size_t first, std::size_t last, Prot prot);

// Where a new VMA goes: `want` if it is free (EEXIST otherwise), else the first free range of
// `len` bytes from the arena's hint. `length` is the caller's, for the message.
std::uintptr_t place_vma(ArenaCore& a, const char* call, std::uintptr_t want, std::size_t len, std::size_t length);
// Puts a new VMA into the tree at [start, start + len) and merges it with its neighbours.
void insert_vma(ArenaCore& a, Vma* vma, std::uintptr_t start, std::size_t len);

// Gives every page of [r.start, r.end) the protection change(old) and records it, one mprotect per
// run of pages that share their old protection. Pages that gain write access first give live
// snapshots what they need. Under the write lock, so no PTE is
// locked. If the kernel refuses partway, the PTEs are re-read from the kernel before the error is
// thrown.
// Page-aligned memory for `pages` pages: what a store may hand to O_DIRECT I/O as it is.
struct PageBuffer {
    struct Free {
        void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t(g_page_size)); }
    };
    std::unique_ptr<std::byte[], Free> bytes;
    explicit PageBuffer(std::size_t pages)
        : bytes(static_cast<std::byte*>(::operator new[](pages << g_page_shift, std::align_val_t(g_page_size)))) {}
    std::byte* data() const { return bytes.get(); }
};

// API world, under the write lock: the swapped-out pages of [first, last) are read back from the
// store (in memory again, still PROT_NONE, their store copies kept), so that a grant of access
// outside a fault never lands on a page the kernel holds nothing for. In reclaim.cpp.
void swap_in_for_grant(ArenaCore& a, const char* call, std::size_t first, std::size_t last);

template <typename Change>
std::size_t change_pages(ArenaCore& a, const char* call, Range r, Change change) {
    std::size_t changed = 0;
    auto prot_of = [&a](std::size_t i) { return int(pte_prot(a.pte[i].load(std::memory_order_relaxed))); };
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    // Untouched pages (zero PTEs) need nothing if the change leaves no access at no access.
    const std::vector<PageSpan> spans =
        change(Prot::None) == Prot::None ? pte_spans(a, first, last) : std::vector<PageSpan>{{first, last}};
    if (a.swap && change(Prot::None) != Prot::None) swap_in_for_grant(a, call, first, last);
    for (const PageSpan& span : spans) {
        for_each_run(span.first, span.last, prot_of, [&](std::size_t i, std::size_t j, int old) {
            const Prot next = change(Prot(old));
            if (next == Prot(old)) return;
            if (allows(next, Prot::Write)) preserve_range(a, call, {a.page_addr(i), a.page_addr(j)});
            if (const int err = protect_run(a, i, j, next))
                fail(err, "{}: mprotect of [{:#x}, {:#x}) to {} failed", call, a.page_addr(i), a.page_addr(j),
                     to_string(next));
            for (std::size_t k = i; k < j; ++k) {
                const pte_t v = a.pte[k].load(std::memory_order_relaxed);
                const pte_t now = pte_with_prot(v, next);
                if (a.swap && allows(next, Prot::Write)) {
                    swap_drop_copy(*a.swap, k);
                    if (k == i || k % kClusterPages == 0) swap_note_use(*a.swap, k);  // the reclaimer queues it
                }
                a.note_resident(v, now);
                a.pte[k].store(now, std::memory_order_relaxed);
                a.note_changed(k);
            }
            changed += j - i;
        });
    }
    return changed;
}

}  // namespace usermm::detail
