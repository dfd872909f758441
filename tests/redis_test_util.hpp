// Redis for the RedisStore tests: redis-server on loopback in a directory of its own (removed with
// it), a three-master Redis Cluster made with redis-cli, and redis-cli as a raw client for checks
// on the servers' side. Builds on far_test_util.hpp's ServerProcess.
#pragma once

#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "far_test_util.hpp"
#include "test_util.hpp"

namespace usermm_test {

// redis-server on 127.0.0.1 that neither saves nor evicts unless `extra` says otherwise (a later
// option overrides an earlier one).
inline ServerProcess start_redis(const TempDir& dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv{"/usr/bin/redis-server", "--port", "{port}", "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                                  "--maxmemory-policy", "noeviction", "--dir", dir.path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    ServerProcess p;
    std::fflush(nullptr);  // the child's freopen of stdout would write this process's buffered output again
    p.start(argv);
    return p;
}

// Runs a program to its end; its exit status (-1 if it did not exit) and its standard output (and
// its standard error with `errors_too`).
struct ProgramEnd {
    int status = -1;
    std::string out;
};
// posix_spawn, not fork: a fork runs usermm's fork handlers, which start an arena's threads again
// in the child (refused by ThreadSanitizer after a multi-threaded fork), for a child that only execs.
inline ProgramEnd run_program(std::vector<std::string> argv, bool errors_too = false) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
    std::vector<char*> raw;
    for (std::string& a : argv) raw.push_back(a.data());
    raw.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    if (errors_too)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    else
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, raw[0], &actions, nullptr, raw.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        throw std::runtime_error("cannot run " + argv[0]);
    }
    ProgramEnd end;
    char buf[4096];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR);)
        if (n > 0) end.out.append(buf, std::size_t(n));
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status)) end.status = WEXITSTATUS(status);
    return end;
}

// One command through redis-cli (raw output: the reply without decoration, then a newline).
inline std::string redis_cli(int port, std::vector<std::string> args) {
    std::vector<std::string> argv{"/usr/bin/redis-cli", "--raw", "-h", "127.0.0.1", "-p", std::to_string(port)};
    argv.insert(argv.end(), args.begin(), args.end());
    std::string out = run_program(argv).out;
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out;
}

// Three masters, no replicas, every hash slot assigned; ready when every node says cluster_state:ok.
class RedisCluster {
public:
    RedisCluster() {
        for (int i = 0; i < 3; ++i) nodes_.push_back(start_node());
        std::vector<std::string> argv{"/usr/bin/redis-cli", "--cluster", "create"};
        for (const ServerProcess& n : nodes_) argv.push_back(n.address());
        argv.insert(argv.end(), {"--cluster-replicas", "0", "--cluster-yes"});
        const ProgramEnd made = run_program(argv, true);
        if (made.status != 0)
            throw std::runtime_error("redis-cli --cluster create failed (status " + std::to_string(made.status) +
                                     "): " + made.out);
        // The nodes learn of each other by gossip: polled until each one says the cluster is up.
        for (const ServerProcess& n : nodes_)
            for (int i = 0;; ++i) {
                if (redis_cli(n.port(), {"cluster", "info"}).find("cluster_state:ok") != std::string::npos) break;
                if (i == 1000) throw std::runtime_error("the cluster did not come up");
                timespec ms{0, 10'000'000};
                nanosleep(&ms, nullptr);
            }
    }
    std::vector<ServerProcess>& nodes() { return nodes_; }
    std::vector<std::string> seeds() const { return addresses(nodes_); }

private:
    // The cluster bus's port is the node's + 10000 by default, past 65535 for half the ephemeral
    // ports: a free one of its own instead. A node that cannot bind it exits after listening on its
    // own port, so it is ready only once it answers (its event loop runs after the bus is bound).
    ServerProcess start_node() {
        for (int attempt = 0; attempt < 5; ++attempt) {
            ServerProcess node = start_redis(dir_, {"--cluster-enabled", "yes", "--cluster-config-file", "nodes-{port}.conf",
                                                    "--cluster-node-timeout", "2000", "--cluster-port",
                                                    std::to_string(free_loopback_port())});
            if (redis_cli(node.port(), {"PING"}) == "PONG") return node;
        }
        throw std::runtime_error("cannot start a cluster node");
    }
    TempDir dir_;
    std::vector<ServerProcess> nodes_;
};

}  // namespace usermm_test
