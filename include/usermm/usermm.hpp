// usermm: the kernel's page-fault machinery in user space.
//
// An Arena reserves PROT_NONE address space. VMAs mapped inside it are demand-zero: the first access
// to a page traps (SIGSEGV), usermm decides what the access means, and either makes it succeed or
// passes the signal on exactly as the kernel would have delivered it. Every fault is counted.
//
// Rules for code that runs with usermm (see README.md for the long form):
//  - System calls that write into or read from arena memory that has not been faulted in yet fail
//    with EFAULT instead of faulting. Call Arena::prefault() on the buffer first.
//  - Do not block SIGSEGV in threads that touch arena memory: the kernel then kills the process on
//    the first fault instead of running the handler.
//  - fork() is safe: usermm waits for faults in flight and the child inherits the arenas.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace usermm {

namespace detail {
struct ArenaCore;
struct ArenaAccess;
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
// "rwx" style, as in /proc/self/maps.
std::string to_string(Prot p);

// Counters kept per VMA, per arena and for the process. One list, so that every consumer (the
// struct, the formatter, the accounting code) sees the same fields in the same order.
#define USERMM_STATS_FIELDS(X)                                                                  \
    X(minor_faults, "faults resolved without I/O")                                             \
    X(major_faults, "faults that needed I/O")                                                  \
    X(read_faults, "resolved faults caused by a read")                                         \
    X(write_faults, "resolved faults caused by a write")                                       \
    X(exec_faults, "resolved faults caused by an instruction fetch")                           \
    X(zero_page_reads, "untouched pages made readable as zeros, committing no memory")         \
    X(fault_around_pages, "neighbour pages mapped by fault-around in the same fault")          \
    X(spurious_faults, "faults another thread had already resolved")                           \
    X(access_errors, "faults in an arena that its VMAs forbid, passed on")                     \
    X(foreign_faults, "SIGSEGV/SIGBUS outside every arena, passed on")                         \
    X(degraded_faults, "faults resolved coarsely to stay within the kernel's mapping budget")  \
    X(degraded_pages, "pages handed to the kernel's own demand paging by degraded faults")     \
    X(prefault_pages, "pages made accessible ahead of time by prefault()")                     \
    X(cow_faults, "writes that first copied a page into snapshots (copy-before-write)")        \
    X(cow_bytes_copied, "bytes copied into snapshots before writes")                           \
    X(pages_restored, "pages written back into the arena by restore()")                        \
    X(dirty_pages_collected, "pages reported by collect_dirty()")                              \
    X(handler_ns, "nanoseconds spent in the fault handler")

inline constexpr std::size_t kLatencyBuckets = 16;

struct Stats {
#define USERMM_STATS_MEMBER(name, doc) std::uint64_t name = 0;
    USERMM_STATS_FIELDS(USERMM_STATS_MEMBER)
#undef USERMM_STATS_MEMBER
    // Handler latency: bucket 0 holds faults under 1 µs, bucket k (k ≥ 1) those in [2^(k-1), 2^k) µs,
    // the last bucket everything slower.
    std::array<std::uint64_t, kLatencyBuckets> latency{};

    Stats& operator+=(const Stats& other);
    bool operator==(const Stats&) const = default;
};

// A readable multi-line table; <usermm/fmt.hpp> makes Stats printable with fmt directly.
std::string format_stats(const Stats& s);

// Errors from the API. The message names the call, the bad argument and the address.
class Error : public std::system_error {
public:
    Error(int errno_value, const std::string& what) : std::system_error(errno_value, std::generic_category(), what) {}
};

struct MapOptions {
    // A name for diagnostics and stats (like PR_SET_VMA_ANON_NAME). At most 39 bytes are kept.
    std::string_view name = {};
    // Place the VMA here (page-aligned, inside the arena, not overlapping another VMA); nullptr lets
    // the arena choose.
    void* address = nullptr;
    // Untouched neighbours mapped by the same fault, inside an aligned window of this many pages
    // (the kernel's fault_around_bytes, 64 KiB). 0 or 1 turns fault-around off.
    std::size_t fault_around_pages = 16;
};

struct VmaInfo {
    void* start = nullptr;
    std::size_t length = 0;
    Prot prot = Prot::None;
    std::string name;
    std::size_t fault_around_pages = 0;
    Stats stats;
};

class Arena {
public:
    // Reserves `size` bytes (rounded up to pages) of PROT_NONE address space.
    explicit Arena(std::size_t size);
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
    // Like mprotect(2): the range must lie inside VMAs; VMAs are split and merged as needed.
    void protect(void* addr, std::size_t length, Prot prot);
    // Like munmap(2): the range must lie inside VMAs; its pages are discarded and the range becomes
    // PROT_NONE address space of the arena again.
    void unmap(void* addr, std::size_t length);
    // Grants `access` on the range now, so that system calls into it cannot fail with EFAULT. The
    // VMAs must allow `access`. Memory is still committed by the kernel only when touched.
    void prefault(void* addr, std::size_t length, Prot access);

    Stats stats() const;
    std::vector<VmaInfo> vmas() const;
    // Checks that the VMA tree, the per-page state and the kernel's mappings (/proc/self/maps)
    // agree; throws Error naming the first address where they do not.
    void verify() const;

private:
    friend struct detail::ArenaAccess;
    std::unique_ptr<detail::ArenaCore> core_;
};

// Counters summed over every arena the process has had, plus faults that belonged to none.
Stats process_stats();

std::size_t page_size();

}  // namespace usermm
