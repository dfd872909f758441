// RedisStore (include/usermm/far.hpp): pages as Redis strings, spoken to through hiredis (RESP2)
// in pipelines: every command of a batch for one node is appended, the whole pipeline is sent to
// every node before any reply is read, so that the nodes work at once and a batch costs one round
// trip per node. Without cluster mode each address is a server of its own and a page's copies go
// where rendezvous hashing puts them (far_common), remembered in the slot table; in cluster mode
// the node of a key is the master owning its hash slot, followed on MOVED and ASK.
#include "far_common.hpp"

#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <boost/crc.hpp>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <sched.h>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

namespace usermm {

namespace {

using far::kMaxServers;
using far::kPageBytes;
using far::ServerMask;

constexpr const char* kCall = "usermm::RedisStore";
constexpr std::size_t kHashSlots = 16384;
constexpr std::uint8_t kNoOwner = 0xff;
constexpr std::size_t kDeleteAtOnce = 256;  // dead keys of one node that are deleted without waiting for a batch
constexpr unsigned kMaxRedirects = 5;

ServerMask bit(std::size_t s) { return ServerMask(1) << s; }

struct FreeReply {
    void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, FreeReply>;

struct Conn {
    redisContext* c = nullptr;
    pid_t pid = 0;
    Conn() = default;
    Conn(const Conn&) = delete;
    Conn& operator=(const Conn&) = delete;
    ~Conn() {
        if (c) redisFree(c);  // in a forked child only the descriptor is closed: nothing is sent
    }
};

// What a failed context said, as an errno value (hiredis keeps the system call's errno in errno).
int context_errno(const redisContext* c, int saved) {
    if (!c) return ENOMEM;
    switch (c->err) {
    case REDIS_ERR_IO:
        if (saved == EAGAIN || saved == EWOULDBLOCK || saved == EINPROGRESS || saved == ETIMEDOUT) return ETIMEDOUT;
        return saved ? saved : EIO;
    case REDIS_ERR_OOM:
        return ENOMEM;
    default:
        return EIO;  // EOF (the server closed the connection), a protocol error
    }
}

std::string context_text(const redisContext* c, int err) {
    if (!c) return "out of memory";
    if (err == ETIMEDOUT && c->err == REDIS_ERR_IO) return "timed out";
    return c->errstr[0] ? c->errstr : std::strerror(err);
}

// hiredis writes with write(2): a peer that went away would kill the process with SIGPIPE. The
// signal is blocked for the write and, if it was raised by it, taken back before it is unblocked.
int flush(redisContext* c) {
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    sigset_t pending;
    sigpending(&pending);
    const bool was_pending = sigismember(&pending, SIGPIPE) == 1;
    int done = 0, rc = REDIS_OK;
    while (!done && (rc = redisBufferWrite(c, &done)) == REDIS_OK) {
    }
    const int saved = errno;
    if (rc != REDIS_OK && !was_pending) {
        const timespec zero{0, 0};
        while (sigtimedwait(&pipe_set, nullptr, &zero) == SIGPIPE) {
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    errno = saved;
    return rc;
}

void append(redisContext* c, std::initializer_list<std::string_view> args) {
    const char* argv[4];
    std::size_t lens[4];
    int n = 0;
    for (const std::string_view a : args) {
        argv[n] = a.data();
        lens[n] = a.size();
        ++n;
    }
    redisAppendCommandArgv(c, n, argv, lens);
}

// One command, waited for; null (and the context's error) if the connection failed.
Reply call(Conn& conn, std::initializer_list<std::string_view> args) {
    append(conn.c, args);
    if (flush(conn.c) != REDIS_OK) return nullptr;
    void* r = nullptr;
    if (redisGetReply(conn.c, &r) != REDIS_OK) return nullptr;
    return Reply(static_cast<redisReply*>(r));
}

std::string_view text_of(const redisReply* r) {
    return r && r->str ? std::string_view(r->str, r->len) : std::string_view();
}

std::string describe_reply(const redisReply* r) {
    switch (r->type) {
    case REDIS_REPLY_NIL: return "no such key";
    case REDIS_REPLY_ERROR: return fmt::format("-{}", text_of(r));
    case REDIS_REPLY_STATUS: return fmt::format("+{}", text_of(r));
    case REDIS_REPLY_STRING: return fmt::format("a value of {} bytes", r->len);
    case REDIS_REPLY_INTEGER: return fmt::format(":{}", r->integer);
    default: return "an unexpected reply";
    }
}

// The hash slot of a key (Redis Cluster: CRC16-XMODEM of the key, or of its {hash tag}).
std::size_t hash_slot(std::string_view key) {
    const std::size_t open = key.find('{');
    if (open != std::string_view::npos) {
        const std::size_t close = key.find('}', open + 1);
        if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
    }
    boost::crc_optimal<16, 0x1021, 0, 0, false, false> crc;
    crc.process_bytes(key.data(), key.size());
    return std::size_t(crc.checksum()) % kHashSlots;
}

// A lock whose holder is a process id: a forked child that finds it held by a thread of its parent
// (copied mid-change; that thread does not exist in the child) takes it over. What it guards is
// changed in steps that leave it consistent at each store.
class PidLock {
public:
    bool try_lock() {
        const pid_t me = far::current_pid();
        pid_t held = 0;
        if (holder_.compare_exchange_strong(held, me, std::memory_order_acquire)) return true;
        return held != me && holder_.compare_exchange_strong(held, me, std::memory_order_acquire);
    }
    void lock() {
        for (unsigned spins = 0; !try_lock(); ++spins)
            if (spins > 64) sched_yield();
    }
    void unlock() { holder_.store(0, std::memory_order_release); }

private:
    std::atomic<pid_t> holder_{0};
};

struct Node {
    far::Endpoint endpoint;
    far::IdlePool<Conn> pool;
    std::atomic<int> last_error{ECONNREFUSED};  // what a write to it fails with while it is down
};

// One command of a batch, for one node.
struct Op {
    enum class Kind : std::uint8_t { Set, Get, Del };
    Kind kind = Kind::Get;
    std::size_t node = 0;
    std::size_t page = 0;  // in the batch (Set, Get)
    std::string key;
    const void* data = nullptr;  // Set
    bool asking = false;         // ASKING first (cluster: the key is being migrated to `node`)
    unsigned redirects = 0;
    bool rerouted = false;
    bool patient = true;  // worth the retries of a lost connection (no other copy left to try)
    Reply reply;  // null if the connection failed: then err and what
    int err = 0;
    std::string what;
};

// The commands of one exchange with one node.
struct Pipeline {
    std::size_t node = 0;
    std::vector<std::size_t> ops;
    std::size_t answered = 0;  // replies read (a lost connection resends the others)
    std::unique_ptr<Conn> conn;
    bool pooled = false;  // the connection came from the pool (may have gone stale while idle)
    bool fresh_only = false;  // after a pooled connection failed: new connections only
    int err = 0;
    std::string what;
    std::int64_t started = 0;
};

std::string copies_text(unsigned replicas) {
    if (replicas == 0) return "no replicas";
    return fmt::format("{} replica{}", replicas, replicas == 1 ? "" : "s");
}

}  // namespace

struct RedisStore::State {
    RedisOptions options;
    std::vector<std::string> seeds;
    std::uint64_t instance = far::random_instance();
    far::SlotTable table;
    far::Health health;
    far::Counters counters;
    far::DeleteQueue deletes;
    // Never removed before the store goes, so that an index read once stays valid.
    std::atomic<Node*> nodes[kMaxServers] = {};
    std::atomic<std::size_t> node_count{0};
    PidLock nodes_lock;
    // Cluster mode: the node index of each hash slot's master (kNoOwner: none known).
    std::unique_ptr<std::atomic<std::uint8_t>[]> owner;
    PidLock refreshing;

    State(std::vector<std::string> servers, RedisOptions o)
        : options(std::move(o)),
          seeds(std::move(servers)),
          table(kCall, options.capacity),
          health(kMaxServers, options.backoff_ms),
          deletes(kMaxServers) {
        if (options.cluster) {
            owner = std::make_unique<std::atomic<std::uint8_t>[]>(kHashSlots);
            for (std::size_t i = 0; i < kHashSlots; ++i) owner[i].store(kNoOwner, std::memory_order_relaxed);
        }
    }

    ~State() {
        for (auto& n : nodes) delete n.load(std::memory_order_relaxed);
    }

    std::size_t count() const { return node_count.load(std::memory_order_acquire); }
    Node& node(std::size_t i) const { return *nodes[i].load(std::memory_order_acquire); }
    ServerMask all() const {
        const std::size_t n = count();
        return n >= 64 ? ~ServerMask(0) : bit(n) - 1;
    }

    // The index of the node at host:port, added if new; SIZE_MAX when the list is full.
    std::size_t find_or_add(const std::string& host, int port) {
        const auto find = [&]() -> std::size_t {
            for (std::size_t i = 0, n = count(); i < n; ++i)
                if (node(i).endpoint.port == port && node(i).endpoint.host == host) return i;
            return SIZE_MAX;
        };
        if (const std::size_t i = find(); i != SIZE_MAX) return i;
        auto fresh = std::make_unique<Node>();
        fresh->endpoint.host = host;
        fresh->endpoint.port = port;
        fresh->endpoint.text = fmt::format("{}:{}", host, port);
        nodes_lock.lock();
        std::size_t i = find();
        if (i == SIZE_MAX && count() < kMaxServers) {
            i = count();
            nodes[i].store(fresh.release(), std::memory_order_release);
            node_count.store(i + 1, std::memory_order_release);
        }
        nodes_lock.unlock();
        return i;
    }

    std::unique_ptr<Conn> connect(std::size_t index, int& err, std::string& what) {
        const Node& n = node(index);
        const timeval tv{time_t(options.timeout_ms / 1000), suseconds_t(options.timeout_ms % 1000) * 1000};
        auto conn = std::make_unique<Conn>();
        errno = 0;
        conn->c = redisConnectWithTimeout(n.endpoint.host.c_str(), n.endpoint.port, tv);
        conn->pid = far::current_pid();
        if (!conn->c || conn->c->err) {
            err = context_errno(conn->c, errno);
            what = context_text(conn->c, err);
            return nullptr;
        }
        if (redisSetTimeout(conn->c, tv) != REDIS_OK) {
            err = context_errno(conn->c, errno);
            what = context_text(conn->c, err);
            return nullptr;
        }
        if (!options.password.empty()) {
            Reply r = call(*conn, {"AUTH", options.password});
            if (!r) {
                err = context_errno(conn->c, errno);
                what = context_text(conn->c, err);
                return nullptr;
            }
            if (r->type == REDIS_REPLY_ERROR) {
                err = EACCES;
                what = fmt::format("AUTH: {}", describe_reply(r.get()));
                return nullptr;
            }
        }
        return conn;
    }

    std::size_t route(const std::string& key) const {
        const std::uint8_t o = owner[hash_slot(key)].load(std::memory_order_relaxed);
        return o == kNoOwner ? SIZE_MAX : o;
    }

    // Reads CLUSTER SLOTS from one node; "" if the map was read, else why not.
    std::string read_slot_map(std::size_t index, Conn& conn) {
        Reply r = call(conn, {"CLUSTER", "SLOTS"});
        if (!r) return context_text(conn.c, context_errno(conn.c, errno));
        if (r->type != REDIS_REPLY_ARRAY) return fmt::format("CLUSTER SLOTS: {}", describe_reply(r.get()));
        for (std::size_t e = 0; e < r->elements; ++e) {
            const redisReply* range = r->element[e];
            if (range->type != REDIS_REPLY_ARRAY || range->elements < 3) continue;
            const redisReply* master = range->element[2];
            if (range->element[0]->type != REDIS_REPLY_INTEGER || range->element[1]->type != REDIS_REPLY_INTEGER ||
                master->type != REDIS_REPLY_ARRAY || master->elements < 2 ||
                master->element[1]->type != REDIS_REPLY_INTEGER)
                continue;
            // An empty or "?" host is the node we asked, by the address we used.
            std::string host(text_of(master->element[0]));
            if (host.empty() || host == "?") host = node(index).endpoint.host;
            const std::size_t at = find_or_add(host, int(master->element[1]->integer));
            if (at == SIZE_MAX) continue;
            const long long first = range->element[0]->integer, last = range->element[1]->integer;
            for (long long s = std::max(first, 0ll); s <= last && s < static_cast<long long>(kHashSlots); ++s)
                owner[std::size_t(s)].store(std::uint8_t(at), std::memory_order_relaxed);
        }
        return {};
    }

    // The slot map again, from the first node that answers (usable ones first). One thread at a
    // time; the others go on with the map as it is.
    void refresh_slot_map() {
        if (!refreshing.try_lock()) return;
        for (int pass = 0; pass < 2; ++pass)
            for (std::size_t i = 0, n = count(); i < n; ++i) {
                if (health.usable(i) != (pass == 0)) continue;
                std::unique_ptr<Conn> conn = node(i).pool.take();
                int err = 0;
                std::string what;
                if (!conn) conn = connect(i, err, what);
                if (!conn) continue;
                if (read_slot_map(i, *conn).empty()) {
                    node(i).pool.give(std::move(conn));
                    refreshing.unlock();
                    return;
                }
            }
        refreshing.unlock();
    }

    bool send(Pipeline& p, const std::vector<Op>& ops) {
        if (!p.conn) {
            if (!p.fresh_only) p.conn = node(p.node).pool.take();
            p.pooled = p.conn != nullptr;
            if (!p.conn) p.conn = connect(p.node, p.err, p.what);
            if (!p.conn) return false;
        }
        redisContext* c = p.conn->c;
        for (std::size_t k = p.answered; k < p.ops.size(); ++k) {
            const Op& op = ops[p.ops[k]];
            if (op.asking) append(c, {"ASKING"});
            switch (op.kind) {
            case Op::Kind::Set:
                append(c, {"SET", op.key, std::string_view(static_cast<const char*>(op.data), kPageBytes)});
                break;
            case Op::Kind::Get: append(c, {"GET", op.key}); break;
            case Op::Kind::Del: append(c, {"DEL", op.key}); break;
            }
        }
        if (flush(c) == REDIS_OK) return true;
        lost(p);
        return false;
    }

    bool receive(Pipeline& p, std::vector<Op>& ops) {
        redisContext* c = p.conn->c;
        for (; p.answered < p.ops.size(); ++p.answered) {
            Op& op = ops[p.ops[p.answered]];
            void* r = nullptr;
            if (op.asking) {
                if (redisGetReply(c, &r) != REDIS_OK) break;
                freeReplyObject(r);
                r = nullptr;
            }
            if (redisGetReply(c, &r) != REDIS_OK) break;
            op.reply.reset(static_cast<redisReply*>(r));
        }
        if (p.answered == p.ops.size()) return true;
        lost(p);
        return false;
    }

    void lost(Pipeline& p) {
        p.err = context_errno(p.conn->c, errno);
        p.what = context_text(p.conn->c, p.err);
        p.conn.reset();
    }

    // Every pipeline sent before any reply is read; a lost connection is tried again (up to
    // `retries` times, with a doubling backoff) and then the node is marked down.
    void run(std::vector<Pipeline>& pipes, std::vector<Op>& ops, bool patient) {
        std::vector<char> ok(pipes.size());
        for (std::size_t i = 0; i < pipes.size(); ++i) {
            pipes[i].started = far::now_ns();
            ok[i] = send(pipes[i], ops);
        }
        for (std::size_t i = 0; i < pipes.size(); ++i)
            if (ok[i]) ok[i] = receive(pipes[i], ops);
        for (std::size_t i = 0; i < pipes.size(); ++i) {
            Pipeline& p = pipes[i];
            // A connection that waited in the pool may have been closed by a server restarted since:
            // a fresh one at once, not a retry.
            if (!ok[i] && p.pooled) {
                p.pooled = false;
                p.fresh_only = true;  // retries too: another pooled connection may be as stale
                node(p.node).pool.clear();
                ok[i] = send(p, ops) && receive(p, ops);
            }
            p.fresh_only = true;
            const bool worth = patient && std::any_of(p.ops.begin(), p.ops.end(), [&](std::size_t k) { return ops[k].patient; });
            const unsigned retries = worth && health.up(p.node) ? options.retries : 0;
            for (unsigned a = 0; !ok[i] && a < retries; ++a) {
                counters.retries.fetch_add(1, std::memory_order_relaxed);
                std::this_thread::sleep_for(std::chrono::milliseconds(std::uint64_t(options.backoff_ms) << a));
                ok[i] = send(p, ops) && receive(p, ops);
            }
            Node& n = node(p.node);
            if (ok[i]) {
                counters.round_trip(far::now_ns() - p.started);
                health.succeeded(p.node);
                n.pool.give(std::move(p.conn));
                continue;
            }
            health.failed(p.node);
            n.last_error.store(p.err, std::memory_order_relaxed);
            for (std::size_t k = p.answered; k < p.ops.size(); ++k) {
                Op& op = ops[p.ops[k]];
                op.reply.reset();
                op.err = p.err;
                op.what = p.what;
            }
        }
    }

    // Sends `ops` (each to its node), following MOVED and ASK in cluster mode; each op ends with a
    // reply that is not a redirection, or with the error of its node's connection.
    void exchange(std::vector<Op>& ops, bool patient = true) {
        std::vector<std::size_t> pending(ops.size());
        for (std::size_t i = 0; i < ops.size(); ++i) pending[i] = i;
        for (unsigned round = 0; !pending.empty() && round <= kMaxRedirects; ++round) {
            std::vector<Pipeline> pipes;
            for (const std::size_t i : pending) {
                Op& op = ops[i];
                op.reply.reset();
                op.err = 0;
                op.what.clear();
                if (op.node == SIZE_MAX) {
                    op.err = EIO;
                    op.what = "no node serves the key's hash slot";
                    continue;
                }
                auto p = std::find_if(pipes.begin(), pipes.end(), [&](const Pipeline& x) { return x.node == op.node; });
                if (p == pipes.end()) {
                    pipes.emplace_back();
                    p = pipes.end() - 1;
                    p->node = op.node;
                }
                p->ops.push_back(i);
            }
            run(pipes, ops, patient);
            pending.clear();
            if (!options.cluster) break;
            bool moved = false;
            for (const Pipeline& p : pipes)
                for (const std::size_t i : p.ops) {
                    Op& op = ops[i];
                    if (!op.reply) {
                        if (op.rerouted) continue;
                        // The master may have failed over to a replica: the map again, once.
                        refresh_slot_map();
                        const std::size_t to = route(op.key);
                        if (to != SIZE_MAX && to != op.node) {
                            op.node = to;
                            op.rerouted = true;
                            pending.push_back(i);
                        }
                        continue;
                    }
                    if (op.reply->type != REDIS_REPLY_ERROR || op.redirects >= kMaxRedirects) continue;
                    const std::string_view e = text_of(op.reply.get());
                    const bool is_moved = e.starts_with("MOVED "), is_ask = e.starts_with("ASK ");
                    if (!is_moved && !is_ask) continue;
                    // "MOVED <slot> <host>:<port>"
                    const std::size_t space = e.rfind(' ');
                    const std::string_view target = e.substr(space + 1);
                    const std::size_t colon = target.rfind(':');
                    int port = 0;
                    if (colon == std::string_view::npos ||
                        std::from_chars(target.data() + colon + 1, target.data() + target.size(), port).ec != std::errc())
                        continue;
                    std::string host(target.substr(0, colon));
                    if (host.empty()) host = node(op.node).endpoint.host;
                    const std::size_t to = find_or_add(host, port);
                    if (to == SIZE_MAX) continue;
                    if (is_moved) {
                        owner[hash_slot(op.key)].store(std::uint8_t(to), std::memory_order_relaxed);
                        moved = true;
                    }
                    op.node = to;
                    op.asking = is_ask;
                    ++op.redirects;
                    pending.push_back(i);
                }
            if (moved) refresh_slot_map();
        }
    }

    // Dead keys waiting for the nodes of `from` (or, with `urgent`, only those with many
    // waiting) as DEL commands; in cluster mode sent to the key's master now.
    void take_deletes(ServerMask from, std::vector<Op>& ops, bool urgent) {
        for (ServerMask m = from; m; m &= m - 1) {
            const std::size_t s = std::size_t(std::countr_zero(m));
            if (urgent ? deletes.waiting(s) < kDeleteAtOnce : deletes.waiting(s) == 0) continue;
            for (const far::SlotTable::Dead& d : deletes.take(s)) {
                Op op;
                op.kind = Op::Kind::Del;
                op.key = far::page_key(options.prefix, instance, d.slot, d.generation);
                op.node = options.cluster ? route(op.key) : s;
                ops.push_back(std::move(op));
            }
        }
    }

    void count_deletes(const std::vector<Op>& ops) {
        for (const Op& op : ops)
            if (op.kind == Op::Kind::Del && op.reply && op.reply->type == REDIS_REPLY_INTEGER && op.reply->integer > 0)
                counters.keys_deleted.fetch_add(std::uint64_t(op.reply->integer), std::memory_order_relaxed);
    }

    void write(std::span<PageIo> pages);
    void write_cluster(std::span<PageIo> pages);
    void read(std::span<PageIo> pages);
    void read_cluster(std::span<PageIo> pages);
    void lost_page(PageIo& io, const std::string& key, const std::string& tried, int err);
    std::string key_of(std::uint64_t slot) const {
        return far::page_key(options.prefix, instance, slot, table.generation(slot));
    }
    void check_eviction(std::size_t index, Conn& conn);
};

// A page refused by a server for lack of memory is ENOSPC (the store is full there).
namespace {
int refusal_errno(const redisReply* r) { return text_of(r).starts_with("OOM") ? ENOSPC : EIO; }
}  // namespace

void RedisStore::State::write(std::span<PageIo> pages) {
    const std::size_t n = count();
    const unsigned copies = options.replicas + 1;
    struct Page {
        std::string key;
        std::uint64_t place = 0;
        ServerMask have = 0, tried = 0, want = 0;
        int err = 0;
    };
    std::vector<Page> ps(pages.size());
    const ServerMask usable = health.usable_mask() & all();
    for (std::size_t i = 0; i < pages.size(); ++i) {
        ps[i].key = key_of(pages[i].slot);
        ps[i].place = far::mix64(instance ^ far::mix64(pages[i].slot));
        ps[i].want = far::choose_servers(ps[i].place, usable, n, copies);
    }
    for (std::size_t round = 0; round < n; ++round) {
        std::vector<Op> ops;
        ServerMask involved = 0;
        for (std::size_t i = 0; i < pages.size(); ++i)
            for (ServerMask m = ps[i].want; m; m &= m - 1) {
                Op op;
                op.kind = Op::Kind::Set;
                op.node = std::size_t(std::countr_zero(m));
                op.page = i;
                op.key = ps[i].key;
                op.data = pages[i].data;
                ops.push_back(std::move(op));
                involved |= bit(op.node);
            }
        if (ops.empty()) break;
        if (round == 0) take_deletes(involved, ops, false);
        exchange(ops);
        count_deletes(ops);
        for (Page& p : ps) {
            p.tried |= p.want;
            p.want = 0;
        }
        for (const Op& op : ops) {
            if (op.kind != Op::Kind::Set) continue;
            Page& p = ps[op.page];
            if (op.reply && op.reply->type == REDIS_REPLY_STATUS) {
                p.have |= bit(op.node);
                counters.pages_sent.fetch_add(1, std::memory_order_relaxed);
                counters.bytes_sent.fetch_add(kPageBytes, std::memory_order_relaxed);
            } else if (op.reply) {
                p.err = refusal_errno(op.reply.get());
            } else if (p.err != ENOSPC) {
                p.err = op.err;
            }
        }
        // A copy refused goes to another server up that does not hold one yet.
        const ServerMask now_usable = health.usable_mask() & all();
        bool more = false;
        for (Page& p : ps) {
            const unsigned held = unsigned(std::popcount(p.have));
            if (held >= copies) continue;
            p.want = far::choose_servers(p.place, now_usable & ~p.tried, n, copies - held);
            more |= p.want != 0;
        }
        if (!more) break;
    }
    for (std::size_t i = 0; i < pages.size(); ++i) {
        Page& p = ps[i];
        if (p.have) {
            table.set_where(pages[i].slot, p.have);
            pages[i].error = 0;
            if (unsigned(std::popcount(p.have)) < copies)
                counters.under_replicated.fetch_add(1, std::memory_order_relaxed);
            continue;
        }
        if (!p.err) {  // no server usable to try: what the last one said
            const ServerMask u = far::choose_servers(p.place, all(), n, 1);
            p.err = u ? node(std::size_t(std::countr_zero(u))).last_error.load(std::memory_order_relaxed) : EIO;
        }
        pages[i].error = p.err;
        counters.write_errors.fetch_add(1, std::memory_order_relaxed);
    }
}

void RedisStore::State::write_cluster(std::span<PageIo> pages) {
    std::vector<Op> ops;
    for (std::size_t i = 0; i < pages.size(); ++i) {
        Op op;
        op.kind = Op::Kind::Set;
        op.page = i;
        op.key = key_of(pages[i].slot);
        op.node = route(op.key);
        op.data = pages[i].data;
        ops.push_back(std::move(op));
    }
    take_deletes(all(), ops, false);
    exchange(ops);
    count_deletes(ops);
    for (const Op& op : ops) {
        if (op.kind != Op::Kind::Set) continue;
        PageIo& io = pages[op.page];
        if (op.reply && op.reply->type == REDIS_REPLY_STATUS) {
            table.set_where(io.slot, bit(op.node));
            io.error = 0;
            counters.pages_sent.fetch_add(1, std::memory_order_relaxed);
            counters.bytes_sent.fetch_add(kPageBytes, std::memory_order_relaxed);
            continue;
        }
        io.error = op.reply ? refusal_errno(op.reply.get()) : op.err ? op.err : EIO;
        counters.write_errors.fetch_add(1, std::memory_order_relaxed);
    }
}

void RedisStore::State::lost_page(PageIo& io, const std::string& key, const std::string& tried, int err) {
    io.error = err;
    counters.lost_pages.fetch_add(1, std::memory_order_relaxed);
    // The line beside usermm's SIGBUS: which page is gone and what each server said.
    std::fprintf(stderr, "%s\n",
                 fmt::format("{}: page lost: key {} (slot {}): {}", kCall, key, io.slot, tried).c_str());
}

void RedisStore::State::read(std::span<PageIo> pages) {
    const std::size_t n = count();
    struct Page {
        std::string key;
        std::vector<std::size_t> order;  // the servers holding a copy, in the order they are tried
        std::size_t next = 0;
        std::string tried;
        bool nil = false, bad_length = false;
        int err = 0;
        bool done = false;
    };
    std::vector<Page> ps(pages.size());
    const ServerMask usable = health.usable_mask();
    for (std::size_t i = 0; i < pages.size(); ++i) {
        Page& p = ps[i];
        p.key = key_of(pages[i].slot);
        const std::uint64_t place = far::mix64(instance ^ far::mix64(pages[i].slot));
        const ServerMask where = table.where(pages[i].slot) & all();
        for (const ServerMask part : {where & usable, where & ~usable})
            for (ServerMask left = part; left;) {
                const ServerMask first = far::choose_servers(place, left, n, 1);
                p.order.push_back(std::size_t(std::countr_zero(first)));
                left &= ~first;
            }
        if (p.order.empty()) {
            p.done = true;
            lost_page(pages[i], p.key, "no server holds a copy", ENODATA);
        }
    }
    for (std::size_t round = 0; round < n; ++round) {
        std::vector<Op> ops;
        for (std::size_t i = 0; i < pages.size(); ++i) {  // the faulting page first
            if (ps[i].done) continue;
            Op op;
            op.kind = Op::Kind::Get;
            op.page = i;
            op.node = ps[i].order[ps[i].next];
            op.key = ps[i].key;
            // A page with a copy left elsewhere need not wait for retries of a server that failed.
            op.patient = ps[i].next + 1 == ps[i].order.size();
            ops.push_back(std::move(op));
        }
        if (ops.empty()) break;
        exchange(ops);
        for (const Op& op : ops) {
            Page& p = ps[op.page];
            PageIo& io = pages[op.page];
            const std::string& server = node(op.node).endpoint.text;
            const redisReply* r = op.reply.get();
            if (r && r->type == REDIS_REPLY_STRING && r->len == kPageBytes) {
                std::memcpy(io.data, r->str, kPageBytes);
                io.error = 0;
                p.done = true;
                counters.pages_received.fetch_add(1, std::memory_order_relaxed);
                counters.bytes_received.fetch_add(kPageBytes, std::memory_order_relaxed);
                if (p.next > 0) counters.failovers.fetch_add(1, std::memory_order_relaxed);
                continue;
            }
            if (!p.tried.empty()) p.tried += "; ";
            if (r) {
                p.tried += fmt::format("{} answered {}", server, describe_reply(r));
                if (r->type == REDIS_REPLY_NIL)
                    p.nil = true;
                else if (r->type == REDIS_REPLY_STRING)
                    p.bad_length = true;
                else
                    p.err = EIO;
            } else {
                p.tried += fmt::format("{}: {}", server, op.what);
                p.err = op.err;
            }
            if (++p.next == p.order.size()) {
                p.done = true;
                lost_page(io, p.key, p.tried, p.bad_length ? EIO : p.nil ? ENODATA : p.err ? p.err : EIO);
            }
        }
    }
}

void RedisStore::State::read_cluster(std::span<PageIo> pages) {
    std::vector<Op> ops;
    for (std::size_t i = 0; i < pages.size(); ++i) {
        Op op;
        op.kind = Op::Kind::Get;
        op.page = i;
        op.key = key_of(pages[i].slot);
        op.node = route(op.key);
        ops.push_back(std::move(op));
    }
    exchange(ops);
    for (const Op& op : ops) {
        PageIo& io = pages[op.page];
        const redisReply* r = op.reply.get();
        if (r && r->type == REDIS_REPLY_STRING && r->len == kPageBytes) {
            std::memcpy(io.data, r->str, kPageBytes);
            io.error = 0;
            counters.pages_received.fetch_add(1, std::memory_order_relaxed);
            counters.bytes_received.fetch_add(kPageBytes, std::memory_order_relaxed);
            continue;
        }
        const std::string server = op.node == SIZE_MAX ? "(no master)" : node(op.node).endpoint.text;
        if (r)
            lost_page(io, op.key, fmt::format("{} answered {}", server, describe_reply(r)),
                      r->type == REDIS_REPLY_NIL ? ENODATA : EIO);
        else
            lost_page(io, op.key, fmt::format("{}: {}", server, op.what), op.err ? op.err : EIO);
    }
}

void RedisStore::State::check_eviction(std::size_t index, Conn& conn) {
    const std::string& address = node(index).endpoint.text;
    Reply policy = call(conn, {"CONFIG", "GET", "maxmemory-policy"});
    Reply limit = policy ? call(conn, {"CONFIG", "GET", "maxmemory"}) : nullptr;
    const auto value = [](const Reply& r) -> const redisReply* {
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->element[1]->type != REDIS_REPLY_STRING)
            return nullptr;
        return r->element[1];
    };
    if (!policy || !limit)
        far::fail(EIO, "{}: {} closed the connection while asked for its eviction policy ({})", kCall, address,
                  context_text(conn.c, context_errno(conn.c, errno)));
    // Every command would be refused the same way: a setting to fix, not a server down.
    if (policy->type == REDIS_REPLY_ERROR && text_of(policy.get()).starts_with("NOAUTH"))
        far::fail(EACCES, "{}: {} requires a password (RedisOptions::password): {}", kCall, address,
                  describe_reply(policy.get()));
    const redisReply* p = value(policy);
    const redisReply* l = value(limit);
    if (!p || !l) {
        const Reply& bad = !p ? policy : limit;
        std::fprintf(stderr, "%s\n",
                     fmt::format("{}: cannot check whether {} evicts keys (CONFIG GET: {}); an evicted page would be "
                                 "lost: it must run with maxmemory-policy noeviction",
                                 kCall, address, describe_reply(bad.get()))
                         .c_str());
        return;
    }
    const std::string_view policy_text = text_of(p), limit_text = text_of(l);
    if (limit_text != "0" && policy_text != "noeviction" && !options.allow_eviction)
        far::fail(EINVAL,
                  "{}: {} runs with maxmemory {} and maxmemory-policy {}: it would evict stored pages, which would be "
                  "lost; run it with maxmemory-policy noeviction (or set allow_eviction)",
                  kCall, address, limit_text, policy_text);
}

RedisStore::RedisStore(std::vector<std::string> servers, RedisOptions options) {
    if (servers.empty() || servers.size() > kMaxServers)
        far::fail(EINVAL, "{}: {} server addresses, not 1..{}", kCall, servers.size(), kMaxServers);
    if (options.cluster && options.replicas != 0)
        far::fail(EINVAL, "{}: replicas = {} in cluster mode, where the cluster's replicas keep the copies", kCall,
                  options.replicas);
    if (!options.cluster && options.replicas >= servers.size())
        far::fail(EINVAL, "{}: replicas = {} needs more than {} server{}", kCall, options.replicas, servers.size(),
                  servers.size() == 1 ? "" : "s");
    far::check_prefix(kCall, options.prefix);
    std::vector<far::Endpoint> endpoints;
    for (const std::string& s : servers) endpoints.push_back(far::parse_endpoint(kCall, s));
    state_ = std::make_unique<State>(std::move(servers), std::move(options));
    State& st = *state_;
    for (const far::Endpoint& e : endpoints) {
        auto fresh = std::make_unique<Node>();
        fresh->endpoint = e;
        const std::size_t i = st.count();
        st.nodes[i].store(fresh.release(), std::memory_order_release);
        st.node_count.store(i + 1, std::memory_order_release);
    }
    std::string said;
    bool answered = false, mapped = false, refused_map = false;
    int common = 0;  // the errno every server failed with, or -1 if they differ
    for (std::size_t i = 0; i < endpoints.size(); ++i) {
        int err = 0;
        std::string what;
        std::unique_ptr<Conn> conn = st.connect(i, err, what);
        if (conn && st.options.cluster && !mapped) {
            what = st.read_slot_map(i, *conn);
            mapped = what.empty();
            refused_map |= !mapped;
            if (!mapped) conn.reset();
        }
        if (!conn) {
            st.health.failed(i);
            st.node(i).last_error.store(err ? err : EIO, std::memory_order_relaxed);
            common = common == 0 || common == err ? err : -1;
            said += fmt::format("{}{}: {}", said.empty() ? "" : "; ", endpoints[i].text, what);
            continue;
        }
        answered = true;
        if (!st.options.cluster) st.check_eviction(i, *conn);
        st.node(i).pool.give(std::move(conn));
        if (st.options.cluster) break;  // the masters are checked below
    }
    if (!answered)
        far::fail(refused_map ? EINVAL : common > 0 ? common : ECONNREFUSED, "{}: no {} answered ({})", kCall,
                  st.options.cluster ? "cluster seed" : "server", said);
    if (st.options.cluster) {
        ServerMask masters = 0;
        for (std::size_t s = 0; s < kHashSlots; ++s)
            if (const std::uint8_t o = st.owner[s].load(std::memory_order_relaxed); o != kNoOwner) masters |= bit(o);
        for (ServerMask m = masters; m; m &= m - 1) {
            const std::size_t i = std::size_t(std::countr_zero(m));
            int err = 0;
            std::string what;
            std::unique_ptr<Conn> conn = st.node(i).pool.take();
            if (!conn) conn = st.connect(i, err, what);
            if (!conn) {
                st.health.failed(i);
                std::fprintf(stderr, "%s\n",
                             fmt::format("{}: cluster master {} does not answer ({})", kCall,
                                         st.node(i).endpoint.text, what)
                                 .c_str());
                continue;
            }
            st.check_eviction(i, *conn);
            st.node(i).pool.give(std::move(conn));
        }
    }
}

RedisStore::~RedisStore() {
    if (!state_) return;
    // The keys of slots released since the last batch, and of the slots children that are gone
    // still held if this is the table's last process; best effort: one attempt per node up.
    try {
        State& st = *state_;
        std::vector<far::SlotTable::Dead> dead;
        if (st.table.last_user(dead)) st.deletes.add(dead);
        std::vector<Op> ops;
        st.take_deletes(st.health.usable_mask() & st.all(), ops, false);
        if (!ops.empty()) {
            st.exchange(ops, false);
            st.count_deletes(ops);
        }
    } catch (...) {
    }
}

std::size_t RedisStore::allocate(std::span<std::uint64_t> slots) { return state_->table.allocate(slots); }

void RedisStore::release(std::span<const std::uint64_t> slots) {
    State& st = *state_;
    try {
        std::vector<far::SlotTable::Dead> dead;
        st.table.release(slots, dead);
        if (dead.empty()) return;
        st.deletes.add(dead);
        std::vector<Op> ops;
        st.take_deletes(st.all(), ops, true);
        if (!ops.empty()) {
            st.exchange(ops);
            st.count_deletes(ops);
        }
    } catch (...) {
        // Out of memory: the keys stay on the servers (a late delete costs space, never a page).
    }
}

int RedisStore::retain(std::span<const std::uint64_t> slots) {
    try {
        return state_->table.retain(slots);
    } catch (...) {
        return ENOMEM;
    }
}

void RedisStore::write(std::span<PageIo> pages) {
    State& st = *state_;
    st.counters.write_batches.fetch_add(1, std::memory_order_relaxed);
    st.counters.batch(pages.size());
    for (PageIo& io : pages) io.error = EIO;  // until a server took it
    try {
        if (st.options.cluster)
            st.write_cluster(pages);
        else
            st.write(pages);
    } catch (const std::bad_alloc&) {
        for (PageIo& io : pages)
            if (io.error == EIO) io.error = ENOMEM;
    } catch (...) {
    }
}

void RedisStore::read(std::span<PageIo> pages) {
    State& st = *state_;
    st.counters.read_batches.fetch_add(1, std::memory_order_relaxed);
    st.counters.batch(pages.size());
    for (PageIo& io : pages) io.error = EIO;
    try {
        if (st.options.cluster)
            st.read_cluster(pages);
        else
            st.read(pages);
    } catch (const std::bad_alloc&) {
        for (PageIo& io : pages)
            if (io.error == EIO) io.error = ENOMEM;
    } catch (...) {
    }
}

std::uint64_t RedisStore::capacity() const { return state_->options.capacity; }

std::string RedisStore::describe() const {
    const State& st = *state_;
    if (st.options.cluster) {
        const std::size_t masters = servers().size();
        return fmt::format("Redis Cluster via {} ({} master{})", st.seeds.front(), masters, masters == 1 ? "" : "s");
    }
    std::string list;
    for (const std::string& s : st.seeds) list += (list.empty() ? "" : ",") + s;
    return fmt::format("Redis {} ({})", list, copies_text(st.options.replicas));
}

FarStats RedisStore::stats() const { return state_->counters.snapshot(); }

std::vector<FarServer> RedisStore::servers() const {
    const State& st = *state_;
    ServerMask shown = st.all();
    if (st.options.cluster) {
        shown = 0;
        for (std::size_t s = 0; s < kHashSlots; ++s)
            if (const std::uint8_t o = st.owner[s].load(std::memory_order_relaxed); o != kNoOwner) shown |= bit(o);
    }
    std::vector<FarServer> out;
    for (ServerMask m = shown; m; m &= m - 1) {
        const std::size_t i = std::size_t(std::countr_zero(m));
        out.push_back({st.node(i).endpoint.text, st.health.up(i), st.table.copies_on(i)});
    }
    return out;
}

std::uint64_t RedisStore::slots_in_use() const { return state_->table.in_use(); }

std::string RedisStore::key_of(std::uint64_t slot) const { return state_->key_of(slot); }

}  // namespace usermm
