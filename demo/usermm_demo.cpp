// usermm-demo: what usermm does, shown on a running process.
//   usermm-demo lazy       reserve 1 TiB, touch a sparse pattern, pay only for what was touched
//   usermm-demo snapshot   a key-value table with writer threads, checkpointed every second without fork
//   usermm-demo file       a file larger than the resident budget: random lookups, then a sequential scan
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

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

// A record of the table: the writer bumps the version and rewrites the payload, and the checksum
// ties them together, so a torn or mixed record is visible in a checkpoint.
struct Record {
    std::uint64_t key;
    std::uint64_t version;
    std::uint64_t payload[5];
    std::uint64_t checksum;
};

std::uint64_t record_checksum(const Record& r) {
    std::uint64_t h = r.key * 0x9e3779b97f4a7c15ull ^ r.version;
    for (std::uint64_t w : r.payload) h = (h ^ w) * 0x100000001b3ull;
    return h;
}

double since_ms(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// fork() of the process as it is now, for comparison: the parent's pause until fork returns.
double fork_pause_ms() {
    const auto t0 = std::chrono::steady_clock::now();
    const pid_t pid = fork();
    if (pid == 0) _exit(0);
    const double ms = since_ms(t0);
    waitpid(pid, nullptr, 0);
    return ms;
}

int snapshot_demo() {
    constexpr std::size_t kTable = 256ull << 20;
    constexpr std::size_t kRecords = kTable / sizeof(Record);
    constexpr int kCheckpoints = 4;
    usermm::Arena arena(1ull << 30);
    auto* table = static_cast<Record*>(arena.map(kTable, usermm::Prot::ReadWrite, {.name = "kv", .fault_around_pages = 512}));
    for (std::size_t i = 0; i < kRecords; ++i) {
        table[i] = Record{i, 0, {i, i, i, i, i}, 0};
        table[i].checksum = record_checksum(table[i]);
    }
    fmt::print("a {} MiB key-value table of {} records in an arena; 2 writer threads update random records\n",
               kTable >> 20, kRecords);

    // Writers update a record in place; a per-record spin flag stands in for the database's own
    // record latch, so that only whole updates are ever visible at a checkpoint instant.
    std::vector<std::atomic<bool>> latch(kRecords);
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> updates{0};
    auto writer = [&](unsigned seed) {
        std::mt19937_64 rng(seed);
        while (!stop.load(std::memory_order_relaxed)) {
            const std::size_t i = rng() % (kRecords / 8);  // a hot eighth of the table
            while (latch[i].exchange(true, std::memory_order_acquire)) std::this_thread::yield();
            Record& r = table[i];
            ++r.version;
            for (auto& w : r.payload) w = rng();
            r.checksum = record_checksum(r);
            latch[i].store(false, std::memory_order_release);
            updates.fetch_add(1, std::memory_order_relaxed);
        }
    };
    std::vector<std::thread> writers;
    for (unsigned t = 0; t < 2; ++t) writers.emplace_back(writer, t + 1);

    std::vector<std::string> files;
    std::optional<usermm::Snapshot> previous;
    for (int c = 0; c < kCheckpoints; ++c) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        // The checkpoint instant: no record mid-update (the latches), then the snapshot.
        for (auto& l : latch)
            while (l.exchange(true, std::memory_order_acquire)) {
            }
        const auto t0 = std::chrono::steady_clock::now();
        usermm::Snapshot snap = arena.snapshot(table, kTable);
        const double pause = since_ms(t0);
        for (auto& l : latch) l.store(false, std::memory_order_release);

        // Streamed while the writers go on.
        files.push_back("usermm-demo-checkpoint-" + std::to_string(c) + ".img");
        const int fd = open(files.back().c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
        const auto t1 = std::chrono::steady_clock::now();
        if (previous)
            snap.write_to(fd, *previous);
        else
            snap.write_to(fd);
        const double write_ms = since_ms(t1);
        const off_t bytes = lseek(fd, 0, SEEK_END);
        close(fd);
        const double fork_ms = fork_pause_ms();
        fmt::print("checkpoint {}: pause {:6.2f} ms (fork() of this process: {:6.2f} ms), {:11} image {:7.1f} MiB "
                   "written in {:5.0f} ms while writers ran; previous snapshot copied {} pages\n",
                   c, pause, fork_ms, previous ? "incremental" : "full", double(bytes) / (1 << 20), write_ms,
                   previous ? previous->stats().cow_faults : 0);
        previous.emplace(std::move(snap));
    }
    stop = true;
    for (auto& t : writers) t.join();

    // Rebuild the table from the full image and its increments, as a restart would.
    std::vector<int> fds;
    for (const auto& f : files) fds.push_back(open(f.c_str(), O_RDONLY | O_CLOEXEC));
    usermm::Arena loaded = usermm::Arena::load(fds);
    for (int fd : fds) close(fd);
    const auto* copy = reinterpret_cast<const Record*>(static_cast<char*>(loaded.base()) +
                                                       (reinterpret_cast<char*>(table) - static_cast<char*>(arena.base())));
    std::size_t torn = 0, differ = 0;
    std::vector<Record> at_last(kRecords);
    previous->read(table, at_last.data(), kTable);
    for (std::size_t i = 0; i < kRecords; ++i) {
        torn += copy[i].checksum != record_checksum(copy[i]);
        differ += std::memcmp(&copy[i], &at_last[i], sizeof(Record)) != 0;
    }
    for (const auto& f : files) unlink(f.c_str());
    fmt::print("{} updates in all; the table rebuilt from the full image and {} increments has {} torn records and "
               "differs from the last snapshot in {} records\n",
               updates.load(), files.size() - 1, torn, differ);
    fmt::print("\narena stats:\n{}", arena.stats());
    return torn == 0 && differ == 0 ? 0 : 1;
}

// A file of fixed-size records (key, checksum of the key) twice as large as the resident budget:
// random lookups with Random advice, then a sequential scan that keeps the page cache within the
// budget by dropping what it has read (DontNeed). The kernel's mincore() shows what is resident.
int file_demo() {
    struct FileRecord {
        std::uint64_t key;
        std::uint64_t check;
        char payload[48];
    };
    constexpr std::size_t kFile = 512ull << 20;
    constexpr std::size_t kBudget = 256ull << 20;
    constexpr std::size_t kRecords = kFile / sizeof(FileRecord);
    constexpr std::size_t kLookups = 20000;
    const std::size_t page = usermm::page_size();
    auto check_of = [](std::uint64_t key) { return key * 0x9e3779b97f4a7c15ull ^ (key >> 7); };

    const char* dir = std::getenv("TMPDIR");
    std::string path = std::string(dir && *dir ? dir : "/var/tmp") + "/usermm-demo-file-XXXXXX";
    const int fd = mkstemp(path.data());
    if (fd < 0) return 1;
    {
        std::vector<FileRecord> block((8 << 20) / sizeof(FileRecord));
        for (std::size_t r = 0; r < kRecords; r += block.size()) {
            for (std::size_t i = 0; i < block.size(); ++i) block[i] = {r + i, check_of(r + i), {}};
            if (pwrite(fd, block.data(), block.size() * sizeof(FileRecord), off_t(r * sizeof(FileRecord))) < 0) return 1;
        }
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);  // the kernel's page cache starts cold too
    }
    fmt::print("wrote {} MiB of {}-byte records to {}; resident budget for the mapping: {} MiB\n", kFile >> 20,
               sizeof(FileRecord), path, kBudget >> 20);

    usermm::Arena arena(1ull << 32);
    auto* records = static_cast<const FileRecord*>(
        arena.map_file(fd, 0, kFile, usermm::Prot::Read, usermm::Share::Private, {.name = "records"}));
    close(fd);  // usermm keeps its own descriptor
    unlink(path.c_str());
    std::vector<unsigned char> vec(kFile / page);
    auto resident_mib = [&] {
        mincore(const_cast<FileRecord*>(records), kFile, vec.data());
        std::size_t n = 0;
        for (unsigned char v : vec) n += v & 1;
        return double(n * page) / double(1 << 20);
    };
    auto report = [&](const char* phase, double ms, const usermm::Stats& before) {
        usermm::Stats s = arena.stats();
        fmt::print("{:<18} {:8.1f} ms  major {:6}  minor {:6}  read {:7.1f} MiB  readahead {:6} pages "
                   "({} hits, {} wasted)  resident {:6.1f} MiB\n",
                   phase, ms, s.major_faults - before.major_faults, s.minor_faults - before.minor_faults,
                   double(s.file_bytes_read - before.file_bytes_read) / double(1 << 20),
                   s.readahead_pages - before.readahead_pages, s.readahead_hits - before.readahead_hits,
                   s.readahead_wasted - before.readahead_wasted, resident_mib());
    };

    std::size_t bad = 0;
    usermm::Stats before = arena.stats();
    auto t0 = std::chrono::steady_clock::now();
    arena.advise(const_cast<FileRecord*>(records), kFile, usermm::Advice::Random);
    std::mt19937_64 rng(5);
    for (std::size_t i = 0; i < kLookups; ++i) {
        const std::size_t k = rng() % kRecords;
        bad += records[k].key != k || records[k].check != check_of(k);
    }
    auto ms = [&t0] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); };
    report("random lookups", ms(), before);

    before = arena.stats();
    t0 = std::chrono::steady_clock::now();
    arena.advise(const_cast<FileRecord*>(records), kFile, usermm::Advice::DontNeed);
    arena.advise(const_cast<FileRecord*>(records), kFile, usermm::Advice::Sequential);
    double peak = 0;
    constexpr std::size_t kStep = kBudget / 4;
    for (std::size_t off = 0; off < kFile; off += kStep) {
        const auto* part = reinterpret_cast<const FileRecord*>(reinterpret_cast<const char*>(records) + off);
        for (std::size_t i = 0; i < kStep / sizeof(FileRecord); ++i) {
            const std::uint64_t k = off / sizeof(FileRecord) + i;
            bad += part[i].key != k || part[i].check != check_of(k);
        }
        peak = std::max(peak, resident_mib());
        if (off >= kBudget / 2)  // keep the last half-budget resident, drop what is older
            arena.advise(const_cast<char*>(reinterpret_cast<const char*>(records)) + off - kBudget / 2, kStep,
                         usermm::Advice::DontNeed);
    }
    report("sequential scan", ms(), before);
    fmt::print("peak resident during the scan: {:.1f} MiB (budget {} MiB); records that did not match: {}\n", peak,
               kBudget >> 20, bad);
    fmt::print("\nVMA stats:\n{}", arena.vmas()[0].stats);
    return bad == 0 && peak <= double(kBudget >> 20) ? 0 : 1;
}

void usage() { std::fprintf(stderr, "usage: usermm-demo lazy|snapshot|file\n"); }

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        usage();
        return 2;
    }
    const std::string_view what = argv[1];
    if (what == "lazy") return lazy();
    if (what == "snapshot") return snapshot_demo();
    if (what == "file") return file_demo();
    usage();
    return 2;
}
