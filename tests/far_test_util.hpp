// Servers for the far-memory tests: memcached and redis-server started by the test itself on a free
// 127.0.0.1 port, with its own configuration, and stopped (SIGKILL, then reaped) when the object
// goes. Nothing listens beyond loopback. A test whose server binary is missing reports a skip.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace usermm_test {

inline bool have_program(const char* path) { return access(path, X_OK) == 0; }
inline const bool g_have_memcached = have_program("/usr/bin/memcached");
inline const bool g_have_redis = have_program("/usr/bin/redis-server") && have_program("/usr/bin/redis-cli");

// A port the kernel says is free on 127.0.0.1 now (bound to port 0 and let go); a server that
// loses the race to another process fails to start, and is started again on another.
inline int free_loopback_port() {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
        throw std::runtime_error("cannot find a free port on 127.0.0.1");
    close(fd);
    return ntohs(a.sin_port);
}

inline bool accepting(int port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(std::uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    close(fd);
    return ok;
}

// One server process. start() runs argv (with "{port}" replaced by the port) and returns once the
// port accepts connections: the handshake is the server's own listen(), polled, never a sleep
// standing in for it.
class ServerProcess {
public:
    ServerProcess() = default;
    ServerProcess(const ServerProcess&) = delete;
    ServerProcess& operator=(const ServerProcess&) = delete;
    ServerProcess(ServerProcess&& o) noexcept : pid_(o.pid_), port_(o.port_) { o.pid_ = -1; }
    ~ServerProcess() { kill(); }

    void start(std::vector<std::string> argv) {
        for (int attempt = 0; attempt < 5; ++attempt) {
            port_ = free_loopback_port();
            std::vector<std::string> args = argv;
            for (std::string& a : args)
                for (std::size_t at; (at = a.find("{port}")) != std::string::npos;) a.replace(at, 6, std::to_string(port_));
            std::vector<char*> raw;
            for (std::string& a : args) raw.push_back(a.data());
            raw.push_back(nullptr);
            std::fflush(nullptr);  // or the child's freopen writes the parent's buffered output again
            pid_ = fork();
            if (pid_ < 0) throw std::runtime_error("fork failed");
            if (pid_ == 0) {
                // The server dies with its starter, even one killed by a signal (no destructor
                // runs then): an orphan would hold the test's output pipe open, and its port.
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() == 1) _exit(127);  // the starter died before the line above
                // The server's output would interleave with the test's; errors still reach stderr.
                if (FILE* f = std::freopen("/dev/null", "w", stdout)) (void)f;
                execv(raw[0], raw.data());
                _exit(127);
            }
            for (int i = 0; i < 5000; ++i) {  // up to 5 s for the server to listen
                if (accepting(port_)) return;
                int status;
                if (waitpid(pid_, &status, WNOHANG) == pid_) {  // it died (the port was taken): again
                    pid_ = -1;
                    break;
                }
                timespec ms{0, 1'000'000};
                nanosleep(&ms, nullptr);
            }
            kill();
        }
        throw std::runtime_error("cannot start " + argv[0] + " on a free port of 127.0.0.1");
    }

    void kill() {
        if (pid_ <= 0) return;
        ::kill(pid_, SIGKILL);
        int status;
        while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        pid_ = -1;
    }
    bool running() const { return pid_ > 0; }
    int port() const { return port_; }
    std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

private:
    pid_t pid_ = -1;
    int port_ = 0;
};

// memcached on loopback that never evicts (-M), with `megabytes` of memory; root must name a user.
inline ServerProcess start_memcached(unsigned megabytes = 64, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv{"/usr/bin/memcached", "-l", "127.0.0.1", "-p", "{port}", "-U", "0", "-M", "-m",
                                  std::to_string(megabytes), "-t", "2"};
    if (geteuid() == 0) argv.insert(argv.end(), {"-u", "root"});
    argv.insert(argv.end(), extra.begin(), extra.end());
    ServerProcess p;
    p.start(argv);
    return p;
}

inline std::vector<std::string> addresses(const std::vector<ServerProcess>& servers) {
    std::vector<std::string> out;
    for (const ServerProcess& s : servers) out.push_back(s.address());
    return out;
}

}  // namespace usermm_test
