// usermm-demo far: far memory on memcached servers started on loopback (demo/far_demo.cpp).
#pragma once

#include <cstddef>

namespace fardemo {

constexpr std::size_t kDefaultTableMib = 2048;
constexpr std::size_t kDefaultLimitMib = 256;
constexpr std::size_t kDefaultTierMib = 128;

int run(std::size_t table_mib, std::size_t limit_mib, std::size_t tier_mib);

}  // namespace fardemo
