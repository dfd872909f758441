// Counters for people: Stats arithmetic and the table format_stats prints.
#include <fmt/format.h>

#include <usermm/usermm.hpp>

namespace usermm {

Stats& Stats::operator+=(const Stats& other) {
#define USERMM_STATS_ADD(name, doc) name += other.name;
    USERMM_STATS_FIELDS(USERMM_STATS_ADD)
#undef USERMM_STATS_ADD
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) latency[i] += other.latency[i];
    return *this;
}

std::string format_stats(const Stats& s) {
    std::string out;
    auto row = [&out](std::string_view name, std::uint64_t value, std::string_view doc) {
        fmt::format_to(std::back_inserter(out), "  {:<20} {:>14}  {}\n", name, value, doc);
    };
#define USERMM_STATS_ROW(name, doc) row(#name, s.name, doc);
    USERMM_STATS_FIELDS(USERMM_STATS_ROW)
#undef USERMM_STATS_ROW
    std::uint64_t total = 0;
    for (std::uint64_t n : s.latency) total += n;
    if (total == 0) return out;
    out += "  handler latency:\n";
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) {
        if (!s.latency[i]) continue;
        const std::string label = i == 0                     ? std::string("< 1 us")
                                  : i == kLatencyBuckets - 1 ? fmt::format(">= {} us", 1u << (i - 1))
                                                             : fmt::format("{}-{} us", 1u << (i - 1), 1u << i);
        fmt::format_to(std::back_inserter(out), "    {:>14} {:>14}  {:5.1f}%\n", label, s.latency[i],
                       100.0 * double(s.latency[i]) / double(total));
    }
    return out;
}

}  // namespace usermm
