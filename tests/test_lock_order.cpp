// The lock order (lib/core/lock_order.hpp) is checked in debug builds: taking a lock while holding
// one that comes after it writes one line naming both and aborts. In a release build nothing is
// recorded, and these cases are reported skipped.
#include <doctest/doctest.h>
#include <usermm/usermm.hpp>

#include <signal.h>

#include <atomic>
#include <string>
#include <thread>

#include "find_vma.hpp"
#include "lock_order.hpp"
#include "test_util.hpp"
#include "vma.hpp"

namespace {

using usermm::detail::ArenaAccess;
using usermm::detail::kLockOrderChecked;

}  // namespace

TEST_CASE("an arena's lock taken while holding its install lock is caught" * doctest::skip(!kLockOrderChecked)) {
    const usermm_test::ChildEnd end = usermm_test::run_in_child([] {
        usermm::Arena arena(1 << 20);
        usermm::detail::ArenaCore& core = ArenaAccess::core(arena);
        core.install_lock.lock();
        core.lock.lock_shared();  // inverted: install comes after the arena's lock
        _exit(0);
    });
    INFO("child stderr: ", end.err);
    CHECK(end.signal == SIGABRT);
    CHECK(end.err.find("lock order inverted") != std::string::npos);
    CHECK(end.err.find("install lock") != std::string::npos);
}

TEST_CASE("two arenas' locks in descending base order are caught; ascending is the order" *
          doctest::skip(!kLockOrderChecked)) {
    const usermm_test::ChildEnd good = usermm_test::run_in_child([] {
        usermm::Arena a(1 << 20), b(1 << 20);
        usermm::detail::ArenaCore& x = ArenaAccess::core(a);
        usermm::detail::ArenaCore& y = ArenaAccess::core(b);
        usermm::detail::ArenaCore& low = x.base < y.base ? x : y;
        usermm::detail::ArenaCore& high = x.base < y.base ? y : x;
        usermm::detail::arena_registry().lock.lock_shared();
        low.lock.lock();
        high.lock.lock();
        high.lock.unlock();
        low.lock.unlock();
        usermm::detail::arena_registry().lock.unlock_shared();
        _exit(0);
    });
    INFO("child stderr: ", good.err);
    CHECK(good.exited);
    CHECK(good.exit_code == 0);
    const usermm_test::ChildEnd bad = usermm_test::run_in_child([] {
        usermm::Arena a(1 << 20), b(1 << 20);
        usermm::detail::ArenaCore& x = ArenaAccess::core(a);
        usermm::detail::ArenaCore& y = ArenaAccess::core(b);
        (x.base < y.base ? y : x).lock.lock();
        (x.base < y.base ? x : y).lock.lock();
        _exit(0);
    });
    INFO("child stderr: ", bad.err);
    CHECK(bad.signal == SIGABRT);
    CHECK(bad.err.find("lock order inverted") != std::string::npos);
}

TEST_CASE("the registry's lock taken while holding an arena's is caught" * doctest::skip(!kLockOrderChecked)) {
    const usermm_test::ChildEnd end = usermm_test::run_in_child([] {
        usermm::Arena arena(1 << 20);
        ArenaAccess::core(arena).lock.lock();
        usermm::detail::arena_registry().lock.lock_shared();
        _exit(0);
    });
    INFO("child stderr: ", end.err);
    CHECK(end.signal == SIGABRT);
    CHECK(end.err.find("registry") != std::string::npos);
}

TEST_CASE("try_lock_shared: at once beside readers, never while a writer holds or waits for the lock") {
    usermm::Arena arena(1 << 20);
    usermm::detail::RwSpinLock& lock = ArenaAccess::core(arena).lock;
    // Each attempt on a thread of its own: a thread that already holds the lock may not take it
    // again (the order check of debug builds says so).
    auto try_elsewhere = [&lock] {
        bool got = false;
        std::thread([&] {
            got = lock.try_lock_shared();
            if (got) lock.unlock_shared();
        }).join();
        return got;
    };
    REQUIRE(lock.try_lock_shared());
    CHECK(try_elsewhere());  // readers share
    // A writer that waits for the last reader already keeps new readers out.
    std::atomic<bool> writer_in{false};
    std::thread writer([&] {
        lock.lock();
        writer_in.store(true);
        lock.unlock();
    });
    bool refused = false;
    for (unsigned spins = 0; !(refused = !try_elsewhere()); ++spins) usermm::detail::spin_backoff(spins);
    CHECK(refused);
    CHECK_FALSE(writer_in.load());  // it waits for the reader this thread still holds
    lock.unlock_shared();
    writer.join();
    CHECK(writer_in.load());
    CHECK(try_elsewhere());
}
