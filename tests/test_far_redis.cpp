// RedisStore against real redis-server processes on loopback: the store's own round trip and the
// deletion of released keys, an arena four times its resident limit over a three-master Redis
// Cluster from four threads, replicas surviving a server killed mid-run, a page lost with its
// server (SIGBUS and a line naming its key), the constructor's refusals and a server out of
// memory, two processes sharing a server, and a forked child reading its parent's swapped pages.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <usermm/far.hpp>
#include <usermm/usermm.hpp>

#include "far_test_util.hpp"
#include "redis_test_util.hpp"
#include "swap_test_util.hpp"
#include "test_util.hpp"

namespace {

using namespace usermm_test;
using usermm::Advice;
using usermm::Arena;
using usermm::FarStats;
using usermm::PageIo;
using usermm::Prot;
using usermm::RedisOptions;
using usermm::RedisStore;
using usermm_swap_test::fill;
using usermm_swap_test::holds;
using usermm_swap_test::options;
using usermm_swap_test::page;

// Page-aligned buffers for store-level calls.
struct Pages {
    explicit Pages(std::size_t n) : count(n), bytes(static_cast<std::byte*>(std::aligned_alloc(4096, n * 4096))) {}
    ~Pages() { std::free(bytes); }
    Pages(const Pages&) = delete;
    Pages& operator=(const Pages&) = delete;
    void* at(std::size_t i) const { return bytes + i * 4096; }
    std::size_t count;
    std::byte* bytes;
};

// Pages [0, n) of `p` that do not hold `version` (their index, or index + base).
std::size_t wrong_pages(const char* p, std::size_t n, std::uint64_t version, std::size_t base = 0) {
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) bad += !holds(p + i * page(), base + i, version);
    return bad;
}

void fill_pages(char* p, std::size_t n, std::uint64_t version, std::size_t base = 0) {
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), base + i, version);
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// One byte through a pipe: the handshake between a test and its child.
void send_byte(int fd, char c = 'x') {
    while (::write(fd, &c, 1) < 0 && errno == EINTR) {
    }
}
char receive_byte(int fd) {
    char c = 0;
    ssize_t n;
    while ((n = ::read(fd, &c, 1)) < 0 && errno == EINTR) {
    }
    return n == 1 ? c : 0;
}

std::string read_all(int fd) {
    std::string out;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR);)
        if (n > 0) out.append(buf, std::size_t(n));
    return out;
}

int wait_child(pid_t pid) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
}

}  // namespace

TEST_CASE("RedisStore: a batch written and read back, released keys deleted with the next batch" *
          doctest::skip(!g_have_redis)) {
    TempDir dir;
    ServerProcess server = start_redis(dir);
    RedisOptions o;
    o.prefix = "roundtrip";
    RedisStore store({server.address()}, o);
    CHECK(store.describe() == "Redis " + server.address() + " (no replicas)");
    CHECK(store.capacity() == o.capacity);

    constexpr std::size_t n = 8;
    std::vector<std::uint64_t> slots(n);
    REQUIRE(store.allocate(slots) == n);
    CHECK(store.slots_in_use() == n);
    Pages out(n), in(n);
    std::vector<PageIo> ios(n);
    for (std::size_t i = 0; i < n; ++i) {
        fill(out.at(i), i, 1);
        ios[i] = {slots[i], out.at(i), -1};
    }
    store.write(ios);
    for (const PageIo& io : ios) CHECK(io.error == 0);
    for (std::size_t i = 0; i < n; ++i) ios[i] = {slots[i], in.at(i), -1};
    store.read(ios);
    for (std::size_t i = 0; i < n; ++i) {
        CHECK(ios[i].error == 0);
        CHECK(holds(in.at(i), i, 1));
    }
    FarStats s = store.stats();
    CHECK(s.pages_sent == n);
    CHECK(s.bytes_sent == n * 4096);
    CHECK(s.pages_received == n);
    CHECK(s.write_batches == 1);
    CHECK(s.read_batches == 1);
    CHECK(s.round_trips == 2);  // one pipelined exchange per batch
    CHECK(s.largest_batch == n);
    CHECK(s.latency_percentile_us(1.0) > 0);
    REQUIRE(store.servers().size() == 1);
    CHECK(store.servers()[0].pages == n);
    CHECK(store.servers()[0].up);

    const std::string key = store.key_of(slots[0]);
    CHECK(key.starts_with("roundtrip:"));
    CHECK(redis_cli(server.port(), {"EXISTS", key}) == "1");
    CHECK(redis_cli(server.port(), {"STRLEN", key}) == "4096");

    store.release(slots);
    CHECK(store.slots_in_use() == 0);
    CHECK(store.stats().keys_deleted == 0);  // waiting for the next batch
    std::uint64_t one = 0;
    REQUIRE(store.allocate({&one, 1}) == 1);
    PageIo next{one, out.at(0), -1};
    store.write({&next, 1});
    CHECK(next.error == 0);
    CHECK(store.stats().keys_deleted == n);
    CHECK(store.stats().round_trips == 3);  // the deletes rode with the write
    CHECK(redis_cli(server.port(), {"EXISTS", key}) == "0");
    CHECK(redis_cli(server.port(), {"DBSIZE"}) == "1");
    CHECK(store.key_of(one) != key);  // a slot handed out again has a new generation

    // A value of the wrong length is an I/O error, never a page.
    REQUIRE(redis_cli(server.port(), {"SET", store.key_of(one), "short"}) == "OK");
    PageIo bad{one, in.at(0), -1};
    store.read({&bad, 1});
    CHECK(bad.error == EIO);
    CHECK(store.stats().lost_pages == 1);
}

TEST_CASE("RedisStore: an arena 4x its resident limit over a 3-master Redis Cluster, 4 threads" *
          doctest::skip(!g_have_redis)) {
    RedisCluster cluster;
    RedisOptions o;
    o.cluster = true;
    o.prefix = "cluster";
    RedisStore store({cluster.seeds()[0]}, o);
    CHECK(store.describe() == "Redis Cluster via " + cluster.seeds()[0] + " (3 masters)");
    REQUIRE(store.servers().size() == 3);

    // A hash slot moving: ASK while it migrates, then MOVED (before the arena's keys fill the slots: a
    // slot that still holds keys on its old owner cannot be reassigned).
    {
        RedisStore mover({cluster.seeds()[0]}, o);
        // The key slot 0 gets at its first allocation (generation 1), and its hash slot's owner.
        std::string key = mover.key_of(0);
        key = key.substr(0, key.rfind(':')) + ":1";
        const std::string hash_slot = redis_cli(cluster.nodes()[0].port(), {"CLUSTER", "KEYSLOT", key});
        std::vector<std::string> ids;
        int from = -1;
        for (int i = 0; i < 3; ++i) {
            const int port = cluster.nodes()[std::size_t(i)].port();
            ids.push_back(redis_cli(port, {"CLUSTER", "MYID"}));
            if (redis_cli(port, {"GET", key}).empty()) from = i;  // the others answer MOVED
        }
        REQUIRE(from >= 0);
        const int to = (from + 1) % 3;
        const int from_port = cluster.nodes()[std::size_t(from)].port(), to_port = cluster.nodes()[std::size_t(to)].port();
        REQUIRE(redis_cli(to_port, {"CLUSTER", "SETSLOT", hash_slot, "IMPORTING", ids[std::size_t(from)]}) == "OK");
        REQUIRE(redis_cli(from_port, {"CLUSTER", "SETSLOT", hash_slot, "MIGRATING", ids[std::size_t(to)]}) == "OK");
        std::uint64_t slot = 0;
        REQUIRE(mover.allocate({&slot, 1}) == 1);
        REQUIRE(mover.key_of(slot) == key);
        Pages buf(1);
        fill(buf.at(0), 7, 1);
        PageIo io{slot, buf.at(0), -1};
        mover.write({&io, 1});  // ASK: the key is not on the old owner, so it goes to the new one
        CHECK(io.error == 0);
        std::memset(buf.at(0), 0, 4096);
        io.error = -1;
        mover.read({&io, 1});
        CHECK(io.error == 0);
        CHECK(holds(buf.at(0), 7, 1));
        for (const ServerProcess& n : cluster.nodes())
            REQUIRE(redis_cli(n.port(), {"CLUSTER", "SETSLOT", hash_slot, "NODE", ids[std::size_t(to)]}) == "OK");
        CHECK(redis_cli(to_port, {"STRLEN", key}) == "4096");
        std::memset(buf.at(0), 0, 4096);
        io.error = -1;
        mover.read({&io, 1});  // MOVED: the store's map still names the old owner
        CHECK(io.error == 0);
        CHECK(holds(buf.at(0), 7, 1));
        io.error = -1;
        mover.read({&io, 1});  // and now the new one, without a redirection
        CHECK(io.error == 0);
        CHECK(mover.stats().lost_pages == 0);
    }

    constexpr std::size_t limit_pages = 512, threads = 4, per_thread = limit_pages;  // 2 MiB, 8 MiB
    Arena arena(64 << 20, options(&store, limit_pages));
    char* p = static_cast<char*>(arena.map(threads * per_thread * page(), Prot::ReadWrite));
    std::atomic<std::size_t> wrong{0};
    std::vector<std::uint64_t> most(3);
    for (std::uint64_t pass = 1; pass <= 3; ++pass) {
        std::vector<std::thread> workers;
        for (std::size_t t = 0; t < threads; ++t)
            workers.emplace_back([&, t] {
                char* mine = p + t * per_thread * page();
                fill_pages(mine, per_thread, pass, t * per_thread);
                wrong += wrong_pages(mine, per_thread, pass, t * per_thread);
            });
        for (std::thread& w : workers) w.join();
        const std::vector<usermm::FarServer> servers = store.servers();
        REQUIRE(servers.size() == 3);
        for (std::size_t i = 0; i < 3; ++i) most[i] = std::max(most[i], servers[i].pages);
    }
    CHECK(wrong == 0);
    const FarStats s = store.stats();
    INFO("sent " << s.pages_sent << " received " << s.pages_received << " round trips " << s.round_trips);
    CHECK(s.pages_sent > 0);
    CHECK(s.pages_received > 0);
    CHECK(s.write_errors == 0);
    CHECK(s.lost_pages == 0);
    CHECK(arena.stats().resident_pages <= limit_pages);
    CHECK(std::count_if(most.begin(), most.end(), [](std::uint64_t n) { return n > 0; }) > 1);

}

TEST_CASE("RedisStore: with one replica, a server killed mid-run loses nothing" * doctest::skip(!g_have_redis)) {
    TempDir dir;
    std::vector<ServerProcess> servers;
    for (int i = 0; i < 3; ++i) servers.push_back(start_redis(dir));
    RedisOptions o;
    o.replicas = 1;
    o.prefix = "replicas";
    o.backoff_ms = 5;
    o.timeout_ms = 500;
    RedisStore store(addresses(servers), o);
    CHECK(contains(store.describe(), "(1 replica)"));

    constexpr std::size_t limit_pages = 256, n = 4 * limit_pages;
    Arena arena(64 << 20, options(&store, limit_pages));
    char* p = static_cast<char*>(arena.map(n * page(), Prot::ReadWrite));
    fill_pages(p, n, 1);
    CHECK(wrong_pages(p, n, 1) == 0);
    CHECK(store.stats().under_replicated == 0);
    REQUIRE(store.servers()[1].pages > 0);

    servers[1].kill();
    CHECK(wrong_pages(p, n, 1) == 0);
    fill_pages(p, n, 2);
    CHECK(wrong_pages(p, n, 2) == 0);
    const FarStats s = store.stats();
    INFO("failovers " << s.failovers << " retries " << s.retries << " under-replicated " << s.under_replicated);
    CHECK(s.failovers > 0);
    CHECK(s.lost_pages == 0);
    CHECK(s.write_errors == 0);
    CHECK(arena.stats().store_errors == 0);
    CHECK_FALSE(store.servers()[1].up);
}

TEST_CASE("RedisStore: a page whose only server died is SIGBUS, with a line naming its key" *
          doctest::skip(!g_have_redis)) {
    TempDir dir;
    std::vector<ServerProcess> servers;
    for (int i = 0; i < 2; ++i) servers.push_back(start_redis(dir));
    int ready[2], go[2], err[2];
    REQUIRE(pipe(ready) == 0);
    REQUIRE(pipe(go) == 0);
    REQUIRE(pipe(err) == 0);
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        close(ready[0]);
        close(go[1]);
        close(err[0]);
        dup2(err[1], 2);
        alarm(20);
        try {
            RedisOptions o;
            o.prefix = "lostpage";
            o.backoff_ms = 5;
            RedisStore store(addresses(servers), o);
            constexpr std::size_t n = 64;
            Arena arena(16 << 20, options(&store));
            char* p = static_cast<char*>(arena.map(n * page(), Prot::ReadWrite));
            fill_pages(p, n, 1);
            arena.advise(p, n * page(), Advice::PageOut);
            CHILD_CHECK(arena.stats().pages_swapped_out == n);
            CHILD_CHECK(store.servers()[0].pages > 0 && store.servers()[1].pages > 0);
            send_byte(ready[1]);
            CHILD_CHECK(receive_byte(go[0]) == 'x');
            const std::size_t bad = wrong_pages(p, n, 1);
            std::fprintf(stderr, "every page was read (%zu wrong)\n", bad);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child threw: %s\n", e.what());
        }
        _exit(3);
    }
    close(ready[1]);
    close(go[0]);
    close(err[1]);
    const bool child_ready = receive_byte(ready[0]) == 'x';
    servers[1].kill();
    send_byte(go[1]);
    const std::string stderr_text = read_all(err[0]);
    const int status = wait_child(pid);
    close(ready[0]);
    close(go[1]);
    close(err[0]);
    INFO("child stderr: " << stderr_text);
    CHECK(child_ready);
    CHECK(WIFSIGNALED(status));
    CHECK(WTERMSIG(status) == SIGBUS);
    CHECK(contains(stderr_text, "page lost: key lostpage:"));
    CHECK(contains(stderr_text, servers[1].address()));
}

TEST_CASE("RedisStore: the constructor's refusals, and a server out of memory" * doctest::skip(!g_have_redis)) {
    SUBCASE("no server answers") {
        const std::string nobody = "127.0.0.1:" + std::to_string(free_loopback_port());
        try {
            RedisStore store({nobody});
            FAIL("no error");
        } catch (const std::system_error& e) {
            CHECK(e.code().value() == ECONNREFUSED);
            CHECK(contains(e.what(), nobody));
        }
    }
    SUBCASE("bad arguments") {
        const auto code_of = [](auto&& f) {
            try {
                f();
            } catch (const std::system_error& e) {
                return e.code().value();
            }
            return 0;
        };
        CHECK(code_of([] { RedisStore s({}); }) == EINVAL);
        CHECK(code_of([] { RedisStore s({"localhost"}); }) == EINVAL);
        CHECK(code_of([] { RedisStore s({"127.0.0.1:1"}, [] { RedisOptions o; o.replicas = 1; return o; }()); }) ==
              EINVAL);
        CHECK(code_of([] {
                  RedisOptions o;
                  o.cluster = true;
                  o.replicas = 1;
                  RedisStore s({"127.0.0.1:1", "127.0.0.1:2"}, o);
              }) == EINVAL);
    }
    SUBCASE("a server that would evict") {
        TempDir dir;
        ServerProcess lru = start_redis(dir, {"--maxmemory", "1mb", "--maxmemory-policy", "allkeys-lru"});
        try {
            RedisStore store({lru.address()});
            FAIL("no error");
        } catch (const std::system_error& e) {
            CHECK(e.code().value() == EINVAL);
            CHECK(contains(e.what(), lru.address()));
            CHECK(contains(e.what(), "allkeys-lru"));
        }
        RedisOptions o;
        o.allow_eviction = true;
        RedisStore allowed({lru.address()}, o);
        CHECK(allowed.servers().size() == 1);
    }
    SUBCASE("a password") {
        TempDir dir;
        ServerProcess locked = start_redis(dir, {"--requirepass", "sesame"});
        try {
            RedisStore store({locked.address()});
            FAIL("no error");
        } catch (const std::system_error& e) {
            CHECK(e.code().value() == EACCES);
            CHECK(contains(e.what(), locked.address()));
        }
        RedisOptions o;
        o.password = "sesame";
        RedisStore store({locked.address()}, o);
        std::uint64_t slot = 0;
        REQUIRE(store.allocate({&slot, 1}) == 1);
        Pages buf(1);
        fill(buf.at(0), 3, 1);
        PageIo io{slot, buf.at(0), -1};
        store.write({&io, 1});
        CHECK(io.error == 0);
        o.password = "wrong";
        try {
            RedisStore refused({locked.address()}, o);
            FAIL("no error");
        } catch (const std::system_error& e) {
            CHECK(e.code().value() == EACCES);
            CHECK(contains(e.what(), "AUTH"));
        }
    }
    SUBCASE("CONFIG renamed: the eviction policy cannot be checked, which is said on stderr") {
        TempDir dir;
        ServerProcess hidden = start_redis(dir, {"--rename-command", "CONFIG", ""});
        const ChildEnd end = run_guarded([&] { RedisStore store({hidden.address()}); }, 10);
        check_survived(end);
        CHECK(contains(end.err, "cannot check whether " + hidden.address() + " evicts"));
    }
    SUBCASE("a server full: the pages stay resident, nothing is lost") {
        TempDir dir;
        ServerProcess small = start_redis(dir, {"--maxmemory", "2mb"});
        RedisOptions o;
        o.prefix = "full";
        RedisStore store({small.address()}, o);
        constexpr std::size_t n = 1024;  // 4 MiB
        std::atomic<int> refused{0};
        usermm::ArenaOptions ao = options(&store);
        ao.on_store_error = [&](int e, const void*) { refused = e; };  // expected: not worth a line on stderr
        Arena arena(16 << 20, ao);
        char* p = static_cast<char*>(arena.map(n * page(), Prot::ReadWrite));
        fill_pages(p, n, 1);
        arena.advise(p, n * page(), Advice::PageOut);
        const usermm::Stats a = arena.stats();
        const FarStats s = store.stats();
        INFO("swapped out " << a.pages_swapped_out << ", store errors " << a.store_errors << ", sent " << s.pages_sent
                             << ", write errors " << s.write_errors << " in " << s.write_batches << " batches");
        CHECK(a.pages_swapped_out < n);
        CHECK(a.store_errors > 0);
        CHECK(refused == ENOSPC);
        CHECK(s.write_errors > 0);
        CHECK(a.resident_pages + a.pages_swapped_out == n);
        CHECK(wrong_pages(p, n, 1) == 0);
        CHECK(store.stats().lost_pages == 0);
    }
    SUBCASE("a server full under a resident limit: the arena goes over it, nothing is lost") {
        TempDir dir;
        ServerProcess small = start_redis(dir, {"--maxmemory", "2mb"});
        RedisOptions o;
        o.prefix = "fulllimit";
        RedisStore store({small.address()}, o);
        constexpr std::size_t limit_pages = 256, n = 1024;
        usermm::ArenaOptions ao = options(&store, limit_pages);
        ao.on_store_error = [](int, const void*) {};
        Arena arena(16 << 20, ao);
        char* p = static_cast<char*>(arena.map(n * page(), Prot::ReadWrite));
        fill_pages(p, n, 1);
        CHECK(wrong_pages(p, n, 1) == 0);
        const usermm::Stats a = arena.stats();
        INFO("resident " << a.resident_pages << ", swapped out " << a.pages_swapped_out << ", store errors "
                         << a.store_errors);
        CHECK(a.store_errors > 0);
        CHECK(a.resident_pages > limit_pages);
        CHECK(store.stats().lost_pages == 0);
    }
}

TEST_CASE("RedisStore: two processes' stores on one server keep their keys apart" * doctest::skip(!g_have_redis)) {
    TempDir dir;
    ServerProcess server = start_redis(dir);
    struct Child {
        pid_t pid = -1;
        int report = -1, go = -1, err = -1;
    };
    Child children[2];
    std::fflush(nullptr);
    for (int c = 0; c < 2; ++c) {
        int report[2], go[2], err[2];
        REQUIRE(pipe(report) == 0);
        REQUIRE(pipe(go) == 0);
        REQUIRE(pipe(err) == 0);
        const pid_t pid = fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            close(report[0]);
            close(go[1]);
            close(err[0]);
            dup2(err[1], 2);
            alarm(20);
            try {
                RedisOptions o;
                o.prefix = "shared";
                RedisStore store({server.address()}, o);
                constexpr std::size_t n = 16;
                std::vector<std::uint64_t> slots(n);
                CHILD_CHECK(store.allocate(slots) == n);
                Pages buf(n);
                std::vector<PageIo> ios(n);
                for (std::size_t i = 0; i < n; ++i) {
                    fill(buf.at(i), i, std::uint64_t(c) + 1);
                    ios[i] = {slots[i], buf.at(i), -1};
                }
                store.write(ios);
                for (const PageIo& io : ios) CHILD_CHECK(io.error == 0);
                const std::string key = store.key_of(slots[0]) + "\n";
                CHILD_CHECK(::write(report[1], key.data(), key.size()) == ssize_t(key.size()));
                CHILD_CHECK(receive_byte(go[0]) == 'x');  // the other one has written too
                std::memset(buf.bytes, 0, n * 4096);
                store.read(ios);
                for (std::size_t i = 0; i < n; ++i) CHILD_CHECK(ios[i].error == 0 && holds(buf.at(i), i, std::uint64_t(c) + 1));
            } catch (const std::exception& e) {
                std::fprintf(stderr, "child threw: %s\n", e.what());
                _exit(2);
            }
            _exit(0);
        }
        close(report[1]);
        close(go[0]);
        close(err[1]);
        children[c] = {pid, report[0], go[1], err[0]};
    }
    std::string keys[2];
    for (int c = 0; c < 2; ++c)
        for (char ch; (ch = receive_byte(children[c].report)) != 0 && ch != '\n';) keys[c] += ch;
    CHECK(!keys[0].empty());
    CHECK(keys[0] != keys[1]);
    CHECK(redis_cli(server.port(), {"DBSIZE"}) == "32");
    for (const Child& c : children) send_byte(c.go);
    for (const Child& c : children) {
        const std::string text = read_all(c.err);
        const int status = wait_child(c.pid);
        INFO("child stderr: " << text);
        CHECK(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
        close(c.report);
        close(c.go);
        close(c.err);
    }
}

// Skipped under ThreadSanitizer: the child starts the arena's threads again, which TSan refuses
// after a multi-threaded fork (as test_swap's cases that fork an arena with a store).
TEST_CASE("RedisStore: a forked child reads its parent's swapped pages, and the parent after it" *
          doctest::skip(!g_have_redis || kSkipUnderTsan)) {
    TempDir dir;
    ServerProcess server = start_redis(dir);
    RedisOptions o;
    o.prefix = "fork";
    RedisStore store({server.address()}, o);
    constexpr std::size_t n = 128;
    Arena arena(16 << 20, options(&store));
    char* p = static_cast<char*>(arena.map(n * page(), Prot::ReadWrite));
    fill_pages(p, n, 1);
    arena.advise(p, n * page(), Advice::PageOut);
    REQUIRE(arena.stats().pages_swapped_out == n);
    REQUIRE(store.slots_in_use() == n);

    const ChildEnd end = run_guarded(
        [&] {
            CHILD_CHECK(wrong_pages(p, n, 1) == 0);
            fill_pages(p, n / 4, 2);  // the child's own copies from now on
            CHILD_CHECK(wrong_pages(p, n / 4, 2) == 0);
            arena.advise(p, n * page(), Advice::PageOut);
            CHILD_CHECK(wrong_pages(p, n / 4, 2) == 0);
            CHILD_CHECK(wrong_pages(p + n / 4 * page(), n - n / 4, 1, n / 4) == 0);
            arena.unmap(p, n * page());  // the child's references go
        },
        20);
    check_survived(end);
    CHECK(store.slots_in_use() == n);  // the parent's references are left
    CHECK(wrong_pages(p, n, 1) == 0);
    CHECK(store.stats().lost_pages == 0);
}
