// Names of anonymous VMAs in /proc/self/maps ([anon:NAME], PR_SET_VMA_ANON_NAME). Where the kernel
// lacks CONFIG_ANON_VMA_NAME (the development VM's answers EINVAL) every case is skipped, and says
// so: usermm-stat is then where the names show.
#include <sys/mman.h>
#include <sys/prctl.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "test_util.hpp"

namespace {

using usermm_test::check_survived;
using usermm_test::ChildEnd;
using usermm_test::run_in_child;

const bool g_names = [] {
    const std::size_t page = usermm_test::os_page_size();
    void* p = mmap(nullptr, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    const bool ok = p != MAP_FAILED && prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, p, page, "probe") == 0;
    if (p != MAP_FAILED) munmap(p, page);
    if (!ok) std::fprintf(stderr, "test_vma_names: skipped, the kernel does not name anonymous memory (no CONFIG_ANON_VMA_NAME)\n");
    return ok;
}();

// The bytes of [lo, hi) that /proc/self/maps shows with `label`.
std::size_t bytes_labelled(const void* lo, const void* hi, const std::string& label) {
    std::ifstream maps("/proc/self/maps");
    std::size_t bytes = 0;
    for (std::string line; std::getline(maps, line);) {
        unsigned long from = 0, to = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx", &from, &to) != 2) continue;
        if (line.size() < label.size() || line.compare(line.size() - label.size(), label.size(), label) != 0) continue;
        const unsigned long a = std::max(from, reinterpret_cast<unsigned long>(lo));
        const unsigned long b = std::min(to, reinterpret_cast<unsigned long>(hi));
        if (a < b) bytes += b - a;
    }
    return bytes;
}

}  // namespace

// Every case runs in a child: the parent never sets usermm up, so each child reads its own
// environment (USERMM_MAP_BUDGET, USERMM_VMA_NAMES) at its first arena.
TEST_CASE("an anonymous VMA's name shows in /proc/self/maps over its whole range, and goes with unmap" *
          doctest::skip(!g_names)) {
    const ChildEnd end = run_in_child([] {
        const std::size_t page = usermm::page_size();
        usermm::Arena arena(64 << 20);
        auto* p = static_cast<char*>(arena.map(64 * page, usermm::Prot::ReadWrite, {.name = "orders-heap"}));
        p[5 * page] = 1;  // touched or not, the pages are the VMA's
        if (bytes_labelled(p, p + 64 * page, "[anon:orders-heap]") != 64 * page) _exit(3);
        auto* end_of_arena = static_cast<char*>(arena.base()) + arena.size();
        if (bytes_labelled(arena.base(), end_of_arena, "[anon:orders-heap]") != 64 * page) _exit(4);
        arena.verify();  // the mapping count includes the mappings the name keeps apart
        arena.unmap(p + 32 * page, 32 * page);
        if (bytes_labelled(p, p + 64 * page, "[anon:orders-heap]") != 32 * page) _exit(5);
        arena.verify();
        arena.unmap(p, 32 * page);
        if (bytes_labelled(p, p + 64 * page, "[anon:orders-heap]") != 0) _exit(6);
        arena.verify();
        if (usermm::process_stats().vma_names_dropped != 0) _exit(7);
    });
    check_survived(end);
}

TEST_CASE("a name the kernel refuses stays usermm's own, counted" * doctest::skip(!g_names)) {
    const ChildEnd end = run_in_child([] {
        const std::size_t page = usermm::page_size();
        usermm::Arena arena(16 << 20);
        auto* p = static_cast<char*>(arena.map(8 * page, usermm::Prot::ReadWrite, {.name = "cache[1]"}));
        p[0] = 1;
        if (arena.stats().vma_names_dropped != 1) _exit(3);
        if (bytes_labelled(p, p + 8 * page, "[anon:cache[1]]") != 0) _exit(4);
        if (!arena.find_vma("cache[1]")) _exit(5);
        arena.verify();
    });
    check_survived(end);
}

namespace {

// In a child whose environment says `variable=value`: an 8-page VMA named `name` has its name
// dropped `dropped` times, and /proc/self/maps shows no name for it.
ChildEnd name_with_environment(const char* variable, const char* value, const char* name, std::uint64_t dropped) {
    return run_in_child([=] {
        setenv(variable, value, 1);
        const std::size_t page = usermm::page_size();
        usermm::Arena arena(16 << 20);
        auto* p = static_cast<char*>(arena.map(8 * page, usermm::Prot::ReadWrite, {.name = name}));
        if (arena.stats().vma_names_dropped != dropped) _exit(3);
        if (bytes_labelled(p, p + 8 * page, std::string("[anon:") + name + "]") != 0) _exit(4);
    });
}

}  // namespace

TEST_CASE("names are dropped, counted, when the mapping budget is short; USERMM_VMA_NAMES=0 keeps them all" *
          doctest::skip(!g_names)) {
    check_survived(name_with_environment("USERMM_MAP_BUDGET", "2", "tight", 1));
    check_survived(name_with_environment("USERMM_VMA_NAMES", "0", "quiet", 0));
}
