#include "far_common.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <sched.h>
#include <unistd.h>

#include <signal.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <mutex>

namespace usermm::far {

Endpoint parse_endpoint(const char* call, const std::string& address) {
    const std::size_t colon = address.rfind(':');
    Endpoint e;
    e.text = address;
    if (colon == std::string::npos || colon == 0)
        fail(EINVAL, "{}: server address '{}' is not host:port", call, address);
    e.host = address.substr(0, colon);
    const char* first = address.data() + colon + 1;
    const char* last = address.data() + address.size();
    const auto [end, ec] = std::from_chars(first, last, e.port);
    if (ec != std::errc() || end != last || e.port <= 0 || e.port > 65535)
        fail(EINVAL, "{}: server address '{}' has no port in 1..65535", call, address);
    return e;
}

// --- the slot table ------------------------------------------------------------------------------

// Processes that shared a table at once, at most: past it a child is not registered, and the
// table's last user cannot tell whether it is alone (it then leaves what is left).
constexpr std::size_t kMaxUsers = 256;

struct SlotTable::Header {
    pthread_mutex_t lock;
    std::uint64_t next_fresh;  // slots below it were handed out at least once
    std::uint64_t free_count;  // of free_[]
    std::uint64_t in_use;
    std::uint64_t copies[kMaxServers];
    std::uint32_t users;
    bool users_overflowed;
    pid_t user[kMaxUsers];
};

struct SlotTable::Entry {
    std::uint32_t refs;
    std::uint32_t generation;
    ServerMask where;  // atomic_ref: written after a write, read by readers without the lock
};

namespace {
template <typename T>
std::atomic_ref<T> at(T& v) {
    return std::atomic_ref<T>(v);
}
}  // namespace

namespace {
// The tables of this process, for the fork handler that registers a child with each. Taken by the
// handler's prepare step and by a table's constructor and destructor only: no store call waits
// for it, so holding it across fork() blocks nobody the fork waits for.
std::mutex g_tables_lock;
std::vector<SlotTable*>* g_tables = nullptr;
std::once_flag g_fork_handler;
}  // namespace

void SlotTable::fork_prepare() { g_tables_lock.lock(); }
void SlotTable::fork_parent() { g_tables_lock.unlock(); }
void SlotTable::fork_child() {
    const pid_t me = getpid();
    if (g_tables)
        for (SlotTable* t : *g_tables) t->add_user(me);
    g_tables_lock.unlock();
}

void SlotTable::add_user(pid_t pid) {
    lock();
    if (header_->users < kMaxUsers)
        header_->user[header_->users++] = pid;
    else
        header_->users_overflowed = true;
    unlock();
}

// Under the lock: `slot`, whose last reference went, is free again, and its copies are `dead`.
void SlotTable::free_slot(std::uint64_t slot, std::vector<Dead>& dead) {
    Entry& e = entries_[slot];
    const ServerMask where = at(e.where).exchange(0, std::memory_order_relaxed);
    for (ServerMask m = where; m; m &= m - 1) --header_->copies[std::countr_zero(m)];
    dead.push_back({slot, e.generation, where});
    free_[header_->free_count++] = slot;
    --header_->in_use;
}

bool SlotTable::last_user(std::vector<Dead>& dead) {
    const pid_t me = getpid();
    lock();
    // Users that are gone are dropped; a zombie counts as gone (it will release nothing more).
    std::uint32_t alive = 0;
    bool others = header_->users_overflowed;
    for (std::uint32_t i = 0; i < header_->users; ++i) {
        const pid_t pid = header_->user[i];
        bool live = pid == me;
        if (!live && kill(pid, 0) == 0) {
            char path[64], state = 'Z';
            std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
            if (FILE* f = std::fopen(path, "r")) {
                if (std::fscanf(f, "%*d (%*[^)]) %c", &state) != 1) state = 'R';
                std::fclose(f);
            }
            live = state != 'Z' && state != 'X';
        }
        if (!live) continue;
        others = others || pid != me;
        header_->user[alive++] = pid;
    }
    header_->users = alive;
    if (others) {
        unlock();
        return false;
    }
    for (std::uint64_t slot = 0; slot < header_->next_fresh; ++slot) {
        if (!entries_[slot].refs) continue;
        entries_[slot].refs = 0;
        free_slot(slot, dead);
    }
    unlock();
    return true;
}

SlotTable::SlotTable(const char* call, std::uint64_t capacity) : capacity_(capacity) {
    if (capacity == 0 || capacity > (std::uint64_t(1) << 36))
        fail(EINVAL, "{}: capacity {} slots is not in 1..2^36", call, capacity);
    const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
    const std::size_t header = (sizeof(Header) + page - 1) / page * page;
    bytes_ = header + std::size_t(capacity) * (sizeof(Entry) + sizeof(std::uint64_t));
    bytes_ = (bytes_ + page - 1) / page * page;
    // Reserved whole and paged in as slots are used; shared, so that a forked child uses the same.
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail(errno, "{}: cannot reserve a slot table of {} bytes for {} slots", call, bytes_, capacity);
    header_ = static_cast<Header*>(p);
    entries_ = reinterpret_cast<Entry*>(static_cast<char*>(p) + header);
    free_ = reinterpret_cast<std::uint64_t*>(entries_ + capacity);
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    // A process killed while it holds the lock (a child killed by a test) must not stop the others.
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&header_->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    header_->user[header_->users++] = getpid();
    std::call_once(g_fork_handler, [] { pthread_atfork(fork_prepare, fork_parent, fork_child); });
    std::lock_guard guard(g_tables_lock);
    if (!g_tables) g_tables = new std::vector<SlotTable*>;
    g_tables->push_back(this);
}

SlotTable::~SlotTable() {
    {
        std::lock_guard guard(g_tables_lock);
        std::erase(*g_tables, this);
    }
    // The lock stays initialised: another process may still use the table (it is destroyed with
    // the last mapping).
    munmap(header_, bytes_);
}

void SlotTable::lock() const {
    // The table's counts are changed under the lock in steps that leave it consistent at each
    // store; a holder that died left at worst one slot's count unchanged.
    if (pthread_mutex_lock(&header_->lock) == EOWNERDEAD) pthread_mutex_consistent(&header_->lock);
}

void SlotTable::unlock() const { pthread_mutex_unlock(&header_->lock); }

std::size_t SlotTable::allocate(std::span<std::uint64_t> out) {
    lock();
    std::size_t n = 0;
    for (; n < out.size(); ++n) {
        std::uint64_t slot;
        if (header_->free_count)
            slot = free_[--header_->free_count];
        else if (header_->next_fresh < capacity_)
            slot = header_->next_fresh++;
        else
            break;
        Entry& e = entries_[slot];
        e.refs = 1;
        ++e.generation;
        at(e.where).store(0, std::memory_order_relaxed);
        out[n] = slot;
    }
    header_->in_use += n;
    unlock();
    return n;
}

void SlotTable::release(std::span<const std::uint64_t> slots, std::vector<Dead>& dead) {
    lock();
    for (const std::uint64_t slot : slots) {
        if (slot >= capacity_ || entries_[slot].refs == 0) continue;  // not ours to drop: nothing changes
        if (--entries_[slot].refs == 0) free_slot(slot, dead);
    }
    unlock();
}

int SlotTable::retain(std::span<const std::uint64_t> slots) {
    lock();
    for (const std::uint64_t slot : slots)
        if (slot >= capacity_ || entries_[slot].refs == 0 || entries_[slot].refs == UINT32_MAX) {
            unlock();
            return EINVAL;
        }
    for (const std::uint64_t slot : slots) ++entries_[slot].refs;
    unlock();
    return 0;
}

std::uint32_t SlotTable::generation(std::uint64_t slot) const {
    return slot < capacity_ ? at(entries_[slot].generation).load(std::memory_order_relaxed) : 0;
}

ServerMask SlotTable::where(std::uint64_t slot) const {
    return slot < capacity_ ? at(entries_[slot].where).load(std::memory_order_acquire) : 0;
}

void SlotTable::set_where(std::uint64_t slot, ServerMask where) {
    if (slot >= capacity_) return;
    lock();
    at(entries_[slot].where).store(where, std::memory_order_release);
    for (ServerMask m = where; m; m &= m - 1) ++header_->copies[std::countr_zero(m)];
    unlock();
}

std::uint64_t SlotTable::in_use() const {
    lock();
    const std::uint64_t n = header_->in_use;
    unlock();
    return n;
}

std::uint64_t SlotTable::copies_on(std::size_t server) const {
    if (server >= kMaxServers) return 0;
    lock();
    const std::uint64_t n = header_->copies[server];
    unlock();
    return n;
}

// --- keys and placement --------------------------------------------------------------------------

std::string page_key(const std::string& prefix, std::uint64_t instance, std::uint64_t slot, std::uint32_t generation) {
    return fmt::format("{}:{:x}:{:x}:{:x}", prefix, instance, slot, generation);
}

void check_prefix(const char* call, const std::string& prefix) {
    constexpr std::size_t kMax = 250 - (16 + 16 + 8 + 3);  // instance, slot, generation in hex, colons
    if (prefix.empty() || prefix.size() > kMax)
        fail(EINVAL, "{}: key prefix of {} bytes: 1 to {} are allowed", call, prefix.size(), kMax);
    for (const char c : prefix)
        // Braces too: a Redis Cluster would hash every key by the part between them, to one slot.
        if (std::uint8_t(c) <= 0x20 || std::uint8_t(c) >= 0x7f || c == '{' || c == '}')
            fail(EINVAL, "{}: key prefix '{}' has a byte {:#04x}: only printable characters without spaces or braces",
                 call, prefix, unsigned(std::uint8_t(c)));
}

std::uint64_t random_instance() {
    std::uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != sizeof v)
        v = std::uint64_t(now_ns()) ^ (std::uint64_t(getpid()) << 32);  // no getrandom: still distinct per process
    return v;
}

std::uint64_t mix64(std::uint64_t x) {  // splitmix64's finaliser
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

ServerMask choose_servers(std::uint64_t key, ServerMask candidates, std::size_t servers, unsigned copies) {
    ServerMask chosen = 0;
    for (unsigned c = 0; c < copies; ++c) {
        std::uint64_t best = 0;
        int best_server = -1;
        for (std::size_t s = 0; s < servers; ++s) {
            const ServerMask bit = ServerMask(1) << s;
            if (!(candidates & bit) || (chosen & bit)) continue;
            const std::uint64_t score = mix64(key ^ mix64(s + 1));
            if (best_server < 0 || score > best) {
                best = score;
                best_server = int(s);
            }
        }
        if (best_server < 0) break;
        chosen |= ServerMask(1) << best_server;
    }
    return chosen;
}

// --- health --------------------------------------------------------------------------------------

std::int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

Health::Health(std::size_t servers, unsigned backoff_ms)
    : servers_(servers), backoff_ns_(std::int64_t(backoff_ms) * 1'000'000) {}

bool Health::up(std::size_t s) const { return servers_[s].up.load(std::memory_order_relaxed); }

bool Health::usable(std::size_t s) const {
    return up(s) || now_ns() >= servers_[s].retry_at_ns.load(std::memory_order_relaxed);
}

void Health::succeeded(std::size_t s) {
    servers_[s].failures.store(0, std::memory_order_relaxed);
    servers_[s].up.store(true, std::memory_order_relaxed);
}

void Health::failed(std::size_t s) {
    // Tried again after 20 backoffs, doubling with each failure in a row up to 64 times that.
    const unsigned n = std::min(servers_[s].failures.fetch_add(1, std::memory_order_relaxed), 6u);
    servers_[s].retry_at_ns.store(now_ns() + backoff_ns_ * 20 * (std::int64_t(1) << n), std::memory_order_relaxed);
    servers_[s].up.store(false, std::memory_order_relaxed);
}

ServerMask Health::usable_mask() const {
    ServerMask m = 0;
    for (std::size_t s = 0; s < servers_.size(); ++s)
        if (usable(s)) m |= ServerMask(1) << s;
    return m;
}

// --- counters ------------------------------------------------------------------------------------

void Counters::round_trip(std::int64_t ns) {
    round_trips.fetch_add(1, std::memory_order_relaxed);
    const std::uint64_t us = ns > 0 ? std::uint64_t(ns) / 1000 : 0;
    const std::size_t b = std::min<std::size_t>(std::size_t(std::bit_width(us)), FarStats::kLatencyBuckets - 1);
    latency[b].fetch_add(1, std::memory_order_relaxed);
}

void Counters::batch(std::size_t pages) {
    std::uint64_t seen = largest_batch.load(std::memory_order_relaxed);
    while (pages > seen && !largest_batch.compare_exchange_weak(seen, pages, std::memory_order_relaxed)) {
    }
}

FarStats Counters::snapshot() const {
    FarStats s;
    const auto get = [](const std::atomic<std::uint64_t>& v) { return v.load(std::memory_order_relaxed); };
    s.pages_sent = get(pages_sent);
    s.bytes_sent = get(bytes_sent);
    s.pages_received = get(pages_received);
    s.bytes_received = get(bytes_received);
    s.round_trips = get(round_trips);
    s.write_batches = get(write_batches);
    s.read_batches = get(read_batches);
    s.largest_batch = get(largest_batch);
    s.retries = get(retries);
    s.failovers = get(failovers);
    s.under_replicated = get(under_replicated);
    s.write_errors = get(write_errors);
    s.lost_pages = get(lost_pages);
    s.keys_deleted = get(keys_deleted);
    for (std::size_t i = 0; i < FarStats::kLatencyBuckets; ++i) s.latency[i] = get(latency[i]);
    return s;
}

pid_t current_pid() { return getpid(); }

DeleteQueue::DeleteQueue(std::size_t servers)
    : owner_(current_pid()), lists_(new std::vector<std::vector<SlotTable::Dead>>(servers)), servers_(servers) {}

void DeleteQueue::lock() {
    const pid_t me = current_pid();
    for (unsigned spins = 0;; ++spins) {
        pid_t held = 0;
        if (holder_.compare_exchange_weak(held, me, std::memory_order_acquire, std::memory_order_relaxed)) break;
        // Held by a thread of the parent, copied into this child mid-change: not ours to finish.
        if (held != 0 && held != me && holder_.compare_exchange_strong(held, me, std::memory_order_acquire)) break;
        if (spins > 64) sched_yield();
    }
    if (owner_ != me) {  // first use in a child of fork(): the lists (maybe torn) stay the parent's
        owner_ = me;
        lists_ = new std::vector<std::vector<SlotTable::Dead>>(servers_);
    }
}

void DeleteQueue::add(std::span<const SlotTable::Dead> dead) {
    lock();
    for (const SlotTable::Dead& d : dead)
        for (ServerMask m = d.where; m; m &= m - 1) (*lists_)[std::size_t(std::countr_zero(m))].push_back(d);
    unlock();
}

std::vector<SlotTable::Dead> DeleteQueue::take(std::size_t server) {
    std::vector<SlotTable::Dead> out;
    lock();
    out.swap((*lists_)[server]);
    unlock();
    return out;
}

std::size_t DeleteQueue::waiting(std::size_t server) {
    lock();
    const std::size_t n = (*lists_)[server].size();
    unlock();
    return n;
}

}  // namespace usermm::far

namespace usermm {

std::uint64_t FarStats::latency_percentile_us(double q) const {
    std::uint64_t total = 0;
    for (const std::uint64_t n : latency) total += n;
    if (!total) return 0;
    const double want = q * double(total);
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < kLatencyBuckets; ++i) {
        seen += latency[i];
        if (double(seen) >= want) return std::uint64_t(1) << i;
    }
    return std::uint64_t(1) << (kLatencyBuckets - 1);
}

}  // namespace usermm
