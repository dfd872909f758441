// usermm-trace (tools/usermm_trace.cpp) run on synthetic traces written here through the structs of
// <usermm/trace.hpp>: the summary's counts, the files it refuses or reads in part, plot's PNGs and
// replay's misses. Without gnuplot the cases that draw are reported skipped.
#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <doctest/doctest.h>
#include <usermm/trace.hpp>

#include "test_util.hpp"

extern char** environ;

using usermm::FaultEvent;
using usermm::TraceHeader;
using usermm::TraceRecord;
using usermm_test::TempDir;

namespace {

constexpr std::uint32_t kPage = 4096;
constexpr std::uint64_t kArenaA = 0x7f0000000000, kArenaB = 0x7f1000000000;

// Whether gnuplot runs here: asked once at start-up, so that the cases that draw are reported skipped.
const bool g_have_gnuplot = [] {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    char name[] = "gnuplot", version[] = "--version";
    char* argv[] = {name, version, nullptr};
    pid_t pid = 0;
    const bool spawned = posix_spawnp(&pid, "gnuplot", &actions, nullptr, argv, environ) == 0;
    posix_spawn_file_actions_destroy(&actions);
    int status = 0;
    return spawned && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}();

std::string slurp(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct Run {
    int exit_code = -1;
    std::string out, err;
};

// Runs usermm-trace with `args`, its output captured in files of `dir` (two pipes read in turn
// could fill and stall it). `path_env`, if given, is its PATH.
Run run_tool(const TempDir& dir, std::vector<std::string> args, const char* path_env = nullptr) {
    args.insert(args.begin(), USERMM_TRACE_BIN);
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::vector<std::string> env_strings;
    for (char** e = environ; *e; ++e)
        if (!path_env || std::strncmp(*e, "PATH=", 5) != 0) env_strings.emplace_back(*e);
    if (path_env) env_strings.push_back(std::string("PATH=") + path_env);
    std::vector<char*> envp;
    for (std::string& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);

    const std::string out = dir.file("tool.out"), err = dir.file("tool.err");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    REQUIRE_MESSAGE(rc == 0, "cannot run " USERMM_TRACE_BIN ": " << std::strerror(rc));
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    Run r;
    REQUIRE_MESSAGE(WIFEXITED(status), "usermm-trace died by signal " << WTERMSIG(status));
    r.exit_code = WEXITSTATUS(status);
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
}

TraceRecord record(std::uint64_t time_ns, FaultEvent e, std::uint64_t arena, std::uint64_t address,
                   std::uint32_t latency_ns, std::uint32_t tid) {
    TraceRecord r{};
    r.time_ns = time_ns;
    r.address = address;
    r.vma_start = arena;
    r.arena_base = arena;
    r.latency_ns = latency_ns;
    r.tid = tid;
    r.pages = 1;
    r.event = std::uint8_t(e);
    r.flags = e == FaultEvent::SwapIn ? usermm::kTraceMajor : 0;
    return r;
}

const std::vector<std::pair<FaultEvent, unsigned>> kWorkload = {
    {FaultEvent::ZeroRead, 400}, {FaultEvent::AnonWrite, 600},   {FaultEvent::Upgrade, 250},
    {FaultEvent::SwapIn, 120},   {FaultEvent::Spurious, 30},     {FaultEvent::Hinting, 50},
    {FaultEvent::Foreign, 20},   {FaultEvent::AccessError, 5},   {FaultEvent::StackOverflow, 3}};

// `scale` times kWorkload's events in a seeded order: arena A's faults mostly on a hot set of 64
// pages, arena B's spread over 200, foreign ones in no arena; four threads.
std::vector<TraceRecord> workload(unsigned scale = 1) {
    std::vector<FaultEvent> events;
    for (const auto& [e, count] : kWorkload) events.insert(events.end(), std::size_t(count) * scale, e);
    std::mt19937_64 rng(14);
    std::shuffle(events.begin(), events.end(), rng);
    std::vector<TraceRecord> records;
    std::uint64_t t = 0;
    for (std::size_t i = 0; i < events.size(); ++i) {
        t += 1000 + rng() % 2000;
        const FaultEvent e = events[i];
        std::uint32_t latency = 200 + std::uint32_t(rng() % 5000);
        if (e == FaultEvent::SwapIn) latency += 40000;
        const auto tid = std::uint32_t(100 + i % 4);
        if (e == FaultEvent::Foreign) {
            records.push_back(record(t, e, 0, 0x1000, latency, tid));
            continue;
        }
        const bool in_b = rng() % 4 == 0;
        const std::uint64_t page = in_b ? rng() % 200 : rng() % 10 < 7 ? rng() % 64 : 64 + rng() % 960;
        const std::uint64_t arena = in_b ? kArenaB : kArenaA;
        records.push_back(record(t, e, arena, arena + page * kPage + rng() % kPage, latency, tid));
    }
    return records;
}

// The pages the tool's replay counts: every fault in an arena but access errors and stack overflows.
std::size_t distinct_units(const std::vector<TraceRecord>& records, std::uint64_t pages_per_unit) {
    std::set<std::pair<std::uint64_t, std::uint64_t>> units;
    for (const TraceRecord& r : records) {
        const auto e = FaultEvent(r.event);
        if (r.arena_base == 0 || e == FaultEvent::Foreign || e == FaultEvent::AccessError || e == FaultEvent::StackOverflow)
            continue;
        units.emplace(r.arena_base, (r.address - r.arena_base) / (kPage * pages_per_unit));
    }
    return units.size();
}

TraceHeader header(std::uint64_t records, std::uint64_t dropped, bool closed) {
    TraceHeader h{};
    std::memcpy(h.magic, usermm::kTraceMagic, sizeof h.magic);
    h.version = usermm::kTraceVersion;
    h.header_size = sizeof(TraceHeader);
    h.record_size = sizeof(TraceRecord);
    h.page_size = kPage;
    h.pid = 4242;
    h.closed = closed;
    h.start_ns = 1000000000;
    h.start_realtime_ns = 1700000000000000000u;
    h.records = closed ? records : 0;
    h.dropped = dropped;
    return h;
}

// Writes `h` and `records`, then cuts the file to `keep_bytes` if given.
void write_trace(const std::string& path, const TraceHeader& h, const std::vector<TraceRecord>& records,
                 std::optional<std::size_t> keep_bytes = std::nullopt) {
    std::string bytes(reinterpret_cast<const char*>(&h), sizeof h);
    bytes.append(reinterpret_cast<const char*>(records.data()), records.size() * sizeof(TraceRecord));
    if (keep_bytes) bytes.resize(*keep_bytes);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), std::streamsize(bytes.size()));
    REQUIRE(out.good());
}

// The lines of `text` after the first that starts with `heading`, up to an empty line.
std::vector<std::string> section(const std::string& text, const std::string& heading) {
    std::istringstream in(text);
    std::vector<std::string> lines;
    bool inside = false;
    for (std::string line; std::getline(in, line);) {
        if (inside && line.empty()) break;
        if (inside) lines.push_back(line);
        if (line.rfind(heading, 0) == 0) inside = true;
    }
    return lines;
}

// The summary's count per event name, from its table.
std::map<std::string, std::uint64_t> event_counts(const std::string& out) {
    std::map<std::string, std::uint64_t> counts;
    const std::vector<std::string> lines = section(out, "faults by event");
    for (std::size_t i = 1; i < lines.size(); ++i) {
        std::istringstream row(lines[i]);
        std::string name;
        std::uint64_t count = 0;
        row >> name >> count;
        counts[name] = count;
    }
    return counts;
}

// The number after `label` at the start of one of the summary's header lines.
std::uint64_t header_value(const std::string& out, const std::string& label) {
    const std::size_t at = out.find("\n  " + label + " ");
    REQUIRE_MESSAGE(at != std::string::npos, "no '" << label << "' line in:\n" << out);
    std::istringstream in(out.substr(at + 3 + label.size()));
    std::uint64_t v = 0;
    in >> v;
    return v;
}

struct ReplayRow {
    std::uint64_t budget = 0;
    std::map<std::string, std::uint64_t> misses;
};

std::vector<ReplayRow> replay_rows(const std::string& out) {
    const std::vector<std::string> lines = section(out, "misses by resident budget");
    REQUIRE_MESSAGE(!lines.empty(), "no replay table in:\n" << out);
    std::istringstream head(lines[0]);
    std::vector<std::string> columns;
    for (std::string c; head >> c;) columns.push_back(c);
    REQUIRE(columns.size() == 8);  // budget, share, six policies
    std::vector<ReplayRow> rows;
    for (std::size_t i = 1; i < lines.size(); ++i) {
        std::istringstream in(lines[i]);
        ReplayRow row;
        std::string share;
        in >> row.budget >> share;
        for (std::size_t c = 2; c < columns.size(); ++c) in >> row.misses[columns[c]];
        REQUIRE_MESSAGE(!in.fail(), "bad replay row: " << lines[i]);
        rows.push_back(std::move(row));
    }
    return rows;
}

std::uint32_t big_endian32(const std::string& s, std::size_t at) {
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < 4; ++i) v = v << 8 | std::uint8_t(s[at + i]);
    return v;
}

// A PNG file of a real picture: the signature, IHDR first with more than 100 x 100 pixels, and
// more than 5 KB.
void check_png(const std::string& path) {
    CAPTURE(path);
    const std::string png = slurp(path);
    REQUIRE(png.size() > 5 * 1024);
    CHECK(png.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
    CHECK(png.compare(12, 4, "IHDR") == 0);
    CHECK(big_endian32(png, 16) > 100);
    CHECK(big_endian32(png, 20) > 100);
}

}  // namespace

TEST_CASE("summary: the counts per event, records, dropped and threads are the ones written") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    write_trace(dir.file("w.trace"), header(records.size(), 37, true), records);
    for (const std::vector<std::string>& args : {std::vector<std::string>{dir.file("w.trace")},
                                                 std::vector<std::string>{"summary", dir.file("w.trace")}}) {
        const Run r = run_tool(dir, args);
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        CHECK(r.err.empty());
        const std::map<std::string, std::uint64_t> counts = event_counts(r.out);
        CHECK(counts.size() == kWorkload.size());
        CHECK(counts.at("zero_read") == 400);
        CHECK(counts.at("anon_write") == 600);
        CHECK(counts.at("upgrade") == 250);
        CHECK(counts.at("swap_in") == 120);
        CHECK(counts.at("spurious") == 30);
        CHECK(counts.at("hinting") == 50);
        CHECK(counts.at("foreign") == 20);
        CHECK(counts.at("access_error") == 5);
        CHECK(counts.at("stack_overflow") == 3);
        CHECK(header_value(r.out, "records") == records.size());
        CHECK(header_value(r.out, "dropped") == 37);
        CHECK(header_value(r.out, "threads") == 4);
        // The majors column of swap_in: every one of them.
        for (const std::string& line : section(r.out, "faults by event"))
            if (line.find(" swap_in ") != std::string::npos) CHECK(line.find(" 120 ") != line.rfind(" 120 "));
    }
}

TEST_CASE("a bad magic, another version, wrong sizes and a file shorter than a header are refused") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    const std::string path = dir.file("bad.trace");
    const auto refused = [&](const TraceHeader& h, const std::string& why) {
        write_trace(path, h, records);
        const Run r = run_tool(dir, {path});
        CAPTURE(r.err);
        CHECK(r.exit_code == 1);
        CHECK(r.out.empty());
        CHECK(r.err.find(path) != std::string::npos);
        CHECK(r.err.find(why) != std::string::npos);
    };
    TraceHeader h = header(records.size(), 0, true);
    std::memcpy(h.magic, "USMMIMG1", 8);
    refused(h, "bad magic");
    h = header(records.size(), 0, true);
    h.version = 2;
    refused(h, "version 2");
    h = header(records.size(), 0, true);
    h.record_size = 40;
    refused(h, "record_size 40");
    h = header(records.size(), 0, true);
    h.header_size = 128;
    refused(h, "header_size 128");
    h = header(records.size(), 0, true);
    h.page_size = 3000;
    refused(h, "page_size 3000");

    write_trace(path, header(records.size(), 0, true), records, 40);
    const Run r = run_tool(dir, {path});
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("too short for a trace header") != std::string::npos);
    CHECK(run_tool(dir, {dir.file("missing.trace")}).exit_code == 1);
}

TEST_CASE("a truncated or unclosed trace is read to its last whole record, and says so") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    const std::string path = dir.file("cut.trace");
    SUBCASE("closed, cut in the middle of record 100: the header's count is more than the file holds") {
        write_trace(path, header(records.size(), 5, true), records, sizeof(TraceHeader) + 100 * sizeof(TraceRecord) + 20);
        const Run r = run_tool(dir, {path});
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        CHECK(header_value(r.out, "records") == 100);
        CHECK(header_value(r.out, "dropped") == 5);
        CHECK(r.err.find("truncated") != std::string::npos);
        CHECK(r.err.find("truncated last record (20 of 48 bytes) ignored") != std::string::npos);
    }
    SUBCASE("unclosed (the process died), with half a record at the end") {
        write_trace(path, header(records.size(), 9, false), records, sizeof(TraceHeader) + 300 * sizeof(TraceRecord) + 24);
        const Run r = run_tool(dir, {path});
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        CHECK(header_value(r.out, "records") == 300);
        CHECK(header_value(r.out, "dropped") == 9);
        CHECK(r.out.find("not closed") != std::string::npos);
        CHECK(r.err.find("not closed") != std::string::npos);
        CHECK(r.err.find("truncated last record (24 of 48 bytes) ignored") != std::string::npos);
    }
    SUBCASE("unclosed and whole: every record") {
        write_trace(path, header(records.size(), 0, false), records);
        const Run r = run_tool(dir, {path});
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        CHECK(header_value(r.out, "records") == records.size());
        CHECK(r.err.find("truncated") == std::string::npos);
    }
}

TEST_CASE("usage errors exit 2, --help exits 0 with the subcommands and replay's caveat") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    write_trace(dir.file("w.trace"), header(records.size(), 0, true), records);
    const Run help = run_tool(dir, {"--help"});
    CHECK(help.exit_code == 0);
    for (const char* word : {"summary", "plot", "replay", "--budgets", "--pages-per-unit", "sees only the faults"})
        CHECK_MESSAGE(help.out.find(word) != std::string::npos, word);
    const std::string w = dir.file("w.trace");
    const std::vector<std::vector<std::string>> wrong = {
        {}, {"plot"}, {"--frobnicate", w}, {w, "extra"}, {"replay", w, "--budgets", "0"},
        {"replay", w, "--budgets", "5,x"}, {"replay", w, "--budgets", "150%"}, {"replay", w, "--pages-per-unit"},
        {"plot", w, "--budgets", "5"}, {"summary", w, "--out", "x"}};
    for (const std::vector<std::string>& args : wrong) {
        CAPTURE(args.size());
        const Run r = run_tool(dir, args);
        CHECK(r.exit_code == 2);
        CHECK(r.err.find("usermm-trace: ") == 0);
    }
}

TEST_CASE("without gnuplot, plot and replay exit 3 naming the package; replay prints its table first") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    write_trace(dir.file("w.trace"), header(records.size(), 0, true), records);
    const Run plot = run_tool(dir, {"plot", dir.file("w.trace")}, "/nonexistent");
    CHECK(plot.exit_code == 3);
    CHECK(plot.err.find("gnuplot not found: apt-get install gnuplot-nox") != std::string::npos);
    CHECK(!std::filesystem::exists(dir.file("w-address.png")));
    const Run replay = run_tool(dir, {"replay", dir.file("w.trace")}, "/nonexistent");
    CHECK(replay.exit_code == 3);
    CHECK(replay.err.find("gnuplot not found") != std::string::npos);
    CHECK(replay_rows(replay.out).size() == 10);
}

TEST_CASE("plot draws the address and latency pictures as PNG files" * doctest::skip(!g_have_gnuplot)) {
    TempDir dir;
    SUBCASE("the default prefix is the file without its extension") {
        const std::vector<TraceRecord> records = workload();
        write_trace(dir.file("w.trace"), header(records.size(), 0, true), records);
        const Run r = run_tool(dir, {"plot", dir.file("w.trace")});
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        check_png(dir.file("w-address.png"));
        check_png(dir.file("w-latency.png"));
        CHECK(r.out.find("1 in ") == std::string::npos);
    }
    SUBCASE("--out, and a trace of more points than drawn is thinned and says so") {
        const std::vector<TraceRecord> records = workload(160);  // 236480 records, 233280 in arenas
        write_trace(dir.file("big.trace"), header(records.size(), 0, true), records);
        const Run r = run_tool(dir, {"plot", dir.file("big.trace"), "--out", dir.file("pics")});
        REQUIRE_MESSAGE(r.exit_code == 0, r.err);
        check_png(dir.file("pics-address.png"));
        check_png(dir.file("pics-latency.png"));
        CHECK(r.out.find("1 in 2 of 233280 faults") != std::string::npos);
    }
}

TEST_CASE("replay: OPT misses no more than LRU at every budget; with every page resident, only cold misses") {
    TempDir dir;
    const std::vector<TraceRecord> records = workload();
    write_trace(dir.file("w.trace"), header(records.size(), 0, true), records);
    const int drawn = g_have_gnuplot ? 0 : 3;
    SUBCASE("the default budgets, 5% to 100% of the distinct pages") {
        const std::size_t distinct = distinct_units(records, 1);
        const Run r = run_tool(dir, {"replay", dir.file("w.trace")});
        REQUIRE_MESSAGE(r.exit_code == drawn, r.err);
        CHECK(r.out.find(std::to_string(distinct) + " distinct pages in 2 arenas") != std::string::npos);
        CHECK(r.out.find("sees the faults, not every access") != std::string::npos);
        const std::vector<ReplayRow> rows = replay_rows(r.out);
        REQUIRE(rows.size() == 10);
        for (const ReplayRow& row : rows) {
            CAPTURE(row.budget);
            CHECK(row.misses.size() == 6);
            CHECK(row.misses.at("OPT") <= row.misses.at("LRU"));
            for (const auto& [policy, misses] : row.misses) CHECK(misses >= distinct);
        }
        CHECK(rows.front().budget == (distinct * 5 + 50) / 100);
        CHECK(rows.back().budget == distinct);
        for (const auto& [policy, misses] : rows.back().misses) {
            CAPTURE(policy);
            CHECK(misses == distinct);
        }
        if (g_have_gnuplot) check_png(dir.file("w-replay.png"));
    }
    SUBCASE("--budgets in units and percent, --pages-per-unit 32") {
        const std::size_t distinct = distinct_units(records, 32);
        const Run r = run_tool(dir, {"replay", dir.file("w.trace"), "--pages-per-unit", "32", "--budgets", "100%,1,3",
                                     "--out", dir.file("units")});
        REQUIRE_MESSAGE(r.exit_code == drawn, r.err);
        const std::vector<ReplayRow> rows = replay_rows(r.out);
        REQUIRE(rows.size() == 3);
        CHECK(rows[0].budget == 1);
        CHECK(rows[1].budget == 3);
        CHECK(rows[2].budget == distinct);
        for (const ReplayRow& row : rows) CHECK(row.misses.at("OPT") <= row.misses.at("LRU"));
        for (const auto& [policy, misses] : rows[2].misses) CHECK(misses == distinct);
        if (g_have_gnuplot) check_png(dir.file("units-replay.png"));
    }
}
