// File VMAs on the kernel's page cache: the VMA maps the file itself, so the kernel holds the one
// copy of each page (no shmem), every mapping of the file and write(2) agree, truncation is SIGBUS,
// a fault is major exactly when the page was not in the page cache, prefault(Write) dirties
// nothing, fork() keeps both sides' writes beyond the first GiB, and random access over a 1.5 GiB
// file stays within the kernel's mapping budget.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "file_test_util.hpp"
#include "test_util.hpp"

namespace {

using usermm::Advice;
using usermm::Arena;
using usermm::Prot;
using usermm::Share;
using usermm::Stats;
using usermm_test::at;
using usermm_test::pattern_byte;
using usermm_test::pattern_range;
using usermm_test::read_byte;
using usermm_test::read_range;
using usermm_test::read_u64;
using usermm_test::TempFile;
using usermm_test::write_byte;
using usermm_test::write_u64;
using Bytes = std::vector<std::uint8_t>;

[[maybe_unused]] const unsigned g_watchdog = alarm(150);

const std::size_t kPage = usermm_test::os_page_size();
constexpr std::uint64_t kMiB = 1ull << 20;
constexpr std::uint64_t kGiB = 1ull << 30;

// A field of a "Name:  value kB" file (/proc/self/status, /proc/meminfo), in KiB; -1 if absent.
long proc_kib(const char* file, std::string_view field) {
    std::ifstream in(file);
    for (std::string line; std::getline(in, line);)
        if (line.size() > field.size() && line.starts_with(field) && line[field.size()] == ':')
            return std::stol(line.substr(field.size() + 1));
    return -1;
}

// One line of /proc/self/maps.
struct KernelMapping {
    unsigned long from = 0, to = 0, offset = 0, inode = 0;
    std::string dev, path, line;
};

std::vector<KernelMapping> kernel_mappings() {
    std::ifstream in("/proc/self/maps");
    std::vector<KernelMapping> out;
    for (std::string line; std::getline(in, line);) {
        KernelMapping m;
        char perms[8], dev[16];
        int path_at = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx %7s %lx %15s %lu %n", &m.from, &m.to, perms, &m.offset, dev, &m.inode,
                        &path_at) < 6)
            continue;
        m.dev = dev;
        if (path_at > 0) m.path = line.substr(std::size_t(path_at));
        m.line = line;
        out.push_back(std::move(m));
    }
    return out;
}

// Checks that /proc/self/maps shows every byte of [p, p + length) as `file` from `offset` on (its
// device, inode and path, at the offset that byte has in the file), and no usermm memfd anywhere.
void check_maps_show_file(const void* p, std::size_t length, const TempFile& file, std::uint64_t offset) {
    struct stat st {};
    REQUIRE(fstat(file.fd(), &st) == 0);
    char real[PATH_MAX];
    REQUIRE(realpath(file.path().c_str(), real) != nullptr);
    char dev[32];
    std::snprintf(dev, sizeof dev, "%02x:%02x", major(st.st_dev), minor(st.st_dev));
    const auto lo = reinterpret_cast<unsigned long>(p), hi = lo + length;
    unsigned long covered = 0;
    long wrong = 0, memfds = 0;
    std::string first_wrong, first_memfd;
    for (const KernelMapping& m : kernel_mappings()) {
        if (m.path.find("memfd:usermm") != std::string::npos && memfds++ == 0) first_memfd = m.line;
        if (m.to <= lo || m.from >= hi) continue;
        const unsigned long from = std::max(m.from, lo), to = std::min(m.to, hi);
        covered += to - from;
        const bool ok = m.dev == dev && m.inode == st.st_ino && m.path == real &&
                        m.offset + (from - m.from) == offset + (from - lo);
        if (!ok && wrong++ == 0) first_wrong = m.line;
    }
    INFO("the file: ", real, ", dev ", dev, ", inode ", st.st_ino, ", offset ", offset);
    INFO("first wrong line: ", first_wrong);
    INFO("first usermm memfd: ", first_memfd);
    CHECK(covered == length);
    CHECK(wrong == 0);
    CHECK(memfds == 0);
}

// Pages of [off, off + len) of the file in the kernel's page cache: mincore on a mapping of the
// test's own, which touches nothing.
std::size_t cached_pages(int fd, std::uint64_t off, std::size_t len) {
    void* m = mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, off_t(off));
    REQUIRE(m != MAP_FAILED);
    std::vector<unsigned char> vec((len + kPage - 1) / kPage);
    REQUIRE(mincore(m, len, vec.data()) == 0);
    munmap(m, len);
    return std::size_t(std::count_if(vec.begin(), vec.end(), [](unsigned char c) { return (c & 1) != 0; }));
}

// Compares [p, p + want.size()) with `want`: the offset of the first difference, or want.size().
std::size_t first_difference(const void* p, const Bytes& want) {
    if (std::memcmp(p, want.data(), want.size()) == 0) return want.size();
    const auto* b = static_cast<const std::uint8_t*>(p);
    return std::size_t(std::mismatch(b, b + want.size(), want.begin()).first - b);
}

// A file of `size` bytes that is one hole, but for pages holding the pattern where a test writes it.
class SparseFile : public TempFile {
public:
    explicit SparseFile(std::uint64_t size) : TempFile(0), length_(size) {
        if (ftruncate(fd(), off_t(size)) != 0) std::abort();
    }
    std::uint64_t size() const { return length_; }

private:
    std::uint64_t length_;
};

}  // namespace

// Contract 1 and 4: the VMA is the file in /proc/self/maps, a read through it creates no shmem, its
// pages are the kernel's page cache, and once they are dropped a read is a major fault again.
TEST_CASE("one copy: a private file VMA maps the file itself; reading it creates no shmem") {
    const std::size_t size = 128 * kMiB;
    TempFile file(size);
    usermm_test::drop_page_cache(file.fd());
    Arena arena(1ull << 31);
    const long rss_shmem = proc_kib("/proc/self/status", "RssShmem"), shmem = proc_kib("/proc/meminfo", "Shmem");
    REQUIRE(rss_shmem >= 0);
    REQUIRE(shmem >= 0);
    char* p = static_cast<char*>(arena.map_file(file.fd(), 0, size, Prot::Read, Share::Private, {.name = "one copy"}));
    {
        INFO("right after map_file");
        check_maps_show_file(p, size, file, 0);
    }
    for (std::size_t off = 0; off < size; off += kMiB) {
        const Bytes want = pattern_range(off, kMiB);
        const std::size_t d = first_difference(p + off, want);
        INFO("offset ", off + d);
        REQUIRE(d == kMiB);
    }
    {
        INFO("after reading the whole file");
        check_maps_show_file(p, size, file, 0);
    }
    // The old design held every page in a memfd mapped twice (RssShmem twice the file's size); the
    // system's Shmem moves with other processes too, hence a wider margin there.
    const long rss_shmem_growth = proc_kib("/proc/self/status", "RssShmem") - rss_shmem;
    const long shmem_growth = proc_kib("/proc/meminfo", "Shmem") - shmem;
    CHECK(rss_shmem_growth < 4 * 1024);
    CHECK(shmem_growth < 16 * 1024);
    CHECK(cached_pages(file.fd(), 0, size) == size / kPage);

    // The kernel's fadvise drops only pages no mapping holds (so with mmap too): usermm's VMA lets go
    // of them first.
    arena.advise(p, size, Advice::DontNeed);
    REQUIRE(posix_fadvise(file.fd(), 0, 0, POSIX_FADV_DONTNEED) == 0);
    CHECK(cached_pages(file.fd(), 0, size) == 0);
    const Stats before = arena.stats();
    const std::size_t page = 1000 * kPage;
    CHECK(first_difference(p + page, pattern_range(page, kPage)) == kPage);
    CHECK(arena.stats().major_faults > before.major_faults);
    CHECK(cached_pages(file.fd(), page, kPage) == 1);
    arena.verify();
}

TEST_CASE("random and sequential reads see the file's bytes; the last page's tail reads zeros") {
    TempFile file(1024 * kPage + 1234);
    const Bytes want = file.expected();
    const std::size_t pages = 1025;
    usermm_test::drop_page_cache(file.fd());
    Arena arena(1 << 28);

    char* seq = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    arena.advise(seq, file.size(), Advice::Sequential);
    for (std::size_t i = 0; i + 1 < pages; ++i) {
        const std::size_t d = first_difference(seq + i * kPage, Bytes(want.begin() + long(i * kPage),
                                                                      want.begin() + long((i + 1) * kPage)));
        INFO("sequential: page ", i, " byte ", d);
        REQUIRE(d == kPage);
    }
    for (std::size_t off = 1024 * kPage; off < pages * kPage; ++off)
        REQUIRE(read_byte(seq + off) == (off < file.size() ? want[off] : 0));

    usermm_test::drop_page_cache(file.fd());
    char* rnd = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Shared));
    arena.advise(rnd, file.size(), Advice::Random);
    std::mt19937_64 rng(11);
    for (int i = 0; i < 20000; ++i) {
        const std::size_t off = rng() % (pages * kPage);
        INFO("random: offset ", off);
        REQUIRE(read_byte(rnd + off) == (off < file.size() ? want[off] : 0));
    }
    arena.verify();
}

TEST_CASE("private writes are the VMA's own: the file, other VMAs and the kernel's mmap never see them") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* v = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::ReadWrite, Share::Private));
    char* w = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private));
    char* s = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    auto* k = static_cast<char*>(mmap(nullptr, file.size(), PROT_READ, MAP_SHARED, file.fd(), 0));
    REQUIRE(k != MAP_FAILED);
    CHECK(read_byte(w + kPage + 10) == pattern_byte(kPage + 10));  // mapped before the private write
    CHECK(read_byte(s + kPage + 10) == pattern_byte(kPage + 10));
    CHECK(read_byte(v + kPage + 10) == pattern_byte(kPage + 10));
    write_byte(v + kPage + 10, 0xa1);  // a page read first
    write_byte(v + 4 * kPage, 0xa4);   // a write as the first access
    CHECK(read_byte(v + kPage + 10) == 0xa1);
    CHECK(read_byte(v + 4 * kPage) == 0xa4);
    for (const char* other : {w, s, k}) {
        CHECK(read_byte(other + kPage + 10) == pattern_byte(kPage + 10));
        CHECK(read_byte(other + 4 * kPage) == pattern_byte(4 * kPage));
    }
    CHECK(read_range(file.fd(), kPage + 10, 1)[0] == pattern_byte(kPage + 10));

    // A shared write reaches the private VMA's pages it has not copied, not those it has.
    write_byte(s + kPage + 11, 0xb1);
    write_byte(s + 6 * kPage, 0xb6);
    CHECK(read_byte(v + kPage + 11) == pattern_byte(kPage + 11));
    CHECK(read_byte(v + 6 * kPage) == 0xb6);
    write_byte(s + kPage + 11, pattern_byte(kPage + 11));
    write_byte(s + 6 * kPage, pattern_byte(6 * kPage));

    arena.sync(v, file.size());
    arena.sync(s, file.size());
    arena.unmap(v, file.size());
    munmap(k, file.size());
    CHECK(file.content() == file.expected());
    arena.verify();
}

TEST_CASE("shared writes reach the file byte for byte at sync, at unmap and at the arena's destruction") {
    TempFile file(64 * kPage + 300);  // a partial last page
    Bytes want = file.expected();
    std::mt19937_64 rng(5);
    auto scribble = [&](char* p, std::size_t from, std::size_t to) {
        for (std::size_t off = from; off < to; ++off) {
            const auto b = std::uint8_t(rng());
            write_byte(p + off, b);
            want[off] = b;
        }
    };
    {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        scribble(p, 0, kPage);                       // a first access by a write
        CHECK(read_byte(p + 3 * kPage) == want[3 * kPage]);
        scribble(p, 3 * kPage + 100, 5 * kPage - 7);  // across a page boundary, after a read
        scribble(p, 64 * kPage, file.size());        // the part of the last page inside the file
        write_byte(p + file.size() + 5, 0xee);       // past the end: never reaches the file
        arena.sync(p, 65 * kPage);
        CHECK(file.content() == want);

        scribble(p, 20 * kPage, 24 * kPage);
        arena.unmap(p + 20 * kPage, 4 * kPage);
        CHECK(file.content() == want);

        scribble(p, 40 * kPage + 1, 40 * kPage + 2);
        scribble(p, 63 * kPage, 64 * kPage);
    }
    CHECK(file.content() == want);
}

TEST_CASE("two shared VMAs, the kernel's MAP_SHARED and pwrite(2) of the same file agree both ways") {
    TempFile file(16 * kPage);
    Bytes want = file.expected();
    Arena a(1 << 24), b(1 << 24);
    char* p = static_cast<char*>(a.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* q = static_cast<char*>(b.map_file(file.fd(), 4 * kPage, 8 * kPage, Prot::ReadWrite, Share::Shared));
    auto* k = static_cast<char*>(mmap(nullptr, file.size(), PROT_READ | PROT_WRITE, MAP_SHARED, file.fd(), 0));
    REQUIRE(k != MAP_FAILED);
    auto seen_everywhere = [&](std::size_t off, std::uint8_t v) {
        INFO("file offset ", off);
        CHECK(read_byte(p + off) == v);
        if (off >= 4 * kPage && off < 12 * kPage) CHECK(read_byte(q + off - 4 * kPage) == v);
        CHECK(read_byte(k + off) == v);
        CHECK(read_range(file.fd(), off, 1)[0] == v);
        want[off] = v;
    };
    CHECK(read_byte(q + 2 * kPage + 2) == pattern_byte(6 * kPage + 2));  // mapped before k writes
    check_maps_show_file(q, 8 * kPage, file, 4 * kPage);

    write_byte(p + 5 * kPage + 1, 0x11);  // usermm to usermm, the kernel's mapping and the file
    seen_everywhere(5 * kPage + 1, 0x11);
    write_byte(k + 6 * kPage + 2, 0x22);  // the kernel's mapping to a page q has mapped and p has not
    seen_everywhere(6 * kPage + 2, 0x22);
    write_byte(q + 7 * kPage + 3, 0x33);
    seen_everywhere(11 * kPage + 3, 0x33);
    const std::uint8_t v = 0x44;
    REQUIRE(pwrite(file.fd(), &v, 1, off_t(5 * kPage + 9)) == 1);  // to pages every mapping holds
    seen_everywhere(5 * kPage + 9, 0x44);
    REQUIRE(pwrite(file.fd(), &v, 1, off_t(13 * kPage)) == 1);  // to a page no VMA has touched
    seen_everywhere(13 * kPage, 0x44);

    // After sync, the pages a wrote are write-protected in a: still coherent both ways.
    a.sync(p, file.size());
    write_byte(k + 5 * kPage + 20, 0x55);
    seen_everywhere(5 * kPage + 20, 0x55);
    write_byte(p + 5 * kPage + 21, 0x56);
    seen_everywhere(5 * kPage + 21, 0x56);

    munmap(k, file.size());
    a.sync(p, file.size());
    b.sync(q, 8 * kPage);
    CHECK(file.content() == want);
    a.verify();
    b.verify();
}

TEST_CASE("a pwrite(2) from a forked child is seen by the shared VMA and by the private VMA's unwritten pages") {
    TempFile file(16 * kPage);
    Arena arena(1 << 24);
    char* s = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* v = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Private));
    CHECK(read_byte(s + 2 * kPage) == pattern_byte(2 * kPage));
    CHECK(read_byte(v + 2 * kPage) == pattern_byte(2 * kPage));
    write_byte(v + 3 * kPage, 0x77);  // the private VMA's own copy of page 3
    const Bytes bytes(16, 0x99);
    const auto child = usermm_test::run_in_child([&] {
        for (const std::size_t page : {2, 3, 9})
            CHILD_CHECK(pwrite(file.fd(), bytes.data(), bytes.size(), off_t(page * kPage + 32)) == 16);
    });
    usermm_test::check_survived(child);
    for (const std::size_t page : {2, 3, 9}) {
        INFO("page ", page);
        CHECK(std::memcmp(s + page * kPage + 32, bytes.data(), bytes.size()) == 0);
        if (page != 3) CHECK(std::memcmp(v + page * kPage + 32, bytes.data(), bytes.size()) == 0);
    }
    CHECK(read_byte(v + 3 * kPage) == 0x77);
    CHECK(read_byte(v + 3 * kPage + 32) == pattern_byte(3 * kPage + 32));
    arena.verify();
}

// Contract 3: the page wholly past the new end dies by SIGBUS whether the VMA had mapped it or not;
// the page the new end cuts keeps its bytes before the end and reads zeros after it, as with mmap.
TEST_CASE("truncation: an access past the new end dies by SIGBUS naming the file, mapped before or not") {
    for (const Share share : {Share::Private, Share::Shared}) {
        for (const bool mapped : {true, false}) {
            CAPTURE(share == Share::Shared);
            CAPTURE(mapped);
            TempFile file(16 * kPage);
            const std::size_t end = kPage + 100;
            const auto child = usermm_test::run_in_child([&] {
                Arena arena(1 << 24);
                char* p = static_cast<char*>(
                    arena.map_file(file.path(), 0, file.size(), Prot::Read, share, {.fault_around_pages = 1}));
                CHILD_CHECK(read_byte(p + kPage + 200) == pattern_byte(kPage + 200));
                if (mapped) CHILD_CHECK(read_byte(p + 5 * kPage + 7) == pattern_byte(5 * kPage + 7));
                CHILD_CHECK(ftruncate(file.fd(), off_t(end)) == 0);
                CHILD_CHECK(read_byte(p + 10) == pattern_byte(10));
                CHILD_CHECK(read_byte(p + end - 1) == pattern_byte(end - 1));
                // Reported, not fatal: the death below is checked too.
                if (const std::uint8_t tail = read_byte(p + kPage + 200); tail != 0)
                    std::fprintf(stderr, "the cut page reads %#x past the new end, not 0\n", unsigned(tail));
                (void)read_byte(p + 5 * kPage + 7);
                std::fprintf(stderr, "child check failed: the access past the end returned\n");
            });
            INFO("child stderr: ", child.err);
            CHECK(child.signal == SIGBUS);
            CHECK(child.err.find("past the new end") == std::string::npos);
            CHECK(child.err.find("child check failed") == std::string::npos);
            const std::size_t line = child.err.find("SIGBUS");
            CHECK(line != std::string::npos);
            const std::string first =
                line == std::string::npos ? "" : child.err.substr(line, child.err.find('\n', line) - line);
            CHECK(first.find(file.path()) != std::string::npos);
            CHECK(first.find("past the end") != std::string::npos);
            CHECK(child.err.find("SIGBUS", line + 1) == std::string::npos);
        }
    }
}

// As with mmap: the kernel drops the dirty pages a truncation cuts off, and what was written before
// the new end stays. Neither sync nor the arena's end may write the lost pages back (which would
// grow the file again), and an access to them is SIGBUS.
TEST_CASE("truncation below dirty shared pages: sync and the arena's end never grow the file back") {
    TempFile file(16 * kPage);
    const std::size_t end = kPage + 100;
    Bytes want = pattern_range(0, end);
    {
        Arena arena(1 << 24);
        char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
        write_byte(p + 7, 0x17);
        want[7] = 0x17;
        write_byte(p + kPage + 99, 0x18);
        want[kPage + 99] = 0x18;
        write_byte(p + 9 * kPage + 1, 0x59);
        arena.sync(p, file.size());  // page 9 clean and write-protected
        write_byte(p + 5 * kPage, 0x55);
        REQUIRE(ftruncate(file.fd(), off_t(end)) == 0);
        CHECK_NOTHROW(arena.sync(p, file.size()));
        CHECK(file.content() == want);
        // A read of the dirty page cut off; a write to the write-protected one (the kernel's SIGBUS
        // there is not a write-protect fault); a write to a page never touched.
        for (const auto& [page, write] : {std::pair{5, false}, {9, true}, {12, true}}) {
            CAPTURE(page);
            const auto child = usermm_test::run_in_child([&, page = page, write = write] {
                if (write)
                    write_byte(p + std::size_t(page) * kPage + 2, 0x66);
                else
                    (void)read_byte(p + std::size_t(page) * kPage + 2);
            });
            INFO("child stderr: ", child.err);
            CHECK(child.signal == SIGBUS);
            CHECK(child.err.find("past the end") != std::string::npos);
        }
        write_byte(p + 3, 0x13);  // the page the end cuts stays writable up to the end
        want[3] = 0x13;
        // Grown again, the file has holes there: the pages read zeros, not what was cut off.
        REQUIRE(ftruncate(file.fd(), off_t(file.size())) == 0);
        want.resize(file.size(), 0);
        CHECK(read_byte(p + 5 * kPage) == 0);
        CHECK(read_byte(p + 9 * kPage + 1) == 0);
        CHECK(read_byte(p + kPage + 100) == 0);
        arena.verify();
    }
    CHECK(file.content() == want);
}

// Contract 4, exactly: with fault-around off (one page per fault) and Advice::Random (no readahead),
// the first read of a page that is not in the kernel's page cache is one major fault (major_faults
// +1, minor_faults +0); the first read of a page that pread(2) put in the page cache is one minor
// fault (major +0, minor +1); and after POSIX_FADV_DONTNEED of such a page (no mapping holds it)
// its first read is one major fault again.
TEST_CASE("major faults: a page not in the page cache is a major fault, one pread(2) cached is minor") {
    TempFile file(64 * kPage);
    usermm_test::drop_page_cache(file.fd());
    REQUIRE(cached_pages(file.fd(), 0, file.size()) == 0);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(
        arena.map_file(file.fd(), 0, file.size(), Prot::Read, Share::Private, {.fault_around_pages = 1}));
    arena.advise(p, file.size(), Advice::Random);
    auto read_page = [&](std::size_t page, std::uint64_t majors, std::uint64_t minors) {
        INFO("page ", page);
        const Stats before = arena.stats();
        CHECK(read_byte(p + page * kPage + 3) == pattern_byte(page * kPage + 3));
        const Stats after = arena.stats();
        CHECK(after.major_faults - before.major_faults == majors);
        CHECK(after.minor_faults - before.minor_faults == minors);
    };
    read_page(10, 1, 0);

    REQUIRE(read_range(file.fd(), 40 * kPage, kPage).size() == kPage);
    REQUIRE(cached_pages(file.fd(), 40 * kPage, kPage) == 1);
    read_page(40, 0, 1);

    REQUIRE(read_range(file.fd(), 50 * kPage, kPage).size() == kPage);
    REQUIRE(posix_fadvise(file.fd(), off_t(50 * kPage), off_t(kPage), POSIX_FADV_DONTNEED) == 0);
    REQUIRE(cached_pages(file.fd(), 50 * kPage, kPage) == 0);
    read_page(50, 1, 0);
    arena.verify();
}

// The same rule for a write as the first access, to a shared VMA (do_shared_fault) and to a private
// one (do_cow_fault): major exactly when the page was not in the page cache.
TEST_CASE("major faults: a first write to a page not in the page cache is major, to a cached one minor") {
    for (const Share share : {Share::Shared, Share::Private}) {
        CAPTURE(share == Share::Shared);
        TempFile file(64 * kPage);
        usermm_test::drop_page_cache(file.fd());
        Arena arena(1 << 24);
        char* p = static_cast<char*>(
            arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, share, {.fault_around_pages = 1}));
        arena.advise(p, file.size(), Advice::Random);
        auto write_page = [&](std::size_t page, std::uint64_t majors, std::uint64_t minors) {
            INFO("page ", page);
            const Stats before = arena.stats();
            write_byte(p + page * kPage + 3, 0x42);
            const Stats after = arena.stats();
            CHECK(after.major_faults - before.major_faults == majors);
            CHECK(after.minor_faults - before.minor_faults == minors);
            CHECK(read_byte(p + page * kPage + 4) == pattern_byte(page * kPage + 4));
        };
        write_page(10, 1, 0);
        REQUIRE(read_range(file.fd(), 40 * kPage, kPage).size() == kPage);
        write_page(40, 0, 1);
        arena.verify();
    }
}

TEST_CASE("threads faulting the same cold file pages at once all read the file's bytes") {
    constexpr std::size_t kPages = 512;
    constexpr unsigned kThreads = 4;
    constexpr int kRounds = 8;
    TempFile file(kPages * kPage);
    const Bytes want = file.expected();
    Arena arena(1 << 26);
    std::barrier sync(kThreads + 1);
    std::atomic<const char*> region{nullptr};
    std::atomic<int> wrong{0};
    std::atomic<std::size_t> wrong_page{0};
    std::vector<std::size_t> order(kPages);

    auto worker = [&] {
        for (int round = 0; round < kRounds; ++round) {
            sync.arrive_and_wait();  // the round's mapping and order are ready
            const char* base = region.load();
            for (const std::size_t page : order)
                if (std::memcmp(base + page * kPage, want.data() + page * kPage, kPage) != 0 && wrong++ == 0)
                    wrong_page = page;
            sync.arrive_and_wait();
        }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t) threads.emplace_back(worker);
    for (int round = 0; round < kRounds; ++round) {
        // Every thread walks the same order, so that they collide on every page: in sequence, or
        // shuffled with single-page faults; and through private and shared VMAs.
        std::iota(order.begin(), order.end(), std::size_t(0));
        if (round % 2) std::shuffle(order.begin(), order.end(), std::mt19937_64(std::uint64_t(round)));
        usermm_test::drop_page_cache(file.fd());
        const Share share = round % 4 < 2 ? Share::Private : Share::Shared;
        char* p = static_cast<char*>(arena.map_file(file.fd(), 0, file.size(), Prot::Read, share,
                                                    {.fault_around_pages = round % 2 ? 1u : 16u}));
        if (round % 2) arena.advise(p, file.size(), Advice::Random);
        region = p;
        sync.arrive_and_wait();
        sync.arrive_and_wait();
        arena.unmap(p, file.size());
    }
    for (auto& t : threads) t.join();
    INFO("first wrong page: ", wrong_page.load());
    CHECK(wrong.load() == 0);
    CHECK(arena.stats().access_errors == 0);
    arena.verify();
}

TEST_CASE("threads writing the same shared file pages at once: every write reaches the file at sync") {
    constexpr std::size_t kPages = 256;
    constexpr unsigned kThreads = 4;
    TempFile file(kPages * kPage);
    usermm_test::drop_page_cache(file.fd());
    Arena arena(1 << 26);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared,
                                                {.fault_around_pages = 1}));
    arena.advise(p, file.size(), Advice::Random);
    std::barrier start(kThreads);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < kThreads; ++t)
        threads.emplace_back([&, t] {
            start.arrive_and_wait();  // every thread's first access to each page races the others'
            for (std::size_t page = 0; page < kPages; ++page)
                write_byte(p + page * kPage + 64 * t, std::uint8_t(t + 1));
        });
    for (auto& t : threads) t.join();
    arena.sync(p, file.size());
    Bytes want = file.expected();
    for (std::size_t page = 0; page < kPages; ++page)
        for (unsigned t = 0; t < kThreads; ++t) want[page * kPage + 64 * t] = std::uint8_t(t + 1);
    CHECK(file.content() == want);
    const Stats s = arena.stats();
    CHECK(s.pages_dirtied == kPages);
    CHECK(s.pages_written_back == kPages);
    CHECK(s.access_errors == 0);
    arena.verify();
}

#if defined(__x86_64__)
// An instruction fetch from a shared page that prefault(Write) made writable without a write: the
// grant keeps Write, which makes the page dirty (as every write grant does), so it is counted as
// dirtied and written back once.
TEST_CASE("an instruction fetch from a clean writable shared page counts the page it makes dirty") {
    TempFile file(kPage);
    const std::uint8_t ret = 0xc3;
    REQUIRE(pwrite(file.fd(), &ret, 1, 0) == 1);
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, kPage, Prot::ReadWrite, Share::Shared));
    arena.prefault(p, kPage, Prot::Write);
    arena.protect(p, kPage, Prot::ReadWrite | Prot::Exec);
    const Stats before = arena.stats();
    reinterpret_cast<void (*)()>(p)();
    const Stats after = arena.stats();
    CHECK(after.exec_faults == before.exec_faults + 1);
    CHECK(after.pages_dirtied == before.pages_dirtied + 1);
    arena.sync(p, kPage);
    CHECK(arena.stats().pages_written_back == after.pages_written_back + 1);
    arena.verify();
}
#endif

// Contract 6: prefault(Write) grants write access and nothing else; a write after it still reaches
// the file at the next sync.
TEST_CASE("prefault(Write) of a clean shared range dirties nothing: the next sync writes none of it") {
    TempFile file(32 * kPage);
    Bytes want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    for (std::size_t i = 0; i < 8; ++i) CHECK(read_byte(p + i * kPage) == pattern_byte(i * kPage));
    const Stats before = arena.stats();
    arena.prefault(p, file.size(), Prot::Write);
    CHECK(arena.stats().pages_dirtied == before.pages_dirtied);
    arena.sync(p, file.size());
    const Stats after = arena.stats();
    CHECK(after.pages_dirtied == before.pages_dirtied);
    CHECK(after.pages_written_back == before.pages_written_back);
    CHECK(after.bytes_written_back == before.bytes_written_back);
    CHECK(file.content() == want);

    arena.prefault(p, file.size(), Prot::Write);
    write_byte(p + 3 * kPage + 1, 0xab);
    want[3 * kPage + 1] = 0xab;
    arena.sync(p, file.size());
    CHECK(file.content() == want);
    arena.verify();
}

// Contract 6: sync takes write access from the pages it wrote, so that the next write is seen; a
// system call's write into such a page fails with EFAULT, as it would into any page usermm has not
// granted, until prefault(Write) grants it.
TEST_CASE("read(2) into a shared file page after sync fails with EFAULT, and works after prefault(Write)") {
    TempFile file(8 * kPage), source(kPage);
    Bytes want = file.expected();
    Arena arena(1 << 24);
    char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* page = p + 2 * kPage;
    write_byte(page, 0x5a);  // writable and dirty
    want[2 * kPage] = 0x5a;
    arena.sync(p, file.size());
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    const std::string text(100, 'q');
    REQUIRE(write(fds[1], text.data(), text.size()) == ssize_t(text.size()));
    errno = 0;
    CHECK(read(fds[0], page + 16, text.size()) == -1);
    CHECK(errno == EFAULT);
    errno = 0;
    CHECK(pread(source.fd(), page + 200, 100, 0) == -1);
    CHECK(errno == EFAULT);

    arena.prefault(page, kPage, Prot::Write);
    CHECK(read(fds[0], page + 16, text.size()) == ssize_t(text.size()));  // the failed read took nothing
    CHECK(std::memcmp(page + 16, text.data(), text.size()) == 0);
    CHECK(pread(source.fd(), page + 200, 100, 0) == 100);
    CHECK(std::memcmp(page + 200, pattern_range(0, 100).data(), 100) == 0);
    std::memcpy(want.data() + 2 * kPage + 16, text.data(), text.size());
    std::memcpy(want.data() + 2 * kPage + 200, pattern_range(0, 100).data(), 100);
    close(fds[0]);
    close(fds[1]);
    // The kernel wrote those bytes, with no fault usermm could see: sync still takes them to the file.
    arena.sync(p, file.size());
    CHECK(file.content() == want);
}

// Contract 8. Once a bug (the page cache of the old design, beyond its first GiB): a child that
// merely read a page there overwrote the parent's unsynced write, and the parent's sync then wrote
// the old content. The child runs while the parent writes (a pipe handshake each way).
TEST_CASE("fork: parent and child write and read beyond the first GiB of a shared file VMA; the file keeps both") {
    SparseFile file(kGiB + kGiB / 2);
    const std::uint64_t a = kGiB + 1 * kMiB, b = kGiB + 65 * kMiB, c = kGiB + 129 * kMiB, d = kGiB + 257 * kMiB,
                        e = kGiB + 300 * kMiB, f = kGiB + 400 * kMiB;
    for (const std::uint64_t off : {a, b, c, d, e, f}) usermm_test::write_pattern(file.fd(), off, 16 * kPage);
    Arena arena(1ull << 32);
    char* s = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
    char* v = static_cast<char*>(arena.map_file(file.fd(), kGiB, 512 * kMiB, Prot::ReadWrite, Share::Private));
    write_u64(s + a, 0xa0a0);  // dirty, not synced, at the fork
    CHECK(read_byte(s + b + 9) == pattern_byte(b + 9));
    write_u64(v + (a - kGiB), 0x1111);  // the parent's private copy

    int forked[2], written[2];
    REQUIRE(pipe(forked) == 0);
    REQUIRE(pipe(written) == 0);
    usermm_test::ChildEnd child;
    std::thread runner([&] {
        child = usermm_test::run_guarded(
            [&] {
                char byte = 0;
                CHILD_CHECK(write(forked[1], &byte, 1) == 1);
                CHILD_CHECK(read(written[0], &byte, 1) == 1);
                CHILD_CHECK(read_byte(s + f + kPage + 9) == pattern_byte(f + kPage + 9));  // f's neighbour
                CHILD_CHECK(read_u64(s + f) == 0xf0f0);  // written by the parent after the fork
                CHILD_CHECK(read_byte(s + a + kPage + 9) == pattern_byte(a + kPage + 9));
                CHILD_CHECK(read_u64(s + a) == 0xa0a0);
                CHILD_CHECK(read_byte(s + b + 9) == pattern_byte(b + 9));
                CHILD_CHECK(read_byte(s + e + 9) == pattern_byte(e + 9));  // a page the parent never touched
                write_u64(s + c, 0xc0c0);
                arena.sync(s, file.size());
                CHILD_CHECK(read_u64(v + (a - kGiB)) == 0x1111);
                write_u64(v + (a - kGiB), 0x2222);
                write_u64(v + (b - kGiB), 0x3333);
                CHILD_CHECK(read_u64(s + a) == 0xa0a0);
                CHILD_CHECK(read_u64(s + f) == 0xf0f0);
            },
            30);
    });
    char byte = 0;
    const bool started = read(forked[0], &byte, 1) == 1;
    write_u64(s + f, 0xf0f0);  // after the fork, not synced
    const bool told = write(written[1], &byte, 1) == 1;
    runner.join();
    for (const int fd : {forked[0], forked[1], written[0], written[1]}) close(fd);
    REQUIRE(started);
    REQUIRE(told);
    usermm_test::check_survived(child);
    CHECK(read_u64(s + a) == 0xa0a0);
    CHECK(read_u64(s + c) == 0xc0c0);
    CHECK(read_u64(s + f) == 0xf0f0);
    CHECK(read_byte(s + e + 9) == pattern_byte(e + 9));
    CHECK(read_u64(v + (a - kGiB)) == 0x1111);
    CHECK(read_byte(v + (b - kGiB) + 1) == pattern_byte(b + 1));
    write_u64(s + d, 0xd0d0);
    arena.sync(s, file.size());

    auto page_with = [](std::uint64_t off, std::uint64_t value) {
        Bytes page = pattern_range(off, kPage);
        std::memcpy(page.data(), &value, sizeof value);
        return page;
    };
    CHECK(read_range(file.fd(), a, kPage) == page_with(a, 0xa0a0));
    CHECK(read_range(file.fd(), b, kPage) == pattern_range(b, kPage));
    CHECK(read_range(file.fd(), c, kPage) == page_with(c, 0xc0c0));
    CHECK(read_range(file.fd(), d, kPage) == page_with(d, 0xd0d0));
    CHECK(read_range(file.fd(), e, kPage) == pattern_range(e, kPage));
    CHECK(read_range(file.fd(), f, kPage) == page_with(f, 0xf0f0));
    arena.verify();
}

namespace {

constexpr int kRandomPages = 200000;
constexpr std::uint64_t kMarkedEvery = 4096;  // pages with the pattern in the sparse file

// Contract 9, in a child so that a death is reported: random single-page accesses over a 1.5 GiB
// file VMA, each granted window a split of a kernel VMA, until the process's mappings would pass
// vm.max_map_count unless usermm degrades. `write` makes the VMA Shared and the accesses writes.
void random_pages(bool write) {
    SparseFile file(kGiB + kGiB / 2);
    const std::uint64_t pages = file.size() / kPage;
    for (std::uint64_t page = 0; page < pages; page += kMarkedEvery)
        usermm_test::write_pattern(file.fd(), page * kPage, kPage);
    const auto child = usermm_test::run_guarded(
        [&] {
            Arena arena(1ull << 31);
            char* p = static_cast<char*>(arena.map_file(file.path(), 0, file.size(),
                                                        write ? Prot::ReadWrite : Prot::Read,
                                                        write ? Share::Shared : Share::Private));
            arena.advise(p, file.size(), Advice::Random);
            const long limit = usermm_test::max_map_count();
            long most = 0;
            std::mt19937_64 rng(write ? 17 : 13);
            std::vector<bool> written(pages);
            for (int i = 0; i < kRandomPages; ++i) {
                const std::uint64_t page = rng() % pages, off = page * kPage + (page * 8) % kPage;
                if (write) {
                    write_u64(p + off, page);
                    written[page] = true;
                } else if (read_byte(p + off) != (page % kMarkedEvery ? 0 : pattern_byte(off))) {
                    std::fprintf(stderr, "child check failed: page %llu reads %#x\n", (unsigned long long)page,
                                 unsigned(read_byte(p + off)));
                    _exit(1);
                }
                if (i % 25000 == 0) most = std::max(most, usermm_test::process_mappings());
            }
            most = std::max(most, usermm_test::process_mappings());
            for (std::uint64_t page = 0; page < pages; ++page)
                if (written[page]) CHILD_CHECK(read_u64(p + page * kPage + (page * 8) % kPage) == page);
            const Stats s = arena.stats();
            std::fprintf(stderr, "%s: degraded_faults %llu, degraded_pages %llu, kernel mappings at most %ld of %ld\n",
                         write ? "random writes" : "random reads", (unsigned long long)s.degraded_faults,
                         (unsigned long long)s.degraded_pages, most, limit);
            CHILD_CHECK(most < limit);
            arena.verify();
            // The dirty pages go with the file when the parent removes it: writing back hundreds of
            // MiB scattered over a sparse file is not what this test is about, nor is freeing the
            // blocks that would allocate (7 s to 2 min at unlink here, an ext4 mounted with
            // discard). The test with the mappings taken behind usermm's back syncs.
            std::fflush(stderr);
            _exit(0);
        },
        120);
    usermm_test::check_survived(child);
    MESSAGE(child.err);
}

}  // namespace

TEST_CASE("mapping budget: 200,000 random page reads of a 1.5 GiB file VMA (Advice::Random) complete") {
    random_pages(false);
}

TEST_CASE("mapping budget: 200,000 random page writes to a 1.5 GiB shared file VMA complete") {
    random_pages(true);
}

// The rule: a kernel refusal (ENOMEM) is reconciled with the kernel's real count and
// degrades, never kills. The program takes the mappings usermm counted on behind its back (single
// pages of its own, alternately readable and not so that none merge), leaving a few hundred; then
// random reads and writes, and syncs between them.
TEST_CASE("mapping budget: with the mappings taken behind usermm's back, file faults degrade and never die" *
          doctest::skip(usermm_test::kSkipAtTheMappingLimit)) {
    SparseFile file(kGiB + kGiB / 2);
    const std::uint64_t pages = file.size() / kPage;
    for (std::uint64_t page = 0; page < pages; page += kMarkedEvery)
        usermm_test::write_pattern(file.fd(), page * kPage, kPage);
    const auto child = usermm_test::run_guarded(
        [&] {
            Arena arena(1ull << 32);
            char* r = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::Read, Share::Private));
            char* w = static_cast<char*>(arena.map_file(file.path(), 0, file.size(), Prot::ReadWrite, Share::Shared));
            arena.advise(r, file.size(), Advice::Random);
            arena.advise(w, file.size(), Advice::Random);
            std::mt19937_64 rng(23);
            auto expect = [](std::uint64_t page, std::uint64_t off) -> std::uint8_t {
                return page % kMarkedEvery ? 0 : pattern_byte(off);
            };
            auto touch = [&](int count, std::vector<std::uint64_t>& written) {
                for (int i = 0; i < count; ++i) {
                    const std::uint64_t page = rng() % pages, off = page * kPage + (page * 8) % kPage;
                    if (i % 2) {
                        write_u64(w + off, page);
                        written.push_back(page);
                    } else {
                        CHILD_CHECK(read_byte(r + off) == expect(page, off) ||
                                    std::find(written.begin(), written.end(), page) != written.end());
                    }
                }
            };
            const long limit = usermm_test::max_map_count();
            std::vector<std::uint64_t> written;
            written.reserve(std::size_t(limit));
            touch(200, written);
            const std::vector<void*> mine = usermm_test::use_up_mappings(300);
            const long taken = usermm_test::process_mappings();
            touch(20000, written);
            // sync write-protects the dirty pages, one run at a time, with no mapping to spare; the
            // writes after it must fault again, be seen, and reach the file at the next sync.
            arena.sync(w, file.size());
            touch(20000, written);
            arena.sync(w, file.size());
            for (const std::uint64_t page : written) {
                const std::uint64_t off = page * kPage + (page * 8) % kPage;
                std::uint64_t in_file = 0;
                CHILD_CHECK(pread(file.fd(), &in_file, sizeof in_file, off_t(off)) == sizeof in_file);
                CHILD_CHECK(in_file == page);
                CHILD_CHECK(read_u64(w + off) == page);
            }
            const Stats s = arena.stats();
            std::fprintf(stderr,
                         "taken behind usermm's back: %zu mappings, up to %ld of %ld; degraded_faults %llu, "
                         "degraded_pages %llu\n",
                         mine.size(), taken, limit, (unsigned long long)s.degraded_faults,
                         (unsigned long long)s.degraded_pages);
            CHILD_CHECK(s.degraded_faults > 0);
            for (void* m : mine) munmap(m, kPage);
            arena.verify();
            std::fflush(stderr);
            _exit(0);
        },
        60);
    usermm_test::check_survived(child);
    MESSAGE(child.err);
}
