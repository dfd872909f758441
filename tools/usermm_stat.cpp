// usermm-stat: the live counters of processes that use usermm, read from their segments in
// /dev/shm (lib/core/live_stats.hpp) without stopping them, printed the way vmstat prints the
// kernel's.
//
//   usermm-stat                          the processes that publish, one line each
//   usermm-stat [--once] PID [INTERVAL [COUNT]]
//                                        one line per INTERVAL seconds (default 1), COUNT lines
//                                        (default: until interrupted; --once: 1); the first holds
//                                        the totals since the process started, the others what
//                                        changed in the interval
//   usermm-stat PID -a [-v] [...]        per arena (and per VMA) lines, totals since the start
//
// Exit status: 0, 1 when the process publishes no segment, its segment is stale or it ended while
// watched, 2 for a usage error.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "live_stats.hpp"

namespace {

using namespace usermm::detail;
namespace field = usermm::detail::live_field;

constexpr int kOk = 0;
constexpr int kNoProcess = 1;
constexpr int kUsage = 2;

constexpr const char* kUsageText =
    "usage: usermm-stat                                 list the processes that publish usermm counters\n"
    "       usermm-stat [--once] PID [INTERVAL [COUNT]] one line every INTERVAL seconds (default 1)\n"
    "       usermm-stat PID -a|--arenas [-v|--vmas] ... per arena (and per VMA) lines\n";

std::string segment_path(pid_t pid) { return fmt::format("/dev/shm/{}{}", kLivePrefix, pid); }

std::optional<std::string> read_file(const std::string& path) {
    std::ifstream in(path);
    if (!in) return std::nullopt;
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

std::uint64_t monotonic_ns() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

// A process's segment, mapped read-only for as long as it is watched.
class Segment {
public:
    Segment(const Segment&) = delete;
    Segment& operator=(const Segment&) = delete;
    ~Segment() { munmap(const_cast<LiveSegment*>(map_), sizeof(LiveSegment)); }

    // nullptr with *error set when the file is missing or is no segment of this layout.
    static std::unique_ptr<Segment> open(pid_t pid, std::string* error) {
        const std::string path = segment_path(pid);
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) {
            *error = fmt::format("pid {}: open {} failed: {}", pid, path, std::strerror(errno));
            return nullptr;
        }
        struct stat st{};
        if (fstat(fd, &st) != 0 || std::size_t(st.st_size) != sizeof(LiveSegment)) {
            *error = fmt::format("pid {}: {} holds {} bytes, not the {} of a usermm segment of layout {}", pid, path,
                                 st.st_size, sizeof(LiveSegment), kLiveLayoutVersion);
            close(fd);
            return nullptr;
        }
        void* map = mmap(nullptr, sizeof(LiveSegment), PROT_READ, MAP_SHARED, fd, 0);
        const int err = errno;
        close(fd);
        if (map == MAP_FAILED) {
            *error = fmt::format("pid {}: mmap of {} failed: {}", pid, path, std::strerror(err));
            return nullptr;
        }
        return std::unique_ptr<Segment>(new Segment(static_cast<const LiveSegment*>(map), pid, st.st_dev, st.st_ino));
    }

    // Whether the path names another file now: the process exec'd into a program that published
    // anew, and the copy mapped here is the old image's, which nobody writes any more.
    bool replaced() const {
        struct stat st{};
        return ::stat(segment_path(pid_).c_str(), &st) != 0 || st.st_dev != dev_ || st.st_ino != ino_;
    }

    // A consistent copy, or nullopt with *error set: never published yet, or a writer that kept
    // the sequence odd for a second (a process stopped in the middle of a rewrite).
    std::optional<LiveSegment> read(pid_t pid, std::string* error) const {
        auto copy = std::make_unique<LiveSegment>();
        for (int tries = 0; tries < 10'000; ++tries) {
            if (live_read(*map_, *copy)) {
                if (copy->magic != kLiveMagic || copy->layout_version != kLiveLayoutVersion)
                    *error = fmt::format("pid {}: {} is no usermm segment of layout {}", pid, segment_path(pid),
                                         kLiveLayoutVersion);
                else if (copy->field_count != field::count || copy->stats_version != usermm::kStatsVersion)
                    *error = fmt::format("pid {}: {} was written by a usermm with counter list version {} ({} "
                                         "counters); this usermm-stat reads version {}",
                                         pid, segment_path(pid), copy->stats_version, copy->field_count,
                                         usermm::kStatsVersion);
                else
                    return *copy;
                return std::nullopt;
            }
            if (live_sequence(*map_) == 0 && tries > 0) break;
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        *error = live_sequence(*map_) == 0
                     ? fmt::format("pid {}: {} has not been published yet", pid, segment_path(pid))
                     : fmt::format("pid {}: {} is being rewritten for too long (is the process stopped?)", pid,
                                   segment_path(pid));
        return std::nullopt;
    }

private:
    Segment(const LiveSegment* map, pid_t pid, dev_t dev, ino_t ino) : map_(map), pid_(pid), dev_(dev), ino_(ino) {}
    const LiveSegment* map_;
    pid_t pid_;
    dev_t dev_;
    ino_t ino_;
};

// Why the segment no longer speaks for a live process, or nullopt if it does: the process is
// gone, its pid belongs to another process now (another start time), or the process exec'd into
// a program that no longer maps it. The last is checked only where /proc/PID/maps can be read.
std::optional<std::string> stale_reason(pid_t pid, const LiveSegment& s) {
    if (s.pid != pid) return fmt::format("it names pid {}", s.pid);
    if (kill(pid, 0) != 0 && errno == ESRCH) return "the process is gone";
    const auto stat = read_file(fmt::format("/proc/{}/stat", pid));
    if (!stat) return "the process is gone";
    if (s.start_time && proc_stat_field(*stat, 22) != s.start_time) return "the pid belongs to another process now";
    if (const auto maps = read_file(fmt::format("/proc/{}/maps", pid)); maps && !maps->empty() &&
                                                                        maps->find(segment_path(pid)) == std::string::npos)
        return "the process no longer maps it (exec)";
    return std::nullopt;
}

std::string command_of(pid_t pid) {
    auto comm = read_file(fmt::format("/proc/{}/comm", pid)).value_or("?");
    if (!comm.empty() && comm.back() == '\n') comm.pop_back();
    return comm;
}

std::string age(std::uint64_t updated_ns) {
    const std::uint64_t now = monotonic_ns();
    return fmt::format("{:.2f}s", now > updated_ns ? double(now - updated_ns) / 1e9 : 0.0);
}

int list_processes() {
    std::vector<pid_t> pids;
    if (DIR* dir = opendir("/dev/shm")) {
        const std::string_view prefix = kLivePrefix;
        while (const dirent* e = readdir(dir)) {
            const std::string_view name = e->d_name;
            pid_t pid = 0;
            if (!name.starts_with(prefix)) continue;
            const auto [ptr, ec] = std::from_chars(name.data() + prefix.size(), name.data() + name.size(), pid);
            if (ec == std::errc() && ptr == name.data() + name.size() && pid > 0) pids.push_back(pid);
        }
        closedir(dir);
    } else {
        fmt::print(stderr, "usermm-stat: opendir /dev/shm failed: {}\n", std::strerror(errno));
        return kNoProcess;
    }
    std::sort(pids.begin(), pids.end());
    fmt::print("{:>8} {:<16} {:>6} {:>6} {:>9}  {}\n", "PID", "COMMAND", "ARENAS", "VMAS", "UPDATED", "STATE");
    for (const pid_t pid : pids) {
        std::string error;
        const auto segment = Segment::open(pid, &error);
        const auto s = segment ? segment->read(pid, &error) : std::nullopt;
        if (!s) {
            fmt::print("{:>8} {:<16} {:>6} {:>6} {:>9}  skipped: {}\n", pid, "-", "-", "-", "-", error);
            continue;
        }
        if (const auto why = stale_reason(pid, *s)) {
            fmt::print("{:>8} {:<16} {:>6} {:>6} {:>9}  stale: {}\n", pid, "-", "-", "-", "-", *why);
            continue;
        }
        fmt::print("{:>8} {:<16} {:>6} {:>6} {:>9}  live\n", pid, command_of(pid), s->arenas_total, s->vmas_total,
                   age(s->updated_monotonic_ns));
    }
    return kOk;
}

// One sample of a watched process: its segment and the kernel's fault counts for it.
struct Sample {
    LiveSegment seg;
    std::uint64_t kernel_minor = 0;
    std::uint64_t kernel_major = 0;
};

// The columns of the summary line. A usermm column is one counter of USERMM_STATS_FIELDS, named
// in the legend by its field name; a gauge is shown as it is, the others as what changed since
// the previous line.
struct Column {
    std::string_view header;
    std::size_t field;  // field::count: not one of usermm's counters
    bool gauge;
    std::string_view doc;
};
constexpr std::size_t kKernel = field::count;
constexpr Column kColumns[] = {
    {"kminflt", kKernel, false, "the kernel's minor faults of the process (/proc/PID/stat, as ps -o minflt)"},
    {"kmajflt", kKernel, false, "the kernel's major faults of the process (/proc/PID/stat, as ps -o majflt)"},
    {"minor", field::minor_faults, false, {}},
    {"major", field::major_faults, false, {}},
    {"resident", field::resident_pages, true, {}},
    {"limit", kKernel, true, "the sum of the arenas' resident limits, in pages (- when none has one)"},
    {"swapin", field::pages_swapped_in, false, {}},
    {"swapout", field::pages_swapped_out, false, {}},
    {"cow", field::cow_faults, false, {}},
    {"snaps", field::snapshots_taken, false, {}},
    {"pause_us", field::snapshot_pause_ns, false, "microseconds snapshot() held an arena's write lock (snapshot_pause_ns / 1000)"},
};

std::uint64_t limit_pages(const LiveSegment& s) {
    std::uint64_t sum = 0;
    for (std::uint32_t i = 0; i < s.arena_count; ++i) sum += s.arenas[i].resident_limit;
    return sum;
}

std::uint64_t column_value(const Column& c, const Sample& s) {
    if (c.field == field::snapshot_pause_ns) return s.seg.process.value[c.field] / 1000;
    if (c.field != kKernel) return s.seg.process.value[c.field];
    if (c.header == "kminflt") return s.kernel_minor;
    if (c.header == "kmajflt") return s.kernel_major;
    return limit_pages(s.seg);
}

void print_header() {
    std::string line;
    for (const Column& c : kColumns) line += fmt::format(" {:>10}", c.header);
    fmt::print("{}\n", line);
}

void print_line(const Sample& now, const Sample* before) {
    std::string line;
    for (const Column& c : kColumns) {
        const std::uint64_t v = column_value(c, now);
        if (c.header == "limit" && v == 0)
            line += fmt::format(" {:>10}", "-");
        else
            line += fmt::format(" {:>10}", c.gauge || !before ? v : v - std::min(v, column_value(c, *before)));
    }
    fmt::print("{}\n", line);
}

std::string name_or_dash(const char (&name)[kLiveNameBytes]) {
    const std::string_view n(name, strnlen(name, kLiveNameBytes));
    return n.empty() ? "-" : std::string(n);
}

void print_arenas(const LiveSegment& s, bool vmas) {
    fmt::print("{:>5} {:>31} {:<16} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n", "ARENA", "RANGE",
               "NAME", "KIND", "resident", "limit", "minor", "major", "swapin", "swapout", "cow");
    for (std::uint32_t i = 0; i < s.arena_count; ++i) {
        const LiveArena& a = s.arenas[i];
        const auto& c = a.counters.value;
        fmt::print("{:>5} {:>#14x}-{:<#16x} {:<16} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n", i,
                   a.base, a.end, name_or_dash(a.name), "arena", a.resident_pages,
                   a.resident_limit ? fmt::format("{}", a.resident_limit) : "-", c[field::minor_faults],
                   c[field::major_faults], c[field::pages_swapped_in], c[field::pages_swapped_out], c[field::cow_faults]);
        if (!vmas) continue;
        for (std::uint32_t k = 0; k < s.vma_count; ++k) {
            const LiveVma& v = s.vmas[k];
            if (v.arena != i) continue;
            const auto& vc = v.counters.value;
            const std::size_t kind = std::min<std::size_t>(std::size_t(v.kind), kLiveVmaKindNames.size() - 1);
            fmt::print("{:>5} {:>#14x}-{:<#16x} {:<16} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n", "",
                       v.start, v.end, name_or_dash(v.name), kLiveVmaKindNames[kind], "-", "-", vc[field::minor_faults],
                       vc[field::major_faults], vc[field::pages_swapped_in], vc[field::pages_swapped_out],
                       vc[field::cow_faults]);
        }
    }
    if (s.arenas_total > s.arena_count)
        fmt::print("({} more arenas than the segment's table of {} holds)\n", s.arenas_total - s.arena_count,
                   kLiveMaxArenas);
    if (vmas && s.vmas_total > s.vma_count)
        fmt::print("({} more VMAs than the segment's table of {} holds)\n", s.vmas_total - s.vma_count, kLiveMaxVmas);
}

struct Options {
    bool list = true;
    pid_t pid = 0;
    double interval_s = 1;
    std::uint64_t count = 0;  // 0: until interrupted
    bool arenas = false;
    bool vmas = false;
};

template <class T>
bool parse_number(std::string_view text, T* out) {
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
    return ec == std::errc() && ptr == text.data() + text.size() && *out > 0;
}

constexpr std::string_view kFieldDocs[] = {
#define USERMM_STAT_DOC(name, doc) doc,
    USERMM_STATS_FIELDS(USERMM_STAT_DOC)
#undef USERMM_STAT_DOC
};

void print_help() {
    fmt::print("{}\ncolumns of the summary line (all but resident and limit: what changed since the line before; the "
               "first line: since the process started):\n",
               kUsageText);
    for (const Column& c : kColumns)
        if (c.field == kKernel)
            fmt::print("  {:<9} {}\n", c.header, c.doc);
        else
            fmt::print("  {:<9} {}: {}\n", c.header, kLiveFieldNames[c.field], kFieldDocs[c.field]);
}

// nullopt after a usage message.
std::optional<Options> parse(int argc, char** argv) {
    Options o;
    bool once = false;
    std::vector<std::string_view> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg == "--once")
            once = true;
        else if (arg == "-a" || arg == "--arenas")
            o.arenas = true;
        else if (arg == "-v" || arg == "--vmas")
            o.arenas = o.vmas = true;
        else if (arg.starts_with("-")) {
            fmt::print(stderr, "usermm-stat: unknown option {}\n{}", arg, kUsageText);
            return std::nullopt;
        } else
            positional.push_back(arg);
    }
    if (positional.empty()) {
        if (once || o.arenas) {
            fmt::print(stderr, "usermm-stat: --once, --arenas and --vmas need a PID\n{}", kUsageText);
            return std::nullopt;
        }
        return o;
    }
    o.list = false;
    if (positional.size() > 3 || !parse_number(positional[0], &o.pid) ||
        (positional.size() > 1 && !parse_number(positional[1], &o.interval_s)) ||
        (positional.size() > 2 && !parse_number(positional[2], &o.count))) {
        fmt::print(stderr, "usermm-stat: PID, INTERVAL (seconds) and COUNT must be positive numbers\n{}", kUsageText);
        return std::nullopt;
    }
    if (once) o.count = 1;
    return o;
}

int watch(const Options& o) {
    std::string error;
    const auto segment = Segment::open(o.pid, &error);
    if (!segment) {
        fmt::print(stderr, "usermm-stat: {}\n", error);
        return kNoProcess;
    }
    auto sample = [&](Sample* out) {
        if (segment->replaced()) {
            error = fmt::format("pid {}: {} was made anew (the process exec'd): watch it again", o.pid,
                                segment_path(o.pid));
            return false;
        }
        const auto seg = segment->read(o.pid, &error);
        if (!seg) return false;
        if (const auto why = stale_reason(o.pid, *seg)) {
            error = fmt::format("pid {}: {} is stale: {}", o.pid, segment_path(o.pid), *why);
            return false;
        }
        const auto stat = read_file(fmt::format("/proc/{}/stat", o.pid));
        const auto minor = stat ? proc_stat_field(*stat, 10) : std::nullopt;
        const auto major = stat ? proc_stat_field(*stat, 12) : std::nullopt;
        if (!minor || !major) {
            error = fmt::format("pid {}: /proc/{}/stat cannot be read: the process ended", o.pid, o.pid);
            return false;
        }
        out->seg = *seg;
        out->kernel_minor = *minor;
        out->kernel_major = *major;
        return true;
    };
    auto now = std::make_unique<Sample>(), before = std::make_unique<Sample>();
    bool have_before = false;
    if (!o.arenas) print_header();
    const auto interval = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(o.interval_s));
    auto next = std::chrono::steady_clock::now();
    for (std::uint64_t n = 0; o.count == 0 || n < o.count; ++n) {
        if (n > 0) {
            next += interval;
            std::this_thread::sleep_until(next);
        }
        if (!sample(now.get())) {
            fmt::print(stderr, "usermm-stat: {}\n", error);
            return kNoProcess;
        }
        if (o.arenas)
            print_arenas(now->seg, o.vmas);
        else
            print_line(*now, have_before ? before.get() : nullptr);
        std::fflush(stdout);
        std::swap(now, before);
        have_before = true;
    }
    return kOk;
}

}  // namespace

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i)
        if (std::string_view(argv[i]) == "-h" || std::string_view(argv[i]) == "--help") {
            print_help();
            return kOk;
        }
    const auto options = parse(argc, argv);
    if (!options) return kUsage;
    if (options->list) return list_processes();
    return watch(*options);
}
