// The lock order, written once and checked in debug builds.
//
//   1. the arena registry's lock (ArenaRegistry::lock)
//   2. an arena's lock (ArenaCore::lock), several at once only in ascending base address (fork)
//   3. an arena's install lock (ArenaCore::install_lock, held by a fault across one mprotect)
//
// A thread takes a lock only if every lock it holds comes before it: a higher rank, or the same
// rank with a lower key. (An evictor that starts from pages and needs arenas takes the registry
// first, like everyone else.) Debug builds (no NDEBUG) keep a per-thread record of the locks held
// and, on an inversion, write one line naming both locks and abort; release builds keep nothing.
// The record is a fixed array in thread-local storage: the fault path takes locks too.
#pragma once

#include <cstdint>

namespace usermm::detail {

enum class LockRank : std::uint8_t { Registry = 1, Arena = 2, Install = 3 };

#ifndef NDEBUG
inline constexpr bool kLockOrderChecked = true;
// Called just before a lock is taken (acquire) and just after it is released (release); `key`
// orders locks of one rank.
void lock_order_acquire(const void* lock, LockRank rank, std::uintptr_t key);
void lock_order_release(const void* lock);
#else
inline constexpr bool kLockOrderChecked = false;
inline void lock_order_acquire(const void*, LockRank, std::uintptr_t) {}
inline void lock_order_release(const void*) {}
#endif

}  // namespace usermm::detail
