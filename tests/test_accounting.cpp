// Accounting (invariant 5): every fault counted once, at every level, and in agreement with what
// the kernel itself counted for the same work.
#include <doctest/doctest.h>

#include <numeric>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

namespace {

// Under AddressSanitizer and ThreadSanitizer every access also touches shadow memory, whose first
// touches the kernel counts as minor faults of the same thread: there the kernel's count can only
// bound ours below.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool kKernelSeesOnlyUs = false;
#else
constexpr bool kKernelSeesOnlyUs = true;
#endif

// The kernel counts one fault per page too (its own first touch after usermm's mprotect), plus a
// little noise of its own.
void check_kernel_count(long kernel, std::size_t pages) {
    CHECK(kernel >= long(pages));
    if (kKernelSeesOnlyUs) CHECK(kernel <= long(pages + pages / 50 + 32));
}

std::uint64_t latency_total(const usermm::Stats& s) {
    return std::accumulate(s.latency.begin(), s.latency.end(), std::uint64_t(0));
}

// Delta of the kernel's minor faults and usermm's over `work`, for this thread.
template <typename Work>
std::pair<long, std::uint64_t> faults_of(usermm::Arena& arena, Work work) {
    // Warm the stack and the code of the loop before counting.
    work(true);
    const std::uint64_t ours = arena.stats().minor_faults;
    const long kernel = kernel_minor_faults();
    work(false);
    return {kernel_minor_faults() - kernel, arena.stats().minor_faults - ours};
}

}  // namespace

TEST_CASE("minor faults agree with the kernel's getrusage() for the same work") {
    usermm::Arena arena(1ull << 32);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 2000;

    SUBCASE("first writes") {
        char* p = static_cast<char*>(arena.map((kPages + 1) * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
        auto [kernel, ours] = faults_of(arena, [&](bool warmup) {
            for (std::size_t i = warmup ? 0 : 1; i < (warmup ? 1 : kPages + 1); ++i) write_byte(p + i * ps, 1);
        });
        CHECK(ours == kPages);
        check_kernel_count(kernel, kPages);
    }
    SUBCASE("first reads map the zero page") {
        char* p = static_cast<char*>(arena.map((kPages + 1) * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
        auto [kernel, ours] = faults_of(arena, [&](bool warmup) {
            for (std::size_t i = warmup ? 0 : 1; i < (warmup ? 1 : kPages + 1); ++i) (void)read_byte(p + i * ps);
        });
        CHECK(ours == kPages);
        check_kernel_count(kernel, kPages);
        CHECK(arena.stats().zero_page_reads == kPages + 1);
    }
    SUBCASE("fault-around: one usermm fault per window, one kernel fault per page") {
        char* p = static_cast<char*>(arena.map((kPages + 16) * ps, Prot::ReadWrite));
        auto [kernel, ours] = faults_of(arena, [&](bool warmup) {
            for (std::size_t i = warmup ? 0 : 16; i < (warmup ? 16 : kPages + 16); ++i) write_byte(p + i * ps, 1);
        });
        CHECK(ours == kPages / 16);
        check_kernel_count(kernel, kPages);
        const usermm::Stats s = arena.stats();
        CHECK(s.minor_faults + s.fault_around_pages == kPages + 16);
    }
}

TEST_CASE("counters add up across VMA, arena and process") {
    const usermm::Stats process_before = usermm::process_stats();
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* a = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.name = "a", .fault_around_pages = 1}));
    char* b = static_cast<char*>(arena.map(64 * ps, Prot::Read, {.name = "b", .fault_around_pages = 4}));
    for (std::size_t i = 0; i < 64; ++i) write_byte(a + i * ps, 1);
    for (std::size_t i = 0; i < 64; ++i) (void)read_byte(a + i * ps);
    for (std::size_t i = 0; i < 64; i += 2) (void)read_byte(b + i * ps);
    for (std::size_t i = 0; i < 8; ++i) (void)read_byte(a + i * ps);  // no fault: already resolved

    usermm::Stats sum;
    for (const auto& v : arena.vmas()) sum += v.stats;
    const usermm::Stats s = arena.stats();
    sum.resident_pages = s.resident_pages;  // a gauge of the arena's, not a sum of events
    CHECK(sum == s);
    CHECK(s.resident_pages == 64);  // the pages written; those only read map the zero page
    CHECK(s.minor_faults == 64 + 16);
    CHECK(s.write_faults == 64);
    CHECK(s.read_faults == 16);
    CHECK(s.zero_page_reads == 16);
    CHECK(s.fault_around_pages == 48);
    CHECK(latency_total(s) == s.minor_faults + s.spurious_faults);
    CHECK(s.handler_ns > 0);

    const usermm::Stats process = usermm::process_stats();
    CHECK(process.minor_faults - process_before.minor_faults == s.minor_faults);
    CHECK(process.write_faults - process_before.write_faults == s.write_faults);
}

TEST_CASE("merging VMAs keeps their counters; the arena's survive unmap") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(32 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    arena.protect(p + 16 * ps, 16 * ps, Prot::Read);
    REQUIRE(arena.vmas().size() == 2);
    for (std::size_t i = 0; i < 32; ++i) (void)read_byte(p + i * ps);
    arena.protect(p + 16 * ps, 16 * ps, Prot::ReadWrite);
    const auto vmas = arena.vmas();
    REQUIRE(vmas.size() == 1);
    CHECK(vmas[0].stats.minor_faults == 32);
    arena.unmap(p, 32 * ps);
    CHECK(arena.stats().minor_faults == 32);
    CHECK(arena.vmas().empty());
}
