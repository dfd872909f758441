// Counters for people: Stats arithmetic and the table format_stats prints.
#include <fmt/format.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

namespace usermm {

Stats& Stats::operator+=(const Stats& other) {
#define USERMM_STATS_ADD(name, doc) name += other.name;
    USERMM_STATS_FIELDS(USERMM_STATS_ADD)
#undef USERMM_STATS_ADD
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) latency[i] += other.latency[i];
    return *this;
}

namespace {

std::string bucket_label(std::size_t i) {
    if (i == 0) return "< 1 us";
    if (i == kLatencyBuckets - 1) return fmt::format(">= {} us", 1u << (i - 1));
    return fmt::format("{}-{} us", 1u << (i - 1), 1u << i);
}

struct Row {
    std::string_view indent;
    std::string name;
    std::uint64_t value;
    std::string text;
};

}  // namespace

// The rows are collected first so that the columns fit the longest name and the widest value
// shown: every value ends, and every description starts, at the same column.
std::string format_stats(const Stats& s, StatsFormat format) {
    const bool full = format == StatsFormat::Full;
    std::vector<Row> rows;
#define USERMM_STATS_ROW(name, doc) \
    if (full || s.name) rows.push_back({"  ", #name, s.name, doc});
    USERMM_STATS_FIELDS(USERMM_STATS_ROW)
#undef USERMM_STATS_ROW
    std::uint64_t total = 0;
    for (std::uint64_t n : s.latency) total += n;
    const std::size_t counters = rows.size();
    for (std::size_t i = 0; i < kLatencyBuckets; ++i)
        if (full || s.latency[i])
            rows.push_back({"    ", bucket_label(i), s.latency[i],
                            fmt::format("{:5.1f}%", total ? 100.0 * double(s.latency[i]) / double(total) : 0.0)});
    if (rows.empty()) return "  all counters are zero\n";

    std::size_t name_width = 0, value_width = 0;
    for (const Row& r : rows) {
        name_width = std::max(name_width, r.indent.size() + r.name.size());
        value_width = std::max(value_width, fmt::formatted_size("{}", r.value));
    }
    std::string out;
    for (std::size_t i = 0; i < rows.size(); ++i) {
        const Row& r = rows[i];
        if (i == counters) out += "  handler latency:\n";
        fmt::format_to(std::back_inserter(out), "{}{:<{}}  {:>{}}  {}\n", r.indent, r.name,
                       name_width - r.indent.size(), r.value, value_width, r.text);
    }
    return out;
}

}  // namespace usermm
