// The API world: arenas and their VMAs. Everything here may allocate, lock and throw; it creates
// the metadata faults need before any fault can need it, and changes the VMA tree and page
// protections only under the arena's write lock, so that no fault resolves against a state that is
// being changed.
//
// Order of every call that changes pages: validate all arguments and allocate what is needed (bad
// input throws here and changes nothing), then change the pages (only ever reducing rights that
// the old VMAs allowed, or granting ones the VMAs allow, so a kernel refusal midway leaves metadata
// and kernel in agreement), then change the tree.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <utility>

#include "account.hpp"
#include "arena_ops.hpp"
#include "dirty_async.hpp"
#include "fault_entry.hpp"
#include "file_vma.hpp"
#include "find_vma.hpp"
#include "live_stats.hpp"
#include "map_budget.hpp"
#include "node_pool.hpp"
#include "page_ops_api.hpp"
#include "snapshot.hpp"
#include "reclaim.hpp"
#include "vma_counters.hpp"
#include "write_tracking.hpp"

namespace usermm {

using namespace detail;

namespace {

// --- process-wide set-up ---------------------------------------------------------------------

long read_long_file(const char* path, long fallback) {
    std::ifstream in(path);
    long v = fallback;
    if (!(in >> v)) return fallback;
    return v;
}

// The environment, read once, by the rule of environment_value and environment_refused.
enum class EngineWanted { Default, Mprotect, Uffd };
struct Environment {
    long map_budget = 0;  // 0: the default
    EngineWanted engine = EngineWanted::Default;
    bool stats_at_exit = false;
    bool vma_names = true;
    bool dirty_async = true;  // collect_dirty may hand write tracking to the kernel (dirty_async.cpp)
};

Environment read_environment() {
    Environment env;
    const auto value = environment_value;
    const auto bad = environment_refused;
    if (const char* v = value("USERMM_MAP_BUDGET")) {
        const char* end = v + std::strlen(v);
        long n = 0;
        const auto [ptr, ec] = std::from_chars(v, end, n);
        if (ec == std::errc() && ptr == end && n > 0)
            env.map_budget = n;
        else
            bad("USERMM_MAP_BUDGET", v, "a positive number of kernel mappings");
    }
    if (const char* v = value("USERMM_ENGINE")) {
        const std::string_view want = v;
        if (want == "mprotect")
            env.engine = EngineWanted::Mprotect;
        else if (want == "uffd")
            env.engine = EngineWanted::Uffd;
        else
            bad("USERMM_ENGINE", v, "'mprotect' or 'uffd'");
    }
    environment_switch("USERMM_VMA_NAMES", &env.vma_names);
    environment_switch("USERMM_DIRTY_ASYNC", &env.dirty_async);
    environment_switch("USERMM_STATS", &env.stats_at_exit);
    return env;
}

const Environment& environment() {
    static const Environment env = read_environment();
    return env;
}

// The share of vm.max_map_count usermm may use: what the process has not used yet, less a reserve
// for the program's own later mappings (thread stacks, malloc arenas, libraries). USERMM_MAP_BUDGET
// sets it directly.
long initial_map_budget() {
    if (environment().map_budget) return environment().map_budget;
    const long max = read_long_file("/proc/sys/vm/max_map_count", 65530);
    const long reserve = std::max(1024L, max / 8);
    return std::max(64L, max - long(kernel_mappings(0, UINTPTR_MAX, "usermm::Arena").size()) - reserve);
}

// Whether anonymous VMAs' names go to the kernel (MapOptions::name): asked once.
bool kernel_vma_names() {
    static const bool on = environment().vma_names && page_names_supported();
    return on;
}

// How the kernel treats the boundary at `addr` (the first page past a range, or the last before
// it) once the range's anonymous memory is named `name` ("" for none): anonymous mappings merge
// only when their names agree, file mappings never with anonymous memory. A neighbour's name is
// taken to be the kernel's, dropped or not (vma_names_dropped: then the mapping count may be off
// by one at that boundary); the reservation between VMAs has none.
Across across_names(ArenaCore& a, std::uintptr_t addr, const char* name) {
    const Vma* n = addr >= a.base && addr < a.end ? find_vma(a, addr) : nullptr;
    if (!n || n->start > addr) return *name ? Across::Apart : Across::Same;
    if (n->file) return Across::Apart;
    return std::strcmp(n->name, name) == 0 ? Across::Same : Across::Apart;
}

// Gives an anonymous VMA's name to the kernel for [start, start + len), before the VMA is in the
// tree. The name keeps the range's kernel mappings apart from neighbours named otherwise, for as
// long as it is there: edge marks, read from the kernel (as for MADV_HUGEPAGE), and the budget
// pays for the (at most two) mappings more.
void name_kernel_range(ArenaCore& a, std::uintptr_t start, std::size_t len, const char* name) {
    if (!kernel_vma_names() || !*name) return;
    if (map_budget_used() + 2 > map_budget_limit()) {
        account_name_dropped(a);
        return;
    }
    const std::size_t first = a.page_index(start), last = a.page_index(start + len);
    const long before = long(mappings_around(a, first, last).size());
    if (page_name_anon(start, len, name) != 0) {  // the kernel changed nothing
        account_name_dropped(a);
        return;
    }
    settle_edges(a, first, last, before, across_names(a, start - g_page_size, name), across_names(a, start + len, name));
}

// Takes the names of the anonymous VMAs among `vmas` back from the kernel over `r`, which is
// leaving the tree (an unmap): the reservation again, which has none.
void unname_kernel_range(ArenaCore& a, const std::vector<Vma*>& vmas, Range r) {
    if (!kernel_vma_names() || std::none_of(vmas.begin(), vmas.end(), [](const Vma* v) { return !v->file && *v->name; }))
        return;
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    const long before = long(mappings_around(a, first, last).size());
    for (const Vma* v : vmas)
        if (!v->file && *v->name) {
            const std::uintptr_t lo = std::max(v->start, r.start), hi = std::min(v->end, r.end);
            page_name_anon(lo, hi - lo, nullptr);
        }
    settle_edges(a, first, last, before, across_names(a, r.start - g_page_size, ""), across_names(a, r.end, ""));
}

// USERMM_ENGINE=mprotect or =uffd forces an engine (uffd fails loudly where the kernel lacks it: a
// value usermm understands but cannot honour); otherwise userfaultfd is used where the running
// kernel offers everything it needs.
void choose_tracking_engine() {
    const EngineWanted want = environment().engine;
    if (want == EngineWanted::Mprotect) return;
    const int err = uffd_probe();
    if (err == 0) {
        set_tracking_engine(TrackingEngine::Uffd);
        // USERMM_DIRTY_ASYNC=0 keeps collect_dirty on the synchronous path; a kernel without
        // WP_ASYNC or PAGEMAP_SCAN does too, without a word (the answers are the same).
        if (environment().dirty_async) uffd_async_probe();
    } else if (want == EngineWanted::Uffd)
        fail(err, "usermm::Arena: USERMM_ENGINE=uffd, but userfaultfd write-protect in SIGBUS mode is not available");
}

// fork(): no fault may be mid-way when the address space is copied, or the child would inherit a
// locked PTE or a held read lock whose owner does not exist there. So the registry and every arena
// are write-locked around fork, which waits for faults in flight, as the kernel's dup_mmap holds
// mmap_lock. The forking thread's asynchronous signals stay blocked meanwhile (a handler that
// touched arena memory would fault into the locks its own thread holds; the kernel, likewise,
// runs no handler inside fork), and are delivered once the locks are released.
thread_local sigset_t t_mask_before_fork;

void fork_prepare() {
    // The handlers run on the forking thread's stack, a fiber's perhaps, with every lock held.
    prepare_api_stack();
    const sigset_t async = async_signals();
    pthread_sigmask(SIG_BLOCK, &async, &t_mask_before_fork);
    ArenaRegistry& reg = arena_registry();
    reg.lock.lock();
    for (std::size_t i = 0; i < reg.count; ++i) reg.arenas[i]->lock.lock();
    // The child refers to the same store slots as the parent: one more reference each, so that
    // each process releases its own (the kernel's swap_duplicate).
    for (std::size_t i = 0; i < reg.count; ++i)
        if (reg.arenas[i]->reclaimer && !reg.arenas[i]->reclaimer->retain_for_fork())
            std::fprintf(stderr, "usermm: fork: the store of arena [%#lx, %#lx) refused to share its slots with the "
                                 "child; pages swapped out may read wrong in one of them\n",
                         static_cast<unsigned long>(reg.arenas[i]->base), static_cast<unsigned long>(reg.arenas[i]->end));
    // The writes the kernel let through in ranges it tracks (dirty_async.cpp) become the PTEs'
    // marks, which the child inherits (its registrations and the kernel's bits are gone there),
    // behind a read-only guard that holds back later writes until the parent's handler.
    for (std::size_t i = 0; i < reg.count; ++i) async_fold_before_fork(*reg.arenas[i]);
    vma_counters_lock_for_fork();
    vma_node_pool().lock();  // last: a thread with an arena's write lock may be waiting for it
}

void fork_release() {
    vma_counters_unlock_after_fork();
    ArenaRegistry& reg = arena_registry();
    for (std::size_t i = 0; i < reg.count; ++i) reg.arenas[i]->lock.unlock();
    reg.lock.unlock();
    pthread_sigmask(SIG_SETMASK, &t_mask_before_fork, nullptr);
}

// The parent's handler: the asynchronous ranges' guard goes (dirty_async.cpp), then the locks.
void fork_parent() {
    vma_node_pool().unlock();
    ArenaRegistry& reg = arena_registry();
    for (std::size_t i = 0; i < reg.count; ++i) async_after_fork_parent(*reg.arenas[i]);
    fork_release();
}

// The child's copy of every arena is complete (no fault was in flight); what changes is how the
// kernel will merge its pieces. glibc makes malloc usable in the child before this runs.
void fork_child() {
    vma_node_pool().unlock();
    // The inherited descriptor refers to the parent's memory: it goes before anything can use it.
    // If no descriptor of the child's own can be had now, calls that need one fail (and try again).
    if (page_forget_self_mem()) page_self_mem();
    const WriteTracker& inherited = write_tracker();
    uffd_forget();
    uffd_async_forget();
    ArenaRegistry& reg = arena_registry();
    // The kernel gave each inherited private VMA an anon_vma of its own, so they never merge again:
    // their boundaries become edge marks. Pieces split off one of them later share its anon_vma
    // and merge as before, so the count stays exact from here on. Without a descriptor to read the
    // maps with (EMFILE at the fork), each arena keeps the parent's count and marks: it may then
    // count merges the kernel no longer makes, and a refusal in the fault path degrades (see
    // install_or_degrade) instead of trusting it.
    std::vector<KernelMapping> maps;
    bool counted = reg.count > 0;
    try {
        if (counted) maps = kernel_mappings(0, UINTPTR_MAX, "usermm: fork");  // once for all arenas
    } catch (const Error&) {
        counted = false;
    }
    if (counted)
        for (std::size_t i = 0; i < reg.count; ++i) inherit_edges(*reg.arenas[i], maps);
    for (std::size_t i = 0; i < reg.count; ++i) {
        ArenaCore& a = *reg.arenas[i];
        a.identity = new_arena_identity();  // the child's snapshots start a chain of their own
        forget_saved_after_fork(a);
        inherited.after_fork(a);
        async_after_fork_child(a);
        if (a.reclaimer) a.reclaimer->after_fork_child();
        // Slots held by readers, and a restore in progress, belong to threads the child does not have.
        // A held slot was written, so it lies in a touched page of its table.
        a.restoring.store(false);
        for (std::size_t k = 0; k < a.snapshot_count; ++k) {
            SnapshotCore& s = *a.snapshots[k];
            for (const PageSpan& span : slot_spans(s, s.first, s.last))
                for (std::size_t page = span.first; page < span.last; ++page)
                    if (s.slot(page).load(std::memory_order_relaxed) & kSlotBusy)
                        s.slot(page).store(kSlotInArena, std::memory_order_relaxed);
        }
    }
    fork_release();
}

// Registered when the library is loaded, before any handler the program registers later:
// pthread_atfork runs prepare handlers in reverse order of registration and the others in order,
// so usermm's prepare runs last, just before the kernel copies the address space, and its parent
// and child handlers first. The program's own fork handlers then run with no usermm lock held and
// may touch arena memory (in the child, after usermm has made the arenas the child's own).
[[gnu::constructor]] void register_fork_handlers() { pthread_atfork(fork_prepare, fork_parent, fork_child); }

void print_stats_at_exit() {
    const std::string table = format_stats(process_stats());
    std::fprintf(stderr, "usermm process stats\n%s", table.c_str());
}

}  // namespace

void detail::renew_kernel_names(ArenaCore& a, Range r, const std::vector<Range>& gone) {
    if (!kernel_vma_names()) return;
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    const long before = long(mappings_around(a, first, last).size());
    for (const Range& g : gone) page_name_anon(g.start, g.end - g.start, nullptr);
    const char* lo_name = "";
    const char* hi_name = "";
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it) {
        if (it->file || it->stack) continue;
        const std::uintptr_t lo = std::max(it->start, r.start), hi = std::min(it->end, r.end);
        if (lo == r.start) lo_name = it->name;
        if (hi == r.end) hi_name = it->name;
        if (page_name_anon(lo, hi - lo, *it->name ? it->name : nullptr) != 0 && *it->name) account_name_dropped(a);
    }
    settle_edges(a, first, last, before, across_names(a, r.start - g_page_size, lo_name), across_names(a, r.end, hi_name));
}

void detail::init_process() {
    static std::once_flag once;
    std::call_once(once, [] {
        const long ps = sysconf(_SC_PAGESIZE);
        g_page_size = std::size_t(ps);
        g_page_shift = std::size_t(std::countr_zero(std::size_t(ps)));
        map_budget_set_max_map_count(read_long_file("/proc/sys/vm/max_map_count", 65530));
        map_budget_set_limit(initial_map_budget());
        if (const int err = install_fault_handlers()) fail(err, "usermm: cannot install the SIGSEGV/SIGBUS handlers");
        choose_tracking_engine();
        if (environment().stats_at_exit) std::atexit(print_stats_at_exit);
        start_trace_from_environment();
        start_live_stats();
    });
}

std::size_t page_size() {
    init_process();
    return g_page_size;
}

std::size_t signal_stack_size() {
    // The handler's own depth, measured by tests/test_process.cpp on every kind of fault, is about
    // 1.2 KiB, 2.9 KiB for a swap-in (its page list and the SwapFile's I/O vector); a direct
    // reclaim that writes through a SwapFile adds up to about 3.6 KiB (-fstack-usage, not
    // measured by the test); the rest is margin. It holds only without lazy binding (see CMakeLists.txt).
    // Sanitizers' instrumentation makes every frame much larger.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    constexpr std::size_t kHandlerStack = 65536;
#else
    constexpr std::size_t kHandlerStack = 8192;
#endif
    const unsigned long frame = getauxval(AT_MINSIGSTKSZ);
    return (frame ? std::size_t(frame) : std::size_t(MINSIGSTKSZ)) + kHandlerStack;
}

std::string to_string(Prot p) { return prot_letters(p).text; }

Stats process_stats() {
    Stats s = process_counters().load();
    ArenaRegistry& reg = arena_registry();
    ApiGuard<SharedGuard<RwSpinLock>> guard(reg.lock);
    for (std::size_t i = 0; i < reg.count; ++i)
        s.resident_pages += std::uint64_t(std::max<std::int64_t>(0, reg.arenas[i]->resident.load(std::memory_order_relaxed)));
    return s;
}

// --- Arena -------------------------------------------------------------------------------------

Arena::Arena(std::size_t size, const ArenaOptions& options) : Arena(size, nullptr) {
    if (!options.resident_limit && !options.store) return;
    ArenaCore& a = *core_;
    auto reclaimer = std::make_unique<Reclaimer>(a, options);  // throws on bad options: ~Arena undoes the rest
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    a.reclaimer = reclaimer.release();
}

void Arena::set_resident_limit(std::size_t bytes) {
    static constexpr const char* call = "usermm::Arena::set_resident_limit";
    ArenaCore& a = live_arena(core_, call);
    if (!a.reclaimer) fail(EINVAL, "{}: the arena (base {:#x}) has no store to evict to", call, a.base);
    a.reclaimer->set_limit(call, bytes);
}

std::size_t Arena::resident_limit() const {
    const ArenaCore& a = live_arena(core_, "usermm::Arena::resident_limit");
    return a.swap ? std::size_t(a.swap->limit.load(std::memory_order_relaxed)) << g_page_shift : 0;
}

Arena::Arena(std::size_t size, void* at) {
    init_process();
    require_self_mem("usermm::Arena");
    const std::size_t len = round_up_length("usermm::Arena", size, 0, "size");
    auto core = std::make_unique<ArenaCore>();
    ArenaCore& a = *core;
    a.identity = new_arena_identity();
    // Undoes whatever of the set-up below succeeded, when a later step fails.
    auto undo = [&a, len] {
        if (a.base) page_release(a.base, len);
        if (a.pte) page_release(addr_of(a.pte), a.pte_bytes);
        if (a.changed_pages) page_release(addr_of(a.changed_pages), a.changed_page_bytes);
        if (a.changed_groups) page_release(addr_of(a.changed_groups), a.changed_group_bytes);
    };
    void* base = at;
    if (const int err = at ? page_reserve_at(addr_of(at), len) : page_reserve(len, &base))
        fail(err, "usermm::Arena: cannot reserve size {:#x} bytes of address space{}", size,
             at ? fmt::format(" at {:#x}", addr_of(at)) : "");
    a.base = addr_of(base);
    a.lock.set_order_key(a.base);
    a.end = a.base + len;
    static std::atomic<std::uint64_t> next_id{1};
    a.id = next_id.fetch_add(1);
    const std::size_t npages = len >> g_page_shift;
    a.pte_bytes = npages * sizeof(Pte);
    const std::size_t groups = (npages + ArenaCore::kGroupPages - 1) / ArenaCore::kGroupPages;
    a.changed_page_bytes = groups * sizeof(std::uint64_t);
    a.changed_group_bytes = (groups + 63) / 64 * sizeof(std::uint64_t);
    void* table = nullptr;
    void* changed = nullptr;
    void* summary = nullptr;
    int err = page_alloc_table(a.pte_bytes, &table);
    if (!err) a.pte = static_cast<Pte*>(table);
    if (!err) err = page_alloc_table(a.changed_page_bytes, &changed);
    if (!err) a.changed_pages = static_cast<std::atomic<std::uint64_t>*>(changed);
    if (!err) err = page_alloc_table(a.changed_group_bytes, &summary);
    if (!err) a.changed_groups = static_cast<std::atomic<std::uint64_t>*>(summary);
    if (err) {
        undo();
        fail(err, "usermm::Arena: cannot reserve the page tables for size {:#x}", size);
    }
    if (const int uerr = write_tracker().enrol(a.base, len)) {
        undo();
        fail(uerr, "usermm::Arena: cannot register size {:#x} with userfaultfd", size);
    }

    ArenaRegistry& reg = arena_registry();
    {
        ApiGuard<std::lock_guard<RwSpinLock>> guard(reg.lock);
        if (reg.count == kMaxArenas) {
            undo();
            fail(ENOMEM, "usermm::Arena: more than {} arenas", kMaxArenas);
        }
        ArenaCore** const end = reg.arenas + reg.count;
        ArenaCore** const slot = std::upper_bound(reg.arenas, end, a.base, base_below);
        std::copy_backward(slot, end, end + 1);
        *slot = &a;
        ++reg.count;
    }
    map_budget_charge(a, 1 + kArenaTableMaps);  // the reservation and its tables
    core_ = std::move(core);
}

Arena::~Arena() {
    if (!core_) return;
    ArenaCore& a = *core_;
    if (a.reclaimer) a.reclaimer->stop_kswapd();
    {
        ArenaRegistry& reg = arena_registry();
        ApiGuard<std::lock_guard<RwSpinLock>> guard(reg.lock);
        ArenaCore** const end = reg.arenas + reg.count;
        ArenaCore** const at = std::find(reg.arenas, end, &a);
        std::copy(at + 1, end, at);
        --reg.count;
    }
    ApiStackPrepared stack_prepared;  // the lock below is taken as an ApiGuard's would be
    AsyncSignalsBlocked blocked;
    a.lock.lock();  // faults already inside the arena finish first
    // Nothing written to a shared file VMA is lost silently: what cannot be written is reported,
    // and the pages stay in the kernel's page cache, dirty, for its own write-back.
    for (Vma& v : a.tree) {
        if (!v.file) continue;
        try {
            writeback_now(a, v, {v.start, v.end}, "usermm::Arena::~Arena");
        } catch (const std::exception& e) {
            std::fprintf(stderr, "usermm: %s; what the write-back could not take is left to the kernel\n", e.what());
        }
        try {
            release_file_pages(a, v, {v.start, v.end}, "usermm::Arena::~Arena");
        } catch (const std::exception& e) {
            std::fprintf(stderr, "usermm: %s; the data is lost with the arena\n", e.what());
        }
    }
    // Snapshots outlive their arena: they take every page they still read from it. A page of an
    // untouched part of the PTE table holds nothing: its slot stays kSlotInArena, which reads as
    // zero once the arena is gone.
    for (std::size_t i = 0; i < a.snapshot_count; ++i) {
        SnapshotCore& s = *a.snapshots[i];
        std::uint32_t copies = 0;
        for (const PageSpan& span : pte_spans(a, s.first, s.last))
            for (std::size_t page = span.first; page < span.last; ++page)
                if (settled_slot(s, page) == kSlotInArena &&
                    preserve_for_snapshots(a, page, a.pte[page].load(std::memory_order_relaxed), &copies) != 0)
                    std::fprintf(stderr, "usermm: snapshot %llu lost page %#lx when its arena was destroyed\n",
                                 static_cast<unsigned long long>(s.sequence),
                                 static_cast<unsigned long>(a.page_addr(page)));
        s.arena = nullptr;
    }
    delete std::exchange(a.reclaimer, nullptr);  // the store's slots go back
    map_budget_charge(a, -a.kernel_maps.load());
    page_release(a.base, a.end - a.base);
    page_release(addr_of(a.pte), a.pte_bytes);
    page_release(addr_of(a.changed_pages), a.changed_page_bytes);
    page_release(addr_of(a.changed_groups), a.changed_group_bytes);
    a.vma_index.clear();
    a.tree.clear_and_dispose([](Vma* v) { vma_free(v); });
    a.lock.unlock();
}

Arena::Arena(Arena&&) noexcept = default;
Arena& Arena::operator=(Arena&& other) noexcept {
    if (this != &other) {
        Arena dying(std::move(*this));
        core_ = std::move(other.core_);
    }
    return *this;
}

void* Arena::base() const { return ptr_of(live_arena(core_, "usermm::Arena::base").base); }
std::size_t Arena::size() const {
    const ArenaCore& a = live_arena(core_, "usermm::Arena::size");
    return a.end - a.base;
}
bool Arena::contains(const void* p) const {
    const ArenaCore& a = live_arena(core_, "usermm::Arena::contains");
    return addr_of(p) >= a.base && addr_of(p) < a.end;
}

void* Arena::map(std::size_t length, Prot prot, const MapOptions& options) {
    static constexpr const char* call = "usermm::Arena::map";
    ArenaCore& a = live_arena(core_, call);
    const std::uintptr_t want = addr_of(options.address);
    prot = check_prot(call, prot, want);
    const std::size_t len = round_up_length(call, length, want);
    if (len > a.end - a.base)
        fail(ENOMEM, "{}: length {:#x} exceeds the arena's size {:#x} (addr {:#x})", call, length, a.end - a.base, want);
    if (options.fault_around_pages > (std::size_t(1) << 20))
        fail(EINVAL, "{}: fault_around_pages {} is above 2^20 (addr {:#x})", call, options.fault_around_pages, want);
    if (want) check_range(a, call, options.address, length);

    auto vma = std::make_unique<Vma>();
    vma->prot = prot;
    vma->fault_around_pages = std::uint32_t(options.fault_around_pages);
    set_name(*vma, options.name);

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    const std::uintptr_t start = place_vma(a, call, want, len, length);
    if (options.huge_pages) {
        // The advice is a VMA flag: the kernel splits the reservation at both ends, for good (no
        // advice returns a range to the default), unless a neighbour has it too; the protections
        // cannot show that: edge marks do, read from the kernel.
        const std::size_t first = a.page_index(start), last = a.page_index(start + len);
        const long before = long(mappings_around(a, first, last).size());
        const int err = page_advise_huge(start, len);
        settle_edges(a, first, last, before, Across::Apart, Across::Apart);
        if (err) fail(err, "{}: MADV_HUGEPAGE on addr {:#x} length {:#x} failed", call, start, length);
    }
    name_kernel_range(a, start, len, vma->name);
    insert_vma(a, vma.release(), start, len);
    return ptr_of(start);
}

void Arena::protect(void* addr, std::size_t length, Prot prot) {
    static constexpr const char* call = "usermm::Arena::protect";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    prot = check_prot(call, prot, r.start);
    SplitSpares spares;

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    if (a.snapshot_count) require_self_mem(call);  // snapshots take pages that gain write access
    // Throws, before anything changes, if part of the range is not mapped.
    refuse_stack_vmas(covering_vmas(a, call, r), call);
    for (const Vma* v : covering_vmas(a, call, r))
        if (allows(prot, Prot::Write) && !v->may_write && v->file && v->share == Share::Shared)
            fail(EACCES, "{}: addr {:#x}: VMA '{}' is a shared mapping of '{}', which is not open for writing", call,
                 std::max(v->start, r.start), v->name, v->file->path);
    change_pages(a, call, r, [prot](Prot old) { return old & prot; });
    change_vmas(a, call, r, spares, [prot](Vma& v) { v.prot = prot; });
}

void Arena::unmap(void* addr, std::size_t length) {
    static constexpr const char* call = "usermm::Arena::unmap";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    SplitSpares spares;

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    // Snapshots take pages they cannot read directly, and file parts become reservation again,
    // through /proc/self/mem.
    const std::vector<Vma*> vmas = covering_vmas(a, call, r);
    refuse_stack_vmas(vmas, call);
    if (a.snapshot_count || std::any_of(vmas.begin(), vmas.end(), [](const Vma* v) { return v->file != nullptr; }))
        require_self_mem(call);
    // Throws, before anything is unmapped, if part of the range is not mapped or a shared file
    // VMA's dirty pages cannot be written.
    for (Vma* v : vmas) writeback_now(a, *v, {std::max(v->start, r.start), std::min(v->end, r.end)}, call);
    for (Vma* v : vmas) release_file_pages(a, *v, {std::max(v->start, r.start), std::min(v->end, r.end)}, call);
    discard_range(a, call, r);
    unname_kernel_range(a, vmas, r);  // the reservation again: without names
    split_range(a, r, spares);
    int file_err = 0;
    bool kept = false;
    Range failed{};
    for (Vma* v : covering_vmas(a, call, r)) {
        bool replaced = true;
        if (v->file)
            if (const int err = unmap_file_part(a, {v->start, v->end}, &replaced); err && !file_err) {
                file_err = err;
                kept = !replaced;
                failed = {v->start, v->end};
            }
        // A file mapping the kernel would not replace stays a VMA (PROT_NONE, written back,
        // discarded): else anonymous memory placed there later would be the file's.
        if (!replaced) continue;
        vma_unlink(a, *v);
        vma_free(v);
    }
    a.last_hit.store(nullptr, std::memory_order_relaxed);
    if (file_err && kept)
        fail(file_err, "{}: the kernel refused to replace the file mapping [{:#x}, {:#x}) (at vm.max_map_count?); "
             "it stays mapped, PROT_NONE and written back", call, failed.start, failed.end);
    if (file_err)
        fail(file_err, "{}: [{:#x}, {:#x}) is unmapped but could not become the arena's reservation again", call,
             failed.start, failed.end);
}

void Arena::prefault(void* addr, std::size_t length, Prot access) {
    static constexpr const char* call = "usermm::Arena::prefault";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    access = check_prot(call, access, r.start);
    if (access == Prot::None)
        fail(EINVAL, "{}: access Prot::None at addr {:#x} grants nothing; prefault needs Read, Write or Exec", call,
             r.start);
    // File pages are read after the arena's lock is released (no usermm lock is held across I/O):
    // MADV_POPULATE_READ, or MADV_POPULATE_WRITE for a private VMA's copies.
    struct Populate {
        Range part;
        int advice;
    };
    std::vector<Populate> reads;
    {
        ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
        if (a.snapshot_count) require_self_mem(call);  // snapshots take pages that gain write access
        const std::vector<Vma*> vmas = covering_vmas(a, call, r);
        refuse_stack_vmas(vmas, call);  // Stack::ensure commits a stack
        auto part_of = [&r](const Vma* v) { return Range{std::max(v->start, r.start), std::min(v->end, r.end)}; };
        for (const Vma* v : vmas)
            if (!allows(v->prot, access))
                fail(EACCES, "{}: access {} at addr {:#x}: VMA '{}' [{:#x}, {:#x}) is {}", call, to_string(access),
                     std::max(v->start, r.start), v->name, v->start, v->end, to_string(v->prot));
        for (Vma* v : vmas)  // throws, before anything changes, if a file page lies past the end
            if (v->file) count_prefault_reads(a, *v, part_of(v), call);
        // Pages whose write-back failed get their content back before anything can touch them.
        for (Vma* v : vmas) put_back_saved(a, *v, part_of(v), call);
        for (Vma* v : vmas) {
            const Range part = part_of(v);
            const Prot grant = allows(access, Prot::Write) ? v->prot : (v->prot & ~Prot::Write);
            const std::size_t first = a.page_index(part.start), last = a.page_index(part.end);
            // Write access alone does not make a shared file page dirty: only a write does (which
            // the kernel then sees, and sync writes back).
            std::vector<bool> clean;
            if (v->file && v->share == Share::Shared && allows(grant, Prot::Write))
                for (std::size_t i = first; i < last; ++i)
                    clean.push_back(!(a.pte[i].load(std::memory_order_relaxed) & kPteDirtyFile));
            std::size_t pages = change_pages(a, call, part, [grant](Prot old) { return old | grant; });
            for (std::size_t k = 0; k < clean.size(); ++k)
                if (clean[k]) a.pte[first + k].fetch_and(pte_t(~kPteDirtyFile), std::memory_order_relaxed);
            if (allows(access, Prot::Write) && write_tracker().marks_outlive_protect && !v->file)
                pages += unmark_tracked(a, call, part);
            account_prefault(a, *v, pages);
            if (v->file)
                reads.push_back({part, allows(access, Prot::Write) && v->share == Share::Private ? MADV_POPULATE_WRITE
                                                                                                  : MADV_POPULATE_READ});
        }
    }
    for (const Populate& p : reads)
        if (const int err = page_advise(p.part.start, p.part.end - p.part.start, p.advice))
            fail(err == EFAULT ? EIO : err, "{}: reading the file pages of [{:#x}, {:#x}) failed (the kernel could not "
                 "read them, or they are no longer mapped)", call, p.part.start, p.part.end);
}

Stats Arena::stats() const {
    const ArenaCore& a = live_arena(core_, "usermm::Arena::stats");
    Stats s = a.stats.load();
    s.resident_pages = std::uint64_t(std::max<std::int64_t>(0, a.resident.load(std::memory_order_relaxed)));
    return s;
}

namespace {
VmaInfo vma_info(const ArenaCore& a, const Vma& v);  // with find_vma, below
}

std::vector<VmaInfo> Arena::vmas() const {
    ArenaCore& a = live_arena(core_, "usermm::Arena::vmas");
    std::vector<VmaInfo> out;
    ApiGuard<SharedGuard<RwSpinLock>> guard(a.lock);
    out.reserve(a.tree.size());
    for (const Vma& v : a.tree) out.push_back(vma_info(a, v));
    return out;
}

void Arena::verify() const {
    static constexpr const char* call = "usermm::Arena::verify";
    ArenaCore& a = live_arena(core_, call);
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);

    // The tree: ordered, disjoint, page-aligned, inside the arena.
    std::uintptr_t prev_end = a.base;
    for (const Vma& v : a.tree) {
        if (v.start < prev_end || v.start >= v.end || v.end > a.end || (v.start | v.end) & (g_page_size - 1))
            fail(EFAULT, "{}: VMA '{}' [{:#x}, {:#x}) is misplaced (previous ends at {:#x})", call, v.name, v.start,
                 v.end, prev_end);
        prev_end = v.end;
    }
    // The index: the tree's VMAs, each found from its first and last page and from the hole below.
    if (a.vma_index.usable()) {
        if (a.vma_index.size() != a.tree.size())
            fail(EFAULT, "{}: the VMA index holds {} VMAs, the tree {}", call, a.vma_index.size(), a.tree.size());
        std::uintptr_t below = a.base;
        for (const Vma& v : a.tree) {
            for (const std::uintptr_t at : {below, v.start, v.end - 1})
                if (const Vma* found = a.vma_index.find(at); found != &v)
                    fail(EFAULT, "{}: the VMA index finds {} for {:#x}, the tree '{}' [{:#x}, {:#x})", call,
                         found ? fmt::format("[{:#x}, {:#x})", found->start, found->end) : "no VMA", at, v.name,
                         v.start, v.end);
            below = v.end;
        }
        if (const Vma* found = a.vma_index.find(below); found)
            fail(EFAULT, "{}: the VMA index finds [{:#x}, {:#x}) above the last VMA's end {:#x}", call, found->start,
                 found->end, below);
    }

    // Per page: not locked, and within what its VMA allows (nothing outside a VMA). Pages whose
    // part of the PTE table was never touched are untouched themselves (zero PTEs): all checks
    // skip them.
    auto it = a.tree.begin();
    auto async = a.async_ranges.begin();
    const std::size_t npages = a.page_index(a.end);
    const std::vector<PageSpan> spans = pte_spans(a, 0, npages);
    for (const PageSpan& span : spans) {
        for (std::size_t i = span.first; i < span.last; ++i) {
            const pte_t v = a.pte[i].load(std::memory_order_relaxed);
            if (pte_prot(v) == 0 && !(v & (kPteLocked | kPteFile))) continue;
            const std::uintptr_t at = a.page_addr(i);
            while (it != a.tree.end() && it->end <= at) ++it;
            const bool inside = it != a.tree.end() && it->start <= at;
            if ((v & kPteFile) && !(inside && it->file))
                fail(EFAULT, "{}: page {:#x} is marked as a file page outside every file VMA", call, at);
            if (pte_prot(v) == 0 && !(v & kPteLocked)) continue;
            if (v & kPteLocked) fail(EFAULT, "{}: page {:#x} is locked with no fault in flight", call, at);
            if (!inside)
                fail(EFAULT, "{}: page {:#x} outside every VMA has protection {}", call, at, to_string(pte_to_prot(v)));
            if (!allows(it->prot, pte_to_prot(v)))
                fail(EFAULT, "{}: page {:#x} has protection {} beyond its VMA's {}", call, at, to_string(pte_to_prot(v)),
                     to_string(it->prot));
            // A page that can be written without usermm seeing it carries its change bit, or the
            // next snapshot would not arm it: anonymous pages outside stacks and outside the ranges
            // the kernel tracks (whose pages leave T without a note; leaving the mode notes them).
            while (async != a.async_ranges.end() && async->second <= i) ++async;
            const bool kernel_tracked = async != a.async_ranges.end() && async->first <= i;
            if (allows(pte_to_prot(v), Prot::Write) && !(v & (kPteWriteTracked | kPteGuard | kPteFile)) && !it->stack &&
                !kernel_tracked && !a.page_changed(i))
                fail(EFAULT, "{}: page {:#x} is writable and untracked, but not marked changed for the next snapshot",
                     call, at);
        }
    }
    // A group's summary bit is set exactly while one of its pages' bits is (a page is noted only
    // after its PTE is written: outside the touched parts of the PTE table both are clear).
    constexpr std::size_t kGroup = ArenaCore::kGroupPages;
    for (const PageSpan& span : spans)
        for (std::size_t g = span.first / kGroup; g < (span.last + kGroup - 1) / kGroup; ++g)
            if ((a.changed_in(g) != 0) != a.group_changed(g))
                fail(EFAULT, "{}: the change summary of pages [{:#x}, {:#x}) disagrees with their bits", call,
                     a.page_addr(g * kGroup), a.page_addr(std::min(npages, (g + 1) * kGroup)));

    // The kernel: its mappings must cover the arena without a gap, each page with its PTE's
    // protection and backing (the VMA's file at the VMA's offset for file pages, anonymous memory
    // otherwise).
    std::uintptr_t covered = a.base;
    const std::vector<KernelMapping> maps = kernel_mappings(a.base, a.end, call);
    auto check_page = [&](const KernelMapping& m, std::size_t i) {
        const pte_t v = a.pte[i].load(std::memory_order_relaxed);
        const Prot mine = pte_to_prot(v);
        if (mine != m.prot)
            fail(EFAULT, "{}: page {:#x} is {} in the kernel but {} in usermm", call, a.page_addr(i),
                 to_string(m.prot), to_string(mine));
        if (m.file() != bool(v & kPteFile))
            fail(EFAULT, "{}: page {:#x} is {} in the kernel but {} in usermm", call, a.page_addr(i),
                 m.file() ? "a file mapping" : "anonymous", m.file() ? "anonymous" : "a file page");
    };
    // A file mapping shows the file of each VMA it overlaps, at that VMA's offsets.
    auto check_file = [&](const KernelMapping& m) {
        for (auto v = a.tree.upper_bound(m.from); v != a.tree.end() && v->start < m.to; ++v) {
            const std::uintptr_t at = std::max(v->start, m.from);
            if (!v->file)
                fail(EFAULT, "{}: the kernel maps a file (inode {}) at {:#x} in anonymous VMA '{}'", call, m.inode, at,
                     v->name);
            const std::uint64_t offset = m.offset + (at - m.from);
            if (m.inode != v->file->ino || m.dev != v->file->dev || offset != v->file_page(at) << g_page_shift)
                fail(EFAULT, "{}: page {:#x} of VMA '{}' shows inode {} at offset {:#x} in the kernel, but '{}' "
                     "(inode {}) at offset {:#x} in usermm", call, at, v->name, m.inode, offset, v->file->path,
                     v->file->ino, v->file_page(at) << g_page_shift);
        }
    };
    std::size_t span = 0;
    for (const KernelMapping& m : maps) {
        if (m.from != covered) fail(EFAULT, "{}: the kernel has no mapping at {:#x} inside the arena", call, covered);
        const std::size_t first = a.page_index(m.from), last = a.page_index(m.to);
        if (m.file()) check_file(m);
        if (m.prot != Prot::None || m.file()) {
            for (std::size_t i = first; i < last; ++i) check_page(m, i);
        } else {  // what a zero PTE says: only the touched parts of the table can disagree
            while (span < spans.size() && spans[span].last <= first) ++span;
            for (std::size_t k = span; k < spans.size() && spans[k].first < last; ++k)
                for (std::size_t i = std::max(first, spans[k].first); i < std::min(last, spans[k].last); ++i)
                    check_page(m, i);
        }
        covered = m.to;
    }
    if (covered != a.end) fail(EFAULT, "{}: the kernel has no mapping at {:#x} inside the arena", call, covered);
    // The map budget rests on usermm's count of the kernel mappings the arena consists of.
    if (const long mine = a.kernel_maps.load() - kArenaTableMaps; mine != long(maps.size()))
        fail(EFAULT, "{}: the kernel has {} mappings in the arena [{:#x}, {:#x}) but usermm counts {}", call,
             maps.size(), a.base, a.end, mine);

    write_tracker().verify(a, call, spans);
    verify_stacks(a, call);
    if (a.reclaimer) a.reclaimer->verify(call);
}

// --- conveniences: find_vma, engine, Mapping -------------------------------------------------

namespace {

// Committed and resident bytes of a VMA (see VmaInfo). A page of the page-state table that the
// kernel does not hold was never written, so every page it describes is untouched: only the table's
// resident pages are read (mincore on the table), which keeps the cost with the pages used. (A
// table page that was swapped out is skipped too: its pages count as neither.)
std::pair<std::size_t, std::size_t> vma_usage(const ArenaCore& a, const Vma& v) {
    static constexpr const char* call = "usermm::Arena::vmas";
    const std::size_t per_table_page = g_page_size / sizeof(Pte);
    const std::size_t first = a.page_index(v.start), last = a.page_index(v.end);
    auto holds_memory = [&a, &v](std::size_t i) {
        const pte_t p = a.pte[i].load(std::memory_order_relaxed);
        return (p & kPtePopulated) || (v.file && pte_prot(p) != 0) ? 1 : kNoRun;
    };
    std::size_t committed = 0, resident = 0;
    constexpr std::size_t kTablePagesPerCall = 4096;
    std::vector<unsigned char> table(kTablePagesPerCall), pages;
    const std::size_t last_table_page = (last - 1) / per_table_page + 1;
    for (std::size_t t = first / per_table_page; t < last_table_page; t += kTablePagesPerCall) {
        const std::size_t n = std::min(kTablePagesPerCall, last_table_page - t);
        const std::uintptr_t at = addr_of(&a.pte[t * per_table_page]);
        if (const int err = page_resident(at, n << g_page_shift, table.data()))
            fail(err, "{}: mincore of the page-state table of VMA '{}' [{:#x}, {:#x}) failed", call, v.name, v.start,
                 v.end);
        for (std::size_t k = 0; k < n; ++k) {
            if (!(table[k] & 1)) continue;
            const std::size_t lo = std::max(first, (t + k) * per_table_page);
            const std::size_t hi = std::min(last, (t + k + 1) * per_table_page);
            for_each_run(lo, hi, holds_memory, [&](std::size_t i, std::size_t j, int) {
                committed += j - i;
                pages.resize(j - i);
                if (const int err = page_resident(a.page_addr(i), (j - i) << g_page_shift, pages.data()))
                    fail(err, "{}: mincore of [{:#x}, {:#x}) in VMA '{}' failed", call, a.page_addr(i), a.page_addr(j),
                         v.name);
                for (unsigned char c : pages) resident += c & 1;
            });
        }
    }
    return {committed << g_page_shift, resident << g_page_shift};
}

VmaInfo vma_info(const ArenaCore& a, const Vma& v) {
    const auto [committed, resident] = vma_usage(a, v);
    return {ptr_of(v.start), v.end - v.start, v.prot, v.name, v.fault_around_pages, v.file ? v.file->path : "",
            v.pgoff << g_page_shift, v.share, committed, resident, v.stats->load()};
}

}  // namespace

std::optional<VmaInfo> Arena::find_vma(std::string_view name) const {
    ArenaCore& a = live_arena(core_, "usermm::Arena::find_vma");
    const std::string_view kept = name.substr(0, kVmaNameMax - 1);
    ApiGuard<SharedGuard<RwSpinLock>> guard(a.lock);
    for (const Vma& v : a.tree)
        if (kept == v.name) return vma_info(a, v);
    return std::nullopt;
}

Engine engine() {
    init_process();
    return write_tracker().engine;
}

Mapping::Mapping(Arena& arena, std::size_t length, Prot prot, const MapOptions& options)
    : arena_(&arena), addr_(arena.map(length, prot, options)), length_(length) {}

Mapping::Mapping(Mapping&& other) noexcept
    : arena_(std::exchange(other.arena_, nullptr)),
      addr_(std::exchange(other.addr_, nullptr)),
      length_(std::exchange(other.length_, 0)) {}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
    if (this != &other) {
        Mapping dying(std::move(*this));
        arena_ = std::exchange(other.arena_, nullptr);
        addr_ = std::exchange(other.addr_, nullptr);
        length_ = std::exchange(other.length_, 0);
    }
    return *this;
}

Mapping::~Mapping() {
    if (!addr_) return;
    try {
        arena_->unmap(addr_, length_);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "usermm: usermm::Mapping::~Mapping: %s\n", e.what());
    }
}

void* Mapping::release() {
    arena_ = nullptr;
    length_ = 0;
    return std::exchange(addr_, nullptr);
}

}  // namespace usermm
