// VMAs, arenas, and the tree and the index (vma_index.hpp) that connect them.
#pragma once

#include <boost/intrusive/set.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "counters.hpp"
#include "pte.hpp"
#include "rwspin.hpp"
#include "swap.hpp"
#include "vma_index.hpp"

namespace usermm::detail {

namespace bi = boost::intrusive;

inline constexpr std::size_t kVmaNameMax = 40;
inline constexpr std::uint32_t kReadaroundMisses = 100;

struct MappedFile;
struct StackCore;
class Reclaimer;

// The kinds of VMA the fault path dispatches on (handle_pte_fault): one handler family each.
enum class VmaKind : std::uint8_t {
    Anonymous,    // demand-zero memory
    FilePrivate,  // a file's pages, written to copies of the VMA's own (MAP_PRIVATE)
    FileShared,   // a file's pages in the page cache that every mapping shares (MAP_SHARED)
};

// What a VMA is, apart from where it lies: copied by assignment when a VMA splits, compared when
// neighbours may merge (the kernel's vm_flags, vm_file and friends). A new attribute is one field
// here, and same_as if two VMAs that differ in it must stay apart.
struct VmaAttrs {
    Prot prot = Prot::None;
    std::uint32_t fault_around_pages = 0;
    char name[kVmaNameMax] = {};
    Advice advice = Advice::Normal;
    // File VMAs only (file == nullptr for anonymous memory): the file (each map_file's own; a copy
    // of the pointer is a reference, see vma_copy_attrs), how writes behave, whether the file was
    // opened for writing (the kernel's VM_MAYWRITE: a shared VMA may gain write access only then),
    // and the largest readahead window.
    MappedFile* file = nullptr;
    Share share = Share::Private;
    bool may_write = false;
    std::uint32_t readahead_max = 0;  // pages
    // Stack VMAs only (map_stack): anonymous memory that grows down by faults (expand_stack). Its
    // own; a stack VMA never splits or merges.
    StackCore* stack = nullptr;

    VmaKind kind() const {
        return !file ? VmaKind::Anonymous : share == Share::Shared ? VmaKind::FileShared : VmaKind::FilePrivate;
    }

    bool same_as(const VmaAttrs& o) const {
        return prot == o.prot && fault_around_pages == o.fault_around_pages && std::strcmp(name, o.name) == 0 &&
               advice == o.advice && file == o.file && share == o.share && may_write == o.may_write &&
               readahead_max == o.readahead_max && stack == o.stack;
    }
};

// One mapped range of an arena, like the kernel's vm_area_struct. Created, split, merged and freed
// only by the API world under the arena's write lock; the fault path reads it under the read lock.
// What find_vma reads of a node (the tree links, then the bounds: base classes are laid out in
// order) comes first, in one cache line; the counters live elsewhere (VmaCounters), so that a tree
// of 10^5 VMAs is a few MB.
struct VmaBounds {
    std::uintptr_t start = 0;  // page-aligned
    std::uintptr_t end = 0;    // exclusive, page-aligned
};

struct Vma final : bi::set_base_hook<bi::link_mode<bi::normal_link>, bi::optimize_size<true>>, VmaBounds, VmaAttrs {
    std::uint64_t pgoff = 0;   // file VMAs: the file page that `start` shows
    // Readahead state, a heuristic that faults update without a lock: where the last readahead
    // ended (the file page a sequential reader faults on next) and how large it was.
    std::atomic<std::uint64_t> ra_next{0};
    std::atomic<std::uint32_t> ra_window{0};
    // Faults that had to read a page out of sequence, less those that found theirs read already
    // (the kernel's mmap_miss): past kReadaroundMisses, reading around a fault is not worth it.
    std::atomic<std::uint32_t> ra_misses{0};
    VmaCounters stats;

    std::uint64_t file_page(std::uintptr_t addr) const;  // the file page shown at addr

    // VMA nodes live in usermm's node pool (api/node_pool.hpp), on huge pages: API world only.
    static void* operator new(std::size_t size);
    static void operator delete(void* p) noexcept;
};

// The tree is keyed by end, so that "the first VMA whose end is above addr" (the kernel's find_vma)
// is a single upper_bound. It is the VMAs' order for the API world's walks; find_vma asks the
// arena's VmaIndex (vma_index.hpp), which holds the same VMAs by end in a few wide nodes: a walk
// down this tree at 10^5 VMAs misses the cache at most of its seventeen levels. vma_link and
// vma_unlink (api/arena_ops.cpp) change both; a VMA's end never changes while it is in them (a
// split gives the lower part a new node, a merge keeps the upper one, a stack grows down).
struct VmaEndKey {
    using type = std::uintptr_t;
    type operator()(const Vma& v) const { return v.end; }
};
using VmaTree = bi::set<Vma, bi::key_of_value<VmaEndKey>, bi::constant_time_size<true>>;

struct SnapshotCore;
inline constexpr std::size_t kMaxSnapshots = 64;

// Which pages changed between the arena's previous snapshot (of any range) and snapshot
// `sequence`: one bit per page of [first, last), kept as the words that have a bit set (ascending
// word index, bits), so that a record costs what changed, not what the range covers. Kept from the
// oldest live snapshot on, so that an increment between two live snapshots is the union of the
// records after the older one.
struct ChangeRecord {
    std::uint64_t sequence = 0;
    std::size_t first = 0;
    std::size_t last = 0;
    std::vector<std::pair<std::size_t, std::uint64_t>> words;
    void mark(std::size_t page) {
        const std::size_t word = (page - first) / 64;
        if (words.empty() || words.back().first != word) words.emplace_back(word, 0);
        words.back().second |= std::uint64_t(1) << ((page - first) % 64);
    }
    bool changed(std::size_t page) const {
        if (page < first || page >= last) return false;
        const std::size_t word = (page - first) / 64;
        const auto it = std::lower_bound(words.begin(), words.end(), word,
                                         [](const auto& w, std::size_t k) { return w.first < k; });
        return it != words.end() && it->first == word && (it->second >> ((page - first) % 64) & 1);
    }
};

struct ArenaCore {
    std::uintptr_t base = 0;
    std::uintptr_t end = 0;
    std::uint64_t id = 0;  // unique in the process, never reused
    std::array<std::uint64_t, 2> identity{};  // random, names the arena's snapshot chain in images
    Pte* pte = nullptr;  // one per page of [base, end)
    std::size_t pte_bytes = 0;
    // One bit per page, a word per group of kGroupPages pages: set whenever the page gains write
    // access or becomes dirty, cleared by the snapshot that arms and records it again. Above it one
    // bit per group, set while the group's word is not zero. A snapshot looks only at what changed
    // since the previous one: a load per 64 groups (16 MiB) where nothing did, then a bit per
    // changed page, where a walk of every page of a changed group cost half the re-arm's own time at
    // 1% of a heap changed, scattered (perf/run rearm).
    std::atomic<std::uint64_t>* changed_pages = nullptr;
    std::atomic<std::uint64_t>* changed_groups = nullptr;
    std::size_t changed_page_bytes = 0;
    std::size_t changed_group_bytes = 0;

    RwSpinLock lock{LockRank::Arena};  // write side: API calls that change the tree or protections
    VmaTree tree;
    VmaIndex vma_index;                      // the tree's VMAs again, for find_vma
    std::atomic<Vma*> last_hit{nullptr};  // find_vma's cache; reset by every tree change
    std::atomic<long> kernel_maps{0};     // kernel VMAs this arena consists of (see map_budget)
    // Held by a fault from counting the kernel VMAs its change makes until it is published, so that
    // neighbouring faults never count against the same stale neighbour (see install()).
    SpinLock install_lock{LockRank::Install};
    Counters stats;
    // Anonymous pages that hold data in memory (pte_resident), the count a resident limit holds
    // down. Signed: an update and the one that undoes it may land in either order.
    std::atomic<std::int64_t> resident{0};
    ArenaSwap* swap = nullptr;  // arenas made with a store: the fault world's view of...
    Reclaimer* reclaimer = nullptr;  // ...the API world's reclaimer, which owns it
    // Live snapshots, changed only under the write lock; faults read them under the read lock.
    SnapshotCore* snapshots[kMaxSnapshots] = {};
    std::size_t snapshot_count = 0;
    // API world only.
    std::uintptr_t next_hint = 0;  // where map() looks for room first
    std::uint64_t snapshot_sequence = 0;
    std::atomic<bool> restoring{false};
    bool collect_armed = false;  // collect_dirty() has been used: write tracking matters to it
    std::size_t stack_count = 0;  // stack VMAs (map_stack)
    std::vector<ChangeRecord> history;
    std::vector<std::pair<std::size_t, std::size_t>> discarded;  // page ranges, since collect_dirty
    // Page ranges (sorted, apart) registered with the asynchronous userfaultfd: the kernel resolves
    // their write-protect faults and PAGEMAP_SCAN tells collect_dirty what was written
    // (api/dirty_async.cpp). Changed under the write lock; the fault world never reads it.
    std::vector<std::pair<std::size_t, std::size_t>> async_ranges;

    std::size_t page_index(std::uintptr_t addr) const;
    std::uintptr_t page_addr(std::size_t index) const;
    Pte& pte_of(std::uintptr_t addr) const { return pte[page_index(addr)]; }

    static constexpr std::size_t kGroupPages = 64;
    // The group's bit is set by whoever sets the first page bit of its word: both are cleared only
    // under the write lock, when no fault runs, so a reader under it sees the group's bit wherever a
    // page bit is set.
    void note_changed(std::size_t page) const { note_changed(page, page + 1); }
    // The pages [first, last): one update of each group's word, as a fault-around window needs.
    void note_changed(std::size_t first, std::size_t last) const {
        if (first >= last) return;
        for (std::size_t group = first / kGroupPages; group <= (last - 1) / kGroupPages; ++group)
            if (changed_pages[group].fetch_or(group_bits(group, first, last), std::memory_order_relaxed) == 0)
                changed_groups[group / 64].fetch_or(std::uint64_t(1) << (group % 64), std::memory_order_relaxed);
    }
    // The bits of a group's word for those of its pages that lie in [first, last), which must
    // reach into the group.
    static std::uint64_t group_bits(std::size_t group, std::size_t first, std::size_t last) {
        const std::size_t lo = std::max(first, group * kGroupPages) - group * kGroupPages;
        const std::size_t hi = std::min(last, (group + 1) * kGroupPages) - group * kGroupPages;
        return (hi == kGroupPages ? ~std::uint64_t(0) : (std::uint64_t(1) << hi) - 1) & ~((std::uint64_t(1) << lo) - 1);
    }
    // Keeps `resident` with a PTE that changes from `old` to `now`.
    void note_resident(pte_t old, pte_t now) {
        if (pte_resident(old) != pte_resident(now)) resident.fetch_add(pte_resident(now) ? 1 : -1, std::memory_order_relaxed);
    }
    // The changed pages of a group, bit k for page group * kGroupPages + k.
    std::uint64_t changed_in(std::size_t group) const { return changed_pages[group].load(std::memory_order_relaxed); }
    bool page_changed(std::size_t page) const { return changed_in(page / kGroupPages) >> (page % kGroupPages) & 1; }
    bool group_changed(std::size_t group) const {
        return changed_groups[group / 64].load(std::memory_order_relaxed) >> (group % 64) & 1;
    }
    // Under the write lock: the pages `bits` of the group have nothing new until they change again.
    void clear_changed(std::size_t group, std::uint64_t bits) const {
        if (bits && (changed_pages[group].fetch_and(~bits, std::memory_order_relaxed) & ~bits) == 0)
            changed_groups[group / 64].fetch_and(~(std::uint64_t(1) << (group % 64)), std::memory_order_relaxed);
    }
};


inline std::uint64_t Vma::file_page(std::uintptr_t addr) const { return pgoff + ((addr - start) >> g_page_shift); }

inline std::size_t ArenaCore::page_index(std::uintptr_t addr) const { return (addr - base) >> g_page_shift; }
inline std::uintptr_t ArenaCore::page_addr(std::size_t index) const {
    return base + (std::uintptr_t(index) << g_page_shift);
}

// For usermm's own tests and benchmarks, which look inside an arena.
struct ArenaAccess {
    static ArenaCore& core(const Arena& a) { return *a.core_; }
};

}  // namespace usermm::detail
