// The stats table for people: the compact default shows only what is non-zero, the full form shows
// everything, and in both the values line up whatever their width.
#include <doctest/doctest.h>

#include <fmt/format.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <usermm/fmt.hpp>
#include <usermm/usermm.hpp>

namespace {

using usermm::Stats;
using usermm::StatsFormat;

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);) out.push_back(line);
    return out;
}

// One row of the table: "  name ... value  description" (a counter) or "    label ... count  share"
// (a latency bucket, whose label may hold spaces: "< 1 us").
struct Row {
    std::string name;
    std::size_t value_end = 0;  // column after the value's last digit
    std::size_t text_start = 0;  // column of the description or (padded) share
};

// The value is the last run of digits followed by two spaces before the description.
Row parse_row(const std::string& line) {
    const std::size_t sep = line.find("  ", line.find_first_not_of(' '));
    std::size_t end = line.find_first_not_of(' ', sep);  // start of the value (after padding)
    REQUIRE_MESSAGE(end != std::string::npos, line);
    const std::size_t digits = line.find_first_not_of("0123456789", end);
    REQUIRE_MESSAGE(digits != std::string::npos, line);
    REQUIRE_MESSAGE(digits > end, line);
    Row r;
    r.name = line.substr(line.find_first_not_of(' '), sep - line.find_first_not_of(' '));
    r.value_end = digits;
    r.text_start = digits + 2;
    CHECK_MESSAGE(line.substr(digits, 2) == "  ", line);
    CHECK_MESSAGE(line.size() > r.text_start, line);
    return r;
}

// Every row (all lines but the latency header) has its value ending, and its text starting, at
// the same column as the first row's.
std::vector<Row> check_aligned(const std::string& table) {
    std::vector<Row> rows;
    for (const std::string& line : lines_of(table)) {
        if (line == "  handler latency:") continue;
        rows.push_back(parse_row(line));
    }
    REQUIRE(!rows.empty());
    for (const Row& r : rows) {
        CHECK_MESSAGE(r.value_end == rows.front().value_end, r.name, "\n", table);
        CHECK_MESSAGE(r.text_start == rows.front().text_start, r.name, "\n", table);
    }
    return rows;
}

Stats sample() {
    Stats s;
    s.minor_faults = 5;
    s.write_faults = 5;
    s.dirty_pages_collected = 123456;  // the longest counter name
    s.handler_ns = 987654321;
    s.latency[0] = 3;
    s.latency[3] = 2;
    return s;
}

}  // namespace

TEST_CASE("the compact form shows only the non-zero counters and latency buckets, aligned") {
    const std::string table = usermm::format_stats(sample());
    const std::vector<Row> rows = check_aligned(table);
    std::vector<std::string> names;
    for (const Row& r : rows) names.push_back(r.name);
    CHECK(names == std::vector<std::string>{"minor_faults", "write_faults", "dirty_pages_collected", "handler_ns",
                                            "< 1 us", "4-8 us"});
    CHECK(table.find("major_faults") == std::string::npos);
    CHECK(table.find("zero_page_reads") == std::string::npos);
    CHECK(table.find("  handler latency:\n") != std::string::npos);
    CHECK(table.find("123456  pages reported by collect_dirty()") != std::string::npos);
    CHECK(table.find("     3   60.0%") != std::string::npos);  // the share of a bucket, after its count
}

TEST_CASE("the compact form of all-zero counters says so in one line") {
    CHECK(usermm::format_stats(Stats{}) == "  all counters are zero\n");
}

TEST_CASE("the full form shows every counter in order and every latency bucket, aligned") {
    Stats s = sample();
    s.readahead_hits = std::numeric_limits<std::uint64_t>::max();  // 20 digits
    const std::string table = usermm::format_stats(s, StatsFormat::Full);
    const std::vector<Row> rows = check_aligned(table);
    std::vector<std::string> names;
#define NAME_OF(name, doc) names.push_back(#name);
    USERMM_STATS_FIELDS(NAME_OF)
#undef NAME_OF
    const std::size_t counters = names.size();
    REQUIRE(rows.size() == counters + usermm::kLatencyBuckets);
    for (std::size_t i = 0; i < counters; ++i) CHECK(rows[i].name == names[i]);
    CHECK(rows[counters].name == "< 1 us");
    CHECK(rows[counters + 1].name == "1-2 us");
    CHECK(rows.back().name == ">= 16384 us");
    CHECK(table.find("18446744073709551615  read-ahead pages") != std::string::npos);
    CHECK(table.find("                   0  faults that had to wait for I/O") != std::string::npos);
}

TEST_CASE("the full form of all-zero counters still shows every row") {
    const std::string table = usermm::format_stats(Stats{}, StatsFormat::Full);
    CHECK(check_aligned(table).size() == std::size_t(48) + usermm::kLatencyBuckets);
    CHECK(table.find("  0.0%") != std::string::npos);
}

TEST_CASE("fmt prints the compact form by default and the full one with {:full}") {
    const Stats s = sample();
    CHECK(fmt::format("{}", s) == usermm::format_stats(s));
    CHECK(fmt::format("{:compact}", s) == usermm::format_stats(s));
    CHECK(fmt::format("{:full}", s) == usermm::format_stats(s, StatsFormat::Full));
    CHECK_THROWS_AS((void)fmt::format(fmt::runtime("{:wide}"), s), fmt::format_error);
}
