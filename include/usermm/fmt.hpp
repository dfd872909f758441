// Makes usermm::Stats and usermm::Prot printable with fmt: fmt::print("{}", arena.stats()).
#pragma once

#include <fmt/format.h>

#include <usermm/usermm.hpp>

template <>
struct fmt::formatter<usermm::Stats> : fmt::formatter<std::string_view> {
    template <typename Context>
    auto format(const usermm::Stats& s, Context& ctx) const {
        return fmt::formatter<std::string_view>::format(usermm::format_stats(s), ctx);
    }
};

template <>
struct fmt::formatter<usermm::Prot> : fmt::formatter<std::string_view> {
    template <typename Context>
    auto format(usermm::Prot p, Context& ctx) const {
        return fmt::formatter<std::string_view>::format(usermm::to_string(p), ctx);
    }
};
