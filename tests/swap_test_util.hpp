// Helpers shared by the reclaim and swap tests (test_swap, test_swap_stress): swap files on a
// disk, pages whose content names their index and version (so that a page read from the wrong
// slot, an old copy or a torn one shows), cluster-aligned VMAs, and the kernel's view of residency.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

namespace usermm_swap_test {

inline std::size_t page() { return std::size_t(sysconf(_SC_PAGESIZE)); }
// usermm reclaims aligned clusters of this many pages (the kernel's SWAP_CLUSTER_MAX).
inline constexpr std::size_t kCluster = 32;

// A swap file on a disk file system: $TMPDIR if set, else /var/tmp (a tmpfs would hold the
// swapped pages in memory).
inline std::string swap_path() {
    static int n = 0;
    const char* dir = std::getenv("TMPDIR");
    return fmt::format("{}/usermm-swap-{}-{}", dir && *dir ? dir : "/var/tmp", getpid(), n++);
}

inline std::uint64_t mix(std::uint64_t x) {
    x ^= x >> 31;
    x *= 0x9e3779b97f4a7c15ull;
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ull;
    return x ^ (x >> 32);
}

// Page `index` at `version`: word i is seed + i * an odd constant, the seed drawn from both (so
// every word differs between pages and versions); version 0 is a page never written, all zeros.
inline std::uint64_t seed_of(std::size_t index, std::uint64_t version) {
    return version == 0 ? 0 : mix((std::uint64_t(index) << 24) ^ version) | 1;
}
inline constexpr std::uint64_t kStep = 0x9e3779b97f4a7c15ull;

inline void fill(void* p, std::size_t index, std::uint64_t version) {
    const std::uint64_t seed = seed_of(index, version), step = version == 0 ? 0 : kStep;
    auto* w = static_cast<volatile std::uint64_t*>(p);
    for (std::size_t i = 0; i < page() / 8; ++i) w[i] = seed + i * step;
}

inline bool holds(const void* p, std::size_t index, std::uint64_t version) {
    const std::uint64_t seed = seed_of(index, version), step = version == 0 ? 0 : kStep;
    const auto* w = static_cast<const volatile std::uint64_t*>(p);
    for (std::size_t i = 0; i < page() / 8; ++i)
        if (w[i] != seed + i * step) return false;
    return true;
}

// The first word of a page as it is (for messages).
inline std::uint64_t first_word(const void* p) { return *static_cast<const volatile std::uint64_t*>(p); }

// A VMA of `pages` pages starting on a cluster boundary inside the arena, so that its clusters
// are whole and the tests know which pages share one.
inline char* map_aligned(usermm::Arena& arena, std::size_t pages, std::size_t offset_clusters = 0,
                         usermm::Prot prot = usermm::Prot::ReadWrite) {
    const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(arena.base());
    const std::uintptr_t span = kCluster * page();
    const std::uintptr_t at = (base + span - 1) / span * span + offset_clusters * span;
    return static_cast<char*>(arena.map(pages * page(), prot, {.address = reinterpret_cast<void*>(at)}));
}

// Pages of [p, p + pages * page()) the kernel holds in memory (mincore): what eviction released.
inline std::size_t kernel_resident(const void* p, std::size_t pages) {
    std::vector<unsigned char> v(pages);
    if (mincore(const_cast<void*>(p), pages * page(), v.data()) != 0) std::abort();
    std::size_t n = 0;
    for (unsigned char c : v) n += c & 1;
    return n;
}

// ArenaOptions set member by member: a designated initializer that leaves on_store_error out is
// -Wmissing-field-initializers, an error with the project's warnings (the member has no default
// member initializer).
inline usermm::ArenaOptions options(usermm::Store* store, std::size_t limit_pages = 0,
                                    usermm::Policy policy = usermm::Policy::S3Fifo) {
    usermm::ArenaOptions o;
    o.resident_limit = limit_pages * page();
    o.store = store;
    o.policy = policy;
    return o;
}

// The errno an API call threw as usermm::Error, or 0.
template <class F>
int error_of(F&& f) {
    try {
        f();
    } catch (const usermm::Error& e) {
        return e.code().value();
    }
    return 0;
}

// Stats differences, counter by counter.
inline usermm::Stats minus(const usermm::Stats& a, const usermm::Stats& b) {
    usermm::Stats d;
#define USERMM_SWAP_TEST_MINUS(name, doc) d.name = a.name - b.name;
    USERMM_STATS_FIELDS(USERMM_SWAP_TEST_MINUS)
#undef USERMM_SWAP_TEST_MINUS
    return d;
}

}  // namespace usermm_swap_test
