// What the far stores share (include/usermm/far.hpp): the slot table that a forked child shares
// with its parent, keys, the choice of a page's servers, the servers' up/down state, and the
// counters. API world: everything here may allocate, lock and throw.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include <usermm/far.hpp>

namespace usermm::far {

template <typename... Args>
[[noreturn]] void fail(int err, fmt::format_string<Args...> format, Args&&... args) {
    throw std::system_error(err, std::generic_category(), fmt::format(format, std::forward<Args>(args)...));
}

inline constexpr std::size_t kPageBytes = 4096;
// A page's copies are a bit mask of server indices.
inline constexpr std::size_t kMaxServers = 64;
using ServerMask = std::uint64_t;

// "host:port": the host (a name or numeric address) and the port; throws EINVAL naming `call`.
struct Endpoint {
    std::string host;
    int port = 0;
    std::string text;  // as given
};
Endpoint parse_endpoint(const char* call, const std::string& address);

// The slots of one store, in memory shared with forked children (MAP_SHARED), so that a child
// allocates from the same table and retain()/release() count both processes' references (the
// kernel's swap_duplicate). Per slot: references, a generation (incremented at each allocation:
// part of the key), and the servers holding its copies. A process-shared robust mutex guards
// allocation and references; the servers of a slot are written once after its write and read by
// whoever reads it.
class SlotTable {
public:
    SlotTable(const char* call, std::uint64_t capacity);
    ~SlotTable();
    SlotTable(const SlotTable&) = delete;
    SlotTable& operator=(const SlotTable&) = delete;

    std::size_t allocate(std::span<std::uint64_t> out);
    // Drops one reference to each; the slots that lost their last one are appended to `dead`,
    // with their generation and servers (for deleting their keys).
    struct Dead {
        std::uint64_t slot;
        std::uint32_t generation;
        ServerMask where;
    };
    void release(std::span<const std::uint64_t> slots, std::vector<Dead>& dead);
    int retain(std::span<const std::uint64_t> slots);  // EINVAL (nothing changed) if one is free

    std::uint32_t generation(std::uint64_t slot) const;
    ServerMask where(std::uint64_t slot) const;
    void set_where(std::uint64_t slot, ServerMask where);  // counts the copies per server
    std::uint64_t capacity() const { return capacity_; }
    std::uint64_t in_use() const;
    std::uint64_t copies_on(std::size_t server) const;  // page copies server `server` holds

    // The processes that share the table: the one that made it and every child forked since
    // (registered in the child by a fork handler, before fork() returns there). A child that ends
    // without releasing its references (exec, _exit, a crash) leaves them counted; the last
    // process to let the table go takes them back: true, with every slot still in use appended
    // to `dead` (and freed), when no other process that shared the table is alive.
    bool last_user(std::vector<Dead>& dead);

private:
    struct Header;
    struct Entry;
    void lock() const;
    void unlock() const;
    void add_user(pid_t pid);
    void free_slot(std::uint64_t slot, std::vector<Dead>& dead);
    static void fork_prepare();
    static void fork_parent();
    static void fork_child();
    Header* header_ = nullptr;
    Entry* entries_ = nullptr;
    std::uint64_t* free_ = nullptr;
    std::uint64_t capacity_ = 0;
    std::size_t bytes_ = 0;
};

// The key of a slot's page: "<prefix>:<instance>:<slot>:<generation>" (hexadecimal numbers).
std::string page_key(const std::string& prefix, std::uint64_t instance, std::uint64_t slot, std::uint32_t generation);
std::uint64_t random_instance();  // getrandom(2)
// A key prefix every server's protocol takes as it is: printable, no spaces, short enough that a
// key stays within memcached's 250 bytes (a command line with a space or a line break in its key
// would make the server read the page that follows as commands). Throws EINVAL naming `call`.
void check_prefix(const char* call, const std::string& prefix);

// Rendezvous (highest random weight) hashing: the `copies` servers of `candidates` with the
// highest score for `key`; a server's score for a key is fixed, so removing a server moves only
// the keys it held.
ServerMask choose_servers(std::uint64_t key, ServerMask candidates, std::size_t servers, unsigned copies);
std::uint64_t mix64(std::uint64_t x);

// A server's up/down state in this process: a server whose exchange failed after its retries is
// down, and skipped by writes until its backoff has passed (reads still try it last).
class Health {
public:
    Health(std::size_t servers, unsigned backoff_ms);
    bool usable(std::size_t server) const;  // up, or down with its backoff passed
    bool up(std::size_t server) const;
    void succeeded(std::size_t server);
    void failed(std::size_t server);
    ServerMask usable_mask() const;

private:
    struct Server {
        std::atomic<bool> up{true};
        std::atomic<std::int64_t> retry_at_ns{0};
        std::atomic<unsigned> failures{0};
    };
    std::vector<Server> servers_;
    std::int64_t backoff_ns_;
};

std::int64_t now_ns();  // CLOCK_MONOTONIC

// FarStats as atomics, shared by a store's threads.
class Counters {
public:
    std::atomic<std::uint64_t> pages_sent{0}, bytes_sent{0}, pages_received{0}, bytes_received{0}, round_trips{0},
        write_batches{0}, read_batches{0}, largest_batch{0}, retries{0}, failovers{0}, under_replicated{0},
        write_errors{0}, lost_pages{0}, keys_deleted{0};
    std::atomic<std::uint64_t> latency[FarStats::kLatencyBuckets] = {};
    void round_trip(std::int64_t ns);  // one exchange of `ns` nanoseconds
    void batch(std::size_t pages);
    FarStats snapshot() const;
};

// The sockets a store's connections hold belong to the process that opened them: a forked child
// that spoke on them would interleave its requests with its parent's on one stream. A connection
// remembers its process (a member `pid_t pid`); the child opens its own.
pid_t current_pid();

// Idle connections to one server, without a lock (a lock another thread held at fork() would stay
// held in the child): a few places, each empty or holding one connection. A connection another
// process opened (the parent, before fork) is deleted, not used: closing a socket the parent also
// holds sends nothing.
template <typename Conn, std::size_t N = 8>
class IdlePool {
public:
    IdlePool() = default;
    IdlePool(const IdlePool&) = delete;
    IdlePool& operator=(const IdlePool&) = delete;
    ~IdlePool() {
        for (auto& p : places_) delete p.exchange(nullptr);
    }
    std::unique_ptr<Conn> take() {
        const pid_t me = current_pid();
        for (auto& p : places_)
            if (Conn* c = p.exchange(nullptr, std::memory_order_acquire)) {
                if (c->pid == me) return std::unique_ptr<Conn>(c);
                delete c;
            }
        return nullptr;
    }
    // Every idle connection goes: one of them failed, and the others waited as long (a server
    // that closes idle connections, or restarted, closed them all).
    void clear() {
        for (auto& p : places_) delete p.exchange(nullptr, std::memory_order_acquire);
    }
    void give(std::unique_ptr<Conn> c) {
        for (auto& p : places_) {
            Conn* empty = nullptr;
            if (p.compare_exchange_strong(empty, c.get(), std::memory_order_release, std::memory_order_relaxed)) {
                c.release();
                return;
            }
        }
    }

private:
    std::atomic<Conn*> places_[N] = {};
};

// The keys of released slots, per server, waiting to be deleted with the next batch sent to that
// server (or at once when many wait). Its lock names the process of its holder: a child of fork()
// that finds it held by its parent's thread (which does not exist in the child) takes it, and the
// child starts with no keys to delete (they are the parent's to delete).
class DeleteQueue {
public:
    explicit DeleteQueue(std::size_t servers);
    ~DeleteQueue() { delete lists_; }
    DeleteQueue(const DeleteQueue&) = delete;
    DeleteQueue& operator=(const DeleteQueue&) = delete;
    void add(std::span<const SlotTable::Dead> dead);  // under each server that holds a copy
    std::vector<SlotTable::Dead> take(std::size_t server);
    std::size_t waiting(std::size_t server);

private:
    void lock();
    void unlock() { holder_.store(0, std::memory_order_release); }
    std::atomic<pid_t> holder_{0};
    pid_t owner_;
    std::vector<std::vector<SlotTable::Dead>>* lists_;  // replaced (the old leaked) in a child
    std::size_t servers_;
};

}  // namespace usermm::far
