// What users had to write themselves: finding a VMA by name, its resident and committed memory,
// the active write-tracking engine, typed and owned mappings. And what the header says about
// names, file paths and copy-on-write counters, checked against the kernel.
#include <doctest/doctest.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <usermm/usermm.hpp>

#include "file_test_util.hpp"
#include "page_ops_api.hpp"
#include "test_util.hpp"
#include "vma.hpp"

using namespace usermm_test;
using usermm::Arena;
using usermm::Engine;
using usermm::Mapping;
using usermm::Prot;
using usermm::Share;

namespace {

const std::size_t kPage = usermm_test::os_page_size();

std::string proc_self_maps() {
    std::ifstream in("/proc/self/maps");
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct Record {
    std::uint64_t key;
    std::uint64_t version;
    std::uint64_t payload[6];
};

}  // namespace

// First in the file, so that in a full run it is the first usermm call of the process: engine()
// must set the process up itself rather than report the engine of a process not set up yet.
TEST_CASE("engine() names the write-tracking engine, from the first call of the process on") {
    const Engine first = usermm::engine();
    Arena arena(1 << 24);
    CHECK(usermm::engine() == first);
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    CHECK(first == (uffd ? Engine::Uffd : Engine::Mprotect));
    const char* env = std::getenv("USERMM_ENGINE");
    if (env && std::string_view(env) == "mprotect") CHECK(first == Engine::Mprotect);
    // A forked child has lost the parent's userfaultfd registrations and tracks with mprotect.
    const ChildEnd end = run_in_child([] {
        if (usermm::engine() != Engine::Mprotect) _exit(3);
    });
    CHECK(end.exit_code == 0);
}

TEST_CASE("find_vma finds the lowest VMA of a name, by its kept name") {
    Arena arena(1 << 26);
    arena.map(4 * kPage, Prot::ReadWrite, {.name = "before"});
    char* table = static_cast<char*>(arena.map(16 * kPage, Prot::ReadWrite, {.name = "kv-table"}));
    arena.map(4 * kPage, Prot::Read, {.name = "after"});
    const std::string long_name(60, 'n');
    char* longer = static_cast<char*>(arena.map(kPage, Prot::Read, {.name = long_name}));

    const std::optional<usermm::VmaInfo> v = arena.find_vma("kv-table");
    REQUIRE(v);
    CHECK(v->start == table);
    CHECK(v->length == 16 * kPage);
    CHECK(v->name == "kv-table");
    CHECK(v->prot == Prot::ReadWrite);
    CHECK_FALSE(arena.find_vma("kv"));
    CHECK_FALSE(arena.find_vma("kv-table2"));
    CHECK_FALSE(arena.find_vma(""));
    REQUIRE(arena.find_vma(long_name));
    CHECK(arena.find_vma(long_name)->start == longer);

    arena.protect(table, 4 * kPage, Prot::Read);  // two VMAs named kv-table now
    REQUIRE(arena.find_vma("kv-table"));
    CHECK(arena.find_vma("kv-table")->start == table);
    CHECK(arena.find_vma("kv-table")->length == 4 * kPage);
    arena.unmap(table, 16 * kPage);
    CHECK_FALSE(arena.find_vma("kv-table"));
}

TEST_CASE("committed counts pages granted write access, resident those the kernel holds") {
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map(64 * kPage, Prot::ReadWrite, {.name = "m", .fault_around_pages = 1}));
    auto info = [&arena] { return *arena.find_vma("m"); };
    CHECK(info().committed == 0);
    CHECK(info().resident == 0);

    CHECK(read_byte(p) == 0);  // the zero page: no memory of its own
    CHECK(info().committed == 0);
    CHECK(info().resident == 0);

    write_byte(p + 20 * kPage, 1);
    write_byte(p + 21 * kPage, 1);
    CHECK(info().committed == 2 * kPage);
    CHECK(info().resident == 2 * kPage);

    arena.prefault(p + 30 * kPage, 10 * kPage, Prot::Write);  // granted, not written: committed only
    CHECK(info().committed == 12 * kPage);
    CHECK(info().resident == 2 * kPage);
    write_byte(p + 35 * kPage, 1);
    CHECK(info().resident == 3 * kPage);

    arena.protect(p + 20 * kPage, kPage, Prot::Read);  // the memory stays
    CHECK(arena.vmas()[1].committed == kPage);
    CHECK(arena.vmas()[1].resident == kPage);

    arena.advise(p, 64 * kPage, usermm::Advice::DontNeed);
    for (const usermm::VmaInfo& v : arena.vmas()) {
        CHECK(v.committed == 0);
        CHECK(v.resident == 0);
    }
}

TEST_CASE("a file VMA's mapped pages are committed and resident, from the page cache") {
    TempFile file(8 * kPage);
    Arena arena(1 << 26);
    const char* p = static_cast<const char*>(
        arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.fault_around_pages = 1}));
    CHECK(arena.vmas()[0].committed == 0);
    CHECK(read_byte(p + 3 * kPage) == pattern_byte(3 * kPage));
    CHECK(arena.vmas()[0].committed == kPage);
    CHECK(arena.vmas()[0].resident == kPage);
}

// The page-state table of a 1 TiB VMA is 512 MiB, almost all of it never touched: vmas() must not
// read it, or it would map every page of it (mincore then reports them).
TEST_CASE("vmas() reads only the touched part of the page-state table" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    Arena arena(1ull << 40);
    char* p = static_cast<char*>(arena.map(1ull << 40, Prot::ReadWrite, {.name = "huge"}));
    for (std::size_t i = 0; i < 4; ++i) write_byte(p + i * (256ull << 30), 1);
    usermm::detail::ArenaCore& core = usermm::detail::ArenaAccess::core(arena);
    auto table_pages_mapped = [&core] {
        std::vector<unsigned char> vec(core.pte_bytes / kPage);
        REQUIRE(mincore(core.pte, core.pte_bytes, vec.data()) == 0);
        std::size_t n = 0;
        for (unsigned char c : vec) n += c & 1;
        return n;
    };
    const std::size_t before = table_pages_mapped();
    const std::vector<usermm::VmaInfo> v = arena.vmas();
    CHECK(table_pages_mapped() == before);
    REQUIRE(v.size() == 1);
    CHECK(v[0].committed == 4 * 16 * kPage);  // four fault-around windows made writable
    CHECK(v[0].resident == 4 * kPage);
}

TEST_CASE("map_span maps count objects, zero until written") {
    Arena arena(1 << 26);
    std::span<Record> records = arena.map_span<Record>(1000, Prot::ReadWrite, {.name = "records"});
    CHECK(records.size() == 1000);
    CHECK(reinterpret_cast<std::uintptr_t>(records.data()) % kPage == 0);
    const usermm::VmaInfo v = *arena.find_vma("records");
    CHECK(v.start == records.data());
    CHECK(v.length == (1000 * sizeof(Record) + kPage - 1) / kPage * kPage);
    CHECK(records[999].key == 0);
    records[999].key = 7;
    CHECK(records[999].key == 7);

    const usermm::Stats before = arena.stats();
    try {
        arena.map_span<Record>(std::numeric_limits<std::size_t>::max() / 8, Prot::ReadWrite);
        FAIL("an overflowing count was accepted");
    } catch (const usermm::Error& e) {
        CHECK(e.code().value() == EINVAL);
        CHECK(std::string(e.what()).find("usermm::Arena::map_span: count") != std::string::npos);
    }
    CHECK(arena.vmas().size() == 1);
    CHECK(arena.stats() == before);
}

TEST_CASE("a Mapping unmaps its VMA with the length it was mapped with") {
    Arena arena(1 << 26);
    {
        Mapping m(arena, 3 * kPage + 5, Prot::ReadWrite, {.name = "owned"});
        REQUIRE(m);
        CHECK(m.size() == 3 * kPage + 5);
        CHECK(arena.find_vma("owned")->start == m.get());
        CHECK(arena.find_vma("owned")->length == 4 * kPage);
        write_byte(static_cast<char*>(m.get()) + 3 * kPage, 9);
        const std::span<Record> s = m.as_span<Record>();
        CHECK(static_cast<void*>(s.data()) == m.get());
        CHECK(s.size() == (3 * kPage + 5) / sizeof(Record));
    }
    CHECK(arena.vmas().empty());
    arena.verify();
}

TEST_CASE("a Mapping moves, and release() gives the VMA up") {
    Arena arena(1 << 26);
    Mapping a(arena, kPage, Prot::ReadWrite, {.name = "a"});
    void* const at = a.get();
    Mapping b(std::move(a));
    CHECK_FALSE(a);
    CHECK(a.get() == nullptr);
    CHECK(a.size() == 0);
    CHECK(b.get() == at);

    Mapping c(arena, 2 * kPage, Prot::Read, {.name = "c"});
    c = std::move(b);  // c's own VMA goes
    CHECK(c.get() == at);
    CHECK_FALSE(arena.find_vma("c"));
    REQUIRE(arena.find_vma("a"));

    void* const kept = c.release();
    CHECK(kept == at);
    CHECK_FALSE(c);
    {
        Mapping empty;
        Mapping gone = std::move(c);
    }
    REQUIRE(arena.find_vma("a"));
    arena.unmap(kept, kPage);
    CHECK(arena.vmas().empty());
}

TEST_CASE("a Mapping whose VMA the program unmapped itself reports it at destruction") {
    const ChildEnd end = run_in_child([] {
        Arena arena(1 << 26);
        {
            Mapping m(arena, 2 * kPage, Prot::ReadWrite);
            arena.unmap(m.get(), kPage);
        }
        _exit(arena.vmas().size() == 1 ? 0 : 3);
    });
    CHECK(end.exit_code == 0);
    CHECK(end.err.find("usermm: usermm::Mapping::~Mapping: usermm::Arena::unmap:") != std::string::npos);
}

// --- what the header says ----------------------------------------------------------------------

TEST_CASE("a VMA's name is usermm's own: /proc/self/maps does not show it") {
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map(4 * kPage, Prot::ReadWrite, {.name = "name-of-issue-17"}));
    write_byte(p, 1);
    CHECK(arena.vmas()[0].name == "name-of-issue-17");
    CHECK(proc_self_maps().find("name-of-issue-17") == std::string::npos);

    TempFile file(4 * kPage);
    arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "file-name-of-issue-17"});
    const std::string maps = proc_self_maps();
    CHECK(maps.find("file-name-of-issue-17") == std::string::npos);
    CHECK(maps.find(file.path()) != std::string::npos);  // the kernel maps the file itself
    CHECK(maps.find("memfd:") == std::string::npos);
}

TEST_CASE("VmaInfo::file is the path a descriptor was opened by, not /proc/self/fd/N") {
    TempFile file(4 * kPage);
    char real[PATH_MAX];
    REQUIRE(realpath(file.path().c_str(), real) != nullptr);
    Arena arena(1 << 26);
    arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "by-fd"});
    arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private, {.name = "by-path"});
    CHECK(arena.find_vma("by-fd")->file == real);
    CHECK(arena.find_vma("by-path")->file == real);  // the first mapping of the file named it
}

TEST_CASE("a write to a private file VMA is a write fault, not a cow fault; a snapshot's copy is") {
    TempFile file(4 * kPage);
    Arena arena(1 << 26);
    char* f = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Private,
                                                {.name = "private-file"}));
    write_byte(f, 1);
    const usermm::Stats file_stats = arena.find_vma("private-file")->stats;
    CHECK(file_stats.write_faults >= 1);
    CHECK(file_stats.cow_faults == 0);
    CHECK(file_stats.cow_bytes_copied == 0);

    char* anon = static_cast<char*>(arena.map(4 * kPage, Prot::ReadWrite, {.name = "anon"}));
    write_byte(anon, 1);
    const usermm::Snapshot snap = arena.snapshot(anon, 4 * kPage);
    write_byte(anon, 2);
    CHECK(arena.find_vma("anon")->stats.cow_faults == 1);
    CHECK(snap.stats().cow_faults == 1);
}
