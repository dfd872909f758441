// Costs that follow what was touched, not what is reserved: on a 4 TiB arena with one page written,
// every snapshot-related call (taking and releasing snapshots, restore, collect_dirty, images, a
// fork, unmap and the arena's destruction with a snapshot alive) must skip the untouched part of the page
// table and of each snapshot's slot table. Visiting every page took seconds per call (1 G pages
// here); the child's alarm turns that into a failure. No timing is asserted.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <span>
#include <vector>

#include <usermm/usermm.hpp>

#include "test_util.hpp"

using namespace usermm_test;
using usermm::Prot;

namespace {

// Names the step a child reached, so that a timeout says which call took the time.
void step(const char* what) { std::fprintf(stderr, "step: %s\n", what); }

}  // namespace

TEST_CASE("snapshot calls on a 4 TiB arena with one page written cost what was touched" * doctest::skip(usermm_test::kSkipUnderTsan)) {
    const ChildEnd end = run_in_child(
        [] {
            constexpr std::size_t kSize = 4ull << 40;
            const std::size_t ps = usermm::page_size();
            std::optional<usermm::Arena> arena(std::in_place, kSize);
            char* p = static_cast<char*>(arena->map(kSize, Prot::ReadWrite, {.name = "huge"}));
            char* page = p + (kSize / 3 & ~(ps - 1));
            write_u64(page, 5);

            step("4 snapshots taken and released");
            {
                std::vector<usermm::Snapshot> snaps;
                for (int i = 0; i < 4; ++i) {
                    snaps.push_back(arena->snapshot());
                    write_u64(page, 6 + std::uint64_t(i));
                }
                std::uint64_t seen = 0;
                snaps[1].read(page, &seen, sizeof seen);
                if (seen != 6) std::_Exit(2);
            }
            write_u64(page, 5);

            step("restore");
            usermm::Snapshot snap = arena->snapshot();
            write_u64(page, 9);
            arena->restore(snap);
            if (read_u64(page) != 5) std::_Exit(3);

            step("collect_dirty");
            (void)arena->collect_dirty(p, kSize);
            write_u64(page + 8, 1);
            const usermm::DirtySet dirty = arena->collect_dirty(p, kSize);
            if (dirty.pages.size() != 1 || !dirty.contains(page)) std::_Exit(4);

            step("write_to, full and increment");
            FILE* image = std::tmpfile();
            if (!image) std::_Exit(5);
            snap.write_to(fileno(image));
            const usermm::Snapshot next = arena->snapshot();
            next.write_to(fileno(image), snap);
            std::fclose(image);

            step("fork");
            const pid_t pid = fork();
            if (pid < 0) std::_Exit(6);
            if (pid == 0) _exit(0);
            int status = 0;
            if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) std::_Exit(7);

            step("unmap with a snapshot alive");
            arena->unmap(p, std::size_t(page - p));

            step("destruction with a snapshot alive");
            write_u64(page, 11);
            arena.reset();
            std::uint64_t kept = 0;
            next.read(page, &kept, sizeof kept);
            if (kept != 5) std::_Exit(8);
            next.read(p, &kept, sizeof kept);
            if (kept != 0) std::_Exit(9);
            step("done");
        },
        30);
    INFO(end.err);
    CHECK(end.signal == 0);
    CHECK(end.exit_code == 0);
}

// The untouched parts of the tables stand for zero pages that no snapshot preserved; whatever
// gives such a page write access without a fault (prefault, also after unmap and map again) must
// still give the live snapshots their zeros first.
TEST_CASE("pages of untouched table parts: snapshots keep their zeros when write access comes without a fault") {
    constexpr std::size_t kSize = 1ull << 30;  // a PTE table of 128 pages: pte_spans asks the kernel
    const std::size_t ps = usermm::page_size();
    usermm::Arena arena(kSize);
    char* p = static_cast<char*>(arena.map(kSize, Prot::ReadWrite, {.name = "heap"}));
    char* mid = p + kSize / 2;
    const usermm::Snapshot before = arena.snapshot();
    arena.prefault(p, kSize, Prot::Write);
    write_u64(mid, 7);
    std::uint64_t seen = 1;
    before.read(mid, &seen, sizeof seen);
    CHECK(seen == 0);

    const usermm::Snapshot after = arena.snapshot();  // mid holds 7
    arena.unmap(p, kSize / 4);
    CHECK(arena.map(kSize / 4, Prot::ReadWrite, {.name = "again", .address = p}) == p);
    arena.prefault(p, kSize / 4, Prot::Write);
    write_u64(p + 3 * ps, 9);
    seen = 1;
    after.read(p + 3 * ps, &seen, sizeof seen);
    CHECK(seen == 0);
    after.read(mid, &seen, sizeof seen);
    CHECK(seen == 7);
    std::size_t pages = 0;
    after.for_each_page([&](const void*, std::span<const std::byte>) { ++pages; });
    CHECK(pages == 1);
    arena.restore(after);
    CHECK(read_u64(p + 3 * ps) == 0);
    CHECK(read_u64(mid) == 7);
}
