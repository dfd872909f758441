// The kernel's limits on mappings, met head-on: usermm's count of the kernel mappings an arena
// consists of is exact (verify() compares it with /proc/self/maps), and a kernel that refuses
// another mapping (vm.max_map_count, used up by usermm or by the program itself) makes faults
// degrade, never die, while anything can be done.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <sys/resource.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <usermm/usermm.hpp>

#include "map_budget.hpp"
#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

TEST_CASE("verify() compares usermm's count of kernel mappings with the kernel's") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.fault_around_pages = 16}));
    write_byte(p, 1);  // pages [0, 16) become writable: the arena is two kernel mappings
    arena.verify();
    // A VMA flag the protections cannot show splits the kernel mapping in three behind usermm's back.
    REQUIRE(madvise(p + 4 * ps, ps, MADV_DONTDUMP) == 0);
    try {
        arena.verify();
        FAIL("verify() passed with a kernel mapping usermm does not know of");
    } catch (const usermm::Error& e) {
        const std::string what = e.what();
        INFO(what);
        CHECK(what.find("the kernel has 4 mappings") != std::string::npos);
        CHECK(what.find("usermm counts 2") != std::string::npos);
    }
    REQUIRE(madvise(p + 4 * ps, ps, MADV_DODUMP) == 0);  // the kernel merges the pieces again
    arena.verify();
}

TEST_CASE("the count stays exact in a forked child, where pieces split after the fork merge again") {
    usermm::Arena arena(1ull << 30);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(1024 * ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    for (std::size_t i = 0; i < 1024; i += 64) write_byte(p + i * ps, std::uint8_t(i));
    arena.verify();
    const ChildEnd end = run_in_child([&] {
        arena.verify();
        // New pieces in the child: a write in the middle of a PROT_NONE piece splits it in three,
        // and taking the page's access away again merges them (they share the child's anon_vma).
        write_byte(p + 32 * ps, 7);
        arena.verify();
        arena.protect(p + 32 * ps, ps, Prot::None);
        arena.verify();
        arena.protect(p + 32 * ps, ps, Prot::ReadWrite);
        // The pieces inherited from the parent never merge, whatever their protections become.
        arena.protect(p, 1024 * ps, Prot::Read);
        arena.verify();
        if (read_byte(p + 64 * ps) != 64) std::_Exit(3);
    });
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
    arena.verify();
}

namespace {

// Scattered reads and writes over the VMA, each page's value derived from its index; then all
// are checked. Exits 3 on wrong data. `written` has room for `touches` entries already (with no
// mapping to spare, growing it could fail).
void scattered_touches(char* p, std::size_t pages, std::size_t touches, std::uint64_t seed,
                       std::vector<std::size_t>& written) {
    const std::size_t ps = usermm::page_size();
    std::mt19937_64 rng(seed);
    for (std::size_t i = 0; i < touches; ++i) {
        const std::size_t page = 1 + rng() % (pages - 2);
        if (i % 3 == 0) {
            if (read_u64(p + page * ps + 16) != 0 && read_u64(p + page * ps + 16) != page * 31 + 7) std::_Exit(3);
        } else {
            write_u64(p + page * ps + 16, page * 31 + 7);
            written.push_back(page);
        }
    }
    for (std::size_t page : written)
        if (read_u64(p + page * ps + 16) != page * 31 + 7) std::_Exit(3);
}

}  // namespace

TEST_CASE("the program uses up vm.max_map_count after the first arena: first touches degrade, never die") {
    const ChildEnd end = run_in_child(
        [] {
            const std::size_t ps = usermm::page_size();
            constexpr std::size_t kPages = 65536;  // 256 MiB, the whole arena
            usermm::Arena arena(kPages * ps);
            char* p = static_cast<char*>(arena.map(kPages * ps, Prot::ReadWrite, {.name = "heap"}));
            // A few pages written, then guarded for a while: they keep their data but lose their
            // access, so the arena is one PROT_NONE kernel mapping of pages in different states.
            for (std::size_t i = 0; i < 16; ++i) write_u64(p + i * 4000 * ps + 16, i * 4000 * 31 + 7);
            arena.protect(p, kPages * ps, Prot::None);
            arena.protect(p, kPages * ps, Prot::ReadWrite);
            std::vector<std::size_t> written;
            written.reserve(3000);
            const std::vector<void*> mine = use_up_mappings(8);
            scattered_touches(p, kPages, 3000, 5, written);
            for (std::size_t i = 1; i < 16; ++i)
                if (read_u64(p + i * 4000 * ps + 16) != i * 4000 * 31 + 7) std::_Exit(4);
            if (arena.stats().degraded_faults == 0) std::_Exit(5);
            // The refusal lowered the budget to what usermm held: later faults degrade first.
            if (usermm::detail::map_budget_limit() > usermm::detail::map_budget_used()) std::_Exit(6);
            for (void* m : mine) munmap(m, ps);
            arena.verify();
        },
        60);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

TEST_CASE("at vm.max_map_count, a first touch that needs a split dies naming the limit and the VMA") {
    const ChildEnd end = run_in_child(
        [] {
            const std::size_t ps = usermm::page_size();
            usermm::Arena arena(1ull << 30);
            // Untouched, in the middle of the reservation: its pages share one kernel mapping with
            // the holes on either side, so any grant inside it must split that mapping.
            char* want = static_cast<char*>(arena.base()) + (1ull << 29);
            char* p = static_cast<char*>(arena.map(64 * ps, Prot::ReadWrite, {.name = "lonely", .address = want}));
            const std::vector<void*> mine = use_up_mappings(0);
            write_u64(p + 5 * ps, 1);
            std::_Exit(9);
        },
        60);
    INFO(end.err);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("vm.max_map_count (") != std::string::npos);
    CHECK(end.err.find("VMA 'lonely' [0x") != std::string::npos);
}

TEST_CASE("a budget of 5,000 and 20,000 sparse writes in 8 GiB: the count stays exact") {
    const ChildEnd end = run_in_child(
        [] {
            // As USERMM_MAP_BUDGET=5000 would, had this process not made its first arena already.
            (void)usermm::page_size();  // the process set-up, which sets the budget, is done
            usermm::detail::map_budget_set_limit(usermm::detail::map_budget_used() + 5000);
            const std::size_t ps = usermm::page_size();
            usermm::Arena arena(8ull << 30);
            char* p = static_cast<char*>(arena.map(8ull << 30, Prot::ReadWrite, {.name = "sparse"}));
            std::mt19937_64 rng(99);
            for (int i = 0; i < 20000; ++i) write_u64(p + (rng() % ((8ull << 30) / ps)) * ps, 1);
            arena.verify();
            for (int i = 0; i < 20000; ++i) (void)read_u64(p + (rng() % ((8ull << 30) / ps)) * ps);
            arena.verify();
            if (arena.stats().degraded_faults == 0) std::_Exit(5);
        },
        60);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

// The PTE table of a 64 TiB arena is 32 GiB, all but a page of it never touched: verify() and
// unmap must skip what was never touched rather than read 16 G entries of zeros (which took 45 s
// and 17 s). The child's alarm turns minutes into a failure; no timing is asserted.
TEST_CASE("verify() and unmap of a 64 TiB arena with one page touched cost what was touched" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    const ChildEnd end = run_in_child(
        [] {
            constexpr std::size_t kSize = 64ull << 40;
            usermm::Arena arena(kSize);
            char* p = static_cast<char*>(arena.map(kSize, Prot::ReadWrite, {.name = "huge"}));
            write_u64(p + (kSize / 3 & ~std::size_t(0xfff)), 5);
            arena.verify();
            arena.unmap(p, kSize);
            arena.verify();
        },
        30);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

namespace {

// The private writable memory the kernel counts against RLIMIT_DATA now (VmData), in bytes.
std::uint64_t data_vm() {
    FILE* f = std::fopen("/proc/self/status", "r");
    char line[256];
    std::uint64_t kib = 0;
    while (f && std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "VmData: %lu kB", &kib) == 1) break;
    if (f) std::fclose(f);
    return kib << 10;
}

void limit_data(std::uint64_t bytes) {
    const rlimit rl{bytes, bytes};
    if (setrlimit(RLIMIT_DATA, &rl) != 0) std::_Exit(21);
}

}  // namespace

TEST_CASE("RLIMIT_DATA: an arena's reservation is not counted, the pages granted write access are" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    const ChildEnd end = run_in_child([] {
        const std::size_t ps = usermm::page_size();
        limit_data(data_vm() + (512ull << 20));
        usermm::Arena arena(1ull << 30);  // PROT_NONE from the start: not data
        char* p = static_cast<char*>(arena.map(1ull << 30, Prot::ReadWrite, {.name = "data"}));
        for (std::size_t off = 0; off < (64ull << 20); off += ps) write_u64(p + off, off);
        const std::uint64_t before = data_vm();
        for (std::size_t off = 0; off < (64ull << 20); off += ps) (void)read_u64(p + (512ull << 20) + off);
        if (data_vm() != before) std::_Exit(3);  // read access is not counted
        write_u64(p + (256ull << 20), 1);
        if (data_vm() != before + 16 * ps) std::_Exit(4);  // a write's fault-around window is
        arena.verify();
    });
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

TEST_CASE("RLIMIT_DATA used up by the program: reads still resolve, a write dies naming RLIMIT_DATA and the VMA" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    const ChildEnd end = run_in_child([] {
        const std::size_t ps = usermm::page_size();
        usermm::Arena arena(1ull << 30);
        char* p = static_cast<char*>(arena.map(1ull << 30, Prot::ReadWrite, {.name = "capped"}));
        write_u64(p, 1);
        // The program takes what is left of its allowance for itself.
        limit_data(data_vm() + (32ull << 20));
        if (mmap(nullptr, 32ull << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) ==
            MAP_FAILED)
            std::_Exit(22);
        for (std::size_t i = 1; i < 64; ++i) (void)read_u64(p + i * 1024 * ps);
        if (read_u64(p) != 1) std::_Exit(3);
        write_u64(p + 100 * 1024 * ps, 2);
        std::_Exit(9);
    });
    INFO(end.err);
    CHECK(end.signal == SIGSEGV);
    CHECK(end.err.find("RLIMIT_DATA (") != std::string::npos);
    CHECK(end.err.find("in VMA 'capped'") != std::string::npos);
}

// After restore() the PROT_NONE pages of a fragmented heap are in several states (restored,
// discarded, untouched) within one kernel mapping: degraded faults must not split it page by page
// (with a budget of 5,000, reads after restores of 20,000 sparse writes in 8 GiB made 39,000
// mappings, and with the default budget the kernel's limit and a death).
TEST_CASE("a budget of 1,000 holds across restore() of a fragmented heap and the reads after it") {
    const ChildEnd end = run_in_child(
        [] {
            (void)usermm::page_size();  // the process set-up, which sets the budget, is done
            const long base = usermm::detail::map_budget_used();
            usermm::detail::map_budget_set_limit(base + 1000);
            const std::size_t ps = usermm::page_size();
            constexpr std::size_t kSize = 2ull << 30;
            usermm::Arena arena(kSize);
            char* p = static_cast<char*>(arena.map(kSize, Prot::ReadWrite, {.name = "kv"}));
            std::mt19937_64 rng(3);
            for (int i = 0; i < 5000; ++i) write_u64(p + (rng() % (kSize / ps)) * ps, 1);
            const usermm::Snapshot snap = arena.snapshot();
            for (int i = 0; i < 500; ++i) write_u64(p + (rng() % (kSize / ps)) * ps, 2);
            for (int round = 0; round < 2; ++round) {
                arena.restore(snap);
                arena.verify();
                for (int i = 0; i < 5000; ++i) (void)read_u64(p + (rng() % (kSize / ps)) * ps);
                arena.verify();
                if (usermm::detail::map_budget_used() > base + 1000 + 64) std::_Exit(4);
            }
        },
        120);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}
