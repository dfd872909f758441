// Live counters: a segment in /dev/shm (lib/core/live_stats.hpp) that another process reads while
// this one runs, rewritten every interval by a thread of usermm's own. The thread reads only what
// any API call reads (relaxed counters, the trees under read locks), so a fault pays nothing for
// it; it writes only the segment, so a reader costs this process nothing either.
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "account.hpp"
#include "arena_ops.hpp"
#include "find_vma.hpp"
#include "live_stats.hpp"
#include "swap_ops.hpp"

namespace usermm::detail {

namespace {

constexpr std::uint32_t kDefaultIntervalMs = 100;
// A segment whose process is gone is removed by the next publisher that starts, once it is this
// old: long enough that a tool looking at a process just killed still finds its segment and can
// say it is stale.
constexpr std::uint64_t kSweepAfterNs = 10'000'000'000;

struct LiveConfig {
    bool enabled = true;
    std::uint32_t interval_ms = kDefaultIntervalMs;
};

// The environment's rule (environment_value, environment_refused).
LiveConfig read_live_config() {
    LiveConfig c;
#if defined(__SANITIZE_THREAD__)
    // ThreadSanitizer refuses to start a thread in the child of a process that has more than one,
    // and the publisher would make every usermm process such a parent: under it publishing is
    // asked for, never on by default.
    c.enabled = false;
#endif
    const auto value = environment_value;
    const auto bad = environment_refused;
    environment_switch("USERMM_STAT", &c.enabled);
    if (const char* v = value("USERMM_STAT_INTERVAL_MS")) {
        const char* end = v + std::strlen(v);
        std::uint32_t ms = 0;
        const auto [ptr, ec] = std::from_chars(v, end, ms);
        if (ec == std::errc() && ptr == end && ms > 0)
            c.interval_ms = ms;
        else
            bad("USERMM_STAT_INTERVAL_MS", v, "a positive number of milliseconds");
    }
    return c;
}

std::uint64_t clock_ns(clockid_t clock) {
    timespec ts{};
    clock_gettime(clock, &ts);
    return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

std::uint64_t start_time_of(pid_t pid) {
    std::ifstream in(fmt::format("/proc/{}/stat", pid));
    std::stringstream line;
    line << in.rdbuf();
    return proc_stat_field(line.str(), 22).value_or(0);
}

std::string shm_name(pid_t pid) { return fmt::format("/{}{}", kLivePrefix, pid); }

// Segments of processes that are gone, left by a kill or an _exit (a forked child's, often),
// created more than kSweepAfterNs ago. Only the owner may unlink in /dev/shm (sticky), so other
// users' segments stay. A pid that another process has now keeps its segment: the reader tells it
// by the start time, and that process replaces it if it publishes. Run by the thread that starts a
// publisher, never by the publisher: a descriptor the program did not open, held while the
// program runs, would change which descriptors its own calls get, and when they run out.
void sweep_stale_segments() {
    DIR* dir = opendir("/dev/shm");
    if (!dir) return;
    const std::string_view prefix = kLivePrefix;
    const std::uint64_t now = clock_ns(CLOCK_REALTIME);
    while (const dirent* e = readdir(dir)) {
        const std::string_view name = e->d_name;
        if (!name.starts_with(prefix)) continue;
        pid_t pid = 0;
        const auto [ptr, ec] = std::from_chars(name.data() + prefix.size(), name.data() + name.size(), pid);
        if (ec != std::errc() || ptr != name.data() + name.size() || pid <= 0) continue;
        struct stat st{};
        if (fstatat(dirfd(dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        const std::uint64_t created = std::uint64_t(st.st_ctim.tv_sec) * 1'000'000'000u + std::uint64_t(st.st_ctim.tv_nsec);
        if (now < created || now - created < kSweepAfterNs) continue;
        if (kill(pid, 0) != 0 && errno == ESRCH) shm_unlink(shm_name(pid).c_str());
    }
    closedir(dir);
}

// This process's segment and the thread that rewrites it. A forked child inherits the object but
// neither the thread nor the right to the segment: it makes its own (after_fork_child).
struct Publisher {
    pid_t pid = 0;
    std::string name;  // for shm_open and shm_unlink: "/usermm.<pid>"
    LiveSegment* shm = nullptr;
    std::unique_ptr<LiveSegment> next = std::make_unique_for_overwrite<LiveSegment>();  // built under the locks
    std::uint32_t interval_ms = kDefaultIntervalMs;
    std::uint64_t start_time = 0;
    std::atomic<std::uint32_t> stop{0};  // futex: the thread sleeps on it between rounds
    pthread_t thread{};
};

static_assert(LiveVmaKind(VmaKind::Anonymous) == LiveVmaKind::Anonymous &&
              LiveVmaKind(VmaKind::FilePrivate) == LiveVmaKind::FilePrivate &&
              LiveVmaKind(VmaKind::FileShared) == LiveVmaKind::FileShared);

LiveConfig g_config;
Publisher* g_publisher = nullptr;

static_assert(kLiveNameBytes == kVmaNameMax, "a VMA's name, NUL included, is copied whole");

// An arena's read side, taken at once or not at all, unless `wait`.
class ReadSide {
public:
    ReadSide(RwSpinLock& lock, bool wait) : lock_(lock), held_(wait ? (lock.lock_shared(), true) : lock.try_lock_shared()) {}
    ~ReadSide() {
        if (held_) lock_.unlock_shared();
    }
    ReadSide(const ReadSide&) = delete;
    ReadSide& operator=(const ReadSide&) = delete;
    explicit operator bool() const { return held_; }

private:
    RwSpinLock& lock_;
    bool held_;
};

// Under the registry's read lock, with each arena's read lock in turn, as a fault holds them: the
// arenas cannot go away meanwhile, and their trees do not change. Unless `wait`, an arena whose
// writer holds or wants its lock (a snapshot's pause, a map) ends the round at once, false: the
// publisher comes back later rather than spin on a CPU the writer may need, holding the registry.
bool collect(Publisher& p, bool wait) {
    LiveSegment& n = *p.next;
    // The header; each entry is cleared as it is filled: the tables' unused pages stay untouched.
    std::memset(&n, 0, offsetof(LiveSegment, arenas));
    n.magic = kLiveMagic;
    n.layout_version = kLiveLayoutVersion;
    n.stats_version = kStatsVersion;
    n.field_count = std::uint32_t(live_field::count);
    n.latency_buckets = std::uint32_t(kLatencyBuckets);
    n.pid = p.pid;
    n.interval_ms = p.interval_ms;
    n.start_time = p.start_time;
    n.process = to_live(process_counters().load());
    std::uint64_t resident = 0;
    {
        ArenaRegistry& reg = arena_registry();
        ApiGuard<SharedGuard<RwSpinLock>> guard(reg.lock);
        n.arenas_total = std::uint32_t(reg.count);
        for (std::size_t i = 0; i < reg.count; ++i) {
            ArenaCore& a = *reg.arenas[i];
            const auto pages = std::uint64_t(std::max<std::int64_t>(0, a.resident.load(std::memory_order_relaxed)));
            resident += pages;
            if (i >= kLiveMaxArenas) {
                const ReadSide arena_guard(a.lock, wait);
                if (!arena_guard) return false;
                n.vmas_total += std::uint32_t(a.tree.size());
                continue;
            }
            LiveArena& la = n.arenas[n.arena_count++];
            la = LiveArena{};
            la.base = a.base;
            la.end = a.end;
            la.resident_pages = pages;
            Stats s = a.stats.load();
            s.resident_pages = pages;
            la.counters = to_live(s);
            const ReadSide arena_guard(a.lock, wait);
            if (!arena_guard) return false;
            // The reclaimer is set under the arena's lock, and the swap state before it.
            if (a.reclaimer && a.swap) la.resident_limit = a.swap->limit.load(std::memory_order_relaxed);
            n.vmas_total += std::uint32_t(a.tree.size());
            for (const Vma& v : a.tree) {
                if (n.vma_count == kLiveMaxVmas) break;
                LiveVma& lv = n.vmas[n.vma_count++];
                lv = LiveVma{};
                lv.arena = std::uint32_t(i);
                lv.kind = v.stack ? LiveVmaKind::Stack : LiveVmaKind(v.kind());
                lv.start = v.start;
                lv.end = v.end;
                std::memcpy(lv.name, v.name, sizeof lv.name);
                lv.counters = to_live(v.stats->load());
            }
        }
    }
    n.process.value[live_field::resident_pages] = resident;
    n.updated_monotonic_ns = clock_ns(CLOCK_MONOTONIC);
    n.updated_realtime_ns = clock_ns(CLOCK_REALTIME);
    return true;
}

void* publisher_main(void* arg) {
    Publisher& p = *static_cast<Publisher*>(arg);
    const long interval_ns = long(p.interval_ms) * 1'000'000;
    // Writers hold an arena's lock for milliseconds at most (a snapshot of gigabytes: tens); after an
    // interval's worth of tries the publisher waits its turn like a fault.
    constexpr long kRetryNs = 1'000'000;
    const long tries = std::max(1L, interval_ns / kRetryNs);
    while (!p.stop.load(std::memory_order_acquire)) {
        bool collected = false;
        for (long t = 1; !(collected = collect(p, t >= tries)) && !p.stop.load(std::memory_order_acquire); ++t)
            futex_wait(p.stop, 0, kRetryNs);
        if (collected) live_publish(*p.shm, *p.next);
        futex_wait(p.stop, 0, interval_ns);
    }
    return nullptr;
}

void stop_publisher(Publisher& p) {
    p.stop.store(1, std::memory_order_release);
    futex_wake(p.stop);
    pthread_join(p.thread, nullptr);
}

// Creates this process's segment and its thread; a failure is one line on stderr, and the process
// runs unpublished.
// A forked child does not sweep: its parent did when it started, and a program that forks often
// would scan /dev/shm at every fork.
void start_publisher(bool sweep) {
    auto p = std::make_unique<Publisher>();
    p->pid = getpid();
    p->name = shm_name(p->pid);
    p->interval_ms = g_config.interval_ms;
    p->start_time = start_time_of(p->pid);
    if (sweep) sweep_stale_segments();
    const std::string path = "/dev/shm" + p->name;
    int fd = shm_open(p->name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
        // Only this process writes a segment with its pid: one already there is a dead process's
        // whose pid this one has now, or this process's own before an exec.
        shm_unlink(p->name.c_str());
        fd = shm_open(p->name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
    }
    if (fd < 0) {
        std::fprintf(stderr, "usermm: live counters: shm_open of %s failed: %s; they are not published\n", path.c_str(),
                     std::strerror(errno));
        return;
    }
    void* map = MAP_FAILED;
    const char* failed = "ftruncate";
    if (ftruncate(fd, off_t(sizeof(LiveSegment))) == 0) {
        failed = "mmap";
        map = mmap(nullptr, sizeof(LiveSegment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    const int err = errno;
    close(fd);
    if (map == MAP_FAILED) {
        shm_unlink(p->name.c_str());
        std::fprintf(stderr, "usermm: live counters: %s of %s (%zu bytes) failed: %s; they are not published\n", failed,
                     path.c_str(), sizeof(LiveSegment), std::strerror(err));
        return;
    }
    p->shm = static_cast<LiveSegment*>(map);
    // Like the reclaimer's threads: it takes no signal meant for the program.
    const sigset_t async = async_signals();
    sigset_t old;
    pthread_sigmask(SIG_SETMASK, &async, &old);
    const int rc = pthread_create(&p->thread, nullptr, publisher_main, p.get());
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (rc) {
        munmap(map, sizeof(LiveSegment));
        shm_unlink(p->name.c_str());
        std::fprintf(stderr, "usermm: live counters: pthread_create for %s failed: %s; they are not published\n",
                     path.c_str(), std::strerror(rc));
        return;
    }
    pthread_setname_np(p->thread, "usermm-stat");
    g_publisher = p.release();
}

// At exit the segment goes with the process; a forked child that exits removes its own, never the
// parent's (the Publisher it inherited names the parent until after_fork_child replaces it).
void at_exit() {
    Publisher* p = g_publisher;
    if (!p || p->pid != getpid()) return;
    stop_publisher(*p);
    shm_unlink(p->name.c_str());
    munmap(p->shm, sizeof(LiveSegment));
    g_publisher = nullptr;
    delete p;
}

void after_fork_child() {
    if (Publisher* inherited = std::exchange(g_publisher, nullptr)) {
        munmap(inherited->shm, sizeof(LiveSegment));  // the parent's; its thread is not in the child
        delete inherited;
    }
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
    // No thread may start here under ThreadSanitizer (see read_live_config); under AddressSanitizer
    // a thread's start maps memory for the sanitizer, which a child that lowers RLIMIT_DATA at once
    // (test_map_limit) sees fail and die.
    return;
#else
    start_publisher(false);
#endif
}

}  // namespace

void start_live_stats() {
    g_config = read_live_config();
    if (!g_config.enabled) return;
    start_publisher(true);
    std::atexit(at_exit);
    // After usermm's own fork handler (registered when the library was loaded): the child's arenas
    // are its own and the registry is unlocked when its publisher starts.
    pthread_atfork(nullptr, nullptr, after_fork_child);
}

}  // namespace usermm::detail
