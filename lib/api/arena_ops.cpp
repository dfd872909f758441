#include "arena_ops.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>

#include "dirty_async.hpp"
#include "file_vma.hpp"
#include "procmap.hpp"
#include "find_vma.hpp"
#include "write_tracking.hpp"

namespace usermm::detail {

namespace {

std::atomic<bool> g_no_procmap_query{false};

// The mappings overlapping [lo, hi) by PROCMAP_QUERY; false if this kernel does not answer it.
bool query_mappings(int fd, std::uintptr_t lo, std::uintptr_t hi, std::vector<KernelMapping>& out) {
    for (std::uintptr_t at = lo; at < hi;) {
        ProcmapQuery q{};
        q.size = sizeof q;
        q.query_flags = kQueryCoveringOrNext;
        q.query_addr = at;
        if (ioctl(fd, kProcmapQuery, &q) != 0) {
            if (errno == ENOENT) return true;  // nothing at or after `at`
            if (errno == ENOTTY || errno == EINVAL) return false;
            fail(errno, "usermm: PROCMAP_QUERY at {:#x} failed", at);
        }
        if (q.vma_start >= hi) return true;
        const Prot prot = ((q.vma_flags & kQueryReadable) ? Prot::Read : Prot::None) |
                          ((q.vma_flags & kQueryWritable) ? Prot::Write : Prot::None) |
                          ((q.vma_flags & kQueryExecutable) ? Prot::Exec : Prot::None);
        const std::uintptr_t start = std::max<std::uintptr_t>(q.vma_start, lo);
        out.push_back({start, std::min<std::uintptr_t>(q.vma_end, hi), prot, (q.vma_flags & kQueryShared) != 0,
                       q.inode, makedev(q.dev_major, q.dev_minor), q.vma_offset + (start - q.vma_start)});
        at = q.vma_end;
    }
    return true;
}

}  // namespace

std::vector<KernelMapping> kernel_mappings(std::uintptr_t lo, std::uintptr_t hi, const char* call) {
    std::vector<KernelMapping> out;
    errno = 0;
    // An empty answer would read as an arena with no mappings: false corruption, wrong counts.
    const int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail(errno ? errno : EIO, "{}: cannot open /proc/self/maps to read the kernel's mappings of [{:#x}, {:#x})", call,
             lo, hi);
    struct Closer {
        int fd;
        ~Closer() { close(fd); }
    } closer{fd};
    if (!g_no_procmap_query.load(std::memory_order_relaxed)) {
        if (query_mappings(fd, lo, hi, out)) return out;
        g_no_procmap_query.store(true, std::memory_order_relaxed);
        out.clear();
    }
    std::ifstream maps("/proc/self/maps");
    if (!maps.is_open())
        fail(errno ? errno : EIO, "{}: cannot open /proc/self/maps to read the kernel's mappings of [{:#x}, {:#x})", call,
             lo, hi);
    for (std::string line; std::getline(maps, line);) {
        unsigned long from = 0, to = 0, offset = 0, inode = 0;
        unsigned dev_major = 0, dev_minor = 0;
        char perms[5] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %4s %lx %x:%x %lu", &from, &to, perms, &offset, &dev_major, &dev_minor,
                        &inode) != 7 ||
            to <= lo || from >= hi)
            continue;
        const Prot prot = (perms[0] == 'r' ? Prot::Read : Prot::None) | (perms[1] == 'w' ? Prot::Write : Prot::None) |
                          (perms[2] == 'x' ? Prot::Exec : Prot::None);
        const std::uintptr_t start = std::max<std::uintptr_t>(from, lo);
        out.push_back({start, std::min<std::uintptr_t>(to, hi), prot, perms[3] == 's', inode,
                       makedev(dev_major, dev_minor), offset + (start - from)});
    }
    if (maps.bad()) fail(EIO, "{}: cannot read /proc/self/maps for [{:#x}, {:#x})", call, lo, hi);
    return out;
}

std::size_t round_up_length(const char* call, std::size_t length, std::uintptr_t addr, const char* name) {
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


std::vector<PageSpan> held_spans(const void* table, std::size_t entry_bytes, std::size_t first, std::size_t last) {
    const std::size_t per_table_page = g_page_size / entry_bytes;
    const std::size_t t_first = first / per_table_page, t_last = (last + per_table_page - 1) / per_table_page;
    // Below this many pages of the table, reading them costs less than asking.
    constexpr std::size_t kAskFrom = 16;
    if (first >= last) return {};
    if (t_last - t_first < kAskFrom) return {{first, last}};
    const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return {{first, last}};  // then every page is read
    constexpr std::uint64_t kHeld = (std::uint64_t(1) << 63) | (std::uint64_t(1) << 62);  // present, swapped
    std::vector<PageSpan> out;
    std::vector<std::uint64_t> entries(std::min<std::size_t>(t_last - t_first, 4096));
    const std::size_t table_vpn = addr_of(table) >> g_page_shift;
    auto add = [&](std::size_t t_from, std::size_t t_to) {
        const std::size_t from = std::max(first, t_from * per_table_page), to = std::min(last, t_to * per_table_page);
        if (!out.empty() && out.back().last == from)
            out.back().last = to;
        else
            out.push_back({from, to});
    };
    for (std::size_t t = t_first; t < t_last;) {
        const std::size_t n = std::min(entries.size(), t_last - t);
        const ssize_t got = pread(fd, entries.data(), n * sizeof(std::uint64_t), off_t((table_vpn + t) * sizeof(std::uint64_t)));
        if (got != ssize_t(n * sizeof(std::uint64_t))) {
            add(t, t_last);  // what cannot be asked about is read
            break;
        }
        for (std::size_t k = 0; k < n; ++k)
            if (entries[k] & kHeld) add(t + k, t + k + 1);
        t += n;
    }
    close(fd);
    return out;
}

std::vector<PageSpan> pte_spans(const ArenaCore& a, std::size_t first, std::size_t last) {
    return held_spans(a.pte, sizeof(Pte), first, last);
}

std::vector<PageSpan> slot_spans(const SnapshotCore& s, std::size_t first, std::size_t last) {
    std::vector<PageSpan> out = held_spans(s.slots, sizeof(slot_t), first - s.first, last - s.first);
    for (PageSpan& span : out) span = {span.first + s.first, span.last + s.first};
    return out;
}

std::vector<PageSpan> span_union(std::vector<PageSpan> a, const std::vector<PageSpan>& b) {
    a.insert(a.end(), b.begin(), b.end());
    std::sort(a.begin(), a.end(), [](const PageSpan& x, const PageSpan& y) { return x.first < y.first; });
    std::vector<PageSpan> out;
    for (const PageSpan& span : a) {
        if (!out.empty() && span.first <= out.back().last)
            out.back().last = std::max(out.back().last, span.last);
        else
            out.push_back(span);
    }
    return out;
}

std::vector<PageSpan> span_intersection(const std::vector<PageSpan>& a, const std::vector<PageSpan>& b) {
    std::vector<PageSpan> out;
    for (auto x = a.begin(), y = b.begin(); x != a.end() && y != b.end();) {
        const std::size_t from = std::max(x->first, y->first), to = std::min(x->last, y->last);
        if (from < to) out.push_back({from, to});
        if (x->last < y->last)
            ++x;
        else
            ++y;
    }
    return out;
}

// After a refused mprotect, which may have changed a prefix of its range: the PTEs of pages
// [first, last) take whatever protection the kernel now has for them.
void resync_ptes(ArenaCore& a, std::size_t first, std::size_t last) {
    for (const KernelMapping& m : kernel_mappings(a.page_addr(first), a.page_addr(last))) {
        for (std::size_t i = a.page_index(m.from), end = a.page_index(m.to); i < end; ++i) {
            // /proc/self/maps does not show userfaultfd marks: a tracked page stays tracked.
            const pte_t old = a.pte[i].load(std::memory_order_relaxed);
            const pte_t keep = write_tracker().marks_outlive_protect ? pte_t(old & kPteWriteTracked) : pte_t(0);
            const pte_t now = pte_t(pte_with_prot(old, m.prot) | keep);
            if (a.swap && allows(m.prot, Prot::Write)) swap_drop_copy(*a.swap, i);
            a.note_resident(old, now);
            a.pte[i].store(now, std::memory_order_relaxed);
            a.note_changed(i);
        }
    }
}

namespace {

// The kernel merges two neighbouring mappings when their flags agree (protection included), and
// for private memory only when they share an anon_vma. Neighbours with equal protections that it
// keeps apart differ in something else for good; neighbours with different protections merge
// later only if both are shared mappings of one file at consecutive offsets (no anon_vma): a
// mapping just made, or inherited at fork, has an anon_vma of its own if it is private.
bool stay_apart(const KernelMapping& lo, const KernelMapping& hi) {
    if (lo.prot == hi.prot) return true;
    return !(lo.shared && hi.shared && lo.inode == hi.inode && lo.offset + (lo.to - lo.from) == hi.offset);
}

void set_edge(ArenaCore& a, std::size_t page, bool edge) {
    if (edge)
        a.pte[page].fetch_or(kPteEdge, std::memory_order_relaxed);
    else
        a.pte[page].fetch_and(pte_t(~kPteEdge), std::memory_order_relaxed);
}

}  // namespace

std::vector<KernelMapping> mappings_around(const ArenaCore& a, std::size_t first, std::size_t last) {
    const std::uintptr_t lo = first > 0 ? a.page_addr(first - 1) : a.base;
    const std::uintptr_t hi = last < a.page_index(a.end) ? a.page_addr(last + 1) : a.end;
    return kernel_mappings(lo, hi);
}

void settle_edges(ArenaCore& a, std::size_t first, std::size_t last, long before, Across lo, Across hi) {
    const std::vector<KernelMapping> maps = mappings_around(a, first, last);
    const std::size_t npages = a.page_index(a.end);
    for (std::size_t i = first; i <= last && i < npages; ++i) set_edge(a, i, false);
    // One pass over the kernel's boundaries in and around the range: inside it, pieces of one
    // mapping with one set of flags are apart only where equal protections stay apart.
    for (std::size_t k = 1; k < maps.size(); ++k) {
        if (maps[k - 1].to != maps[k].from) continue;
        const std::size_t page = a.page_index(maps[k].from);
        if (page < first || page > last || page >= npages) continue;
        const Across across = page == first ? lo : page == last ? hi : Across::Same;
        set_edge(a, page, across == Across::Apart || maps[k - 1].prot == maps[k].prot);
    }
    map_budget_charge(a, long(maps.size()) - before);
}

void inherit_edges(ArenaCore& a, const std::vector<KernelMapping>& maps) {
    long inside = 0;
    const KernelMapping* prev = nullptr;
    for (const KernelMapping& m : maps) {
        if (m.to <= a.base || m.from >= a.end) continue;
        ++inside;
        if (prev && prev->to == m.from && m.from < a.end && stay_apart(*prev, m)) set_edge(a, a.page_index(m.from), true);
        prev = &m;
    }
    map_budget_recount(a, inside);
}

namespace {

// What a PTE keeps when its page's content is discarded: a page that held data has changed for the
// next snapshot (collect_dirty learns of discarded pages from ArenaCore::discarded instead).
// The backing of the page (file or anonymous) is the VMA's, not the content's: it stays.
pte_t pte_after_discard(pte_t v) {
    return pte_t((v & (kPteDirty | kPteFile | kPteEdge)) | ((v & kPtePopulated) ? kPteDirtySnapshot : 0));
}

bool mergeable(const Vma& lo, const Vma& hi) {
    return lo.end == hi.start && lo.same_as(hi) && (!lo.file || lo.file_page(lo.end) == hi.pgoff);
}

}  // namespace

// Forgets the PTEs of a range that is PROT_NONE and empty in the kernel again. A page of the table
// that ends up all zero goes back to the kernel; the parts of the table never touched are not read
// (pte_spans), so clearing costs what was touched and never makes the table resident.
void clear_ptes(ArenaCore& a, Range r) {
    const std::size_t per_table_page = g_page_size / sizeof(Pte);
    for (const PageSpan& span : pte_spans(a, a.page_index(r.start), a.page_index(r.end))) {
        note_discarded(a, span.first, span.last);
        const std::size_t last = span.last;
        for (std::size_t i = span.first; i < last;) {
            const std::size_t block_end = std::min(last, (i / per_table_page + 1) * per_table_page);
            bool kept = false;
            for (std::size_t k = i; k < block_end; ++k) {
                const pte_t v = a.pte[k].load(std::memory_order_relaxed);
                if (!v) continue;
                const pte_t n = pte_after_discard(v);
                if (a.swap) swap_drop_copy(*a.swap, k);  // a swapped-out page's content goes with it
                a.note_resident(v, n);
                kept |= n != 0;
                a.pte[k].store(n, std::memory_order_relaxed);
                if (n) a.note_changed(k);
            }
            if (!kept && i % per_table_page == 0 && block_end - i == per_table_page)
                page_discard(addr_of(&a.pte[i]), g_page_size);  // i is the table page's first entry
            i = block_end;
        }
    }
}

std::size_t unmark_tracked(ArenaCore& a, const char* call, Range r) {
    // Write access granted by change_pages() cleared the tracked flag of pages that lacked it, but
    // not their marks; so the whole range is unmarked, after snapshots took what they need of it.
    preserve_range(a, call, r);
    // Ranges the kernel tracks itself (dirty_async.cpp) have no tracked page, and a write lands there.
    for (const PageSpan& p : sync_parts(a, a.page_index(r.start), a.page_index(r.end))) {
        const std::uintptr_t lo = a.page_addr(p.first), hi = a.page_addr(p.last);
        if (const int err = write_tracker().clear_marks(lo, hi - lo))
            fail(err, "{}: cannot clear write-protection of [{:#x}, {:#x})", call, lo, hi);
    }
    std::size_t changed = 0;
    for (std::size_t i = a.page_index(r.start), last = a.page_index(r.end); i < last; ++i) {
        const pte_t v = a.pte[i].load(std::memory_order_relaxed);
        if (!(v & kPteWriteTracked)) continue;
        a.pte[i].store(pte_t(pte_with_prot(v, pte_to_prot(v)) & ~kPteWriteTracked), std::memory_order_relaxed);
        a.note_changed(i);
        ++changed;
    }
    return changed;
}

void note_discarded(ArenaCore& a, std::size_t first, std::size_t last) {
    if (!a.collect_armed) return;  // the first collection reports what was written since mapping
    auto populated = [&a](std::size_t i) { return a.pte[i].load(std::memory_order_relaxed) & kPtePopulated ? 1 : kNoRun; };
    for_each_run(first, last, populated, [&a](std::size_t i, std::size_t j, int) { a.discarded.push_back({i, j}); });
}

int protect_run(ArenaCore& a, std::size_t first, std::size_t last, Prot prot) {
    const long delta = map_count_delta(a, first, last, prot);
    if (const int err = page_protect(a.page_addr(first), (last - first) << g_page_shift, prot)) {
        resync_ptes(a, first, last);
        // Splitting the mappings at the range's ends comes before changing them, so a refusal can
        // leave a split with the same protection on both sides, which the kernel keeps apart.
        for (const KernelMapping& m : mappings_around(a, first, last)) {
            const std::size_t page = a.page_index(m.from);
            if (page < std::max<std::size_t>(first, 1) || page > last || page >= a.page_index(a.end)) continue;
            const pte_t lo = a.pte[page - 1].load(std::memory_order_relaxed), hi = a.pte[page].load(std::memory_order_relaxed);
            if (pte_prot(lo) == pte_prot(hi)) set_edge(a, page, true);
        }
        map_budget_recount(a, long(kernel_mappings(a.base, a.end).size()));
        return err;
    }
    map_budget_charge(a, delta);
    return 0;
}

int reprotect_run(ArenaCore& a, std::size_t first, std::size_t last, Prot prot) {
    if (const int err = protect_run(a, first, last, prot)) return err;
    for (std::size_t k = first; k < last; ++k)
        a.pte[k].store(pte_t((a.pte[k].load(std::memory_order_relaxed) & ~kPteProt) | to_pte(prot)),
                       std::memory_order_relaxed);
    return 0;
}

// Before pages of `r` lose their content: live snapshots take what they still read from them.
void preserve_range(ArenaCore& a, const char* call, Range r) {
    if (!a.snapshot_count) return;
    std::uint32_t copies = 0;
    for (std::size_t i = a.page_index(r.start), last = a.page_index(r.end); i < last; ++i)
        if (const int err = preserve_for_snapshots(a, i, a.pte[i].load(std::memory_order_relaxed), &copies))
            fail(err, "{}: cannot save page {:#x} for a snapshot", call, a.page_addr(i));
}

// --- the tree ----------------------------------------------------------------------------------

void set_name(Vma& v, std::string_view name) {
    const std::size_t n = std::min(name.size(), kVmaNameMax - 1);
    if (n) std::memcpy(v.name, name.data(), n);  // an empty view may have no data pointer
    v.name[n] = 0;
}

void vma_link(ArenaCore& a, Vma& v) {
    a.tree.insert(v);
    if (a.vma_index.usable() && a.vma_index.insert(v)) return;
    // Without memory for a node the index goes, and find_vma walks the tree until a link finds the
    // memory to build it again, in address order (which fills its nodes).
    a.vma_index.clear();
    a.vma_index.set_usable(false);
    for (Vma& each : a.tree)
        if (!a.vma_index.insert(each)) {
            a.vma_index.clear();
            return;
        }
    a.vma_index.set_usable(true);
}

VmaTree::iterator vma_unlink(ArenaCore& a, Vma& v) {
    if (a.vma_index.usable()) a.vma_index.erase(v);
    return a.tree.erase(a.tree.iterator_to(v));
}

// Splits the VMA containing `at` (if `at` is inside it, not at its start) into [start, at) and
// [at, end). The upper part keeps the node, its key and its counters; `spare` becomes the lower.
void split_at(ArenaCore& a, std::uintptr_t at, std::unique_ptr<Vma>& spare) {
    auto it = a.tree.upper_bound(at);
    if (it == a.tree.end() || it->start >= at) return;
    Vma* lower = spare.release();
    lower->start = it->start;
    lower->end = at;
    vma_copy_attrs(*lower, *it);
    if (it->file) it->pgoff = it->file_page(at);
    it->start = at;
    vma_link(a, *lower);
}

void split_range(ArenaCore& a, Range r, SplitSpares& spares) {
    split_at(a, r.start, spares.lower);
    split_at(a, r.end, spares.upper);
}

void discard_range(ArenaCore& a, const char* call, Range r) {
    // A page of an untouched part of the PTE table holds nothing, and the discard leaves it so: its
    // slots stay kSlotInArena, reading the same zeros (a later grant of write access preserves it).
    for (const PageSpan& span : pte_spans(a, a.page_index(r.start), a.page_index(r.end)))
        preserve_range(a, call, {a.page_addr(span.first), a.page_addr(span.last)});
    change_pages(a, call, r, [](Prot) { return Prot::None; });
    page_discard(r.start, r.end - r.start);
    clear_ptes(a, r);
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
            next->stats->add(it->stats->load());
            next->pgoff = it->pgoff;
            Vma* dead = &*it;
            it = vma_unlink(a, *dead);
            vma_free(dead);
        } else {
            it = next;
        }
    }
}

std::uintptr_t place_vma(ArenaCore& a, const char* call, std::uintptr_t want, std::size_t len, std::size_t length) {
    if (want) {
        if (!range_free(a, want, len))
            fail(EEXIST, "{}: range addr {:#x} + length {:#x} overlaps an existing VMA", call, want, length);
        return want;
    }
    const std::uintptr_t start = find_free(a, a.next_hint, len);
    if (!start) fail(ENOMEM, "{}: no free range of length {:#x} in the arena [{:#x}, {:#x})", call, length, a.base, a.end);
    return start;
}

void insert_vma(ArenaCore& a, Vma* vma, std::uintptr_t start, std::size_t len) {
    vma->start = start;
    vma->end = start + len;
    vma_link(a, *vma);
    a.next_hint = start + len;
    merge_range(a, start, start + len);
    a.last_hit.store(nullptr, std::memory_order_relaxed);
}

bool range_free(ArenaCore& a, std::uintptr_t start, std::size_t len) {
    const Vma* v = find_vma(a, start);
    return !v || v->start >= start + len;
}

// The hint if it is free, else first fit from the arena's base.
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

}  // namespace usermm::detail
