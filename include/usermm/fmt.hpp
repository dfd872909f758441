// Makes usermm::Stats and usermm::Prot printable with fmt: fmt::print("{}", arena.stats()) prints
// the compact table (the non-zero counters), fmt::print("{:full}", arena.stats()) every counter.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <string_view>

#include <usermm/usermm.hpp>

template <>
struct fmt::formatter<usermm::Stats> {
    usermm::StatsFormat format_ = usermm::StatsFormat::Compact;

    constexpr auto parse(fmt::format_parse_context& ctx) {
        auto it = ctx.begin();
        auto end = it;
        while (end != ctx.end() && *end != '}') ++end;
        const std::string_view spec(it, std::size_t(end - it));
        if (spec == "full")
            format_ = usermm::StatsFormat::Full;
        else if (!spec.empty() && spec != "compact")
            throw fmt::format_error("usermm::Stats: the format spec must be empty, 'compact' or 'full'");
        return end;
    }

    template <typename Context>
    auto format(const usermm::Stats& s, Context& ctx) const {
        const std::string table = usermm::format_stats(s, format_);
        return std::copy(table.begin(), table.end(), ctx.out());
    }
};

template <>
struct fmt::formatter<usermm::Prot> : fmt::formatter<std::string_view> {
    template <typename Context>
    auto format(usermm::Prot p, Context& ctx) const {
        return fmt::formatter<std::string_view>::format(usermm::to_string(p), ctx);
    }
};
