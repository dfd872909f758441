// usermm's USDT probes: present in the library, and counted by perf exactly as usermm counts the
// same faults. The workload is tests/workloads/fault_mix.cpp, a program of its own (usermm is
// linked into it, so its ELF file holds the probes perf attaches to).
//
// perf needs root (or perf_event_paranoid and tracefs access), the uprobe PMU and tracefs; where
// `perf probe` cannot add the probes, the perf case is skipped, and says why.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"
#include <usermm/trace.hpp>

namespace {

const std::vector<std::string> kApiProbes = {"snapshot_begin", "snapshot_end", "restore_begin", "restore_end",
                                             "collect_dirty_begin", "collect_dirty_end", "sync_begin", "sync_end",
                                             "evict", "direct_reclaim", "snapshot_copy", "major_fault"};

std::vector<std::string> fault_probes() {
    std::vector<std::string> names;
    for (unsigned e = 1; e < usermm::kFaultEventCount; ++e) names.emplace_back(usermm::fault_event_name(usermm::FaultEvent(e)));
    return names;
}

std::string run_capture(const std::string& command, int* status) {
    std::string out;
    if (std::FILE* p = popen((command + " 2>&1").c_str(), "r")) {
        char buf[4096];
        for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
        *status = pclose(p);
    } else {
        *status = -1;
    }
    return out;
}

// The probes perf can count: added once for the whole file, removed at exit.
struct PerfProbes {
    bool ready = false;
    std::string why;
    PerfProbes() {
        int status = 0;
        run_capture("perf --version", &status);
        if (status != 0) {
            why = "perf is not installed (Debian: linux-perf)";
            return;
        }
        run_capture("perf probe -q -d 'sdt_usermm:*'", &status);  // left by an earlier run that died
        std::string add = std::string("perf buildid-cache --add ") + USERMM_FAULT_MIX + " && perf probe -x " + USERMM_FAULT_MIX;
        for (const std::string& n : fault_probes()) add += " -a sdt_usermm:" + n;
        for (const std::string& n : kApiProbes) add += " -a sdt_usermm:" + n;
        const std::string out = run_capture(add, &status);
        if (status != 0) {
            why = "perf probe cannot add uprobes here: " + out.substr(0, 300);
            return;
        }
        ready = true;
    }
    ~PerfProbes() {
        if (!ready) return;
        int status = 0;
        run_capture("perf probe -q -d 'sdt_usermm:*'", &status);
    }
};

const PerfProbes& perf_probes() {
    static PerfProbes p;
    return p;
}

const bool g_perf_ready = [] {
    const PerfProbes& p = perf_probes();
    if (!p.ready) std::fprintf(stderr, "test_probes: the perf case is skipped: %s\n", p.why.c_str());
    return p.ready;
}();

std::map<std::string, std::uint64_t> read_pairs(const std::string& path) {
    std::map<std::string, std::uint64_t> m;
    std::ifstream in(path);
    std::string name;
    std::uint64_t v;
    while (in >> name >> v) m[name] = v;
    return m;
}

// perf stat -x, lines: "count,unit,event,...", or "<not counted>,..." for an event that never fired.
std::map<std::string, std::uint64_t> read_perf_csv(const std::string& path) {
    std::map<std::string, std::uint64_t> m;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
        std::vector<std::string> fields;
        std::stringstream ss(line);
        for (std::string f; std::getline(ss, f, ',');) fields.push_back(f);
        if (fields.size() < 3) continue;
        const std::string prefix = "sdt_usermm:";
        if (fields[2].rfind(prefix, 0) != 0) continue;
        const std::string name = fields[2].substr(prefix.size());
        m[name] = fields[0].find_first_not_of("0123456789") == std::string::npos ? std::stoull(fields[0]) : 0;
    }
    return m;
}

}  // namespace

TEST_CASE("the library holds a probe for every fault event and for reclaim, snapshots, collect_dirty and sync") {
#ifndef USERMM_TEST_HAVE_SDT
    MESSAGE("built without <sys/sdt.h>: usermm has no probes");
    return;
#else
    // The library as built (static or shared): a program linked statically keeps only the objects
    // it calls, and with them their probes.
    const std::string object = USERMM_LIBRARY;
    int status = 0;
    const std::string notes = run_capture("readelf -n '" + object + "'", &status);
    REQUIRE(status == 0);
    std::set<std::string> found;
    std::istringstream in(notes);
    std::string provider;
    for (std::string line; std::getline(in, line);) {
        if (const auto p = line.find("Provider: "); p != std::string::npos) provider = line.substr(p + 10);
        if (const auto p = line.find("Name: "); p != std::string::npos && provider == "usermm") found.insert(line.substr(p + 6));
    }
    for (const std::string& n : fault_probes()) CHECK_MESSAGE(found.count(n) == 1, "no probe usermm:", n);
    for (const std::string& n : kApiProbes) CHECK_MESSAGE(found.count(n) == 1, "no probe usermm:", n);
    CHECK(found.size() == fault_probes().size() + kApiProbes.size());
#endif
}

TEST_CASE("perf counts each probe as often as usermm counts the faults it marks" * doctest::skip(!g_perf_ready)) {
    const usermm_test::TempDir tmp;
    const std::string& dir = tmp.path();
    const std::string stats = dir + "/stats", csv = dir + "/perf.csv";
    std::string events;
    for (const std::string& n : fault_probes()) events += (events.empty() ? "" : ",") + ("sdt_usermm:" + n);
    for (const std::string& n : kApiProbes) events += ",sdt_usermm:" + n;
    int status = 0;
    const std::string out = run_capture("perf stat -x, -o " + csv + " -e " + events + " -- " + USERMM_FAULT_MIX + " " +
                                            stats + " " + dir,
                                        &status);
    INFO(out);
    REQUIRE(status == 0);
    const auto usermm = read_pairs(stats);
    const auto perf = read_perf_csv(csv);
    REQUIRE(usermm.count("minor_faults"));
    REQUIRE(perf.size() == fault_probes().size() + kApiProbes.size());
    auto p = [&](const char* name) { return perf.at(name); };
    auto u = [&](const char* name) { return usermm.at(name); };

    std::uint64_t resolved = 0;
    for (const std::string& n : fault_probes())
        if (n != "spurious" && n != "foreign" && n != "access_error" && n != "stack_overflow") resolved += perf.at(n);
    CHECK(resolved == u("minor_faults") + u("major_faults"));
    CHECK(p("zero_read") == u("zero_page_reads"));
    CHECK(p("snapshot_copy") == u("cow_faults"));
    CHECK(p("major_fault") == u("major_faults"));
    CHECK(p("stack_grow") == u("stack_growth_faults"));
    CHECK(p("hinting") == u("hinting_faults"));
    CHECK(p("degraded") == u("degraded_faults"));
    CHECK(p("spurious") == u("spurious_faults"));
    CHECK(p("foreign") == u("foreign_faults"));
    CHECK(p("access_error") == u("access_errors"));
    CHECK(p("stack_overflow") == u("stack_overflows"));
    CHECK(p("direct_reclaim") == u("direct_reclaims") + u("reclaim_stalls"));
    CHECK(p("snapshot_begin") == u("snapshots"));
    CHECK(p("snapshot_end") == u("snapshots"));
    CHECK(p("collect_dirty_begin") == u("collects"));
    CHECK(p("collect_dirty_end") == u("collects"));
    // The workload reaches every kind it means to: a probe that never fired compared equal to a
    // counter that stayed zero would prove nothing.
    for (const char* name : {"zero_read", "anon_write", "upgrade", "snapshot_copy", "major_fault", "file_read_major",
                             "file_read_minor", "swap_in", "stack_grow"})
        CHECK_MESSAGE(p(name) > 0, name, " never fired");
    CHECK(p("evict") > 0);
    CHECK(u("pages_swapped_out") > 0);
}
