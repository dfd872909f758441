// Snapshots, restore and dirty tracking: the API side of copy-before-write (snapshot_cow.cpp is the
// fault side).
//
// Taking a snapshot withholds write access from every page of its range that has it (write
// tracking), so that the next write to any of them faults, and the fault gives the snapshot the
// old content before it grants the write. Pages that had no write access fault anyway. Reading a
// snapshot takes each page from the snapshot's store if it was copied, or from the arena if it has
// not changed, holding the page's slot meanwhile so that no write can start under the copy.
#include <algorithm>
#include <bit>
#include <cstring>

#include "account.hpp"
#include "arena_ops.hpp"
#include "dirty_async.hpp"
#include "file_vma.hpp"
#include "find_vma.hpp"
#include "map_budget.hpp"
#include "probes.hpp"
#include "snapshot_read.hpp"
#include "store_pool.hpp"
#include "reclaim.hpp"
#include "write_tracking.hpp"

namespace usermm {

using namespace detail;

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kAcquire = std::memory_order_acquire;
constexpr auto kRelease = std::memory_order_release;

void give_back_write_access(ArenaCore& a, std::size_t first, std::size_t last);

// Frees a snapshot: unlinks it from its arena, gives write access back where nothing needs it
// tracked any more, and releases its store.
void release_snapshot(SnapshotCore* s) {
    if (ArenaCore* a = s->arena) {
        ApiGuard<std::lock_guard<RwSpinLock>> guard(a->lock);
        auto* end = a->snapshots + a->snapshot_count;
        std::remove(a->snapshots, end, s);
        a->snapshots[--a->snapshot_count] = nullptr;
        // Change records older than every live snapshot can never be asked for again.
        std::uint64_t oldest = a->snapshot_sequence + 1;
        for (std::size_t i = 0; i < a->snapshot_count; ++i) oldest = std::min(oldest, a->snapshots[i]->sequence);
        std::erase_if(a->history, [oldest](const ChangeRecord& r) { return r.sequence <= oldest; });
        give_back_write_access(*a, s->first, s->last);
    }
    const std::size_t copied = std::min<std::size_t>(s->used.load(kRelaxed), s->last - s->first);
    store_release({s->store, s->store_pages, std::max(copied, s->store_backed), s->store_shared, s->store_forks});
    page_release(addr_of(s->slots), s->last - s->first);
    page_release(addr_of(s->index), (s->last - s->first) * sizeof(std::uint32_t));
    delete s;
}

bool needed_by_a_snapshot(const ArenaCore& a, std::size_t page) {
    for (std::size_t i = 0; i < a.snapshot_count; ++i) {
        const SnapshotCore& s = *a.snapshots[i];
        if (!s.covers(page)) continue;
        // Synced pages are tracked too: their next change must drop "synced" for restore().
        const slot_t state = settled_slot(s, page);
        if (state == kSlotInArena || state == kSlotCopiedSynced || state == kSlotZeroSynced) return true;
    }
    return false;
}

// Pages of [first, last) whose write access is withheld only for tracking that nobody needs now
// get it back, one mprotect per run. Best effort: a page left tracked merely faults once more.
// Only the touched parts of the page table are looked at (an untouched page is not tracked).
void give_back_write_access(ArenaCore& a, std::size_t first, std::size_t last) {
    const WriteTracker& tracker = write_tracker();
    auto eligible = [&](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        if (!(v & kPteWriteTracked) || (a.collect_armed && !(v & kPteDirtyCollect)) || needed_by_a_snapshot(a, i))
            return false;
        return tracker.withheld_only(a, i, v);
    };
    auto key = [&](std::size_t i) { return eligible(i) ? int(pte_prot(a.pte[i].load(kRelaxed))) : kNoRun; };
    auto give_back = [&](std::size_t i, std::size_t j, int prot) {
        // No dirty bits: the page has not changed. Where collect_dirty() is armed, eligible() took
        // only pages it already counts as dirty; a snapshot older than this one recorded the change.
        // Best effort: after a refused mprotect the PTEs were re-read from the kernel.
        if (tracker.disarm(a, i, j, pte_to_prot(pte_t(prot))) != 0) return;
        for (std::size_t k = i; k < j; ++k) {
            const pte_t v = a.pte[k].load(kRelaxed);
            a.pte[k].store(pte_t((v & ~kPteWriteTracked) | kPtePopulated | to_pte(Prot::Write)), kRelaxed);
            a.note_changed(k);
        }
    };
    for (const PageSpan& span : pte_spans(a, first, last)) for_each_run(span.first, span.last, key, give_back);
}

std::shared_ptr<SnapshotCore> new_snapshot_core(ArenaCore& a, Range r) {
    static constexpr const char* call = "usermm::Arena::snapshot";
    const std::size_t pages = (r.end - r.start) >> g_page_shift;
    StoreSpan store;
    void* slots = nullptr;
    void* index = nullptr;
    if (pages > UINT32_MAX) fail(EINVAL, "{}: length {:#x} at addr {:#x} is above 2^32 pages", call, r.end - r.start, r.start);
    if (const int err = store_reserve(pages, &store))
        fail(err, "{}: cannot reserve {:#x} bytes of store for addr {:#x}", call, pages << g_page_shift, r.start);
    if (const int err = page_alloc_table(pages, &slots)) {
        store_release(store);
        fail(err, "{}: cannot reserve the slot table for addr {:#x}", call, r.start);
    }
    if (const int err = page_alloc_table(pages * sizeof(std::uint32_t), &index)) {
        store_release(store);
        page_release(addr_of(slots), pages);
        fail(err, "{}: cannot reserve the store index for addr {:#x}", call, r.start);
    }
    auto* s = new SnapshotCore;
    s->arena_base = a.base;
    s->arena_id = a.id;
    s->chain = a.identity;
    s->arena_size = a.end - a.base;
    s->first = a.page_index(r.start);
    s->last = a.page_index(r.end);
    s->store = store.base;
    s->store_pages = store.pages;
    s->store_backed = store.backed;
    s->store_shared = store.shared;
    s->store_forks = store.forks;
    s->slots = static_cast<std::atomic<slot_t>*>(slots);
    s->index = static_cast<std::uint32_t*>(index);
    return std::shared_ptr<SnapshotCore>(s, release_snapshot);
}

// The first group in [g, end) whose change bit is set, or `end`: the summary is read a word (64
// groups) at a time, so that a scan of an untouched reservation costs one load per 16 MiB.
std::size_t next_changed_group(const ArenaCore& a, std::size_t g, std::size_t end) {
    while (g < end) {
        const std::uint64_t word = a.changed_groups[g / 64].load(kRelaxed) >> (g % 64);
        if (word) return std::min(end, g + std::size_t(std::countr_zero(word)));
        g = (g / 64 + 1) * 64;
    }
    return end;
}

// The first page in [i, last) whose change bit is set, or `last`.
std::size_t next_changed_page(const ArenaCore& a, std::size_t i, std::size_t last) {
    constexpr std::size_t kGroup = ArenaCore::kGroupPages;
    const std::size_t end_group = (last + kGroup - 1) / kGroup;
    while (i < last) {
        const std::uint64_t word = a.changed_in(i / kGroup) >> (i % kGroup);
        if (word) return std::min(last, i + std::size_t(std::countr_zero(word)));
        i = next_changed_group(a, i / kGroup + 1, end_group) * kGroup;
    }
    return last;
}

// Withholds write access from the pages of r that have it, so that the next write to each is seen.
// Pages still tracked since an earlier snapshot need nothing, so a snapshot after one costs in
// proportion to what changed since. One kernel call per run of such pages; runs separated by pages
// that are tracked already are joined, since re-arming those is harmless and one call over a span
// costs less than a call per run. Measured here (2 vCPUs): a tracked page inside a span costs
// ~20-70 ns, a call ~1-2 µs with userfaultfd and ~9 µs with mprotect on a quiet machine, and ~9 µs
// with either once the writers sleep between bursts, since each call's TLB shootdown then wakes
// the other vCPU. No fixed bridge suits both: perf/run pause (8 GiB sparse table, sleeping
// writers) wants ~512 pages (4.0x fork's pause with 128), perf/run snapshot (1 GiB, 1% of it
// changed, scattered) wants a call per run (17.7 ms bridged against 2.2 ms). So with userfaultfd
// the bridge is what the thread's own calls say a call costs in pages (ArmCost). mprotect passes
// over a kernel VMA that has the protection already, so there a bridge costs the call nothing and
// spans all it can: perf/run rearm (1 GiB, 1% / 10% changed) 6.7-6.9 / 60-64 ms, against 10-11 /
// 79-90 ms with ArmCost's bridges.
// A bridge never crosses a page of another protection: that is another kernel VMA, which costs a
// shootdown of its own inside the same call.
// What a userfaultfd call costs, from the calls this thread has made: ns = per_call + per_own *
// own pages + per_bridged * bridged pages, each a decayed mean (the last few hundred calls of its
// kind count), since the cost of a call depends on who else runs (a sleeping vCPU woken by each
// shootdown) and that of a page on what its PTE holds. A bridge is worth joining while its pages
// cost less than the call it saves. Own pages (those gaining the protection) cost the same however
// the calls are cut. Each part is told by the calls that have little else (per_call by calls over a
// page or two, per_own by long calls without a bridge, per_bridged by calls with long bridges), net
// of the others, rather than by a least-squares line through all calls: the cost is not linear
// (x86 flushes each page of a call over up to 33 pages, the whole TLB past that), and a line
// through all calls let the few long calls' noise decide per_call, negative as often as not for
// perf/run rearm's 1% changed, where the bridge then stayed 512 and one call spanned nearly the
// whole heap.
class ArmCost {
public:
    void add(std::size_t own, std::size_t bridged, std::uint64_t ns) {
        const double t = double(ns);
        if (bridged == 0 && own <= kShort)
            keep(calls_, call_ns_, t - per_own() * double(own));
        else if (bridged == 0 && own >= kLong)
            keep(owns_, own_ns_, (t - per_call()) / double(own));
        else if (bridged >= kLong)
            keep(bridges_, bridged_ns_, (t - per_call() - per_own() * double(own)) / double(bridged));
    }
    // The longest bridge worth joining; 512 until the calls seen tell.
    std::size_t max_bridge() const {
        constexpr std::size_t kUntold = 512, kMost = 2048;
        if (calls_ < 4 || bridges_ == 0) return kUntold;
        const double per_bridged = bridged_ns_ / bridges_;
        if (per_call() <= 0) return 0;
        if (per_bridged <= 0) return kMost;
        return std::min(std::size_t(per_call() / per_bridged), kMost);
    }

private:
    static constexpr std::size_t kShort = 2, kLong = 64;
    static void keep(double& n, double& sum, double x) {
        constexpr double kKeep = 0.995;
        n = n * kKeep + 1;
        sum = sum * kKeep + x;
    }
    double per_call() const { return calls_ ? call_ns_ / calls_ : 0; }
    double per_own() const { return owns_ ? own_ns_ / owns_ : 0; }
    double calls_ = 0, call_ns_ = 0, owns_ = 0, own_ns_ = 0, bridges_ = 0, bridged_ns_ = 0;
};

void arm_write_tracking(ArenaCore& a, const char* call, Range r) {
    thread_local ArmCost cost;
    const WriteTracker& tracker = write_tracker();
    // Where a bridged page costs the call nothing, one call spans all it can.
    const bool fitted = tracker.rearm_rewrites;
    std::size_t max_bridge = fitted ? cost.max_bridge() : SIZE_MAX;
    const pte_t write = to_pte(Prot::Write);
    const std::size_t last = a.page_index(r.end);
    auto value = [&](std::size_t i) { return a.pte[i].load(kRelaxed); };
    auto candidate = [&](std::size_t i, pte_t prot) {
        const pte_t v = value(i);
        return pte_prot(v) == prot && !(v & (kPteWriteTracked | kPteGuard));  // a stack's guard holds nothing
    };
    // A page tracked already, which arming it again (with the same call) leaves as it is.
    auto bridgeable = [&](std::size_t i, pte_t armed) {
        const pte_t v = value(i);
        return (v & kPteWriteTracked) && pte_prot(v) == armed;
    };
    // The first runs of each pass are armed alone, so that ArmCost always has calls over few pages
    // to tell per_call by: without them, bridges long enough make every call a long one.
    constexpr std::size_t kAlone = 8;
    std::size_t calls = 0;
    // A page without its change bit has not gained write access since it was armed.
    for (std::size_t i = next_changed_page(a, a.page_index(r.start), last); i < last;) {
        const pte_t prot = pte_prot(value(i));
        if (!(prot & write) || !candidate(i, prot)) {
            i = next_changed_page(a, i + 1, last);
            continue;
        }
        // Every page of the call has prot or armed, and leaves it with armed.
        const pte_t armed = tracker.armed_prot(prot);
        std::size_t j = i + 1, bridged = 0;
        for (;;) {
            while (j < last && candidate(j, prot)) ++j;
            if (fitted && calls < kAlone) break;
            std::size_t k = j;
            while (k < last && k - j < max_bridge && bridgeable(k, armed)) ++k;
            if (k == j || k == last || !candidate(k, prot)) break;
            bridged += k - j;
            j = k;
        }
        const std::uintptr_t at = a.page_addr(i);
        const std::size_t len = (j - i) << g_page_shift;
        const Prot next = pte_to_prot(prot) & ~Prot::Write;
        const std::uint64_t t0 = fitted ? now_ns() : 0;
        if (const int err = tracker.arm(a, i, j, pte_to_prot(prot)))
            fail(err, "{}: withholding write access from [{:#x}, {:#x}) ({} engine, protection {}) failed", call, at,
                 at + len, tracker.engine == Engine::Uffd ? "UFFDIO_WRITEPROTECT" : "mprotect", to_string(next));
        if (fitted) {
            cost.add(j - i - bridged, bridged, now_ns() - t0);
            max_bridge = cost.max_bridge();  // the first pass's bridges need not wait for the next
        }
        ++calls;
        for (std::size_t k = i; k < j; ++k) a.pte[k].store(pte_t((value(k) & kPteFlags) | kPteWriteTracked | armed), kRelaxed);
        i = next_changed_page(a, j, last);
    }
}

// Stack VMAs are never write-tracked: the thread running on a stack may be inside an API call
// that holds the arena's write lock, where a fault on its own stack cannot be resolved (a snapshot
// taken from a fiber write-protects the very frames it runs on). A snapshot copies their
// committed pages at once instead, and every snapshot and collection counts those pages as
// changed, since their writes are not seen.
template <typename Fn>
void for_each_stack_part(ArenaCore& a, Range r, Fn fn) {
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it)
        if (it->stack) fn(Range{std::max(it->start, r.start), std::min(it->end, r.end)});
}

void arm_write_tracking_but_stacks(ArenaCore& a, const char* call, Range r) {
    if (!a.stack_count) return arm_write_tracking(a, call, r);
    std::uintptr_t at = r.start;
    for_each_stack_part(a, r, [&](Range part) {
        if (part.start > at) arm_write_tracking(a, call, {at, part.start});
        at = part.end;
    });
    if (at < r.end) arm_write_tracking(a, call, {at, r.end});
}

bool in_stack(const ArenaCore& a, std::size_t page) {
    const Vma* v = find_vma(const_cast<ArenaCore&>(a), a.page_addr(page));
    return v && v->stack && v->start <= a.page_addr(page);
}

void check_live(const SnapshotCore* s, const char* call) {
    if (!s) fail(EINVAL, "{}: the snapshot was moved from", call);
}

}  // namespace

// --- Snapshot ------------------------------------------------------------------------------------

Snapshot::Snapshot(std::shared_ptr<detail::SnapshotCore> core) : core_(std::move(core)) {}
Snapshot::Snapshot(Snapshot&&) noexcept = default;
Snapshot& Snapshot::operator=(Snapshot&&) noexcept = default;
Snapshot::~Snapshot() = default;

void* Snapshot::start() const {
    check_live(core_.get(), "usermm::Snapshot::start");
    return ptr_of(core_->page_addr(core_->first));
}
std::size_t Snapshot::length() const {
    check_live(core_.get(), "usermm::Snapshot::length");
    return (core_->last - core_->first) << g_page_shift;
}
std::uint64_t Snapshot::sequence() const {
    check_live(core_.get(), "usermm::Snapshot::sequence");
    return core_->sequence;
}
Stats Snapshot::stats() const {
    check_live(core_.get(), "usermm::Snapshot::stats");
    return core_->stats.load();
}

void Snapshot::read(const void* addr, void* buffer, std::size_t length) const {
    static constexpr const char* kReadCall = "usermm::Snapshot::read";
    check_live(core_.get(), kReadCall);
    require_self_mem(kReadCall);
    const SnapshotCore& s = *core_;
    const std::uintptr_t from = addr_of(addr), lo = s.page_addr(s.first),
                         hi = s.page_addr(s.last);
    if (from < lo || from > hi || length > hi - from)
        fail(EINVAL, "{}: addr {:#x} + length {:#x} is outside the snapshot [{:#x}, {:#x})", kReadCall, from, length,
             lo, hi);
    if (length == 0) return;
    auto* out = static_cast<std::byte*>(buffer);
    const std::size_t first = (from - s.arena_base) >> g_page_shift;
    const std::size_t last = (from + length - s.arena_base + g_page_size - 1) >> g_page_shift;
    visit_snapshot_pages(s, first, last, [&](std::size_t page, const std::byte* content, bool zero) {
        const std::uintptr_t page_lo = s.page_addr(page);
        const std::uintptr_t a = std::max(page_lo, from), b = std::min(page_lo + g_page_size, from + length);
        if (zero)
            std::memset(out + (a - from), 0, b - a);
        else
            std::memcpy(out + (a - from), content + (a - page_lo), b - a);
    });
}

void Snapshot::for_each_page(const std::function<void(const void*, std::span<const std::byte>)>& fn) const {
    check_live(core_.get(), "usermm::Snapshot::for_each_page");
    require_self_mem("usermm::Snapshot::for_each_page");
    const SnapshotCore& s = *core_;
    visit_snapshot_pages(
        s, s.first, s.last,
        [&](std::size_t page, const std::byte* content, bool zero) {
            if (!zero) fn(ptr_of(s.page_addr(page)), std::span<const std::byte>(content, g_page_size));
        },
        false);
}

bool DirtySet::contains(const void* page_addr) const {
    return std::binary_search(pages.begin(), pages.end(), const_cast<void*>(page_addr));
}

// --- Arena ---------------------------------------------------------------------------------------

// A file VMA's content is its file's (sync writes it there), not the arena's: a snapshot of the
// whole arena takes the anonymous VMAs and skips file VMAs, so that one arena can hold both. An
// explicit range is the caller's statement of what must be captured: one over a file VMA is refused.
Snapshot Arena::snapshot() {
    const ArenaCore& a = live_arena(core_, "usermm::Arena::snapshot");
    return take_snapshot(ptr_of(a.base), a.end - a.base, true);
}

Snapshot Arena::snapshot(void* addr, std::size_t length) { return take_snapshot(addr, length, false); }

Snapshot Arena::take_snapshot(void* addr, std::size_t length, bool whole) {
    static constexpr const char* call = "usermm::Arena::snapshot";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    USERMM_PROBE(snapshot_begin, a.base, r.start, r.end - r.start);
    AtScopeExit probe_end{[&a, r, t0 = now_ns()] { USERMM_PROBE(snapshot_end, a.base, r.start, r.end - r.start, now_ns() - t0); }};
    require_self_mem(call);
    std::shared_ptr<SnapshotCore> snap = new_snapshot_core(a, r);
    snap->anonymous_only = whole;
    ChangeRecord record{0, snap->first, snap->last, {}};
    a.history.reserve(a.history.size() + 1);

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    // The pause the arena's faults see: until the guard is let go (this runs just before it).
    bool taken = false;
    AtScopeExit pause{[&a, &taken, t0 = now_ns()] {
        if (taken) account_snapshot_taken(a, now_ns() - t0);
    }};
    if (!whole) refuse_file_vmas(a, call, r);
    if (a.snapshot_count == kMaxSnapshots)
        fail(EMFILE, "{}: the arena already has {} live snapshots (addr {:#x})", call, kMaxSnapshots, r.start);
    // Copy-before-write needs every write seen: the range's writes the kernel tracked become the
    // PTEs' marks, and the synchronous engine takes it back (dirty_async.cpp).
    async_leave(a, call, r);
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it) {
        if (it->file) {
            for (std::size_t i = a.page_index(it->start); i < a.page_index(it->end); ++i)
                snap->slot(i).store(kSlotZero, kRelaxed);
            continue;
        }
        SnapshotCore::VmaRecord v{std::max(it->start, r.start), std::min(it->end, r.end), it->prot,
                                  it->fault_around_pages, {}};
        std::memcpy(v.name, it->name, kVmaNameMax);
        snap->vmas.push_back(v);
    }
    // The anonymous VMAs' pages (between VMAs nothing is writable).
    for (const SnapshotCore::VmaRecord& v : snap->vmas) arm_write_tracking_but_stacks(a, call, {v.start, v.end});
    bool stacks = false;
    if (a.stack_count) for_each_stack_part(a, r, [&](Range) { stacks = true; });
    // Armed and recorded: the changed pages of the range have nothing new until they change again,
    // but for a stack's committed pages, which stay changed.
    constexpr std::size_t kGroup = ArenaCore::kGroupPages;
    const std::size_t end_group = (snap->last + kGroup - 1) / kGroup;
    for (std::size_t g = next_changed_group(a, snap->first / kGroup, end_group); g < end_group;
         g = next_changed_group(a, g + 1, end_group)) {
        std::uint64_t done = 0;
        for (std::uint64_t bits = a.changed_in(g) & ArenaCore::group_bits(g, snap->first, snap->last); bits;
             bits &= bits - 1) {
            const std::size_t i = g * kGroup + std::size_t(std::countr_zero(bits));
            const pte_t v = a.pte[i].load(kRelaxed);
            if ((v & kPteDirtySnapshot) && !(v & kPteFile)) {
                record.mark(i);
                if (stacks && (v & kPtePopulated) && in_stack(a, i)) continue;
                a.pte[i].store(pte_t(v & ~kPteDirtySnapshot), kRelaxed);
            }
            done |= bits & (~bits + 1);
        }
        a.clear_changed(g, done);
    }
    snap->arena = &a;
    snap->sequence = record.sequence = ++a.snapshot_sequence;
    a.history.push_back(std::move(record));
    a.snapshots[a.snapshot_count++] = snap.get();
    // The stacks' content now (see arm_write_tracking_but_stacks).
    if (stacks) for_each_stack_part(a, r, [&](Range part) { preserve_range(a, call, part); });
    taken = true;
    return Snapshot(std::move(snap));
}

void Arena::restore(const Snapshot& snapshot) {
    static constexpr const char* call = "usermm::Arena::restore";
    ArenaCore& a = live_arena(core_, call);
    check_live(snapshot.core_.get(), call);
    require_self_mem(call);
    SnapshotCore& s = *snapshot.core_;
    if (s.arena != &a)
        fail(EINVAL, "{}: snapshot {} of [{:#x}, +{:#x}) belongs to another arena", call, s.sequence,
             s.page_addr(s.first), (s.last - s.first) << g_page_shift);
    if (a.restoring.exchange(true)) fail(EBUSY, "{}: another restore of this arena is running", call);
    struct Done {
        std::atomic<bool>& flag;
        ~Done() { flag.store(false); }
    } done{a.restoring};

    const Range r{a.page_addr(s.first), a.page_addr(s.last)};
    USERMM_PROBE(restore_begin, a.base, r.start, r.end - r.start);
    AtScopeExit probe_end{[&a, r, t0 = now_ns()] { USERMM_PROBE(restore_end, a.base, r.start, r.end - r.start, now_ns() - t0); }};
    std::vector<std::unique_ptr<Vma>> fresh;
    for (const auto& rec : s.vmas) {
        auto v = std::make_unique<Vma>();
        v->start = rec.start;
        v->end = rec.end;
        v->prot = rec.prot;
        v->fault_around_pages = rec.fault_around_pages;
        std::memcpy(v->name, rec.name, kVmaNameMax);
        fresh.push_back(std::move(v));
    }
    auto lower_spare = std::make_unique<Vma>();
    auto upper_spare = std::make_unique<Vma>();

    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    if (!s.anonymous_only) refuse_file_vmas(a, call, r);
    // A stack belongs to its Stack object, which restore cannot put back or take away.
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it)
        if (it->stack)
            fail(ENOTSUP, "{}: [{:#x}, {:#x}) holds stack '{}' [{:#x}, {:#x}), which restore does not support", call,
                 r.start, r.end, it->name, it->start, it->end);
    // A whole-arena snapshot leaves file VMAs alone: one where it holds anonymous memory is in the way.
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it) {
        if (!it->file) continue;
        const auto rec = std::partition_point(s.vmas.begin(), s.vmas.end(),
                                              [&](const SnapshotCore::VmaRecord& v) { return v.end <= it->start; });
        if (rec != s.vmas.end() && rec->start < it->end)
            fail(EBUSY, "{}: file VMA '{}' [{:#x}, {:#x}) lies where snapshot {} holds VMA '{}' [{:#x}, {:#x})", call,
                 it->name, it->start, it->end, s.sequence, rec->name, rec->start, rec->end);
    }
    // What each page needs, decided before anything changes: copied pages are written back, pages
    // that were zero and may hold data now (granted write access since) are discarded, which
    // costs nothing for one that was never written. Restored
    // pages hold the snapshot's content in the arena again, so their slots become "synced": a
    // later restore copies only what changes after this one. Only groups of pages with a slot that
    // left the arena, or where the VMAs now allow more than the snapshot's did, are looked at, and
    // the decisions are kept as runs: the cost follows what changed, not the range's size.
    enum Put : std::uint8_t { WriteBack, Discard, Untrack };
    struct Run {
        std::size_t first;
        std::size_t last;
        Put put;
    };
    std::vector<Run> runs;
    auto add_to = [](std::vector<Run>& to, std::size_t i, Put p) {
        if (!to.empty() && to.back().last == i && to.back().put == p)
            ++to.back().last;
        else
            to.push_back({i, i + 1, p});
    };
    auto add = [&](std::size_t i, Put p) { add_to(runs, i, p); };
    // Where the arena's VMAs now allow more than the snapshot's (or exist where it had none): pages
    // there may have access the restored layout forbids.
    std::vector<PageSpan> widened;
    {
        auto rec = s.vmas.begin();
        for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end; ++it) {
            if (it->file) continue;
            std::uintptr_t pos = std::max(it->start, r.start);
            const std::uintptr_t end = std::min(it->end, r.end);
            auto widen = [&](std::uintptr_t lo, std::uintptr_t hi) {
                if (lo < hi) widened.push_back({a.page_index(lo), a.page_index(hi)});
            };
            while (rec != s.vmas.end() && rec->end <= pos) ++rec;
            for (auto k = rec; pos < end && k != s.vmas.end() && k->start < end; ++k) {
                widen(pos, k->start);
                if ((normalize(it->prot) & ~normalize(k->prot)) != Prot::None) widen(std::max(pos, k->start), std::min(k->end, end));
                pos = std::max(pos, k->end);
            }
            widen(pos, end);
        }
    }
    auto vma_rec = s.vmas.begin();
    auto restored_prot = [&](std::size_t i) {  // ascending pages only
        const std::uintptr_t addr = a.page_addr(i);
        while (vma_rec != s.vmas.end() && vma_rec->end <= addr) ++vma_rec;
        return vma_rec != s.vmas.end() && vma_rec->start <= addr ? normalize(vma_rec->prot) : Prot::None;
    };
    // A slot can have left the arena only where its page of the slot table was touched, and a page
    // can have access only where its page of the PTE table was: the rest is never read.
    std::vector<PageSpan> look = slot_spans(s, s.first, s.last);
    if (!widened.empty()) look = span_union(std::move(look), span_intersection(widened, pte_spans(a, s.first, s.last)));
    constexpr std::size_t kGroup = ArenaCore::kGroupPages;
    auto w = widened.begin();
    for (const PageSpan& span : look) {
        for (std::size_t g = span.first; g < span.last;) {
            const std::size_t next = std::min(span.last, (g / kGroup + 1) * kGroup);
            bool left = false;
            for (std::size_t i = g; i < next && !left; ++i) left = settled_slot(s, i) != kSlotInArena;
            while (w != widened.end() && w->last <= g) ++w;
            const bool widen = w != widened.end() && w->first < next;
            if (!left && !widen) {
                g = next;
                continue;
            }
            for (std::size_t i = g; i < next; ++i) {
                const pte_t v = a.pte[i].load(kRelaxed);
                if (v & kPteFile) continue;  // a whole-arena snapshot's file VMA
                const slot_t state = left ? settled_slot(s, i) : kSlotInArena;
                if (state == kSlotCopied) {
                    add(i, WriteBack);
                } else if (state == kSlotZero) {
                    // Written, or granted write access, since: a page that may hold data is
                    // discarded. Whether one granted write was written cannot be told yet: until
                    // change_pages below it stays writable, and another thread may write it.
                    const bool may_hold_data = v & kPtePopulated;
                    add(i, may_hold_data ? Discard : Untrack);
                    if (!may_hold_data) s.slot(i).store(kSlotZeroSynced, kRelease);
                } else if (widen && (to_pte(restored_prot(i)) & pte_prot(v)) != pte_prot(v)) {
                    add(i, Untrack);  // it has access the restored VMAs do not allow
                }
            }
            g = next;
        }
    }
    // Each run made PROT_NONE inside accessible memory costs up to two kernel mappings. Where that
    // would overrun the map budget, every anonymous page of the range is reset instead, which
    // merges mappings: the pages restore did not change then fault once more, as past the budget a
    // fault grants whole runs. Pages of untouched parts of the PTE table are PROT_NONE already.
    if (map_budget_used() + 2 * long(runs.size()) > map_budget_limit()) {
        std::vector<Run> whole;
        auto decided = runs.cbegin();
        for (const PageSpan& span : pte_spans(a, s.first, s.last)) {
            for (std::size_t i = span.first; i < span.last; ++i) {
                if (a.pte[i].load(kRelaxed) & kPteFile) continue;
                while (decided != runs.cend() && decided->last <= i) ++decided;
                add_to(whole, i, decided != runs.cend() && decided->first <= i ? decided->put : Untrack);
            }
        }
        runs = std::move(whole);
    }
    // Pages restore changes fault from now on, and only they: threads that touch one wait for the
    // restore and then see the restored content; the others keep the access they had. Userfaultfd
    // marks would make the write-back fail; the pages need none once they are PROT_NONE, since any
    // write now faults into usermm first. Neighbouring runs change in one call.
    for (std::size_t k = 0; k < runs.size();) {
        std::size_t m = k + 1;
        while (m < runs.size() && runs[m].first == runs[m - 1].last) ++m;
        const Range part{a.page_addr(runs[k].first), a.page_addr(runs[m - 1].last)};
        change_pages(a, call, part, [](Prot) { return Prot::None; });
        if (const int err = write_tracker().clear_marks(part.start, part.end - part.start))
                fail(err, "{}: cannot clear write-protection of [{:#x}, {:#x})", call, part.start, part.end);
        for (std::size_t i = runs[k].first; i < runs[m - 1].last; ++i)
            a.pte[i].fetch_and(pte_t(~kPteWriteTracked), kRelaxed);
        k = m;
    }
    // Other snapshots keep what they still read from the pages about to change.
    for (const Run& run : runs) {
        if (run.put == Untrack) continue;
        for (std::size_t i = run.first; i < run.last; ++i) {
            std::uint32_t copies = 0;
            if (const int err = preserve_for_snapshots(a, i, a.pte[i].load(kRelaxed), &copies))
                fail(err, "{}: cannot save page {:#x} for another snapshot", call, a.page_addr(i));
        }
    }
    // The VMAs as they were. Each VMA replaced hands its counters to the last restored VMA it
    // overlaps, as a split leaves them with the upper part.
    split_at(a, r.start, lower_spare);
    split_at(a, r.end, upper_spare);
    auto heir = fresh.begin();
    std::vector<Range> gone;
    for (auto it = a.tree.upper_bound(r.start); it != a.tree.end() && it->start < r.end;) {
        if (it->file) {
            ++it;
            continue;
        }
        if (*it->name) gone.push_back({it->start, it->end});
        while (heir != fresh.end() && std::next(heir) != fresh.end() && (*std::next(heir))->start < it->end) ++heir;
        if (heir != fresh.end() && (*heir)->start < it->end && (*heir)->end > it->start)
            (*heir)->stats->add(it->stats->load());
        Vma* dead = &*it;
        it = vma_unlink(a, *dead);
        vma_free(dead);
    }
    for (auto& v : fresh) vma_link(a, *v.release());
    merge_range(a, r.start, r.end);
    a.last_hit.store(nullptr, kRelaxed);
    renew_kernel_names(a, r, gone);
    // The content as it was.
    std::uint64_t restored = 0;
    std::vector<const std::byte*> copies;
    for (const Run& run : runs) {
        if (run.put == Untrack) continue;
        const std::size_t i = run.first, j = run.last;
        const std::uintptr_t at = a.page_addr(i);
        const std::size_t len = (j - i) << g_page_shift;
        if (run.put == WriteBack) {
            copies.clear();
            for (std::size_t k = i; k < j; ++k) copies.push_back(s.stored(k));
            if (const int err = page_write_raw_pages(at, copies.data(), copies.size()))
                fail(err, "{}: cannot write back [{:#x}, {:#x})", call, at, at + len);
        } else {
            // PROT_NONE now, so nothing can write them: the pages that were never written (granted
            // write access by fault-around, say) held nothing, and restoring them changes nothing.
            std::size_t empty = 0;
            unsigned char held[ArenaCore::kGroupPages];
            for (std::size_t k = i; k < j; k += ArenaCore::kGroupPages) {
                const std::size_t n = std::min(j - k, ArenaCore::kGroupPages);
                page_held(a.page_addr(k), n << g_page_shift, held);
                for (std::size_t u = 0; u < n; ++u) empty += !(held[u] & 1);
            }
            restored -= empty;
            note_discarded(a, i, j);
            if (const int err = page_discard(at, len)) fail(err, "{}: cannot discard [{:#x}, {:#x})", call, at, at + len);
        }
        for (std::size_t k = i; k < j; ++k) {
            const pte_t v = a.pte[k].load(kRelaxed);
            // A page swapped out is replaced: its store copy goes, the content is the snapshot's.
            if (a.swap) swap_drop_copy(*a.swap, k);
            const pte_t kept = pte_t(v & ~(kPteSwapped | kPteInactive | kPteReadahead));
            const pte_t now = run.put == WriteBack ? pte_t(kept | kPtePopulated | kPteDirty)
                                                   : pte_t((kept & ~kPtePopulated) | kPteDirtySnapshot);
            a.note_resident(v, now);
            if (a.swap && run.put == WriteBack && (k == i || k % kClusterPages == 0)) swap_note_use(*a.swap, k);
            a.pte[k].store(now, kRelaxed);
            a.note_changed(k);
            s.slot(k).store(run.put == WriteBack ? kSlotCopiedSynced : kSlotZeroSynced, kRelease);
        }
        restored += j - i;
    }
    account_restore(a, s, restored);
    if (a.reclaimer) a.reclaimer->shrink_locked();
}

DirtySet Arena::collect_dirty(void* addr, std::size_t length) {
    static constexpr const char* call = "usermm::Arena::collect_dirty";
    ArenaCore& a = live_arena(core_, call);
    const Range r = check_range(a, call, addr, length);
    const std::size_t first = a.page_index(r.start), last = a.page_index(r.end);
    DirtySet out;
    USERMM_PROBE(collect_dirty_begin, a.base, r.start, r.end - r.start);
    AtScopeExit probe_end{[&a, r, &out, t0 = now_ns()] {
        USERMM_PROBE(collect_dirty_end, a.base, r.start, r.end - r.start, out.pages.size(), now_ns() - t0);
    }};
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    refuse_file_vmas(a, call, r);
    std::vector<std::size_t> dirty;
    // Where nothing else needs to see each write, the kernel resolves the write faults itself and
    // says which pages were written (dirty_async.cpp); elsewhere write tracking does, and a range the
    // kernel tracked goes back to it first.
    const bool async = async_eligible(a, r);
    if (!async) async_leave(a, call, r);
    // Where the kernel tracked writes since the previous collection, its answer is the whole of it (a
    // mark there is a grant, and what the grant let through the kernel saw), and the marks are not
    // read (uffd-wp markers read as swapped in pagemap, so residency would call a granted page that
    // was never touched written) nor cleared: leaving the mode clears them (dirty_async.cpp). So a
    // collection of a range the kernel tracks walks no PTE.
    const std::vector<PageSpan> by_usermm = async ? sync_parts(a, first, last) : std::vector<PageSpan>{{first, last}};
    const std::vector<PageSpan> marked =
        by_usermm.empty() ? by_usermm : span_intersection(pte_spans(a, first, last), by_usermm);
    // Write access granted since the last collection marks a page; it was written if the kernel
    // holds it (fault-around grants write to neighbours that may never be touched). Discarded
    // pages changed too, though nothing wrote them. Residency (present or swapped out) is asked only for groups of pages
    // with a mark, and the answer holds only the pages found: its cost follows what was written.
    constexpr std::size_t kGroup = ArenaCore::kGroupPages;
    for (const PageSpan& span : marked) {  // an untouched page has no mark
        for (std::size_t g = span.first; g < span.last;) {
            const std::size_t next = std::min(span.last, (g / kGroup + 1) * kGroup);
            std::size_t k = g;
            while (k < next && !(a.pte[k].load(kRelaxed) & kPteDirtyCollect)) ++k;
            if (k == next) {
                g = next;
                continue;
            }
            unsigned char held[kGroup];
            page_held(a.page_addr(g), (next - g) << g_page_shift, held);
            for (std::size_t i = k; i < next; ++i) {
                const pte_t v = a.pte[i].load(kRelaxed);
                if (!(v & kPteDirtyCollect)) continue;
                if ((v & kPtePopulated) && ((v & kPteSwapped) || (held[i - g] & 1))) dirty.push_back(i);
                // A stack's page is not write-tracked: it counts as written at every collection.
                if (!(a.stack_count && (v & kPtePopulated) && in_stack(a, i)))
                    a.pte[i].store(pte_t(v & ~kPteDirtyCollect), kRelaxed);
            }
            g = next;
        }
    }
    // A collection that fails part way loses nothing: the pages it has taken from the marks or from
    // the kernel (whose written bits it has cleared) are the next collection's, as discarded pages are.
    auto keep_for_next = [&a, &dirty] {
        for (const std::size_t i : dirty) a.discarded.push_back({i, i + 1});
    };
    // Each part ascending: the marks', the kernel's, the discarded ranges' (sorted only if any).
    const std::size_t from_marks = dirty.size();
    try {
        if (async) async_collect(a, call, r, dirty);
    } catch (...) {
        keep_for_next();
        throw;
    }
    std::inplace_merge(dirty.begin(), dirty.begin() + std::ptrdiff_t(from_marks), dirty.end());
    std::vector<std::pair<std::size_t, std::size_t>> kept;
    const std::size_t before_discarded = dirty.size();
    for (const auto& [lo, hi] : a.discarded) {
        for (std::size_t i = std::max(lo, first); i < std::min(hi, last); ++i) dirty.push_back(i);
        if (lo < first) kept.push_back({lo, std::min(hi, first)});
        if (hi > last) kept.push_back({std::max(lo, last), hi});
    }
    if (dirty.size() != before_discarded) std::sort(dirty.begin(), dirty.end());
    dirty.erase(std::unique(dirty.begin(), dirty.end()), dirty.end());
    a.discarded = std::move(kept);
    a.collect_armed = true;
    try {
        if (!async) arm_write_tracking_but_stacks(a, call, r);
    } catch (...) {
        keep_for_next();
        throw;
    }
    out.pages.reserve(dirty.size());
    for (std::size_t i : dirty) out.pages.push_back(ptr_of(a.page_addr(i)));
    account_dirty_collected(a, out.pages.size());
    return out;
}

}  // namespace usermm
