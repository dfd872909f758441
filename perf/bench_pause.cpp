// The pause a checkpoint loop imposes on rate-capped writers of a sparse table, against fork():
// a key-value table of 64-byte records at random places in a large VMA, two writer threads that
// update random records at a capped rate (they sleep between bursts, so the other vCPU goes idle
// between them), and a snapshot() every interval while the previous one lives. The floor is fork()
// of the same table in plain mmap memory (the same resident pages, the same writers), measured in
// the same run: the parent's fork() call, and the longest single record write of the writers
// meanwhile. Last, fork() of the process with the usermm table against fork() with the plain one:
// fork copies every kernel VMA, and a sparse usermm table is made of many.
//
// Usage: usermm-bench-pause [vma MiB] [records] [ops/s] [rounds]   (defaults 8192 80000 400000 10)
// The interval between checkpoints is chosen so that about half of the records' pages change in
// it. USERMM_ENGINE=mprotect measures the portable engine. `64 1000 20000 2` is a smoke run.
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <usermm/usermm.hpp>

#include "bench_util.hpp"

#include "page_ops_api.hpp"

using usermm_bench::kPage;
using usermm_bench::median;
using usermm_bench::now_ns;

namespace {

constexpr std::size_t kRecord = 64;
constexpr int kWriters = 2;
constexpr std::uint64_t kTickNs = 1000000;  // writers write one burst per millisecond

struct Config {
    std::size_t vma_bytes = 8ull << 30;
    std::size_t records = 80000;
    std::uint64_t rate = 400000;  // record writes per second, all writers together
    int rounds = 10;
    std::uint64_t interval_ns() const {
        // 1 - exp(-rate * t / records) = 1/2: half of the records' pages change in an interval.
        return std::uint64_t(std::log(2.0) * double(records) / double(rate) * 1e9);
    }
};

// Writers that update random records at a capped rate and remember their longest single write.
class Writers {
public:
    Writers(char* table, const std::vector<std::size_t>& offsets, std::uint64_t rate)
        : table_(table), offsets_(offsets), per_tick_(std::max<std::uint64_t>(1, rate / kWriters / 1000)) {
        for (int w = 0; w < kWriters; ++w) threads_.emplace_back([this, w] { run(w); });
    }
    ~Writers() {
        stop_.store(true);
        for (auto& t : threads_) t.join();
    }
    // The longest write since the last call, in ms.
    double take_max_stall_ms() { return double(max_ns_.exchange(0)) / 1e6; }

private:
    void run(int w) {
        std::mt19937_64 rng(std::uint64_t(w) * 7919 + 1);
        std::uint64_t next = now_ns();
        std::uint64_t value = 0;
        while (!stop_.load(std::memory_order_relaxed)) {
            std::uint64_t worst = 0;
            for (std::uint64_t i = 0; i < per_tick_; ++i) {
                auto* rec = reinterpret_cast<volatile std::uint64_t*>(table_ + offsets_[rng() % offsets_.size()]);
                const std::uint64_t t0 = now_ns();
                for (std::size_t k = 0; k < kRecord / sizeof(std::uint64_t); ++k) rec[k] = ++value;
                worst = std::max(worst, now_ns() - t0);
            }
            std::uint64_t seen = max_ns_.load(std::memory_order_relaxed);
            while (worst > seen && !max_ns_.compare_exchange_weak(seen, worst)) {
            }
            next += kTickNs;
            const std::uint64_t now = now_ns();
            if (next < now) next = now;  // behind (stalled): no catch-up burst
            timespec ts{time_t(next / 1000000000u), long(next % 1000000000u)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr);
        }
    }

    char* table_;
    const std::vector<std::size_t>& offsets_;
    std::uint64_t per_tick_;
    std::atomic<bool> stop_{false};
    std::atomic<std::uint64_t> max_ns_{0};
    std::vector<std::thread> threads_;
};

void sleep_ns(std::uint64_t ns) {
    timespec ts{time_t(ns / 1000000000u), long(ns % 1000000000u)};
    nanosleep(&ts, nullptr);
}

std::size_t kernel_mappings() {
    FILE* f = std::fopen("/proc/self/maps", "r");
    std::size_t n = 0;
    for (int c; f && (c = std::fgetc(f)) != EOF;) n += c == '\n';
    if (f) std::fclose(f);
    return n;
}

struct Pause {
    std::vector<double> pause_ms, stall_ms;
};

// fork() while the writers run: the parent's fork() call and the writers' longest write around it.
// The child exits at once.
Pause fork_pauses(Writers& writers, const Config& c) {
    Pause p;
    for (int r = 0; r < c.rounds; ++r) {
        sleep_ns(c.interval_ns());
        writers.take_max_stall_ms();
        const std::uint64_t t0 = now_ns();
        const pid_t pid = fork();
        if (pid == 0) _exit(0);
        p.pause_ms.push_back(double(now_ns() - t0) / 1e6);
        waitpid(pid, nullptr, 0);
        sleep_ns(c.interval_ns() / 4);  // the writers' copy-on-write faults after fork, too
        p.stall_ms.push_back(writers.take_max_stall_ms());
    }
    return p;
}

struct PlainTable {
    char* data;
    std::size_t bytes;
    PlainTable(std::size_t n, const std::vector<std::size_t>& offsets) : bytes(n) {
        data = static_cast<char*>(
            mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (data == MAP_FAILED) std::abort();
        for (std::size_t o : offsets) std::memset(data + o, 1, kRecord);
    }
    ~PlainTable() { munmap(data, bytes); }
};

struct UsermmTable {
    usermm::Arena arena;
    char* data;
    UsermmTable(std::size_t n, const std::vector<std::size_t>& offsets) : arena(n + (1ull << 30)) {
        data = static_cast<char*>(arena.map(n, usermm::Prot::ReadWrite, {.name = "kv-table"}));
        for (std::size_t o : offsets) std::memset(data + o, 1, kRecord);
    }
};

struct Row {
    Pause fork_plain, snapshot, fork_usermm;
    std::vector<double> first_snapshot_ms, changed;
    std::size_t maps_plain = 0, maps_usermm = 0;
};

void plain_round(const Config& c, const std::vector<std::size_t>& offsets, Row& row) {
    PlainTable t(c.vma_bytes, offsets);
    Writers w(t.data, offsets, c.rate);
    row.maps_plain = kernel_mappings();
    const Pause p = fork_pauses(w, c);
    row.fork_plain.pause_ms.insert(row.fork_plain.pause_ms.end(), p.pause_ms.begin(), p.pause_ms.end());
    row.fork_plain.stall_ms.insert(row.fork_plain.stall_ms.end(), p.stall_ms.begin(), p.stall_ms.end());
}

void usermm_round(const Config& c, const std::vector<std::size_t>& offsets, Row& row) {
    UsermmTable t(c.vma_bytes, offsets);
    Writers w(t.data, offsets, c.rate);
    std::uint64_t t0 = now_ns();
    std::optional<usermm::Snapshot> previous = t.arena.snapshot();
    row.first_snapshot_ms.push_back(double(now_ns() - t0) / 1e6);
    for (int r = 0; r < c.rounds; ++r) {
        sleep_ns(c.interval_ns());
        w.take_max_stall_ms();
        t0 = now_ns();
        usermm::Snapshot next = t.arena.snapshot();
        row.snapshot.pause_ms.push_back(double(now_ns() - t0) / 1e6);
        row.changed.push_back(double(previous->stats().cow_faults) / double(offsets.size()));
        previous = std::move(next);
        sleep_ns(c.interval_ns() / 4);
        row.snapshot.stall_ms.push_back(w.take_max_stall_ms());
    }
    previous.reset();  // the heap as a program without a live snapshot forks it
    row.maps_usermm = kernel_mappings();
    const Pause p = fork_pauses(w, c);
    row.fork_usermm.pause_ms.insert(row.fork_usermm.pause_ms.end(), p.pause_ms.begin(), p.pause_ms.end());
    row.fork_usermm.stall_ms.insert(row.fork_usermm.stall_ms.end(), p.stall_ms.begin(), p.stall_ms.end());
}

double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

}  // namespace

int main(int argc, char** argv) {
    Config c;
    if (argc > 1) c.vma_bytes = std::strtoull(argv[1], nullptr, 10) << 20;
    if (argc > 2) c.records = std::strtoull(argv[2], nullptr, 10);
    if (argc > 3) c.rate = std::strtoull(argv[3], nullptr, 10);
    if (argc > 4) c.rounds = std::atoi(argv[4]);
    if (c.vma_bytes < kPage || c.records == 0 || c.rate == 0 || c.rounds < 1) {
        std::fprintf(stderr, "usage: %s [vma MiB] [records] [ops/s] [rounds]\n", argv[0]);
        return 2;
    }
    usermm::page_size();
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    std::mt19937_64 rng(42);
    std::vector<std::size_t> offsets(c.records);
    for (auto& o : offsets) o = (rng() % (c.vma_bytes / kRecord)) * kRecord;
    fmt::print("usermm snapshot pause vs fork(), sleeping writers: {} MiB VMA, {} records of {} bytes at random, "
               "{} writers at {} writes/s in all, a checkpoint every {:.0f} ms, {} per round, 2 rounds; engine {}\n",
               c.vma_bytes >> 20, c.records, kRecord, kWriters, c.rate, double(c.interval_ns()) / 1e6, c.rounds,
               uffd ? "uffd" : "mprotect");
    fmt::print("target: snapshot pause <= fork's pause of the same table in plain mmap memory\n");
    warm_free_memory(std::min<std::size_t>(c.records * kPage * 3, 2ull << 30));
    Row row;
    for (int round = 0; round < 2; ++round) {  // alternating, so that drift of the shared VM hits both
        plain_round(c, offsets, row);
        usermm_round(c, offsets, row);
    }
    const double fp = median(row.fork_plain.pause_ms), sp = median(row.snapshot.pause_ms),
                 fu = median(row.fork_usermm.pause_ms);
    fmt::print("fork(), plain table:       pause median {:7.2f} ms, max {:7.2f} | writers' longest write median "
               "{:7.2f} ms, max {:7.2f} | {} kernel VMAs in the process\n",
               fp, max_of(row.fork_plain.pause_ms), median(row.fork_plain.stall_ms), max_of(row.fork_plain.stall_ms),
               row.maps_plain);
    fmt::print("snapshot(), usermm table:  pause median {:7.2f} ms, max {:7.2f} | writers' longest write median "
               "{:7.2f} ms, max {:7.2f} | pause {:5.2f}x fork's | {:.0f}% of the records' pages changed per "
               "interval | first snapshot {:.2f} ms\n",
               sp, max_of(row.snapshot.pause_ms), median(row.snapshot.stall_ms), max_of(row.snapshot.stall_ms), sp / fp,
               100 * median(row.changed), median(row.first_snapshot_ms));
    fmt::print("fork(), usermm table:      pause median {:7.2f} ms, max {:7.2f} | writers' longest write median "
               "{:7.2f} ms, max {:7.2f} | pause {:5.2f}x plain fork's | {} kernel VMAs in the process\n",
               fu, max_of(row.fork_usermm.pause_ms), median(row.fork_usermm.stall_ms), max_of(row.fork_usermm.stall_ms),
               fu / fp, row.maps_usermm);
    return 0;
}
