#include "store_pool.hpp"

#include <pthread.h>

#include <array>
#include <cstdint>
#include <mutex>

#include <usermm/usermm.hpp>

#include "page_ops_api.hpp"
#include "pte.hpp"

namespace usermm::detail {

namespace {

// Each kept store is a kernel mapping: a handful stays within the reserve the map budget leaves for
// the program's own mappings, and is enough for checkpoint loops (one or two snapshots in flight).
constexpr std::size_t kMaxKept = 4;
constexpr std::size_t kDefaultLimit = std::size_t(256) << 20;

struct Pool {
    std::mutex lock;
    std::size_t limit = kDefaultLimit;  // bytes of backed pages kept at most
    std::size_t kept_pages = 0;         // backed pages of the stores kept
    std::array<StoreSpan, kMaxKept> kept{};  // oldest first
    std::size_t count = 0;
    std::uint64_t forks = 0;  // fork()s of this process so far
};

constinit Pool g_pool;

std::uintptr_t addr_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// Under the pool's lock: forgets kept store i.
StoreSpan take(Pool& p, std::size_t i) {
    const StoreSpan s = p.kept[i];
    for (std::size_t k = i + 1; k < p.count; ++k) p.kept[k - 1] = p.kept[k];
    p.kept[--p.count] = StoreSpan{};
    p.kept_pages -= s.backed;
    return s;
}

// Under the pool's lock: unmaps the oldest kept store.
void drop_oldest(Pool& p) {
    const StoreSpan s = take(p, 0);
    page_release(addr_of(s.base), s.pages << g_page_shift);
}

void trim(Pool& p) {
    while (p.count && (p.kept_pages << g_page_shift) > p.limit) drop_oldest(p);
}

// A fork in the middle of a take or a release must not leave the child's pool locked. The child
// starts with none kept: the pages are shared with the parent, so a copy onto one would cost the
// child a copy-on-write fault rather than save it a zeroing.
void fork_prepare() { g_pool.lock.lock(); }
void fork_parent() {
    ++g_pool.forks;
    g_pool.lock.unlock();
}
void fork_child() {
    while (g_pool.count) drop_oldest(g_pool);
    g_pool.lock.unlock();
}
[[gnu::constructor]] void register_fork_handlers() { pthread_atfork(fork_prepare, fork_parent, fork_child); }

}  // namespace

int store_reserve(std::size_t pages, StoreSpan* out) {
    {
        std::lock_guard guard(g_pool.lock);
        std::size_t best = g_pool.count;
        for (std::size_t i = 0; i < g_pool.count; ++i)
            if (g_pool.kept[i].pages >= pages && (best == g_pool.count || g_pool.kept[i].backed > g_pool.kept[best].backed))
                best = i;
        if (best != g_pool.count) {
            *out = take(g_pool, best);
            out->shared |= out->forks != g_pool.forks;
            out->forks = g_pool.forks;
            return 0;
        }
    }
    void* p = nullptr;
    if (const int err = page_alloc_table(pages << g_page_shift, &p)) return err;
    std::lock_guard guard(g_pool.lock);
    *out = StoreSpan{static_cast<std::byte*>(p), pages, 0, false, g_pool.forks};
    return 0;
}

void store_release(StoreSpan s) {
    // A store nothing was copied into costs nothing to make again.
    if (s.backed && page_free_lazily(addr_of(s.base), s.backed << g_page_shift) == 0) {
        std::lock_guard guard(g_pool.lock);
        if ((s.backed << g_page_shift) <= g_pool.limit) {
            if (g_pool.count == kMaxKept) drop_oldest(g_pool);
            s.shared |= s.forks != g_pool.forks;
            s.forks = g_pool.forks;
            g_pool.kept[g_pool.count++] = s;
            g_pool.kept_pages += s.backed;
            trim(g_pool);  // the oldest go first, the newest stays
            return;
        }
    }
    page_release(addr_of(s.base), s.pages << g_page_shift);
}

}  // namespace usermm::detail

namespace usermm {

std::size_t set_snapshot_store_pool(std::size_t bytes) {
    std::lock_guard guard(detail::g_pool.lock);
    const std::size_t previous = detail::g_pool.limit;
    detail::g_pool.limit = bytes;
    detail::trim(detail::g_pool);
    return previous;
}

StorePool snapshot_store_pool() {
    std::lock_guard guard(detail::g_pool.lock);
    return {detail::g_pool.limit, detail::g_pool.kept_pages << detail::g_page_shift};
}

}  // namespace usermm
