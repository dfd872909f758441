// Fault traces: every fault the handler sees, recorded into a file while the program runs.
//
// start_trace(path) (or USERMM_TRACE=path in the environment, read when usermm sets itself up; a
// "%p" in it becomes the pid, for programs that start other programs using usermm)
// makes every fault append one record to a ring of its own thread; a background thread drains the
// rings into the file. A fault never waits for the file: when its thread's ring is full, or no ring
// is free, the record is dropped and counted (TraceStats::dropped, and the file's header).
// `usermm-trace FILE` (tools/) prints a summary and draws pictures of a trace.
//
// The file (all fields little-endian, as the machine writes them): one TraceHeader, then
// TraceRecords in the order the background thread drained them (each thread's in time order; the
// threads' interleaved only roughly: sort by time_ns for one order). A trace that stop_trace() did
// not close (the process died) has header.records == 0 and header.closed == 0: its records are the
// whole records that follow the header.
#pragma once

#include <cstdint>
#include <string>

#include <usermm/export.hpp>

namespace usermm {

// What a fault was: one event per fault, from how it was resolved (or why not). The probes of the
// same faults (README, "Observability") have these names. X(Enumerator, probe_name, description).
#define USERMM_FAULT_EVENTS(X)                                                                          \
    X(ZeroRead, zero_read, "a read of an untouched anonymous page, answered by the zero page")          \
    X(AnonRead, anon_read, "a read of an anonymous page whose content a restore put back")              \
    X(AnonWrite, anon_write, "the first access to an anonymous page is a write")                        \
    X(Upgrade, upgrade, "a write (or fetch) to an anonymous page mapped with fewer rights (on the mprotect engine also a write to a write-tracked page)") \
    X(SnapshotCopy, cow, "a write to a write-tracked page that copied it into live snapshots first (userfaultfd engine)") \
    X(WriteTrack, write_track, "a write to a write-tracked page with no snapshot to copy into (userfaultfd engine)") \
    X(FileReadMajor, file_read_major, "a read of a file page the page cache did not hold")              \
    X(FileReadMinor, file_read_minor, "a read of a file page in the page cache")                        \
    X(FileCow, file_cow, "a write to a private file page (the kernel copies it)")                       \
    X(SharedWrite, shared_write, "a write to a shared file page, which becomes dirty")                  \
    X(SwapIn, swap_in, "a page read back from the arena's store (major)")                               \
    X(SwapHit, swap_hit, "a page read ahead from the store, mapped now (minor)")                        \
    X(Hinting, hinting, "a page made inaccessible only to see whether it is used")                      \
    X(StackGrow, stack_grow, "a stack grew below its committed part")                                   \
    X(Degraded, degraded, "resolved coarsely to stay within the kernel's mapping budget")              \
    X(Spurious, spurious, "another thread had already resolved the page")                              \
    X(Foreign, foreign, "outside every arena (or sent by kill), passed on")                            \
    X(AccessError, access_error, "an access the VMA forbids, or one usermm could not resolve")        \
    X(StackOverflow, stack_overflow, "an access past a stack's end by the code running on it")

enum class FaultEvent : std::uint8_t {
    None = 0,  // no event: never in a trace
#define USERMM_FAULT_EVENT_ENUM(e, name, doc) e,
    USERMM_FAULT_EVENTS(USERMM_FAULT_EVENT_ENUM)
#undef USERMM_FAULT_EVENT_ENUM
};
inline constexpr unsigned kFaultEventCount = unsigned(FaultEvent::StackOverflow) + 1;

// The probe's name of an event ("zero_read", ...); "?" for a value that is no event.
constexpr const char* fault_event_name(FaultEvent e) {
    switch (e) {
#define USERMM_FAULT_EVENT_NAME(e, name, doc) \
    case FaultEvent::e:                       \
        return #name;
        USERMM_FAULT_EVENTS(USERMM_FAULT_EVENT_NAME)
#undef USERMM_FAULT_EVENT_NAME
        case FaultEvent::None:
            break;
    }
    return "?";
}

inline constexpr char kTraceMagic[8] = {'U', 'S', 'M', 'M', 'T', 'R', 'C', '1'};
inline constexpr std::uint32_t kTraceVersion = 1;

struct TraceHeader {
    char magic[8];             // kTraceMagic
    std::uint32_t version;     // kTraceVersion
    std::uint32_t header_size; // sizeof(TraceHeader): records start here
    std::uint32_t record_size; // sizeof(TraceRecord)
    std::uint32_t page_size;
    std::uint32_t pid;
    std::uint32_t closed;      // 1 once stop_trace() wrote the final counts
    std::uint64_t start_ns;    // CLOCK_MONOTONIC when the trace started; records count from here
    std::uint64_t start_realtime_ns;  // CLOCK_REALTIME at the same moment
    std::uint64_t records;     // records in the file (written when closed)
    std::uint64_t dropped;     // records lost to full rings (brought up to date at every drain)
};
static_assert(sizeof(TraceHeader) == 64);

// Record flags.
inline constexpr std::uint8_t kTraceMajor = 1;           // the fault waited for I/O
inline constexpr std::uint8_t kTraceAccessMask = 6;      // (flags & mask) >> 1: 0 read, 1 write, 2 exec, 3 unknown
inline constexpr std::uint8_t kTraceDirectReclaim = 8;   // the fault evicted a batch first (resident limit)
inline constexpr std::uint8_t kTraceStalled = 16;        // ... or found none to evict, and waited for the reclaimer
inline constexpr std::uint8_t kTraceCopied = 32;         // the fault copied pages into live snapshots

struct TraceRecord {
    std::uint64_t time_ns;     // when the handler was entered, since TraceHeader::start_ns
    std::uint64_t address;     // the faulting address
    std::uint64_t vma_start;   // the VMA's first byte (0: none, as for a foreign fault)
    std::uint64_t arena_base;  // the arena's first byte (0: none)
    std::uint32_t latency_ns;  // time in the handler (saturates at 2^32 - 1)
    std::uint32_t tid;         // the faulting thread (gettid)
    std::uint16_t pages;       // pages whose protection the fault changed
    std::uint8_t event;        // FaultEvent
    std::uint8_t flags;        // kTrace*
    std::uint32_t reserved;
};
static_assert(sizeof(TraceRecord) == 48);

struct TraceOptions {
    std::size_t ring_records = 16384;  // records a thread's ring holds before faults drop theirs
    unsigned drain_interval_ms = 20;   // how often the background thread empties the rings
};

struct TraceStats {
    std::uint64_t records = 0;  // written to the file
    std::uint64_t dropped = 0;  // lost to full rings or to threads that found no free ring
};

// Starts recording into `path` (created or truncated). Throws usermm::Error if a trace is already
// being recorded or the file cannot be written.
USERMM_API void start_trace(const std::string& path, const TraceOptions& options = {});
// Drains what the rings hold, closes the file and says how many records it has. A no-op returning
// zeros when no trace is being recorded.
USERMM_API TraceStats stop_trace();
// While a trace is being recorded: records written and dropped so far.
USERMM_API TraceStats trace_stats();

}  // namespace usermm
