// A known mix of faults, for the tests that watch usermm from outside the process (test_probes:
// perf's counts of the USDT probes; test_trace: a trace). Runs every kind of fault the probes
// name that a program can cause on purpose, then writes usermm's own counters, one "name value"
// a line, to the file argv[1] (with "snapshots N" and "collects N" for the API probes).
// Usage: usermm-fault-mix OUT_FILE SCRATCH_DIR
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <usermm/store.hpp>
#include <usermm/usermm.hpp>

namespace {

volatile char g_sink;

void touch_read(const char* p, std::size_t bytes, std::size_t step) {
    for (std::size_t i = 0; i < bytes; i += step) g_sink = p[i];
}

void touch_write(char* p, std::size_t bytes, std::size_t step) {
    for (std::size_t i = 0; i < bytes; i += step) p[i] = char(i / step + 1);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s OUT_FILE SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    const std::size_t page = usermm::page_size();
    const std::string dir = argv[2];
    constexpr std::size_t kPages = 64;
    unsigned snapshots = 0, collects = 0;
    {
        usermm::Arena arena(64 << 20);
        usermm::MapOptions one{.name = "mix", .fault_around_pages = 1};
        // Zero-page reads, then their upgrades; first writes of untouched pages.
        auto* a = static_cast<char*>(arena.map(kPages * page, usermm::Prot::ReadWrite, one));
        touch_read(a, kPages * page, page);
        touch_write(a, kPages * page, page);
        auto* b = static_cast<char*>(arena.map(kPages * page, usermm::Prot::ReadWrite, one));
        touch_write(b, kPages * page, page);
        // Copy-on-write into a snapshot, then writes seen by collect_dirty's tracking.
        {
            usermm::Snapshot s = arena.snapshot(b, kPages * page);
            ++snapshots;
            touch_write(b, kPages / 2 * page, page);
        }
        (void)arena.collect_dirty(b, kPages * page);
        ++collects;
        touch_write(b, kPages / 4 * page, page);
        // A file read twice: from the disk after the page cache dropped it, then from the cache.
        const std::string path = dir + "/fault-mix.data";
        {
            const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
            std::vector<char> bytes(kPages * page, 'f');
            if (fd < 0 || ::write(fd, bytes.data(), bytes.size()) != ssize_t(bytes.size()) || fdatasync(fd) != 0 ||
                posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) {
                std::perror(path.c_str());
                return 1;
            }
            ::close(fd);
        }
        usermm::MapOptions file{.name = "mix-file", .fault_around_pages = 1, .readahead_pages = 1};
        for (int round = 0; round < 2; ++round) {
            auto* f = static_cast<char*>(
                arena.map_file(path, 0, kPages * page, usermm::Prot::Read, usermm::Share::Private, file));
            touch_read(f, kPages * page, page);
            arena.unmap(f, kPages * page);
        }
        // A stack that grows.
        usermm::Stack stack = arena.map_stack(1 << 20);
        // Downwards, as a stack grows: each fault is within reach of the committed part.
        auto* top = static_cast<char*>(stack.top());
        for (std::size_t off = page; off <= (256 << 10); off += page) top[-std::ptrdiff_t(off)] = 1;
    }
    {
        // Swap: twice the resident limit written, then read back.
        usermm::SwapFile store(dir + "/fault-mix.swap", 64 << 20);
        usermm::Arena arena(64 << 20, {.resident_limit = 128 * page, .store = &store});
        auto* s = static_cast<char*>(arena.map(512 * page, usermm::Prot::ReadWrite, {.name = "mix-swap"}));
        touch_write(s, 512 * page, page);
        touch_read(s, 512 * page, page);
    }
    const usermm::Stats st = usermm::process_stats();
    std::FILE* out = std::fopen(argv[1], "w");
    if (!out) {
        std::perror(argv[1]);
        return 1;
    }
#define USERMM_PRINT_FIELD(name, doc) std::fprintf(out, "%s %llu\n", #name, static_cast<unsigned long long>(st.name));
    USERMM_STATS_FIELDS(USERMM_PRINT_FIELD)
#undef USERMM_PRINT_FIELD
    std::fprintf(out, "snapshots %u\ncollects %u\n", snapshots, collects);
    return std::fclose(out) == 0 ? 0 : 1;
}
