// The live-counters segment: /dev/shm/usermm.<pid>, written by the process's publisher thread
// (lib/api/live_stats.cpp) and read by usermm-stat (tools/usermm_stat.cpp) from another process.
// Nothing is locked across the two: the writer bumps `sequence` to odd, rewrites the segment and
// bumps it to even again (a seqlock); a reader copies the whole segment and keeps the copy only if
// the sequence was even and unchanged around it. Every word is stored and loaded as an atomic
// (std::atomic_ref: release stores, acquire loads, plain moves on x86-64), so that the copy racing
// a write is a retry, not undefined behaviour.
//
// The layout is fixed (no pointers, no sizes that depend on the process) and only grows at the end
// under a new kLiveLayoutVersion; the counters are those of USERMM_STATS_FIELDS, in its order, with
// kStatsVersion saying which list that was.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>

#include <usermm/usermm.hpp>

namespace usermm::detail {

inline constexpr std::uint64_t kLiveMagic = 0x5453'4d4d'5245'5355;  // "USERMMST", little-endian
inline constexpr std::uint32_t kLiveLayoutVersion = 1;
inline constexpr std::size_t kLiveMaxArenas = 64;
inline constexpr std::size_t kLiveMaxVmas = 256;
inline constexpr std::size_t kLiveNameBytes = 40;  // usermm keeps 39 bytes of a name and a NUL
inline constexpr const char* kLivePrefix = "usermm.";  // the segment is kLivePrefix + pid

// The counters' positions in LiveCounters::value, and their names, from the one field list.
namespace live_field {
enum : std::size_t {
#define USERMM_LIVE_INDEX(name, doc) name,
    USERMM_STATS_FIELDS(USERMM_LIVE_INDEX)
#undef USERMM_LIVE_INDEX
    count
};
}
inline constexpr std::array<std::string_view, live_field::count> kLiveFieldNames = {
#define USERMM_LIVE_NAME(name, doc) #name,
    USERMM_STATS_FIELDS(USERMM_LIVE_NAME)
#undef USERMM_LIVE_NAME
};

struct LiveCounters {
    std::uint64_t value[live_field::count];
    std::uint64_t latency[kLatencyBuckets];
};

inline LiveCounters to_live(const Stats& s) {
    LiveCounters c{};
#define USERMM_LIVE_STORE(name, doc) c.value[live_field::name] = s.name;
    USERMM_STATS_FIELDS(USERMM_LIVE_STORE)
#undef USERMM_LIVE_STORE
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) c.latency[i] = s.latency[i];
    return c;
}

inline Stats from_live(const LiveCounters& c) {
    Stats s;
#define USERMM_LIVE_LOAD(name, doc) s.name = c.value[live_field::name];
    USERMM_STATS_FIELDS(USERMM_LIVE_LOAD)
#undef USERMM_LIVE_LOAD
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) s.latency[i] = c.latency[i];
    return s;
}

// A VMA's kind as the tool shows it: VmaKind, with stacks (map_stack) told apart.
enum class LiveVmaKind : std::uint32_t { Anonymous, FilePrivate, FileShared, Stack };
inline constexpr std::array<std::string_view, 4> kLiveVmaKindNames = {"anon", "file-private", "file-shared", "stack"};

struct LiveArena {
    std::uint64_t base;
    std::uint64_t end;
    char name[kLiveNameBytes];  // arenas have no name yet: empty
    std::uint64_t resident_pages;
    std::uint64_t resident_limit;  // pages; 0: no limit
    LiveCounters counters;
};

struct LiveVma {
    std::uint32_t arena;  // index into LiveSegment::arenas
    LiveVmaKind kind;
    std::uint64_t start;
    std::uint64_t end;
    char name[kLiveNameBytes];
    LiveCounters counters;
};

struct LiveSegment {
    std::uint64_t magic;
    std::uint32_t layout_version;
    std::uint32_t stats_version;  // kStatsVersion of the writer
    std::uint32_t field_count;    // live_field::count of the writer
    std::uint32_t latency_buckets;
    std::int32_t pid;
    std::uint32_t interval_ms;
    // /proc/PID/stat field 22 (clock ticks after boot): a pid reused by another process has another.
    std::uint64_t start_time;
    std::uint64_t sequence;  // odd while the writer rewrites the rest; 0: never published
    std::uint64_t updated_monotonic_ns;
    std::uint64_t updated_realtime_ns;
    LiveCounters process;  // with resident_pages summed over every arena, as process_stats()
    std::uint32_t arena_count;  // entries used in `arenas`
    std::uint32_t arenas_total;  // arenas of the process: more than arena_count when the table is full
    std::uint32_t vma_count;
    std::uint32_t vmas_total;
    LiveArena arenas[kLiveMaxArenas];
    LiveVma vmas[kLiveMaxVmas];
};

static_assert(std::is_trivially_copyable_v<LiveSegment> && std::is_standard_layout_v<LiveSegment>);
static_assert(sizeof(LiveSegment) % sizeof(std::uint64_t) == 0 && alignof(LiveSegment) == alignof(std::uint64_t));
static_assert(offsetof(LiveSegment, sequence) % sizeof(std::uint64_t) == 0);
static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free);

namespace live_detail {
inline std::atomic_ref<std::uint64_t> word(const LiveSegment& s, std::size_t i) {
    // Loads of a read-only mapping: an 8-byte atomic load is a plain load on every 64-bit target
    // (is_always_lock_free, asserted above), it never writes.
    return std::atomic_ref<std::uint64_t>(const_cast<std::uint64_t*>(reinterpret_cast<const std::uint64_t*>(&s))[i]);
}
inline constexpr std::size_t kSequenceWord = offsetof(LiveSegment, sequence) / sizeof(std::uint64_t);
inline constexpr std::size_t kArenasWord = offsetof(LiveSegment, arenas) / sizeof(std::uint64_t);
inline constexpr std::size_t kVmasWord = offsetof(LiveSegment, vmas) / sizeof(std::uint64_t);
static_assert(sizeof(LiveArena) % sizeof(std::uint64_t) == 0 && sizeof(LiveVma) % sizeof(std::uint64_t) == 0);
static_assert(offsetof(LiveSegment, arenas) % sizeof(std::uint64_t) == 0 &&
              offsetof(LiveSegment, vmas) % sizeof(std::uint64_t) == 0);

// The words in use: the header and the process's counters, then the arena and VMA entries the
// counts say, as [first, last) word ranges. A publication writes only these and a reader copies
// only these, so the segment's other pages are never touched and cost no memory: a process with
// one arena and a few VMAs holds two or three pages of shmem, not 170 KiB (test_file_cache checks
// that the system's Shmem does not grow while other tests run).
template <typename F>
void for_each_used_range(std::uint32_t arena_count, std::uint32_t vma_count, F f) {
    const std::size_t arenas = std::min<std::size_t>(arena_count, kLiveMaxArenas);
    const std::size_t vmas = std::min<std::size_t>(vma_count, kLiveMaxVmas);
    f(std::size_t(0), kArenasWord);
    f(kArenasWord, kArenasWord + arenas * sizeof(LiveArena) / sizeof(std::uint64_t));
    f(kVmasWord, kVmasWord + vmas * sizeof(LiveVma) / sizeof(std::uint64_t));
}
}  // namespace live_detail

// The writer, the only one of its segment: `next` (whose own sequence is ignored) becomes the content.
inline void live_publish(LiveSegment& shm, const LiveSegment& next) {
    using namespace live_detail;
    const std::uint64_t seq = word(shm, kSequenceWord).load(std::memory_order_relaxed);
    word(shm, kSequenceWord).store(seq + 1, std::memory_order_relaxed);
    // Release stores (plain stores on x86-64), rather than a fence ThreadSanitizer cannot follow: a
    // reader whose acquire load sees one of them then sees the odd sequence stored before it.
    const auto* from = reinterpret_cast<const std::uint64_t*>(&next);
    for_each_used_range(next.arena_count, next.vma_count, [&](std::size_t first, std::size_t last) {
        for (std::size_t i = first; i < last; ++i)
            if (i != kSequenceWord) word(shm, i).store(from[i], std::memory_order_release);
    });
    word(shm, kSequenceWord).store(seq + 2, std::memory_order_release);
}

// The sequence alone: how a reader waits for the next publication.
inline std::uint64_t live_sequence(const LiveSegment& shm) {
    return live_detail::word(shm, live_detail::kSequenceWord).load(std::memory_order_acquire);
}

// One attempt at a consistent copy: false if the writer was at work (try again), or has never
// published (sequence 0).
inline bool live_read(const LiveSegment& shm, LiveSegment& out) {
    using namespace live_detail;
    const std::uint64_t before = word(shm, kSequenceWord).load(std::memory_order_acquire);
    if (before == 0 || (before & 1)) return false;
    auto* to = reinterpret_cast<std::uint64_t*>(&out);
    // The header first: its counts (clamped, since a racing copy may be torn) say what else to copy.
    for (std::size_t i = 0; i < kArenasWord; ++i) to[i] = word(shm, i).load(std::memory_order_acquire);
    for_each_used_range(out.arena_count, out.vma_count, [&](std::size_t first, std::size_t last) {
        for (std::size_t i = std::max(first, kArenasWord); i < last; ++i) to[i] = word(shm, i).load(std::memory_order_acquire);
    });
    return word(shm, kSequenceWord).load(std::memory_order_relaxed) == before;
}

// Field `field` (1-based, as proc(5) numbers them) of a /proc/PID/stat line. The command name
// (field 2) is in parentheses and may hold spaces and parentheses itself: the fields after it are
// counted from its last ')'.
inline std::optional<std::uint64_t> proc_stat_field(std::string_view stat, int field) {
    const std::size_t close = stat.rfind(')');
    if (field < 3 || close == std::string_view::npos) return std::nullopt;
    std::string_view rest = stat.substr(close + 1);
    for (int n = 3;; ++n) {
        const std::size_t from = rest.find_first_not_of(" \n");
        if (from == std::string_view::npos) return std::nullopt;
        rest.remove_prefix(from);
        const std::size_t len = std::min(rest.find_first_of(" \n"), rest.size());
        if (n == field) {
            std::uint64_t v = 0;
            const auto [ptr, ec] = std::from_chars(rest.data(), rest.data() + len, v);
            if (ec != std::errc() || ptr != rest.data() + len) return std::nullopt;
            return v;
        }
        rest.remove_prefix(len);
    }
}

// API world (lib/api/live_stats.cpp), once from init_process: reads USERMM_STAT and
// USERMM_STAT_INTERVAL_MS, creates the segment and starts its publisher.
void start_live_stats();

}  // namespace usermm::detail
