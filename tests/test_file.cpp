// File VMAs against real files: content read on demand, private writes that never reach the file,
// shared writes that reach it byte for byte at sync, unmap and destruction, the end of the file,
// readahead and the counters.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <memory>
#include <thread>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "file_test_util.hpp"
#include "map_budget.hpp"
#include "mapped_file.hpp"
#include "page_ops_api.hpp"
#include "vma.hpp"
#include "test_util.hpp"

namespace {

using usermm::Advice;
using usermm::Arena;
using usermm::Prot;
using usermm::Share;
using usermm_test::at;
using usermm_test::pattern_byte;
using usermm_test::read_byte;
using usermm_test::TempFile;
using usermm_test::write_byte;

[[maybe_unused]] const unsigned g_watchdog = alarm(60);

const std::size_t kPage = usermm_test::os_page_size();

usermm::VmaInfo only_vma(const Arena& arena) {
    const auto v = arena.vmas();
    REQUIRE(v.size() == 1);
    return v[0];
}

}  // namespace

// The kernel reads the pages, with its own read-around at the first access: usermm counts the pages
// the page cache lacked when it mapped them, each once.
TEST_CASE("random reads see the file's bytes, and each page is counted read at most once") {
    TempFile file(64 * kPage + 123);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.name = "data"}));
    std::mt19937_64 rng(7);
    for (int i = 0; i < 2000; ++i) {
        const std::size_t off = rng() % file.size();
        REQUIRE(read_byte(p + off) == pattern_byte(off));
    }
    // The last page holds 123 bytes of the file; the rest of it reads as zeros.
    for (std::size_t off = 64 * kPage; off < file.size(); ++off) REQUIRE(read_byte(p + off) == pattern_byte(off));
    for (std::size_t off = file.size(); off < 65 * kPage; ++off) REQUIRE(read_byte(p + off) == 0);
    const usermm::Stats s = only_vma(arena).stats;
    CHECK(s.major_faults >= 1);
    CHECK(s.file_pages_read >= 1);
    CHECK(s.file_pages_read <= 65);
    CHECK(s.file_bytes_read <= file.size());
    CHECK(s.file_bytes_read >= s.file_pages_read * kPage - kPage);
    arena.verify();
}

TEST_CASE("major faults equal the faults that read a page, with fault-around and readahead off") {
    TempFile file(32 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(
        arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.fault_around_pages = 1}));
    arena.advise(p, file.size(), Advice::Random);
    for (std::size_t i = 0; i < 32; i += 2) REQUIRE(read_byte(p + i * kPage + 5) == pattern_byte(i * kPage + 5));
    const usermm::Stats s = only_vma(arena).stats;
    CHECK(s.major_faults == 16);
    CHECK(s.minor_faults == 0);
    CHECK(s.file_pages_read == 16);
    CHECK(s.readahead_pages == 0);
}

TEST_CASE("a private write stays in the VMA: the file and another mapping never see it") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Private));
    char* q = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private));
    REQUIRE(read_byte(p + 100) == pattern_byte(100));
    write_byte(p + 100, std::uint8_t(pattern_byte(100) ^ 0xff));
    write_byte(p + 5 * kPage, 0x5a);  // a write as the first access to its page
    CHECK(read_byte(p + 100) == std::uint8_t(pattern_byte(100) ^ 0xff));
    CHECK(read_byte(p + 5 * kPage) == 0x5a);
    CHECK(read_byte(q + 100) == pattern_byte(100));
    CHECK(read_byte(q + 5 * kPage) == pattern_byte(5 * kPage));
    arena.sync(p, file.size());
    arena.unmap(p, file.size());
    CHECK(file.content() == file.expected());
    arena.verify();
}

TEST_CASE("shared writes reach the file at sync, byte for byte, and sync writes only dirty pages") {
    TempFile file(64 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    for (std::size_t i : {3u, 4u, 5u, 40u}) {
        write_byte(p + i * kPage + 7, 0xee);
        want[i * kPage + 7] = 0xee;
    }
    CHECK(only_vma(arena).stats.pages_dirtied == 4);
    arena.sync(p, file.size());
    CHECK(file.content() == want);
    usermm::Stats s = only_vma(arena).stats;
    CHECK(s.pages_written_back == 4);
    CHECK(s.bytes_written_back == 4 * kPage);
    // Clean again, and write-protected: the next write is seen and written.
    arena.sync(p, file.size());
    CHECK(only_vma(arena).stats.pages_written_back == 4);
    write_byte(p + 4 * kPage, 0x11);
    want[4 * kPage] = 0x11;
    arena.sync(p, file.size());
    CHECK(file.content() == want);
    CHECK(only_vma(arena).stats.pages_written_back == 5);
    arena.verify();
}

TEST_CASE("unmap and the arena's destruction write dirty shared pages back") {
    TempFile file(8 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        write_byte(p + 1, 0x42);
        want[1] = 0x42;
        arena.unmap(p, 4 * kPage);
        CHECK(file.content() == want);
        write_byte(p + 6 * kPage, 0x43);
        want[6 * kPage] = 0x43;
    }
    CHECK(file.content() == want);
}

TEST_CASE("two shared mappings of the same file see each other's writes at once") {
    TempFile file(8 * kPage);
    Arena a(1 << 24), b(1 << 24);
    char* p = static_cast<char*>(a.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* q = static_cast<char*>(b.map_file(file.path(), 2 * kPage, 4 * kPage, Prot::ReadWrite, Share::Shared));
    write_byte(p + 2 * kPage + 9, 0x77);
    CHECK(read_byte(q + 9) == 0x77);
    write_byte(q + kPage, 0x78);
    CHECK(read_byte(p + 3 * kPage) == 0x78);
}

TEST_CASE("a page wholly past the end of the file gets SIGBUS, also after truncation") {
    TempFile file(4 * kPage + 10);
    const auto end = usermm_test::run_in_child([&] {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.fd(), 0, 8 * kPage, Prot::Read, Share::Private));
        (void)read_byte(p + 4 * kPage + 11);  // the last page, past the end: zeros
        (void)read_byte(p + 5 * kPage);
    });
    CHECK(end.signal == SIGBUS);
    CHECK(end.err.find("past the end") != std::string::npos);

    const auto truncated = usermm_test::run_in_child([&] {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private,
                                                    {.fault_around_pages = 1}));
        (void)read_byte(p);
        if (ftruncate(file.fd(), off_t(kPage)) != 0) _exit(3);
        (void)read_byte(p + 2 * kPage);
    });
    CHECK(truncated.signal == SIGBUS);
}

TEST_CASE("readahead grows with a sequential scan and counts its hits") {
    TempFile file(1024 * kPage);
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    for (std::size_t off = 0; off < file.size(); off += kPage) REQUIRE(read_byte(p + off) == pattern_byte(off));
    const usermm::Stats s = only_vma(arena).stats;
    CHECK(s.file_pages_read <= 1024);   // what the kernel's readahead had not read when mapped
    CHECK(s.major_faults < 1024 / 16);  // windows grow past the fault-around window
    CHECK(s.readahead_hits == s.readahead_pages);
    CHECK(s.readahead_wasted == 0);
}

// DontNeed drops the VMA's pages, not the kernel's page cache (as MADV_DONTNEED): the next read is
// minor; once the cache is dropped too (POSIX_FADV_DONTNEED), it is major again.
TEST_CASE("WillNeed reads ahead of faults; DontNeed drops the VMA's pages, and a dropped cache makes reads major") {
    TempFile file(64 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    arena.advise(p, 32 * kPage, Advice::WillNeed);
    CHECK(only_vma(arena).stats.file_pages_read == 32);
    CHECK(read_byte(p + 3 * kPage) == pattern_byte(3 * kPage));
    usermm::Stats s = only_vma(arena).stats;
    CHECK(s.major_faults == 0);
    CHECK(s.minor_faults == 1);
    CHECK(s.readahead_hits >= 1);  // the fault-around window, as far as it lies in the VMA
    arena.advise(p, file.size(), Advice::DontNeed);
    CHECK(arena.stats().readahead_wasted == 32 - s.readahead_hits);
    CHECK(read_byte(p + 3 * kPage) == pattern_byte(3 * kPage));
    CHECK(arena.stats().major_faults == 0);
    arena.advise(p, file.size(), Advice::DontNeed);
    file.drop_cache();
    CHECK(read_byte(p + 3 * kPage) == pattern_byte(3 * kPage));
    CHECK(arena.stats().major_faults == 1);
    arena.verify();
}

TEST_CASE("bad arguments are refused with the argument named, and change nothing") {
    TempFile file(4 * kPage);
    Arena arena(1 << 24);
    auto code = [](auto&& f) {
        try {
            f();
        } catch (const usermm::Error& e) {
            return e.code().value();
        }
        return 0;
    };
    CHECK(code([&] { arena.map_file(-1, 0, kPage, Prot::Read, Share::Private); }) == EBADF);
    CHECK(code([&] { arena.map_file(file.fd(), 100, kPage, Prot::Read, Share::Private); }) == EINVAL);
    const int ro = open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
    CHECK(code([&] { arena.map_file(ro, 0, kPage, Prot::ReadWrite, Share::Shared); }) == EACCES);
    void* p = arena.map_file(ro, 0, kPage, Prot::Read, Share::Shared);
    CHECK(code([&] { arena.protect(p, kPage, Prot::ReadWrite); }) == EACCES);
    close(ro);  // usermm keeps its own descriptor
    CHECK(read_byte(p) == pattern_byte(0));
    CHECK(code([&] { arena.map_file("/nonexistent/usermm", 0, kPage, Prot::Read, Share::Private); }) == ENOENT);
    CHECK(code([&] { arena.map_file("/tmp", 0, kPage, Prot::Read, Share::Private); }) == ENODEV);
    CHECK(code([&] { arena.snapshot(p, kPage); }) == ENOTSUP);  // arena.snapshot() skips file VMAs
    arena.verify();
    CHECK(arena.vmas().size() == 1);
}

// Once a bug: write-back shared the caller's open file description, and its O_APPEND made every
// write-back append to the file instead of writing the page in place.
TEST_CASE("write-back goes to the page's offset whatever flags the caller's descriptor has") {
    TempFile file(4 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    const int fd = open(file.path().c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
    REQUIRE(fd >= 0);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(fd, 0, file.size(), Prot::ReadWrite, Share::Shared));
    close(fd);
    write_byte(p + kPage + 3, 0x5a);
    want[kPage + 3] = 0x5a;
    arena.sync(p, file.size());
    CHECK(file.content() == want);
}

// Once a bug: the edges of huge-page VMAs were left out of the kernel-mapping count, which must
// never be lower than the kernel's (and verify() finds it equal).
TEST_CASE("usermm's count of kernel mappings stays at or above the kernel's with file and huge-page VMAs") {
    // The kernel's mappings that are usermm's: those inside the arena. Counted from
    // /proc/self/maps, so that the heap's own mappings (a sanitizer's allocator makes many) do not
    // count.
    Arena arena(1 << 28);
    auto usermm_mappings = [&arena] {
        std::ifstream maps("/proc/self/maps");
        const auto lo = reinterpret_cast<std::uintptr_t>(arena.base()), hi = lo + arena.size();
        long n = 0;
        for (std::string line; std::getline(maps, line);) {
            unsigned long from = 0, to = 0;
            if (std::sscanf(line.c_str(), "%lx-%lx", &from, &to) != 2) continue;
            n += to > lo && from < hi;
        }
        return n;
    };
    std::vector<std::unique_ptr<TempFile>> files;
    for (int i = 0; i < 20; ++i) files.push_back(std::make_unique<TempFile>(kPage));
    const long kernel_before = usermm_mappings();
    const long usermm_before = usermm::detail::map_budget_used();
    for (int i = 0; i < 20; ++i) {
        void* h = arena.map(2 << 20, Prot::ReadWrite, {.huge_pages = true});
        write_byte(h, 1);
        char* f = static_cast<char*>(arena.map_file(files[std::size_t(i)]->fd(), 0, kPage, Prot::Read, Share::Private));
        CHECK(read_byte(f) == pattern_byte(0));
    }
    const long kernel = usermm_mappings() - kernel_before;
    const long counted = usermm::detail::map_budget_used() - usermm_before;
    INFO("kernel mappings added: ", kernel, ", counted by usermm: ", counted);
    CHECK(kernel > 40);
    CHECK(counted >= kernel);
    arena.verify();
}

// Once a bug: a forked child's writes to a shared file VMA, which its parent sees at once (the page
// cache is shared, as the kernel's is), never reached the file unless the child wrote them back.
TEST_CASE("the parent's sync writes pages a forked child dirtied, as msync would") {
    TempFile file(4 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    write_byte(p, 0x11);  // writable and dirty at the fork
    want[0] = 0x11;
    const auto child = usermm_test::run_in_child([&] {
        write_byte(p + 1, 0x42);
        write_byte(p + 2 * kPage, 0x43);  // a page the parent never touched
        _exit(0);                         // no sync, no destructor
    });
    REQUIRE(child.exited);
    want[1] = 0x42;
    want[2 * kPage] = 0x43;
    CHECK(read_byte(p + 1) == 0x42);
    arena.sync(p, file.size());
    CHECK(file.content() == want);
}

// Once a bug: sync through one shared VMA left out pages written through another VMA of the file.
TEST_CASE("sync through one shared VMA writes what another VMA of the file wrote") {
    TempFile file(4 * kPage);
    std::vector<std::uint8_t> want = file.expected();
    Arena a(1 << 24), b(1 << 24);
    char* p = static_cast<char*>(a.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* q = static_cast<char*>(b.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    write_byte(q + kPage + 5, 0x99);
    want[kPage + 5] = 0x99;
    a.sync(p, file.size());
    CHECK(file.content() == want);
    write_byte(q + kPage + 6, 0x98);  // b's page is still writable: b's own sync takes this one
    want[kPage + 6] = 0x98;
    b.sync(q, file.size());
    CHECK(file.content() == want);
}

// A random reader stops paying for read-around: once faults out of sequence keep missing what was
// mapped around earlier ones, a fault maps its own page and cached neighbours only (the kernel's
// mmap_miss). With Random advice that holds from the first fault, and the kernel (MADV_RANDOM)
// reads the page alone: every fault is major and reads one page.
TEST_CASE("random faults fall back from read-around to single pages") {
    TempFile file(4096 * kPage);
    std::vector<std::size_t> windows(128);
    for (std::size_t i = 0; i < windows.size(); ++i) windows[i] = i;
    std::shuffle(windows.begin(), windows.end(), std::mt19937_64(3));
    {
        Arena arena(1 << 26);
        char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
        arena.advise(p, file.size(), Advice::Random);
        for (std::size_t w : windows) REQUIRE(read_byte(p + (w * 32 + 5) * kPage) == pattern_byte((w * 32 + 5) * kPage));
        const usermm::Stats s = only_vma(arena).stats;
        CHECK(s.major_faults == 128);
        CHECK(s.file_pages_read == 128);
        CHECK(s.fault_around_pages == 0);
    }
    file.drop_cache();
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    for (std::size_t w : windows) REQUIRE(read_byte(p + (w * 32 + 5) * kPage) == pattern_byte((w * 32 + 5) * kPage));
    const usermm::Stats s = only_vma(arena).stats;
    CHECK(s.major_faults <= 128);
    CHECK(s.file_pages_read <= 102 * 16 + 27);  // windows of 16 while they might pay, then one page
}

// verify() compares what backs each page, not only its protection: a file page that usermm took
// for anonymous memory (or the reverse) is a disagreement with the kernel.
TEST_CASE("verify() notices a page whose backing usermm has wrong") {
    TempFile file(4 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    CHECK(read_byte(p) == pattern_byte(0));
    arena.verify();
    usermm::detail::ArenaCore& core = usermm::detail::ArenaAccess::core(arena);
    auto& pte = core.pte_of(reinterpret_cast<std::uintptr_t>(p) + kPage);
    pte.fetch_and(usermm::detail::pte_t(~usermm::detail::kPteFile));
    CHECK_THROWS_WITH_AS(arena.verify(), doctest::Contains("a file mapping"), usermm::Error);
    pte.fetch_or(usermm::detail::kPteFile);
    arena.verify();
}

// verify() checks that each file page is backed by the VMA's file at the VMA's offset (the inode
// and offset the kernel shows), not only that it is a file page.
TEST_CASE("verify() notices a file VMA whose offset or file usermm has wrong") {
    TempFile file(8 * kPage), other(8 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Shared));
    CHECK(read_byte(p + kPage) == pattern_byte(kPage));
    arena.verify();
    usermm::detail::Vma& v = *usermm::detail::ArenaAccess::core(arena).tree.begin();
    ++v.pgoff;
    CHECK_THROWS_WITH_AS(arena.verify(), doctest::Contains("at offset"), usermm::Error);
    --v.pgoff;
    arena.verify();
    struct stat st;
    REQUIRE(fstat(other.fd(), &st) == 0);
    const ino_t ino = v.file->ino;
    v.file->ino = st.st_ino;
    CHECK_THROWS_WITH_AS(arena.verify(), doctest::Contains(file.path().c_str()), usermm::Error);
    v.file->ino = ino;
    arena.verify();
}

// Read-ahead pages still unmapped when their VMA goes count as wasted, in its arena.
TEST_CASE("pages read ahead and never mapped count as wasted when the VMA goes") {
    TempFile file(64 * kPage);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    arena.advise(p, file.size(), Advice::WillNeed);
    CHECK(arena.stats().readahead_pages == 64);
    arena.unmap(p, file.size());
    CHECK(arena.stats().readahead_wasted == 64);
    CHECK(arena.stats().readahead_hits == 0);
}
