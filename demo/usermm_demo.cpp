// usermm-demo: what usermm does, shown on a running process.
//   usermm-demo lazy       reserve 1 TiB, touch a sparse pattern, pay only for what was touched
//   usermm-demo snapshot   a key-value table with writer threads, checkpointed every second without fork
//   usermm-demo file       a file on the kernel's page cache: random lookups, a sequential scan, memory beside mmap
//   usermm-demo checkpoint [KEYS]
//                          an 8 GiB key-value table: checkpoints under writers, a roll-back, a restart
//                          in a new process (which runs `usermm-demo checkpoint-restart ...`)
//   usermm-demo swap [TABLE_MIB LIMIT_MIB SECONDS]
//                          a 4 GiB table under a 512 MiB resident limit on a SwapFile: Zipf lookups and
//                          updates from 4 threads for 30 s, major faults next to exact LRU and OPT
//                          (`64 8 2`: a smoke run)
//   usermm-demo far [TABLE_MIB LIMIT_MIB TIER_MIB]
//                          a 2 GiB table under a 256 MiB resident limit, its evicted pages in a 128 MiB
//                          compressed tier in front of 3 memcached servers started on loopback (each
//                          page on two); one server is killed halfway and every record still checks
//   usermm-demo fibers [COUNT]
//                          1,000,000 Boost.Context fibers on usermm stacks that grow by faults, each
//                          recursing to a random depth and yielding; then one recurses without end and
//                          its overflow is caught (COUNT lowers the number of fibers)
// Any of them with --trace[=FILE] records every fault into FILE (default usermm-demo-WHAT.trace),
// which `usermm-trace FILE` summarises and `usermm-trace plot FILE` draws.
#include <fcntl.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/context/fiber.hpp>
#include <boost/context/preallocated.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <usermm/fmt.hpp>
#include <usermm/store.hpp>
#include <usermm/trace.hpp>
#include <usermm/usermm.hpp>

#include "far_demo.hpp"
#include "offline_policies.hpp"
#include "refstring.hpp"

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

// Memory figures of the system (/proc/meminfo) and of this process (/proc/self/status), in KiB.
struct MemoryFigures {
    long cached = 0, shmem = 0, available = 0, rss_file = 0, rss_shmem = 0;
};

long field_kib(const char* path, const char* name) {
    std::FILE* f = std::fopen(path, "r");
    if (!f) return -1;
    char line[256];
    long value = -1;
    const std::size_t n = std::strlen(name);
    while (std::fgets(line, sizeof line, f))
        if (std::strncmp(line, name, n) == 0 && line[n] == ':') value = std::strtol(line + n + 1, nullptr, 10);
    std::fclose(f);
    return value;
}

MemoryFigures memory_now() {
    return {field_kib("/proc/meminfo", "Cached"), field_kib("/proc/meminfo", "Shmem"),
            field_kib("/proc/meminfo", "MemAvailable"), field_kib("/proc/self/status", "RssFile"),
            field_kib("/proc/self/status", "RssShmem")};
}

// A file of fixed-size records (key, checksum of the key): random lookups with Random advice, then
// a sequential scan, through a usermm file VMA and, side by side, through the kernel's own mmap.
// The VMA's kernel mapping is the file: the kernel's page cache holds one copy of each page, the
// process's resident memory is file pages (no shared memory), and clean pages stay reclaimable, so
// the system's available memory does not fall, as with mmap: a file larger than memory scans too.
int file_demo() {
    struct FileRecord {
        std::uint64_t key;
        std::uint64_t check;
        char payload[48];
    };
    constexpr std::size_t kFile = 512ull << 20;
    constexpr std::size_t kRecords = kFile / sizeof(FileRecord);
    constexpr std::size_t kLookups = 20000;
    auto check_of = [](std::uint64_t key) { return key * 0x9e3779b97f4a7c15ull ^ (key >> 7); };

    const char* dir = std::getenv("TMPDIR");
    std::string path = std::string(dir && *dir ? dir : "/var/tmp") + "/usermm-demo-file-XXXXXX";
    const int fd = mkstemp(path.data());
    if (fd < 0) return 1;
    auto drop_cache = [fd] {  // both passes start cold
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    };
    {
        std::vector<FileRecord> block((8 << 20) / sizeof(FileRecord));
        for (std::size_t r = 0; r < kRecords; r += block.size()) {
            for (std::size_t i = 0; i < block.size(); ++i) block[i] = {r + i, check_of(r + i), {}};
            if (pwrite(fd, block.data(), block.size() * sizeof(FileRecord), off_t(r * sizeof(FileRecord))) < 0) return 1;
        }
    }
    unlink(path.c_str());
    fmt::print("wrote {} MiB of {}-byte records to {} (unlinked; the descriptor keeps it)\n", kFile >> 20,
               sizeof(FileRecord), path);

    std::size_t bad = 0;
    auto lookups = [&](const FileRecord* records) {
        std::mt19937_64 rng(5);
        for (std::size_t i = 0; i < kLookups; ++i) {
            const std::size_t k = rng() % kRecords;
            bad += records[k].key != k || records[k].check != check_of(k);
        }
    };
    auto scan = [&](const FileRecord* records) {
        for (std::size_t k = 0; k < kRecords; ++k) bad += records[k].key != k || records[k].check != check_of(k);
    };
    auto since = [](std::chrono::steady_clock::time_point t0) {
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    auto mib = [](long kib) { return double(kib) / 1024.0; };
    auto memory_line = [&](const char* who, const MemoryFigures& before, const MemoryFigures& after) {
        fmt::print("  {:<7} page cache {:+7.1f} MiB  system shmem {:+6.1f} MiB  available {:+7.1f} MiB  "
                   "process: file pages {:6.1f} MiB, shared memory {:5.1f} MiB\n",
                   who, mib(after.cached - before.cached), mib(after.shmem - before.shmem),
                   mib(after.available - before.available), mib(after.rss_file), mib(after.rss_shmem));
    };

    // usermm.
    drop_cache();
    usermm::Arena arena(1ull << 32);
    auto* records = static_cast<const FileRecord*>(
        arena.map_file(fd, 0, kFile, usermm::Prot::Read, usermm::Share::Private, {.name = "records"}));
    auto report = [&](const char* phase, double ms, const usermm::Stats& before) {
        const usermm::Stats s = arena.stats();
        fmt::print("{:<16} {:8.1f} ms  major {:6}  minor {:6}  read {:7.1f} MiB  readahead {:6} pages ({} hits)\n",
                   phase, ms, s.major_faults - before.major_faults, s.minor_faults - before.minor_faults,
                   double(s.file_bytes_read - before.file_bytes_read) / double(1 << 20),
                   s.readahead_pages - before.readahead_pages, s.readahead_hits - before.readahead_hits);
    };
    const MemoryFigures m0 = memory_now();
    usermm::Stats before = arena.stats();
    auto t0 = std::chrono::steady_clock::now();
    arena.advise(const_cast<FileRecord*>(records), kFile, usermm::Advice::Random);
    lookups(records);
    report("random lookups", since(t0), before);
    before = arena.stats();
    t0 = std::chrono::steady_clock::now();
    arena.advise(const_cast<FileRecord*>(records), kFile, usermm::Advice::Sequential);
    scan(records);
    const double usermm_ms = since(t0);
    report("sequential scan", usermm_ms, before);
    const MemoryFigures m1 = memory_now();
    fmt::print("\nVMA stats:\n{}", arena.vmas()[0].stats);
    arena.unmap(const_cast<FileRecord*>(records), kFile);

    // The kernel's mmap, the same two passes.
    drop_cache();
    const MemoryFigures k0 = memory_now();
    t0 = std::chrono::steady_clock::now();
    void* m = mmap(nullptr, kFile, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) return 1;
    madvise(m, kFile, MADV_RANDOM);
    lookups(static_cast<const FileRecord*>(m));
    madvise(m, kFile, MADV_SEQUENTIAL);
    const auto t1 = std::chrono::steady_clock::now();
    scan(static_cast<const FileRecord*>(m));
    const double mmap_ms = since(t1);
    const MemoryFigures k1 = memory_now();
    fmt::print("\nmemory after the scan, from before the lookups:\n");
    memory_line("usermm", m0, m1);
    memory_line("mmap", k0, k1);
    fmt::print("sequential scan: usermm {:.1f} ms, mmap {:.1f} ms ({:.2f}x)\n", usermm_ms, mmap_ms, usermm_ms / mmap_ms);
    munmap(m, kFile);
    close(fd);
    fmt::print("records that did not match: {}\n", bad);
    // One copy: no shared memory besides the page cache, in the process or the system.
    const bool one_copy = m1.rss_shmem < 16 * 1024 && m1.shmem - m0.shmem < 64 * 1024;
    return bad == 0 && one_copy ? 0 : 1;
}

// The key-value store of issue 8, end to end: an 8 GiB demand-zero table of 64-byte records, two
// writer threads, a checkpoint every second (a snapshot, streamed as a full image and then as
// increments while the writers go on), a roll-back with restore(), and a restart in a new process
// from the image files. Each record holds its own key, a version (how many updates it has had)
// and a checksum; the writers count their updates, and each checkpoint takes the sum of those
// counts in the same instant as its snapshot, so that a consistent checkpoint is one whose records
// all check and whose versions add up to that sum. A digest of every record ties each later view
// (the table after restore, an arena loaded in another process) to the checkpoint exactly.
namespace checkpoint {

struct Record {
    std::uint64_t key;
    std::uint64_t version;
    std::uint64_t stamp;  // which writer wrote it last, and its update count then
    std::uint64_t payload[4];
    std::uint64_t checksum;
};
static_assert(sizeof(Record) == 64);

constexpr std::size_t kTable = 8ull << 30;
constexpr std::size_t kSlots = kTable / sizeof(Record);  // a power of two
// 16,384 keys by default (a 64 MiB full image); `usermm-demo checkpoint KEYS` for another count.
constexpr std::uint64_t kDefaultKeys = 1 << 14;
constexpr int kWriters = 2;
constexpr int kCheckpoints = 4;
constexpr int kRollbackTo = 1;
constexpr std::size_t kBurst = 256;  // updates per burst, under the writer's latch
constexpr auto kBurstEvery = std::chrono::microseconds(51200);  // 5,000 updates a second each

// Keys are scattered over the whole table (an odd multiplier is a bijection modulo 2^n), as a
// hash table would place them: the table is sparse, about one record per page used.
constexpr std::uint64_t kSpread = 0x9e3779b97f4a7c15ull;
constexpr std::uint64_t inverse_of(std::uint64_t odd) {
    std::uint64_t x = odd;  // Newton's iteration doubles the correct low bits each step
    for (int i = 0; i < 5; ++i) x *= 2 - odd * x;
    return x;
}
std::size_t slot_of(std::uint64_t key) { return std::size_t(key * kSpread) & (kSlots - 1); }
std::uint64_t key_of(std::size_t slot) { return std::uint64_t(slot) * inverse_of(kSpread) & (kSlots - 1); }

std::uint64_t checksum_of(const Record& r) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (std::uint64_t w : {r.key, r.version, r.stamp, r.payload[0], r.payload[1], r.payload[2], r.payload[3]})
        h = (h ^ w) * 0x100000001b3ull;
    return h;
}

// What a checkpoint must be: every record whole and its own, versions adding up to the updates
// counted at the instant, and (for views of it) the same digest, a sum so that records may be
// checked in any order.
struct Check {
    std::uint64_t version_sum = 0;
    std::uint64_t digest = 0;
    std::uint64_t checked = 0;
    std::uint64_t bad = 0;  // records torn, missing or not at their key's slot

    void add(std::uint64_t key, const Record& r) {
        bad += r.key != key || r.checksum != checksum_of(r);
        version_sum += r.version;
        digest += (r.checksum ^ key) * 0x100000001b3ull;
        ++checked;
    }
    Check& finish(std::uint64_t keys) {
        bad += keys - checked;
        return *this;
    }
};

template <typename ReadRecord>
Check check_records(std::uint64_t keys, ReadRecord read) {
    Check c;
    for (std::uint64_t k = 0; k < keys; ++k) c.add(k, read(k));
    return c.finish(keys);
}

// A snapshot's records, read in one pass over the pages it holds (a read per record costs tens of
// microseconds, for_each_page a fraction of that per page).
Check check_snapshot(std::uint64_t keys, const usermm::Snapshot& snap, const Record* table) {
    Check c;
    snap.for_each_page([&](const void* addr, std::span<const std::byte> page) {
        const std::size_t first = std::size_t(static_cast<const Record*>(addr) - table);
        for (std::size_t i = 0; i < page.size() / sizeof(Record); ++i) {
            const std::uint64_t key = key_of(first + i);
            if (key >= keys) continue;
            Record r;
            std::memcpy(&r, page.data() + i * sizeof(Record), sizeof r);
            c.add(key, r);
        }
    });
    return c.finish(keys);
}

struct Writer {
    std::mutex latch;           // held for a burst; the checkpoint instant takes both
    std::uint64_t updates = 0;  // under latch
    std::thread thread;
};

int run(const char* self, std::uint64_t keys) {
    usermm::Arena arena(2 * kTable);
    const std::span<Record> table = arena.map_span<Record>(kSlots, usermm::Prot::ReadWrite, {.name = "kv-table"});
    for (std::uint64_t k = 0; k < keys; ++k) {
        Record& r = table[slot_of(k)];
        r = Record{k, 0, 0, {k, k, k, k}, 0};
        r.checksum = checksum_of(r);
    }
    fmt::print("an {} GiB demand-zero table of {}-byte records (\"kv-table\"), {} keys scattered over it; "
               "write tracking: {}\n",
               kTable >> 30, sizeof(Record), keys,
               usermm::engine() == usermm::Engine::Uffd ? "userfaultfd" : "mprotect");
    fmt::print("{} writers update random records of their own keys, {} updates a second each; "
               "a checkpoint every second\n",
               kWriters, std::size_t(kBurst * std::chrono::seconds(1) / kBurstEvery));

    std::array<Writer, kWriters> writers;
    std::atomic<bool> stop{false};
    for (int w = 0; w < kWriters; ++w)
        writers[w].thread = std::thread([&, w] {
            Writer& me = writers[w];
            std::mt19937_64 rng(std::uint64_t(w) + 1);
            auto next = std::chrono::steady_clock::now();
            while (!stop.load(std::memory_order_relaxed)) {
                {
                    std::lock_guard lock(me.latch);
                    for (std::size_t i = 0; i < kBurst; ++i) {
                        const std::uint64_t k = rng() % (keys / kWriters) * kWriters + std::uint64_t(w);
                        Record& r = table[slot_of(k)];
                        ++r.version;
                        r.stamp = std::uint64_t(w) << 56 | ++me.updates;
                        for (auto& p : r.payload) p = rng();
                        r.checksum = checksum_of(r);
                    }
                }
                next += kBurstEvery;
                std::this_thread::sleep_until(next);
            }
        });

    struct Checkpoint {
        std::string file;
        std::uint64_t updates = 0;  // counted at the snapshot's instant
        Check check;
    };
    std::vector<Checkpoint> done(kCheckpoints);
    // Live: the latest snapshot (the next increment's base) and the roll-back target.
    std::vector<std::optional<usermm::Snapshot>> snaps(kCheckpoints);
    bool ok = true;
    const char* dir = std::getenv("TMPDIR");
    const std::string prefix = std::string(dir && *dir ? dir : "/var/tmp") + "/usermm-demo-checkpoint-" +
                               std::to_string(getpid()) + "-";
    auto remove_files = [&done] {
        for (const Checkpoint& cp : done)
            if (!cp.file.empty()) unlink(cp.file.c_str());
    };
    const auto started = std::chrono::steady_clock::now();
    for (int c = 0; c < kCheckpoints; ++c) {
        std::this_thread::sleep_until(started + std::chrono::seconds(c + 1));
        Checkpoint& cp = done[std::size_t(c)];
        std::optional<usermm::Snapshot>& snap = snaps[std::size_t(c)];
        // The instant: no burst in flight, the update counts read, the snapshot taken.
        const auto t0 = std::chrono::steady_clock::now();
        double pause = 0;
        {
            std::scoped_lock instant(writers[0].latch, writers[1].latch);
            for (const Writer& w : writers) cp.updates += w.updates;
            const auto t1 = std::chrono::steady_clock::now();
            snap.emplace(arena.snapshot(table.data(), table.size_bytes()));
            pause = since_ms(t1);
        }
        const double held = since_ms(t0);

        cp.file = prefix + std::to_string(c) + ".img";
        const int fd = open(cp.file.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0) {
            std::perror(cp.file.c_str());
            stop = true;
            for (Writer& w : writers) w.thread.join();
            remove_files();
            return 1;
        }
        const auto t2 = std::chrono::steady_clock::now();
        if (c == 0)
            snap->write_to(fd);
        else
            snap->write_to(fd, *snaps[std::size_t(c - 1)]);
        const double write_ms = since_ms(t2);
        const off_t bytes = lseek(fd, 0, SEEK_END);
        close(fd);

        // The checkpoint as the snapshot holds it, read while the writers go on.
        cp.check = check_snapshot(keys, *snap, table.data());
        const bool consistent = cp.check.bad == 0 && cp.check.version_sum == cp.updates;
        ok &= consistent;
        const std::uint64_t copied = c == 0 ? 0 : snaps[std::size_t(c - 1)]->stats().cow_faults;
        fmt::print("checkpoint {}: writers held {:6.2f} ms, snapshot() {:6.2f} ms; {:11} image {:6.1f} MiB written in "
                   "{:4.0f} ms; versions sum to the {} updates counted: {}; the previous snapshot took {} pages "
                   "before writes changed them\n",
                   c, held, pause, c == 0 ? "full" : "incremental", double(bytes) / (1 << 20), write_ms, cp.updates,
                   consistent ? "yes" : "NO", copied);
        if (c > 0 && c - 1 != kRollbackTo) snaps[std::size_t(c - 1)].reset();
    }
    stop = true;
    for (Writer& w : writers) w.thread.join();

    // Roll-back: the table as it is now, then as restore() makes it.
    auto live = [&table](std::uint64_t k) { return table[slot_of(k)]; };
    const Checkpoint& target = done[kRollbackTo];
    const Check now = check_records(keys, live);
    const auto t3 = std::chrono::steady_clock::now();
    arena.restore(*snaps[kRollbackTo]);
    const double restore_ms = since_ms(t3);
    const Check back = check_records(keys, live);
    const bool rolled_back = back.bad == 0 && back.digest == target.check.digest && back.version_sum == target.updates;
    ok &= rolled_back && now.bad == 0;
    fmt::print("roll-back: the table had {} updates; restore() to checkpoint {} took {:.1f} ms and wrote back {} "
               "pages; the table now equals checkpoint {} ({} updates): {}\n",
               now.version_sum, kRollbackTo, restore_ms, snaps[kRollbackTo]->stats().pages_restored, kRollbackTo,
               back.version_sum, rolled_back ? "yes" : "NO");

    // Restart: a new process (no arena, nothing inherited but the file names) loads a prefix of
    // the chain and must find exactly the checkpoint that prefix ends at.
    for (int last : {kRollbackTo, kCheckpoints - 1}) {
        const Checkpoint& cp = done[std::size_t(last)];
        std::vector<std::string> args{self, "checkpoint-restart", std::to_string(keys), std::to_string(last),
                                      std::to_string(cp.updates), std::to_string(cp.check.digest)};
        for (int i = 0; i <= last; ++i) args.push_back(done[std::size_t(i)].file);
        std::vector<char*> argv;
        for (std::string& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        std::fflush(stdout);
        const pid_t pid = fork();
        if (pid == 0) {
            execv("/proc/self/exe", argv.data());
            std::perror("usermm-demo: execv /proc/self/exe");
            _exit(127);
        }
        int status = 0;
        while (pid > 0 && waitpid(pid, &status, 0) < 0) {
        }
        ok &= pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    remove_files();

    const usermm::VmaInfo v = *arena.find_vma("kv-table");
    fmt::print("\nkv-table: {} GiB reserved, {:.1f} MiB committed (granted write access: fault-around grants {} "
               "pages at a first write), {:.1f} MiB resident\narena stats:\n{}",
               v.length >> 30, double(v.committed) / (1 << 20), v.fault_around_pages, double(v.resident) / (1 << 20),
               arena.stats());
    return ok ? 0 : 1;
}

// The new process of the restart: argv = checkpoint-restart <keys> <checkpoint> <updates> <digest> <image>...
int restart(int argc, char** argv) {
    if (argc < 7) return 2;
    const std::uint64_t keys = std::strtoull(argv[2], nullptr, 10);
    const std::uint64_t updates = std::strtoull(argv[4], nullptr, 10);
    const std::uint64_t digest = std::strtoull(argv[5], nullptr, 10);
    std::vector<int> fds;
    for (int i = 6; i < argc; ++i) {
        const int fd = open(argv[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            std::perror(argv[i]);
            return 1;
        }
        lseek(fd, 0, SEEK_SET);
        fds.push_back(fd);
    }
    const auto t0 = std::chrono::steady_clock::now();
    usermm::Arena loaded = usermm::Arena::load(fds);
    const double load_ms = since_ms(t0);
    for (int fd : fds) close(fd);
    const std::optional<usermm::VmaInfo> v = loaded.find_vma("kv-table");
    if (!v) {
        fmt::print("restart: the loaded arena has no VMA \"kv-table\"\n");
        return 1;
    }
    const auto* table = static_cast<const Record*>(v->start);
    const Check c = check_records(keys, [table](std::uint64_t k) { return table[slot_of(k)]; });
    const bool ok = c.bad == 0 && c.version_sum == updates && c.digest == digest;
    fmt::print("restart in a new process (pid {}): Arena::load of the full image and {} increment(s) took {:.0f} ms; "
               "{} records whole, versions sum to {}: equal to checkpoint {}: {}\n",
               getpid(), fds.size() - 1, load_ms, keys - c.bad, c.version_sum, argv[3], ok ? "yes" : "NO");
    return ok ? 0 : 1;
}

}  // namespace checkpoint
// Reclaim and swap (issue 11): a table larger than the arena may hold in memory, on a SwapFile.
// Threads look records up and update them, picking pages by Zipf 0.99 (the hot pages scattered
// over the table) and a record of the page uniformly; a monitor prints every second what the
// arena holds against its limit and what moves to and from the store. Each thread takes a number
// from one shared counter just before each access and writes the page there, so that the
// recorded reference string is the order in which the accesses began (two accesses of the same
// instant may have reached the arena in the other order); exact LRU, FIFO and Belady's OPT run
// on that string afterwards with as many frames as the limit has pages, next to the major faults
// the arena took. The measured phase starts with the whole table paged out, as the simulations
// start with empty frames. Every record holds its key, a version (its updates) and a checksum:
// lookups check the record they read, and at the end every record is checked and the versions
// must add up to the updates made.
namespace swapdemo {

struct Record {
    std::uint64_t key;
    std::uint64_t version;
    std::uint64_t payload[5];
    std::uint64_t checksum;
};
static_assert(sizeof(Record) == 64);

std::uint64_t checksum_of(const Record& r) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (std::uint64_t w : {r.key, r.version, r.payload[0], r.payload[1], r.payload[2], r.payload[3], r.payload[4]})
        h = (h ^ w) * 0x100000001b3ull;
    return h;
}

constexpr std::size_t kDefaultTableMib = 4096;
constexpr std::size_t kDefaultLimitMib = 512;
// Long enough for replacement to matter: starting paged out, 4 threads fill the 512 MiB in about 13 s
// here (swap-ins of scattered pages at about 40 MB/s), and only then does the arena have to choose.
constexpr int kDefaultSeconds = 30;
constexpr unsigned kThreads = 4;
constexpr double kUpdates = 0.2;                // of the accesses
constexpr std::size_t kMaxRefs = 64ull << 20;   // recorded references at most (256 MiB)
constexpr std::size_t kStripes = 4096;          // record locks

int run(std::size_t table_mib, std::size_t limit_mib, int seconds) {
    const std::size_t page = usermm::page_size();
    const std::size_t table_bytes = table_mib << 20, limit = limit_mib << 20;
    const std::size_t records = table_bytes / sizeof(Record), per_page = page / sizeof(Record);
    const auto pages = std::uint32_t(table_bytes / page);
    const char* dir = std::getenv("TMPDIR");
    const std::string path = std::string(dir && *dir ? dir : "/var/tmp") + "/usermm-demo-swap-" +
                             std::to_string(getpid());
    usermm::SwapFile store(path, table_bytes + (64 << 20));
    usermm::Arena arena(table_bytes, [&] {
        usermm::ArenaOptions o;
        o.resident_limit = limit;
        o.store = &store;
        return o;
    }());
    const std::span<Record> table = arena.map_span<Record>(records, usermm::Prot::ReadWrite, {.name = "table"});
    const long rss_at_start = resident_kib();
    fmt::print("a {} MiB table of {} {}-byte records in an arena with a resident limit of {} MiB ({} pages) and a "
               "{} ({}O_DIRECT); {} threads, Zipf 0.99 over its {} pages, {:.0f}% updates, for {} s; VmRSS before: "
               "{:.1f} MiB\n",
               table_mib, records, sizeof(Record), limit_mib, limit / page, store.describe(),
               store.direct() ? "" : "not ", kThreads, pages, kUpdates * 100, seconds, double(rss_at_start) / 1024);

    std::atomic<int> phase{0};
    constexpr const char* kPhases[] = {"fill", "page out", "zipf", "check"};
    std::atomic<std::uint64_t> ops{0};
    std::uint64_t peak_resident = 0;
    long peak_rss = 0;
    // A jthread: an exception in this thread still stops and joins it, before the arena goes.
    std::jthread monitor([&](std::stop_token stop_monitor) {
        usermm::Stats last = arena.stats();
        std::uint64_t last_ops = 0;
        auto next = std::chrono::steady_clock::now();
        for (int t = 1; !stop_monitor.stop_requested(); ++t) {
            next += std::chrono::seconds(1);
            while (!stop_monitor.stop_requested() && std::chrono::steady_clock::now() < next)
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
            if (stop_monitor.stop_requested()) break;
            const usermm::Stats s = arena.stats();
            const long rss = resident_kib();
            const std::uint64_t n = ops.load();
            peak_resident = std::max<std::uint64_t>(peak_resident, s.resident_pages);
            peak_rss = std::max(peak_rss, rss);
            fmt::print("{:3} s {:<8} resident {:6.1f} / {} MiB (VmRSS {:6.1f} MiB)  major {:7} minor {:7} hinting "
                       "{:6}  swap in {:6.1f} out {:6.1f} MB/s  readahead hits {:6}  direct reclaims {:5}  "
                       "{:8} accesses\n",
                       t, kPhases[phase.load()], double(s.resident_pages * page) / (1 << 20), limit_mib,
                       double(rss) / 1024, s.major_faults - last.major_faults, s.minor_faults - last.minor_faults,
                       s.hinting_faults - last.hinting_faults,
                       double(s.swap_bytes_read - last.swap_bytes_read) / 1e6,
                       double(s.swap_bytes_written - last.swap_bytes_written) / 1e6,
                       s.swap_readahead_hits - last.swap_readahead_hits, s.direct_reclaims - last.direct_reclaims,
                       n - last_ops);
            std::fflush(stdout);
            last = s;
            last_ops = n;
        }
    });

    auto t0 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < records; ++i) {
        Record& r = table[i];
        r = Record{i, 0, {i, ~i, i * 3, i * 5, i * 7}, 0};
        r.checksum = checksum_of(r);
    }
    fmt::print("filled the table in {:.1f} s\n", since_ms(t0) / 1e3);
    phase = 1;
    t0 = std::chrono::steady_clock::now();
    arena.advise(table.data(), table.size_bytes(), usermm::Advice::PageOut);
    fmt::print("paged the whole table out in {:.1f} s: the simulations below start with empty frames too\n",
               since_ms(t0) / 1e3);

    phase = 2;
    const usermm_refstring::Zipf hot(pages, 0.99, 1);  // its page_of_rank: the pages in order of heat
    const usermm_refstring::ZipfRanks ranks(pages, 0.99);
    // Left uninitialised, so that only the part written takes memory (and shows in VmRSS).
    const std::size_t capacity = std::min<std::size_t>(kMaxRefs, std::size_t(seconds) * 4'000'000);
    const auto recorded = std::make_unique_for_overwrite<std::uint32_t[]>(capacity);
    std::atomic<std::uint64_t> next_ref{0}, updates{0}, torn{0};
    std::vector<std::mutex> stripes(kStripes);
    std::atomic<bool> stop{false};
    const usermm::Stats before = arena.stats();
    t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (unsigned w = 0; w < kThreads; ++w)
        threads.emplace_back([&, w] {
            std::mt19937_64 rng(100 + w);
            std::uniform_int_distribution<std::size_t> in_page(0, per_page - 1);
            std::uint64_t mine = 0, bad = 0;
            while (!stop.load(std::memory_order_relaxed)) {
                const std::uint32_t pg = hot.page_of_rank(ranks(rng));
                const std::size_t i = std::size_t(pg) * per_page + in_page(rng);
                const bool update = double(rng() >> 11) * 0x1.0p-53 < kUpdates;
                const std::uint64_t at = next_ref.fetch_add(1, std::memory_order_relaxed);
                if (at >= capacity) break;
                recorded[at] = pg;
                std::lock_guard lock(stripes[i % kStripes]);
                Record& r = table[i];
                if (update) {
                    ++r.version;
                    for (auto& p : r.payload) p = rng();
                    r.checksum = checksum_of(r);
                    ++mine;
                } else {
                    bad += r.key != i || r.checksum != checksum_of(r);
                }
            }
            updates += mine;
            torn += bad;
        });
    while (since_ms(t0) < seconds * 1e3 && next_ref.load() < capacity) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        ops = std::min<std::uint64_t>(next_ref.load(), capacity);
    }
    stop = true;
    for (auto& t : threads) t.join();
    const double phase_s = since_ms(t0) / 1e3;
    const usermm::Stats after = arena.stats();
    const std::size_t n = std::min<std::size_t>(next_ref.load(), capacity);
    ops = n;
    const std::span<const std::uint32_t> refs(recorded.get(), n);

    phase = 3;
    t0 = std::chrono::steady_clock::now();
    std::uint64_t version_sum = 0, bad = torn.load();
    for (std::size_t i = 0; i < records; ++i) {
        const Record& r = table[i];
        bad += r.key != i || r.checksum != checksum_of(r);
        version_sum += r.version;
    }
    const double check_s = since_ms(t0) / 1e3;
    monitor.request_stop();
    monitor.join();

    const std::uint64_t majors = after.major_faults - before.major_faults;
    fmt::print("\n{} accesses in {:.1f} s ({:.0f} a second), {} updates; the arena took {} major faults ({} pages "
               "swapped in, {} read ahead and used), {} hinting faults, {} direct reclaims\n",
               n, phase_s, double(n) / phase_s, updates.load(), majors,
               after.pages_swapped_in - before.pages_swapped_in,
               after.swap_readahead_hits - before.swap_readahead_hits, after.hinting_faults - before.hinting_faults,
               after.direct_reclaims - before.direct_reclaims);
    const std::size_t frames = limit / page;
    t0 = std::chrono::steady_clock::now();
    const std::uint64_t lru = usermm_offline::lru_faults(refs, frames);
    const std::uint64_t fifo = usermm_offline::fifo_faults(refs, frames);
    const std::uint64_t opt = usermm_offline::opt_faults(refs, frames);
    fmt::print("the same reference string simulated with {} frames (page-granular; usermm reclaims clusters of 32 "
               "pages, down to 1/8 below its limit) in {:.1f} s:\n",
               frames, since_ms(t0) / 1e3);
    for (const auto& [name, faults] : {std::pair{"usermm (major faults)", majors}, std::pair{"exact LRU", lru},
                                       std::pair{"FIFO", fifo}, std::pair{"OPT (Belady)", opt}})
        fmt::print("  {:<24} {:>10} faults  {:6.3f} x LRU  {:6.3f} x OPT\n", name, faults,
                   double(faults) / double(lru), double(faults) / double(opt));
    const bool resident_ok = peak_resident * page <= limit + kThreads * 32 * page;
    fmt::print("peak resident {:.1f} MiB against the limit of {} MiB (sampled every second; peak VmRSS {:.1f} MiB)\n",
               double(peak_resident * page) / (1 << 20), limit_mib, double(peak_rss) / 1024);
    fmt::print("checked all {} records in {:.1f} s: {} bad (torn, missing or misplaced, counting those lookups saw); "
               "versions add up to the {} updates: {}\n",
               records, check_s, bad, updates.load(), version_sum == updates.load() ? "yes" : "NO");
    fmt::print("\narena stats:\n{}", arena.stats());
    return bad == 0 && version_sum == updates.load() && resident_ok ? 0 : 1;
}

}  // namespace swapdemo

namespace fiberdemo {

namespace ctx = boost::context;

constexpr std::size_t kDefaultFibers = 1000000;
constexpr std::size_t kStackSize = 64 << 10;  // reserved per fiber; its guard lies below, 64 KiB more
constexpr std::size_t kFrame = 1024;           // one level of the recursion
constexpr int kMaxDepth = 48;                  // 48 KiB of frames at most: within the 64 KiB

long map_count() {
    FILE* f = std::fopen("/proc/self/maps", "r");
    long n = 0;
    for (int c; f && (c = std::fgetc(f)) != EOF;) n += c == '\n';
    if (f) std::fclose(f);
    return n;
}

long meminfo_kib(const char* field) {
    FILE* f = std::fopen("/proc/meminfo", "r");
    long kib = -1;
    char line[256];
    const std::size_t n = std::strlen(field);
    while (f && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, field, n) == 0 && line[n] == ':') {
            kib = std::strtol(line + n + 1, nullptr, 10);
            break;
        }
    if (f) std::fclose(f);
    return kib;
}

// The recursion: `depth` frames of kFrame bytes, each written, then a yield at the bottom.
__attribute__((noinline)) int dive(int depth, ctx::fiber& caller) {
    volatile char frame[kFrame - 64];
    frame[0] = char(depth);
    if (depth == 0) {
        caller = std::move(caller).resume();
        return frame[0];
    }
    return dive(depth - 1, caller) + frame[0];
}

// The runaway: no end but the overflow (g_never is never reached).
volatile int g_never = -1;
__attribute__((noinline)) int endless(int depth) {
    volatile char frame[kFrame - 64];
    frame[0] = char(depth);
    if (depth == g_never) return 0;
    return endless(depth + 1) + frame[0];
}

// The overflow handler's way back into the runaway fiber's own entry frame, and what it was told.
sigjmp_buf* volatile g_escape = nullptr;
usermm::StackOverflow g_caught;
volatile sig_atomic_t g_overflows_seen = 0;

// Runs in usermm's SIGSEGV handler, on the thread's alternate signal stack: copies the report (no
// allocation, no formatting) and jumps back to the sigsetjmp point on the overflowing fiber's stack.
void on_overflow(const usermm::StackOverflow& o) {
    if (!g_escape) return;  // not the runaway: reported as an overflow without a handler
    g_caught = o;
    g_overflows_seen = g_overflows_seen + 1;
    siglongjmp(*g_escape, 1);
}

// Fiber i's depth: mostly shallow, a few deep (geometric, mean ~1.9 frames), as a server's
// connections are mostly idle.
int depth_of(std::uint64_t i) {
    std::mt19937_64 rng(i * 0x9E3779B97F4A7C15ull + 1);
    std::geometric_distribution<int> d(0.35);
    return std::min(d(rng), kMaxDepth);
}

// The stack's allocator for Boost: the memory is a usermm::Stack the demo owns (a named one per
// fiber); Boost gives nothing back. usermm::StackPool::allocator() (<usermm/boost_context.hpp>)
// is the other way, with stacks recycled.
struct OwnedStack {
    void deallocate(ctx::stack_context&) noexcept {}
};

int run(std::size_t count) {
    const std::size_t page = usermm::page_size();
    // What a fiber costs here, about: 1.4 pages touched on average, its stack's bookkeeping and the
    // kernel's page tables. Fewer fibers if the machine has not the memory.
    const std::size_t per_fiber = 8 << 10;
    const long avail_kib = meminfo_kib("MemAvailable");
    if (avail_kib > 0 && double(count) * per_fiber > 0.7 * double(avail_kib) * 1024) {
        const std::size_t fit = std::size_t(0.7 * double(avail_kib) * 1024 / per_fiber);
        fmt::print("MemAvailable is {} MiB: {} fibers instead of {}\n", avail_kib >> 10, fit, count);
        count = fit;
    }
    if (count < 2) {
        std::fprintf(stderr, "usermm-demo fibers: too little memory\n");
        return 1;
    }
    const std::size_t runaway = (count * 3 / 4 + 17) % count;
    const auto t_start = std::chrono::steady_clock::now();
    usermm::Arena arena(1ull << 40);
    usermm::on_stack_overflow(on_overflow);
    const long rss0 = resident_kib(), maps0 = map_count();
    const usermm::StackStats st0 = usermm::stack_stats();

    // 1. The stacks: a 64 KiB reservation each, named, its top page committed (headroom 4 KiB);
    // the rest commits by growth faults, as the kernel's expand_stack does.
    std::vector<usermm::Stack> stacks;
    stacks.reserve(count);
    char name[40];
    for (std::size_t i = 0; i < count; ++i) {
        const auto r = fmt::format_to_n(name, sizeof name - 1, "fiber-{}", i);
        stacks.push_back(arena.map_stack(kStackSize, {.name = std::string_view(name, r.size), .headroom = page}));
    }
    const double make_s = since_ms(t_start) / 1000;

    // 2. The fibers: each runs until it has recursed to its depth and yields there.
    const auto t_run = std::chrono::steady_clock::now();
    std::vector<ctx::fiber> fibers;
    fibers.reserve(count);
    std::uint64_t frames = 0;
    int deepest = 0;
    volatile bool runaway_reported = false;
    for (std::size_t i = 0; i < count; ++i) {
        ctx::stack_context sc;
        sc.sp = stacks[i].top();
        sc.size = stacks[i].size();
        const int depth = depth_of(i);
        frames += std::uint64_t(depth);
        deepest = std::max(deepest, depth);
        ctx::fiber f{std::allocator_arg, ctx::preallocated(sc.sp, sc.size, sc), OwnedStack{},
                     [depth, runaway = i == runaway, &runaway_reported](ctx::fiber&& caller) {
                         dive(depth, caller);  // returns when resumed again
                         if (runaway) {
                             // The way back from the overflow handler: on this fiber's own stack,
                             // in its entry frame, above everything the recursion will use.
                             sigjmp_buf env;
                             if (sigsetjmp(env, 1) == 0) {
                                 g_escape = &env;
                                 endless(0);
                             }
                             g_escape = nullptr;
                             runaway_reported = true;
                         }
                         return std::move(caller);
                     }};
        fibers.push_back(std::move(f).resume());
    }
    const double run_s = since_ms(t_run) / 1000;
    const long rss1 = resident_kib(), maps1 = map_count();
    const usermm::StackStats st1 = usermm::stack_stats();
    const double reserved_gib = double(count) * double(2 * kStackSize) / double(1ull << 30);
    fmt::print("{} fibers on usermm stacks of {} KiB (guard: {} KiB more, {}), made in {:.1f} s, run to their yield "
               "in {:.1f} s\n",
               count, kStackSize >> 10, kStackSize >> 10,
               st1.mode == usermm::GuardMode::Markers ? "guard markers" : "PROT_NONE", make_s, run_s);
    fmt::print("each recursed to a random depth of 1 KiB frames and yields there: {:.2f} frames on average, {} at most\n",
               double(frames) / double(count), deepest);
    fmt::print("reserved: {:.1f} GiB of stacks and guards; committed: {:.1f} MiB; resident: +{:.1f} MiB "
               "({:.2f} KiB a fiber: its pages, usermm's bookkeeping, {} bytes of page state per reserved page)\n",
               reserved_gib, double(st1.committed_bytes) / (1 << 20), double(rss1 - rss0) / 1024,
               double(rss1 - rss0) / double(count), sizeof(std::uint16_t));
    fmt::print("kernel mappings: {} lines of /proc/self/maps before the stacks, {} with them (vm.max_map_count: {}); "
               "the stacks' guards cost {}\n",
               maps0, maps1, [] {
                   FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r");
                   long v = -1;
                   if (f && std::fscanf(f, "%ld", &v) != 1) v = -1;
                   if (f) std::fclose(f);
                   return v;
               }(),
               st1.kernel_maps);
    fmt::print("  (Boost's protected_fixedsize_stack would need {} mappings: 2 a stack)\n", 2 * count);
    fmt::print("growth faults: {} (a fault below a stack's committed part, granted as expand_stack does)\n",
               st1.growth_faults - st0.growth_faults);

    // 3. The runaway: one fiber, resumed, recurses without end.
    fmt::print("\nfiber-{} now recurses without end...\n", runaway);
    fibers[runaway] = std::move(fibers[runaway]).resume();
    const usermm::StackStats st2 = usermm::stack_stats();
    bool ok = runaway_reported && g_overflows_seen == 1 && !fibers[runaway];
    if (runaway_reported) {
        const usermm::StackOverflow& o = g_caught;
        const auto lo = reinterpret_cast<std::uintptr_t>(o.low), hi = reinterpret_cast<std::uintptr_t>(o.high);
        fmt::print("caught: stack overflow in '{}' (id {}): access at {} with the stack pointer at {}, {} bytes below "
                   "the stack's bottom; stack [{:#x}, {:#x}), {} KiB, peak {} KiB\n",
                   o.name(), o.id, o.address, o.sp,
                   lo - std::min(lo, reinterpret_cast<std::uintptr_t>(o.address)), lo, hi, (hi - lo) >> 10,
                   o.peak >> 10);
        fmt::print("the handler ran on the alternate signal stack and siglongjmp'ed into the fiber's entry frame; "
                   "the fiber returned normally\n");
        ok = ok && o.name() == fmt::format("fiber-{}", runaway);
    } else {
        fmt::print("the overflow was NOT caught\n");
    }
    fmt::print("overflows counted by usermm: {}\n", st2.overflows - st0.overflows);

    // 4. The rest finish.
    const auto t_finish = std::chrono::steady_clock::now();
    std::size_t finished = 0;
    for (auto& f : fibers)
        if (f) {
            f = std::move(f).resume();
            finished += !f;
        }
    const double finish_s = since_ms(t_finish) / 1000;
    fmt::print("\nthe other {} fibers finished in {:.1f} s\n", finished, finish_s);
    ok = ok && finished == count - 1;

    // 5. Unmapping, one stack at a time (each under the arena's write lock): all of them up to
    // kUnmapAll; beyond, that many, and the process's exit frees the rest, to keep the demo short.
    constexpr std::size_t kUnmapAll = 100000;
    const std::size_t unmap = std::min(count, kUnmapAll);
    const auto t_free = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < unmap; ++i) stacks[i] = usermm::Stack();
    const double free_s = since_ms(t_free) / 1000;
    const usermm::StackStats st3 = usermm::stack_stats();
    ok = ok && st3.live == st0.live + (count - unmap);
    fmt::print("unmapped {} stacks in {:.1f} s ({:.1f} us each); stacks live now: {}{}\n", unmap, free_s,
               free_s * 1e6 / double(unmap), st3.live,
               unmap < count ? ", left to the process's exit" : "");
    fmt::print("total: {:.1f} s; {}\n", since_ms(t_start) / 1000, ok ? "ok" : "FAILED");
    if (unmap < count) {
        std::fflush(stdout);
        _exit(ok ? 0 : 1);  // the stacks still mapped go with the address space
    }
    return ok ? 0 : 1;
}

}  // namespace fiberdemo

void usage() {
    std::fprintf(stderr,
                 "usage: usermm-demo lazy|snapshot|file|checkpoint [KEYS]|swap [TABLE_MIB LIMIT_MIB SECONDS]|far "
                 "[TABLE_MIB LIMIT_MIB TIER_MIB]|fibers [COUNT] [--trace[=FILE]]\n");
}

// --trace: the demo's faults into a trace file, closed when the demo returns.
class DemoTrace {
public:
    DemoTrace(std::string path) : path_(std::move(path)) {
        // Rings of 2^18 records (12 MiB a thread, committed as they fill): the demos fault faster
        // than a 16,384-record ring drains at its default pace.
        usermm::start_trace(path_, {.ring_records = 1 << 18});
    }
    ~DemoTrace() {
        try {
            const usermm::TraceStats s = usermm::stop_trace();
            fmt::print("trace: {} faults recorded in {}, {} dropped; `usermm-trace {}` summarises it, "
                       "`usermm-trace plot {}` draws it\n",
                       s.records, path_, s.dropped, path_, path_);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "usermm-demo: %s\n", e.what());
        }
    }
    DemoTrace(const DemoTrace&) = delete;
    DemoTrace& operator=(const DemoTrace&) = delete;

private:
    std::string path_;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc >= 2 && std::string_view(argv[1]) == "checkpoint-restart") return checkpoint::restart(argc, argv);
    // --trace[=FILE] may come anywhere after the demo's name; the demo sees its other arguments.
    std::optional<std::string> trace_path;
    for (int i = 2; i < argc; ++i) {
        const std::string_view arg = argv[i];
        if (arg != "--trace" && !arg.starts_with("--trace=")) continue;
        trace_path = arg == "--trace" ? fmt::format("usermm-demo-{}.trace", argv[1]) : std::string(arg.substr(8));
        std::copy(argv + i + 1, argv + argc + 1, argv + i);
        --argc;
        break;
    }
    std::optional<DemoTrace> trace;
    if (trace_path) {
        try {
            trace.emplace(*trace_path);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "usermm-demo: %s\n", e.what());
            return 1;
        }
    }
    const std::string_view what = argc >= 2 ? argv[1] : "";
    if (what == "checkpoint" && argc <= 3) {
        // An even number of keys (each writer has half), at most one per record of the table.
        const std::uint64_t keys = argc == 3 ? std::strtoull(argv[2], nullptr, 10) : checkpoint::kDefaultKeys;
        if (keys >= 2 && keys % 2 == 0 && keys <= checkpoint::kSlots) return checkpoint::run(argv[0], keys);
    }
    if (what == "swap" && (argc == 2 || argc == 5)) {
        const std::size_t table = argc == 5 ? std::strtoull(argv[2], nullptr, 10) : swapdemo::kDefaultTableMib;
        const std::size_t limit = argc == 5 ? std::strtoull(argv[3], nullptr, 10) : swapdemo::kDefaultLimitMib;
        const int seconds = argc == 5 ? std::atoi(argv[4]) : swapdemo::kDefaultSeconds;
        if (limit >= 1 && table > limit && table <= (1ull << 20) && seconds >= 1) {
            try {
                return swapdemo::run(table, limit, seconds);
            } catch (const std::exception& e) {  // unwinds, so that the SwapFile removes its file
                std::fprintf(stderr, "usermm-demo swap: %s\n", e.what());
                return 1;
            }
        }
    }
#ifdef USERMM_DEMO_FAR
    if (what == "far" && (argc == 2 || argc == 5)) {
        const std::size_t table = argc == 5 ? std::strtoull(argv[2], nullptr, 10) : fardemo::kDefaultTableMib;
        const std::size_t limit = argc == 5 ? std::strtoull(argv[3], nullptr, 10) : fardemo::kDefaultLimitMib;
        const std::size_t tier = argc == 5 ? std::strtoull(argv[4], nullptr, 10) : fardemo::kDefaultTierMib;
        if (limit >= 1 && tier >= 1 && table > limit && table <= (1ull << 18)) {
            try {
                return fardemo::run(table, limit, tier);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "usermm-demo far: %s\n", e.what());
                return 1;
            }
        }
    }
#endif
    if (what == "fibers" && argc <= 3) {
        const std::size_t count = argc == 3 ? std::strtoull(argv[2], nullptr, 10) : fiberdemo::kDefaultFibers;
        if (count >= 2 && count <= 4 * fiberdemo::kDefaultFibers) {
            try {
                return fiberdemo::run(count);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "usermm-demo fibers: %s\n", e.what());
                return 1;
            }
        }
    }
    if (argc != 2) {
        usage();
        return 2;
    }
    if (what == "lazy") return lazy();
    if (what == "snapshot") return snapshot_demo();
    if (what == "file") return file_demo();
    usage();
    return 2;
}
