// usermm-demo: what usermm does, shown on a running process.
//   usermm-demo lazy   reserve 1 TiB, touch a sparse pattern, pay only for what was touched
#include <sys/resource.h>

#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <string_view>

#include <usermm/fmt.hpp>
#include <usermm/usermm.hpp>

namespace {

long resident_kib() {
    FILE* f = std::fopen("/proc/self/status", "r");
    long kib = -1;
    char line[256];
    while (f && std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "VmRSS: %ld kB", &kib) == 1) break;
    if (f) std::fclose(f);
    return kib;
}

long kernel_minor_faults() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

int lazy() {
    constexpr std::size_t kReserve = 1ull << 40;
    constexpr std::size_t kStride = 256ull << 20;  // one touched spot every 256 MiB
    const std::size_t page = usermm::page_size();

    usermm::Arena arena(kReserve);
    auto* heap = static_cast<char*>(arena.map(kReserve, usermm::Prot::ReadWrite, {.name = "sparse"}));
    fmt::print("reserved {} GiB of address space in one arena; one demand-zero VMA \"sparse\" spans all of it\n",
               kReserve >> 30);

    const long rss_before = resident_kib();
    const long kernel_before = kernel_minor_faults();
    std::size_t spots = 0;
    std::uint64_t sum = 0;
    for (std::size_t off = 0; off < kReserve; off += kStride, ++spots) {
        // At each spot: write two pages; 1 MiB further, read two untouched pages, which the kernel
        // backs with its shared zero page, committing nothing.
        for (std::size_t i = 0; i < 2; ++i) heap[off + i * page] = char(spots);
        for (std::size_t i = 0; i < 2; ++i)
            sum += std::uint64_t(static_cast<volatile char*>(heap)[off + (1 << 20) + i * page]);
    }
    const long rss_after = resident_kib();
    const long kernel_faults = kernel_minor_faults() - kernel_before;

    bool ok = sum == 0;
    for (std::size_t off = 0, n = 0; off < kReserve; off += kStride, ++n) ok &= heap[off + page] == char(n);

    const usermm::Stats s = arena.stats();
    // usermm's page-state table holds one byte per page and is itself paged in on demand: one page of
    // it per spot here, since the spots are further apart than a table page describes.
    const double table_mib = double(spots * page) / (1 << 20);
    fmt::print("touched {} spots, 256 MiB apart: wrote 2 pages and read 2 untouched pages at each\n", spots);
    fmt::print("resident memory grew by {:.1f} MiB: {:.1f} MiB of written pages, up to {:.1f} MiB of usermm's page-state\n"
               "table, and the kernel's page tables; reserved: {} GiB\n",
               double(rss_after - rss_before) / 1024.0, double(2 * spots * page) / (1 << 20), table_mib,
               kReserve >> 30);
    fmt::print("usermm resolved {} faults ({} writes, {} zero-page reads) and mapped {} more pages by fault-around\n",
               s.minor_faults, s.write_faults, s.zero_page_reads, s.fault_around_pages);
    fmt::print("the kernel counted {} minor faults meanwhile: one per page touched ({}), after usermm granted it,\n"
               "plus those of usermm's own page-state table\n",
               kernel_faults, 4 * spots);
    fmt::print("content check: {}\n\narena stats:\n{}", ok ? "all written bytes read back, all unwritten read zero"
                                                           : "MISMATCH",
               s);
    arena.verify();
    return ok ? 0 : 1;
}

void usage() { std::fprintf(stderr, "usage: usermm-demo lazy\n"); }

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        usage();
        return 2;
    }
    const std::string_view what = argv[1];
    if (what == "lazy") return lazy();
    usage();
    return 2;
}
