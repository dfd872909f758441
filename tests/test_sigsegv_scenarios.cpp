// The scenarios of GNU libsigsegv's test suite, asked of usermm: a fault is seen at its exact
// address, handled once per page, dispatched to the VMA that owns it, invisible to system calls
// (which get EFAULT, as the kernel reports a bad user pointer), able to grant execution, free of
// memory cost for reads, and batched by fault-around.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace {

using usermm::Arena;
using usermm::Prot;
using usermm::VmaInfo;
using usermm_test::read_byte;
using usermm_test::write_byte;

constexpr std::size_t kArenaSize = 64ull << 20;

// A fault usermm cannot get past repeats forever on the same instruction, in this very process:
// SIGALRM ends the file quickly and visibly then, instead of at ctest's timeout.
[[maybe_unused]] const unsigned g_watchdog = alarm(30);

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The kernel's own view of the page at `p` ("rw-" style, from /proc/self/maps), so that a test can
// tell what usermm did to the page rather than what it says it did.
std::string kernel_prot(const void* p) {
    std::ifstream maps("/proc/self/maps");
    for (std::string line; std::getline(maps, line);) {
        unsigned long lo = 0, hi = 0;
        char perms[5] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) == 3 && lo <= addr(p) && addr(p) < hi)
            return std::string(perms, 3);
    }
    return "unmapped";
}

// The VMA of `arena` that contains `p`, with its counters as of now.
VmaInfo vma_of(const Arena& arena, const void* p) {
    const std::vector<VmaInfo> all = arena.vmas();
    const auto it = std::find_if(all.begin(), all.end(), [p](const VmaInfo& v) {
        return addr(v.start) <= addr(p) && addr(p) < addr(v.start) + v.length;
    });
    REQUIRE(it != all.end());
    return *it;
}

// Resident pages of the kernel mappings inside [start, start + length), from the page-table walk
// behind /proc/self/smaps. Like RSS it leaves out the kernel's shared zero page; unlike the
// process-wide RSS it ignores whatever the rest of the test process pages in meanwhile.
long resident_pages(const void* start, std::size_t length) {
    std::ifstream smaps("/proc/self/smaps");
    bool inside = false;
    long kib = 0;
    for (std::string line; std::getline(smaps, line);) {
        unsigned long lo = 0, hi = 0;
        long k = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2)
            inside = lo >= addr(start) && hi <= addr(start) + length;
        else if (inside && std::sscanf(line.c_str(), "Rss: %ld kB", &k) == 1)
            kib += k;
    }
    return kib * 1024 / long(usermm::page_size());
}

struct Pipe {
    int rd = -1;
    int wr = -1;
    Pipe() {
        int fds[2];
        REQUIRE(pipe(fds) == 0);
        rd = fds[0];
        wr = fds[1];
    }
    ~Pipe() {
        close(rd);
        close(wr);
    }
    Pipe(const Pipe&) = delete;
    Pipe& operator=(const Pipe&) = delete;
};

}  // namespace

TEST_CASE("a fault resolves exactly the page that holds the faulting byte") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(8 * ps, Prot::ReadWrite, {.name = "exact", .fault_around_pages = 1}));
    const std::uint64_t process_before = usermm::process_stats().minor_faults;

    // The last byte of page 3: a handler that rounded the address up, or took the page after the
    // fault, would open page 4 instead.
    CHECK(read_byte(p + 4 * ps - 1) == 0);
    VmaInfo v = vma_of(arena, p);
    CHECK(v.stats.minor_faults == 1);
    CHECK(v.stats.read_faults == 1);
    CHECK(v.stats.fault_around_pages == 0);
    CHECK(arena.stats().minor_faults == 1);
    CHECK(usermm::process_stats().minor_faults == process_before + 1);
    CHECK(kernel_prot(p + 3 * ps) == "r--");
    CHECK(kernel_prot(p + 2 * ps) == "---");
    CHECK(kernel_prot(p + 4 * ps) == "---");

    // Any byte of the same page is now free; the bytes just across either edge are not.
    CHECK(read_byte(p + 3 * ps) == 0);
    CHECK(vma_of(arena, p).stats.minor_faults == 1);
    CHECK(read_byte(p + 3 * ps - 1) == 0);
    CHECK(vma_of(arena, p).stats.minor_faults == 2);
    CHECK(read_byte(p + 4 * ps) == 0);
    CHECK(vma_of(arena, p).stats.minor_faults == 3);
    CHECK(kernel_prot(p + 1 * ps) == "---");
    CHECK(kernel_prot(p + 5 * ps) == "---");

    // The first byte of a page, written: the page becomes writable, its predecessor stays closed.
    write_byte(p + 6 * ps, 0x5a);
    v = vma_of(arena, p);
    CHECK(v.stats.minor_faults == 4);
    CHECK(v.stats.write_faults == 1);
    CHECK(kernel_prot(p + 6 * ps) == "rw-");
    CHECK(kernel_prot(p + 5 * ps) == "---");
    CHECK(kernel_prot(p + 7 * ps) == "---");
    arena.verify();
}

TEST_CASE("an access that straddles two untouched pages takes one fault per page and completes") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.name = "straddle", .fault_around_pages = 1}));
    const std::uint64_t value = 0x0102030405060708;
    char* across = p + 2 * ps - 3;
    std::memcpy(across, &value, sizeof value);
    const VmaInfo v = vma_of(arena, p);
    CHECK(v.stats.minor_faults == 2);
    CHECK(v.stats.write_faults == 2);
    CHECK(kernel_prot(p + ps) == "rw-");
    CHECK(kernel_prot(p + 2 * ps) == "rw-");
    std::uint64_t back = 0;
    std::memcpy(&back, across, sizeof back);
    CHECK(back == value);
    CHECK(vma_of(arena, p).stats.minor_faults == 2);
    arena.verify();
}

TEST_CASE("the handler runs once per page and the faulting access completes") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t n = 64;

    SUBCASE("writes: one fault per page, then none, and the values stick") {
        char* p = static_cast<char*>(arena.map(n * ps, Prot::ReadWrite, {.name = "w", .fault_around_pages = 1}));
        for (std::size_t i = 0; i < n; ++i) write_byte(p + i * ps + i, std::uint8_t(i + 1));
        VmaInfo v = vma_of(arena, p);
        CHECK(v.stats.minor_faults == n);
        CHECK(v.stats.write_faults == n);
        CHECK(v.stats.read_faults == 0);
        CHECK(v.stats.zero_page_reads == 0);

        for (std::size_t i = 0; i < n; ++i) {
            CHECK(read_byte(p + i * ps + i) == i + 1);
            CHECK(read_byte(p + i * ps + i + 1) == 0);
            write_byte(p + i * ps + ps - 1, 0xee);
        }
        for (std::size_t i = 0; i < n; ++i) CHECK(read_byte(p + i * ps + ps - 1) == 0xee);
        CHECK(vma_of(arena, p).stats.minor_faults == n);
    }

    SUBCASE("reads: one fault per page, zeros, none again; a later write upgrades each page once") {
        char* p = static_cast<char*>(arena.map(n * ps, Prot::ReadWrite, {.name = "r", .fault_around_pages = 1}));
        for (std::size_t i = 0; i < n; ++i) CHECK(read_byte(p + i * ps + 7) == 0);
        VmaInfo v = vma_of(arena, p);
        CHECK(v.stats.minor_faults == n);
        CHECK(v.stats.read_faults == n);
        CHECK(v.stats.zero_page_reads == n);
        CHECK(kernel_prot(p) == "r--");

        for (std::size_t i = 0; i < n; ++i) CHECK(read_byte(p + i * ps + ps - 1) == 0);
        CHECK(vma_of(arena, p).stats.minor_faults == n);

        // As the kernel's do_wp_page: a page first read is faulted again on its first write.
        for (std::size_t i = 0; i < n; ++i) write_byte(p + i * ps, std::uint8_t(0x80 | i));
        v = vma_of(arena, p);
        CHECK(v.stats.minor_faults == 2 * n);
        CHECK(v.stats.write_faults == n);
        for (std::size_t i = 0; i < n; ++i) CHECK(read_byte(p + i * ps) == (0x80 | i));
        CHECK(vma_of(arena, p).stats.minor_faults == 2 * n);
        CHECK(kernel_prot(p) == "rw-");
    }
    arena.verify();
}

TEST_CASE("faults in three neighbouring VMAs are dispatched to the VMA that owns the address") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t pages = 4;
    // Different protections and names, so that none of them merges with its neighbour.
    char* a = static_cast<char*>(arena.map(pages * ps, Prot::ReadWrite, {.name = "alpha", .fault_around_pages = 1}));
    char* b = static_cast<char*>(arena.map(pages * ps, Prot::Read, {.name = "beta", .fault_around_pages = 1}));
    char* c = static_cast<char*>(
        arena.map(pages * ps, Prot::Read | Prot::Exec, {.name = "gamma", .fault_around_pages = 1}));
    REQUIRE(b == a + pages * ps);
    REQUIRE(c == b + pages * ps);

    const auto faults = [&] {
        const std::vector<VmaInfo> v = arena.vmas();
        REQUIRE(v.size() == 3);
        return std::vector<std::uint64_t>{v[0].stats.minor_faults, v[1].stats.minor_faults, v[2].stats.minor_faults};
    };
    const std::vector<VmaInfo> before = arena.vmas();
    REQUIRE(before.size() == 3);
    CHECK(before[0].name == "alpha");
    CHECK(before[1].name == "beta");
    CHECK(before[2].name == "gamma");
    CHECK(before[0].prot == Prot::ReadWrite);
    CHECK(before[1].prot == Prot::Read);
    CHECK(before[2].prot == (Prot::Read | Prot::Exec));

    // Round robin over the VMAs, each round a different page (first, last, second, ...), so that a
    // stale last-hit cache or an off-by-one where two VMAs touch charges the wrong VMA.
    std::vector<std::uint64_t> expected{0, 0, 0};
    for (std::size_t round = 0; round < pages; ++round) {
        const std::size_t page = round % 2 ? pages - 1 - round / 2 : round / 2;
        write_byte(a + page * ps, std::uint8_t(round + 1));
        ++expected[0];
        CHECK(faults() == expected);
        CHECK(read_byte(b + page * ps) == 0);
        ++expected[1];
        CHECK(faults() == expected);
        CHECK(read_byte(c + page * ps) == 0);
        ++expected[2];
        CHECK(faults() == expected);
    }

    const std::vector<VmaInfo> after = arena.vmas();
    REQUIRE(after.size() == 3);
    CHECK(after[0].stats.write_faults == pages);
    CHECK(after[0].stats.read_faults == 0);
    CHECK(after[1].stats.read_faults == pages);
    CHECK(after[1].stats.zero_page_reads == pages);
    CHECK(after[2].stats.read_faults == pages);
    CHECK(after[2].stats.write_faults == 0);
    CHECK(arena.stats().minor_faults == 3 * pages);
    CHECK(kernel_prot(a) == "rw-");
    CHECK(kernel_prot(b) == "r--");
    CHECK(kernel_prot(c) == "r-x");
    arena.verify();
}

TEST_CASE("read(2) into an untouched page fails with EFAULT until the page is prefaulted") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.name = "rbuf", .fault_around_pages = 1}));
    Pipe pipe;
    const char message[] = "through the kernel";
    REQUIRE(write(pipe.wr, message, sizeof message) == ssize_t(sizeof message));

    char* dst = p + ps + 100;
    errno = 0;
    CHECK(read(pipe.rd, dst, sizeof message) == -1);
    CHECK(errno == EFAULT);
    // The kernel reported the bad pointer to the caller; no signal reached usermm.
    CHECK(arena.stats().minor_faults == 0);
    CHECK(kernel_prot(dst) == "---");

    arena.prefault(p + ps, ps, Prot::Write);
    CHECK(vma_of(arena, p).stats.prefault_pages == 1);
    CHECK(kernel_prot(dst) == "rw-");
    CHECK(kernel_prot(p) == "---");
    CHECK(read(pipe.rd, dst, sizeof message) == ssize_t(sizeof message));
    CHECK(std::memcmp(dst, message, sizeof message) == 0);
    CHECK(arena.stats().minor_faults == 0);
    arena.verify();
}

TEST_CASE("write(2) from an untouched page fails with EFAULT until the page is prefaulted for reading") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(4 * ps, Prot::ReadWrite, {.name = "wbuf", .fault_around_pages = 1}));
    Pipe pipe;
    char* src = p + 2 * ps + 10;
    constexpr std::size_t n = 64;

    errno = 0;
    CHECK(write(pipe.wr, src, n) == -1);
    CHECK(errno == EFAULT);
    CHECK(arena.stats().minor_faults == 0);

    arena.prefault(p + 2 * ps, ps, Prot::Read);
    // Reading is all that was asked for: the page stays closed to writes, which fault as usual.
    CHECK(kernel_prot(src) == "r--");
    CHECK(write(pipe.wr, src, n) == ssize_t(n));
    std::vector<char> got(n, 'x');
    CHECK(read(pipe.rd, got.data(), n) == ssize_t(n));
    CHECK(got == std::vector<char>(n, 0));
    CHECK(arena.stats().minor_faults == 0);
    CHECK(arena.stats().prefault_pages == 1);
    write_byte(src, 1);
    CHECK(arena.stats().write_faults == 1);
    CHECK(kernel_prot(src) == "rw-");
    arena.verify();
}

#if defined(__x86_64__) || defined(__aarch64__)
TEST_CASE("code written into a VMA runs after the VMA is protected Read|Exec") {
#if defined(__x86_64__)
    const std::uint8_t ret[] = {0xc3};
#else
    const std::uint8_t ret[] = {0xc0, 0x03, 0x5f, 0xd6};
#endif
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    char* code = static_cast<char*>(arena.map(ps, Prot::ReadWrite, {.name = "jit", .fault_around_pages = 1}));
    std::memcpy(code, ret, sizeof ret);
    arena.protect(code, ps, Prot::Read | Prot::Exec);
    __builtin___clear_cache(code, code + sizeof ret);
    CHECK(kernel_prot(code) == "r--");

    auto* fn = reinterpret_cast<void (*)()>(code);
    fn();
    VmaInfo v = vma_of(arena, code);
    CHECK(v.prot == (Prot::Read | Prot::Exec));
    CHECK(v.stats.exec_faults == 1);
    CHECK(v.stats.write_faults == 1);
    CHECK(kernel_prot(code) == "r-x");
    fn();
    CHECK(vma_of(arena, code).stats.exec_faults == 1);
    arena.verify();
}
#endif

TEST_CASE("reading untouched pages commits no memory; writing them does") {
    Arena arena(kArenaSize);
    const std::size_t ps = usermm::page_size();
    constexpr long n = 1000;
    char* p = static_cast<char*>(arena.map(n * ps, Prot::ReadWrite, {.name = "zero", .fault_around_pages = 1}));

    const long before = resident_pages(arena.base(), arena.size());
    unsigned sum = 0;
    for (long i = 0; i < n; ++i) sum += read_byte(p + i * ps);
    const long after_reads = resident_pages(arena.base(), arena.size());
    CHECK(sum == 0);
    CHECK(arena.stats().zero_page_reads == n);
    CHECK(after_reads == before);

    for (long i = 0; i < n; ++i) write_byte(p + i * ps, 1);
    const long after_writes = resident_pages(arena.base(), arena.size());
    CHECK(arena.stats().write_faults == n);
    CHECK(after_writes - after_reads >= n);
}

namespace {

// Maps 64 pages at the first 16-page boundary of the address space inside `arena`, with the default
// fault-around, reads them in order and checks that each aligned window took exactly one fault.
// Windows are aligned in the address space, as the kernel aligns fault_around_bytes: where the
// arena itself starts does not matter.
void check_sequential_fault_around(Arena& arena) {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t window = 16, n = 64;
    const std::uintptr_t aligned = (addr(arena.base()) + window * ps - 1) & ~(window * ps - 1);
    void* const want = reinterpret_cast<void*>(aligned);
    char* p = static_cast<char*>(arena.map(n * ps, Prot::ReadWrite, {.name = "around", .address = want}));
    REQUIRE(p == want);
    CHECK(vma_of(arena, p).fault_around_pages == window);

    for (std::size_t i = 0; i < n; ++i) CHECK(read_byte(p + i * ps) == 0);
    const VmaInfo v = vma_of(arena, p);
    CHECK(v.stats.minor_faults == n / window);
    CHECK(v.stats.read_faults == n / window);
    CHECK(v.stats.fault_around_pages == n - n / window);
    CHECK(v.stats.zero_page_reads == n / window);
    CHECK(kernel_prot(p + (n - 1) * ps) == "r--");
    arena.verify();
}

}  // namespace

TEST_CASE("fault-around: a sequential read of 64 pages takes one fault per aligned 16-page window") {
    Arena arena(kArenaSize);
    check_sequential_fault_around(arena);
}

// An arena's base need not be window-aligned; windows counted from the base would split the read
// into 5 faults.
TEST_CASE("fault-around windows do not depend on where the arena starts") {
    const std::size_t ps = usermm::page_size();
    // Reservations of an odd number of pages are placed next to each other, so one of the first few
    // starts off a 16-page boundary; the earlier ones stay alive so that each try lands elsewhere.
    std::vector<Arena> arenas;
    while (arenas.empty() || addr(arenas.back().base()) % (16 * ps) == 0) {
        REQUIRE(arenas.size() < 32);
        arenas.emplace_back(129 * ps);
    }
    check_sequential_fault_around(arenas.back());
}
