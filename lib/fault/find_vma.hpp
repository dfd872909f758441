// find_vma: from a faulting address to its arena (the registry) and its VMA (the arena's tree).
#pragma once

#include <cstddef>
#include <cstdint>

#include "vma.hpp"

namespace usermm::detail {

inline constexpr std::size_t kMaxArenas = 16384;

// Every live arena, sorted by base. Changed by the API world under the write side of the registry
// lock; the fault path holds the read side only until it holds the arena's own read lock.
struct ArenaRegistry {
    RwSpinLock lock{LockRank::Registry};
    ArenaCore* arenas[kMaxArenas] = {};
    std::size_t count = 0;
};

ArenaRegistry& arena_registry();
// The registry's order, for std::upper_bound: whether `addr` lies below the arena's base.
bool base_below(std::uintptr_t addr, const ArenaCore* arena);

// Fault world. The arena containing `addr`, with its read lock taken, or nullptr. If the calling
// thread holds that arena's write lock, returns it unlocked and sets *self_deadlock instead.
ArenaCore* find_arena_lock_shared(std::uintptr_t addr, bool* self_deadlock);

// Fault world, under the arena's read lock (or API world under its write lock): the first VMA
// whose end is above `addr`, which contains `addr` only if its start is at or below it.
Vma* find_vma(ArenaCore& arena, std::uintptr_t addr);

}  // namespace usermm::detail
