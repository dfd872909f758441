// Fault traces (include/usermm/trace.hpp): the records of a known workload, exactly; a slow reader
// that drops records without holding up the faults; threads; USERMM_TRACE over a whole run of
// another program; a fork; and the pictures usermm-trace draws from a real trace.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"
#include <usermm/trace.hpp>

namespace {

using usermm::FaultEvent;
using usermm::TraceHeader;
using usermm::TraceRecord;
using usermm_test::TempDir;

struct Trace {
    TraceHeader header{};
    std::vector<TraceRecord> records;
};

Trace read_trace(const std::string& path) {
    Trace t;
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in.read(reinterpret_cast<char*>(&t.header), sizeof t.header));
    REQUIRE(std::memcmp(t.header.magic, usermm::kTraceMagic, sizeof t.header.magic) == 0);
    REQUIRE(t.header.version == usermm::kTraceVersion);
    REQUIRE(t.header.header_size == sizeof(TraceHeader));
    REQUIRE(t.header.record_size == sizeof(TraceRecord));
    for (TraceRecord r; in.read(reinterpret_cast<char*>(&r), sizeof r);) t.records.push_back(r);
    std::sort(t.records.begin(), t.records.end(), [](const TraceRecord& a, const TraceRecord& b) { return a.time_ns < b.time_ns; });
    return t;
}

unsigned access_of(const TraceRecord& r) { return unsigned(r.flags & usermm::kTraceAccessMask) >> 1; }

int run(const std::string& command) {
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#ifdef USERMM_TRACE_BIN
bool is_png(const std::string& path, std::uint32_t* width, std::uint32_t* height) {
    std::ifstream in(path, std::ios::binary);
    unsigned char head[24];
    if (!in.read(reinterpret_cast<char*>(head), sizeof head)) return false;
    static constexpr unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (std::memcmp(head, sig, 8) != 0 || std::memcmp(head + 12, "IHDR", 4) != 0) return false;
    *width = std::uint32_t(head[16]) << 24 | std::uint32_t(head[17]) << 16 | std::uint32_t(head[18]) << 8 | head[19];
    *height = std::uint32_t(head[20]) << 24 | std::uint32_t(head[21]) << 16 | std::uint32_t(head[22]) << 8 | head[23];
    return true;
}
#endif

}  // namespace

TEST_CASE("a trace of a known workload holds exactly its faults, in order, with their addresses") {
    const std::size_t page = usermm::page_size();
    constexpr std::size_t kPages = 200;
    TempDir dir;
    const std::string path = dir.path() + "/known.trace";
    usermm::Arena arena(16 << 20);
    auto* p = static_cast<volatile char*>(
        arena.map(kPages * page, usermm::Prot::ReadWrite, {.name = "known", .fault_around_pages = 1}));
    usermm::start_trace(path);
    for (std::size_t i = 0; i < kPages; ++i) (void)p[i * page];
    for (std::size_t i = 0; i < kPages; ++i) p[i * page] = 1;
    const usermm::TraceStats s = usermm::stop_trace();
    CHECK(s.records == 2 * kPages);
    CHECK(s.dropped == 0);
    const Trace t = read_trace(path);
    CHECK(t.header.closed == 1);
    CHECK(t.header.records == 2 * kPages);
    CHECK(t.header.dropped == 0);
    CHECK(t.header.pid == std::uint32_t(getpid()));
    CHECK(t.header.page_size == page);
    REQUIRE(t.records.size() == 2 * kPages);
    const auto base = reinterpret_cast<std::uint64_t>(arena.base());
    const auto start = reinterpret_cast<std::uint64_t>(p);
    const auto tid = std::uint32_t(gettid());
    for (std::size_t i = 0; i < 2 * kPages; ++i) {
        const TraceRecord& r = t.records[i];
        INFO("record " << i);
        const bool read = i < kPages;
        CHECK(r.address == start + (i % kPages) * page);
        CHECK(r.vma_start == start);
        CHECK(r.arena_base == base);
        CHECK(r.event == std::uint8_t(read ? FaultEvent::ZeroRead : FaultEvent::Upgrade));
        CHECK(access_of(r) == (read ? 0u : 1u));
        CHECK((r.flags & usermm::kTraceMajor) == 0);
        CHECK(r.pages == 1);
        CHECK(r.tid == tid);
        CHECK(r.latency_ns > 0);
        if (i) CHECK(r.time_ns >= t.records[i - 1].time_ns + t.records[i - 1].latency_ns);
    }
    CHECK(usermm::trace_stats().records == 0);  // no trace now
}

TEST_CASE("a slow reader drops records, counted, and never holds up the faulting thread") {
    const std::size_t page = usermm::page_size();
    constexpr std::size_t kPages = 1000, kRing = 64;
    TempDir dir;
    const std::string path = dir.path() + "/slow.trace";
    usermm::Arena arena(16 << 20);
    auto* p = static_cast<volatile char*>(
        arena.map(kPages * page, usermm::Prot::ReadWrite, {.fault_around_pages = 1}));
    // The drainer sleeps for a minute: the ring fills after 64 faults and the rest are dropped.
    usermm::start_trace(path, {.ring_records = kRing, .drain_interval_ms = 60000});
    for (std::size_t i = 0; i < kPages; ++i) p[i * page] = 1;
    const usermm::TraceStats live = usermm::trace_stats();
    CHECK(live.records == 0);
    CHECK(live.dropped == kPages - kRing);
    const usermm::TraceStats s = usermm::stop_trace();
    CHECK(s.records == kRing);
    CHECK(s.dropped == kPages - kRing);
    const Trace t = read_trace(path);
    CHECK(t.header.dropped == kPages - kRing);
    REQUIRE(t.records.size() == kRing);
    // The ring kept the first records; the later ones found it full.
    for (std::size_t i = 0; i < kRing; ++i) CHECK(t.records[i].address == reinterpret_cast<std::uint64_t>(p) + i * page);
}

TEST_CASE("threads record into rings of their own; every fault of every thread is in the file") {
    const std::size_t page = usermm::page_size();
    constexpr std::size_t kThreads = 4, kPages = 2000;
    TempDir dir;
    const std::string path = dir.path() + "/threads.trace";
    usermm::Arena arena(64 << 20);
    auto* p = static_cast<volatile char*>(
        arena.map(kThreads * kPages * page, usermm::Prot::ReadWrite, {.fault_around_pages = 1}));
    // A short drain interval and small rings: the drainer empties rings while the threads fill them.
    usermm::start_trace(path, {.ring_records = 4096, .drain_interval_ms = 1});
    std::barrier go(kThreads);
    std::vector<std::thread> threads;
    std::vector<std::uint32_t> tids(kThreads);
    for (std::size_t k = 0; k < kThreads; ++k)
        threads.emplace_back([&, k] {
            tids[k] = std::uint32_t(gettid());
            go.arrive_and_wait();
            for (std::size_t i = 0; i < kPages; ++i) p[(k * kPages + i) * page] = 1;
        });
    for (auto& t : threads) t.join();
    const usermm::TraceStats s = usermm::stop_trace();
    const Trace t = read_trace(path);
    CHECK(s.records + s.dropped == kThreads * kPages);
    CHECK(t.records.size() == s.records);
    std::map<std::uint32_t, std::set<std::uint64_t>> by_thread;
    for (const TraceRecord& r : t.records) by_thread[r.tid].insert(r.address);
    for (std::size_t k = 0; k < kThreads; ++k) {
        INFO("thread " << k);
        const auto& got = by_thread[tids[k]];
        for (std::uint64_t a : got) {
            CHECK(a >= reinterpret_cast<std::uint64_t>(p) + k * kPages * page);
            CHECK(a < reinterpret_cast<std::uint64_t>(p) + (k + 1) * kPages * page);
        }
    }
    if (s.dropped == 0) {
        CHECK(t.records.size() == kThreads * kPages);
    } else {
        MESSAGE(s.dropped << " records dropped: the drainer did not keep up on this machine");
    }
}

TEST_CASE("start_trace refuses a second trace and a path it cannot create; stop without a trace is a no-op") {
    TempDir dir;
    CHECK(usermm::stop_trace().records == 0);
    CHECK_THROWS_WITH_AS(usermm::start_trace(dir.path() + "/no/such/dir/x.trace"),
                         doctest::Contains("usermm::start_trace: cannot create"), usermm::Error);
    CHECK_THROWS_WITH_AS(usermm::start_trace(dir.path() + "/x.trace", {.ring_records = 0}),
                         doctest::Contains("ring_records 0"), usermm::Error);
    usermm::start_trace(dir.path() + "/a.trace");
    CHECK_THROWS_WITH_AS(usermm::start_trace(dir.path() + "/b.trace"), doctest::Contains("already being recorded"),
                         usermm::Error);
    CHECK(usermm::stop_trace().dropped == 0);
    CHECK_FALSE(std::filesystem::exists(dir.path() + "/b.trace"));
}

TEST_CASE("a forked child's faults are not written into its parent's trace") {
    const std::size_t page = usermm::page_size();
    TempDir dir;
    const std::string path = dir.path() + "/fork.trace";
    usermm::Arena arena(16 << 20);
    auto* p = static_cast<volatile char*>(arena.map(64 * page, usermm::Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm::start_trace(path);
    p[0] = 1;
    const usermm_test::ChildEnd end = usermm_test::run_in_child([&] {
        for (std::size_t i = 1; i < 64; ++i) p[i * page] = 1;
        if (usermm::trace_stats().records != 0 || usermm::stop_trace().records != 0) _exit(3);
    });
    CHECK(end.exited);
    CHECK(end.exit_code == 0);
    p[page] = 1;
    const usermm::TraceStats s = usermm::stop_trace();
    CHECK(s.records == 2);
    const Trace t = read_trace(path);
    REQUIRE(t.records.size() == 2);
    for (const TraceRecord& r : t.records) CHECK(r.tid == std::uint32_t(getpid()));
}

TEST_CASE("USERMM_TRACE records a whole run of another program, one record for every fault it counted") {
    TempDir dir;
    const std::string stats = dir.path() + "/stats";
    // "%p": the file is named for the process that wrote it.
    REQUIRE(run("USERMM_TRACE=" + dir.path() + "/mix-%p.trace " + USERMM_FAULT_MIX + " " + stats + " " + dir.path()) == 0);
    std::vector<std::string> traces;
    for (const auto& e : std::filesystem::directory_iterator(dir.path()))
        if (e.path().extension() == ".trace") traces.push_back(e.path().string());
    REQUIRE(traces.size() == 1);
    const std::string trace = traces[0];
    std::map<std::string, std::uint64_t> counted;
    {
        std::ifstream in(stats);
        std::string name;
        std::uint64_t v;
        while (in >> name >> v) counted[name] = v;
    }
    const Trace t = read_trace(trace);
    CHECK(trace == dir.path() + "/mix-" + std::to_string(t.header.pid) + ".trace");
    CHECK(t.header.closed == 1);
    CHECK(t.header.records == t.records.size());
    REQUIRE(t.header.dropped == 0);
    std::map<unsigned, std::uint64_t> by_event;
    std::uint64_t majors = 0, copied = 0;
    for (const TraceRecord& r : t.records) {
        ++by_event[r.event];
        majors += (r.flags & usermm::kTraceMajor) != 0;
        copied += (r.flags & usermm::kTraceCopied) != 0;
    }
    auto n = [&](FaultEvent e) { return by_event[unsigned(e)]; };
    const std::uint64_t not_resolved =
        n(FaultEvent::Spurious) + n(FaultEvent::Foreign) + n(FaultEvent::AccessError) + n(FaultEvent::StackOverflow);
    CHECK(t.records.size() - not_resolved == counted["minor_faults"] + counted["major_faults"]);
    CHECK(majors == counted["major_faults"]);
    CHECK(n(FaultEvent::ZeroRead) == counted["zero_page_reads"]);
    CHECK(copied == counted["cow_faults"]);
    CHECK(copied > 0);
    CHECK(n(FaultEvent::None) == 0);
    CHECK(n(FaultEvent::StackGrow) == counted["stack_growth_faults"]);
    CHECK(n(FaultEvent::Spurious) == counted["spurious_faults"]);
    CHECK(n(FaultEvent::SwapIn) > 0);
    CHECK(n(FaultEvent::FileReadMajor) > 0);

#ifdef USERMM_TRACE_BIN
    // usermm-trace draws the trace: real PNG files of a real size.
    const std::string prefix = dir.path() + "/mix";
    // gnuplot is one of the test command's dependencies (scripts/install-deps.sh): its absence fails here.
    REQUIRE(run(std::string(USERMM_TRACE_BIN) + " plot " + trace + " --out " + prefix + " > /dev/null") == 0);
    for (const char* suffix : {"-address.png", "-latency.png"}) {
        INFO(suffix);
        std::uint32_t w = 0, h = 0;
        REQUIRE(is_png(prefix + suffix, &w, &h));
        CHECK(w > 100);
        CHECK(h > 100);
        CHECK(std::filesystem::file_size(prefix + suffix) > 5000);
    }
#endif
}
