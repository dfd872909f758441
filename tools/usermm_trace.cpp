// usermm-trace: reads a fault trace (include/usermm/trace.hpp) and prints its summary, draws its
// pictures with gnuplot, or replays its page reference string through the offline page-replacement
// policies of perf/offline_policies.hpp. It needs only the header's structs, not the library, so
// that a trace can be read where usermm is not built.
#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fmt/chrono.h>
#include <fmt/core.h>
#include <fmt/os.h>
#include <usermm/trace.hpp>

#include "../perf/offline_policies.hpp"

extern char** environ;

namespace {

using usermm::FaultEvent;
using usermm::TraceHeader;
using usermm::TraceRecord;

constexpr int kExitBadFile = 1, kExitUsage = 2, kExitNoGnuplot = 3;

constexpr std::string_view kUsage = R"(usage: usermm-trace [summary] FILE
       usermm-trace plot FILE [--out PREFIX]
       usermm-trace replay FILE [--pages-per-unit N] [--budgets LIST] [--out PREFIX]
       usermm-trace --help

Reads a fault trace that usermm recorded (USERMM_TRACE=FILE, or start_trace()).

  summary  (the default) checks the file's header, then prints the trace's duration, records,
           dropped records and threads; faults by event (count, share, majors, latency
           percentiles); the 20 VMAs with most faults; latency percentiles over all faults;
           faults per thread. An unclosed trace (the process died) is read to its last whole
           record.
  plot     draws PREFIX-address.png (each fault's address, as an offset in its arena, against
           time, coloured by event; a panel per arena, at most 4, and at most 200000 points,
           sampled evenly) and PREFIX-latency.png (the histogram of latencies, log-scaled).
           Needs gnuplot (apt-get install gnuplot-nox).
  replay   replays the faults' page reference string through OPT, LRU, FIFO, CLOCK, SIEVE and
           S3-FIFO at a range of resident budgets, prints their misses and draws
           PREFIX-replay.png. A fault trace sees only the faults, not every access: the string
           is what usermm faulted on, and the misses are what each policy would take on that
           string, not on the program's whole reference string. Every fault inside an arena is
           a reference to its page except access_error and stack_overflow (no page was
           accessed); spurious faults count (the thread did touch the page). Foreign faults
           have no arena page.

Options:
  --out PREFIX          where the pictures go (default: FILE without its extension)
  --pages-per-unit N    replay units of N aligned pages (usermm reclaims clusters of 32)
  --budgets LIST        resident budgets in units, comma-separated; P% is P percent of the
                        distinct units (default: 10 budgets from 5% to 100%)

Exit status: 0 done, 1 a file that cannot be read or a picture that cannot be drawn, 2 a usage
error, 3 gnuplot not installed.
)";

struct Failure {
    int code;
    std::string message;
};

[[noreturn]] void fail(int code, std::string message) { throw Failure{code, std::move(message)}; }

std::string event_name(std::uint8_t e) {
    if (e != 0 && e < usermm::kFaultEventCount) return usermm::fault_event_name(usermm::FaultEvent(e));
    return fmt::format("event_{}", e);
}

// tab20's colours, so that neighbouring events differ and an event has its colour in every panel.
constexpr std::array<std::string_view, usermm::kFaultEventCount> kEventColours = {
    "#444444", "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#d62728", "#ff9896", "#2ca02c",
    "#98df8a", "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f",
    "#c7c7c7", "#bcbd22", "#000000", "#17becf"};

std::string_view event_colour(std::uint8_t e) { return e < kEventColours.size() ? kEventColours[e] : kEventColours[0]; }

bool is_major(const TraceRecord& r) { return (r.flags & usermm::kTraceMajor) != 0; }

// Whether a fault touched a page of its arena, for the replay: an access error or a stack overflow
// accessed nothing, and a foreign fault has no arena page.
bool is_page_reference(const TraceRecord& r) {
    const auto e = FaultEvent(r.event);
    return r.arena_base != 0 && r.address >= r.arena_base && e != FaultEvent::Foreign && e != FaultEvent::AccessError &&
           e != FaultEvent::StackOverflow;
}

struct Trace {
    std::string path;
    TraceHeader header{};
    std::vector<TraceRecord> records;
    std::uint64_t duration_ns = 0;  // from the trace's start to its last fault
};

void warn(const std::string& path, std::string_view what) { fmt::print(stderr, "usermm-trace: {}: {}\n", path, what); }

void read_exactly(int fd, void* into, std::size_t bytes, off_t at, const std::string& path) {
    auto* p = static_cast<char*>(into);
    while (bytes > 0) {
        const ssize_t n = pread(fd, p, bytes, at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail(kExitBadFile, fmt::format("{}: read failed: {}", path, n < 0 ? std::strerror(errno) : "early end"));
        p += n;
        at += n;
        bytes -= std::size_t(n);
    }
}

Trace load_trace(const std::string& path) {
    Trace t;
    t.path = path;
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(kExitBadFile, fmt::format("{}: {}", path, std::strerror(errno)));
    struct Closer {
        int fd;
        ~Closer() { close(fd); }
    } closer{fd};
    struct stat st {};
    if (fstat(fd, &st) != 0) fail(kExitBadFile, fmt::format("{}: {}", path, std::strerror(errno)));
    const auto size = std::uint64_t(st.st_size);
    if (size < sizeof(TraceHeader))
        fail(kExitBadFile, fmt::format("{}: {} bytes, too short for a trace header ({} bytes)", path, size, sizeof(TraceHeader)));
    TraceHeader& h = t.header;
    read_exactly(fd, &h, sizeof h, 0, path);
    if (std::memcmp(h.magic, usermm::kTraceMagic, sizeof h.magic) != 0)
        fail(kExitBadFile, fmt::format("{}: not a usermm trace (bad magic: the file does not start with \"{}\")", path,
                                       std::string_view(usermm::kTraceMagic, sizeof usermm::kTraceMagic)));
    if (h.version != usermm::kTraceVersion)
        fail(kExitBadFile, fmt::format("{}: trace format version {}, this usermm-trace reads version {}", path, h.version,
                                       usermm::kTraceVersion));
    if (h.header_size != sizeof(TraceHeader))
        fail(kExitBadFile, fmt::format("{}: header_size {}, version {}'s header is {} bytes", path, h.header_size,
                                       usermm::kTraceVersion, sizeof(TraceHeader)));
    if (h.record_size != sizeof(TraceRecord))
        fail(kExitBadFile, fmt::format("{}: record_size {}, version {}'s records are {} bytes", path, h.record_size,
                                       usermm::kTraceVersion, sizeof(TraceRecord)));
    if (h.page_size == 0 || (h.page_size & (h.page_size - 1)) != 0)
        fail(kExitBadFile, fmt::format("{}: page_size {} is not a power of two", path, h.page_size));

    const std::uint64_t body = size - sizeof(TraceHeader), whole = body / sizeof(TraceRecord);
    const std::uint64_t partial = body % sizeof(TraceRecord);
    std::uint64_t count = whole;
    if (h.closed == 0) {
        warn(path, "not closed (the process ended before stop_trace()): read to its last whole record");
    } else if (h.records > whole) {
        warn(path, fmt::format("truncated: the header counts {} records, the file holds {} whole ones: reading those",
                               h.records, whole));
    } else if (h.records < whole) {
        warn(path, fmt::format("{} bytes after the header's {} records ignored",
                               body - h.records * sizeof(TraceRecord), h.records));
        count = h.records;
    }
    if (count == whole && partial != 0)
        warn(path, fmt::format("truncated last record ({} of {} bytes) ignored", partial, sizeof(TraceRecord)));
    t.records.resize(count);
    read_exactly(fd, t.records.data(), count * sizeof(TraceRecord), off_t(sizeof(TraceHeader)), path);
    for (const TraceRecord& r : t.records) t.duration_ns = std::max(t.duration_ns, r.time_ns);
    return t;
}

// Latencies sorted once, read at any quantile (nearest rank).
class Latencies {
public:
    void add(std::uint32_t ns) { ns_.push_back(ns); }
    void sort() { std::sort(ns_.begin(), ns_.end()); }
    std::size_t size() const { return ns_.size(); }
    double quantile_us(double q) const {
        if (ns_.empty()) return 0;
        const auto rank = std::size_t(std::ceil(q * double(ns_.size())));
        return double(ns_[std::clamp<std::size_t>(rank, 1, ns_.size()) - 1]) / 1000.0;
    }
    double mean_us() const {
        double sum = 0;
        for (const std::uint32_t v : ns_) sum += v;
        return ns_.empty() ? 0 : sum / double(ns_.size()) / 1000.0;
    }

private:
    std::vector<std::uint32_t> ns_;
};

double share(std::uint64_t part, std::uint64_t whole) { return whole == 0 ? 0 : 100.0 * double(part) / double(whole); }

std::string hex_or_none(std::uint64_t v) { return v == 0 ? std::string("-") : fmt::format("{:#x}", v); }

constexpr std::size_t kTopVmas = 20, kTopThreads = 20;

void print_summary(const Trace& t) {
    const TraceHeader& h = t.header;
    const std::uint64_t n = t.records.size();
    std::array<std::uint64_t, 256> count{}, majors{};
    std::array<Latencies, 256> by_event;
    Latencies all;
    struct Vma {
        std::uint64_t faults = 0;
        std::map<std::uint8_t, std::uint64_t> events;
    };
    std::map<std::pair<std::uint64_t, std::uint64_t>, Vma> vmas;
    struct Thread {
        std::uint64_t faults = 0, majors = 0;
        Latencies latencies;
    };
    std::map<std::uint32_t, Thread> threads;
    std::uint64_t direct_reclaims = 0;
    for (const TraceRecord& r : t.records) {
        ++count[r.event];
        majors[r.event] += is_major(r);
        by_event[r.event].add(r.latency_ns);
        all.add(r.latency_ns);
        Vma& v = vmas[{r.vma_start, r.arena_base}];
        ++v.faults;
        ++v.events[r.event];
        Thread& th = threads[r.tid];
        ++th.faults;
        th.majors += is_major(r);
        th.latencies.add(r.latency_ns);
        direct_reclaims += (r.flags & usermm::kTraceDirectReclaim) != 0;
    }
    all.sort();

    const auto start = std::time_t(h.start_realtime_ns / 1000000000u);
    fmt::print("trace {}: pid {}, page size {}, started {:%Y-%m-%d %H:%M:%S} (local time), {}\n", t.path, h.pid, h.page_size,
               fmt::localtime(start), h.closed ? "closed" : "not closed (read to its last whole record)");
    fmt::print("  duration   {:.6f} s (from the trace's start to its last fault)\n", double(t.duration_ns) / 1e9);
    fmt::print("  records    {}\n", n);
    fmt::print("  dropped    {} ({:.2f}% of the faults seen)\n", h.dropped, share(h.dropped, n + h.dropped));
    fmt::print("  threads    {}\n", threads.size());
    fmt::print("  reclaimed  {} faults evicted a batch first (direct reclaim)\n", direct_reclaims);

    fmt::print("\nfaults by event (latency in µs)\n");
    fmt::print("  {:<16} {:>10} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}\n", "event", "count", "share", "major", "p50",
               "p90", "p99", "max");
    for (std::size_t e = 0; e < count.size(); ++e) {
        if (count[e] == 0) continue;
        Latencies& l = by_event[e];
        l.sort();
        fmt::print("  {:<16} {:>10} {:>6.1f}% {:>10} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f}\n", event_name(std::uint8_t(e)),
                   count[e], share(count[e], n), majors[e], l.quantile_us(0.5), l.quantile_us(0.9), l.quantile_us(0.99),
                   l.quantile_us(1));
    }

    std::vector<std::pair<std::pair<std::uint64_t, std::uint64_t>, const Vma*>> ranked;
    for (const auto& [key, v] : vmas) ranked.emplace_back(key, &v);
    std::stable_sort(ranked.begin(), ranked.end(),
                     [](const auto& a, const auto& b) { return a.second->faults > b.second->faults; });
    fmt::print("\nfaults by VMA ({} of {})\n", std::min(ranked.size(), kTopVmas), ranked.size());
    fmt::print("  {:<18} {:<18} {:>10} {:>7}  {}\n", "vma_start", "arena_base", "count", "share", "top events");
    for (std::size_t i = 0; i < std::min(ranked.size(), kTopVmas); ++i) {
        const auto& [key, v] = ranked[i];
        std::vector<std::pair<std::uint8_t, std::uint64_t>> events(v->events.begin(), v->events.end());
        std::stable_sort(events.begin(), events.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
        std::string top;
        for (std::size_t j = 0; j < std::min<std::size_t>(events.size(), 3); ++j)
            top += fmt::format("{}{} {}", j ? ", " : "", event_name(events[j].first), events[j].second);
        if (events.size() > 3) top += fmt::format(", {} more", events.size() - 3);
        fmt::print("  {:<18} {:<18} {:>10} {:>6.1f}%  {}\n", hex_or_none(key.first), hex_or_none(key.second), v->faults,
                   share(v->faults, n), top);
    }

    fmt::print("\nlatency over all faults (µs): p50 {:.2f}, p90 {:.2f}, p99 {:.2f}, p99.9 {:.2f}, max {:.2f}, mean {:.2f}\n",
               all.quantile_us(0.5), all.quantile_us(0.9), all.quantile_us(0.99), all.quantile_us(0.999),
               all.quantile_us(1), all.mean_us());

    std::vector<std::pair<std::uint32_t, Thread*>> by_thread;
    for (auto& [tid, th] : threads) by_thread.emplace_back(tid, &th);
    std::stable_sort(by_thread.begin(), by_thread.end(),
                     [](const auto& a, const auto& b) { return a.second->faults > b.second->faults; });
    fmt::print("\nfaults per thread ({} of {}; latency in µs)\n", std::min(by_thread.size(), kTopThreads), by_thread.size());
    fmt::print("  {:<10} {:>10} {:>7} {:>10} {:>9} {:>9}\n", "tid", "count", "share", "major", "p50", "p99");
    for (std::size_t i = 0; i < std::min(by_thread.size(), kTopThreads); ++i) {
        Thread& th = *by_thread[i].second;
        th.latencies.sort();
        fmt::print("  {:<10} {:>10} {:>6.1f}% {:>10} {:>9.2f} {:>9.2f}\n", by_thread[i].first, th.faults,
                   share(th.faults, n), th.majors, th.latencies.quantile_us(0.5), th.latencies.quantile_us(0.99));
    }
}

// The records in time order: each thread's are, but the drain interleaves threads only roughly.
std::vector<TraceRecord> by_time(const Trace& t) {
    std::vector<TraceRecord> sorted = t.records;
    std::stable_sort(sorted.begin(), sorted.end(), [](const TraceRecord& a, const TraceRecord& b) { return a.time_ns < b.time_ns; });
    return sorted;
}

// --- gnuplot -----------------------------------------------------------------------------------

std::optional<std::string> find_in_path(std::string_view program) {
    const char* path = std::getenv("PATH");
    std::string_view dirs = path ? path : "/usr/bin:/bin";
    while (true) {
        const std::size_t colon = dirs.find(':');
        const std::string_view dir = dirs.substr(0, colon);
        const std::string candidate = fmt::format("{}/{}", dir.empty() ? "." : dir, program);
        if (access(candidate.c_str(), X_OK) == 0) return candidate;
        if (colon == std::string_view::npos) return std::nullopt;
        dirs.remove_prefix(colon + 1);
    }
}

// Runs a program and waits for it; its output is the terminal's unless `quiet`. True if it exited 0.
bool run_program(const std::string& exe, std::vector<std::string> args, bool quiet) {
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (quiet) {
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_adddup2(&actions, 1, 2);
    }
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) fail(kExitBadFile, fmt::format("cannot run {}: {}", exe, std::strerror(rc)));
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) fail(kExitBadFile, fmt::format("waiting for {}: {}", exe, std::strerror(errno)));
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// A gnuplot single-quoted string, in which a quote is doubled.
std::string gp_string(std::string_view s) {
    std::string q = "'";
    for (const char c : s) q += c == '\'' ? std::string("''") : std::string(1, c);
    return q + "'";
}

// A directory for gnuplot's data and script, removed with everything in it.
class TempDir {
public:
    TempDir() {
        std::string pattern = (std::filesystem::temp_directory_path() / "usermm-trace.XXXXXX").string();
        if (!mkdtemp(pattern.data())) fail(kExitBadFile, fmt::format("mkdtemp {}: {}", pattern, std::strerror(errno)));
        path_ = pattern;
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    std::string file(std::string_view name) const { return (path_ / name).string(); }

private:
    std::filesystem::path path_;
};

class Gnuplot {
public:
    Gnuplot() {
        const auto exe = find_in_path("gnuplot");
        if (!exe) fail(kExitNoGnuplot, "gnuplot not found: apt-get install gnuplot-nox");
        exe_ = *exe;
        // pngcairo antialiases; the libgd png terminal is the fallback of a gnuplot built without cairo.
        terminal_ = run_program(exe_, {"gnuplot", "-e", "set terminal pngcairo"}, true) ? "pngcairo" : "png";
    }
    // The script's first lines: a PNG of `width` x `height` pixels at `output`.
    std::string preamble(const std::string& output, int width, int height) const {
        return fmt::format("set encoding utf8\nset terminal {} size {},{} noenhanced{}\nset output {}\n", terminal_,
                           width, height, terminal_ == "pngcairo" ? " font 'sans,10'" : "", gp_string(output));
    }
    void draw(const TempDir& dir, std::string_view name, const std::string& script, const std::string& output) const {
        const std::string script_path = dir.file(fmt::format("{}.gp", name));
        {
            auto out = fmt::output_file(script_path);
            out.print("{}", script);
        }
        if (!run_program(exe_, {"gnuplot", script_path}, false))
            fail(kExitBadFile, fmt::format("gnuplot failed to draw {}", output));
        fmt::print("wrote {}\n", output);
    }

private:
    std::string exe_, terminal_;
};

constexpr std::size_t kMaxPoints = 200000, kMaxPanels = 4;

void plot_addresses(const Trace& t, const std::vector<TraceRecord>& sorted, const Gnuplot& gp, const TempDir& dir,
                    const std::string& prefix) {
    std::map<std::uint64_t, std::uint64_t> per_arena;
    std::uint64_t outside = 0;
    for (const TraceRecord& r : sorted) {
        if (r.arena_base != 0 && r.address >= r.arena_base)
            ++per_arena[r.arena_base];
        else
            ++outside;
    }
    // The arenas with most faults, shown in address order.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> arenas(per_arena.begin(), per_arena.end());
    std::stable_sort(arenas.begin(), arenas.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    const std::size_t hidden_arenas = arenas.size() > kMaxPanels ? arenas.size() - kMaxPanels : 0;
    arenas.resize(std::min(arenas.size(), kMaxPanels));
    std::sort(arenas.begin(), arenas.end());
    std::uint64_t shown = 0;
    for (const auto& a : arenas) shown += a.second;
    const std::uint64_t stride = std::max<std::uint64_t>(1, (shown + kMaxPoints - 1) / kMaxPoints);

    // One data file per arena and event: each gets its colour and legend entry.
    std::map<std::pair<std::size_t, std::uint8_t>, std::unique_ptr<fmt::ostream>> files;
    std::map<std::uint64_t, std::size_t> panel_of;
    for (std::size_t i = 0; i < arenas.size(); ++i) panel_of[arenas[i].first] = i;
    std::uint64_t seen = 0;
    for (const TraceRecord& r : sorted) {
        const auto panel = panel_of.find(r.arena_base);
        if (panel == panel_of.end() || r.address < r.arena_base) continue;
        if (seen++ % stride != 0) continue;
        auto& f = files[{panel->second, r.event}];
        if (!f) f = std::make_unique<fmt::ostream>(fmt::output_file(dir.file(fmt::format("a{}-e{}.dat", panel->second, r.event))));
        f->print("{:.9f} {:.6f}\n", double(r.time_ns) / 1e9, double(r.address - r.arena_base) / (1024.0 * 1024.0));
    }
    for (auto& entry : files) entry.second->close();

    std::string title = fmt::format("{}: fault addresses against time", t.path);
    if (stride > 1) title += fmt::format(" (1 in {} of {} faults shown)", stride, shown);
    if (outside) title += fmt::format("; {} faults outside every arena not shown", outside);
    if (hidden_arenas) title += fmt::format("; {} arenas with fewer faults not shown", hidden_arenas);
    const std::string output = prefix + "-address.png";
    const int panels = int(std::max<std::size_t>(arenas.size(), 1));
    std::string s = gp.preamble(output, 1400, 120 + 380 * panels);
    s += fmt::format("set multiplot layout {},1 title {}\n", panels, gp_string(title));
    s += fmt::format("set xrange [0:{:.9f}]\nset xlabel 'time (s)'\nset key outside right top\nset grid\n",
                     std::max(double(t.duration_ns) / 1e9, 1e-6));
    if (arenas.empty()) s += "set label 'no faults inside an arena' at graph 0.5,0.5 center\nplot NaN notitle\n";
    for (std::size_t i = 0; i < arenas.size(); ++i) {
        s += fmt::format("set title {}\nset ylabel 'offset in the arena (MiB)'\nplot ",
                         gp_string(fmt::format("arena {:#x}: {} faults", arenas[i].first, arenas[i].second)));
        bool first = true;
        for (const auto& [key, f] : files) {
            if (key.first != i) continue;
            s += fmt::format("{}{} using 1:2 with points pt 7 ps 0.3 lc rgb {} title {}", first ? "" : ", ",
                             gp_string(dir.file(fmt::format("a{}-e{}.dat", i, key.second))), gp_string(event_colour(key.second)),
                             gp_string(event_name(key.second)));
            first = false;
        }
        s += "\n";
    }
    s += "unset multiplot\n";
    gp.draw(dir, "address", s, output);
    if (stride > 1) fmt::print("  address plot: 1 in {} of {} faults, at most {} points\n", stride, shown, kMaxPoints);
}

void plot_latencies(const Trace& t, const Gnuplot& gp, const TempDir& dir, const std::string& prefix) {
    // Ten bins a decade of nanoseconds; bin k starts at 10^(k/10) ns. A latency of 0 goes with 1 ns.
    constexpr int kBinsPerDecade = 10;
    const auto bin_of = [](std::uint32_t ns) { return int(std::floor(kBinsPerDecade * std::log10(std::max(ns, 1u)))); };
    std::map<int, std::pair<std::uint64_t, std::uint64_t>> bins;  // all, major
    Latencies all;
    for (const TraceRecord& r : t.records) {
        auto& b = bins[bin_of(r.latency_ns)];
        ++b.first;
        b.second += is_major(r);
        all.add(r.latency_ns);
    }
    all.sort();
    bool any_major = false;
    {
        auto out = fmt::output_file(dir.file("latency.dat"));
        for (const auto& [k, b] : bins) {
            const double lo = std::pow(10.0, double(k) / kBinsPerDecade) / 1000.0,
                         hi = std::pow(10.0, double(k + 1) / kBinsPerDecade) / 1000.0;
            out.print("{:.6g} {:.6g} {} {}\n", lo, hi, b.first, b.second);
            any_major = any_major || b.second > 0;
        }
    }
    const std::string output = prefix + "-latency.png";
    std::string s = gp.preamble(output, 1000, 600);
    s += fmt::format("set title {}\n", gp_string(fmt::format("{}: {} faults; p50 {:.2f} µs, p99 {:.2f} µs, max {:.2f} µs",
                                                           t.path, t.records.size(), all.quantile_us(0.5),
                                                           all.quantile_us(0.99), all.quantile_us(1))));
    s += "set logscale x\nset xlabel 'latency (µs)'\nset ylabel 'faults'\nset yrange [0:*]\nset grid\n"
         "set style fill solid 0.7 border -1\nset key top left\n";
    for (const auto& [q, label] : {std::pair{0.5, "p50"}, std::pair{0.99, "p99"}}) {
        const double x = std::max(all.quantile_us(q), 0.001);
        s += fmt::format("set arrow from {0:.6g}, graph 0 to {0:.6g}, graph 1 nohead dt 2 lc rgb '#555555'\n"
                         "set label '{1}' at {0:.6g}, graph 0.97 offset 0.5,0\n",
                         x, label);
    }
    const std::string data = gp_string(dir.file("latency.dat"));
    // Major faults are drawn over all faults from the same baseline: each box's red part is its majors.
    s += fmt::format("plot {} using (sqrt($1*$2)):($3/2):1:2:(0):3 with boxxyerror lc rgb '#1f77b4' title 'all faults'",
                     data);
    if (any_major)
        s += fmt::format(", {} using (sqrt($1*$2)):($4/2):1:2:(0):4 with boxxyerror lc rgb '#d62728' title 'major faults'",
                         data);
    s += "\n";
    gp.draw(dir, "latency", s, output);
}

// --- replay ------------------------------------------------------------------------------------

struct ReferenceString {
    std::vector<std::uint32_t> units;  // dense numbers in order of first appearance
    std::size_t distinct = 0;
    std::size_t arenas = 0;
};

ReferenceString reference_string(const Trace& t, const std::vector<TraceRecord>& sorted, std::uint64_t pages_per_unit) {
    ReferenceString rs;
    const std::uint64_t unit_bytes = std::uint64_t(t.header.page_size) * pages_per_unit;
    struct KeyHash {
        std::size_t operator()(const std::pair<std::uint64_t, std::uint64_t>& k) const {
            return std::hash<std::uint64_t>()(k.first * 0x9e3779b97f4a7c15u ^ k.second);
        }
    };
    std::unordered_map<std::pair<std::uint64_t, std::uint64_t>, std::uint32_t, KeyHash> number;
    std::unordered_set<std::uint64_t> arenas;
    for (const TraceRecord& r : sorted) {
        if (!is_page_reference(r)) continue;
        arenas.insert(r.arena_base);
        const auto it =
            number.try_emplace({r.arena_base, (r.address - r.arena_base) / unit_bytes}, std::uint32_t(number.size())).first;
        rs.units.push_back(it->second);
    }
    rs.distinct = number.size();
    rs.arenas = arenas.size();
    return rs;
}

std::uint64_t parse_count(std::string_view s, std::string_view what) {
    std::uint64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || end != s.data() + s.size() || v == 0)
        fail(kExitUsage, fmt::format("{}: \"{}\" is not a positive whole number", what, s));
    return v;
}

std::vector<std::uint64_t> budgets_for(const std::optional<std::string>& list, std::size_t distinct) {
    std::vector<std::uint64_t> budgets;
    const auto of_share = [&](double percent) {
        return std::max<std::uint64_t>(1, std::uint64_t(std::llround(percent / 100.0 * double(distinct))));
    };
    if (!list) {
        for (int i = 0; i < 10; ++i) budgets.push_back(of_share(5.0 + 95.0 * i / 9));
    } else {
        std::string_view rest = *list;
        while (true) {
            const std::size_t comma = rest.find(',');
            const std::string_view item = rest.substr(0, comma);
            if (!item.empty() && item.back() == '%') {
                const std::uint64_t percent = parse_count(item.substr(0, item.size() - 1), "--budgets");
                if (percent > 100) fail(kExitUsage, fmt::format("--budgets: {} is more than 100%", item));
                budgets.push_back(of_share(double(percent)));
            } else {
                budgets.push_back(parse_count(item, "--budgets"));
            }
            if (comma == std::string_view::npos) break;
            rest.remove_prefix(comma + 1);
        }
    }
    std::sort(budgets.begin(), budgets.end());
    budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
    return budgets;
}

void replay(const Trace& t, std::uint64_t pages_per_unit, const std::optional<std::string>& budget_list,
            const std::string& prefix) {
    const ReferenceString rs = reference_string(t, by_time(t), pages_per_unit);
    const std::string_view unit = pages_per_unit == 1 ? "page" : "unit";
    fmt::print("replay of {}: {} references to {} distinct {}s in {} arenas", t.path, rs.units.size(), rs.distinct, unit,
               rs.arenas);
    if (pages_per_unit > 1) fmt::print(" (a unit: {} aligned pages)", pages_per_unit);
    fmt::print("\n");
    fmt::print("A fault trace sees the faults, not every access: these are the misses each policy would take on the\n"
               "string of pages usermm faulted on, not on the program's whole reference string.\n");
    if (rs.units.empty()) {
        fmt::print("no page references to replay\n");
        return;
    }
    const std::vector<std::uint64_t> budgets = budgets_for(budget_list, rs.distinct);
    std::vector<std::vector<std::uint64_t>> misses;
    for (const std::uint64_t b : budgets) {
        std::vector<std::uint64_t> row;
        for (const usermm_offline::Policy p : usermm_offline::kPolicies)
            row.push_back(usermm_offline::faults(p, rs.units, std::size_t(b)));
        misses.push_back(std::move(row));
    }
    fmt::print("\nmisses by resident budget ({}s; share of the distinct ones)\n", unit);
    fmt::print("  {:>10} {:>7}", "budget", "share");
    for (const usermm_offline::Policy p : usermm_offline::kPolicies) fmt::print(" {:>10}", usermm_offline::name(p));
    fmt::print("\n");
    for (std::size_t i = 0; i < budgets.size(); ++i) {
        fmt::print("  {:>10} {:>6.1f}%", budgets[i], share(budgets[i], rs.distinct));
        for (const std::uint64_t m : misses[i]) fmt::print(" {:>10}", m);
        fmt::print("\n");
    }
    fmt::print("\n");
    std::fflush(stdout);

    const Gnuplot gp;
    const TempDir dir;
    {
        auto out = fmt::output_file(dir.file("replay.dat"));
        for (std::size_t i = 0; i < budgets.size(); ++i) {
            out.print("{}", budgets[i]);
            for (const std::uint64_t m : misses[i]) out.print(" {}", m);
            out.print("\n");
        }
    }
    const std::string output = prefix + "-replay.png";
    std::string s = gp.preamble(output, 1000, 600);
    s += fmt::format("set title {}\n",
                     gp_string(fmt::format("{}: misses over the {} references usermm faulted on ({} distinct {}s)", t.path,
                                        rs.units.size(), rs.distinct, unit)));
    s += fmt::format("set xlabel 'resident budget ({})'\nset ylabel 'misses'\nset xrange [0:*]\nset yrange [0:*]\n"
                     "set grid\nset key top right\n",
                     pages_per_unit == 1 ? std::string("pages") : fmt::format("units of {} pages", pages_per_unit));
    s += "plot ";
    for (std::size_t i = 0; i < std::size(usermm_offline::kPolicies); ++i)
        s += fmt::format("{}{} using 1:{} with linespoints lw 2 title {}", i ? ", " : "", gp_string(dir.file("replay.dat")),
                         i + 2, gp_string(usermm_offline::name(usermm_offline::kPolicies[i])));
    s += fmt::format(", {} with lines dt 2 lc rgb '#555555' title 'distinct (cold misses)'\n", rs.distinct);
    gp.draw(dir, "replay", s, output);
}

// --- the command line --------------------------------------------------------------------------

struct Args {
    std::string command = "summary";
    std::string file;
    std::optional<std::string> out, budgets;
    std::uint64_t pages_per_unit = 1;
    bool help = false;
};

Args parse(int argc, char** argv) {
    Args a;
    std::vector<std::string_view> words(argv + 1, argv + argc);
    std::vector<std::string_view> positional;
    bool saw_pages_per_unit = false;
    for (std::size_t i = 0; i < words.size(); ++i) {
        const std::string_view w = words[i];
        if (w == "--help" || w == "-h") {
            a.help = true;
            return a;
        }
        if (!w.starts_with("-") || w == "-") {
            positional.push_back(w);
            continue;
        }
        const std::size_t eq = w.find('=');
        const std::string_view name = w.substr(0, eq);
        std::string value;
        if (name != "--out" && name != "--budgets" && name != "--pages-per-unit")
            fail(kExitUsage, fmt::format("unknown option {}", w));
        if (eq != std::string_view::npos) {
            value = w.substr(eq + 1);
        } else if (i + 1 < words.size()) {
            value = words[++i];
        } else {
            fail(kExitUsage, fmt::format("{} needs a value", name));
        }
        if (name == "--out") {
            if (value.empty()) fail(kExitUsage, "--out needs a prefix");
            a.out = value;
        } else if (name == "--budgets") {
            a.budgets = value;
        } else {
            a.pages_per_unit = parse_count(value, "--pages-per-unit");
            saw_pages_per_unit = true;
        }
    }
    if (!positional.empty() && (positional[0] == "summary" || positional[0] == "plot" || positional[0] == "replay")) {
        a.command = positional[0];
        positional.erase(positional.begin());
    }
    if (positional.size() != 1)
        fail(kExitUsage, positional.empty() ? "no trace file given" : fmt::format("one trace file, not {}", positional.size()));
    a.file = positional[0];
    if (a.command == "summary" && a.out) fail(kExitUsage, "summary draws nothing: --out is for plot and replay");
    if (a.command != "replay" && (a.budgets || saw_pages_per_unit))
        fail(kExitUsage, "--budgets and --pages-per-unit are options of replay");
    if (!a.out) a.out = std::filesystem::path(a.file).replace_extension().string();
    return a;
}

int run(const Args& a) {
    const Trace t = load_trace(a.file);
    if (a.command == "summary") {
        print_summary(t);
    } else if (a.command == "plot") {
        if (t.records.empty()) fail(kExitBadFile, fmt::format("{}: no records to plot", a.file));
        const Gnuplot gp;
        const TempDir dir;
        plot_addresses(t, by_time(t), gp, dir, *a.out);
        plot_latencies(t, gp, dir, *a.out);
    } else {
        replay(t, a.pages_per_unit, a.budgets, *a.out);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Args a = parse(argc, argv);
        if (a.help) {
            fmt::print("{}", kUsage);
            return 0;
        }
        return run(a);
    } catch (const Failure& f) {
        fmt::print(stderr, "usermm-trace: {}\n", f.message);
        if (f.code == kExitUsage) fmt::print(stderr, "(usermm-trace --help for the usage)\n");
        return f.code;
    } catch (const std::exception& e) {
        fmt::print(stderr, "usermm-trace: {}\n", e.what());
        return kExitBadFile;
    }
}
