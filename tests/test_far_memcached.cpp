// MemcachedStore on real memcached servers this test starts on loopback: content through eviction
// and swap-in with several threads, a server killed with and without replicas, two processes on
// one pool, fork, the keys on the servers, and the errors of a pool that cannot take pages.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <algorithm>
#include <memory>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <usermm/far.hpp>
#include <usermm/usermm.hpp>

#include "far_test_util.hpp"
#include "swap_test_util.hpp"
#include "test_util.hpp"

using namespace usermm;
using namespace usermm_swap_test;
using usermm_test::g_have_memcached;
using usermm_test::ServerProcess;
using usermm_test::start_memcached;

namespace {

// One request to a server, its reply's first line (a raw meta command, to look at the keys).
std::string ask(int port, const std::string& command) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(std::uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string reply;
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
        send(fd, command.data(), command.size(), MSG_NOSIGNAL) == ssize_t(command.size())) {
        char c;
        while (recv(fd, &c, 1, 0) == 1 && c != '\n') reply += c;
    }
    close(fd);
    if (!reply.empty() && reply.back() == '\r') reply.pop_back();
    return reply;
}

// A counter from the server's `stats` (0 if it has none).
std::uint64_t stat_of(int port, const std::string& name) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(std::uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string all;
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && send(fd, "stats\r\n", 7, MSG_NOSIGNAL) == 7) {
        char buf[4096];
        for (ssize_t n; all.find("END\r\n") == std::string::npos && (n = recv(fd, buf, sizeof buf, 0)) > 0;)
            all.append(buf, std::size_t(n));
    }
    close(fd);
    const std::size_t at = all.find("STAT " + name + " ");
    return at == std::string::npos ? 0 : std::strtoull(all.c_str() + at + 6 + name.size(), nullptr, 10);
}

std::vector<ServerProcess> start_pool(std::size_t n, unsigned megabytes = 64) {
    std::vector<ServerProcess> pool;
    for (std::size_t i = 0; i < n; ++i) pool.push_back(start_memcached(megabytes));
    return pool;
}

// `threads` threads write pages [0, n) at `version` (thread t the pages i % threads == t), then
// read them all back; the pages found wrong are counted.
std::size_t write_and_check(char* p, std::size_t n, std::uint64_t version, unsigned threads) {
    std::atomic<std::size_t> wrong{0};
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] {
            for (std::size_t i = t; i < n; i += threads) fill(p + i * page(), i, version);
            for (std::size_t i = t; i < n; i += threads) wrong += !holds(p + i * page(), i, version);
        });
    for (std::thread& t : ts) t.join();
    return wrong;
}

std::size_t check_all(const char* p, std::size_t n, std::uint64_t version) {
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) wrong += !holds(p + i * page(), i, version);
    return wrong;
}

}  // namespace

TEST_CASE("memcached: a batch is one exchange per server, pages come back as written, released keys are deleted" *
          doctest::skip(!g_have_memcached)) {
    auto pool = start_pool(2);
    MemcachedStore store(usermm_test::addresses(pool));
    CHECK(store.describe().find(pool[0].address()) != std::string::npos);
    constexpr std::size_t n = 32;
    std::vector<std::uint64_t> slots(n);
    REQUIRE(store.allocate(slots) == n);
    void* mem = std::aligned_alloc(page(), n * page());
    char* buf = static_cast<char*>(mem);
    std::vector<PageIo> io(n);
    for (std::size_t i = 0; i < n; ++i) {
        fill(buf + i * page(), i, 1);
        io[i] = {slots[i], buf + i * page(), -1};
    }
    store.write(io);
    for (const PageIo& x : io) CHECK(x.error == 0);
    FarStats s = store.stats();
    CHECK(s.pages_sent == n);
    CHECK(s.round_trips <= 2);  // one per server
    std::memset(buf, 0, n * page());
    for (PageIo& x : io) x.error = -1;
    store.read(io);
    for (std::size_t i = 0; i < n; ++i) {
        CHECK(io[i].error == 0);
        CHECK(holds(buf + i * page(), i, 1));
    }
    s = store.stats();
    CHECK(s.pages_received == n);
    CHECK(s.round_trips <= 4);
    // Both servers hold pages, the copies are counted where they are, and each key is on one.
    const std::vector<FarServer> servers = store.servers();
    CHECK(servers[0].pages + servers[1].pages == n);
    CHECK(servers[0].pages > 0);
    CHECK(servers[1].pages > 0);
    const std::string key = store.key_of(slots[0]);
    const std::string on0 = ask(pool[0].port(), "mg " + key + " s\r\n"), on1 = ask(pool[1].port(), "mg " + key + " s\r\n");
    CHECK(((on0 == "EN") != (on1 == "EN")));
    // Released: the keys go with the next batch.
    store.release(slots);
    CHECK(store.slots_in_use() == 0);
    std::vector<std::uint64_t> again(1);
    REQUIRE(store.allocate(again) == 1);
    CHECK(store.key_of(again[0]) != key);  // a slot handed out again has a new generation
    PageIo one{again[0], buf, -1};
    store.write({&one, 1});
    CHECK(one.error == 0);
    CHECK(store.stats().keys_deleted == n);
    CHECK(ask(pool[0].port(), "mg " + key + " s\r\n") == "EN");
    CHECK(ask(pool[1].port(), "mg " + key + " s\r\n") == "EN");
    store.release(again);
    std::free(mem);
}

TEST_CASE("memcached: a working set four times the limit over three servers, four threads, content intact" *
          doctest::skip(!g_have_memcached)) {
    auto pool = start_pool(3);
    MemcachedStore store(usermm_test::addresses(pool));
    constexpr std::size_t limit = 16 * kCluster, n = 4 * limit;
    Arena arena(64 << 20, options(&store, limit));
    char* p = map_aligned(arena, n);
    CHECK(write_and_check(p, n, 1, 4) == 0);
    CHECK(write_and_check(p, n, 2, 4) == 0);
    CHECK(check_all(p, n, 2) == 0);
    const Stats s = arena.stats();
    CHECK(s.pages_swapped_out > 0);
    CHECK(s.pages_swapped_in > 0);
    CHECK(s.resident_pages <= limit + 8 * kCluster);
    const FarStats f = store.stats();
    CHECK(f.pages_sent >= s.pages_swapped_out);
    CHECK(f.pages_received >= s.pages_swapped_in);
    CHECK(f.lost_pages == 0);
    CHECK(f.write_errors == 0);
    std::size_t holding = 0;
    for (const FarServer& server : store.servers()) holding += server.pages > 0;
    CHECK(holding == 3);
    arena.verify();
    arena.unmap(p, n * page());
    CHECK(store.slots_in_use() == 0);
}

TEST_CASE("memcached: with one replica, a server killed mid-run loses nothing and later writes keep two copies" *
          doctest::skip(!g_have_memcached)) {
    auto pool = start_pool(3);
    FarOptions o;
    o.replicas = 1;
    o.backoff_ms = 5;
    MemcachedStore store(usermm_test::addresses(pool), o);
    constexpr std::size_t limit = 8 * kCluster, n = 4 * limit;
    Arena arena(64 << 20, options(&store, limit));
    char* p = map_aligned(arena, n);
    CHECK(write_and_check(p, n, 1, 2) == 0);
    CHECK(store.stats().under_replicated == 0);
    // Every page that is out has two copies; one server goes.
    pool[1].kill();
    CHECK(check_all(p, n, 1) == 0);
    FarStats f = store.stats();
    CHECK(f.lost_pages == 0);
    CHECK(f.failovers > 0);
    const std::uint64_t under = f.under_replicated;
    CHECK(write_and_check(p, n, 2, 2) == 0);
    CHECK(check_all(p, n, 2) == 0);
    f = store.stats();
    CHECK(f.under_replicated == under);  // two servers remain: two copies each
    CHECK(f.lost_pages == 0);
    CHECK_FALSE(store.servers()[1].up);
    arena.unmap(p, n * page());
}

TEST_CASE("memcached: without replicas, the pages of a killed server are SIGBUS at their first touch, named" *
          doctest::skip(!g_have_memcached || usermm_test::kSkipUnderTsan)) {
    auto pool = start_pool(2);
    const std::vector<std::string> addrs = usermm_test::addresses(pool);
    int ready[2], go[2];
    REQUIRE(pipe(ready) == 0);
    REQUIRE(pipe(go) == 0);
    std::thread killer([&] {
        char c;
        if (read(ready[0], &c, 1) == 1) pool[0].kill();
        (void)write(go[1], "k", 1);
    });
    const auto end = usermm_test::run_guarded(
        [&] {
            FarOptions o;
            o.retries = 1;
            o.backoff_ms = 1;
            MemcachedStore store(addrs, o);
            Arena arena(64 << 20, options(&store));
            constexpr std::size_t n = 4 * kCluster;
            char* q = map_aligned(arena, n);
            for (std::size_t i = 0; i < n; ++i) fill(q + i * page(), i, 1);
            arena.advise(q, n * page(), Advice::PageOut);
            CHILD_CHECK(arena.stats().pages_swapped_out == n);
            CHILD_CHECK(store.servers()[0].pages > 0);
            (void)!write(ready[1], "r", 1);
            char c;
            CHILD_CHECK(read(go[0], &c, 1) == 1);
            // Pages on the survivor come back; the first page of the killed one is SIGBUS.
            for (std::size_t i = 0; i < n; ++i) {
                std::fprintf(stderr, "touching page %zu\n", i);
                if (!holds(q + i * page(), i, 1)) std::fprintf(stderr, "child check failed: page %zu wrong\n", i);
            }
            std::fprintf(stderr, "child check failed: every page came back\n");
        },
        30);
    killer.join();
    for (int fd : {ready[0], ready[1], go[0], go[1]}) close(fd);
    INFO("child stderr: " << end.err);
    CHECK(end.signal == SIGBUS);
    CHECK(end.err.find("child check failed") == std::string::npos);
    CHECK(end.err.find("usermm: SIGBUS") != std::string::npos);
    const std::size_t lost = end.err.find("is lost: ");
    REQUIRE(lost != std::string::npos);
    CHECK(end.err.find("(key usermm:") != std::string::npos);
    CHECK(end.err.find(addrs[0], lost) != std::string::npos);
}

TEST_CASE("memcached: two processes on one pool, each with its own store, never overwrite each other" *
          doctest::skip(!g_have_memcached)) {
    auto pool = start_pool(2);
    const std::vector<std::string> addrs = usermm_test::addresses(pool);
    constexpr std::size_t limit = 4 * kCluster, n = 4 * limit;
    int ready[2], go[2];
    REQUIRE(pipe(ready) == 0);
    REQUIRE(pipe(go) == 0);
    // Both write their pages out (the same slot numbers: each store hands out 0, 1, ...), then
    // each reads its own back after the other wrote.
    const auto body = [&](std::uint64_t version, bool child) {
        MemcachedStore store(addrs);
        Arena arena(64 << 20, options(&store, limit));
        char* q = map_aligned(arena, n);
        for (std::size_t i = 0; i < n; ++i) fill(q + i * page(), i, version);
        arena.advise(q, n * page(), Advice::PageOut);
        char c = 'x';
        if (child) {
            (void)!write(ready[1], &c, 1);
            CHILD_CHECK(read(go[0], &c, 1) == 1);
            CHILD_CHECK(check_all(q, n, version) == 0);
        } else {
            REQUIRE(read(ready[0], &c, 1) == 1);
            CHECK(check_all(q, n, version) == 0);
            (void)!write(go[1], &c, 1);
        }
    };
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        try {
            body(7, true);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "child threw: %s\n", e.what());
            _exit(1);
        }
        _exit(0);
    }
    body(3, false);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    for (int fd : {ready[0], ready[1], go[0], go[1]}) close(fd);
}

TEST_CASE("memcached: fork shares the swapped pages (one slot table, one more reference each); both read them" *
          doctest::skip(!g_have_memcached || usermm_test::kSkipUnderTsan)) {
    auto pool = start_pool(2);
    auto owned = std::make_unique<MemcachedStore>(usermm_test::addresses(pool));
    MemcachedStore& store = *owned;
    constexpr std::size_t limit = 4 * kCluster, n = 4 * limit;
    auto arena_owned = std::make_unique<Arena>(64 << 20, options(&store, limit));
    Arena& arena = *arena_owned;
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 1);
    arena.advise(p, n * page(), Advice::PageOut);
    const std::uint64_t held = store.slots_in_use();
    CHECK(held >= n - limit);
    std::vector<std::string> keys;
    for (std::uint64_t slot = 0; slot < held; ++slot) keys.push_back(store.key_of(slot));
    const auto child = usermm_test::run_guarded(
        [&] {
            CHILD_CHECK(check_all(p, n, 1) == 0);
            // The child's own writes go to slots the parent's never use. Writing a page drops the
            // child's reference to its old slot, so it writes half of them: the other half's
            // references stay the child's.
            for (std::size_t i = 0; i < n / 2; ++i) fill(p + i * page(), i, 5);
            arena.advise(p, n * page(), Advice::PageOut);
            CHILD_CHECK(check_all(p, n / 2, 5) == 0);
            for (std::size_t i = n / 2; i < n; ++i) CHILD_CHECK(holds(p + i * page(), i, 1));
        },
        30);
    check_survived(child);
    CHECK(check_all(p, n, 1) == 0);
    CHECK(store.stats().lost_pages == 0);
    // The child ended with _exit, its references to the pages it did not write unreleased (as
    // after exec): they stay counted while the parent's store lives, and the parent, its last
    // user, deletes them with it.
    arena.unmap(p, n * page());
    CHECK(store.slots_in_use() > 0);
    CHECK(store.slots_in_use() <= n);
    std::size_t on_servers = 0;
    for (const std::string& key : keys)
        for (const ServerProcess& s : pool) on_servers += ask(s.port(), "mg " + key + " s\r\n") != "EN";
    CHECK(on_servers > 0);
    arena_owned.reset();
    owned.reset();
    on_servers = 0;
    for (const std::string& key : keys)
        for (const ServerProcess& s : pool) on_servers += ask(s.port(), "mg " + key + " s\r\n") != "EN";
    CHECK(on_servers == 0);
}

TEST_CASE("memcached: errors: no server, a server that evicts, a server out of memory keeps pages resident" *
          doctest::skip(!g_have_memcached)) {
    const std::string nobody = "127.0.0.1:" + std::to_string(usermm_test::free_loopback_port());
    try {
        MemcachedStore store({nobody});
        FAIL("a pool nobody answers was made");
    } catch (const std::system_error& e) {
        CHECK(std::string(e.what()).find(nobody) != std::string::npos);
    }
    CHECK_THROWS_AS(MemcachedStore({"127.0.0.1"}), std::system_error);
    CHECK_THROWS_AS(MemcachedStore({"127.0.0.1:0"}), std::system_error);
    {
        auto one = start_pool(1);
        FarOptions o;
        o.replicas = 1;
        CHECK_THROWS_AS(MemcachedStore(usermm_test::addresses(one), o), std::system_error);
    }
    {
        ServerProcess evicting;
        std::vector<std::string> argv{"/usr/bin/memcached", "-l", "127.0.0.1", "-p", "{port}", "-U", "0", "-m", "8"};
        if (geteuid() == 0) argv.insert(argv.end(), {"-u", "root"});
        evicting.start(argv);
        try {
            MemcachedStore store({evicting.address()});
            FAIL("a server that evicts was accepted");
        } catch (const std::system_error& e) {
            CHECK(std::string(e.what()).find("-M") != std::string::npos);
            CHECK(std::string(e.what()).find(evicting.address()) != std::string::npos);
        }
        FarOptions o;
        o.allow_eviction = true;
        MemcachedStore accepted({evicting.address()}, o);
    }
    // A server with 2 MiB and no eviction refuses pages once full: they stay in the arena.
    auto small = start_pool(1, 2);
    MemcachedStore store(usermm_test::addresses(small));
    constexpr std::size_t limit = 2 * kCluster, n = 2048;
    ArenaOptions ao = options(&store, limit);
    std::atomic<int> reported{0};
    ao.on_store_error = [&](int, const void*) { ++reported; };
    Arena arena(64 << 20, ao);
    char* p = map_aligned(arena, n);
    for (std::size_t i = 0; i < n; ++i) fill(p + i * page(), i, 1);
    arena.advise(p, n * page(), Advice::PageOut);
    CHECK(check_all(p, n, 1) == 0);
    CHECK(store.stats().write_errors > 0);
    CHECK(arena.stats().resident_pages > limit);
    CHECK(arena.stats().store_errors > 0);
    arena.unmap(p, n * page());
}

TEST_CASE("memcached: idle connections the server closed are not taken for a server down or a page lost" *
          doctest::skip(!g_have_memcached)) {
    // memcached closes connections idle for a second; the store's pool holds several after
    // threads read at once.
    ServerProcess server = start_memcached(64, {"-o", "idle_timeout=1"});
    MemcachedStore store({server.address()});
    constexpr std::size_t n = 8;
    std::vector<std::uint64_t> slots(n);
    REQUIRE(store.allocate(slots) == n);
    void* mem = std::aligned_alloc(page(), n * page());
    char* buf = static_cast<char*>(mem);
    for (std::size_t i = 0; i < n; ++i) {
        fill(buf + i * page(), i, 1);
        PageIo io{slots[i], buf + i * page(), 0};
        store.write({&io, 1});
        REQUIRE(io.error == 0);
    }
    std::vector<std::thread> ts;
    for (std::size_t t = 0; t < 4; ++t)
        ts.emplace_back([&, t] {
            for (int k = 0; k < 50; ++k) {
                PageIo io{slots[t], buf + t * page(), 0};
                store.read({&io, 1});
            }
        });
    for (std::thread& t : ts) t.join();
    // The handshake: the server says it has kicked the idle connections (its idle_kicks counter).
    const std::uint64_t seen = stat_of(server.port(), "idle_kicks");
    for (int i = 0; i < 5000 && stat_of(server.port(), "idle_kicks") < seen + 2; ++i) {
        timespec ms{0, 1'000'000};
        nanosleep(&ms, nullptr);
    }
    REQUIRE(stat_of(server.port(), "idle_kicks") >= seen + 2);
    for (std::size_t i = 0; i < n; ++i) {
        std::memset(buf + i * page(), 0, page());
        PageIo io{slots[i], buf + i * page(), -1};
        store.read({&io, 1});
        CHECK(io.error == 0);
        CHECK(holds(buf + i * page(), i, 1));
    }
    CHECK(store.stats().lost_pages == 0);
    CHECK(store.servers()[0].up);
    store.release(slots);
    std::free(mem);
}

TEST_CASE("far stores refuse a key prefix a server would read as more than a key") {
    for (const char* bad : {"my app", "line\r\nflush_all", "", "a{b}"}) {
        CAPTURE(bad);
        FarOptions o;
        o.prefix = bad;
        CHECK_THROWS_AS(MemcachedStore({"127.0.0.1:1"}, o), std::system_error);
        RedisOptions r;
        r.prefix = bad;
        CHECK_THROWS_AS(RedisStore({"127.0.0.1:1"}, r), std::system_error);
    }
    FarOptions o;
    o.prefix = std::string(208, 'p');
    CHECK_THROWS_AS(MemcachedStore({"127.0.0.1:1"}, o), std::system_error);
}
