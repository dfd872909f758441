// usermm: the kernel's page-fault machinery in user space.
//
// An Arena reserves PROT_NONE address space. VMAs mapped inside it are demand-zero: the first access
// to a page traps (SIGSEGV), usermm decides what the access means, and either makes it succeed or
// passes the signal on exactly as the kernel would have delivered it. Every fault is counted.
//
// Rules for code that runs with usermm (see README.md for the long form):
//  - System calls that write into or read from arena memory that has not been faulted in yet fail
//    with EFAULT instead of faulting. Call Arena::prefault() on the buffer first; the same after a
//    snapshot, collect_dirty() or sync(), which write-protect the pages until their next write.
//  - Do not block SIGSEGV in threads that touch arena memory: the kernel then kills the process on
//    the first fault instead of running the handler.
//  - An alternate signal stack must hold signal_stack_size() bytes; a thread whose stack lies in
//    an arena needs one. Programs must bind symbols at load time (-Wl,-z,now, which the CMake
//    target passes on), or lazy binding runs the resolver on that stack.
//  - fork() is safe: usermm waits for faults in flight and the child inherits the arenas. Signal
//    handlers and pthread_atfork handlers may touch arena memory, except fork handlers registered
//    before usermm was loaded (README, "fork()").
#pragma once

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include <usermm/export.hpp>

namespace usermm {

namespace detail {
struct ArenaCore;
struct StackCore;
struct ArenaAccess;
struct SnapshotCore;
}

// Access rights of a VMA, with mmap(2)'s meaning. As on x86-64, Write and Exec imply Read: a VMA
// mapped Exec or Write alone is readable, and vmas() reports it with Read added.
enum class Prot : unsigned {
    None = 0,
    Read = 1,
    Write = 2,
    Exec = 4,
    ReadWrite = Read | Write,
};

constexpr Prot operator|(Prot a, Prot b) { return Prot(unsigned(a) | unsigned(b)); }
constexpr Prot operator&(Prot a, Prot b) { return Prot(unsigned(a) & unsigned(b)); }
constexpr Prot operator^(Prot a, Prot b) { return Prot(unsigned(a) ^ unsigned(b)); }
constexpr Prot operator~(Prot a) { return Prot(~unsigned(a) & 7u); }
constexpr Prot& operator|=(Prot& a, Prot b) { return a = a | b; }
constexpr Prot& operator&=(Prot& a, Prot b) { return a = a & b; }
// True when every right in `wanted` is in `p`.
constexpr bool allows(Prot p, Prot wanted) { return (p & wanted) == wanted; }

// How a file VMA treats writes, as mmap(2)'s MAP_PRIVATE and MAP_SHARED (which is what the VMA's
// kernel mapping is): a private VMA's writes go to its own copies of the pages and never to the
// file; a shared VMA's writes go to the kernel's page cache, where every mapping of the file (in
// any process) and read(2) see them at once, and are made durable by write-back (sync, unmap, the
// arena's destruction).
enum class Share : unsigned { Private, Shared };

// Access-pattern advice, as madvise(2).
// For file VMAs, Normal, Random and Sequential also set the kernel's own flags on the range
// (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL), which split its mapping where they change.
enum class Advice : unsigned {
    Normal,      // readahead grows with sequential faults, from the fault-around window
    Random,      // read only the page a fault needs
    Sequential,  // read the largest window from the first fault on
    WillNeed,    // start reading the range into the page cache and return (MADV_WILLNEED); an
                 // access to a page read ahead is a minor fault
    DontNeed,    // drop the range's pages (shared dirty pages are written back first): the next
                 // access sees the file (file VMAs: a private VMA's writes are gone; the kernel's
                 // page cache keeps its pages, as with MADV_DONTNEED) or zeros (anonymous VMAs)
    PageOut,     // anonymous VMAs of an arena with a store: evict the range's pages now, as
                 // MADV_PAGEOUT (written to the store if they hold data; the next access reads
                 // them back, a major fault). Pages a store write refused stay resident (store_errors)
    Cold,        // anonymous VMAs of an arena with a store: the range's pages are first in line
                 // for eviction, as MADV_COLD; nothing is evicted now
};
// "rwx" style, as in /proc/self/maps.
USERMM_API std::string to_string(Prot p);

// Counters kept per VMA, per arena and for the process. One list, so that every consumer (the
// struct, the formatter, the accounting code) sees the same fields in the same order.
#define USERMM_STATS_FIELDS(X)                                                                  \
    X(minor_faults, "faults resolved without I/O")                                             \
    X(major_faults, "faults that had to wait for I/O: a file page not in the page cache, or a page read back from the store") \
    X(read_faults, "resolved faults caused by a read")                                         \
    X(write_faults, "resolved faults caused by a write")                                       \
    X(exec_faults, "resolved faults caused by an instruction fetch")                           \
    X(zero_page_reads, "read faults on untouched pages, answered by the zero page")            \
    X(fault_around_pages, "neighbour pages mapped by fault-around in the same fault")          \
    X(spurious_faults, "faults another thread had already resolved")                           \
    X(access_errors, "faults in an arena that its VMAs forbid (or usermm cannot resolve)")     \
    X(foreign_faults, "SIGSEGV/SIGBUS outside every arena, or sent by kill, passed on")        \
    X(degraded_faults, "faults resolved coarsely to stay within the kernel's mapping budget")  \
    X(degraded_pages, "pages handed to the kernel's own demand paging by degraded faults")     \
    X(prefault_pages, "pages made accessible ahead of time by prefault()")                     \
    X(cow_faults, "faults that copied old pages into snapshots (a Snapshot's: pages it took); not private-file COW") \
    X(cow_bytes_copied, "bytes copied into snapshots before writes")                           \
    X(pages_restored, "pages written back into the arena by restore()")                        \
    X(dirty_pages_collected, "pages reported by collect_dirty()")                              \
    X(dirty_async_collects, "collect_dirty() calls whose range the kernel tracked (userfaultfd WP_ASYNC, no fault per write)") \
    X(file_pages_read, "file pages the kernel read for usermm: not in its page cache when asked for") \
    X(file_bytes_read, "bytes of those pages (the part of a last page past the end excluded)") \
    X(readahead_pages, "pages read besides the one a fault needed (readahead, WillNeed, prefault)") \
    X(readahead_hits, "read-ahead pages that a fault later mapped, or mapped at once")          \
    X(readahead_wasted, "read-ahead pages unmapped or dropped (DontNeed) without being mapped")  \
    X(pages_dirtied, "shared file pages that a write made dirty (prefault's write access alone does not)") \
    X(pages_written_back, "dirty shared file pages written to their file")                      \
    X(bytes_written_back, "bytes written to files by write-back")                               \
    X(writeback_errors, "write-backs the file system refused (usermm keeps the pages' content)") \
    X(pages_swapped_out, "anonymous pages written to the arena's store and dropped from memory") \
    X(pages_swapped_in, "pages read back from the store (at a fault, or read ahead with one)")  \
    X(swap_bytes_written, "bytes written to the store")                                         \
    X(swap_bytes_read, "bytes read from the store")                                             \
    X(swap_readahead_hits, "pages read ahead from the store that a later access used")           \
    X(swap_readahead_wasted, "pages read ahead from the store and evicted again unused")         \
    X(hinting_faults, "faults on pages made inaccessible (inactive) only to see whether they are used") \
    X(pages_reclaimed, "pages reclaimed: swapped out, or dropped without I/O (zero, or clean in the store)") \
    X(direct_reclaims, "faults that found the arena at its resident limit and evicted a batch themselves") \
    X(reclaim_stalls, "faults at the resident limit with no batch to evict, that waited for the reclaimer") \
    X(limit_overruns, "of those, faults the reclaimer did not bring under the limit in time: they went on over it") \
    X(store_errors, "store writes or reads that failed (a failed write keeps its page resident)") \
    X(resident_pages, "anonymous pages that hold data in memory now (a gauge, not a count of events)") \
    X(stack_growth_faults, "faults that grew a stack (map_stack) below its committed part: minor faults of kind stack_grow") \
    X(stack_pages_grown, "stack pages those faults (and Stack::ensure) committed")                \
    X(stack_overflows, "accesses past the end of a stack by the code running on it")             \
    X(snapshots_taken, "snapshots taken (snapshot())")                                           \
    X(snapshot_pause_ns, "nanoseconds snapshot() held the arena's write lock: the arena's faults wait that long") \
    X(snapshot_pages_recycled, "snapshot copies onto store pages kept from released snapshots (the store pool): nothing to allocate or zero") \
    X(vma_names_dropped, "VMA names not shown in /proc/PID/maps: the mapping budget was short, or the kernel refused the name") \
    X(handler_ns, "nanoseconds spent in the fault handler")

inline constexpr std::size_t kLatencyBuckets = 16;

// The version of the counter list: raised whenever a counter is added, removed or changes its
// meaning, so that a program built against one release of usermm can tell what a Stats it gets
// from another holds (Stats::version). 2: file VMAs on the kernel's page cache (issue 9). 3: reclaim
// and swap (pages_swapped_out ... resident_pages; major_faults counts swap-ins too). 4: stacks
// (stack_growth_faults, stack_pages_grown, stack_overflows). 5: limit_overruns. 6: snapshots_taken,
// snapshot_pause_ns, vma_names_dropped. 7: snapshot_pages_recycled (the store pool),
// dirty_async_collects.
inline constexpr std::uint32_t kStatsVersion = 7;

struct USERMM_API Stats {
    std::uint32_t version = kStatsVersion;
#define USERMM_STATS_MEMBER(name, doc) std::uint64_t name = 0;
    USERMM_STATS_FIELDS(USERMM_STATS_MEMBER)
#undef USERMM_STATS_MEMBER
    // Handler latency: bucket 0 holds faults under 1 µs, bucket k (k ≥ 1) those in [2^(k-1), 2^k) µs,
    // the last bucket everything slower.
    std::array<std::uint64_t, kLatencyBuckets> latency{};

    Stats& operator+=(const Stats& other);
    bool operator==(const Stats&) const = default;
};

// A readable multi-line table, one counter a line with its description, then the handler latency
// histogram; columns fit the longest name and the widest value shown. Compact shows only the
// non-zero counters and buckets (one line if all are zero); Full shows every one. <usermm/fmt.hpp>
// makes Stats printable with fmt directly: "{}" (or "{:compact}") and "{:full}".
enum class StatsFormat { Compact, Full };
USERMM_API std::string format_stats(const Stats& s, StatsFormat format = StatsFormat::Compact);

// Errors from the API. The message names the call, the bad argument and the address.
class USERMM_API Error : public std::system_error {
public:
    Error(int errno_value, const std::string& what) : std::system_error(errno_value, std::generic_category(), what) {}
};

struct MapOptions {
    // A name for usermm's diagnostics, vmas(), find_vma() and usermm-stat; at most 39 bytes are
    // kept. A file VMA without a name takes its file's path. Where the kernel names anonymous
    // memory (PR_SET_VMA_ANON_NAME, Linux 5.17 with CONFIG_ANON_VMA_NAME), an anonymous VMA's name
    // also shows in /proc/PID/maps and smaps as [anon:NAME], so that pmap and perf see it; the name
    // keeps the VMA's kernel mappings apart from the reservation around it, which the mapping
    // budget pays for: when the budget is short, or the kernel refuses the name (it takes none of
    // the characters [ ] \ $ ` and no control characters), the name is usermm's alone
    // (Stats::vma_names_dropped).
    // USERMM_VMA_NAMES=0 keeps every name usermm's own.
    std::string_view name = {};
    // Place the VMA here (page-aligned, inside the arena, not overlapping another VMA); nullptr lets
    // the arena choose.
    void* address = nullptr;
    // Untouched neighbours mapped by the same fault, inside an aligned window of this many pages
    // (the kernel's fault_around_bytes, 64 KiB). 0 or 1 turns fault-around off. Once the arena
    // consists of 1,024 kernel VMAs, an anonymous window also reaches over up to 128 untouched
    // pages to a neighbour granted the same access, so that a sparse heap stays few kernel VMAs.
    std::size_t fault_around_pages = 16;
    // Ask for transparent huge pages (MADV_HUGEPAGE). With fault_around_pages a multiple of 512,
    // each 2 MiB window becomes one huge page on first touch, and a snapshot write-protects it in
    // one step instead of 512: the way to short snapshot pauses for large resident heaps.
    bool huge_pages = false;
    // File VMAs: the largest readahead window, in pages (the kernel's read_ahead_kb is 128 KiB by
    // default). One fault reads ahead and maps at most 128 pages, whatever this says.
    std::size_t readahead_pages = 64;
};

struct VmaInfo {
    void* start = nullptr;
    std::size_t length = 0;
    Prot prot = Prot::None;
    std::string name;
    std::size_t fault_around_pages = 0;
    // File VMAs: the file's path, the offset of `start` in it, and how writes behave. The path is
    // the one map_file(path) was given or, for a descriptor, the one /proc/self/fd/N named when the
    // file was first mapped (ending in " (deleted)" if it was unlinked; the link itself if it could
    // not be read); at most 255 bytes are kept. Empty for anonymous VMAs.
    std::string file;
    std::uint64_t offset = 0;
    Share share = Share::Private;
    // Memory, in bytes (multiples of the page size). Committed: the pages that hold memory or may
    // gain some without a fault usermm sees: every page granted write access since it was last
    // discarded (the kernel allocates it at its first write), and a file VMA's pages granted any
    // access (the kernel maps them from its page cache). Resident: the committed pages the kernel holds in RAM now (mincore): a
    // page granted write access but never written holds nothing, unless a read mapped the zero
    // page there first, which mincore counts. Pages only read in an anonymous VMA map the shared
    // zero page and count in neither. vmas() and find_vma() read the page-state table only where
    // it was ever touched and ask mincore about the committed pages: a cost with the pages used.
    std::size_t committed = 0;
    std::size_t resident = 0;
    Stats stats;
};

class Arena;

// Snapshot images (format: README, "Snapshot images"). Each names its chain: a random 128-bit
// identity of the arena it was taken from (new for every Arena and for each arena of a forked
// child), plus the snapshot's sequence in that arena; an increment also names the image it applies
// to. Arena::load accepts an increment only right after that image.
struct ImageInfo {
    std::uint64_t offset = 0;  // where the image starts in the file
    std::uint64_t bytes = 0;   // its length
    std::array<std::uint64_t, 2> chain{};
    std::uint64_t sequence = 0;
    std::array<std::uint64_t, 2> base_chain{};  // increments: the chain and sequence they apply to
    std::uint64_t base_sequence = 0;             // 0 for a full image
    void* original_base = nullptr;               // the arena's base when the snapshot was taken
    std::size_t arena_size = 0;
    std::uint64_t range_offset = 0;  // the snapshot's range, from the arena's base
    std::uint64_t range_length = 0;
    std::size_t vma_count = 0;
    std::uint64_t page_records = 0;  // pages the image holds: data pages plus (increments) zero pages
    std::uint64_t data_pages = 0;
    bool full() const { return base_sequence == 0; }
};
// Every image the file holds, in order, from the headers and end records alone (one pread each,
// found from the end of the file backwards): enough for a restart path to order files without a
// manifest. Pages and checksums are not read; load checks those. Throws EINVAL if the file is not
// a sequence of whole images, ESPIPE for a pipe.
USERMM_API std::vector<ImageInfo> image_info(int fd);

struct LoadOptions {
    // Reserve the new arena at the base the images were written from, so that pointers into the
    // arena stored in it stay valid. Fails with EEXIST, naming the range, if anything is mapped
    // there (in a process that still has the original arena, say).
    bool at_original_base = false;
};

// A point-in-time view of a range of an arena, taken without fork(): at snapshot() the pages that
// could be written without a fault lose write access; the first write to a page afterwards copies
// its old content into the snapshot (copy-before-write) and then goes on. A snapshot costs the pages
// written after it, plus a slot byte and a 4-byte store index per covered page, paged in only where
// used. Several may be live at once. The destructor
// releases the copies and gives write access back where no other snapshot needs it.
class USERMM_API Snapshot {
public:
    Snapshot(Snapshot&&) noexcept;
    Snapshot& operator=(Snapshot&&) noexcept;
    Snapshot(const Snapshot&) = delete;
    Snapshot& operator=(const Snapshot&) = delete;
    ~Snapshot();

    void* start() const;
    std::size_t length() const;
    // 1, 2, ... in the order snapshots of the same arena were taken.
    std::uint64_t sequence() const;

    // Copies the content [addr, addr + length) had when the snapshot was taken, whatever has been
    // written since. The range must lie inside the snapshot.
    void read(const void* addr, void* buffer, std::size_t length) const;
    // Calls fn(page address, page content as of the snapshot) for every page of the snapshot that
    // was not all zeros (pages never written are skipped), in address order. The span is valid
    // only during the call; fn runs with asynchronous signals blocked.
    void for_each_page(const std::function<void(const void* addr, std::span<const std::byte> page)>& fn) const;
    // Writes a checkpoint image (format: README, "Snapshot images") of the snapshot to `fd`, while
    // other threads keep writing the arena. With `previous` (an earlier snapshot of the same range,
    // still live), writes an increment holding only the pages changed between the two. Each
    // write(2) runs with the caller's signal mask, so a default SIGTERM ends the process even while
    // the reader does not read; a handler without SA_RESTART that interrupts a write before it
    // wrote anything makes write_to throw EINTR.
    void write_to(int fd) const;
    void write_to(int fd, const Snapshot& previous) const;

    // cow_faults (pages copied into this snapshot), cow_bytes_copied, pages_restored.
    Stats stats() const;

private:
    friend class Arena;
    explicit Snapshot(std::shared_ptr<detail::SnapshotCore> core);
    std::shared_ptr<detail::SnapshotCore> core_;
};

// The store pool: the stores of released snapshots are kept for the copies of later snapshots (of
// any arena), so that a copy lands on a page that is already there instead of one the kernel must
// allocate and zero first. Kept pages are freeable (MADV_FREE): under memory pressure the kernel
// takes them before anything else, and a copy onto a page it took pays the zeroing again. At most
// `bytes` of copied pages are kept (256 MiB to begin with; 0 keeps none and releases what is kept
// now), in at most four stores, the newest first. Returns the previous limit.
USERMM_API std::size_t set_snapshot_store_pool(std::size_t bytes);
struct StorePool {
    std::size_t limit_bytes;  // set_snapshot_store_pool's
    std::size_t kept_bytes;   // copied pages kept now (the kernel may have taken some of them since)
};
USERMM_API StorePool snapshot_store_pool();

// Pages written since the previous collect_dirty() of the range (or since they were mapped).
struct USERMM_API DirtySet {
    std::vector<void*> pages;  // page addresses, ascending
    std::size_t size() const { return pages.size(); }
    bool empty() const { return pages.empty(); }
    bool contains(const void* page_addr) const;
};

class Store;
class Stack;
struct StackOptions;

// Page replacement: which resident pages go first when an arena is over its resident limit. usermm
// sees no accessed bits (unprivileged user space has none); what it knows of use comes from faults:
// first touches, swap-ins, refaults of pages evicted recently, and hinting faults on pages it made
// inaccessible (without dropping them) to see whether they are still used. Pages are reclaimed in
// clusters of 32 (the kernel's SWAP_CLUSTER_MAX), which keeps the kernel's mappings few.
enum class Policy {
    Fifo,    // in the order clusters were first touched
    Clock,   // FIFO with a second chance for clusters used since the hand last passed
    S3Fifo,  // S3-FIFO (SOSP'23): a small probation queue, a main queue with use counts and a
             // ghost queue of clusters evicted recently; scan-resistant. The default (README,
             // "Reclaim and swap", has the measurements that chose it)
};

struct ArenaOptions {
    // The most anonymous memory the arena may hold in RAM, in bytes (rounded down to clusters of
    // 32 pages); 0 for no limit: then nothing of reclaim runs and the arena costs what it did. A
    // limit needs a store. Over the high watermark (the limit less 1/16) a background reclaimer
    // evicts down to the low one (the limit less 1/8); a fault that finds the arena at the limit
    // reclaims a cluster itself first (direct reclaim), or waits for the reclaimer.
    std::size_t resident_limit = 0;
    // Where evicted pages go; must outlive the arena. One store may serve several arenas.
    Store* store = nullptr;
    Policy policy = Policy::S3Fifo;
    // Called (on usermm's reclaimer thread) when the store refuses a write or a read, with the
    // errno and the first page's address; without it, the first error is reported on stderr.
    std::function<void(int error, const void* addr)> on_store_error = {};  // = {}: designated initializers may leave it out
};

// Every call on a moved-from Arena throws Error (EINVAL, "the arena was moved from"); assigning an
// arena to it makes it usable again.
class USERMM_API Arena {
public:
    // Reserves `size` bytes (rounded up to pages) of PROT_NONE address space.
    explicit Arena(std::size_t size, const ArenaOptions& options = {});
    ~Arena();
    Arena(Arena&&) noexcept;
    Arena& operator=(Arena&&) noexcept;
    Arena(const Arena&) = delete;
    Arena& operator=(const Arena&) = delete;

    void* base() const;
    std::size_t size() const;
    bool contains(const void* p) const;

    // A demand-zero VMA of `length` bytes (rounded up to pages), like mmap(MAP_ANONYMOUS). Nothing
    // is committed until a page is touched.
    void* map(std::size_t length, Prot prot, const MapOptions& options = {});
    // The same for `count` objects of type T: a demand-zero VMA of count * sizeof(T) bytes, each
    // object's bytes zero until written. The caller unmaps it (or owns it through a Mapping).
    template <class T>
    std::span<T> map_span(std::size_t count, Prot prot, const MapOptions& options = {}) {
        static_assert(std::is_trivially_copyable_v<T>, "arena memory starts as zero bytes, not constructed objects");
        static_assert(alignof(T) <= 4096, "VMAs are only page-aligned");
        if (count > std::numeric_limits<std::size_t>::max() / sizeof(T))
            throw Error(EINVAL, "usermm::Arena::map_span: count " + std::to_string(count) + " of " +
                                    std::to_string(sizeof(T)) + "-byte objects overflows");
        return {static_cast<T*>(map(count * sizeof(T), prot, options)), count};
    }
    // A VMA showing `length` bytes of a file from `offset` (page-aligned): the VMA's kernel mapping
    // is the file itself (mmap(2) with MAP_FIXED in the arena, PROT_NONE until usermm grants
    // access), so the kernel's page cache holds the only copy of each page, reads it, reclaims clean
    // pages under memory pressure and keeps every mapping of the file coherent: a write(2) to the
    // file is seen by a shared VMA and by a private VMA's pages not written yet, as with mmap. usermm
    // decides at each fault what to grant and how far to read ahead (MADV_WILLNEED), and counts the
    // fault major if its page was not in the page cache (mincore; for a file the process neither
    // owns nor may write, the kernel hides that, and every fault counts as minor). No usermm lock is
    // held while the kernel reads. The file must be a regular file the kernel can map (else ENODEV,
    // also for a FIFO, which is never opened blocking), opened for reading, and for writing too if
    // the VMA is Shared and writable. usermm opens the file again for its own use (through
    // /proc/self/fd; where the process may no longer open it, it duplicates `fd`): the caller may
    // close `fd` at once. An access to a page wholly past the end of the file raises SIGBUS with a
    // diagnostic naming the file and the offset, whether the page was mapped before (the file was
    // truncated) or not, as does an I/O error while the kernel reads it, or a write to a hole of a
    // sparse file for which the file system has no space; the part of the last page past the end
    // reads as zeros.
    void* map_file(int fd, std::uint64_t offset, std::size_t length, Prot prot, Share share,
                   const MapOptions& options = {});
    // The same, opening `path` itself (read-only, or read-write for a writable shared VMA).
    void* map_file(const std::string& path, std::uint64_t offset, std::size_t length, Prot prot, Share share,
                   const MapOptions& options = {});
    // A stack of `size` bytes (rounded up to pages) that grows down by faults, as the kernel's
    // expand_stack grows a process's stack: see Stack and StackOptions. Its VMA is Read+Write
    // anonymous memory with a permanent guard below it; it belongs to the Stack, so protect(),
    // advise(), prefault() and unmap() refuse it (EINVAL; Stack::ensure commits), and restore() a
    // range that holds one (ENOTSUP). Gives the calling thread an alternate signal stack
    // (install_signal_stack), without which a fault on a usermm stack cannot be handled.
    Stack map_stack(std::size_t size, const StackOptions& options);
    Stack map_stack(std::size_t size);
    // Like msync(MS_SYNC): the dirty pages of shared file VMAs in the range lose write access (so
    // that the next write is seen, and a read(2) into them fails with EFAULT until then: prefault
    // them first) and count as clean, and the kernel writes the file's dirty pages and waits
    // (fdatasync, without the arena's lock: faults go on meanwhile). That includes pages written
    // through any other mapping of the file, as with msync, and of the rest of the file. On an
    // error (EIO, ENOSPC) it throws, naming the file and the byte range; the kernel marks such pages
    // clean and may drop them, so usermm keeps a copy of each page the range had dirty, makes it
    // inaccessible, and writes the copy back into the page cache at its next access or sync:
    // nothing written is lost, even if the page cache is dropped in between. The range must lie
    // inside VMAs; anonymous VMAs in it are skipped.
    void sync(void* addr, std::size_t length);
    // Like madvise(2); see Advice. The range must lie inside VMAs.
    void advise(void* addr, std::size_t length, Advice advice);
    // Like mprotect(2): the range must lie inside VMAs; VMAs are split and merged as needed.
    void protect(void* addr, std::size_t length, Prot prot);
    // Like munmap(2): the range must lie inside VMAs; its pages are discarded and the range becomes
    // PROT_NONE address space of the arena again. Dirty pages of shared file VMAs are written back
    // first (and the write-back is waited for); if that fails, unmap throws and nothing is
    // unmapped. The destructor writes back too, and reports a failure on stderr (it cannot throw);
    // the pages stay in the kernel's page cache then, dirty, for its own write-back.
    void unmap(void* addr, std::size_t length);
    // Grants `access` on the range now, so that system calls into it cannot fail with EFAULT. The
    // VMAs must allow `access`, which must grant something (Prot::None is EINVAL). Memory is still
    // committed by the kernel only when touched. File pages are read (MADV_POPULATE_READ, or
    // MADV_POPULATE_WRITE for a private VMA's writable copies) after the arena's lock is released;
    // a page past the end of the file is EFAULT, an unreadable one EIO. Write access to a shared
    // file page does not make it dirty: only a write does.
    void prefault(void* addr, std::size_t length, Prot access);

    // A snapshot of the whole arena's anonymous VMAs (file VMAs are skipped: their content is their
    // file's; the snapshot reads zeros there, and restore() leaves them alone), or of
    // [addr, addr + length), which must hold no file VMA (ENOTSUP).
    Snapshot snapshot();
    Snapshot snapshot(void* addr, std::size_t length);
    // Makes the snapshot's range equal to the snapshot again (VMAs and content). Only pages changed
    // since the snapshot are written; threads touching the range meanwhile wait in the fault path
    // and see either the old or the restored content of a page; the pages it does not change keep
    // their access. The VMAs put back keep the counters of those they replace. The snapshot stays
    // valid.
    void restore(const Snapshot& snapshot);
    // Pages of [addr, addr + length) written since the last collection; re-arms tracking, so the
    // next write to each of them is seen again (Boehm GC's dirty bits, the kernel's soft-dirty).
    DirtySet collect_dirty(void* addr, std::size_t length);
    // A new arena from a full image and the increments after it, in order (written by
    // Snapshot::write_to). Each descriptor is read from offset 0 to its end (pread; its offset
    // does not move), and may hold several images back to back, as an append-only checkpoint log
    // does; pipes and sockets are read from where they are to their end. Throws, building nothing,
    // if an image is truncated, corrupted, claims what map() would refuse, or does not follow the
    // image before it in its chain (see ImageInfo). The data lands at a new address unless
    // `options` asks for the original one: offsets from base() are kept, pointers are not.
    static Arena load(std::span<const int> image_fds, const LoadOptions& options = {});

    // Changes the resident limit (ArenaOptions::resident_limit; 0 removes it) of an arena made
    // with a store, and reclaims down to a lower one before returning.
    void set_resident_limit(std::size_t bytes);
    std::size_t resident_limit() const;

    Stats stats() const;
    std::vector<VmaInfo> vmas() const;
    // The lowest VMA whose name is `name` (compared as kept: its first 39 bytes), if any. A VMA
    // that protect() split is several VMAs of the same name; vmas() lists them all.
    std::optional<VmaInfo> find_vma(std::string_view name) const;
    // Checks that the VMA tree, the per-page state and the kernel's mappings (/proc/self/maps)
    // agree, and that usermm's count of the kernel mappings the arena consists of (the map budget)
    // is the kernel's; throws Error naming the first address where they do not, or both counts.
    // Its cost follows the touched pages, not the reserved size.
    void verify() const;

private:
    friend struct detail::ArenaAccess;
    friend class Snapshot;
    Arena(std::size_t size, void* at);  // the reservation at `at` exactly (MAP_FIXED_NOREPLACE)
    Snapshot take_snapshot(void* addr, std::size_t length, bool whole);
    void* map_file_as(int fd, const std::string& path, std::uint64_t offset, std::size_t length, Prot prot,
                      Share share, const MapOptions& options);
    std::unique_ptr<detail::ArenaCore> core_;
};

// An anonymous VMA owned by an object, like a unique_ptr of a mapping: the destructor unmaps it with
// the length it was mapped with (an unmap that fails then, because the program unmapped part of it
// itself, is reported on stderr). It refers to the Arena object, which must outlive it and not move.
class USERMM_API Mapping {
public:
    Mapping() = default;
    // arena.map(length, prot, options), owned.
    Mapping(Arena& arena, std::size_t length, Prot prot, const MapOptions& options = {});
    Mapping(Mapping&& other) noexcept;
    Mapping& operator=(Mapping&& other) noexcept;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping();

    void* get() const { return addr_; }
    std::size_t size() const { return length_; }  // the length asked for
    explicit operator bool() const { return addr_ != nullptr; }
    // Gives the VMA up without unmapping it; the Mapping is empty afterwards.
    void* release();
    // The mapping as size() / sizeof(T) objects of type T.
    template <class T>
    std::span<T> as_span() const {
        static_assert(std::is_trivially_copyable_v<T>, "arena memory starts as zero bytes, not constructed objects");
        static_assert(alignof(T) <= 4096, "VMAs are only page-aligned");
        return {static_cast<T*>(addr_), length_ / sizeof(T)};
    }

private:
    Arena* arena_ = nullptr;
    void* addr_ = nullptr;
    std::size_t length_ = 0;
};

// --- stacks ----------------------------------------------------------------------------------

// How a stack keeps its uncommitted part and its guard inaccessible.
enum class GuardMode : unsigned {
    Auto,      // Markers where the kernel has them (probed once), else ProtNone; USERMM_STACK_GUARDS=
               // markers|protnone overrides it for the whole process
    Markers,   // MADV_GUARD_INSTALL guard markers (Linux 6.13): page-table entries, no kernel VMA of
               // their own: stacks side by side are one kernel mapping, whatever their number
    ProtNone,  // PROT_NONE: each stack costs two kernel mappings, counted against the map budget
};

struct StackOptions {
    // A name for diagnostics, vmas() and StackOverflow; at most 39 bytes are kept.
    std::string_view name = {};
    // Committed below the part in use at creation and at every growth (rounded up to pages), so
    // that a system call writing into a local buffer this large finds it committed (README,
    // "Stacks": when a system call can still see EFAULT). Committed memory costs nothing until
    // touched: the kernel allocates each page at its first write.
    std::size_t headroom = 64 << 10;
    // The permanent guard below the stack, rounded up to pages: an access there by the code
    // running on the stack is an overflow. It catches a frame up to this large that skips pages.
    std::size_t guard = 64 << 10;
    // A fault at most this far below the committed part grows the stack; further down it grows
    // only within 64 KiB of the faulting thread's stack pointer, if that lies on the stack (the
    // kernel's old expand_stack check); any other access there is an overflow (the stack pointer is
    // on the stack) or a wild access (it is not), never a silent grant.
    std::size_t gap = 64 << 10;
    GuardMode guard_mode = GuardMode::Auto;
};

class StackPool;

// A stack in an arena, owning its VMA: [bottom(), top()) is usable, committed on demand from the
// top; the destructor unmaps it (or gives it back to its pool). Must not outlive its arena.
// Switching to it (swapcontext, Boost.Context, assembly) is the program's; the thread that runs on
// it needs an alternate signal stack (install_signal_stack).
class USERMM_API Stack {
public:
    Stack() = default;
    Stack(Stack&& other) noexcept;
    Stack& operator=(Stack&& other) noexcept;
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    ~Stack();

    explicit operator bool() const { return core_ != nullptr; }
    void* top() const;     // the initial stack pointer: one past the highest byte
    void* bottom() const;  // the lowest usable byte; the guard lies below
    std::size_t size() const;       // top() - bottom()
    std::size_t committed() const;  // bytes from the top that are committed (no guard)
    // The most of the stack used since it was made (or last shrunk by its pool), in bytes from the
    // top: the deepest page the kernel holds, found by mincore over the committed part.
    std::size_t peak() const;
    // Commits at least `bytes` below the calling thread's stack pointer if it runs on this stack,
    // else below top(): for a system call into a local buffer deeper than the headroom.
    void ensure(std::size_t bytes);
    std::string_view name() const;
    std::uint64_t id() const;  // unique in the process, as in StackOverflow
    GuardMode guard_mode() const;  // Markers or ProtNone, as chosen

private:
    friend class Arena;
    friend class StackPool;
    Stack(detail::ArenaCore* arena, detail::StackCore* core, StackPool* pool) : arena_(arena), core_(core), pool_(pool) {}
    void reset() noexcept;
    detail::ArenaCore* arena_ = nullptr;
    detail::StackCore* core_ = nullptr;
    StackPool* pool_ = nullptr;
};

struct StackPoolOptions {
    std::size_t max_size = 1 << 20;      // each stack's size
    std::size_t keep_resident_pages = 2;  // what a returned stack keeps of its memory, from the top
    std::size_t max_idle = 4096;          // idle stacks kept; a stack returned beyond them is unmapped
    StackOptions stack = {};              // name and guards of the stacks made
};

class StackPoolAllocator;  // Boost.Context's StackAllocator: <usermm/boost_context.hpp>

// Stacks recycled: acquire() hands out the idle stack given back last, guards in place, without a
// system call. A stack given back (its Stack destroyed) that grew gets its guard markers back at
// once, dropping the grown pages; one that did not grow is kept as it is, and once 128 such wait,
// the oldest 64 are shrunk to keep_resident_pages together (one MADV_DONTNEED call for all; guard
// markers survive it). Thread-safe. The pool must outlive the stacks it hands out, and its arena
// the pool.
class USERMM_API StackPool {
public:
    explicit StackPool(Arena& arena, const StackPoolOptions& options = {});
    ~StackPool();
    StackPool(const StackPool&) = delete;
    StackPool& operator=(const StackPool&) = delete;

    Stack acquire();
    StackPoolAllocator allocator();  // defined in <usermm/boost_context.hpp>
    std::size_t idle() const;
    std::size_t stack_size() const;
    // For allocators that keep only the top: acquire() without the Stack object, and its return.
    void* acquire_top();
    void release_top(void* top) noexcept;

private:
    friend class Stack;
    void give_back(detail::StackCore* core) noexcept;
    struct State;
    std::shared_ptr<State> state_;
};

// What on_stack_overflow's handler is told. Everything was prepared before the fault (no memory is
// allocated in the signal handler): the name is a copy.
struct StackOverflow {
    enum class Where : unsigned {
        Stack,        // a usermm stack (map_stack, StackPool)
        MainThread,   // the main thread's stack (watch_thread_stacks)
        Thread,       // another thread's stack (watch_thread_stacks)
        SignalStack,  // the alternate signal stack usermm gave the thread (install_signal_stack):
                      // an emergency, reported in one line, then death by SIGSEGV; no handler runs
    };
    Where where = Where::Stack;
    std::uint64_t id = 0;         // Stack::id(); 0 for thread stacks
    const void* address = nullptr;  // the access that overflowed
    const void* sp = nullptr;       // the stack pointer then
    const void* low = nullptr;      // the stack's usable bounds [low, high)
    const void* high = nullptr;
    std::size_t peak = 0;           // usermm stacks: the most committed, in bytes from the top
    char name_buf[40] = {};
    std::string_view name() const { return name_buf; }
};

// The overflow handler: runs in the signal handler, on the thread's alternate signal stack, with
// the interrupted code's signal mask. It may leave by siglongjmp (to a sigsetjmp(env, 1) point on
// another stack, or higher on the same stack), as often as overflows happen; if it returns, the
// overflow is treated as without a handler. It must be async-signal-safe: an overflow can happen
// anywhere, inside malloc too, and jumping out of one leaves whatever that code held (README,
// "Stacks"). Without a handler, an overflow writes one line naming the stack, then goes to the
// SIGSEGV handler installed before usermm's or kills the process by SIGSEGV, as the kernel would.
using StackOverflowHandler = void (*)(const StackOverflow&);
// Sets the handler (nullptr for none) for the whole process; returns the previous one.
USERMM_API StackOverflowHandler on_stack_overflow(StackOverflowHandler handler);

// Overflows of the main thread's stack and of pthread stacks (each thread's guard page) are
// classified and reported too, with the stack pointer from the signal context and the kernel's
// mappings (PROCMAP_QUERY), for every thread; each thread needs an alternate signal stack for it:
// the calling thread gets one, threads created after this call (or after the first map_stack)
// get one at creation (usermm wraps pthread_create). Idempotent.
USERMM_API void watch_thread_stacks();
// Gives the calling thread an alternate signal stack of max(SIGSTKSZ, AT_MINSIGSTKSZ, 64 KiB,
// signal_stack_size()) bytes with a guard below it, freed at thread exit, unless it has one at
// least that large. Idempotent; a stack usermm gave the thread and the program disabled (or
// replaced by a smaller one) is put back.
USERMM_API void install_signal_stack();

// Stacks of the whole process now.
struct StackStats {
    std::size_t live = 0;             // stacks mapped (pooled idle ones included)
    std::size_t committed_bytes = 0;  // their guard-free parts
    std::uint64_t growth_faults = 0;  // since the process began
    std::uint64_t overflows = 0;
    long kernel_maps = 0;             // kernel mappings the stacks' guards cost (ProtNone: 2 each)
    GuardMode mode = GuardMode::Auto; // what Auto resolves to on this kernel
};
USERMM_API StackStats stack_stats();

// Counters summed over every arena the process has had, plus faults that belonged to none.
USERMM_API Stats process_stats();

// How write access is withheld from pages whose next write snapshots and collect_dirty() must see:
// userfaultfd write-protection (the kernel marks the page table entry; no VMA split) or mprotect.
// Chosen once per process (USERMM_ENGINE, else Uffd where the kernel offers it); a forked child
// continues with Mprotect. Sets the process up if no arena has yet.
enum class Engine { Uffd, Mprotect };
USERMM_API Engine engine();

USERMM_API std::size_t page_size();

// The smallest alternate signal stack (sigaltstack) on which usermm's handler can resolve any fault:
// the kernel's signal frame for this CPU (getauxval(AT_MINSIGSTKSZ)) plus the handler's own
// depth, measured, with a margin. A handler usermm passes a fault on to runs on the same stack and
// needs its own share on top.
USERMM_API std::size_t signal_stack_size();

}  // namespace usermm
