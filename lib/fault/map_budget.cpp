#include "map_budget.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

namespace usermm::detail {

namespace {
constinit std::atomic<long> g_used{0};
constinit std::atomic<long> g_limit{1L << 62};
constinit std::atomic<long> g_max_map_count{65530};

// A kernel VMA boundary lies between two neighbouring pages wherever their protections differ, one
// is backed by a file's memfd and the other by the arena's anonymous memory, or the second carries
// an edge mark. A class is protection plus backing; the pages beyond the arena are a class of
// their own.
constexpr unsigned kOutside = 0x10000;

unsigned class_of(pte_t v) { return pte_prot(v) | ((v & kPteFile) ? 0x8u : 0u); }

unsigned class_at(const ArenaCore& arena, std::size_t index, std::size_t npages) {
    if (index >= npages) return kOutside;  // also catches index == SIZE_MAX, the page before 0
    return class_of(arena.pte[index].load(std::memory_order_relaxed));
}

bool edge_at(const ArenaCore& arena, std::size_t index, std::size_t npages) {
    return index < npages && (arena.pte[index].load(std::memory_order_relaxed) & kPteEdge);
}
}  // namespace

void map_budget_set_limit(long limit) { g_limit.store(limit, std::memory_order_relaxed); }
void map_budget_set_max_map_count(long max_map_count) { g_max_map_count.store(max_map_count, std::memory_order_relaxed); }
long map_budget_limit() { return g_limit.load(std::memory_order_relaxed); }
long map_budget_used() { return g_used.load(std::memory_order_relaxed); }
long map_budget_max_map_count() { return g_max_map_count.load(std::memory_order_relaxed); }

void map_budget_refused() {
    const long used = g_used.load(std::memory_order_relaxed);
    long limit = g_limit.load(std::memory_order_relaxed);
    while (used < limit && !g_limit.compare_exchange_weak(limit, used, std::memory_order_relaxed)) {
    }
}

long map_count_delta(const ArenaCore& arena, std::size_t first, std::size_t last, Prot prot) {
    const std::size_t npages = arena.page_index(arena.end);
    const unsigned next = class_of(pte_t(to_pte(prot) | (arena.pte[first].load(std::memory_order_relaxed) & kPteFile)));
    const unsigned left = class_at(arena, first - 1, npages);
    const unsigned right = class_at(arena, last, npages);
    long before = 0;
    long after = 0;
    unsigned prev = left;
    for (std::size_t i = first; i <= last; ++i) {
        const unsigned cur = class_at(arena, i, npages);
        const bool edge = edge_at(arena, i, npages);
        before += cur != prev || edge;
        if (i == first)
            after += left != next || edge;
        else if (i == last)
            after += next != right || edge;
        else
            after += edge;
        prev = cur;
    }
    return after - before;
}

bool map_budget_try_charge(ArenaCore& arena, long delta) {
    if (delta <= 0) {
        map_budget_charge(arena, delta);
        return true;
    }
    long used = g_used.load(std::memory_order_relaxed);
    do {
        if (used + delta > g_limit.load(std::memory_order_relaxed)) return false;
    } while (!g_used.compare_exchange_weak(used, used + delta, std::memory_order_relaxed));
    arena.kernel_maps.fetch_add(delta, std::memory_order_relaxed);
    return true;
}

void map_budget_recount(ArenaCore& arena, long kernel_maps) {
    map_budget_charge(arena, kernel_maps + kArenaTableMaps - arena.kernel_maps.load(std::memory_order_relaxed));
}

bool data_limit_reached(std::size_t bytes, std::uint64_t* limit) {
    rlimit rl{};
    if (syscall(SYS_prlimit64, 0, RLIMIT_DATA, nullptr, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return false;
    *limit = rl.rlim_cur;
    const int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return true;  // a finite limit, and no way to see how much of it is used: assume it
    char buf[4096];
    const ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    if (n <= 0) return true;
    buf[n] = 0;
    constexpr char kKey[] = "\nVmData:";
    auto key_at = [&](const char* p) {
        for (std::size_t k = 0; k + 1 < sizeof kKey; ++k)
            if (p[k] != kKey[k]) return false;
        return true;
    };
    const char* at = nullptr;
    for (const char* p = buf; *p && !at; ++p)
        if (key_at(p)) at = p + sizeof kKey - 1;
    if (!at) return true;
    std::uint64_t kib = 0;
    while (*at == ' ' || *at == '\t') ++at;
    for (; *at >= '0' && *at <= '9'; ++at) kib = kib * 10 + std::uint64_t(*at - '0');
    return kib * 1024 + bytes > rl.rlim_cur;
}

void map_budget_charge_process(long delta) { g_used.fetch_add(delta, std::memory_order_relaxed); }

void map_budget_charge(ArenaCore& arena, long delta) {
    g_used.fetch_add(delta, std::memory_order_relaxed);
    arena.kernel_maps.fetch_add(delta, std::memory_order_relaxed);
}

}  // namespace usermm::detail
