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
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <string>

#include "account.hpp"
#include "fault_entry.hpp"
#include "find_vma.hpp"
#include "map_budget.hpp"
#include "page_ops.hpp"
#include "snapshot.hpp"

namespace usermm {

using namespace detail;

namespace {

template <typename... Args>
[[noreturn]] void fail(int err, fmt::format_string<Args...> format, Args&&... args) {
    throw Error(err, fmt::format(format, std::forward<Args>(args)...));
}

// --- process-wide set-up ---------------------------------------------------------------------

long read_long_file(const char* path, long fallback) {
    std::ifstream in(path);
    long v = fallback;
    if (!(in >> v)) return fallback;
    return v;
}

long count_process_mappings() {
    std::ifstream in("/proc/self/maps");
    long n = 0;
    for (std::string line; std::getline(in, line);) ++n;
    return n;
}

// The share of vm.max_map_count usermm may use: what the process has not used yet, less a reserve
// for the program's own later mappings (thread stacks, malloc arenas, libraries). USERMM_MAP_BUDGET
// sets it directly.
long initial_map_budget() {
    if (const char* env = std::getenv("USERMM_MAP_BUDGET")) {
        char* end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end != env && v > 0) return v;
    }
    const long max = read_long_file("/proc/sys/vm/max_map_count", 65530);
    const long reserve = std::max(1024L, max / 8);
    return std::max(64L, max - count_process_mappings() - reserve);
}

// fork(): no fault may be mid-way when the address space is copied, or the child would inherit a
// locked PTE or a held read lock whose owner does not exist there. So the registry and every arena
// are write-locked around fork, which waits for faults in flight, as the kernel's dup_mmap holds
// mmap_lock.
void fork_prepare() {
    ArenaRegistry& reg = arena_registry();
    reg.lock.lock();
    for (std::size_t i = 0; i < reg.count; ++i) reg.arenas[i]->lock.lock();
}

void fork_release() {
    ArenaRegistry& reg = arena_registry();
    for (std::size_t i = 0; i < reg.count; ++i) reg.arenas[i]->lock.unlock();
    reg.lock.unlock();
}

// Kernel mappings inside [lo, hi) now.
long count_mappings_within(std::uintptr_t lo, std::uintptr_t hi) {
    std::ifstream in("/proc/self/maps");
    long n = 0;
    for (std::string line; std::getline(in, line);) {
        unsigned long from = 0, to = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx", &from, &to) == 2 && from < hi && to > lo) ++n;
    }
    return n;
}

// The child's copy of every arena is complete (no fault was in flight); what changes is how the
// kernel will merge its pieces (see map_budget_after_fork). glibc makes malloc usable in the child
// before this runs.
void fork_child() {
    ArenaRegistry& reg = arena_registry();
    for (std::size_t i = 0; i < reg.count; ++i) {
        ArenaCore& a = *reg.arenas[i];
        map_budget_after_fork(a, count_mappings_within(a.base, a.end) + 1);  // + its PTE table
    }
    fork_release();
}

void print_stats_at_exit() {
    const std::string table = format_stats(process_stats());
    std::fprintf(stderr, "usermm process stats\n%s", table.c_str());
}

void init_process() {
    static std::once_flag once;
    std::call_once(once, [] {
        const long ps = sysconf(_SC_PAGESIZE);
        g_page_size = std::size_t(ps);
        g_page_shift = std::size_t(std::countr_zero(std::size_t(ps)));
        map_budget_set_limit(initial_map_budget());
        if (const int err = install_fault_handlers()) fail(err, "usermm: cannot install the SIGSEGV/SIGBUS handlers");
        pthread_atfork(fork_prepare, fork_release, fork_child);
        if (const char* env = std::getenv("USERMM_STATS"); env && std::strcmp(env, "1") == 0)
            std::atexit(print_stats_at_exit);
    });
}

// Holds one of usermm's locks with the asynchronous signals blocked. A signal handler that touched
// arena memory while this thread holds the write side would fault into a lock its own thread holds;
// the kernel, likewise, never runs a handler while it holds mmap_lock. Synchronous signals stay
// deliverable: blocking them would not stop them, only make the kernel kill the process.
template <typename Guard>
class ApiGuard {
public:
    explicit ApiGuard(RwSpinLock& lock) : mask_(block_async_signals()), guard_(lock) {}
    ~ApiGuard() = default;
    ApiGuard(const ApiGuard&) = delete;
    ApiGuard& operator=(const ApiGuard&) = delete;

private:
    class SavedMask {
    public:
        explicit SavedMask(const sigset_t& saved) : saved_(saved) {}
        ~SavedMask() { pthread_sigmask(SIG_SETMASK, &saved_, nullptr); }
        SavedMask(const SavedMask&) = delete;
        SavedMask& operator=(const SavedMask&) = delete;

    private:
        sigset_t saved_;
    };

    static sigset_t block_async_signals() {
        sigset_t all, saved;
        sigfillset(&all);
        for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS}) sigdelset(&all, sig);
        pthread_sigmask(SIG_BLOCK, &all, &saved);
        return saved;
    }

    SavedMask mask_;  // declared first: restored after the lock is released
    Guard guard_;
};

// --- arguments -------------------------------------------------------------------------------

std::uintptr_t addr_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
void* ptr_of(std::uintptr_t a) { return reinterpret_cast<void*>(a); }

// A validated, page-rounded byte range inside the arena.
struct Range {
    std::uintptr_t start;
    std::uintptr_t end;
};

std::size_t round_up_length(const char* call, std::size_t length, std::uintptr_t addr, const char* name = "length") {
    if (length == 0) fail(EINVAL, "{}: {} is zero (addr {:#x})", call, name, addr);
    if (length > std::numeric_limits<std::size_t>::max() - g_page_size)
        fail(EINVAL, "{}: {} {:#x} overflows (addr {:#x})", call, name, length, addr);
    return (length + g_page_size - 1) & ~(g_page_size - 1);
}

Range check_range(const ArenaCore& a, const char* call, const void* addr, std::size_t length) {
    const std::uintptr_t start = addr_of(addr);
    if (start & (g_page_size - 1)) fail(EINVAL, "{}: addr {:#x} is not page-aligned", call, start);
    const std::size_t len = round_up_length(call, length, start);
    if (start < a.base || start >= a.end || len > a.end - start)
        fail(EINVAL, "{}: range addr {:#x} + length {:#x} is outside the arena [{:#x}, {:#x})", call, start, length,
             a.base, a.end);
    return {start, start + len};
}

Prot check_prot(const char* call, Prot prot, std::uintptr_t addr) {
    if (unsigned(prot) & ~7u) fail(EINVAL, "{}: prot {:#x} has unknown bits (addr {:#x})", call, unsigned(prot), addr);
    return normalize(prot);
}

// The VMAs covering [r.start, r.end) in order; throws if any byte of it is not mapped.
std::vector<Vma*> covering_vmas(ArenaCore& a, const char* call, Range r) {
    std::vector<Vma*> out;
    std::uintptr_t at = r.start;
    for (auto it = a.tree.upper_bound(r.start); at < r.end; ++it) {
        if (it == a.tree.end() || it->start > at)
            fail(ENOMEM, "{}: address {:#x} in range [{:#x}, {:#x}) is not mapped", call, at, r.start, r.end);
        out.push_back(&*it);
        at = it->end;
    }
    return out;
}

// --- pages -------------------------------------------------------------------------------------

std::uintptr_t page_address(const ArenaCore& a, std::size_t index) {
    return a.base + (std::uintptr_t(index) << g_page_shift);
}

Prot parse_perms(const char* perms) {
    return (perms[0] == 'r' ? Prot::Read : Prot::None) | (perms[1] == 'w' ? Prot::Write : Prot::None) |
           (perms[2] == 'x' ? Prot::Exec : Prot::None);
}

// After a refused mprotect, which may have changed a prefix of its range: the PTEs of pages
// [first, last) take whatever protection the kernel now has for them.
void resync_ptes(ArenaCore& a, std::size_t first, std::size_t last) {
    const std::uintptr_t lo = page_address(a, first), hi = page_address(a, last);
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
        unsigned long from = 0, to = 0;
        char perms[5] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %4s", &from, &to, perms) != 3 || to <= lo || from >= hi) continue;
        const Prot kernel = parse_perms(perms);
        for (std::size_t i = a.page_index(std::max<std::uintptr_t>(from, lo)), end = a.page_index(std::min<std::uintptr_t>(to, hi));
             i < end; ++i)
            a.pte[i].store(pte_with_prot(a.pte[i].load(std::memory_order_relaxed), kernel), std::memory_order_relaxed);
    }
}

// Gives every page of [r.start, r.end) the protection change(old) and records it, one mprotect per
// run of pages that share their old protection; pages that change also get `flags`. Pages that
// gain write access first give live snapshots what they need. Under the write lock, so no PTE is
// locked. If the kernel refuses partway, the PTEs are re-read from the kernel before the error is
// thrown.
template <typename Change>
std::size_t change_pages(ArenaCore& a, const char* call, Range r, Change change, pte_t flags = 0) {
    std::size_t changed = 0;
    const std::size_t last = a.page_index(r.end);
    for (std::size_t i = a.page_index(r.start); i < last;) {
        const pte_t old_prot = pte_prot(a.pte[i].load(std::memory_order_relaxed));
        std::size_t j = i + 1;
        while (j < last && pte_prot(a.pte[j].load(std::memory_order_relaxed)) == old_prot) ++j;
        const Prot next = change(pte_to_prot(old_prot));
        if (next != pte_to_prot(old_prot)) {
            if (allows(next, Prot::Write) && a.snapshot_count) {
                std::uint32_t copies = 0;
                for (std::size_t k = i; k < j; ++k)
                    if (const int err = preserve_for_snapshots(a, k, a.pte[k].load(std::memory_order_relaxed), &copies))
                        fail(err, "{}: cannot save page {:#x} for a snapshot", call, page_address(a, k));
            }
            const long delta = map_count_delta(a, i, j, next);
            if (const int err = page_protect(page_address(a, i), (j - i) << g_page_shift, next)) {
                resync_ptes(a, i, j);
                map_budget_charge(a, count_mappings_within(a.base, a.end) + 1 - a.kernel_maps.load());
                fail(err, "{}: mprotect of [{:#x}, {:#x}) to {} failed", call, page_address(a, i), page_address(a, j),
                     to_string(next));
            }
            map_budget_charge(a, delta);
            for (std::size_t k = i; k < j; ++k) {
                const pte_t old = a.pte[k].load(std::memory_order_relaxed);
                a.pte[k].store(pte_with_prot(old, next) | flags, std::memory_order_relaxed);
            }
            changed += j - i;
        }
        i = j;
    }
    return changed;
}

// What a PTE keeps when its page's content is discarded: a page that held data has changed.
pte_t discarded(pte_t v) { return pte_t((v & kPteDirty) | ((v & kPtePopulated) ? kPteDirty : 0)); }

// Forgets the PTEs of a range that is PROT_NONE and empty in the kernel again. A page of the table
// that ends up all zero goes back to the kernel; reading the untouched parts of the table maps the
// kernel's zero page, so clearing never makes the table resident.
void clear_ptes(ArenaCore& a, Range r) {
    const std::size_t last = a.page_index(r.end);
    const std::size_t per_table_page = g_page_size;
    for (std::size_t i = a.page_index(r.start); i < last;) {
        const std::size_t block_end = std::min(last, (i / per_table_page + 1) * per_table_page);
        bool kept = false;
        for (std::size_t k = i; k < block_end; ++k) {
            const pte_t v = a.pte[k].load(std::memory_order_relaxed);
            if (!v) continue;
            const pte_t n = discarded(v);
            kept |= n != 0;
            a.pte[k].store(n, std::memory_order_relaxed);
        }
        if (!kept && i % per_table_page == 0 && block_end - i == per_table_page)
            page_discard(addr_of(&a.pte[i]), g_page_size);
        i = block_end;
    }
}

// Before pages of `r` lose their content: live snapshots take what they still read from them.
void preserve_range(ArenaCore& a, const char* call, Range r) {
    if (!a.snapshot_count) return;
    std::uint32_t copies = 0;
    for (std::size_t i = a.page_index(r.start), last = a.page_index(r.end); i < last; ++i)
        if (const int err = preserve_for_snapshots(a, i, a.pte[i].load(std::memory_order_relaxed), &copies))
            fail(err, "{}: cannot save page {:#x} for a snapshot", call, page_address(a, i));
}

// --- the tree ----------------------------------------------------------------------------------

void set_name(Vma& v, std::string_view name) {
    const std::size_t n = std::min(name.size(), kVmaNameMax - 1);
    if (n) std::memcpy(v.name, name.data(), n);  // an empty view may have no data pointer
    v.name[n] = 0;
}

bool mergeable(const Vma& lo, const Vma& hi) {
    return lo.end == hi.start && lo.prot == hi.prot && lo.fault_around_pages == hi.fault_around_pages &&
           std::strcmp(lo.name, hi.name) == 0;
}

// Splits the VMA containing `at` (if `at` is inside it, not at its start) into [start, at) and
// [at, end). The upper part keeps the node, its key and its counters; `spare` becomes the lower.
void split_at(ArenaCore& a, std::uintptr_t at, std::unique_ptr<Vma>& spare) {
    auto it = a.tree.upper_bound(at);
    if (it == a.tree.end() || it->start >= at) return;
    Vma* lower = spare.release();
    lower->start = it->start;
    lower->end = at;
    lower->prot = it->prot;
    lower->fault_around_pages = it->fault_around_pages;
    std::memcpy(lower->name, it->name, kVmaNameMax);
    it->start = at;
    a.tree.insert(*lower);
}

// Merges neighbouring VMAs in and around [start, end) where the kernel would (same protection, name
// and fault-around). The upper node survives, so no key changes; it keeps the sum of the counters.
void merge_range(ArenaCore& a, std::uintptr_t start, std::uintptr_t end) {
    auto it = a.tree.upper_bound(start);
    if (it != a.tree.begin()) --it;
    while (it != a.tree.end() && it->start <= end) {
        auto next = std::next(it);
        if (next == a.tree.end()) break;
        if (mergeable(*it, *next)) {
            next->start = it->start;
            next->stats.add(it->stats.load());
            Vma* dead = &*it;
            it = a.tree.erase(it);
            delete dead;
        } else {
            it = next;
        }
    }
}

bool range_free(ArenaCore& a, std::uintptr_t start, std::size_t len) {
    const Vma* v = find_vma(a, start);
    return !v || v->start >= start + len;
}

// First fit above the last placement, then from the arena's base.
std::uintptr_t find_free(ArenaCore& a, std::uintptr_t hint, std::size_t len) {
    if (hint >= a.base && hint <= a.end && len <= a.end - hint && range_free(a, hint, len)) return hint;
    std::uintptr_t gap = a.base;
    for (const Vma& v : a.tree) {
        if (v.start - gap >= len) return gap;
        gap = v.end;
    }
    if (a.end - gap >= len) return gap;
    return 0;
}

}  // namespace

std::size_t page_size() {
    init_process();
    return g_page_size;
}

std::string to_string(Prot p) {
    return {allows(p, Prot::Read) ? 'r' : '-', allows(p, Prot::Write) ? 'w' : '-', allows(p, Prot::Exec) ? 'x' : '-'};
}

Stats process_stats() { return process_counters().load(); }

// --- Arena -------------------------------------------------------------------------------------

Arena::Arena(std::size_t size) {
    init_process();
    const std::size_t len = round_up_length("usermm::Arena", size, 0, "size");
    auto core = std::make_unique<ArenaCore>();
    void* base = nullptr;
    if (const int err = page_reserve(len, &base))
        fail(err, "usermm::Arena: cannot reserve size {:#x} bytes of address space", size);
    core->base = addr_of(base);
    core->end = core->base + len;
    core->pte_bytes = len >> g_page_shift;
    void* table = nullptr;
    if (const int err = page_alloc_table(core->pte_bytes, &table)) {
        page_release(core->base, len);
        fail(err, "usermm::Arena: cannot reserve the page table for size {:#x}", size);
    }
    core->pte = static_cast<Pte*>(table);

    ArenaRegistry& reg = arena_registry();
    {
        ApiGuard<ExclusiveGuard<RwSpinLock>> guard(reg.lock);
        if (reg.count == kMaxArenas) {
            page_release(core->base, len);
            page_release(addr_of(table), core->pte_bytes);
            fail(ENOMEM, "usermm::Arena: more than {} arenas", kMaxArenas);
        }
        std::size_t i = reg.count;
        while (i > 0 && reg.arenas[i - 1]->base > core->base) {
            reg.arenas[i] = reg.arenas[i - 1];
            --i;
        }
        reg.arenas[i] = core.get();
        ++reg.count;
    }
    map_budget_charge(*core, 2);  // the reservation and its PTE table
    core_ = std::move(core);
}

Arena::~Arena() {
    if (!core_) return;
    ArenaCore& a = *core_;
    {
        ArenaRegistry& reg = arena_registry();
        ApiGuard<ExclusiveGuard<RwSpinLock>> guard(reg.lock);
        std::size_t i = 0;
        while (reg.arenas[i] != &a) ++i;
        std::copy(reg.arenas + i + 1, reg.arenas + reg.count, reg.arenas + i);
        --reg.count;
    }
    a.lock.lock();  // faults already inside the arena finish first
    map_budget_charge(a, -a.kernel_maps.load());
    page_release(a.base, a.end - a.base);
    page_release(addr_of(a.pte), a.pte_bytes);
    a.tree.clear_and_dispose([](Vma* v) { delete v; });
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

void* Arena::base() const { return ptr_of(core_->base); }
std::size_t Arena::size() const { return core_->end - core_->base; }
bool Arena::contains(const void* p) const { return addr_of(p) >= core_->base && addr_of(p) < core_->end; }

void* Arena::map(std::size_t length, Prot prot, const MapOptions& options) {
    static constexpr const char* call = "usermm::Arena::map";
    ArenaCore& a = *core_;
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

    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    std::uintptr_t start = want;
    if (want) {
        if (!range_free(a, want, len))
            fail(EEXIST, "{}: range addr {:#x} + length {:#x} overlaps an existing VMA", call, want, length);
    } else {
        start = find_free(a, a.next_hint, len);
        if (!start) fail(ENOMEM, "{}: no free range of length {:#x} in the arena [{:#x}, {:#x})", call, length, a.base, a.end);
    }
    vma->start = start;
    vma->end = start + len;
    a.tree.insert(*vma.release());
    a.next_hint = start + len;
    merge_range(a, start, start + len);
    a.last_hit.store(nullptr, std::memory_order_relaxed);
    return ptr_of(start);
}

void Arena::protect(void* addr, std::size_t length, Prot prot) {
    static constexpr const char* call = "usermm::Arena::protect";
    ArenaCore& a = *core_;
    const Range r = check_range(a, call, addr, length);
    prot = check_prot(call, prot, r.start);
    auto lower_spare = std::make_unique<Vma>();
    auto upper_spare = std::make_unique<Vma>();

    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    covering_vmas(a, call, r);
    change_pages(a, call, r, [prot](Prot old) { return old & prot; });
    split_at(a, r.start, lower_spare);
    split_at(a, r.end, upper_spare);
    for (Vma* v : covering_vmas(a, call, r)) v->prot = prot;
    merge_range(a, r.start, r.end);
    a.last_hit.store(nullptr, std::memory_order_relaxed);
}

void Arena::unmap(void* addr, std::size_t length) {
    static constexpr const char* call = "usermm::Arena::unmap";
    ArenaCore& a = *core_;
    const Range r = check_range(a, call, addr, length);
    auto lower_spare = std::make_unique<Vma>();
    auto upper_spare = std::make_unique<Vma>();

    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    covering_vmas(a, call, r);
    preserve_range(a, call, r);
    change_pages(a, call, r, [](Prot) { return Prot::None; });
    page_discard(r.start, r.end - r.start);
    clear_ptes(a, r);
    split_at(a, r.start, lower_spare);
    split_at(a, r.end, upper_spare);
    for (Vma* v : covering_vmas(a, call, r)) {
        a.tree.erase(a.tree.iterator_to(*v));
        delete v;
    }
    a.last_hit.store(nullptr, std::memory_order_relaxed);
}

void Arena::prefault(void* addr, std::size_t length, Prot access) {
    static constexpr const char* call = "usermm::Arena::prefault";
    ArenaCore& a = *core_;
    const Range r = check_range(a, call, addr, length);
    access = check_prot(call, access, r.start);
    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
    const std::vector<Vma*> vmas = covering_vmas(a, call, r);
    for (const Vma* v : vmas)
        if (!allows(v->prot, access))
            fail(EACCES, "{}: access {} at addr {:#x}: VMA '{}' [{:#x}, {:#x}) is {}", call, to_string(access),
                 std::max(v->start, r.start), v->name, v->start, v->end, to_string(v->prot));
    for (Vma* v : vmas) {
        const Range part{std::max(v->start, r.start), std::min(v->end, r.end)};
        const Prot grant = allows(access, Prot::Write) ? v->prot : (v->prot & ~Prot::Write);
        const std::size_t pages = change_pages(a, call, part, [grant](Prot old) { return old | grant; });
        account_prefault(a, *v, pages);
    }
}

Stats Arena::stats() const { return core_->stats.load(); }

std::vector<VmaInfo> Arena::vmas() const {
    ArenaCore& a = *core_;
    std::vector<VmaInfo> out;
    ApiGuard<SharedGuard<RwSpinLock>> guard(a.lock);
    out.reserve(a.tree.size());
    for (const Vma& v : a.tree)
        out.push_back({ptr_of(v.start), v.end - v.start, v.prot, v.name, v.fault_around_pages, v.stats.load()});
    return out;
}

void Arena::verify() const {
    static constexpr const char* call = "usermm::Arena::verify";
    ArenaCore& a = *core_;
    ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);

    // The tree: ordered, disjoint, page-aligned, inside the arena.
    std::uintptr_t prev_end = a.base;
    for (const Vma& v : a.tree) {
        if (v.start < prev_end || v.start >= v.end || v.end > a.end || (v.start | v.end) & (g_page_size - 1))
            fail(EFAULT, "{}: VMA '{}' [{:#x}, {:#x}) is misplaced (previous ends at {:#x})", call, v.name, v.start,
                 v.end, prev_end);
        prev_end = v.end;
    }

    // Per page: not locked, and within what its VMA allows (nothing outside a VMA).
    auto it = a.tree.begin();
    const std::size_t npages = a.page_index(a.end);
    for (std::size_t i = 0; i < npages; ++i) {
        const pte_t v = a.pte[i].load(std::memory_order_relaxed);
        if (pte_prot(v) == 0 && !(v & kPteLocked)) continue;
        const std::uintptr_t at = page_address(a, i);
        while (it != a.tree.end() && it->end <= at) ++it;
        const bool inside = it != a.tree.end() && it->start <= at;
        if (v & kPteLocked) fail(EFAULT, "{}: page {:#x} is locked with no fault in flight", call, at);
        if (!inside) fail(EFAULT, "{}: page {:#x} outside every VMA has protection {}", call, at, to_string(pte_to_prot(v)));
        if (!allows(it->prot, pte_to_prot(v)))
            fail(EFAULT, "{}: page {:#x} has protection {} beyond its VMA's {}", call, at, to_string(pte_to_prot(v)),
                 to_string(it->prot));
    }

    // The kernel: /proc/self/maps must cover the arena without a gap, each page with its PTE's
    // protection.
    std::ifstream maps("/proc/self/maps");
    std::uintptr_t covered = a.base;
    for (std::string line; std::getline(maps, line);) {
        unsigned long lo = 0, hi = 0;
        char perms[5] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) != 3) continue;
        if (hi <= a.base || lo >= a.end) continue;
        const std::uintptr_t from = std::max<std::uintptr_t>(lo, a.base), to = std::min<std::uintptr_t>(hi, a.end);
        if (from != covered) fail(EFAULT, "{}: the kernel has no mapping at {:#x} inside the arena", call, covered);
        const Prot kernel = parse_perms(perms);
        for (std::size_t i = a.page_index(from), last = a.page_index(to); i < last; ++i) {
            const Prot mine = pte_to_prot(a.pte[i].load(std::memory_order_relaxed));
            if (mine != kernel)
                fail(EFAULT, "{}: page {:#x} is {} in the kernel but {} in usermm", call, page_address(a, i),
                     to_string(kernel), to_string(mine));
        }
        covered = to;
    }
    if (covered != a.end) fail(EFAULT, "{}: the kernel has no mapping at {:#x} inside the arena", call, covered);
}

}  // namespace usermm
