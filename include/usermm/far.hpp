// Far memory: stores (include/usermm/store.hpp) that keep an arena's evicted pages in the memory of
// other machines, through servers people already run (memcached, Redis), and a compressed tier in
// memory in front of any store (the kernel's zswap). Linked as usermm::far (libusermm_far), which
// brings hiredis, lz4 and zstd; the core library does not need them.
//
// What every store here promises, beyond the Store contract:
//  - Keys never collide and never go stale. A page's key is "<prefix>:<instance>:<slot>:<generation>":
//    the instance is drawn at random when the store is made (two processes, or two stores of one
//    process, sharing servers never meet), and a slot's generation grows each time the slot is
//    handed out, so that a late write of an old page lands on a key nobody reads. A forked child
//    shares the parent's slot table (memory shared between the two), so its keys are the parent's
//    and retain() works. Keys of released slots are deleted from the servers in batches.
//  - One batch, one round trip per server: an eviction batch is a pipelined multi-set, a swap-in
//    with its readahead a pipelined multi-get, the faulting page first.
//  - Nothing is lost silently. With replicas = r each page is written to r + 1 distinct servers and
//    read from whichever answers; a write that reaches fewer servers than that (but one) is counted
//    under_replicated, a write that reaches none fails (the page stays resident and dirty, as for
//    any store error). A page none of whose servers has it any more (killed, restarted, or evicting)
//    is a read error: SIGBUS at its first touch, with a line on stderr naming the page's key and
//    servers, never a page of zeros.
//  - Servers must not evict what they hold: memcached must run with -M,
//    Redis with `maxmemory-policy noeviction` (or no maxmemory). The constructor asks each server
//    and throws if one would evict (Options::allow_eviction to accept it anyway, for a cache you
//    can afford to lose: lost pages are still SIGBUS, never zeros).
//  - The constructor throws std::system_error naming every address if no server answers.
//  - Calls block (network I/O, a lock per connection): async_signal_safe() is false, so usermm
//    calls them on its I/O thread and a faulting thread waits for its page.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <usermm/export.hpp>
#include <usermm/store.hpp>

namespace usermm {

// What a far store did, since it was made (every process sharing it counts its own calls).
struct FarStats {
    std::uint64_t pages_sent = 0;  // page copies written (a page with one replica counts 2)
    std::uint64_t bytes_sent = 0;
    std::uint64_t pages_received = 0;
    std::uint64_t bytes_received = 0;
    std::uint64_t round_trips = 0;    // exchanges with one server; a pipelined batch is one
    std::uint64_t write_batches = 0;  // write() calls
    std::uint64_t read_batches = 0;   // read() calls
    std::uint64_t largest_batch = 0;  // pages in the largest write() or read()
    std::uint64_t retries = 0;        // exchanges tried again after a connection was lost
    std::uint64_t failovers = 0;      // page reads served by a replica after another server failed
    std::uint64_t under_replicated = 0;  // pages written to fewer servers than replicas + 1
    std::uint64_t write_errors = 0;      // pages no server took
    std::uint64_t lost_pages = 0;        // page reads that found no copy
    std::uint64_t keys_deleted = 0;      // keys of released slots deleted from the servers
    // Round trips by duration: latency[0] < 1 µs, latency[i] in [2^(i-1), 2^i) µs, the last one
    // everything longer.
    static constexpr std::size_t kLatencyBuckets = 24;
    std::uint64_t latency[kLatencyBuckets] = {};
    // The round-trip time below which a fraction q of them finished (the bucket's upper bound), µs.
    std::uint64_t latency_percentile_us(double q) const;
};

// One server of a far store, as this process sees it.
struct FarServer {
    std::string address;  // "host:port"
    bool up = true;       // answered its last exchange (a server down is tried again after a backoff)
    std::uint64_t pages = 0;  // page copies it holds for the store (all processes sharing the table)
};

struct FarOptions {
    unsigned replicas = 0;  // copies of each page on other servers (at most servers - 1)
    std::uint64_t capacity = std::uint64_t(1) << 28;  // slots (pages) the store hands out at most
    std::string prefix = "usermm";  // the keys' first part: printable, no spaces or braces, 1..207 bytes
    unsigned timeout_ms = 1000;     // per exchange with a server; then the connection counts as lost
    unsigned retries = 2;           // reconnections per exchange before the server is marked down
    unsigned backoff_ms = 50;       // first wait before a retry, doubled each time; a server marked
                                    // down is tried again after 20× this
    bool allow_eviction = false;    // accept servers that may evict stored pages (see above)
};

// A pool of memcached servers ("host:port", numeric IPv4 or a name), spoken to in memcached's meta
// protocol (memcached 1.6: ms/mg/md/mn), with a page's servers chosen by rendezvous hashing over the
// servers up at the time of its write and remembered in the slot table, so that a read goes to
// where the copies are even after the pool changed. libmemcached is not used: its only pipelined
// set (buffered requests) aborts in 1.1.4 at the first set, and its replicas are placed by server
// index and looked for on a ring rebuilt after a server is ejected (README, Far memory).
class USERMM_API MemcachedStore final : public Store {
public:
    explicit MemcachedStore(std::vector<std::string> servers, FarOptions options = {});
    ~MemcachedStore() override;
    MemcachedStore(const MemcachedStore&) = delete;
    MemcachedStore& operator=(const MemcachedStore&) = delete;

    std::size_t allocate(std::span<std::uint64_t> slots) override;
    void release(std::span<const std::uint64_t> slots) override;
    int retain(std::span<const std::uint64_t> slots) override;
    void write(std::span<PageIo> pages) override;
    void read(std::span<PageIo> pages) override;
    std::uint64_t capacity() const override;
    std::string describe() const override;

    FarStats stats() const;
    std::vector<FarServer> servers() const;
    std::uint64_t slots_in_use() const;
    std::string key_of(std::uint64_t slot) const;  // the slot's current key (for diagnostics)

private:
    struct State;
    std::unique_ptr<State> state_;
};

struct RedisOptions : FarOptions {
    // The addresses are seed nodes of a Redis Cluster: the slot map is read with CLUSTER SLOTS and
    // followed on MOVED and ASK. Replication is then the cluster's (its replicas and failover):
    // replicas must be 0. Without it each address is a server of its own, pages placed as in
    // MemcachedStore.
    bool cluster = false;
    std::string password;  // AUTH before the first command, if not empty
};

// Redis (hiredis, RESP2): pipelined SET/GET/DEL per server, one round trip per batch and node.
class USERMM_API RedisStore final : public Store {
public:
    explicit RedisStore(std::vector<std::string> servers, RedisOptions options = {});
    ~RedisStore() override;
    RedisStore(const RedisStore&) = delete;
    RedisStore& operator=(const RedisStore&) = delete;

    std::size_t allocate(std::span<std::uint64_t> slots) override;
    void release(std::span<const std::uint64_t> slots) override;
    int retain(std::span<const std::uint64_t> slots) override;
    void write(std::span<PageIo> pages) override;
    void read(std::span<PageIo> pages) override;
    std::uint64_t capacity() const override;
    std::string describe() const override;

    FarStats stats() const;
    std::vector<FarServer> servers() const;  // in cluster mode, the masters of the slot map
    std::uint64_t slots_in_use() const;
    std::string key_of(std::uint64_t slot) const;

private:
    struct State;
    std::unique_ptr<State> state_;
};

enum class Codec : std::uint8_t { Lz4, Zstd };

struct CompressedOptions {
    std::uint64_t budget = 64ull << 20;  // bytes of compressed pages held in memory at most
    Codec codec = Codec::Lz4;
    int level = 0;  // the codec's level (0: its default; lz4: acceleration, zstd: level)
    // A page that does not compress below this many bytes goes to the store behind at once.
    std::size_t max_compressed = 3072;
};

// What a compressed tier holds and did.
struct CompressedStats {
    std::uint64_t stored_pages = 0;  // in the pool now (compressed, or as a tag)
    std::uint64_t same_filled = 0;   // of which kept as a tag (a page of one repeated word)
    std::uint64_t compressed_bytes = 0;  // bytes the pool's compressed pages take
    std::uint64_t pages_in = 0;          // pages written to the tier, in total
    std::uint64_t rejected = 0;          // written to the store behind at once: incompressible, or no room
                                         // in the pool after a writeback
    std::uint64_t written_back = 0;      // moved from the pool to the store behind when it was full
    std::uint64_t pool_hits = 0;         // reads served from the pool
    std::uint64_t backing_reads = 0;     // reads served by the store behind
    // Pages in the pool per byte they take (uncompressed bytes / compressed bytes; tags count 0).
    double ratio() const;
};

// A compressed pool in memory, in front of `backing` (which must outlive it): written pages are
// compressed into the pool; zero and same-filled pages cost a tag; a page that does not compress
// below max_compressed goes to `backing`; when the pool is over its budget, its oldest pages are
// written back to `backing` in one batch (zswap's writeback). The pool is private to a process:
// retain() fails (ENOTSUP), so fork() reads the tier's pages back into the arena (store.hpp).
class USERMM_API CompressedStore final : public Store {
public:
    CompressedStore(Store& backing, CompressedOptions options = {});
    ~CompressedStore() override;
    CompressedStore(const CompressedStore&) = delete;
    CompressedStore& operator=(const CompressedStore&) = delete;

    std::size_t allocate(std::span<std::uint64_t> slots) override;
    void release(std::span<const std::uint64_t> slots) override;
    int retain(std::span<const std::uint64_t> slots) override;
    void write(std::span<PageIo> pages) override;
    void read(std::span<PageIo> pages) override;
    std::uint64_t capacity() const override;
    std::string describe() const override;

    CompressedStats stats() const;

private:
    struct State;
    std::unique_ptr<State> state_;
};

}  // namespace usermm
