// The VMA index (lib/core/vma_index.hpp) against the tree it mirrors: after every change of an
// arena's VMAs (map, protect's splits and merges, unmap, restore, stacks, file VMAs), the index must
// answer every address as the tree's upper_bound does, and find_vma with it.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include <usermm/usermm.hpp>

#include "find_vma.hpp"
#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;
using usermm::detail::ArenaAccess;
using usermm::detail::ArenaCore;
using usermm::detail::Vma;

namespace {
std::atomic<bool> g_refuse_aligned{false};
std::size_t round_to(std::size_t n, std::align_val_t al) {
    const auto a = std::size_t(al);
    return (n + a - 1) / a * a;
}
}  // namespace

// The index's nodes are its program's only aligned allocations that may fail (std::nothrow): the
// test refuses them at will. The other aligned forms are replaced with them, so that every pair
// allocates and frees alike.
void* operator new(std::size_t n, std::align_val_t al, const std::nothrow_t&) noexcept {
    if (g_refuse_aligned.load(std::memory_order_relaxed)) return nullptr;
    return std::aligned_alloc(std::size_t(al), round_to(n, al));
}
void* operator new(std::size_t n, std::align_val_t al) {
    if (void* p = std::aligned_alloc(std::size_t(al), round_to(n, al))) return p;
    throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

const Vma* tree_answer(const ArenaCore& a, std::uintptr_t at) {
    const auto it = a.tree.upper_bound(at);
    return it == a.tree.end() ? nullptr : &*it;
}

// The index's answer for each address (and find_vma's) is the tree's; the count agrees. Without
// the index (`indexed` false: it could not have its memory), find_vma's alone.
void check_addresses(usermm::Arena& arena, const std::vector<std::uintptr_t>& addrs, bool indexed = true) {
    ArenaCore& a = ArenaAccess::core(arena);
    a.lock.lock_shared();
    const bool usable = a.vma_index.usable();
    const std::size_t in_index = a.vma_index.size(), vmas = a.tree.size();
    std::uintptr_t wrong = 0;
    const Vma *got = nullptr, *want = nullptr;
    for (const std::uintptr_t at : addrs) {
        want = tree_answer(a, at);
        got = indexed ? a.vma_index.find(at) : want;
        if (got != want || usermm::detail::find_vma(a, at) != want) {
            wrong = at;
            break;
        }
    }
    a.lock.unlock_shared();
    REQUIRE(usable == indexed);
    if (indexed) REQUIRE(in_index == vmas);
    INFO("address ", wrong, " index ", got ? got->end : 0, " tree ", want ? want->end : 0);
    REQUIRE(wrong == 0);
}

// Every VMA's first and last byte, the bytes around it (holes, neighbours), the arena's edges and
// random addresses.
void check_all(usermm::Arena& arena, std::mt19937_64& rng, bool indexed = true) {
    ArenaCore& a = ArenaAccess::core(arena);
    std::vector<std::uintptr_t> addrs{a.base, a.base + 1, a.end - 1, a.end, a.base - 1};
    for (const Vma& v : a.tree)
        for (const std::uintptr_t at : {v.start - 1, v.start, v.start + 1, v.end - 1, v.end}) addrs.push_back(at);
    for (int i = 0; i < 256; ++i) addrs.push_back(a.base + rng() % (a.end - a.base));
    check_addresses(arena, addrs, indexed);
}

// The addresses around a changed range, and a sample of the rest.
void check_near(usermm::Arena& arena, std::uintptr_t from, std::uintptr_t to, std::mt19937_64& rng) {
    ArenaCore& a = ArenaAccess::core(arena);
    const std::size_t ps = usermm::page_size();
    std::vector<std::uintptr_t> addrs;
    const std::uintptr_t low = from >= a.base + 2 * ps ? from - 2 * ps : a.base, high = std::min(to + 2 * ps, a.end);
    for (std::uintptr_t at = low; at < high; at += ps / 2) addrs.push_back(at);
    for (int i = 0; i < 64; ++i) addrs.push_back(a.base + rng() % (a.end - a.base));
    {
        auto it = a.tree.upper_bound(a.base + rng() % (a.end - a.base));
        for (int i = 0; i < 8 && it != a.tree.end(); ++i, ++it)
            for (const std::uintptr_t at : {it->start - 1, it->start, it->end - 1, it->end}) addrs.push_back(at);
    }
    check_addresses(arena, addrs);
}

Prot random_prot(std::mt19937_64& rng) {
    static constexpr Prot kProts[] = {Prot::Read, Prot::ReadWrite, Prot::None};
    return kProts[rng() % 3];
}

// `steps` random maps, protects and unmaps in an arena of `pages` pages, each checked; a write to
// a writable page now and then takes the fault path through the index.
void random_changes(std::uint64_t seed, std::size_t pages, std::size_t steps) {
    std::mt19937_64 rng(seed);
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(pages * ps);
    ArenaCore& a = ArenaAccess::core(arena);
    auto* base = static_cast<char*>(arena.base());
    std::size_t changed = 0;
    for (std::size_t step = 0; step < steps; ++step) {
        const std::size_t first = rng() % pages;
        const std::size_t len = 1 + rng() % std::min<std::size_t>(16, pages - first);
        char* at = base + first * ps;
        try {
            switch (rng() % 8) {
                case 0: case 1: case 2:
                    arena.map(len * ps, random_prot(rng), {.address = at, .fault_around_pages = 1});
                    break;
                case 3: case 4: case 5:
                    arena.protect(at, len * ps, random_prot(rng));
                    break;
                case 6:
                    arena.unmap(at, len * ps);
                    break;
                default:
                    if (const Vma* v = tree_answer(a, a.base + first * ps); v && v->prot == Prot::ReadWrite)
                        write_byte(reinterpret_cast<char*>(v->start + (rng() % ((v->end - v->start) / ps)) * ps), 1);
                    break;
            }
            ++changed;
        } catch (const usermm::Error&) {
        }
        check_near(arena, a.base + first * ps, a.base + (first + len) * ps, rng);
        if (step % 512 == 0) check_all(arena, rng);
    }
    check_all(arena, rng);
    arena.verify();
    CHECK(changed > steps / 4);
    MESSAGE("seed ", seed, ": ", a.tree.size(), " VMAs at the end");
}

}  // namespace

TEST_CASE("the index answers as the tree through random maps, protects and unmaps") {
    for (const std::uint64_t seed : {1, 2, 3, 4, 5}) {
        CAPTURE(seed);
        random_changes(seed, 2048, 4000);
    }
}

TEST_CASE("the index answers as the tree at tens of thousands of VMAs") {
    std::mt19937_64 rng(7);
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 60000;
    usermm::Arena arena(kPages * ps);
    ArenaCore& a = ArenaAccess::core(arena);
    auto* base = static_cast<char*>(arena.base());
    // Pages of alternating protection: none merge, one VMA each. Mapped out of address order, so
    // that nodes split in the middle as well as at the end.
    std::vector<std::size_t> order(kPages);
    for (std::size_t i = 0; i < kPages; ++i) order[i] = i;
    std::shuffle(order.begin(), order.begin() + kPages / 2, rng);
    for (const std::size_t page : order)
        arena.map(ps, page % 2 ? Prot::Read : Prot::ReadWrite, {.address = base + page * ps, .fault_around_pages = 1});
    REQUIRE(a.tree.size() == kPages);
    check_all(arena, rng);
    // Runs of pages made alike merge into one VMA, then split again; ranges unmapped (a range
    // reaching a hole is refused).
    std::size_t changed = 0;
    for (int step = 0; step < 3000; ++step) {
        const std::size_t first = rng() % (kPages - 64), len = 1 + rng() % 64;
        char* at = base + first * ps;
        try {
            switch (step % 3) {
                case 0: arena.protect(at, len * ps, Prot::Read); break;
                case 1: arena.protect(at + ps * (len / 2), ps, Prot::ReadWrite); break;
                default:
                    if (rng() % 4 == 0) arena.unmap(at, len * ps);
                    break;
            }
            ++changed;
        } catch (const usermm::Error&) {
        }
        check_near(arena, a.base + first * ps, a.base + (first + len) * ps, rng);
    }
    CHECK(changed > 1000);
    check_all(arena, rng);
    CHECK(a.tree.size() > 10000);
    // Every VMA unmapped, in random order: the index empties with the tree.
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> left;
    for (const Vma& v : a.tree) left.emplace_back(v.start, v.end);
    std::shuffle(left.begin(), left.end(), rng);
    for (std::size_t i = 0; i < left.size(); ++i) {
        arena.unmap(reinterpret_cast<void*>(left[i].first), left[i].second - left[i].first);
        check_near(arena, left[i].first, left[i].second, rng);
    }
    check_all(arena, rng);
    CHECK(a.vma_index.size() == 0);
    arena.verify();
}

TEST_CASE("restore replaces the VMAs of its range in the index") {
    std::mt19937_64 rng(11);
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(4096 * ps);
    ArenaCore& a = ArenaAccess::core(arena);
    auto* base = static_cast<char*>(arena.base());
    for (std::size_t i = 0; i < 1000; ++i)
        arena.map(ps, i % 2 ? Prot::ReadWrite : Prot::Read, {.address = base + i * ps, .fault_around_pages = 1});
    arena.unmap(base + 300 * ps, 4 * ps);
    write_byte(base + 201 * ps, 1);
    const usermm::Snapshot snap = arena.snapshot(base + 200 * ps, 600 * ps);
    // Inside the snapshot's range: a hole filled, VMAs merged and split, a range unmapped across
    // the range's end.
    arena.map(ps, Prot::ReadWrite, {.address = base + 301 * ps, .fault_around_pages = 1});
    arena.protect(base + 400 * ps, 300 * ps, Prot::Read);
    arena.protect(base + 500 * ps, ps, Prot::ReadWrite);
    arena.unmap(base + 750 * ps, 100 * ps);
    check_all(arena, rng);
    CHECK(a.tree.size() == 599);
    arena.restore(snap);
    check_all(arena, rng);
    // [200, 800)'s 596 one-page VMAs again, with the 200 below and the 150 above it.
    CHECK(a.tree.size() == 946);
    arena.verify();
}

TEST_CASE("stacks and file VMAs come and go in the index") {
    std::mt19937_64 rng(13);
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(1ull << 30);
    ArenaCore& a = ArenaAccess::core(arena);
    std::vector<usermm::Stack> stacks;
    for (int i = 0; i < 40; ++i) stacks.push_back(arena.map_stack(64 * ps));
    for (int i = 0; i < 40; ++i) arena.map(ps, Prot::Read, {.name = i % 2 ? "odd" : "even"});
    check_all(arena, rng);
    TempDir dir;
    const std::string path = dir.file("data");
    {
        const int fd = open(path.c_str(), O_CREAT | O_RDWR, 0600);
        REQUIRE(fd >= 0);
        REQUIRE(ftruncate(fd, 16 * ps) == 0);
        close(fd);
    }
    std::vector<char*> files;
    for (int i = 0; i < 40; ++i)
        files.push_back(static_cast<char*>(arena.map_file(path, 0, 16 * ps, Prot::Read, usermm::Share::Private)));
    check_all(arena, rng);
    // A stack grows down inside its VMA (its committed part), whose bounds stay: so does the index.
    const std::size_t vmas = a.tree.size();
    for (auto& s : stacks) s.ensure(32 * ps);
    check_all(arena, rng);
    CHECK(a.tree.size() == vmas);
    for (std::size_t i = 0; i < files.size(); i += 2) arena.unmap(files[i], 16 * ps);
    stacks.erase(stacks.begin(), stacks.begin() + 20);
    check_all(arena, rng);
    CHECK(a.tree.size() == vmas - 40);
    arena.verify();
}

TEST_CASE("without memory for a node the index goes, find_vma walks the tree, and a later map builds it again") {
    std::mt19937_64 rng(17);
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(4096 * ps);
    ArenaCore& a = ArenaAccess::core(arena);
    auto* base = static_cast<char*>(arena.base());
    auto map_page = [&](std::size_t page) {
        arena.map(ps, page % 2 ? Prot::Read : Prot::ReadWrite, {.address = base + page * ps, .fault_around_pages = 1});
    };
    // One full leaf: the next VMA needs a node.
    for (std::size_t page = 0; page < usermm::detail::VmaIndexNode::kSlots; ++page) map_page(page);
    check_all(arena, rng);
    g_refuse_aligned = true;
    map_page(100);
    check_all(arena, rng, false);
    CHECK(a.vma_index.size() == 0);
    // Changes go on without it, and so do faults.
    for (std::size_t page = 200; page < 300; ++page) map_page(page);
    arena.protect(base + 210 * ps, 20 * ps, Prot::Read);
    arena.unmap(base + 250 * ps, 10 * ps);
    write_byte(base + 202 * ps, 1);
    check_all(arena, rng, false);
    arena.verify();
    g_refuse_aligned = false;
    map_page(400);
    check_all(arena, rng);
    arena.verify();
}
