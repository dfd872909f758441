// Fault traces, the API world's half: the file, the rings' buffers and the thread that drains them
// (lib/fault/trace.hpp has the rings and the protocol with the faults).
#include <usermm/trace.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "account.hpp"
#include "arena_ops.hpp"
#include "trace.hpp"

namespace usermm {

namespace {

using detail::fail;
using detail::TraceState;
using detail::trace_state;

std::uint64_t realtime_ns() {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return std::uint64_t(ts.tv_sec) * 1000000000u + std::uint64_t(ts.tv_nsec);
}

// The trace being recorded. One at a time. `control` is held across a whole start or stop, so
// that neither runs while the other waits for the drainer; `lock` orders them with the drainer's
// writes, and is let go while stop joins it.
struct Writer {
    std::mutex control;
    std::mutex lock;
    std::condition_variable wake;
    bool stopping = false;
    std::thread drainer;
    int fd = -1;
    std::string path;
    TraceHeader header{};
    std::atomic<std::uint64_t> records{0};
    int error = 0;              // the first write(2) error: records after it are dropped
    std::size_t buffer_bytes = 0;
    std::chrono::milliseconds interval{20};
};

// Never destroyed: a trace still running at exit is closed by an atexit handler, and a forked
// child forgets its parent's (fork_child) without running anything of it.
Writer& writer() {
    static Writer* w = new Writer;
    return *w;
}

bool write_all(int fd, const void* data, std::size_t bytes) {
    const auto* p = static_cast<const char*>(data);
    while (bytes) {
        const ssize_t n = ::write(fd, p, bytes);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        p += n;
        bytes -= std::size_t(n);
    }
    return true;
}

bool thread_gone(std::uint32_t tid) {
    return syscall(SYS_tgkill, getpid(), pid_t(tid), 0) != 0 && errno == ESRCH;
}

// Moves every ring's records into the file, and frees the rings of threads that have ended. Called
// with w.lock held, by the drainer (and by stop, after the last fault has left its ring).
void drain(Writer& w) {
    TraceState& t = trace_state();
    for (std::size_t k = 0; k < TraceState::kRings; ++k) {
        detail::TraceRing& ring = t.rings[k];
        const std::uint32_t owner = ring.owner.load(std::memory_order_acquire);
        if (!owner) continue;
        const std::uint64_t tail = ring.tail.load(std::memory_order_relaxed);
        const std::uint64_t head = ring.head.load(std::memory_order_acquire);
        if (head != tail) {
            const TraceRecord* base = t.buffers + k * t.capacity;
            const std::uint64_t first = tail & (t.capacity - 1), n = head - tail;
            const std::uint64_t before_wrap = std::min(n, t.capacity - first);
            if (w.error) {
                t.dropped.fetch_add(n, std::memory_order_relaxed);
            } else if (!write_all(w.fd, base + first, before_wrap * sizeof(TraceRecord)) ||
                       !write_all(w.fd, base, (n - before_wrap) * sizeof(TraceRecord))) {
                w.error = errno ? errno : EIO;
                t.dropped.fetch_add(n, std::memory_order_relaxed);
            } else {
                w.records.fetch_add(n, std::memory_order_relaxed);
            }
            ring.tail.store(head, std::memory_order_release);
        } else if (thread_gone(owner)) {
            ring.owner.store(0, std::memory_order_release);
        }
    }
    if (!w.error) {
        w.header.dropped = t.dropped.load(std::memory_order_relaxed);
        if (pwrite(w.fd, &w.header.dropped, sizeof w.header.dropped, offsetof(TraceHeader, dropped)) < 0)
            w.error = errno;
    }
}

void drainer_main(Writer* w) {
    std::unique_lock<std::mutex> guard(w->lock);
    while (!w->stopping) {
        w->wake.wait_for(guard, w->interval, [w] { return w->stopping; });
        if (!w->stopping) drain(*w);
    }
}

void start_drainer(Writer& w) {
    // The drainer takes no signal meant for the program (the reclaimer's rule, reclaim.cpp).
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
        w.drainer = std::thread(drainer_main, &w);
    } catch (const std::system_error& e) {
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        fail(e.code().value(), "usermm::start_trace: cannot start the thread that writes {}", w.path);
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void stop_at_exit() {
    try {
        const TraceStats s = stop_trace();
        if (s.dropped)
            std::fprintf(stderr, "usermm: trace %s: %llu records, %llu dropped (full rings)\n", writer().path.c_str(),
                         static_cast<unsigned long long>(s.records), static_cast<unsigned long long>(s.dropped));
    } catch (const Error& e) {
        std::fprintf(stderr, "%s\n", e.what());
    }
}

// The child of fork has no drainer, and the file is its parent's: the trace stops there, silently.
// The locks may have been held by a thread the child does not have, and the drainer's handle names
// one: they are made anew in place, forgetting the parent's (destroying them would act on threads
// that are not here). The rings too: a thread the child does not have may have been in the middle of a record (busy).
void fork_child() {
    TraceState& t = trace_state();
    Writer& w = writer();
    new (&w.control) std::mutex;
    new (&w.lock) std::mutex;
    new (&w.wake) std::condition_variable;
    if (w.drainer.joinable()) new (&w.drainer) std::thread;
    for (detail::TraceRing& ring : t.rings) {
        ring.owner.store(0, std::memory_order_relaxed);
        ring.busy.store(0, std::memory_order_relaxed);
    }
    if (!t.on.load(std::memory_order_relaxed)) return;
    t.on.store(false, std::memory_order_relaxed);
    ::close(w.fd);
    w.fd = -1;
}

[[gnu::constructor]] void register_fork_handler() { pthread_atfork(nullptr, nullptr, fork_child); }

// start_trace, once the process is set up (init_process, which calls it for USERMM_TRACE).
void start(const std::string& path, const TraceOptions& options) {
    static constexpr const char* call = "usermm::start_trace";
    if (options.ring_records == 0 || options.ring_records > (std::size_t(1) << 24))
        fail(EINVAL, "{}: ring_records {} (path {}) must be between 1 and 2^24", call, options.ring_records, path);
    if (options.drain_interval_ms == 0)
        fail(EINVAL, "{}: drain_interval_ms 0 (path {}) must be positive", call, path);
    Writer& w = writer();
    std::lock_guard<std::mutex> control(w.control);
    std::lock_guard<std::mutex> guard(w.lock);
    TraceState& t = trace_state();
    if (t.on.load(std::memory_order_relaxed))
        fail(EBUSY, "{}: a trace is already being recorded into {} (path {})", call, w.path, path);
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail(errno, "{}: cannot create {}", call, path);
    const std::uint64_t capacity = std::bit_ceil(std::uint64_t(options.ring_records));
    const std::size_t bytes = TraceState::kRings * capacity * sizeof(TraceRecord);
    // No fault writes a buffer now (the last trace's stop waited for them): a buffer of another
    // size can go. Untouched pages of the new one cost nothing; a thread's ring is committed as
    // its faults fill it.
    if (t.buffers && w.buffer_bytes != bytes) {
        munmap(t.buffers, w.buffer_bytes);
        t.buffers = nullptr;
    }
    if (!t.buffers) {
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            const int err = errno;
            ::close(fd);
            fail(err, "{}: cannot map {} bytes of rings for {}", call, bytes, path);
        }
        t.buffers = static_cast<TraceRecord*>(p);
        w.buffer_bytes = bytes;
    }
    t.capacity = capacity;
    for (detail::TraceRing& ring : t.rings) {
        ring.owner.store(0, std::memory_order_relaxed);
        ring.head.store(0, std::memory_order_relaxed);
        ring.tail.store(0, std::memory_order_relaxed);
    }
    t.dropped.store(0, std::memory_order_relaxed);
    t.start_ns = detail::now_ns();
    w.header = {};
    std::memcpy(w.header.magic, kTraceMagic, sizeof kTraceMagic);
    w.header.version = kTraceVersion;
    w.header.header_size = sizeof(TraceHeader);
    w.header.record_size = sizeof(TraceRecord);
    w.header.page_size = std::uint32_t(detail::g_page_size);
    w.header.pid = std::uint32_t(getpid());
    w.header.start_ns = t.start_ns;
    w.header.start_realtime_ns = realtime_ns();
    if (!write_all(fd, &w.header, sizeof w.header)) {
        const int err = errno ? errno : EIO;
        ::close(fd);
        fail(err, "{}: cannot write the header of {}", call, path);
    }
    w.fd = fd;
    w.path = path;
    w.records.store(0, std::memory_order_relaxed);
    w.error = 0;
    w.stopping = false;
    w.interval = std::chrono::milliseconds(options.drain_interval_ms);
    try {
        start_drainer(w);
    } catch (...) {
        ::close(fd);
        w.fd = -1;
        throw;
    }
    t.generation.fetch_add(1, std::memory_order_relaxed);
    t.on.store(true, std::memory_order_release);
}

}  // namespace

void start_trace(const std::string& path, const TraceOptions& options) {
    detail::init_process();
    start(path, options);
}

TraceStats stop_trace() {
    Writer& w = writer();
    std::lock_guard<std::mutex> control(w.control);
    std::unique_lock<std::mutex> guard(w.lock);
    TraceState& t = trace_state();
    if (!t.on.load(std::memory_order_relaxed)) return {};
    t.on.store(false, std::memory_order_seq_cst);
    for (const detail::TraceRing& ring : t.rings)
        while (ring.busy.load(std::memory_order_seq_cst)) std::this_thread::yield();
    w.stopping = true;
    guard.unlock();
    w.wake.notify_all();
    w.drainer.join();
    guard.lock();
    drain(w);
    const TraceStats s{w.records.load(std::memory_order_relaxed), t.dropped.load(std::memory_order_relaxed)};
    w.header.records = s.records;
    w.header.dropped = s.dropped;
    w.header.closed = 1;
    if (!w.error && pwrite(w.fd, &w.header, sizeof w.header, 0) != ssize_t(sizeof w.header)) w.error = errno ? errno : EIO;
    if (::close(w.fd) != 0 && !w.error) w.error = errno;
    w.fd = -1;
    if (w.error)
        fail(w.error, "usermm::stop_trace: writing {} failed: {} records written, {} lost", w.path, s.records,
             s.dropped);
    return s;
}

TraceStats trace_stats() {
    const TraceState& t = trace_state();
    if (!t.on.load(std::memory_order_relaxed)) return {};
    return {writer().records.load(std::memory_order_relaxed), t.dropped.load(std::memory_order_relaxed)};
}

// USERMM_TRACE=FILE: the whole run is traced, and the file closed at exit.
// "%p" in the path becomes the process's pid: the programs a traced program starts inherit the
// variable, and would each truncate the same file.
void detail::start_trace_from_environment() {
    const char* value = std::getenv("USERMM_TRACE");
    if (!value || !*value) return;
    std::string path = value;
    for (std::size_t at; (at = path.find("%p")) != std::string::npos;) path.replace(at, 2, std::to_string(getpid()));
    try {
        start(path, {});
        std::atexit(stop_at_exit);
    } catch (const Error& e) {
        std::fprintf(stderr, "%s: USERMM_TRACE is ignored\n", e.what());
    }
}

}  // namespace usermm
