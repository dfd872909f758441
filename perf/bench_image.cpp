// The image benchmark: what Arena::load costs against the cheapest way to the same result, for a
// dense image (pread of the same bytes into fresh anonymous memory) and for a one-page image of
// ever larger arenas (creating and destroying an empty arena of that size): load must cost what
// the image holds, not what the arena reserves.
//
// Every variant runs once per round, interleaved with the others, and the median of the rounds is
// reported; the figures that matter are the ratios. USERMM_BENCH_IMAGE_MIB sets the dense image's
// size (default 128), USERMM_BENCH_ROUNDS the rounds (default 7); USERMM_BENCH_IMAGE_MIB=4
// USERMM_BENCH_ROUNDS=1 is a smoke run.
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

using usermm::Prot;
using usermm_bench::env_or;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

std::size_t g_rounds = 7;  // set by main

int image_fd() {
    const int fd = memfd_create("bench-image", MFD_CLOEXEC);
    if (fd < 0) std::abort();
    return fd;
}

void dense(std::size_t pages) {
    const std::size_t ps = usermm::page_size();
    const int fd = image_fd();
    {
        usermm::Arena arena(pages * ps);
        char* base = static_cast<char*>(arena.map(pages * ps, Prot::ReadWrite, {.name = "dense"}));
        for (std::size_t i = 0; i < pages; ++i) std::memset(base + i * ps, int(i % 251) + 1, ps);
        arena.snapshot().write_to(fd);
    }
    const std::size_t bytes = std::size_t(lseek(fd, 0, SEEK_END));
    std::vector<double> load_ns, floor_ns;
    for (std::size_t r = 0; r < g_rounds; ++r) {
        std::uint64_t t0 = now_ns();
        {
            const usermm::Arena loaded = usermm::Arena::load(std::array{fd});
            load_ns.push_back(double(now_ns() - t0));
        }
        // The floor: the image's bytes read into fresh anonymous memory, which the kernel commits
        // page by page as load must.
        t0 = now_ns();
        void* fresh = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (fresh == MAP_FAILED) std::abort();
        for (std::size_t done = 0; done < bytes;) {
            const ssize_t n = pread(fd, static_cast<char*>(fresh) + done, bytes - done, off_t(done));
            if (n <= 0) std::abort();
            done += std::size_t(n);
        }
        floor_ns.push_back(double(now_ns() - t0));
        munmap(fresh, bytes);
    }
    const double l = median(load_ns), f = median(floor_ns);
    fmt::print("dense image, {} MiB: load {:.1f} ms ({:.0f} ns/page), pread into fresh memory {:.1f} ms: {:.2f}x\n",
               pages * ps >> 20, l / 1e6, l / double(pages), f / 1e6, l / f);
    close(fd);
}

// A one-page image of an arena of `size` bytes: a snapshot of its last page, the only one written.
void sparse(std::size_t size) {
    const std::size_t ps = usermm::page_size();
    const int fd = image_fd();
    {
        usermm::Arena arena(size);
        char* base = static_cast<char*>(arena.map(size, Prot::ReadWrite, {.name = "sparse"}));
        base[size - ps] = 7;
        arena.snapshot(base + size - ps, ps).write_to(fd);
    }
    std::vector<double> load_ns, floor_ns;
    for (std::size_t r = 0; r < g_rounds; ++r) {
        std::uint64_t t0 = now_ns();
        { const usermm::Arena loaded = usermm::Arena::load(std::array{fd}); }
        load_ns.push_back(double(now_ns() - t0));
        t0 = now_ns();
        { const usermm::Arena empty(size); }
        floor_ns.push_back(double(now_ns() - t0));
    }
    const double l = median(load_ns), f = median(floor_ns);
    fmt::print("one-page image of a {:>6} GiB arena: load and destroy {:7.1f} us, create and destroy an empty "
               "arena {:7.1f} us: {:.2f}x\n",
               size >> 30, l / 1e3, f / 1e3, l / f);
    close(fd);
}

}  // namespace

int main() {
    const std::size_t dense_mib = std::max<std::size_t>(1, env_or("USERMM_BENCH_IMAGE_MIB", 128));
    g_rounds = std::max<std::size_t>(1, env_or("USERMM_BENCH_ROUNDS", g_rounds));
    fmt::print("usermm image benchmark (median of {} rounds)\n", g_rounds);
    dense((dense_mib << 20) / usermm::page_size());
    for (std::size_t size : {std::size_t(1) << 30, std::size_t(1) << 40, std::size_t(64) << 40}) sparse(size);
}
