// Checkpoint images: chains that name their run, descriptors read from offset 0, append-only logs,
// write_to that never blocks signals, and hand-made images (with a valid checksum) that claim what
// map() would refuse or what would cost far more than the image.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <list>
#include <memory_resource>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/crc.hpp>
#include <fmt/format.h>

#include <usermm/memory_resource.hpp>
#include <usermm/usermm.hpp>

#include "test_util.hpp"

namespace {

using namespace usermm_test;
using usermm::Prot;
using Bytes = std::vector<std::uint8_t>;

class MemFd {
public:
    MemFd() : fd_(memfd_create("usermm-test-image", MFD_CLOEXEC)) { REQUIRE(fd_ >= 0); }
    explicit MemFd(const Bytes& content) : MemFd() {
        REQUIRE(pwrite(fd_, content.data(), content.size(), 0) == ssize_t(content.size()));
    }
    MemFd(const MemFd&) = delete;
    MemFd& operator=(const MemFd&) = delete;
    ~MemFd() { close(fd_); }
    int get() const { return fd_; }
    Bytes contents() const {
        Bytes out(std::size_t(lseek(fd_, 0, SEEK_END)));
        REQUIRE(pread(fd_, out.data(), out.size(), 0) == ssize_t(out.size()));
        return out;
    }

private:
    int fd_;
};

// The usermm::Error that `call` throws; fails the test if it throws none.
template <typename Call>
std::pair<int, std::string> error_of(Call&& call) {
    try {
        call();
    } catch (const usermm::Error& e) {
        return {e.code().value(), e.what()};
    }
    FAIL_CHECK("no usermm::Error was thrown");
    return {0, ""};
}

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

// CRC-32C with the parameters README "Snapshot images" documents for version 3.
using Crc32c = boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true>;

std::uint64_t crc32c(const std::uint8_t* p, std::size_t n) {
    Crc32c crc;
    crc.process_bytes(p, n);
    return crc.checksum();
}

// An arena with one VMA whose pages 0..n-1 hold `tag + i` in their first word.
struct Run {
    usermm::Arena arena;
    char* base;
    explicit Run(std::size_t pages) : arena(pages * usermm::page_size()) {
        base = static_cast<char*>(arena.map(pages * usermm::page_size(), Prot::ReadWrite, {.name = "run"}));
    }
    void tag(std::size_t first, std::size_t n, std::uint64_t tag) {
        for (std::size_t i = first; i < first + n; ++i) write_u64(base + i * usermm::page_size(), tag + i);
    }
};

std::uint64_t word_at(const usermm::Arena& a, std::size_t page) {
    return read_u64(static_cast<const char*>(a.base()) + page * usermm::page_size());
}

}  // namespace

TEST_CASE("images: an increment of another arena's chain is refused, and says so") {
    Run one(16), two(16);
    one.tag(0, 4, 100);
    two.tag(0, 4, 200);
    const usermm::Snapshot one1 = one.arena.snapshot();
    const usermm::Snapshot two1 = two.arena.snapshot();
    one.tag(2, 1, 1000);
    two.tag(3, 1, 2000);
    const usermm::Snapshot one2 = one.arena.snapshot();
    const usermm::Snapshot two2 = two.arena.snapshot();
    // Both chains have the same sequence numbers, range and layout: only their identity differs.
    REQUIRE(one1.sequence() == two1.sequence());
    REQUIRE(one2.sequence() == two2.sequence());
    const MemFd one_full, one_inc, two_full, two_inc;
    one1.write_to(one_full.get());
    one2.write_to(one_inc.get(), one1);
    two1.write_to(two_full.get());
    two2.write_to(two_inc.get(), two1);

    const auto [err, what] = error_of([&] { (void)usermm::Arena::load(std::array{one_full.get(), two_inc.get()}); });
    CHECK(err == EINVAL);
    CHECK_MESSAGE(contains(what, "another chain"), what);
    CHECK(error_of([&] { (void)usermm::Arena::load(std::array{two_full.get(), one_inc.get()}); }).first == EINVAL);

    const usermm::Arena a = usermm::Arena::load(std::array{one_full.get(), one_inc.get()});
    CHECK(word_at(a, 2) == 1002);
    CHECK(word_at(a, 3) == 103);
    const usermm::Arena b = usermm::Arena::load(std::array{two_full.get(), two_inc.get()});
    CHECK(word_at(b, 2) == 202);
    CHECK(word_at(b, 3) == 2003);

    SUBCASE("a forked child's snapshots start a chain of their own") {
        // Parent and child both continue from snapshot 2 and number their next snapshots alike.
        const MemFd child_inc3, parent_inc4;
        const ChildEnd child = run_in_child([&] {
            one.tag(4, 1, 4000);
            const usermm::Snapshot three = one.arena.snapshot();
            three.write_to(child_inc3.get(), one2);
        });
        REQUIRE(child.exited);
        REQUIRE(child.exit_code == 0);
        one.tag(5, 1, 5000);
        const usermm::Snapshot three = one.arena.snapshot();
        one.tag(6, 1, 6000);
        const usermm::Snapshot four = one.arena.snapshot();
        four.write_to(parent_inc4.get(), three);
        const std::vector<usermm::ImageInfo> info = usermm::image_info(child_inc3.get());
        REQUIRE(info.size() == 1);
        CHECK(info[0].sequence == three.sequence());
        CHECK(info[0].base_chain == usermm::image_info(one_full.get()).at(0).chain);  // it continues the parent's
        CHECK(info[0].chain != info[0].base_chain);
        // The child's history after snapshot 2 is a real one; mixed with the parent's, it is not.
        const usermm::Arena c = usermm::Arena::load(std::array{one_full.get(), one_inc.get(), child_inc3.get()});
        CHECK(word_at(c, 4) == 4004);
        const auto [err2, what2] = error_of([&] {
            (void)usermm::Arena::load(
                std::array{one_full.get(), one_inc.get(), child_inc3.get(), parent_inc4.get()});
        });
        CHECK(err2 == EINVAL);
        CHECK_MESSAGE(contains(what2, "another chain"), what2);
    }
}

TEST_CASE("images: load reads each descriptor from offset 0, right after write_to") {
    Run run(16);
    run.tag(0, 8, 10);
    const usermm::Snapshot s1 = run.arena.snapshot();
    run.tag(5, 1, 500);
    const usermm::Snapshot s2 = run.arena.snapshot();
    const MemFd fd, fd2;
    s1.write_to(fd.get());
    s2.write_to(fd2.get(), s1);
    // The README's line, with both descriptors at their end.
    const usermm::Arena copy = usermm::Arena::load(std::array{fd.get(), fd2.get()});
    CHECK(word_at(copy, 5) == 505);
    CHECK(word_at(copy, 7) == 17);
    // The descriptors' offsets are not moved.
    CHECK(lseek(fd.get(), 0, SEEK_CUR) == lseek(fd.get(), 0, SEEK_END));
}

namespace {
void on_alarm(int) {}
}  // namespace

TEST_CASE("images: write_to into a pipe nobody reads can be ended by SIGTERM") {
    // An image larger than both the pipe and write_to's buffer, so that the child blocks in a write
    // made while it is still walking the snapshot's pages.
    constexpr std::size_t kPages = 1024;
    int image[2], ready[2];
    REQUIRE(pipe2(image, O_CLOEXEC) == 0);
    REQUIRE(pipe2(ready, O_CLOEXEC) == 0);
    const long capacity = fcntl(image[1], F_GETPIPE_SZ);
    REQUIRE(capacity > 0);
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL);
        Run run(kPages);
        run.tag(0, kPages, 1);
        const usermm::Snapshot snap = run.arena.snapshot();
        const char go = 1;
        if (write(ready[1], &go, 1) != 1) _exit(3);
        snap.write_to(image[1]);
        _exit(2);  // nobody reads: write_to cannot return
    }
    close(image[1]);
    close(ready[1]);
    char go = 0;
    REQUIRE(read(ready[0], &go, 1) == 1);
    // The pipe is full: the child is blocked in write(2).
    for (int queued = 0; queued < capacity;) REQUIRE(ioctl(image[0], FIONREAD, &queued) == 0);
    REQUIRE(kill(pid, SIGTERM) == 0);
    struct sigaction sa {}, old {};
    sa.sa_handler = on_alarm;  // no SA_RESTART: waitpid returns EINTR when it fires
    sigaction(SIGALRM, &sa, &old);
    alarm(10);
    int status = 0;
    const pid_t waited = waitpid(pid, &status, 0);
    alarm(0);
    sigaction(SIGALRM, &old, nullptr);
    if (waited != pid) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        FAIL_CHECK("the child did not die of SIGTERM within 10 s: write_to blocked it");
    } else {
        CHECK(WIFSIGNALED(status));
        if (WIFSIGNALED(status)) CHECK(WTERMSIG(status) == SIGTERM);
    }
    close(image[0]);
    close(ready[0]);
}

namespace {
void on_usr1(int) {}
}  // namespace

TEST_CASE("images: a signal handler without SA_RESTART interrupts write_to with EINTR") {
    const ChildEnd child = run_in_child([] {
        struct sigaction sa {};
        sa.sa_handler = on_usr1;
        sigaction(SIGUSR1, &sa, nullptr);
        int image[2];
        if (pipe2(image, O_CLOEXEC) != 0) _exit(2);
        const long capacity = fcntl(image[1], F_GETPIPE_SZ);
        Run run(1024);
        run.tag(0, 1024, 1);
        const usermm::Snapshot snap = run.arena.snapshot();
        const pthread_t writer = pthread_self();
        std::atomic<bool> done{false};
        // While the pipe is full the writer is blocked in write(2): interrupt it. As write(2), a
        // call that wrote part of its buffer returns the count and write_to goes on; the call
        // after it, which has written nothing, returns EINTR.
        std::thread interrupter([&] {
            while (!done.load()) {
                int queued = 0;
                if (ioctl(image[0], FIONREAD, &queued) != 0) _exit(3);
                if (queued == capacity) pthread_kill(writer, SIGUSR1);
            }
        });
        int err = 0;
        std::string what;
        try {
            snap.write_to(image[1]);
        } catch (const usermm::Error& e) {
            err = e.code().value();
            what = e.what();
        }
        done = true;
        interrupter.join();
        std::fprintf(stderr, "%s\n", what.c_str());
        if (err != EINTR || !contains(what, "interrupted by a signal")) _exit(4);
        // The arena is usable: nothing stayed locked.
        run.tag(0, 1, 9);
        run.arena.verify();
    });
    INFO(child.err, " signal ", child.signal);
    CHECK(child.exited);
    CHECK(child.exit_code == 0);
}

TEST_CASE("images: one file holds a full image and its increments back to back, and says what it holds") {
    const std::size_t ps = usermm::page_size();
    Run run(32);
    run.tag(0, 8, 10);
    std::vector<usermm::Snapshot> snaps;
    snaps.push_back(run.arena.snapshot());
    run.tag(3, 2, 300);
    snaps.push_back(run.arena.snapshot());
    run.arena.unmap(run.base + 6 * ps, 2 * ps);
    run.tag(20, 1, 2000);
    snaps.push_back(run.arena.snapshot());
    const MemFd log;
    snaps[0].write_to(log.get());
    snaps[1].write_to(log.get(), snaps[0]);
    snaps[2].write_to(log.get(), snaps[1]);

    const usermm::Arena loaded = usermm::Arena::load(std::array{log.get()});
    CHECK(word_at(loaded, 0) == 10);
    CHECK(word_at(loaded, 3) == 303);
    CHECK(word_at(loaded, 5) == 15);
    CHECK(word_at(loaded, 20) == 2020);
    CHECK(loaded.vmas().size() == 2);
    loaded.verify();

    const std::vector<usermm::ImageInfo> info = usermm::image_info(log.get());
    REQUIRE(info.size() == 3);
    std::uint64_t offset = 0;
    for (std::size_t k = 0; k < 3; ++k) {
        INFO("image ", k);
        CHECK(info[k].offset == offset);
        offset += info[k].bytes;
        CHECK(info[k].sequence == snaps[k].sequence());
        CHECK(info[k].chain == info[0].chain);
        CHECK(info[k].full() == (k == 0));
        CHECK(info[k].base_sequence == (k == 0 ? 0 : snaps[k - 1].sequence()));
        CHECK(info[k].base_chain == (k == 0 ? std::array<std::uint64_t, 2>{} : info[0].chain));
        CHECK(info[k].original_base == run.arena.base());
        CHECK(info[k].arena_size == run.arena.size());
        CHECK(info[k].range_offset == 0);
        CHECK(info[k].range_length == run.arena.size());
    }
    CHECK(offset == log.contents().size());
    // (How many untouched neighbours of a written page an image holds is the engines' business.)
    CHECK(info[0].data_pages >= 8);
    CHECK(info[0].page_records == info[0].data_pages);  // a full image holds no zero records
    CHECK(info[0].vma_count == 1);
    CHECK(info[1].data_pages >= 2);
    CHECK(info[2].vma_count == 2);
    CHECK(info[2].page_records >= info[2].data_pages + 2);  // two pages unmapped, one written
    CHECK(info[2].data_pages >= 1);
    for (const usermm::ImageInfo& i : info) CHECK(i.bytes > i.data_pages * ps);
    // Another arena's chain has another identity.
    Run other(32);
    other.tag(0, 1, 1);
    const MemFd other_image;
    other.arena.snapshot().write_to(other_image.get());
    CHECK(usermm::image_info(other_image.get()).at(0).chain != info[0].chain);

    SUBCASE("a truncated log says where, and how many bytes it found") {
        const Bytes bytes = log.contents();
        const MemFd cut(Bytes(bytes.begin(), bytes.end() - 100));
        const auto [err, what] = error_of([&] { (void)usermm::Arena::load(std::array{cut.get()}); });
        CHECK(err == EINVAL);
        CHECK_MESSAGE(contains(what, fmt::format("image 3 at offset {:#x}: truncated", info[2].offset)), what);
        CHECK_MESSAGE(contains(what, "bytes, the descriptor ends after"), what);
        CHECK(error_of([&] { (void)usermm::image_info(cut.get()); }).first == EINVAL);
        const MemFd empty;
        const auto [err2, what2] = error_of([&] { (void)usermm::Arena::load(std::array{empty.get()}); });
        CHECK(err2 == EINVAL);
        CHECK_MESSAGE(contains(what2, "holds no image"), what2);
        CHECK(usermm::image_info(empty.get()).empty());
    }
    SUBCASE("a pipe is read as it comes") {
        int fds[2];
        REQUIRE(pipe(fds) == 0);
        const Bytes bytes = log.contents();
        REQUIRE(bytes.size() < 65536);  // fits the pipe: no writer thread needed
        REQUIRE(write(fds[1], bytes.data(), bytes.size()) == ssize_t(bytes.size()));
        close(fds[1]);
        CHECK(error_of([&] { (void)usermm::image_info(fds[0]); }).first == ESPIPE);
        const usermm::Arena piped = usermm::Arena::load(std::array{fds[0]});
        CHECK(word_at(piped, 3) == 303);
        CHECK(word_at(piped, 20) == 2020);
        close(fds[0]);
    }
}

namespace {

// Images made by hand, in the format README "Snapshot images" describes, with a valid checksum:
// what the checks see is exactly the field under test.
struct CraftedVma {
    std::uint64_t offset, length;
    std::uint32_t prot = 3, fault_around = 16;
    std::string name = "crafted";
    bool terminated = true;
};
struct CraftedPage {
    std::uint64_t offset;
    std::uint32_t kind = 1;  // 1 data, 2 zero
    std::uint64_t word = 0;  // the data page's first word
};
struct Crafted {
    std::uint64_t arena_base = 0x100000000000ull;
    std::uint64_t arena_size = 0, range_offset = 0, range_length = 0;
    std::array<std::uint64_t, 2> chain{0x1234, 0x5678};
    std::uint64_t sequence = 1;
    std::array<std::uint64_t, 2> base_chain{};
    std::uint64_t base_sequence = 0;
    std::vector<CraftedVma> vmas;
    std::vector<CraftedPage> pages;
    std::int64_t records_delta = 0;  // added to the end record's page count

    Bytes bytes() const {
        const std::size_t ps = usermm::page_size();
        Bytes out;
        auto u64 = [&](std::uint64_t v) { out.insert(out.end(), reinterpret_cast<const std::uint8_t*>(&v), reinterpret_cast<const std::uint8_t*>(&v) + 8); };
        auto u32 = [&](std::uint32_t v) { out.insert(out.end(), reinterpret_cast<const std::uint8_t*>(&v), reinterpret_cast<const std::uint8_t*>(&v) + 4); };
        for (char c : std::string_view("USERMMSN")) out.push_back(std::uint8_t(c));
        u32(3);
        u32(std::uint32_t(ps));
        u64(arena_base);
        u64(arena_size);
        u64(range_offset);
        u64(range_length ? range_length : arena_size);
        u64(chain[0]);
        u64(chain[1]);
        u64(sequence);
        u64(base_chain[0]);
        u64(base_chain[1]);
        u64(base_sequence);
        u32(std::uint32_t(vmas.size()));
        u32(0);
        for (const CraftedVma& v : vmas) {
            u64(v.offset);
            u64(v.length);
            u32(v.prot);
            u32(v.fault_around);
            char name[40];
            std::memset(name, v.terminated ? 0 : 'x', sizeof name);
            std::memcpy(name, v.name.data(), std::min(v.name.size(), sizeof name));
            out.insert(out.end(), name, name + sizeof name);
        }
        std::uint64_t data = 0;
        for (const CraftedPage& p : pages) {
            u64(p.offset);
            u32(p.kind);
            u32(0);
            if (p.kind == 1) {
                ++data;
                u64(p.word);
                out.resize(out.size() + ps - 8);
            }
        }
        u64(~std::uint64_t(0));
        u32(0x444e45);
        u32(0);
        u64(pages.size() + std::uint64_t(records_delta));
        u64(data);
        u64(out.size() + 16);
        u64(crc32c(out.data(), out.size()));
        return out;
    }
};

// A small, well-formed full image: 16 pages, one VMA of 8, one data page.
Crafted small_image() {
    const std::size_t ps = usermm::page_size();
    Crafted c;
    c.arena_size = 16 * ps;
    c.vmas.push_back({.offset = 0, .length = 8 * ps});
    c.pages.push_back({.offset = 2 * ps, .word = 42});
    return c;
}

std::pair<int, std::string> load_error(const Crafted& c) {
    const MemFd image(c.bytes());
    return error_of([&] { (void)usermm::Arena::load(std::array{image.get()}); });
}

}  // namespace

TEST_CASE("images: hand-made images are held to what map() accepts") {
    const std::size_t ps = usermm::page_size();
    {
        const MemFd good(small_image().bytes());
        const usermm::Arena a = usermm::Arena::load(std::array{good.get()});
        CHECK(word_at(a, 2) == 42);
        a.verify();
    }
    struct Bad {
        const char* what;
        Crafted image;
        const char* says;
    };
    std::vector<Bad> bad;
    auto with = [&](const char* what, const char* says, auto change) {
        Crafted c = small_image();
        change(c);
        bad.push_back({what, c, says});
    };
    with("fault-around 2^32-1", "fault-around", [](Crafted& c) { c.vmas[0].fault_around = 0xffffffffu; });
    with("fault-around 2^20+1", "fault-around", [](Crafted& c) { c.vmas[0].fault_around = (1u << 20) + 1; });
    with("unknown protection bits", "protection", [](Crafted& c) { c.vmas[0].prot = 8; });
    with("a name without terminator", "name", [](Crafted& c) { c.vmas[0].terminated = false; });
    with("overlapping VMAs", "in order", [&](Crafted& c) { c.vmas.push_back({.offset = 4 * ps, .length = 8 * ps}); });
    with("VMAs out of order", "in order", [&](Crafted& c) {
        c.vmas[0].offset = 10 * ps;
        c.vmas[0].length = 2 * ps;
        c.vmas.push_back({.offset = 0, .length = 2 * ps});
        c.pages.clear();
    });
    with("a VMA beyond the range", "inside the range", [&](Crafted& c) { c.vmas[0].length = 17 * ps; });
    with("an unaligned VMA", "page-aligned", [&](Crafted& c) { c.vmas[0].length = 8 * ps + 8; });
    with("an empty VMA", "page-aligned", [&](Crafted& c) { c.vmas[0].length = 0; });
    with("data outside every VMA", "outside every VMA", [&](Crafted& c) { c.pages[0].offset = 9 * ps; });
    with("a page outside the range", "outside the range", [&](Crafted& c) { c.pages[0].offset = 16 * ps; });
    with("pages out of order", "out of order", [&](Crafted& c) { c.pages.push_back({.offset = ps}); });
    with("a zero record in a full image", "zero page", [&](Crafted& c) { c.pages.push_back({.offset = 3 * ps, .kind = 2}); });
    with("an unknown page kind", "unknown kind", [&](Crafted& c) { c.pages.push_back({.offset = 3 * ps, .kind = 7}); });
    with("a page count that does not match", "counts", [](Crafted& c) { c.records_delta = 1; });
    with("an arena beyond the address space", "user address space", [](Crafted& c) { c.arena_size = 1ull << 47; });
    with("an unaligned arena base", "user address space", [](Crafted& c) { c.arena_base += 8; });
    with("an arena at address 0", "user address space", [](Crafted& c) { c.arena_base = 0; });
    with("a range beyond the arena", "does not fit", [&](Crafted& c) { c.range_length = 17 * ps; });
    with("no chain identity", "chain identity", [](Crafted& c) { c.chain = {}; });
    with("a first image that is an increment", "must be a full one", [](Crafted& c) {
        c.base_chain = c.chain;
        c.base_sequence = 0;
        c.sequence = 2;
        c.base_sequence = 1;
    });
    const long mappings_before = process_mappings();
    for (const Bad& b : bad) {
        INFO(b.what);
        const auto [err, what] = load_error(b.image);
        CHECK(err == EINVAL);
        CHECK_MESSAGE(contains(what, b.says), what);
    }
    CHECK(process_mappings() <= mappings_before + 16);

    // image_info reads no page and no checksum, but holds the end record's counts to the length.
    Bytes inflated = small_image().bytes();
    const std::uint64_t pages = 1000;
    std::memcpy(inflated.data() + inflated.size() - 32, &pages, 8);  // page_records
    std::memcpy(inflated.data() + inflated.size() - 24, &pages, 8);  // data_pages
    const MemFd liar(inflated);
    const auto [err, what] = error_of([&] { (void)usermm::image_info(liar.get()); });
    CHECK(err == EINVAL);
    CHECK_MESSAGE(contains(what, "too short for 1 VMAs and 1000 pages"), what);
    CHECK(usermm::image_info(MemFd(small_image().bytes()).get()).at(0).data_pages == 1);
}

TEST_CASE("images: load costs what the image holds, not what the arena reserves" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    const std::size_t ps = usermm::page_size();
    SUBCASE("a 64 TiB arena with one page") {
        Crafted c;
        c.arena_base = ps;  // an address load does not use: only the size matters here
        c.arena_size = 64ull << 40;
        c.vmas.push_back({.offset = 0, .length = c.arena_size, .name = "huge"});
        c.pages.push_back({.offset = c.arena_size - ps, .word = 7});
        const MemFd image(c.bytes());
        // Minor faults of this thread stand for the work: a walk over the 32 GiB page-state table
        // of such an arena touches millions of its pages.
        const long faults_before = kernel_minor_faults();
        const usermm::Arena a = usermm::Arena::load(std::array{image.get()});
        const long faults = kernel_minor_faults() - faults_before;
        CHECK(a.size() == c.arena_size);
        CHECK(word_at(a, c.arena_size / ps - 1) == 7);
        CHECK_MESSAGE(faults < 1000, faults, " page faults to load an image of one page");
    }
    SUBCASE("zero records of pages no image filled commit nothing") {
        constexpr std::size_t kPages = 1 << 16;  // 256 MiB of zero pages, 1 MiB of records
        Crafted full;
        full.arena_size = kPages * ps;
        full.vmas.push_back({.offset = 0, .length = full.arena_size, .name = "heap"});
        full.pages.push_back({.offset = 0, .word = 1});
        Crafted inc = full;
        inc.sequence = 2;
        inc.base_chain = full.chain;
        inc.base_sequence = 1;
        inc.pages.clear();
        for (std::size_t i = 0; i < kPages; ++i) inc.pages.push_back({.offset = i * ps, .kind = 2});
        const MemFd image(full.bytes()), increment(inc.bytes());
        const long faults_before = kernel_minor_faults();
        const usermm::Arena a = usermm::Arena::load(std::array{image.get(), increment.get()});
        const long faults = kernel_minor_faults() - faults_before;
        CHECK(word_at(a, 0) == 0);  // the increment zeroed the one page the full image had
        CHECK(a.size() == kPages * ps);
        CHECK_MESSAGE(faults < 2000, faults, " page faults to apply zero records to pages holding nothing");
    }
}

namespace {
struct Node {
    Node* next;
    std::uint64_t value;
};
// Walks the list from `head`, checking that it holds 0, 1, ... n-1 and that every node lies in
// [lo, hi); returns how many it found intact.
std::size_t walk(const Node* head, const void* lo, const void* hi, std::size_t n) {
    std::size_t k = 0;
    for (const Node* p = head; p && k < n; p = p->next, ++k)
        if (static_cast<const void*>(p) < lo || static_cast<const void*>(p) >= hi || p->value != k) return k;
    return k;
}
}  // namespace

TEST_CASE("images: a pointer-linked list restarts at the original base, in a new process") {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kNodes = 1000, kPages = 256;
    std::optional<usermm::Arena> arena(std::in_place, kPages * ps);
    auto* const base = static_cast<char*>(arena->map(kPages * ps, Prot::ReadWrite, {.name = "list"}));
    // Nodes scattered over the pages, linked in value order; the head pointer is at offset 0.
    Node* prev = nullptr;
    for (std::size_t k = 0; k < kNodes; ++k) {
        auto* node = reinterpret_cast<Node*>(base + ps + (k * 7919 % (kPages - 1)) * ps + (k % 64) * sizeof(Node));
        node->value = k;
        node->next = nullptr;
        if (prev)
            prev->next = node;
        else
            *reinterpret_cast<Node**>(base) = node;
        prev = node;
    }
    const void* const lo = base;
    const void* const hi = base + kPages * ps;
    REQUIRE(walk(*reinterpret_cast<Node**>(base), lo, hi, kNodes) == kNodes);
    const MemFd image;
    arena->snapshot().write_to(image.get());
    CHECK(usermm::image_info(image.get()).at(0).original_base == base);

    // The original arena still holds the range.
    const auto [err, what] = error_of([&] {
        (void)usermm::Arena::load(std::array{image.get()}, {.at_original_base = true});
    });
    CHECK(err == EEXIST);
    CHECK_MESSAGE(contains(what, fmt::format("[{:#x}, {:#x}) is not free", std::uintptr_t(lo), std::uintptr_t(hi))),
                  what);
    {
        // Elsewhere, offsets are kept and pointers are not: the list still points into the original.
        const usermm::Arena moved = usermm::Arena::load(std::array{image.get()});
        CHECK(moved.base() != base);
        CHECK(*static_cast<Node* const*>(moved.base()) == *reinterpret_cast<Node**>(base));
    }
    arena.reset();

    const ChildEnd child = run_in_child([&] {
        usermm::Arena again = usermm::Arena::load(std::array{image.get()}, {.at_original_base = true});
        if (again.base() != lo) _exit(2);
        if (walk(*static_cast<Node**>(again.base()), lo, hi, kNodes) != kNodes) _exit(3);
        again.verify();
        // The list is live memory again: it can grow.
        auto* tail = reinterpret_cast<Node*>(static_cast<char*>(again.base()) + 64);
        tail->value = kNodes;
        tail->next = nullptr;
        Node* last = *static_cast<Node**>(again.base());
        while (last->next) last = last->next;
        last->next = tail;
        if (walk(*static_cast<Node**>(again.base()), lo, hi, kNodes + 1) != kNodes + 1) _exit(4);
    });
    INFO(child.err);
    CHECK(child.exited);
    CHECK(child.exit_code == 0);
    // And in this process, once the original is gone.
    const usermm::Arena here = usermm::Arena::load(std::array{image.get()}, {.at_original_base = true});
    CHECK(here.base() == lo);
    CHECK(walk(*static_cast<Node* const*>(here.base()), lo, hi, kNodes) == kNodes);
}

namespace {
// What the heap's root points to: containers that live in the heap themselves.
struct Store {
    std::pmr::list<std::uint64_t> list;
    std::pmr::vector<std::pmr::string> names;
    explicit Store(std::pmr::memory_resource* mr) : list(mr), names(mr) {}
};
bool store_holds(const Store& s, std::size_t n) {
    if (s.list.size() != n || s.names.size() != n) return false;
    std::size_t k = 0;
    for (std::uint64_t v : s.list) {
        if (v != k * k) return false;
        if (std::string_view(s.names[k]) != fmt::format("a name long enough not to be stored inline, number {}", k))
            return false;
        ++k;
    }
    return true;
}
}  // namespace

TEST_CASE("images: std::pmr containers in a usermm::memory_resource survive an image loaded at the original base") {
    const std::size_t ps = usermm::page_size();
    constexpr std::size_t kPages = 256, kItems = 500;
    std::optional<usermm::Arena> arena(std::in_place, kPages * ps);
    void* const heap = arena->map(kPages * ps, Prot::ReadWrite, {.name = "pmr"});
    usermm::memory_resource& mr = usermm::memory_resource::format(heap, kPages * ps);
    CHECK(static_cast<void*>(&mr) > heap);
    CHECK(mr.capacity() == kPages * ps);
    {
        // Freed blocks are handed out again, by size class.
        void* a = mr.allocate(40, 8);
        mr.deallocate(a, 40, 8);
        CHECK(mr.allocate(64, 8) == a);
        mr.deallocate(a, 64, 8);
        CHECK(mr.in_use() == 0);
        void* aligned = mr.allocate(100, 1024);
        CHECK(reinterpret_cast<std::uintptr_t>(aligned) % 1024 == 0);
        mr.deallocate(aligned, 100, 1024);
        CHECK_THROWS_AS((void)mr.allocate(kPages * ps, 8), std::bad_alloc);
    }
    auto* store = new (mr.allocate(sizeof(Store), alignof(Store))) Store(&mr);
    mr.set_root(store);
    const std::size_t store_only = mr.in_use();
    for (std::size_t k = 0; k < kItems; ++k) {
        store->list.push_back(k * k);
        store->names.emplace_back(fmt::format("a name long enough not to be stored inline, number {}", k));
    }
    REQUIRE(store_holds(*store, kItems));
    CHECK(mr.in_use() > kItems * 64);
    const MemFd image;
    arena->snapshot().write_to(image.get());
    arena.reset();

    const ChildEnd child = run_in_child([&] {
        usermm::Arena again = usermm::Arena::load(std::array{image.get()}, {.at_original_base = true});
        usermm::memory_resource& r = usermm::memory_resource::attach(heap);
        auto* s = static_cast<Store*>(r.root());
        if (!store_holds(*s, kItems)) _exit(2);
        // The heap goes on allocating where it left off, and frees into its classes.
        s->list.push_back(kItems * kItems);
        s->names.emplace_back(fmt::format("a name long enough not to be stored inline, number {}", kItems));
        if (!store_holds(*s, kItems + 1)) _exit(3);
        s->list.clear();
        s->names.clear();
        s->names.shrink_to_fit();
        if (r.in_use() != store_only) _exit(4);  // what is left: the Store itself
    });
    INFO(child.err);
    CHECK(child.exited);
    CHECK(child.exit_code == 0);
    const usermm::Arena here = usermm::Arena::load(std::array{image.get()}, {.at_original_base = true});
    CHECK(store_holds(*static_cast<Store*>(usermm::memory_resource::attach(heap).root()), kItems));
    CHECK(error_of([&] { (void)usermm::memory_resource::attach(static_cast<char*>(heap) + ps); }).first == EINVAL);
}

namespace {

// tests/fixtures/image-v2.bin: a version-2 log of two images, written with 4 KiB pages by the
// writer before version 3 (commit a1996c7). An arena of 8 pages with VMAs "fixture-rw" (pages 0-3,
// read-write, fault-around 1) and "fixture-ro" (pages 5-6, read-only, fault-around 2); pages 1 and
// 5 hold fixture_byte(). Snapshot 1 is the full image; then page 1 was zeroed and pages 2-3 made
// read-only, and snapshot 2 is the increment to it (a zero record and the VMA table of three).
constexpr std::size_t kFixturePage = 4096;
constexpr std::uint64_t kFixtureBase = 0x7f816bb4a000ull;

bool fixture_page_size() { return sysconf(_SC_PAGESIZE) == long(kFixturePage); }

std::uint8_t fixture_byte(std::size_t page, std::size_t j) { return std::uint8_t((page * 37 + j * 7 + 1) % 256); }

Bytes fixture_v2() {
    const int fd = open(USERMM_TEST_FIXTURES "/image-v2.bin", O_RDONLY | O_CLOEXEC);
    REQUIRE_MESSAGE(fd >= 0, USERMM_TEST_FIXTURES "/image-v2.bin: ", std::strerror(errno));
    Bytes out(std::size_t(lseek(fd, 0, SEEK_END)));
    const ssize_t n = pread(fd, out.data(), out.size(), 0);
    close(fd);
    REQUIRE(n == ssize_t(out.size()));
    return out;
}

// The accessible pages of a loaded fixture: page 5, and page 1 if `page1_set`, hold fixture_byte();
// all others are zero.
void check_fixture_pages(const usermm::Arena& a, bool page1_set) {
    const auto* p = static_cast<const std::uint8_t*>(a.base());
    for (std::size_t page : {0, 1, 2, 3, 5, 6}) {
        const bool set = page == 5 || (page1_set && page == 1);
        std::size_t wrong = 0;
        for (std::size_t j = 0; j < kFixturePage; ++j)
            wrong += p[page * kFixturePage + j] != (set ? fixture_byte(page, j) : 0);
        CHECK_MESSAGE(wrong == 0, "page ", page);
    }
}

using Layout = std::vector<std::tuple<std::size_t, std::size_t, Prot, std::string, std::size_t>>;

Layout layout_of(const usermm::Arena& a) {
    Layout out;
    for (const usermm::VmaInfo& v : a.vmas())
        out.emplace_back(std::size_t(static_cast<const char*>(v.start) - static_cast<const char*>(a.base())) /
                             kFixturePage,
                         v.length / kFixturePage, v.prot, v.name, v.fault_around_pages);
    return out;
}

}  // namespace

TEST_CASE("images: a version-2 log written before version 3 still loads, and image_info lists it" *
          doctest::skip(!fixture_page_size())) {
    const Bytes log = fixture_v2();
    const MemFd file(log);
    const std::vector<usermm::ImageInfo> info = usermm::image_info(file.get());
    REQUIRE(info.size() == 2);
    CHECK(info[0].offset == 0);
    CHECK(info[0].full());
    CHECK(info[0].sequence == 1);
    CHECK(info[0].original_base == reinterpret_cast<void*>(kFixtureBase));
    CHECK(info[0].arena_size == 8 * kFixturePage);
    CHECK(info[0].vma_count == 2);
    CHECK(info[0].page_records == 2);
    CHECK(info[0].data_pages == 2);
    CHECK(info[1].offset == info[0].bytes);
    CHECK(info[1].offset + info[1].bytes == log.size());
    CHECK(info[1].base_chain == info[0].chain);
    CHECK(info[1].base_sequence == 1);
    CHECK(info[1].sequence == 2);
    CHECK(info[1].vma_count == 3);
    CHECK(info[1].page_records == 1);
    CHECK(info[1].data_pages == 0);

    {
        const MemFd full(Bytes(log.begin(), log.begin() + std::ptrdiff_t(info[0].bytes)));
        const usermm::Arena a = usermm::Arena::load(std::array{full.get()});
        CHECK(layout_of(a) == Layout{{0, 4, Prot::ReadWrite, "fixture-rw", 1}, {5, 2, Prot::Read, "fixture-ro", 2}});
        check_fixture_pages(a, true);
        a.verify();
    }
    const usermm::Arena a = usermm::Arena::load(std::array{file.get()});
    CHECK(layout_of(a) == Layout{{0, 2, Prot::ReadWrite, "fixture-rw", 1},
                                 {2, 2, Prot::Read, "fixture-rw", 1},
                                 {5, 2, Prot::Read, "fixture-ro", 2}});
    check_fixture_pages(a, false);
    a.verify();
}

TEST_CASE("images: a version-2 image with a flipped byte is refused naming the checksum; version 1 is refused" *
          doctest::skip(!fixture_page_size())) {
    Bytes log = fixture_v2();
    Bytes flipped = log;
    flipped[104 + 2 * 64 + 16 + 100] ^= 0x10;  // in page 1's data, after the header and VMA table
    const auto [err, what] = error_of([&] { (void)usermm::Arena::load(std::array{MemFd(flipped).get()}); });
    CHECK(err == EINVAL);
    CHECK_MESSAGE(contains(what, "checksum"), what);
    log[8] = 1;  // the version
    const auto [err1, what1] = error_of([&] { (void)usermm::Arena::load(std::array{MemFd(log).get()}); });
    CHECK(err1 == EINVAL);
    CHECK_MESSAGE(contains(what1, "version 1"), what1);
}

TEST_CASE("images: version 3 ends with the CRC-32C of every byte before it; a flipped byte is refused naming it") {
    const std::uint8_t check[] = {'1', '2', '3', '4', '5', '6', '7', '8', '9'};
    REQUIRE(crc32c(check, sizeof check) == 0xE3069283);  // the CRC-32C check value: these are its parameters
    Run run(8);
    run.tag(0, 3, 500);
    const MemFd file;
    run.arena.snapshot().write_to(file.get());
    const Bytes image = file.contents();
    std::uint32_t version;
    std::memcpy(&version, image.data() + 8, 4);
    CHECK(version == 3);
    std::uint64_t stored;
    std::memcpy(&stored, image.data() + image.size() - 8, 8);
    CHECK(stored == crc32c(image.data(), image.size() - 8));
    CHECK(word_at(usermm::Arena::load(std::array{file.get()}), 2) == 502);

    const std::size_t header = 104, vma = 64, page_record = 16;
    struct Flip {
        const char* where;
        std::size_t at;
    };
    const std::size_t page1 = header + vma + page_record + usermm::page_size() + page_record;
    for (const Flip& f : {Flip{"after the VMA name's terminator", header + 30}, Flip{"page 1's data", page1 + 9},
                          Flip{"the checksum itself", image.size() - 3}}) {
        INFO(f.where);
        Bytes flipped = image;
        flipped[f.at] ^= 0x04;
        const auto [err, what] = error_of([&] { (void)usermm::Arena::load(std::array{MemFd(flipped).get()}); });
        CHECK(err == EINVAL);
        CHECK_MESSAGE(contains(what, "checksum"), what);
        CHECK_MESSAGE(contains(what, "CRC-32C"), what);
    }
}
