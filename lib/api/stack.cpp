// Stacks: map_stack, Stack, StackPool, the overflow handler, alternate signal stacks and the watch
// on thread stacks. The fault world's part is fault/expand_stack.cpp.
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "dirty_async.hpp"
#include "account.hpp"
#include "arena_ops.hpp"
#include "expand_stack.hpp"
#include "file_vma.hpp"
#include "find_vma.hpp"
#include "page_ops.hpp"
#include "stack.hpp"

namespace usermm {

using namespace detail;

namespace {

void ensure_signal_stack();

constexpr auto kRelaxed = std::memory_order_relaxed;

std::atomic<std::uint64_t> g_next_stack_id{1};

std::size_t round_pages(std::size_t n) { return (n + g_page_size - 1) & ~(g_page_size - 1); }

bool markers_work() {
    static const bool works = [] {
        const std::size_t len = 2 * g_page_size;
        void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        const bool ok = page_guard_install(addr_of(p), g_page_size) == 0;
        munmap(p, len);
        return ok;
    }();
    return works;
}

// What GuardMode::Auto means in this process: USERMM_STACK_GUARDS (read once, with the rule of
// the other variables: a value usermm cannot use is reported and the default applies; one it
// cannot honour fails), else what the kernel has.
GuardMode auto_mode(const char* call) {
    enum class Wanted { Default, Markers, ProtNone };
    static const Wanted wanted = [] {
        const char* v = std::getenv("USERMM_STACK_GUARDS");
        if (!v || !*v) return Wanted::Default;
        if (std::strcmp(v, "markers") == 0) return Wanted::Markers;
        if (std::strcmp(v, "protnone") == 0) return Wanted::ProtNone;
        std::fprintf(stderr, "usermm: USERMM_STACK_GUARDS is '%s'; it must be 'markers' or 'protnone': the default applies\n", v);
        return Wanted::Default;
    }();
    if (wanted == Wanted::ProtNone) return GuardMode::ProtNone;
    if (wanted == Wanted::Markers && !markers_work())
        fail(ENOTSUP, "{}: USERMM_STACK_GUARDS=markers, but this kernel has no MADV_GUARD_INSTALL (Linux 6.13)", call);
    return markers_work() ? GuardMode::Markers : GuardMode::ProtNone;
}

GuardMode resolve_mode(GuardMode asked, const char* call) {
    if (asked == GuardMode::Auto) return auto_mode(call);
    if (asked == GuardMode::Markers && !markers_work())
        fail(ENOTSUP, "{}: GuardMode::Markers, but this kernel has no MADV_GUARD_INSTALL (Linux 6.13)", call);
    if (unsigned(asked) > unsigned(GuardMode::ProtNone)) fail(EINVAL, "{}: guard_mode {} is unknown", call, unsigned(asked));
    return asked;
}

std::uintptr_t current_sp() { return addr_of(__builtin_frame_address(0)); }

}  // namespace

namespace {
// Where usermm stacks have ever been made: a thread whose stack pointer lies outside needs nothing.
std::atomic<std::uintptr_t> g_stacks_low{~std::uintptr_t(0)};
std::atomic<std::uintptr_t> g_stacks_high{0};
}  // namespace

void detail::prepare_api_stack() {
    constexpr std::uintptr_t kApiStackDepth = 32 << 10;
    const std::uintptr_t here = addr_of(__builtin_frame_address(0));
    if (here < g_stacks_low.load(kRelaxed) || here >= g_stacks_high.load(kRelaxed)) return;
    // What this function needs itself, touched now, with no lock held: a growth fault here is an
    // ordinary one (and a stack with less than this left overflows, as the call would).
    constexpr std::size_t kOwnDepth = 4096;
    volatile char own[kOwnDepth];
    own[0] = 0;
    const std::uintptr_t sp = addr_of(const_cast<char*>(&own[0]));
    AsyncSignalsBlocked blocked;
    bool self = false;
    ArenaCore* a = find_arena_lock_shared(sp, &self);
    if (!a || self) return;  // self: this thread holds the lock already (a fork handler); not taken
    if (Vma* v = find_vma(*a, sp); v && v->start <= sp && v->stack) {
        StackCore& s = *v->stack;
        const std::uintptr_t low = sp - std::min(sp - s.floor, kApiStackDepth);
        std::uint32_t pages = 0, copies = 0;
        // If the kernel refuses, a growth fault will try again.
        if (low < s.committed_low.load(std::memory_order_acquire) && stack_commit(*a, s, low, &pages, &copies) == 0)
            account_stack_grown(*a, *v, pages);
    }
    a->lock.unlock_shared();
}

namespace {

// Discards a stack's VMA and frees it (its core with it). Under the write lock.
void destroy_stack(ArenaCore& a, StackCore* s, const char* call) {
    const Range r{s->start, s->end};
    const std::int64_t committed = std::int64_t((s->end - s->committed_low.load(kRelaxed)) >> g_page_shift);
    const bool markers = s->markers;
    discard_range(a, call, r);
    if (markers) page_guard_remove(r.start, r.end - r.start);
    Vma* v = find_vma(a, r.start);
    vma_unlink(a, *v);
    vma_free(v);
    a.last_hit.store(nullptr, kRelaxed);
    --a.stack_count;
    g_stack_gauges.live.fetch_sub(1, kRelaxed);
    g_stack_gauges.committed_pages.fetch_sub(committed, kRelaxed);
    if (!markers) g_stack_gauges.kernel_maps.fetch_sub(2, kRelaxed);
}

// Where what an idle stack keeps of its memory begins: keep_pages from the top, or the committed
// headroom if that is less.
std::uintptr_t kept_from(const StackCore& s, std::size_t keep_pages) {
    return s.end - std::min(s.end - s.initial_low, keep_pages << g_page_shift);
}

// Gives an idle stack back its shape at creation: pages below keep_pages from the top dropped,
// guards back where it grew. Under the write lock (PTEs change; no fault is in flight).
void shrink_stack(ArenaCore& a, StackCore& s, std::size_t keep_pages, const char* call) {
    const std::uintptr_t low = s.committed_low.load(kRelaxed);
    const std::uintptr_t keep = kept_from(s, keep_pages);
    if (low < s.initial_low) {
        const Range grown{low, s.initial_low};
        const std::size_t first = a.page_index(grown.start), last = a.page_index(grown.end);
        preserve_range(a, call, grown);
        if (s.markers) {
            if (const int err = page_guard_install(grown.start, grown.end - grown.start))
                fail(err, "{}: MADV_GUARD_INSTALL on [{:#x}, {:#x}) of stack '{}' failed", call, grown.start,
                     grown.end, s.name);
        } else {
            if (const int err = protect_run(a, first, last, Prot::None))
                fail(err, "{}: mprotect of [{:#x}, {:#x}) of stack '{}' to none failed", call, grown.start, grown.end,
                     s.name);
            page_discard(grown.start, grown.end - grown.start);
        }
        note_discarded(a, first, last);
        for (std::size_t i = first; i < last; ++i) {
            const pte_t v = a.pte[i].load(kRelaxed);
            const pte_t n = pte_t(kPteGuard | (s.markers ? to_pte(Prot::ReadWrite) : 0) | (v & kPteDirty) |
                                  ((v & kPtePopulated) ? kPteDirtySnapshot : 0));
            a.note_resident(v, n);
            a.pte[i].store(n, kRelaxed);
            a.note_changed(i);
        }
        s.committed_low.store(s.initial_low, kRelaxed);
        g_stack_gauges.committed_pages.fetch_sub(std::int64_t(last - first), kRelaxed);
    }
    // Between the headroom and what is kept: committed, emptied (collect_dirty reports it changed).
    if (keep > s.initial_low) {
        preserve_range(a, call, {s.initial_low, keep});
        note_discarded(a, a.page_index(s.initial_low), a.page_index(keep));
        page_discard(s.initial_low, keep - s.initial_low);
    }
    s.lowest.store(s.initial_low, kRelaxed);
    s.deepest.store(s.end, kRelaxed);
}

}  // namespace

// --- map_stack ---------------------------------------------------------------------------------

Stack Arena::map_stack(std::size_t size) { return map_stack(size, StackOptions{}); }

Stack Arena::map_stack(std::size_t size, const StackOptions& options) {
    static constexpr const char* call = "usermm::Arena::map_stack";
    ArenaCore& a = live_arena(core_, call);
    const GuardMode mode = resolve_mode(options.guard_mode, call);
    const std::size_t len = round_up_length(call, size, 0, "size");
    const std::size_t guard = std::max(g_page_size, round_pages(options.guard));
    const std::size_t headroom = std::min(len, std::max(g_page_size, round_pages(options.headroom)));
    // A stack's pages are never evicted, write-tracked or made inaccessible: the thread on it may
    // be inside a usermm call that holds the arena's lock, where its own faults cannot be resolved.
    if (a.swap)
        fail(ENOTSUP, "{}: the arena has a store (a resident limit), whose reclaimer would evict pages a thread runs on; "
             "make stacks in an arena without one", call);
    if (len > a.end - a.base || guard > a.end - a.base - len)
        fail(ENOMEM, "{}: size {:#x} with its guard of {:#x} exceeds the arena's size {:#x}", call, size, guard,
             a.end - a.base);
    install_signal_stack();

    auto vma = std::make_unique<Vma>();
    auto core = std::make_unique<StackCore>();
    vma->prot = Prot::ReadWrite;
    set_name(*vma, options.name);
    std::memcpy(core->name, vma->name, sizeof core->name);
    core->markers = mode == GuardMode::Markers;
    core->gap = round_pages(options.gap);
    core->headroom_pages = std::uint32_t(headroom >> g_page_shift);
    core->id = g_next_stack_id.fetch_add(1, kRelaxed);

    ApiGuard<std::lock_guard<RwSpinLock>> lock(a.lock);
    const std::uintptr_t start = place_vma(a, call, 0, guard + len, guard + len);
    const std::uintptr_t end = start + guard + len, low = end - headroom;
    const std::size_t first = a.page_index(start), mid = a.page_index(low), last = a.page_index(end);
    async_leave(a, call, {start, end});  // a stack's writes are never tracked (dirty_async.cpp)
    // The kernel's part first, all of it before any PTE changes: a refusal leaves nothing behind.
    // Markers go on while the range is still PROT_NONE, so that no page is ever open unguarded.
    const std::uintptr_t open_from = core->markers ? start : low;
    const long delta = map_count_delta(a, a.page_index(open_from), last, Prot::ReadWrite);
    if (!map_budget_try_charge(a, delta))
        fail(ENOMEM, "{}: no kernel mapping to spare for the stack's guard (vm.max_map_count is {}; usermm holds {} of "
             "its budget of {}): a PROT_NONE-guarded stack costs 2", call, map_budget_max_map_count(),
             map_budget_used(), map_budget_limit());
    int err = core->markers ? page_guard_install(start, low - start) : 0;
    if (!err && (err = page_protect(open_from, end - open_from, Prot::ReadWrite)) != 0 && core->markers)
        page_guard_remove(start, low - start);
    if (err) {
        map_budget_charge(a, -delta);
        if (err == ENOMEM) map_budget_refused();
        fail(err, "{}: making the stack [{:#x}, {:#x}) failed{}", call, start, end,
             err == ENOMEM ? fmt::format(" (at vm.max_map_count, {}?)", map_budget_max_map_count()) : std::string());
    }
    // Live snapshots of the range read these pages as zeros, whatever the stack writes later (its
    // pages are never write-tracked): untouched, they are recorded so now.
    preserve_range(a, call, {start, end});
    for (std::size_t i = first; i < mid; ++i)
        a.pte[i].store(pte_t(kPteGuard | (core->markers ? to_pte(Prot::ReadWrite) : 0)), kRelaxed);
    for (std::size_t i = mid; i < last; ++i) {
        const pte_t now = pte_with_prot(0, Prot::ReadWrite);
        a.note_resident(0, now);
        a.pte[i].store(now, kRelaxed);
        a.note_changed(i);
    }
    core->start = start;
    core->floor = start + guard;
    core->end = end;
    core->initial_low = low;
    core->committed_low.store(low, kRelaxed);
    core->lowest.store(low, kRelaxed);
    core->deepest.store(end, kRelaxed);
    vma->stack = core.get();
    insert_vma(a, vma.release(), start, guard + len);
    ++a.stack_count;
    g_stacks_made.store(true, std::memory_order_release);
    g_stack_gauges.live.fetch_add(1, kRelaxed);
    g_stack_gauges.committed_pages.fetch_add(std::int64_t(last - mid), kRelaxed);
    for (std::uintptr_t lo = g_stacks_low.load(kRelaxed); start < lo && !g_stacks_low.compare_exchange_weak(lo, start);) {}
    for (std::uintptr_t hi = g_stacks_high.load(kRelaxed); end > hi && !g_stacks_high.compare_exchange_weak(hi, end);) {}
    if (!core->markers) g_stack_gauges.kernel_maps.fetch_add(2, kRelaxed);
    return Stack(&a, core.release(), nullptr);
}

namespace {

constexpr std::uint64_t kPagemapGuard = std::uint64_t(1) << 58;  // PM_GUARD_REGION (Linux 6.15)

// Whether /proc/self/pagemap shows guard markers on this kernel: asked of a page given one.
bool pagemap_shows_guards() {
    static const bool shows = [] {
        if (!markers_work()) return false;
        void* p = mmap(nullptr, g_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        std::uint64_t entry = 0;
        const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        const bool ok = fd >= 0 && page_guard_install(addr_of(p), g_page_size) == 0 &&
                        pread(fd, &entry, sizeof entry, off_t((addr_of(p) >> g_page_shift) * sizeof entry)) ==
                            ssize_t(sizeof entry) &&
                        (entry & kPagemapGuard);
        if (fd >= 0) close(fd);
        munmap(p, g_page_size);
        return ok;
    }();
    return shows;
}

}  // namespace

void detail::verify_stacks(const ArenaCore& a, const char* call) {
    const int pagemap = pagemap_shows_guards() ? open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC) : -1;
    std::vector<std::uint64_t> entries;
    try {
        for (const Vma& v : a.tree) {
            const StackCore* s = v.stack;
            if (!s) continue;
            const std::uintptr_t low = s->committed_low.load(kRelaxed);
            if (s->start != v.start || s->end != v.end || low < s->floor || low > s->end)
                fail(EFAULT, "{}: stack '{}' [{:#x}, {:#x}) has its committed part from {:#x}, outside [{:#x}, {:#x}]",
                     call, s->name, v.start, v.end, low, s->floor, s->end);
            for (std::uintptr_t at = v.start; at < v.end; at += g_page_size) {
                const bool guard = a.pte_of(at).load(kRelaxed) & kPteGuard;
                if (guard != (at < low))
                    fail(EFAULT, "{}: page {:#x} of stack '{}' is {} in usermm, but the committed part begins at {:#x}",
                         call, at, s->name, guard ? "a guard page" : "committed", low);
            }
            if (pagemap < 0 || !s->markers) continue;
            entries.resize((v.end - v.start) >> g_page_shift);
            const off_t off = off_t((v.start >> g_page_shift) * sizeof(std::uint64_t));
            const std::size_t bytes = entries.size() * sizeof(std::uint64_t);
            if (pread(pagemap, entries.data(), bytes, off) != ssize_t(bytes))
                fail(errno ? errno : EIO, "{}: reading /proc/self/pagemap for stack '{}' failed", call, s->name);
            for (std::size_t k = 0; k < entries.size(); ++k) {
                const std::uintptr_t at = v.start + (k << g_page_shift);
                if (bool(entries[k] & kPagemapGuard) != (at < low))
                    fail(EFAULT, "{}: page {:#x} of stack '{}' {} a guard marker in the kernel, but usermm's committed "
                         "part begins at {:#x}", call, at, s->name, entries[k] & kPagemapGuard ? "has" : "lacks", low);
            }
        }
    } catch (...) {
        if (pagemap >= 0) close(pagemap);
        throw;
    }
    if (pagemap >= 0) close(pagemap);
}

void detail::refuse_stack_vmas(const std::vector<Vma*>& vmas, const char* call) {
    for (const Vma* v : vmas)
        if (v->stack)
            fail(EINVAL, "{}: [{:#x}, {:#x}) is stack '{}', which changes only through its Stack", call, v->start,
                 v->end, v->name);
}

// --- Stack -------------------------------------------------------------------------------------

Stack::Stack(Stack&& other) noexcept : arena_(other.arena_), core_(other.core_), pool_(other.pool_) {
    other.core_ = nullptr;
}

Stack& Stack::operator=(Stack&& other) noexcept {
    if (this != &other) {
        reset();
        arena_ = other.arena_;
        core_ = std::exchange(other.core_, nullptr);
        pool_ = other.pool_;
    }
    return *this;
}

Stack::~Stack() { reset(); }

void Stack::reset() noexcept {
    if (!core_) return;
    StackCore* s = std::exchange(core_, nullptr);
    if (pool_) {
        pool_->give_back(s);
        return;
    }
    try {
        ApiGuard<std::lock_guard<RwSpinLock>> lock(arena_->lock);
        destroy_stack(*arena_, s, "usermm::Stack::~Stack");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "usermm: %s\n", e.what());
    }
}

namespace {
const StackCore& live_stack(const StackCore* s, const char* call) {
    if (!s) fail(EINVAL, "{}: the stack is empty (moved from, or default-constructed)", call);
    return *s;
}
}  // namespace

void* Stack::top() const { return ptr_of(live_stack(core_, "usermm::Stack::top").end); }
void* Stack::bottom() const { return ptr_of(live_stack(core_, "usermm::Stack::bottom").floor); }
std::size_t Stack::size() const {
    const StackCore& s = live_stack(core_, "usermm::Stack::size");
    return s.end - s.floor;
}
std::size_t Stack::committed() const {
    const StackCore& s = live_stack(core_, "usermm::Stack::committed");
    return s.end - s.committed_low.load(std::memory_order_acquire);
}
std::string_view Stack::name() const { return live_stack(core_, "usermm::Stack::name").name; }
std::uint64_t Stack::id() const { return live_stack(core_, "usermm::Stack::id").id; }
GuardMode Stack::guard_mode() const {
    return live_stack(core_, "usermm::Stack::guard_mode").markers ? GuardMode::Markers : GuardMode::ProtNone;
}

std::size_t Stack::peak() const {
    static constexpr const char* call = "usermm::Stack::peak";
    const StackCore& s = live_stack(core_, call);
    const std::uintptr_t low = s.committed_low.load(std::memory_order_acquire);
    std::uintptr_t deepest = s.deepest.load(kRelaxed);
    std::vector<unsigned char> in_memory((s.end - low) >> g_page_shift);
    if (const int err = page_resident(low, s.end - low, in_memory.data()))
        fail(err, "{}: mincore of stack '{}' [{:#x}, {:#x}) failed", call, s.name, low, s.end);
    const auto first = std::find_if(in_memory.begin(), in_memory.end(), [](unsigned char c) { return c & 1; });
    if (first != in_memory.end()) deepest = std::min(deepest, low + (std::uintptr_t(first - in_memory.begin()) << g_page_shift));
    return s.end - deepest;
}

void Stack::ensure(std::size_t bytes) {
    static constexpr const char* call = "usermm::Stack::ensure";
    StackCore& s = *const_cast<StackCore*>(&live_stack(core_, call));
    const std::uintptr_t sp = current_sp();
    const std::uintptr_t from = sp >= s.floor && sp < s.end ? sp : s.end;
    if (bytes > from - s.floor)
        fail(ENOMEM, "{}: {:#x} bytes below {:#x} reach past the bottom {:#x} of stack '{}'", call, bytes, from, s.floor,
             s.name);
    std::uint32_t pages = 0, copies = 0;
    int err;
    {
        ApiGuard<SharedGuard<RwSpinLock>> lock(arena_->lock);
        err = stack_commit(*arena_, s, from - bytes, &pages, &copies);
        if (!err) account_stack_grown(*arena_, *find_vma(*arena_, s.start), pages);
    }
    if (err) fail(err, "{}: committing stack '{}' down to {:#x} failed", call, s.name, from - bytes);
}

// --- StackPool ---------------------------------------------------------------------------------

struct StackPool::State {
    ArenaCore* arena = nullptr;
    Arena* owner = nullptr;
    StackPoolOptions options;
    std::mutex lock;  // a leaf: taken with no usermm lock held, and none taken under it
    // Idle stacks, most recently given back last (handed out first: its pages are the warmest).
    // Those not shrunk yet still hold what their last user touched; once kShrinkBatch of them
    // wait, the oldest are shrunk together, so that a stack given back and soon taken again (the
    // common case) costs no system call at all.
    struct Idle {
        StackCore* stack;
        bool shrunk;
    };
    std::deque<Idle> idle;
    std::size_t unshrunk = 0;
    std::unordered_map<std::uintptr_t, StackCore*> out_by_top;  // acquire_top's, for release_top
    bool closed = false;

    void shrink(const std::vector<Idle>& batch);
};

namespace {

constexpr std::size_t kShrinkBatch = 64;

// process_madvise(2) on the calling process takes every advice since Linux 6.13, and PIDFD_SELF
// names it since 6.15: one call empties a batch of stacks. Elsewhere, one madvise each.
constexpr int kPidfdSelf = -10000;
std::atomic<bool> g_no_process_madvise{false};

void discard_ranges(std::vector<iovec>& ranges) {
    if (ranges.empty()) return;
    if (!g_no_process_madvise.load(kRelaxed)) {
        const long done = syscall(SYS_process_madvise, kPidfdSelf, ranges.data(), ranges.size(), MADV_DONTNEED, 0u);
        std::size_t total = 0;
        for (const iovec& v : ranges) total += v.iov_len;
        if (done == long(total)) return;
        if (done < 0 && (errno == EINVAL || errno == EBADF || errno == ENOSYS || errno == EPERM))
            g_no_process_madvise.store(true, kRelaxed);
    }
    for (const iovec& v : ranges) page_discard(addr_of(v.iov_base), v.iov_len);
}

}  // namespace

StackPool::StackPool(Arena& arena, const StackPoolOptions& options) : state_(std::make_shared<State>()) {
    static constexpr const char* call = "usermm::StackPool::StackPool";
    arena.base();  // throws for a moved-from arena
    state_->arena = &ArenaAccess::core(arena);
    state_->owner = &arena;
    state_->options = options;
    if (options.max_size == 0) fail(EINVAL, "{}: max_size is 0", call);
    resolve_mode(options.stack.guard_mode, call);
}

StackPool::~StackPool() {
    std::deque<State::Idle> idle;
    {
        std::lock_guard guard(state_->lock);
        state_->closed = true;
        idle.swap(state_->idle);
    }
    if (idle.empty()) return;
    ArenaCore& a = *state_->arena;
    ApiGuard<std::lock_guard<RwSpinLock>> lock(a.lock);
    for (const State::Idle& i : idle) destroy_stack(a, i.stack, "usermm::StackPool::~StackPool");
}

Stack StackPool::acquire() {
    ensure_signal_stack();
    {
        std::lock_guard guard(state_->lock);
        if (!state_->idle.empty()) {
            const State::Idle i = state_->idle.back();
            state_->idle.pop_back();
            state_->unshrunk -= !i.shrunk;
            return Stack(state_->arena, i.stack, this);
        }
    }
    Stack made = state_->owner->map_stack(state_->options.max_size, state_->options.stack);
    made.pool_ = this;
    return made;
}

std::size_t StackPool::idle() const {
    std::lock_guard guard(state_->lock);
    return state_->idle.size();
}

std::size_t StackPool::stack_size() const { return round_pages(state_->options.max_size); }

void* StackPool::acquire_top() {
    Stack s = acquire();
    StackCore* core = std::exchange(s.core_, nullptr);
    std::lock_guard guard(state_->lock);
    state_->out_by_top.emplace(core->end, core);
    return ptr_of(core->end);
}

void StackPool::release_top(void* top) noexcept {
    StackCore* s = nullptr;
    {
        std::lock_guard guard(state_->lock);
        if (const auto it = state_->out_by_top.find(addr_of(top)); it != state_->out_by_top.end()) {
            s = it->second;
            state_->out_by_top.erase(it);
        }
    }
    if (!s) {
        std::fprintf(stderr, "usermm: StackPool::release_top: %p is the top of no stack this pool handed out\n", top);
        return;
    }
    give_back(s);
}

void StackPool::give_back(StackCore* s) noexcept {
    static constexpr const char* call = "usermm::StackPool::give_back";
    ArenaCore& a = *state_->arena;
    try {
        const bool grew = s->committed_low.load(kRelaxed) != s->initial_low;
        std::vector<State::Idle> batch;
        {
            std::lock_guard guard(state_->lock);
            const bool keep = !state_->closed && state_->idle.size() < state_->options.max_idle;
            if (keep && !grew) {
                // Kept as it is: shrunk later, with others, if it stays idle.
                state_->idle.push_back({s, false});
                if (++state_->unshrunk < 2 * kShrinkBatch) return;
                for (auto it = state_->idle.begin(); it != state_->idle.end() && batch.size() < kShrinkBatch;)
                    if (!it->shrunk) {
                        batch.push_back(*it);
                        it = state_->idle.erase(it);
                    } else {
                        ++it;
                    }
                state_->unshrunk -= batch.size();
                s = nullptr;
            } else if (keep) {
                batch.push_back({s, false});  // grew: shrunk now, under the write lock
                s = nullptr;
            }
        }
        if (s) {  // not kept
            ApiGuard<std::lock_guard<RwSpinLock>> lock(a.lock);
            destroy_stack(a, s, call);
            return;
        }
        state_->shrink(batch);
        std::lock_guard guard(state_->lock);
        for (auto it = batch.rbegin(); it != batch.rend(); ++it) state_->idle.push_front({it->stack, true});
    } catch (const std::exception& e) {
        std::fprintf(stderr, "usermm: %s\n", e.what());
    }
}

// Shrinks idle stacks to keep_resident_pages. A stack that did not grow only has its headroom
// emptied, which changes no PTE: under the read side (faults go on), all of them in one system
// call, unless something keeps account of discarded content (snapshots, collect_dirty),
// which needs the write side, as does a stack that grew (its guard goes back).
void StackPool::State::shrink(const std::vector<Idle>& batch) {
    static constexpr const char* call = "usermm::StackPool::give_back";
    ArenaCore& a = *arena;
    const std::size_t keep_pages = options.keep_resident_pages;
    auto grew = [](const StackCore* s) { return s->committed_low.load(kRelaxed) != s->initial_low; };
    {
        ApiGuard<SharedGuard<RwSpinLock>> arena_lock(a.lock);
        if (!a.snapshot_count && !a.collect_armed &&
            std::none_of(batch.begin(), batch.end(), [&](const Idle& i) { return grew(i.stack); })) {
            std::vector<iovec> ranges;
            for (const Idle& i : batch) {
                StackCore& s = *i.stack;
                if (const std::uintptr_t from = kept_from(s, keep_pages); from > s.initial_low)
                    ranges.push_back({ptr_of(s.initial_low), from - s.initial_low});
                s.lowest.store(s.initial_low, kRelaxed);
                s.deepest.store(s.end, kRelaxed);
            }
            discard_ranges(ranges);
            return;
        }
    }
    ApiGuard<std::lock_guard<RwSpinLock>> arena_lock(a.lock);
    for (const Idle& i : batch) shrink_stack(a, *i.stack, keep_pages, call);
}

// --- overflow handler, alternate signal stacks, thread stacks ------------------------------------

StackOverflowHandler on_stack_overflow(StackOverflowHandler handler) {
    init_process();
    install_signal_stack();
    return g_overflow_handler.exchange(handler, std::memory_order_acq_rel);
}

namespace {

// The calling thread's alternate signal stack, if usermm made it; freed at thread exit.
struct SignalStack {
    void* mem = nullptr;
    std::size_t len = 0;
    ~SignalStack() {
        if (!mem) return;
        t_signal_stack_guard = {0, 0, 0};
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
        munmap(mem, len);
    }
};
thread_local SignalStack t_signal_stack;

// install_signal_stack without its system call once usermm gave this thread a stack, for the calls
// that promise none (StackPool::acquire): a program that takes that stack away again gets it back
// at the next map_stack, on_stack_overflow or install_signal_stack.
void ensure_signal_stack() {
    if (!t_signal_stack.mem) install_signal_stack();
}

}  // namespace

void install_signal_stack() {
    init_process();
    const unsigned long frame = getauxval(AT_MINSIGSTKSZ);
    const std::size_t want = round_pages(std::max({std::size_t(SIGSTKSZ), std::size_t(frame), std::size_t(64) << 10,
                                                   signal_stack_size()}));
    stack_t cur{};
    if (sigaltstack(nullptr, &cur) != 0) fail(errno, "usermm::install_signal_stack: sigaltstack failed");
    if (cur.ss_flags & SS_ONSTACK) return;  // running on it: it cannot change now
    const std::size_t guard = g_page_size;
    if (t_signal_stack.mem) {
        void* const ours = static_cast<char*>(t_signal_stack.mem) + guard;
        if (cur.ss_sp == ours && !(cur.ss_flags & SS_DISABLE)) return;
        if ((cur.ss_flags & SS_DISABLE) || cur.ss_size < want) {
            // The program took ours away (or put a smaller one in its place): the mapping is still
            // the thread's, so it goes back.
            stack_t ss{};
            ss.ss_sp = ours;
            ss.ss_size = t_signal_stack.len - guard;
            if (sigaltstack(&ss, nullptr) != 0)
                fail(errno, "usermm::install_signal_stack: sigaltstack of {} bytes at {} failed", ss.ss_size, ours);
        }
        return;
    }
    if (!(cur.ss_flags & SS_DISABLE) && cur.ss_size >= want) return;
    const std::size_t len = guard + want;
    void* mem = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fail(errno, "usermm::install_signal_stack: mmap of {:#x} bytes failed", len);
    if (page_guard_install(addr_of(mem), guard) != 0 && mprotect(mem, guard, PROT_NONE) != 0) {
        const int err = errno;
        munmap(mem, len);
        fail(err, "usermm::install_signal_stack: the guard of the alternate signal stack at {} failed", mem);
    }
    stack_t ss{};
    ss.ss_sp = static_cast<char*>(mem) + guard;
    ss.ss_size = want;
    if (sigaltstack(&ss, nullptr) != 0) {
        const int err = errno;
        munmap(mem, len);
        fail(err, "usermm::install_signal_stack: sigaltstack of {} bytes at {} failed", want, ss.ss_sp);
    }
    t_signal_stack.mem = mem;
    t_signal_stack.len = len;
    t_signal_stack_guard = {addr_of(mem), addr_of(mem) + guard, addr_of(mem) + len};
}

void watch_thread_stacks() {
    static constexpr const char* call = "usermm::watch_thread_stacks";
    init_process();
    install_signal_stack();
    if (g_watch_threads.load()) return;
    // The main thread's stack is the kernel's [stack] mapping; RLIMIT_STACK bounds its growth.
    std::ifstream maps("/proc/self/maps");
    std::string line;
    std::uintptr_t end = 0;
    while (std::getline(maps, line))
        if (line.size() > 7 && line.compare(line.size() - 7, 7, "[stack]") == 0) {
            std::istringstream in(line);
            std::uintptr_t lo = 0, hi = 0;
            char dash;
            in >> std::hex >> lo >> dash >> hi;
            end = hi;
        }
    if (!end) fail(ENOENT, "{}: /proc/self/maps shows no [stack] mapping", call);
    rlimit rl{};
    getrlimit(RLIMIT_STACK, &rl);
    const std::uintptr_t limit = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > end ? 0 : end - rl.rlim_cur;
    g_main_stack_end.store(end, kRelaxed);
    g_main_stack_limit.store(limit, kRelaxed);
    g_watch_threads.store(true, std::memory_order_release);
}

StackStats stack_stats() {
    StackStats out;
    out.live = std::size_t(std::max<std::int64_t>(0, g_stack_gauges.live.load(kRelaxed)));
    out.committed_bytes = std::size_t(std::max<std::int64_t>(0, g_stack_gauges.committed_pages.load(kRelaxed)))
                          << g_page_shift;
    out.growth_faults = g_stack_gauges.growth_faults.load(kRelaxed);
    out.overflows = g_stack_gauges.overflows.load(kRelaxed);
    out.kernel_maps = long(g_stack_gauges.kernel_maps.load(kRelaxed));
    out.mode = auto_mode("usermm::stack_stats");
    return out;
}

}  // namespace usermm

// Threads created once thread stacks are watched, or once a usermm stack exists (a thread may run
// fibers on it), start on a trampoline that gives them an alternate signal stack first: without
// one, the kernel cannot deliver the SIGSEGV of an overflow or a growth fault, and kills the
// process. The program's pthread_create resolves here (the library precedes libc);
// the real one is the next definition, libc's or a sanitizer's.
namespace {
struct ThreadStart {
    void* (*fn)(void*);
    void* arg;
};

void* watched_thread_start(void* p) {
    const ThreadStart start = *static_cast<ThreadStart*>(p);
    delete static_cast<ThreadStart*>(p);
    try {
        usermm::install_signal_stack();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "usermm: a new thread's stack overflow cannot be reported: %s\n", e.what());
    }
    return start.fn(start.arg);
}

using PthreadCreate = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
}  // namespace

extern "C" USERMM_API int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*fn)(void*), void* arg) {
    static const auto real = reinterpret_cast<PthreadCreate>(dlsym(RTLD_NEXT, "pthread_create"));
    if (!usermm::detail::g_watch_threads.load(std::memory_order_acquire) &&
        !usermm::detail::g_stacks_made.load(std::memory_order_acquire))
        return real(thread, attr, fn, arg);
    auto* start = new (std::nothrow) ThreadStart{fn, arg};
    if (!start) return EAGAIN;
    const int rc = real(thread, attr, watched_thread_start, start);
    if (rc) delete start;
    return rc;
}
