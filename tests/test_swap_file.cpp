// SwapFile, the store built in (include/usermm/store.hpp), on real files: page content through
// batched writes and reads with per-page answers, the slot allocator (lowest free slot first, a
// sparse file that does not grow past the peak of slots in use, no slot given to two owners), slot
// references across a real fork(), and the page cache kept free of swapped pages (mincore), with
// O_DIRECT on a disk and without it, and on file systems that refuse it or run out of space.
#include <doctest/doctest.h>
#include <usermm/store.hpp>

#include <fcntl.h>
#include <fmt/format.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "test_util.hpp"

using usermm::PageIo;
using usermm::SwapFile;
using usermm_test::check_survived;
using usermm_test::os_page_size;

namespace {

// The brief's place for swap files: a disk file system (a tmpfs would hold the pages in memory).
std::string swap_path(const char* dir = "/var/tmp") {
    static int n = 0;
    return fmt::format("{}/usermm-swap-test-{}-{}", dir, getpid(), n++);
}

// Page-aligned buffers, as usermm hands to a store.
class Pages {
public:
    explicit Pages(std::size_t n) : n_(n), p_(static_cast<std::uint8_t*>(std::aligned_alloc(os_page_size(), n * os_page_size()))) {
        if (!p_) std::abort();
    }
    ~Pages() { std::free(p_); }
    Pages(const Pages&) = delete;
    Pages& operator=(const Pages&) = delete;
    std::uint8_t* page(std::size_t i) const { return p_ + i * os_page_size(); }
    std::size_t size() const { return n_; }
    void randomize(std::uint64_t seed) {
        std::mt19937_64 rng(seed);
        auto* w = reinterpret_cast<std::uint64_t*>(p_);
        for (std::size_t i = 0; i < n_ * os_page_size() / 8; ++i) w[i] = rng();
    }
    void clear() { std::memset(p_, 0, n_ * os_page_size()); }

private:
    std::size_t n_;
    std::uint8_t* p_;
};

bool same_page(const void* a, const void* b) { return std::memcmp(a, b, os_page_size()) == 0; }

std::vector<PageIo> batch(const std::vector<std::uint64_t>& slots, const Pages& buf) {
    std::vector<PageIo> io;
    for (std::size_t i = 0; i < slots.size(); ++i) io.push_back({slots[i], buf.page(i), -1});
    return io;
}

std::vector<std::uint64_t> allocate(SwapFile& swap, std::size_t n) {
    std::vector<std::uint64_t> slots(n);
    slots.resize(swap.allocate(slots));
    return slots;
}

bool all_ok(const std::vector<PageIo>& io) {
    return std::all_of(io.begin(), io.end(), [](const PageIo& p) { return p.error == 0; });
}

// Pages of the file the kernel's page cache holds, whoever reads or writes them (mincore on a
// shared mapping of it, which faults nothing in).
std::size_t cached_pages(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    struct stat st {};
    REQUIRE(fstat(fd, &st) == 0);
    const std::size_t len = std::size_t(st.st_size), n = len / os_page_size();
    void* m = mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
    REQUIRE(m != MAP_FAILED);
    std::vector<unsigned char> vec(n);
    REQUIRE(mincore(m, len, vec.data()) == 0);
    munmap(m, len);
    close(fd);
    return std::size_t(std::count_if(vec.begin(), vec.end(), [](unsigned char c) { return c & 1; }));
}

std::uint64_t allocated_bytes(const std::string& path) {
    struct stat st {};
    REQUIRE(stat(path.c_str(), &st) == 0);
    return std::uint64_t(st.st_blocks) * 512;
}

bool memory_fs(const char* dir) {
    struct statfs fs {};
    return statfs(dir, &fs) == 0 && (fs.f_type == 0x01021994 /* tmpfs */ || fs.f_type == 0x858458f6 /* ramfs */);
}

// A child that may mount: root, and a mount namespace of its own (private propagation, so nothing
// reaches the host). Asked once, in a child, so the test process itself stays in its namespace.
bool private_mounts() {
    const int pid = fork();
    if (pid == 0) {
        const bool ok = unshare(CLONE_NEWNS) == 0 && mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0 &&
                        mount("tmpfs", "/tmp", "tmpfs", 0, "size=64k") == 0;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}
const bool g_private_mounts = private_mounts();

}  // namespace

// Protects: what the last successful write put in a slot is what a read gives back, for batches
// of consecutive slots (one vectored call, more pages than one call takes) and of slots scattered
// and out of order; reads into other buffers, so a read that did nothing shows.
TEST_CASE("SwapFile: pages round trip through batched writes and reads, consecutive and scattered slots") {
    const std::size_t n = 300;  // more than one vectored call's pages
    SwapFile swap(swap_path(), 1024 * os_page_size());
    CHECK(swap.capacity() == 1024);
    CHECK(swap.describe() == "swap file " + swap.path());
    const std::vector<std::uint64_t> slots = allocate(swap, n);
    REQUIRE(slots.size() == n);
    for (std::size_t i = 0; i < n; ++i) CHECK(slots[i] == i);
    Pages out(n), in(n);
    out.randomize(1);
    std::vector<PageIo> w = batch(slots, out);
    swap.write(w);
    CHECK(all_ok(w));
    std::vector<PageIo> r = batch(slots, in);
    swap.read(r);
    CHECK(all_ok(r));
    for (std::size_t i = 0; i < n; ++i) CHECK(same_page(out.page(i), in.page(i)));

    // Scattered and out of order, rewriting some slots with new content.
    std::vector<std::uint64_t> scattered = {299, 7, 8, 9, 150, 3, 0, 298, 100, 101};
    Pages out2(scattered.size()), in2(scattered.size());
    out2.randomize(2);
    std::vector<PageIo> w2 = batch(scattered, out2);
    swap.write(w2);
    CHECK(all_ok(w2));
    std::reverse(scattered.begin(), scattered.end());
    std::vector<PageIo> r2 = batch(scattered, in2);
    swap.read(r2);
    CHECK(all_ok(r2));
    for (std::size_t i = 0; i < scattered.size(); ++i)
        CHECK(same_page(in2.page(i), out2.page(scattered.size() - 1 - i)));
    // The slots not rewritten kept their first content.
    in.clear();
    std::vector<PageIo> r3 = batch(slots, in);
    swap.read(r3);
    CHECK(all_ok(r3));
    const std::set<std::uint64_t> rewritten(scattered.begin(), scattered.end());
    for (std::size_t i = 0; i < n; ++i)
        if (!rewritten.count(i)) CHECK(same_page(out.page(i), in.page(i)));
}

// Protects: errors are per page. A slot past the capacity, a slot not in use and a buffer that is
// not page-aligned each get EINVAL alone; the good pages of the same batch, also those on either
// side of a bad one inside a run of consecutive slots, are written and read.
TEST_CASE("SwapFile: errors are per page: a slot past the end, a free slot, a misaligned buffer fail alone") {
    SwapFile swap(swap_path(), 64 * os_page_size());
    const std::vector<std::uint64_t> slots = allocate(swap, 8);
    REQUIRE(slots.size() == 8);
    Pages out(8), in(8);
    out.randomize(3);
    std::vector<PageIo> w = batch(slots, out);
    w[2].slot = 64;                    // past the capacity
    w[4].slot = 40;                    // in range, never allocated
    w[6].data = out.page(6) + 8;       // misaligned
    swap.write(w);
    for (std::size_t i = 0; i < 8; ++i) CHECK(w[i].error == (i == 2 || i == 4 || i == 6 ? EINVAL : 0));
    std::vector<PageIo> r = batch(slots, in);
    r[2].slot = 1000;
    r[4].slot = 40;
    r[6].data = nullptr;
    swap.read(r);
    for (std::size_t i = 0; i < 8; ++i) {
        CHECK(r[i].error == (i == 2 || i == 4 || i == 6 ? EINVAL : 0));
        if (r[i].error == 0) CHECK(same_page(out.page(i), in.page(i)));
    }
    std::vector<std::uint64_t> bad = {5000};
    swap.release(bad);  // said on stderr, nothing changed
    CHECK(swap.slots_in_use() == 8);
}

// Protects: allocate fills a prefix of the request and reports its length when the store has fewer
// slots free, then 0; released slots are handed out again, lowest first.
TEST_CASE("SwapFile: allocate fills a prefix until full, then 0; released slots come back lowest first") {
    const std::size_t cap = 200;  // not a multiple of 64: the last word's tail is never handed out
    SwapFile swap(swap_path(), cap * os_page_size());
    std::vector<std::uint64_t> all = allocate(swap, 150);
    CHECK(all.size() == 150);
    std::vector<std::uint64_t> more(100, ~0ull);
    CHECK(swap.allocate(more) == 50);
    for (std::size_t i = 0; i < 50; ++i) CHECK(more[i] == 150 + i);
    CHECK(more[50] == ~0ull);
    CHECK(swap.slots_in_use() == cap);
    CHECK(allocate(swap, 1).empty());
    const std::vector<std::uint64_t> freed = {199, 130, 64, 63, 5};
    swap.release(freed);
    CHECK(swap.slots_in_use() == cap - freed.size());
    CHECK(allocate(swap, 3) == std::vector<std::uint64_t>{5, 63, 64});
    CHECK(allocate(swap, 3) == std::vector<std::uint64_t>{130, 199});
    CHECK(allocate(swap, 1).empty());
}

// Protects: the file stays compact. Over a random churn of allocate/write/release, every slot
// handed out lies below the peak of slots in use so far (lowest free slot first), and the file's
// blocks stay within that peak: a store that kept taking new slots (or left freed ones behind)
// would grow the file to thousands of pages.
TEST_CASE("SwapFile: over a churn of allocate/write/release the file stays within the peak of slots in use") {
    SwapFile swap(swap_path(), 65536 * os_page_size());
    std::mt19937_64 rng(4);
    std::vector<std::uint64_t> held;
    std::size_t peak = 0;
    Pages buf(32);
    buf.randomize(5);
    for (int round = 0; round < 3000; ++round) {
        const std::size_t want = 1 + rng() % 32;
        std::vector<std::uint64_t> got = allocate(swap, want);
        REQUIRE(got.size() == want);
        peak = std::max(peak, held.size() + got.size());
        for (const std::uint64_t s : got) CHECK(s < peak);
        std::vector<PageIo> w = batch(got, buf);
        swap.write(w);
        REQUIRE(all_ok(w));
        held.insert(held.end(), got.begin(), got.end());
        std::shuffle(held.begin(), held.end(), rng);
        const std::size_t drop = std::min(held.size(), std::size_t(rng() % 40));
        swap.release(std::span<const std::uint64_t>(held.data() + held.size() - drop, drop));
        held.resize(held.size() - drop);
        CHECK(swap.slots_in_use() == held.size());
    }
    INFO("peak " << peak << " pages, file " << allocated_bytes(swap.path()) << " bytes");
    CHECK(peak < 1000);
    // A few blocks of the file system's own (an extent tree) may come on top.
    CHECK(allocated_bytes(swap.path()) <= (peak + 16) * os_page_size());
}

// Protects: references. retain adds one to each slot, so a slot is freed only by its last release;
// a free slot, a slot past the end, or a count that would overflow refuse the whole call with
// nothing changed (the slots retained before the refused one are given back).
TEST_CASE("SwapFile: retain counts references; a free slot or an overflow refuses the call with nothing changed") {
    SwapFile swap(swap_path(), 64 * os_page_size());
    const std::vector<std::uint64_t> s = allocate(swap, 3);  // 0, 1, 2
    const std::vector<std::uint64_t> one = {0};
    REQUIRE(swap.retain(one) == 0);
    swap.release(one);
    CHECK(swap.slots_in_use() == 3);  // still held by its first reference
    swap.release(one);
    CHECK(swap.slots_in_use() == 2);
    CHECK(swap.retain(one) == EINVAL);  // free now
    const std::vector<std::uint64_t> past = {1, 64};
    CHECK(swap.retain(past) == EINVAL);
    // Slot 2 up to the largest count; then {1, 2} is refused and slot 1 keeps one reference.
    const std::vector<std::uint64_t> two = {2};
    int err = 0;
    std::size_t retained = 0;
    while ((err = swap.retain(two)) == 0) ++retained;
    CHECK(err == EOVERFLOW);
    CHECK(retained >= 255);
    const std::vector<std::uint64_t> both = {1, 2};
    CHECK(swap.retain(both) == EOVERFLOW);
    const std::vector<std::uint64_t> just1 = {1};
    swap.release(just1);
    CHECK(swap.slots_in_use() == 1);  // slot 1 had one reference: the refused call gave its back
    for (std::size_t i = 0; i < retained; ++i) swap.release(two);
    CHECK(swap.slots_in_use() == 1);
    swap.release(two);
    CHECK(swap.slots_in_use() == 0);
    CHECK(allocate(swap, 3) == std::vector<std::uint64_t>{0, 1, 2});
}

// Protects: slot references across a real fork (the kernel's swap_duplicate). The parent retains
// its slots for the child and forks; then it releases them and everything else, reallocates and
// rewrites: the slots the child holds are never handed out, so the child reads its pages intact
// afterwards. Slots the child allocates are not handed to the parent either. The child's
// destructor leaves the parent's file in place; the child's last release frees its slots.
TEST_CASE("SwapFile: a forked child keeps its retained slots while the parent reuses others; its destructor leaves the file") {
    std::optional<SwapFile> swap(std::in_place, swap_path(), 256 * os_page_size());
    const std::string path = swap->path();
    const std::vector<std::uint64_t> mine = allocate(*swap, 32);  // 0..15 for the child, 16..31 the parent's
    const std::vector<std::uint64_t> child_slots(mine.begin(), mine.begin() + 16);
    Pages content(32);
    content.randomize(6);
    std::vector<PageIo> w = batch(mine, content);
    swap->write(w);
    REQUIRE(all_ok(w));
    REQUIRE(swap->retain(child_slots) == 0);

    int to_child[2], to_parent[2];
    REQUIRE(pipe(to_child) == 0);
    REQUIRE(pipe(to_parent) == 0);
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        alarm(20);
        // Slots of the child's own, which the parent must not get.
        std::vector<std::uint64_t> own = allocate(*swap, 4);
        CHILD_CHECK(own.size() == 4);
        Pages own_content(4);
        own_content.randomize(7);
        std::vector<PageIo> ow = batch(own, own_content);
        swap->write(ow);
        CHILD_CHECK(all_ok(ow));
        CHILD_CHECK(::write(to_parent[1], own.data(), own.size() * 8) == ssize_t(own.size() * 8));
        char go;
        CHILD_CHECK(::read(to_child[0], &go, 1) == 1);  // the parent has reused everything it could
        Pages in(16);
        std::vector<PageIo> r = batch(child_slots, in);
        swap->read(r);
        CHILD_CHECK(all_ok(r));
        for (std::size_t i = 0; i < 16; ++i) CHILD_CHECK(same_page(in.page(i), content.page(i)));
        Pages own_in(4);
        std::vector<PageIo> orr = batch(own, own_in);
        swap->read(orr);
        CHILD_CHECK(all_ok(orr));
        for (std::size_t i = 0; i < 4; ++i) CHILD_CHECK(same_page(own_in.page(i), own_content.page(i)));
        swap->release(child_slots);
        swap->release(own);
        swap.reset();
        struct stat st {};
        CHILD_CHECK(stat(path.c_str(), &st) == 0);
        _exit(0);
    }
    std::vector<std::uint64_t> child_own(4);
    REQUIRE(::read(to_parent[0], child_own.data(), 32) == 32);
    swap->release(mine);
    CHECK(swap->slots_in_use() == 16 + 4);  // the child's references keep its slots
    std::vector<std::uint64_t> reused = allocate(*swap, 236);
    CHECK(reused.size() == 236);  // everything else: 256 minus the child's 20
    std::set<std::uint64_t> held_by_child(child_slots.begin(), child_slots.end());
    held_by_child.insert(child_own.begin(), child_own.end());
    for (const std::uint64_t s : reused) CHECK(!held_by_child.count(s));
    Pages junk(236);
    junk.randomize(8);
    std::vector<PageIo> jw = batch(reused, junk);
    swap->write(jw);
    CHECK(all_ok(jw));
    CHECK(::write(to_child[1], "g", 1) == 1);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    for (int fd : {to_child[0], to_child[1], to_parent[0], to_parent[1]}) close(fd);
    struct stat st {};
    CHECK(stat(path.c_str(), &st) == 0);
    // The child released its slots: they are the parent's again, lowest first.
    CHECK(swap->slots_in_use() == 236);
    std::vector<std::uint64_t> back = allocate(*swap, 20);
    std::vector<std::uint64_t> expect(held_by_child.begin(), held_by_child.end());
    CHECK(back == expect);
    swap.reset();
    CHECK(stat(path.c_str(), &st) != 0);  // the creator's destructor removes the file
}

// Protects: on a disk file system the store gets O_DIRECT, and the pages it writes and reads do
// not stay in the kernel's page cache (where they would defeat a resident limit). The control
// write through an ordinary descriptor shows that mincore sees cached pages of this file.
TEST_CASE("SwapFile: O_DIRECT on a disk file system; written and read pages stay out of the page cache" *
          doctest::skip(memory_fs("/var/tmp"))) {
    SwapFile swap(swap_path(), 256 * os_page_size());
    CHECK(swap.direct());
    const std::vector<std::uint64_t> slots = allocate(swap, 64);
    Pages out(64), in(64);
    out.randomize(9);
    std::vector<PageIo> w = batch(slots, out);
    swap.write(w);
    REQUIRE(all_ok(w));
    CHECK(cached_pages(swap.path()) == 0);
    std::vector<PageIo> r = batch(slots, in);
    swap.read(r);
    REQUIRE(all_ok(r));
    for (std::size_t i = 0; i < 64; ++i) CHECK(same_page(out.page(i), in.page(i)));
    CHECK(cached_pages(swap.path()) == 0);
    const int fd = open(swap.path().c_str(), O_WRONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    CHECK(pwrite(fd, out.page(0), os_page_size(), off_t(200 * os_page_size())) == ssize_t(os_page_size()));
    close(fd);
    CHECK(cached_pages(swap.path()) == 1);
}

// Protects: the buffered path (direct = false, also taken where a file system refuses O_DIRECT):
// written pages are written back and dropped from the page cache after each batch, and pages read
// are dropped after the read, so neither stays in memory; content intact.
TEST_CASE("SwapFile: without O_DIRECT, written and read pages are dropped from the page cache after each batch" *
          doctest::skip(memory_fs("/var/tmp"))) {
    SwapFile swap(swap_path(), 256 * os_page_size(), {.direct = false});
    CHECK(!swap.direct());
    Pages out(64), in(64);
    out.randomize(10);
    std::vector<std::uint64_t> slots = allocate(swap, 64);
    std::vector<PageIo> w = batch(slots, out);
    swap.write(w);
    REQUIRE(all_ok(w));
    CHECK(cached_pages(swap.path()) == 0);
    // Scattered slots, out of order: one range covers them.
    std::vector<std::uint64_t> some = {60, 2, 33};
    std::vector<PageIo> r = batch(some, in);
    swap.read(r);
    REQUIRE(all_ok(r));
    CHECK(same_page(in.page(0), out.page(60)));
    CHECK(same_page(in.page(1), out.page(2)));
    CHECK(same_page(in.page(2), out.page(33)));
    CHECK(cached_pages(swap.path()) == 0);
}

// Protects: file systems that are memory. ramfs refuses O_DIRECT: the store says so (direct()
// false) and works buffered. A full tmpfs gives a batch of consecutive slots a short write: the
// pages that got space are written, the rest answer ENOSPC one by one, and the written ones read
// back intact. In a child with a private mount namespace (root only; skipped otherwise).
TEST_CASE("SwapFile: ramfs refuses O_DIRECT (buffered I/O); on a full tmpfs only the pages without space fail" *
          doctest::skip(!g_private_mounts)) {
    const auto end = usermm_test::run_guarded(
        [] {
            CHILD_CHECK(unshare(CLONE_NEWNS) == 0);
            CHILD_CHECK(mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0);
            const std::size_t page = os_page_size();
            char dir[] = "/tmp/usermm-swap-fs-XXXXXX";
            CHILD_CHECK(mkdtemp(dir) != nullptr);
            {
                CHILD_CHECK(mount("ramfs", dir, "ramfs", 0, nullptr) == 0);
                SwapFile swap(swap_path(dir), 64 * page);
                CHILD_CHECK(!swap.direct());
                const std::vector<std::uint64_t> slots = allocate(swap, 16);
                Pages out(16), in(16);
                out.randomize(11);
                std::vector<PageIo> w = batch(slots, out);
                swap.write(w);
                CHILD_CHECK(all_ok(w));
                std::vector<PageIo> r = batch(slots, in);
                swap.read(r);
                CHILD_CHECK(all_ok(r));
                for (std::size_t i = 0; i < 16; ++i) CHILD_CHECK(same_page(in.page(i), out.page(i)));
            }
            CHILD_CHECK(umount2(dir, 0) == 0);
            {
                CHILD_CHECK(mount("tmpfs", dir, "tmpfs", 0, fmt::format("size={}", 16 * page).c_str()) == 0);
                SwapFile swap(swap_path(dir), 64 * page);
                const std::vector<std::uint64_t> slots = allocate(swap, 32);
                Pages out(32), in(32);
                out.randomize(12);
                std::vector<PageIo> w = batch(slots, out);
                swap.write(w);
                std::size_t ok = 0;
                while (ok < 32 && w[ok].error == 0) ++ok;
                CHILD_CHECK(ok >= 1);
                CHILD_CHECK(ok < 32);
                for (std::size_t i = ok; i < 32; ++i) CHILD_CHECK(w[i].error == ENOSPC);
                std::vector<PageIo> r = batch(std::vector<std::uint64_t>(slots.begin(), slots.begin() + long(ok)), in);
                swap.read(r);
                CHILD_CHECK(all_ok(r));
                for (std::size_t i = 0; i < ok; ++i) CHILD_CHECK(same_page(in.page(i), out.page(i)));
            }
            CHILD_CHECK(umount2(dir, 0) == 0);
            rmdir(dir);
        },
        20);
    check_survived(end);
}

// Protects: bad input is refused at construction with a message naming the size or the path.
TEST_CASE("SwapFile: bad sizes and paths throw system_error naming them") {
    const std::size_t page = os_page_size();
    auto expect = [](std::uint64_t size, int err, const std::string& part, const std::string& path) {
        try {
            SwapFile swap(path, size);
            FAIL("no error for size " << size << " at " << path);
        } catch (const std::system_error& e) {
            INFO(e.what());
            CHECK(e.code().value() == err);
            CHECK(std::string(e.what()).find(part) != std::string::npos);
            CHECK(std::string(e.what()).find("usermm::SwapFile") != std::string::npos);
        }
    };
    const std::string path = swap_path();
    expect(0, EINVAL, "size 0 ", path);
    expect(page - 1, EINVAL, fmt::format("size {} ", page - 1), path);
    expect(3 * page + 1, EINVAL, fmt::format("size {} ", 3 * page + 1), path);
    expect((std::uint64_t(1) << 32) * page + page, EFBIG, fmt::format("size {} ", (std::uint64_t(1) << 32) * page + page), path);
    struct stat st {};
    CHECK(stat(path.c_str(), &st) != 0);  // nothing created for a refused size
    expect(page, ENOENT, "/var/tmp/no-such-dir-usermm/swap", "/var/tmp/no-such-dir-usermm/swap");
}

// Protects: the allocator is lock-free and exact under concurrency. Four threads, started together,
// allocate, retain, release in random batches from a small store (so it runs full and words turn
// full and free again all the time); a per-slot owner flag catches a slot given to two owners at
// once. At the end every slot is free and allocate hands out all of them, lowest first: no slot
// was lost behind a stale "full" mark.
TEST_CASE("SwapFile: four threads allocating and releasing never share a slot, and lose none") {
    const std::size_t cap = 320;
    SwapFile swap(swap_path(), cap * os_page_size());
    std::vector<std::atomic<int>> owner(cap);
    std::atomic<long> double_owned{0}, errors{0};
    std::barrier start(4);
    std::vector<std::thread> threads;
    for (int t = 1; t <= 4; ++t) {
        threads.emplace_back([&, t] {
            std::mt19937_64 rng{std::uint64_t(t)};
            std::vector<std::uint64_t> held;
            start.arrive_and_wait();
            for (int round = 0; round < 20000; ++round) {
                std::vector<std::uint64_t> got(1 + rng() % 48);
                got.resize(swap.allocate(got));
                for (const std::uint64_t s : got) {
                    int expected = 0;
                    if (!owner[s].compare_exchange_strong(expected, t)) ++double_owned;
                }
                if (!got.empty() && rng() % 4 == 0) {
                    if (swap.retain(got) != 0) ++errors;
                    swap.release(got);
                }
                held.insert(held.end(), got.begin(), got.end());
                std::shuffle(held.begin(), held.end(), rng);
                const std::size_t drop = std::min(held.size(), std::size_t(rng() % 48));
                for (std::size_t i = held.size() - drop; i < held.size(); ++i) {
                    int expected = t;
                    if (!owner[held[i]].compare_exchange_strong(expected, 0)) ++errors;
                }
                swap.release(std::span<const std::uint64_t>(held.data() + held.size() - drop, drop));
                held.resize(held.size() - drop);
            }
            for (const std::uint64_t s : held) owner[s].store(0);
            swap.release(held);
        });
    }
    for (auto& th : threads) th.join();
    CHECK(double_owned.load() == 0);
    CHECK(errors.load() == 0);
    CHECK(swap.slots_in_use() == 0);
    std::vector<std::uint64_t> all = allocate(swap, cap + 1);
    REQUIRE(all.size() == cap);
    for (std::size_t i = 0; i < cap; ++i) CHECK(all[i] == i);
}
