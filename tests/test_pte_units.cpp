// The per-page state's pure functions, against their contracts and, where the kernel decides the
// answer, against the kernel: pte_with_prot (pte.hpp), map_count_delta (map_budget.cpp),
// readahead_window (filemap.cpp) and what a discard leaves of a PTE (clear_ptes, arena_ops.cpp).
// Then every transition of the state machine (lib/README.md, "The per-page state machine") that the
// public API can drive, each read back from the PTE table and checked against the kernel by verify().
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <random>
#include <vector>

#include <usermm/usermm.hpp>

#include "arena_ops.hpp"
#include "file_test_util.hpp"
#include "file_vma.hpp"
#include "filemap.hpp"
#include "map_budget.hpp"
#include "page_ops_api.hpp"
#include "pte.hpp"
#include "test_util.hpp"
#include "vma.hpp"

using namespace usermm::detail;
using usermm::Advice;
using usermm::Prot;
using usermm_test::mappings_within;

namespace {

constexpr Prot kAllProts[] = {Prot::None,          Prot::Read,          Prot::Write,       Prot::ReadWrite,
                              Prot::Exec,          Prot::Read | Prot::Exec, Prot::Write | Prot::Exec,
                              Prot::ReadWrite | Prot::Exec};

// The bits pte.hpp names: all 16.
constexpr pte_t kNamedBits = kPteProt | kPtePopulated | kPteWriteTracked | kPteDirtySnapshot | kPteDirtyCollect |
                             kPteLocked | kPteDirtyFile | kPteFile | kPteEdge | kPteReadahead | kPteSaved |
                             kPteSwapped | kPteInactive | kPteGuard;

}  // namespace

TEST_CASE("pte.hpp: the named bits are distinct and use all 16") {
    const pte_t bits[] = {kPtePopulated, kPteWriteTracked, kPteDirtySnapshot, kPteDirtyCollect, kPteLocked,
                          kPteDirtyFile, kPteFile,         kPteEdge,          kPteReadahead,    kPteSaved,
                          kPteSwapped,   kPteInactive,     kPteGuard};
    pte_t seen = kPteProt;
    for (const pte_t b : bits) {
        CHECK((b & (b - 1)) == 0);  // one bit each
        CHECK((seen & b) == 0);
        seen = pte_t(seen | b);
    }
    CHECK(kNamedBits == 0xffff);
    CHECK(kPteFlags == pte_t(~(kPteProt | kPteLocked)));
}

// Every PTE value without the lock bit, for every protection: exhaustive, so that a flag added to
// pte.hpp is covered the moment it exists.
TEST_CASE("pte_with_prot: the protection is set, each flag kept, set or cleared as documented") {
    for (const Prot prot : kAllProts) {
        const bool write = allows(prot, Prot::Write);
        const bool any = prot != Prot::None;
        unsigned wrong = 0;
        for (unsigned value = 0; value <= 0xffff; ++value) {
            const pte_t old = pte_t(value);
            if (old & kPteLocked) continue;
            const pte_t got = pte_with_prot(old, prot);
            auto bit = [&](pte_t b) { return (got & b) != 0; };
            auto was = [&](pte_t b) { return (old & b) != 0; };
            bool ok = unsigned(pte_prot(got)) == (unsigned(prot) & 7u) && !bit(kPteLocked);
            // Write access makes the page hold data and be dirty for every reader of dirty bits, and
            // ends tracking; without it, those flags stay as they were.
            ok = ok && bit(kPtePopulated) == (write || was(kPtePopulated));
            ok = ok && bit(kPteDirtySnapshot) == (write || was(kPteDirtySnapshot));
            ok = ok && bit(kPteDirtyCollect) == (write || was(kPteDirtyCollect));
            ok = ok && bit(kPteDirtyFile) == (write || was(kPteDirtyFile));
            ok = ok && bit(kPteWriteTracked) == (!write && was(kPteWriteTracked));
            // Any access ends a readahead mark, an inactive one and a stack guard; PROT_NONE keeps them.
            ok = ok && bit(kPteReadahead) == (!any && was(kPteReadahead));
            ok = ok && bit(kPteInactive) == (!any && was(kPteInactive));
            ok = ok && bit(kPteGuard) == (!any && was(kPteGuard));
            // Backing, kernel boundaries and saved or swapped content are not the protection's
            // business.
            for (const pte_t kept : {kPteFile, kPteEdge, kPteSaved, kPteSwapped})
                ok = ok && (got & kept) == (old & kept);
            if (!ok && wrong++ < 5) {
                INFO("old " << std::hex << old << " prot " << unsigned(prot) << " -> " << got);
                CHECK(ok);
            }
        }
        CHECK(wrong == 0);
    }
}

TEST_CASE("pte_with_prot: the fault world's and the API world's grants on example states") {
    // Read fault on an untouched page: readable, nothing else.
    CHECK(pte_with_prot(0, Prot::Read) == to_pte(Prot::Read));
    // Write fault on an untouched page, or the upgrade of a readable one.
    const pte_t written = pte_t(to_pte(Prot::ReadWrite) | kPtePopulated | kPteDirty | kPteDirtyFile);
    CHECK(pte_with_prot(0, Prot::ReadWrite) == written);
    CHECK(pte_with_prot(to_pte(Prot::Read), Prot::ReadWrite) == written);
    // The write after a snapshot (mprotect engine: write was withheld).
    CHECK(pte_with_prot(pte_t(to_pte(Prot::Read) | kPteWriteTracked | kPtePopulated), Prot::ReadWrite) == written);
    // A file page read ahead, then read: the mark goes, the backing stays.
    CHECK(pte_with_prot(pte_t(kPteFile | kPteReadahead), Prot::Read) == pte_t(kPteFile | to_pte(Prot::Read)));
    // protect(None) keeps everything but the access.
    CHECK(pte_with_prot(pte_t(written | kPteFile | kPteEdge), Prot::None) ==
          pte_t(kPtePopulated | kPteDirty | kPteDirtyFile | kPteFile | kPteEdge));
}

// --- map_count_delta -------------------------------------------------------------------------------

namespace {

// An ArenaCore over a PTE table of its own, at address 0: map_count_delta reads only the PTEs and
// the arena's extent.
struct FakeArena {
    std::vector<Pte> pte;
    ArenaCore core;
    explicit FakeArena(std::size_t pages) : pte(pages) {
        core.base = 0;
        core.end = pages << g_page_shift;
        core.pte = pte.data();
    }
    FakeArena& set(std::size_t first, std::size_t last, pte_t v) {
        for (std::size_t i = first; i < last; ++i) pte[i].store(v);
        return *this;
    }
    FakeArena& add(std::size_t i, pte_t bits) {
        pte[i].fetch_or(bits);
        return *this;
    }
    long delta(std::size_t first, std::size_t last, Prot prot) const { return map_count_delta(core, first, last, prot); }
};

constexpr pte_t R = to_pte(Prot::Read);
constexpr pte_t RW = to_pte(Prot::ReadWrite);

}  // namespace

TEST_CASE("map_count_delta: splits, merges, the arena's ends, file against anonymous, edge marks") {
    SUBCASE("the whole arena changes: still one mapping") { CHECK(FakeArena(8).delta(0, 8, Prot::Read) == 0); }
    SUBCASE("a page in the middle splits one mapping into three") { CHECK(FakeArena(8).delta(3, 4, Prot::Read) == 2); }
    SUBCASE("the first page: the arena's start is a boundary already") {
        CHECK(FakeArena(8).delta(0, 1, Prot::Read) == 1);
    }
    SUBCASE("the last page: the arena's end is a boundary already") { CHECK(FakeArena(8).delta(7, 8, Prot::Read) == 1); }
    SUBCASE("no change of class: nothing") {
        FakeArena a(8);
        a.set(2, 6, R);
        CHECK(a.delta(3, 5, Prot::Read) == 0);
        CHECK(a.delta(2, 6, Prot::Read) == 0);
    }
    SUBCASE("filling a hole merges with both neighbours") {
        FakeArena a(8);
        a.set(2, 3, R).set(4, 5, R);  // N N R N R N N N: five mappings
        CHECK(a.delta(3, 4, Prot::Read) == -2);
    }
    SUBCASE("joining one neighbour: as many mappings as before") {
        FakeArena a(8);
        a.set(2, 3, R);
        CHECK(a.delta(3, 4, Prot::Read) == 0);
        CHECK(a.delta(1, 2, Prot::Read) == 0);
    }
    SUBCASE("a run given back to its neighbours' protection merges three into one") {
        FakeArena a(8);
        a.set(3, 5, RW);
        CHECK(a.delta(3, 5, Prot::None) == -2);
        CHECK(a.delta(3, 4, Prot::None) == 0);  // the piece left keeps two boundaries
        CHECK(a.delta(4, 5, Prot::Read) == 1);  // three classes in a row: N RW R N
    }
    SUBCASE("file and anonymous pages of one protection never merge") {
        FakeArena a(8);
        a.set(4, 8, kPteFile).add(4, kPteEdge);  // anonymous [0, 4), a file mapping [4, 8)
        a.set(3, 4, R);
        CHECK(a.delta(4, 5, Prot::Read) == 1);  // next to anonymous R, a file R is a mapping of its own
        CHECK(a.delta(4, 8, Prot::Read) == 0);
        CHECK(a.delta(5, 6, Prot::Read) == 2);
        a.set(4, 8, pte_t(kPteFile | R)).add(4, kPteEdge);
        CHECK(a.delta(3, 4, Prot::None) == -1);  // anon N N N R | file R R R R: three, then two
        CHECK(a.delta(0, 4, Prot::Read) == -1);  // all R: still two, the backings stay apart
    }
    SUBCASE("an edge mark keeps a boundary whatever the protections") {
        FakeArena a(8);
        a.add(5, kPteEdge);  // two mappings of one protection: [0, 5), [5, 8)
        CHECK(a.delta(5, 8, Prot::Read) == 0);
        CHECK(a.delta(0, 5, Prot::Read) == 0);
        CHECK(a.delta(4, 6, Prot::Read) == 2);  // N N N N R | R N N: the edge inside the run stays
        CHECK(a.delta(5, 6, Prot::Read) == 1);
        a.set(4, 5, R);
        CHECK(a.delta(5, 6, Prot::Read) == 1);  // a neighbour of the same class across an edge
    }
}

namespace {

// A kernel mapping laid out as an arena is: `pages` pages of private anonymous PROT_NONE memory
// (MAP_NORESERVE, as the arena's reservation) with holes on both sides, a shared mapping of a
// memfd over [file_first, file_last), and anonymous pages [dontfork_first, dontfork_last) that the
// kernel keeps apart from their neighbours for good (MADV_DONTFORK, another VMA flag). The PTEs
// of a FakeArena model it: the file's pages carry kPteFile, and the first page of each mapping the
// kernel keeps apart an edge mark.
struct KernelLayout {
    static constexpr std::size_t pages = 16, file_first = 9, file_last = 13, dontfork_first = 2, dontfork_last = 5;
    std::size_t ps = g_page_size;
    char* base = nullptr;
    int memfd = -1;
    FakeArena model{pages};

    KernelLayout() {
        char* p = static_cast<char*>(
            mmap(nullptr, (pages + 2) * ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        REQUIRE(p != MAP_FAILED);
        REQUIRE(munmap(p, ps) == 0);
        REQUIRE(munmap(p + (pages + 1) * ps, ps) == 0);
        base = p + ps;
        memfd = memfd_create("usermm-test-map-count", MFD_CLOEXEC);
        REQUIRE(memfd >= 0);
        REQUIRE(ftruncate(memfd, off_t((file_last - file_first) * ps)) == 0);
        REQUIRE(mmap(base + file_first * ps, (file_last - file_first) * ps, PROT_NONE, MAP_SHARED | MAP_FIXED, memfd,
                     0) == base + file_first * ps);
        REQUIRE(madvise(base + dontfork_first * ps, (dontfork_last - dontfork_first) * ps, MADV_DONTFORK) == 0);
        model.set(file_first, file_last, kPteFile);
        for (const std::size_t edge : {file_first, file_last, dontfork_first, dontfork_last}) model.add(edge, kPteEdge);
    }
    ~KernelLayout() {
        munmap(base, pages * ps);
        close(memfd);
    }
    long kernel_count() const { return mappings_within(base, pages * ps); }
    void change(std::size_t first, std::size_t last, Prot prot) {
        REQUIRE(mprotect(base + first * ps, (last - first) * ps, to_mmap_prot(prot)) == 0);
        for (std::size_t i = first; i < last; ++i) {
            const pte_t v = model.pte[i].load();
            model.pte[i].store(pte_t((v & ~kPteProt) | to_pte(prot)));
        }
    }
};

}  // namespace

// Random protection changes inside one backing at a time (a change never spans a file VMA and an
// anonymous one, which are different VMAs), each predicted and then made with mprotect.
TEST_CASE("map_count_delta predicts the kernel's own count, for random changes of a laid-out mapping") {
    KernelLayout k;
    REQUIRE(k.kernel_count() == 5);  // anon [0,2) dontfork [2,5) anon [5,9) file [9,13) anon [13,16)
    std::mt19937 rng(20261201);
    const Prot anon_prots[] = {Prot::None, Prot::Read, Prot::ReadWrite, Prot::Read | Prot::Exec};
    const Prot file_prots[] = {Prot::None, Prot::Read, Prot::ReadWrite};
    struct Piece {
        std::size_t first, last;
        bool file;
    };
    const Piece pieces[] = {{0, k.file_first, false}, {k.file_first, k.file_last, true}, {k.file_last, k.pages, false}};
    unsigned wrong = 0;
    for (int step = 0; step < 600; ++step) {
        const Piece& piece = pieces[rng() % 3];
        const std::size_t first = piece.first + rng() % (piece.last - piece.first);
        const std::size_t last = first + 1 + rng() % (piece.last - first);
        const Prot prot = piece.file ? file_prots[rng() % 3] : anon_prots[rng() % 4];
        const long predicted = k.model.delta(first, last, prot);
        const long before = k.kernel_count();
        k.change(first, last, prot);
        const long after = k.kernel_count();
        if (after - before != predicted && wrong++ < 5) {
            INFO("step " << step << ": [" << first << ", " << last << ") to " << unsigned(prot) << ": kernel "
                         << before << " -> " << after << ", predicted " << predicted);
            CHECK(after - before == predicted);
        }
    }
    CHECK(wrong == 0);
}

// --- readahead_window --------------------------------------------------------------------------------

namespace {

// A file VMA of `pages` pages showing the file from page `pgoff`, at address 0 (readahead_window
// reads only the VMA's fields).
struct FileVma {
    Vma v;
    FileVma(std::uint64_t pgoff, std::size_t pages, Advice advice, std::uint32_t readahead_max,
            std::uint32_t fault_around) {
        v.start = 0;
        v.end = pages << g_page_shift;
        v.pgoff = pgoff;
        v.advice = advice;
        v.readahead_max = readahead_max;
        v.fault_around_pages = fault_around;
    }
};

bool same(FileRange a, FileRange b) { return a.first == b.first && a.last == b.last; }

constexpr std::uint64_t kFar = std::uint64_t(1) << 40;  // an end of file beyond every window

}  // namespace

TEST_CASE("readahead_window: Random reads one page, whatever the state") {
    FileVma f(0, 1024, Advice::Random, 64, 16);
    f.v.ra_next = 100;
    f.v.ra_window = 32;
    CHECK(same(readahead_window(f.v, 100, {96, 112}, kFar), {100, 101}));
    CHECK(same(readahead_window(f.v, 7, {0, 16}, kFar), {7, 8}));
}

TEST_CASE("readahead_window: Sequential reads the largest window, at most 128 pages") {
    CHECK(same(readahead_window(FileVma(0, 4096, Advice::Sequential, 64, 16).v, 10, {0, 16}, kFar), {10, 74}));
    CHECK(same(readahead_window(FileVma(0, 4096, Advice::Sequential, 8, 32).v, 10, {0, 32}, kFar), {10, 42}));
    CHECK(same(readahead_window(FileVma(0, 4096, Advice::Sequential, 100000, 16).v, 10, {0, 16}, kFar),
               {10, 10 + kFileProbePages / 2}));
    CHECK(same(readahead_window(FileVma(0, 4096, Advice::Sequential, 0, 0).v, 10, {10, 11}, kFar), {10, 11}));
}

TEST_CASE("readahead_window: Normal doubles on sequential faults, up to the largest window") {
    FileVma f(0, 4096, Advice::Normal, 64, 16);
    // The first fault of a VMA is at ra_next == 0 only if it is at page 0: a fault elsewhere reads
    // the fault-around window.
    CHECK(same(readahead_window(f.v, 37, {32, 48}, kFar), {32, 48}));
    std::uint64_t page = 0;
    std::vector<std::uint64_t> sizes;
    for (int fault = 0; fault < 6; ++fault) {
        const FileRange w = readahead_window(f.v, page, {page / 16 * 16, page / 16 * 16 + 16}, kFar);
        CHECK(w.first == page);
        sizes.push_back(w.last - w.first);
        readahead_update(f.v, w);
        page = w.last;  // the reader's next fault is where the window ended
    }
    CHECK(sizes == std::vector<std::uint64_t>{16, 32, 64, 64, 64, 64});
    // Out of sequence, the window starts again from fault-around.
    CHECK(same(readahead_window(f.v, page + 5, {page, page + 16}, kFar), {page, page + 16}));
}

TEST_CASE("readahead_window: Normal falls back to one page once out-of-sequence faults keep missing") {
    FileVma f(0, 4096, Advice::Normal, 64, 16);
    f.v.ra_next = 500;
    f.v.ra_window = 16;
    f.v.ra_misses = kReadaroundMisses;
    CHECK(same(readahead_window(f.v, 40, {32, 48}, kFar), {32, 48}));  // at the threshold: still around
    f.v.ra_misses = kReadaroundMisses + 1;
    CHECK(same(readahead_window(f.v, 40, {32, 48}, kFar), {40, 41}));
    // A sequential fault still grows the window: misses are about faults out of sequence.
    CHECK(same(readahead_window(f.v, 500, {496, 512}, kFar), {500, 532}));
}

TEST_CASE("readahead_window: clamped to the VMA's file pages and to the end of the file") {
    // The VMA shows file pages [10, 30).
    CHECK(same(readahead_window(FileVma(10, 20, Advice::Sequential, 64, 16).v, 25, {16, 30}, kFar), {25, 30}));
    CHECK(same(readahead_window(FileVma(10, 20, Advice::Normal, 64, 16).v, 12, {0, 16}, kFar), {10, 16}));
    CHECK(same(readahead_window(FileVma(10, 20, Advice::Sequential, 64, 16).v, 25, {16, 30}, 27), {25, 27}));
    CHECK(same(readahead_window(FileVma(10, 20, Advice::Random, 64, 16).v, 26, {16, 30}, 27), {26, 27}));
    // A page wholly past the end of the file: an empty window (the fault is a SIGBUS).
    const FileRange past = readahead_window(FileVma(10, 20, Advice::Sequential, 64, 16).v, 28, {16, 30}, 27);
    CHECK(past.first == past.last);
}

// --- what a discard leaves ----------------------------------------------------------------------

// pte_after_discard is private to arena_ops.cpp: it is reached through clear_ptes, the step of
// unmap and DontNeed that forgets the pages' state, over one page per PTE value with no access
// (as a discarded page is, in the kernel too), in a real arena's table.
TEST_CASE("clear_ptes: a discarded page keeps its dirty bits, backing and edge; held data makes it dirty") {
    usermm::Arena arena(64ull << 20);
    ArenaCore& core = ArenaAccess::core(arena);
    std::vector<pte_t> values;
    for (unsigned v = 0; v <= 0xffff; ++v)
        if (!(v & (kPteProt | kPteLocked))) values.push_back(pte_t(v));
    const std::size_t ps = usermm::page_size();
    char* p = static_cast<char*>(arena.map(values.size() * ps, Prot::ReadWrite));
    const std::size_t first = core.page_index(reinterpret_cast<std::uintptr_t>(p));
    for (std::size_t k = 0; k < values.size(); ++k) core.pte[first + k].store(values[k]);
    clear_ptes(core, {reinterpret_cast<std::uintptr_t>(p), reinterpret_cast<std::uintptr_t>(p) + values.size() * ps});
    unsigned wrong = 0;
    for (std::size_t k = 0; k < values.size(); ++k) {
        const pte_t v = values[k];
        const pte_t want = pte_t((v & (kPteDirty | kPteFile | kPteEdge)) | ((v & kPtePopulated) ? kPteDirtySnapshot : 0));
        const pte_t got = core.pte[first + k].load();
        if (got != want && wrong++ < 5) {
            INFO(std::hex << v << " -> " << got << ", want " << want);
            CHECK(got == want);
        }
        core.pte[first + k].store(0);  // the kernel's state again, for verify() and the destructor
    }
    CHECK(wrong == 0);
    arena.verify();
}

// --- the transitions (lib/README.md, "The per-page state machine") --------------------------------
//
// Each case drives one transition through the public API (or, for keep_failed, the API world's
// own step) and reads the page's PTE back; verify() then checks that the protection it names is the
// kernel's.

namespace {

// A test arena of 64 MiB and its PTE table.
struct PteArena {
    usermm::Arena arena{64ull << 20};
    ArenaCore& core = ArenaAccess::core(arena);
    std::size_t ps = usermm::page_size();
    pte_t at(const void* p) const { return pte_t(core.pte_of(reinterpret_cast<std::uintptr_t>(p)).load()); }
    char* page(void* base, std::size_t i) const { return static_cast<char*>(base) + i * ps; }
};

constexpr pte_t kWritten = pte_t(to_pte(Prot::ReadWrite) | kPtePopulated | kPteDirty | kPteDirtyFile);
constexpr pte_t kAllDirty = pte_t(kPteDirty | kPteDirtyFile);
constexpr pte_t kPop = kPtePopulated;
constexpr pte_t kF = kPteFile;

bool uffd() { return usermm::engine() == usermm::Engine::Uffd; }

}  // namespace

TEST_CASE("untouched -> readable (read fault): the zero page, nothing populated, nothing dirty") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(16 * t.ps, Prot::ReadWrite, {.fault_around_pages = 4}));
    CHECK(t.at(p) == 0);
    CHECK(usermm_test::read_byte(t.page(p, 1)) == 0);
    for (std::size_t i = 0; i < 4; ++i) CHECK(t.at(t.page(p, i)) == R);  // the fault-around window
    CHECK(t.at(t.page(p, 4)) == 0);
    t.arena.verify();
}

TEST_CASE("untouched -> present writable (write fault), and readable -> writable (upgrade)") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(4 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    CHECK(t.at(p) == kWritten);
    CHECK(usermm_test::read_byte(t.page(p, 1)) == 0);
    CHECK(t.at(t.page(p, 1)) == R);
    usermm_test::write_byte(t.page(p, 1), 2);
    CHECK(t.at(t.page(p, 1)) == kWritten);
    CHECK(t.at(t.page(p, 2)) == 0);
    t.arena.verify();
}

TEST_CASE("protect narrows the access and keeps every flag; the next fault grants again") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(2 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    t.arena.protect(p, 2 * t.ps, Prot::Read);
    CHECK(t.at(p) == pte_t(R | kPop | kAllDirty));
    t.arena.protect(p, 2 * t.ps, Prot::ReadWrite);
    CHECK(t.at(p) == pte_t(R | kPop | kAllDirty));  // protect never grants
    CHECK(t.at(t.page(p, 1)) == 0);
    t.arena.protect(p, 2 * t.ps, Prot::None);
    CHECK(t.at(p) == pte_t(kPop | kAllDirty));
    t.arena.protect(p, 2 * t.ps, Prot::ReadWrite);
    CHECK(usermm_test::read_byte(p) == 1);  // the content was kept: a populated page, read again
    CHECK(t.at(p) == pte_t(R | kPop | kAllDirty));
    usermm_test::write_byte(p, 2);
    CHECK(t.at(p) == kWritten);
    t.arena.verify();
}

TEST_CASE("unmap and DontNeed discard: no access, populated gone, a page that held data is dirty") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(3 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    (void)usermm_test::read_byte(t.page(p, 1));
    t.arena.advise(p, 3 * t.ps, Advice::DontNeed);
    CHECK(t.at(p) == kPteDirty);  // written: dirty for snapshots and collect_dirty, not for a file
    CHECK(t.at(t.page(p, 1)) == 0);  // only read: nothing changed
    CHECK(usermm_test::read_byte(p) == 0);
    CHECK(t.at(p) == pte_t(R | kPteDirty));
    usermm_test::write_byte(t.page(p, 2), 1);
    t.arena.unmap(p, 3 * t.ps);
    CHECK(t.at(t.page(p, 2)) == kPteDirty);
    CHECK(t.at(p) == kPteDirty);
    t.arena.verify();
}

TEST_CASE("snapshot arms write tracking; the write after it copies, ends tracking, dirties") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(2 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    {
        const usermm::Snapshot s = t.arena.snapshot();
        // The snapshot took the dirty-snapshot bit (recorded as changed) and withheld write: the
        // uffd engine keeps the protection and adds its mark, the mprotect engine takes write away.
        const pte_t tracked = pte_t(kPteWriteTracked | kPop | kPteDirtyCollect | kPteDirtyFile);
        CHECK(t.at(p) == pte_t(tracked | (uffd() ? RW : R)));
        CHECK(t.at(t.page(p, 1)) == 0);  // untouched: nothing to track
        t.arena.verify();
        usermm_test::write_byte(p, 2);  // do_wp_page (uffd) or an upgrade (mprotect)
        CHECK(t.at(p) == kWritten);
        std::uint8_t old = 0;
        s.read(p, &old, 1);
        CHECK(old == 1);
        t.arena.verify();
    }
    {
        const usermm::Snapshot s = t.arena.snapshot();
        CHECK((t.at(p) & kPteWriteTracked) != 0);
    }
    // Nobody needs the tracking any more: write access comes back, with no dirty bit for it.
    CHECK(t.at(p) == pte_t(RW | kPop | kPteDirtyCollect | kPteDirtyFile));
    t.arena.verify();
}

TEST_CASE("collect_dirty clears dirty-collect and arms write tracking") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(2 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    const usermm::DirtySet d = t.arena.collect_dirty(p, 2 * t.ps);
    CHECK(d.contains(p));
    if (usermm::detail::uffd_async_available() && uffd()) {
        // The kernel tracks the range (dirty_async.cpp): present writable, not write-tracked; the
        // next write neither faults nor changes the PTE, and the next collection reports it.
        CHECK(t.at(p) == pte_t(kPop | kPteDirtySnapshot | kPteDirtyFile | RW));
        usermm_test::write_byte(p, 2);
        CHECK(t.at(p) == pte_t(kPop | kPteDirtySnapshot | kPteDirtyFile | RW));
        CHECK(t.arena.collect_dirty(p, 2 * t.ps).pages == std::vector<void*>{p});
        t.arena.verify();
        // A snapshot takes the range back: what the kernel saw written became marks, and the clean
        // page is write-tracked.
        usermm_test::write_byte(p, 3);
        {
            const usermm::Snapshot s = t.arena.snapshot();
            CHECK((t.at(p) & kPteWriteTracked) != 0);
        }
        CHECK(t.arena.collect_dirty(p, 2 * t.ps).pages == std::vector<void*>{p});
        return;
    }
    CHECK(t.at(p) == pte_t(kPteWriteTracked | kPop | kPteDirtySnapshot | kPteDirtyFile | (uffd() ? RW : R)));
    usermm_test::write_byte(p, 2);
    CHECK(t.at(p) == kWritten);
    t.arena.verify();
}

TEST_CASE("restore: pages written back are PROT_NONE, populated and dirty; pages that were zero are discarded") {
    PteArena t;
    char* p = static_cast<char*>(t.arena.map(2 * t.ps, Prot::ReadWrite, {.fault_around_pages = 1}));
    usermm_test::write_byte(p, 1);
    const usermm::Snapshot s = t.arena.snapshot();
    usermm_test::write_byte(p, 2);
    usermm_test::write_byte(t.page(p, 1), 3);  // untouched at the snapshot
    t.arena.restore(s);
    CHECK(t.at(p) == pte_t(kPop | kAllDirty));
    CHECK(t.at(t.page(p, 1)) == pte_t(kPteDirtySnapshot | kPteDirtyCollect | kPteDirtyFile));
    t.arena.verify();
    CHECK(usermm_test::read_byte(p) == 1);
    CHECK(t.at(p) == pte_t(R | kPop | kAllDirty));
    CHECK(usermm_test::read_byte(t.page(p, 1)) == 0);
    t.arena.verify();
}

// --- file pages ---------------------------------------------------------------------------------

namespace {

// A file VMA of `pages` pages right after a one-page anonymous VMA, so that its first page is a
// kernel boundary inside the arena.
struct FilePages {
    PteArena t;
    usermm_test::TempFile file;
    char* p = nullptr;
    FilePages(std::size_t pages, Prot prot, usermm::Share share, std::size_t fault_around = 1)
        : file(pages * usermm::page_size()) {
        char* anon = static_cast<char*>(t.arena.map(t.ps, Prot::ReadWrite));
        p = static_cast<char*>(t.arena.map_file(file.fd(), 0, pages * t.ps, prot, share,
                                                {.address = anon + t.ps, .fault_around_pages = fault_around}));
    }
    pte_t at(std::size_t i) const { return t.at(t.page(p, i)); }
};

}  // namespace

TEST_CASE("map_file: every page file-backed, edge marks where the kernel's mappings begin") {
    FilePages f(4, Prot::ReadWrite, usermm::Share::Shared);
    CHECK(f.at(0) == pte_t(kF | kPteEdge));
    for (std::size_t i = 1; i < 4; ++i) CHECK(f.at(i) == kF);
    CHECK(f.t.at(f.t.page(f.p, 4)) == kPteEdge);  // the anonymous reservation after the file
    f.t.arena.verify();
}

TEST_CASE("shared file page: read fault, write fault, sync takes write and dirty-file away") {
    FilePages f(4, Prot::ReadWrite, usermm::Share::Shared);
    CHECK(usermm_test::read_byte(f.t.page(f.p, 1)) == usermm_test::pattern_byte(f.t.ps));
    CHECK(f.at(1) == pte_t(kF | R));  // nothing populated: the page cache holds the content
    usermm_test::write_byte(f.t.page(f.p, 1), 7);
    CHECK(f.at(1) == pte_t(kF | kWritten));
    usermm_test::write_byte(f.t.page(f.p, 2), 8);
    CHECK(f.at(2) == pte_t(kF | kWritten));
    f.t.arena.sync(f.p, 4 * f.t.ps);
    CHECK(f.at(1) == pte_t(kF | R | kPop | kPteDirty));
    CHECK(f.at(2) == pte_t(kF | R | kPop | kPteDirty));
    CHECK(f.at(3) == kF);
    f.t.arena.verify();
    usermm_test::write_byte(f.t.page(f.p, 1), 9);  // dirty again: the next sync writes it
    CHECK(f.at(1) == pte_t(kF | kWritten));
    f.t.arena.verify();
}

TEST_CASE("shared file page: prefault grants write without dirtying for the file") {
    FilePages f(2, Prot::ReadWrite, usermm::Share::Shared);
    f.t.arena.prefault(f.p, 2 * f.t.ps, Prot::ReadWrite);
    CHECK(f.at(0) == pte_t(kF | kPteEdge | RW | kPop | kPteDirty));
    CHECK(f.at(1) == pte_t(kF | RW | kPop | kPteDirty));
    f.t.arena.verify();
}

TEST_CASE("private file page: the write makes the VMA's own copy, populated and dirty") {
    FilePages f(2, Prot::ReadWrite, usermm::Share::Private);
    usermm_test::write_byte(f.t.page(f.p, 1), 7);
    CHECK(f.at(1) == pte_t(kF | kWritten));
    f.t.arena.sync(f.p, 2 * f.t.ps);  // private VMAs are not written back: nothing changes
    CHECK(f.at(1) == pte_t(kF | kWritten));
    f.t.arena.verify();
}

TEST_CASE("readahead mark: set by WillNeed on untouched pages the page cache lacks, ended by the grant or the discard") {
    FilePages f(8, Prot::Read, usermm::Share::Shared);
    f.file.drop_cache();
    f.t.arena.advise(f.p, 8 * f.t.ps, Advice::WillNeed);
    for (std::size_t i = 1; i < 8; ++i) CHECK(f.at(i) == pte_t(kF | kPteReadahead));
    CHECK(usermm_test::read_byte(f.t.page(f.p, 3)) == usermm_test::pattern_byte(3 * f.t.ps));
    CHECK(f.at(3) == pte_t(kF | R));  // a readahead hit
    f.t.arena.advise(f.t.page(f.p, 5), f.t.ps, Advice::DontNeed);
    CHECK(f.at(5) == kF);  // a readahead wasted
    CHECK(f.t.arena.stats().readahead_hits >= 1);
    f.t.arena.verify();
}

// keep_failed is the API world's step after a failed fdatasync (tests/test_file_writeback.cpp
// makes real ones fail, on failfs); here it is called after a write-back that succeeded, under
// the arena's write lock as sync() calls it, to see what it leaves in the PTEs.
TEST_CASE("saved after a failed write-back: PROT_NONE, dirty-file, saved; the next access puts the copy back") {
    FilePages f(4, Prot::ReadWrite, usermm::Share::Shared);
    usermm_test::write_byte(f.t.page(f.p, 1), 7);
    (void)usermm_test::read_byte(f.t.page(f.p, 2));
    {
        FileSync s;
        std::lock_guard<RwSpinLock> guard(f.t.core.lock);
        Vma& v = *std::next(f.t.core.tree.begin());
        REQUIRE(v.file != nullptr);
        const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(f.p);
        writeback(f.t.core, v, {start, start + 4 * f.t.ps}, "test", s);
        CHECK(f.at(1) == pte_t(kF | R | kPop | kPteDirty));
        REQUIRE(s.finish() == 0);
        keep_failed(f.t.core, s);
    }
    CHECK(f.at(1) == pte_t(kF | kPop | kAllDirty | kPteSaved));
    CHECK(f.at(2) == pte_t(kF | R));  // clean and not writable: not at risk
    f.t.arena.verify();
    CHECK(usermm_test::read_byte(f.t.page(f.p, 1)) == 7);
    CHECK(f.at(1) == pte_t(kF | R | kPop | kAllDirty));
    f.t.arena.sync(f.p, 4 * f.t.ps);
    CHECK(f.at(1) == pte_t(kF | R | kPop | kPteDirty));
    CHECK(f.file.content()[f.t.ps] == 7);
    f.t.arena.verify();
}
