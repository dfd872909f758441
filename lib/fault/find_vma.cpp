#include "find_vma.hpp"

#include <algorithm>

namespace usermm::detail {

namespace {
constinit ArenaRegistry g_registry;
}

ArenaRegistry& arena_registry() { return g_registry; }

bool base_below(std::uintptr_t addr, const ArenaCore* arena) { return addr < arena->base; }

ArenaCore* find_arena_lock_shared(std::uintptr_t addr, bool* self_deadlock) {
    *self_deadlock = false;
    if (g_registry.lock.held_by_me()) {  // an arena is being created or destroyed by this thread
        *self_deadlock = true;
        return nullptr;
    }
    SharedGuard registry_guard(g_registry.lock);
    // The last arena whose base is at or below addr.
    ArenaCore* const* const arenas = g_registry.arenas;
    ArenaCore* const* const above = std::upper_bound(arenas, arenas + g_registry.count, addr, base_below);
    if (above == arenas) return nullptr;
    ArenaCore* arena = *(above - 1);
    if (addr >= arena->end) return nullptr;
    if (arena->lock.held_by_me()) {
        *self_deadlock = true;
        return arena;
    }
    // Hand over hand: once the arena's read lock is held, it cannot be destroyed under us.
    arena->lock.lock_shared();
    return arena;
}

Vma* find_vma(ArenaCore& arena, std::uintptr_t addr) {
    Vma* hit = arena.last_hit.load(std::memory_order_relaxed);
    if (hit && hit->start <= addr && addr < hit->end) return hit;
    Vma* vma;
    if (arena.vma_index.usable()) {
        vma = arena.vma_index.find(addr);
    } else {
        auto it = arena.tree.upper_bound(addr);
        vma = it == arena.tree.end() ? nullptr : &*it;
    }
    if (vma && vma->start <= addr) arena.last_hit.store(vma, std::memory_order_relaxed);
    return vma;
}

}  // namespace usermm::detail
