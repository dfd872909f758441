// MemcachedStore (include/usermm/far.hpp): pages on a pool of memcached servers, in memcached's meta
// protocol over TCP. A batch is one pipeline per server: every request is sent to every server
// first, then every server's replies are read, in the order of the requests (meta commands answer
// in order), so the servers work at once and a batch costs one round trip.
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string_view>

#include "far_common.hpp"

namespace usermm {

namespace {

using far::Endpoint;
using far::ServerMask;
using far::SlotTable;
using far::kPageBytes;

// One TCP connection to a server, with a deadline on every exchange: a server that stops answering
// costs the exchange's timeout, then counts as lost.
struct Conn {
    int fd = -1;
    pid_t pid = far::current_pid();
    std::string in;  // received, not yet consumed from `pos`
    std::size_t pos = 0;

    Conn() = default;
    Conn(const Conn&) = delete;
    Conn& operator=(const Conn&) = delete;
    ~Conn() {
        if (fd >= 0) close(fd);
    }

    static int wait(int fd, short events, std::int64_t deadline) {
        for (;;) {
            const std::int64_t left = (deadline - far::now_ns()) / 1'000'000;
            if (left < 0) return ETIMEDOUT;
            pollfd p{fd, events, 0};
            const int n = poll(&p, 1, int(std::min<std::int64_t>(left + 1, 1 << 30)));
            if (n > 0) return (p.revents & (POLLERR | POLLNVAL)) ? ECONNRESET : 0;
            if (n == 0) return ETIMEDOUT;
            if (errno != EINTR) return errno;
        }
    }

    int open(const Endpoint& e, std::int64_t deadline) {
        addrinfo hints{};
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        addrinfo* list = nullptr;
        const std::string port = std::to_string(e.port);
        if (getaddrinfo(e.host.c_str(), port.c_str(), &hints, &list) != 0 || !list) return EHOSTUNREACH;
        int err = ECONNREFUSED;
        for (addrinfo* a = list; a; a = a->ai_next) {
            fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
            if (fd < 0) {
                err = errno;
                continue;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // a page read is one small request
            if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
            err = errno;
            if (err == EINPROGRESS && (err = wait(fd, POLLOUT, deadline)) == 0) {
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err == 0) break;
            }
            close(fd);
            fd = -1;
        }
        freeaddrinfo(list);
        return fd >= 0 ? 0 : err;
    }

    int send(std::vector<iovec>& iov, std::int64_t deadline) {
        std::size_t i = 0;
        while (i < iov.size()) {
            msghdr m{};
            m.msg_iov = &iov[i];
            m.msg_iovlen = std::min<std::size_t>(iov.size() - i, IOV_MAX);
            const ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN) return errno;
                if (const int err = wait(fd, POLLOUT, deadline)) return err;
                continue;
            }
            for (std::size_t done = std::size_t(n); done;) {
                const std::size_t k = std::min(done, iov[i].iov_len);
                iov[i].iov_base = static_cast<char*>(iov[i].iov_base) + k;
                iov[i].iov_len -= k;
                done -= k;
                if (iov[i].iov_len == 0) ++i;
            }
            while (i < iov.size() && iov[i].iov_len == 0) ++i;
        }
        return 0;
    }

    int fill(std::int64_t deadline) {
        if (pos > 0 && pos == in.size()) {
            in.clear();
            pos = 0;
        }
        char buf[64 << 10];
        // Called when what is buffered does not hold the reply: the reply is usually still on its
        // way, so wait for it first rather than try a recv that would find nothing.
        if (const int err = wait(fd, POLLIN, deadline)) return err;
        for (;;) {
            const ssize_t n = recv(fd, buf, sizeof buf, 0);
            if (n > 0) {
                in.append(buf, std::size_t(n));
                return 0;
            }
            if (n == 0) return ECONNRESET;
            if (errno == EINTR) continue;
            if (errno != EAGAIN) return errno;
            if (const int err = wait(fd, POLLIN, deadline)) return err;
        }
    }

    // A reply line without its "\r\n", valid until the next call.
    int line(std::string_view* out, std::int64_t deadline) {
        for (;;) {
            const std::size_t end = in.find("\r\n", pos);
            if (end != std::string::npos) {
                *out = std::string_view(in).substr(pos, end - pos);
                pos = end + 2;
                return 0;
            }
            if (const int err = fill(deadline)) return err;
        }
    }

    // `n` bytes of value and the "\r\n" after them, into `to` (nullptr: skipped).
    int value(void* to, std::size_t n, std::int64_t deadline) {
        while (in.size() - pos < n + 2)
            if (const int err = fill(deadline)) return err;
        if (to) std::memcpy(to, in.data() + pos, n);
        if (in.compare(pos + n, 2, "\r\n") != 0) return EPROTO;
        pos += n + 2;
        return 0;
    }
};

// What a server said to one request of a pipeline.
enum class Reply : std::uint8_t { Stored, NotStored, Value, Miss, Deleted, Error };

bool starts(std::string_view line, std::string_view prefix) { return line.substr(0, prefix.size()) == prefix; }

}  // namespace

struct MemcachedStore::State {
    static constexpr const char* kCall = "usermm::MemcachedStore";
    // Requests in flight per connection at most: a server's replies to gets (a page each) wait in
    // the socket's buffers while requests are still being sent, and a server whose replies cannot
    // be written stops reading; 64 pages of replies fit the buffers loopback and LANs give.
    static constexpr std::size_t kWindow = 64;
    // Deletes waiting for one server that are sent at once instead of with the next batch.
    static constexpr std::size_t kDeleteBatch = 256;

    // One request of a pipeline: its command line, a set's value or a get's buffer, and the reply.
    struct Request {
        std::string head;  // "\r\n" included
        const void* data = nullptr;
        void* into = nullptr;
        std::size_t page = SIZE_MAX;  // index in the caller's batch; SIZE_MAX: a delete
        Reply reply = Reply::Error;
        int error = 0;
    };

    std::vector<Endpoint> servers;
    FarOptions options;
    std::uint64_t instance = far::random_instance();
    SlotTable table;
    far::Health health;
    far::Counters counters;
    far::DeleteQueue deletes;
    std::vector<std::unique_ptr<far::IdlePool<Conn>>> idle;

    State(std::vector<Endpoint> s, FarOptions o)
        : servers(std::move(s)), options(std::move(o)), table(kCall, options.capacity),
          health(servers.size(), options.backoff_ms), deletes(servers.size()) {
        for (std::size_t i = 0; i < servers.size(); ++i) idle.push_back(std::make_unique<far::IdlePool<Conn>>());
    }

    std::int64_t deadline() const { return far::now_ns() + std::int64_t(options.timeout_ms) * 1'000'000; }
    std::string key(std::uint64_t slot, std::uint32_t generation) const {
        return far::page_key(options.prefix, instance, slot, generation);
    }
    std::uint64_t placement_key(std::uint64_t slot, std::uint32_t generation) const {
        return far::mix64(instance ^ far::mix64(slot) ^ (std::uint64_t(generation) << 40));
    }
    unsigned copies() const { return std::min<unsigned>(options.replicas + 1, unsigned(servers.size())); }
    ServerMask all() const { return servers.size() == 64 ? ~ServerMask(0) : (ServerMask(1) << servers.size()) - 1; }

    // The servers of `mask` in rendezvous order for `pk`, the ones up first.
    std::vector<std::size_t> ranked(std::uint64_t pk, ServerMask mask) const {
        std::vector<std::size_t> out;
        for (ServerMask m = mask; m; m &= m - 1) out.push_back(std::size_t(std::countr_zero(m)));
        const ServerMask usable = health.usable_mask();  // one look: the comparator must not change its mind
        std::sort(out.begin(), out.end(), [&](std::size_t a, std::size_t b) {
            const bool ua = usable >> a & 1, ub = usable >> b & 1;
            if (ua != ub) return ua;
            return far::mix64(pk ^ far::mix64(a + 1)) > far::mix64(pk ^ far::mix64(b + 1));
        });
        return out;
    }

    // An idle connection, or a new one; `fresh`: a new one (a retry: the idle ones may be stale).
    int connect(std::size_t s, std::unique_ptr<Conn>* out, bool fresh = false) {
        if (!fresh && (*out = idle[s]->take())) return 0;
        auto c = std::make_unique<Conn>();
        if (const int err = c->open(servers[s], deadline())) return err;
        *out = std::move(c);
        return 0;
    }

    static int send(Conn& c, std::vector<Request>& reqs, std::size_t from, std::size_t to, std::int64_t until) {
        static const char crlf[] = "\r\n";
        std::vector<iovec> iov;
        iov.reserve((to - from) * 3);
        for (std::size_t i = from; i < to; ++i) {
            Request& r = reqs[i];
            iov.push_back({r.head.data(), r.head.size()});
            if (r.data) {
                iov.push_back({const_cast<void*>(r.data), kPageBytes});
                iov.push_back({const_cast<char*>(crlf), 2});
            }
        }
        return c.send(iov, until);
    }

    // The replies to reqs[from, to), in order. 0, or the errno of a lost connection or EPROTO.
    static int receive(Conn& c, std::vector<Request>& reqs, std::size_t from, std::size_t to, std::int64_t until) {
        for (std::size_t i = from; i < to; ++i) {
            Request& r = reqs[i];
            std::string_view l;
            if (const int err = c.line(&l, until)) return err;
            r.error = 0;
            if (l == "HD") {
                r.reply = r.data ? Reply::Stored : Reply::Deleted;
            } else if (l == "NS" || l == "EX") {
                r.reply = Reply::NotStored;
                r.error = EIO;
            } else if (l == "NF") {
                r.reply = Reply::Deleted;  // a delete of a key already gone is done too
            } else if (l == "EN") {
                r.reply = Reply::Miss;
            } else if (starts(l, "VA ")) {
                std::size_t n = 0;
                for (std::size_t k = 3; k < l.size() && l[k] >= '0' && l[k] <= '9'; ++k) n = n * 10 + std::size_t(l[k] - '0');
                const bool ours = n == kPageBytes && r.into;
                if (const int err = c.value(ours ? r.into : nullptr, n, until)) return err;
                r.reply = ours ? Reply::Value : Reply::Error;
                if (!ours) r.error = EIO;  // a value of another size under our key: not a page of ours
            } else if (starts(l, "SERVER_ERROR out of memory")) {
                r.reply = Reply::Error;
                r.error = ENOSPC;
            } else if (starts(l, "SERVER_ERROR")) {
                r.reply = Reply::Error;
                r.error = EIO;
            } else if (starts(l, "CLIENT_ERROR") || l == "ERROR") {
                // The server refused the command line and may read what followed it as commands:
                // the stream is out of step, and the connection goes.
                return EPROTO;
            } else {
                return EPROTO;  // out of step with the server: the connection is dropped
            }
        }
        return 0;
    }

    // The pipelines of several servers at once, window by window: each window is sent to every
    // server before any reply is read. A server whose connection fails is tried again alone, whole
    // (sets, gets and deletes can all be repeated), with options.retries reconnections and a
    // growing backoff; after them it is down and its requests keep the error (`errors[s]`).
    void exchange(std::vector<std::vector<Request>>& per, std::vector<int>& errors) {
        const std::size_t n = per.size();
        std::vector<std::unique_ptr<Conn>> conns(n);
        errors.assign(n, 0);
        std::vector<bool> failed(n, false);
        std::size_t longest = 0;
        for (std::size_t s = 0; s < n; ++s) {
            longest = std::max(longest, per[s].size());
            if (!per[s].empty() && (errors[s] = connect(s, &conns[s]))) failed[s] = true;
        }
        const std::int64_t start = far::now_ns();
        for (std::size_t from = 0; from < longest; from += kWindow) {
            const std::int64_t until = deadline();
            for (std::size_t s = 0; s < n; ++s)
                if (!failed[s] && from < per[s].size() &&
                    (errors[s] = send(*conns[s], per[s], from, std::min(per[s].size(), from + kWindow), until)))
                    failed[s] = true;
            for (std::size_t s = 0; s < n; ++s)
                if (!failed[s] && from < per[s].size() &&
                    (errors[s] = receive(*conns[s], per[s], from, std::min(per[s].size(), from + kWindow), until)))
                    failed[s] = true;
        }
        const std::int64_t took = far::now_ns() - start;
        for (std::size_t s = 0; s < n; ++s) {
            if (per[s].empty()) continue;
            if (!failed[s]) {
                counters.round_trip(took);
                health.succeeded(s);
                idle[s]->give(std::move(conns[s]));
                continue;
            }
            // A connection that failed may have waited in the pool while the server closed idle
            // ones (its idle timeout, a restart): the others did too. Retries open new ones.
            conns[s].reset();
            idle[s]->clear();
            errors[s] = retry(s, per[s]);
        }
    }

    // Attempt 0 at once on a new connection (the failed one may only have been stale), then
    // options.retries more after a doubling backoff.
    int retry(std::size_t s, std::vector<Request>& reqs) {
        int err = 0;
        for (unsigned attempt = 0; attempt <= options.retries; ++attempt) {
            if (attempt) {
                counters.retries.fetch_add(1, std::memory_order_relaxed);
                const long ms = long(options.backoff_ms) << (attempt - 1);
                timespec ts{ms / 1000, (ms % 1000) * 1'000'000};
                nanosleep(&ts, nullptr);
            }
            std::unique_ptr<Conn> c;
            if ((err = connect(s, &c, true))) continue;
            const std::int64_t start = far::now_ns();
            for (std::size_t from = 0; from < reqs.size() && !err; from += kWindow) {
                const std::size_t to = std::min(reqs.size(), from + kWindow);
                const std::int64_t until = deadline();
                if (!(err = send(*c, reqs, from, to, until))) err = receive(*c, reqs, from, to, until);
            }
            if (!err) {
                counters.round_trip(far::now_ns() - start);
                health.succeeded(s);
                idle[s]->give(std::move(c));
                return 0;
            }
        }
        health.failed(s);
        for (Request& r : reqs) {
            r.reply = Reply::Error;
            r.error = err;
        }
        return err;
    }

    void queue_deletes(std::size_t s, std::vector<Request>& reqs) {
        for (const SlotTable::Dead& d : deletes.take(s)) {
            Request r;
            r.head = fmt::format("md {}\r\n", key(d.slot, d.generation));
            reqs.push_back(std::move(r));
        }
    }

    void count_deletes(const std::vector<std::vector<Request>>& per) {
        std::uint64_t n = 0;
        for (const auto& reqs : per)
            for (const Request& r : reqs)
                if (r.page == SIZE_MAX && r.reply == Reply::Deleted) ++n;
        counters.keys_deleted.fetch_add(n, std::memory_order_relaxed);
    }

    void flush_deletes(std::size_t s) {
        std::vector<std::vector<Request>> per(servers.size());
        queue_deletes(s, per[s]);
        if (per[s].empty()) return;
        std::vector<int> errors;
        exchange(per, errors);
        count_deletes(per);
    }

    std::string describe() const {
        std::string list;
        for (const Endpoint& e : servers) list += (list.empty() ? "" : ",") + e.text;
        return fmt::format("memcached {} ({} replica{})", list, options.replicas, options.replicas == 1 ? "" : "s");
    }

    // Asks a server whether it would evict what it holds ("stats settings": evictions on|off).
    int check(std::size_t s, std::string* evictions) {
        std::unique_ptr<Conn> c;
        if (const int err = connect(s, &c)) return err;
        std::vector<iovec> iov{{const_cast<char*>("stats settings\r\n"), 16}};
        const std::int64_t until = deadline();
        if (const int err = c->send(iov, until)) return err;
        for (;;) {
            std::string_view l;
            if (const int err = c->line(&l, until)) return err;
            if (l == "END") break;
            if (starts(l, "STAT evictions ")) *evictions = std::string(l.substr(15));
            if (starts(l, "ERROR")) return EPROTO;
        }
        idle[s]->give(std::move(c));
        return 0;
    }
};

MemcachedStore::MemcachedStore(std::vector<std::string> addresses, FarOptions options) {
    static constexpr const char* call = State::kCall;
    if (addresses.empty() || addresses.size() > far::kMaxServers)
        far::fail(EINVAL, "{}: {} servers given; 1 to {} are needed", call, addresses.size(), far::kMaxServers);
    std::vector<Endpoint> endpoints;
    for (const std::string& a : addresses) endpoints.push_back(far::parse_endpoint(call, a));
    if (options.replicas >= addresses.size())
        far::fail(EINVAL, "{}: {} replicas need more than {} servers", call, options.replicas, addresses.size());
    if (options.timeout_ms == 0) far::fail(EINVAL, "{}: timeout_ms is 0", call);
    far::check_prefix(call, options.prefix);
    state_ = std::make_unique<State>(std::move(endpoints), std::move(options));
    State& st = *state_;
    std::string answers;
    std::size_t up = 0;
    for (std::size_t s = 0; s < st.servers.size(); ++s) {
        std::string evictions;
        const int err = st.check(s, &evictions);
        if (err) {
            st.health.failed(s);
            answers += fmt::format("{}{}: {}", answers.empty() ? "" : "; ", st.servers[s].text, std::strerror(err));
            continue;
        }
        ++up;
        // A server that evicts drops pages nobody else holds; memcached's default. -M turns it off.
        if (evictions != "off" && !st.options.allow_eviction)
            far::fail(EINVAL,
                      "{}: memcached at {} evicts items when its memory is full (evictions {}): evicted pages would "
                      "be lost; start it with -M, or set allow_eviction",
                      call, st.servers[s].text, evictions.empty() ? "unknown" : evictions);
    }
    if (up == 0) far::fail(ECONNREFUSED, "{}: no server answers ({})", call, answers);
    if (!answers.empty())
        std::fprintf(stderr, "usermm: %s: some servers do not answer yet, tried again later (%s)\n", call,
                     answers.c_str());
}

MemcachedStore::~MemcachedStore() {
    // Best effort: the keys of slots released since the last batch, and of the slots children
    // that are gone still held, if this is the last process of the table.
    State& st = *state_;
    try {
        std::vector<SlotTable::Dead> dead;
        if (st.table.last_user(dead)) st.deletes.add(dead);
        for (std::size_t s = 0; s < st.servers.size(); ++s)
            if (st.health.usable(s)) st.flush_deletes(s);
    } catch (...) {  // out of memory: the keys stay on the servers, under an instance nobody reads
    }
}

std::size_t MemcachedStore::allocate(std::span<std::uint64_t> slots) { return state_->table.allocate(slots); }

void MemcachedStore::release(std::span<const std::uint64_t> slots) {
    State& st = *state_;
    std::vector<SlotTable::Dead> dead;
    st.table.release(slots, dead);
    if (dead.empty()) return;
    st.deletes.add(dead);
    try {
        // A server that is down keeps its keys: usually it lost them (killed, restarted); if it
        // was only cut off, they stay under keys nobody reads, until memcached restarts.
        for (std::size_t s = 0; s < st.servers.size(); ++s)
            if (!st.health.usable(s))
                (void)st.deletes.take(s);
            else if (st.deletes.waiting(s) >= State::kDeleteBatch)
                st.flush_deletes(s);
    } catch (...) {  // out of memory formatting keys: they stay on the server, under keys nobody reads
    }
}

int MemcachedStore::retain(std::span<const std::uint64_t> slots) { return state_->table.retain(slots); }

void MemcachedStore::write(std::span<PageIo> pages) {
    State& st = *state_;
    const std::size_t n = st.servers.size();
    st.counters.write_batches.fetch_add(1, std::memory_order_relaxed);
    st.counters.batch(pages.size());
    try {
        const unsigned want = st.copies();
        std::vector<std::string> keys(pages.size());
        std::vector<std::uint64_t> pk(pages.size());
        std::vector<ServerMask> got(pages.size(), 0), tried(pages.size(), 0);
        std::vector<int> last(pages.size(), 0);
        for (std::size_t i = 0; i < pages.size(); ++i) {
            const std::uint32_t gen = st.table.generation(pages[i].slot);
            keys[i] = st.key(pages[i].slot, gen);
            pk[i] = st.placement_key(pages[i].slot, gen);
        }
        // Rounds: the first places every page's copies on the servers up; each next one places the
        // copies refused or lost on servers not yet tried, until each page has `want` or none is left.
        for (bool first = true;; first = false) {
            std::vector<std::vector<State::Request>> per(n);
            if (first)
                for (std::size_t s = 0; s < n; ++s) st.queue_deletes(s, per[s]);
            bool any = false;
            const ServerMask usable = st.health.usable_mask();
            for (std::size_t i = 0; i < pages.size(); ++i) {
                const unsigned have = unsigned(std::popcount(got[i]));
                if (have >= want) continue;
                ServerMask candidates = st.all() & ~tried[i];
                if (candidates & usable) candidates &= usable;  // the servers down only when none is up
                const ServerMask to = far::choose_servers(pk[i], candidates, n, want - have);
                for (ServerMask m = to; m; m &= m - 1) {
                    const std::size_t s = std::size_t(std::countr_zero(m));
                    State::Request r;
                    r.head = fmt::format("ms {} {} T0\r\n", keys[i], kPageBytes);
                    r.data = pages[i].data;
                    r.page = i;
                    per[s].push_back(std::move(r));
                    any = true;
                }
                tried[i] |= to;
            }
            if (!any) break;
            std::vector<int> errors;
            st.exchange(per, errors);
            st.count_deletes(per);
            for (std::size_t s = 0; s < n; ++s)
                for (const State::Request& r : per[s]) {
                    if (r.page == SIZE_MAX) continue;
                    if (r.reply == Reply::Stored) {
                        got[r.page] |= ServerMask(1) << s;
                        st.counters.pages_sent.fetch_add(1, std::memory_order_relaxed);
                        st.counters.bytes_sent.fetch_add(kPageBytes, std::memory_order_relaxed);
                    } else if (last[r.page] != ENOSPC) {
                        last[r.page] = r.error ? r.error : EIO;
                    }
                }
        }
        for (std::size_t i = 0; i < pages.size(); ++i) {
            if (!got[i]) {
                pages[i].error = last[i] ? last[i] : EIO;
                st.counters.write_errors.fetch_add(1, std::memory_order_relaxed);
                continue;
            }
            pages[i].error = 0;
            st.table.set_where(pages[i].slot, got[i]);
            if (unsigned(std::popcount(got[i])) < want) st.counters.under_replicated.fetch_add(1, std::memory_order_relaxed);
        }
    } catch (...) {  // out of memory for the requests: the batch fails, its pages stay resident
        for (PageIo& p : pages) p.error = ENOMEM;
    }
}

void MemcachedStore::read(std::span<PageIo> pages) {
    State& st = *state_;
    const std::size_t n = st.servers.size();
    st.counters.read_batches.fetch_add(1, std::memory_order_relaxed);
    st.counters.batch(pages.size());
    try {
        std::vector<std::string> keys(pages.size());
        std::vector<std::vector<std::size_t>> order(pages.size());
        std::vector<std::size_t> next(pages.size(), 0);
        std::vector<bool> done(pages.size(), false);
        std::vector<std::string> said(pages.size());  // what each server said, for a lost page's line
        std::vector<bool> missed(pages.size(), false);
        for (std::size_t i = 0; i < pages.size(); ++i) {
            const std::uint64_t slot = pages[i].slot;
            const std::uint32_t gen = st.table.generation(slot);
            keys[i] = st.key(slot, gen);
            order[i] = st.ranked(st.placement_key(slot, gen), st.table.where(slot));
            pages[i].error = EIO;
        }
        // Round r asks each page's r-th server (the first: the one up with the highest score).
        for (bool first = true;; first = false) {
            std::vector<std::vector<State::Request>> per(n);
            bool any = false;
            for (std::size_t i = 0; i < pages.size(); ++i) {
                if (done[i] || next[i] >= order[i].size()) continue;
                const std::size_t s = order[i][next[i]++];
                State::Request r;
                r.head = fmt::format("mg {} v\r\n", keys[i]);
                r.into = pages[i].data;
                r.page = i;
                per[s].push_back(std::move(r));
                any = true;
            }
            if (!any) break;
            std::vector<int> errors;
            st.exchange(per, errors);
            for (std::size_t s = 0; s < n; ++s)
                for (const State::Request& r : per[s]) {
                    const std::size_t i = r.page;
                    if (r.reply == Reply::Value) {
                        done[i] = true;
                        pages[i].error = 0;
                        st.counters.pages_received.fetch_add(1, std::memory_order_relaxed);
                        st.counters.bytes_received.fetch_add(kPageBytes, std::memory_order_relaxed);
                        if (!first) st.counters.failovers.fetch_add(1, std::memory_order_relaxed);
                        continue;
                    }
                    if (r.reply == Reply::Miss) missed[i] = true;
                    const char* what = r.reply == Reply::Miss ? "has no such key" : std::strerror(r.error ? r.error : EIO);
                    said[i] += fmt::format("{}{} {}", said[i].empty() ? "" : "; ", st.servers[s].text, what);
                    pages[i].error = r.reply == Reply::Miss ? ENODATA : (r.error ? r.error : EIO);
                }
        }
        for (std::size_t i = 0; i < pages.size(); ++i) {
            if (done[i]) continue;
            if (order[i].empty()) said[i] = "the slot holds no page";
            if (missed[i]) pages[i].error = ENODATA;
            st.counters.lost_pages.fetch_add(1, std::memory_order_relaxed);
            std::fprintf(stderr, "usermm: %s: the page of slot %llu (key %s) is lost: %s\n", State::kCall,
                         static_cast<unsigned long long>(pages[i].slot), keys[i].c_str(), said[i].c_str());
        }
    } catch (...) {
        for (PageIo& p : pages) p.error = ENOMEM;
    }
}

std::uint64_t MemcachedStore::capacity() const { return state_->table.capacity(); }
std::string MemcachedStore::describe() const { return state_->describe(); }
FarStats MemcachedStore::stats() const { return state_->counters.snapshot(); }
std::uint64_t MemcachedStore::slots_in_use() const { return state_->table.in_use(); }

std::vector<FarServer> MemcachedStore::servers() const {
    std::vector<FarServer> out;
    for (std::size_t s = 0; s < state_->servers.size(); ++s)
        out.push_back({state_->servers[s].text, state_->health.up(s), state_->table.copies_on(s)});
    return out;
}

std::string MemcachedStore::key_of(std::uint64_t slot) const {
    return state_->key(slot, state_->table.generation(slot));
}

}  // namespace usermm
