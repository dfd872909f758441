// Page replacement simulated offline: the faults a reference string takes with a number of frames
// (demand paging: every miss loads the page, evicting one when the frames are full). Exact LRU,
// FIFO and Belady's OPT are the yardsticks issue 11's benchmark sets usermm's reclaim against;
// CLOCK, SIEVE and S3-FIFO model what usermm's own policies approach with the reference
// information they have. Pages are dense numbers, so every per-page structure is an array indexed
// by page (O(1) per reference; OPT O(log frames)).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace usermm_offline {

enum class Policy { Opt, Lru, Fifo, Clock, Sieve, S3Fifo };
inline constexpr Policy kPolicies[] = {Policy::Opt,   Policy::Lru,   Policy::Fifo,
                                       Policy::Clock, Policy::Sieve, Policy::S3Fifo};

inline std::string_view name(Policy p) {
    switch (p) {
        case Policy::Opt: return "OPT";
        case Policy::Lru: return "LRU";
        case Policy::Fifo: return "FIFO";
        case Policy::Clock: return "CLOCK";
        case Policy::Sieve: return "SIEVE";
        case Policy::S3Fifo: return "S3-FIFO";
    }
    return "?";
}

namespace detail {

inline constexpr std::uint32_t kNone = UINT32_MAX;

inline std::size_t page_count(std::span<const std::uint32_t> refs) {
    return refs.empty() ? 0 : std::size_t(*std::max_element(refs.begin(), refs.end())) + 1;
}

inline void check_frames(std::size_t frames) {
    if (frames == 0) throw std::invalid_argument("page replacement with no frames");
}

// A doubly linked list of pages threaded through two arrays, newest at the head.
class PageList {
public:
    explicit PageList(std::size_t pages) : newer_(pages, kNone), older_(pages, kNone) {}
    void push_newest(std::uint32_t p) {
        newer_[p] = kNone;
        older_[p] = head_;
        (head_ != kNone ? newer_[head_] : tail_) = p;
        head_ = p;
    }
    void remove(std::uint32_t p) {
        (newer_[p] != kNone ? older_[newer_[p]] : head_) = older_[p];
        (older_[p] != kNone ? newer_[older_[p]] : tail_) = newer_[p];
    }
    std::uint32_t oldest() const { return tail_; }
    std::uint32_t newer(std::uint32_t p) const { return newer_[p]; }

private:
    std::vector<std::uint32_t> newer_, older_;
    std::uint32_t head_ = kNone, tail_ = kNone;
};

// A FIFO of at most `capacity` pages in a ring.
class Ring {
public:
    explicit Ring(std::size_t capacity) : slots_(std::max<std::size_t>(capacity, 1)) {}
    void push(std::uint32_t p) {
        std::size_t at = first_ + size_;
        if (at >= slots_.size()) at -= slots_.size();
        slots_[at] = p;
        ++size_;
    }
    std::uint32_t pop() {
        const std::uint32_t p = slots_[first_];
        if (++first_ == slots_.size()) first_ = 0;
        --size_;
        return p;
    }
    std::size_t size() const { return size_; }

private:
    std::vector<std::uint32_t> slots_;
    std::size_t first_ = 0, size_ = 0;
};

}  // namespace detail

// Belady's OPT (MIN): evict the resident page whose next use is farthest away. The next use of each
// reference is found in one backward pass; the resident pages sit in a max-heap keyed by next use,
// indexed by page so that a hit raises its page's key in place (the key of a page referenced now is
// now, the smallest of the heap, and becomes its next use).
inline std::uint64_t opt_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    const std::size_t n = refs.size(), pages = detail::page_count(refs);
    std::vector<std::size_t> next_use(n);
    {
        std::vector<std::size_t> seen(pages, n);  // n: never again
        for (std::size_t i = n; i-- > 0;) {
            next_use[i] = seen[refs[i]];
            seen[refs[i]] = i;
        }
    }
    std::vector<std::size_t> key(pages);
    std::vector<std::uint32_t> slot(pages, detail::kNone), heap;
    heap.reserve(frames);
    const auto place = [&](std::size_t at, std::uint32_t p) {
        heap[at] = p;
        slot[p] = std::uint32_t(at);
    };
    const auto sift_up = [&](std::size_t at) {
        const std::uint32_t p = heap[at];
        while (at > 0 && key[heap[(at - 1) / 2]] < key[p]) {
            place(at, heap[(at - 1) / 2]);
            at = (at - 1) / 2;
        }
        place(at, p);
    };
    const auto sift_down = [&](std::size_t at) {
        const std::uint32_t p = heap[at];
        for (;;) {
            std::size_t child = 2 * at + 1;
            if (child >= heap.size()) break;
            if (child + 1 < heap.size() && key[heap[child + 1]] > key[heap[child]]) ++child;
            if (key[heap[child]] <= key[p]) break;
            place(at, heap[child]);
            at = child;
        }
        place(at, p);
    };
    std::uint64_t faults = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t p = refs[i];
        key[p] = next_use[i];
        if (slot[p] != detail::kNone) {
            sift_up(slot[p]);
            continue;
        }
        ++faults;
        if (heap.size() < frames) {
            heap.push_back(p);
            sift_up(heap.size() - 1);
        } else {
            slot[heap[0]] = detail::kNone;
            heap[0] = p;
            sift_down(0);
        }
    }
    return faults;
}

// Exact LRU: a hit moves its page to the head of the list, a miss evicts the tail.
inline std::uint64_t lru_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    const std::size_t pages = detail::page_count(refs);
    detail::PageList list(pages);
    std::vector<bool> resident(pages);
    std::size_t used = 0;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (resident[p]) {
            list.remove(p);
        } else {
            ++faults;
            if (used == frames) {
                const std::uint32_t victim = list.oldest();
                list.remove(victim);
                resident[victim] = false;
            } else {
                ++used;
            }
            resident[p] = true;
        }
        list.push_newest(p);
    }
    return faults;
}

// FIFO: the page loaded first leaves first, whatever its references.
inline std::uint64_t fifo_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    std::vector<bool> resident(detail::page_count(refs));
    detail::Ring queue(frames);
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (resident[p]) continue;
        ++faults;
        if (queue.size() == frames) resident[queue.pop()] = false;
        queue.push(p);
        resident[p] = true;
    }
    return faults;
}

// CLOCK (second chance): the frames in a circle, a referenced bit per page set by a hit; the hand
// clears set bits and evicts the first page whose bit is clear, loading the new page in its frame
// with the bit clear (the load is not a reference after loading: a page earns its second chance
// by a hit, as usermm's hinting faults will tell it).
inline std::uint64_t clock_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    const std::size_t pages = detail::page_count(refs);
    std::vector<bool> resident(pages), referenced(pages);
    std::vector<std::uint32_t> frame;
    frame.reserve(frames);
    std::size_t hand = 0;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (resident[p]) {
            referenced[p] = true;
            continue;
        }
        ++faults;
        resident[p] = true;
        if (frame.size() < frames) {
            frame.push_back(p);
            continue;
        }
        while (referenced[frame[hand]]) {
            referenced[frame[hand]] = false;
            if (++hand == frames) hand = 0;
        }
        resident[frame[hand]] = false;
        frame[hand] = p;
        if (++hand == frames) hand = 0;
    }
    return faults;
}

// SIEVE (Zhang et al., NSDI'24): a FIFO list with a visited bit per page set by a hit. New pages
// enter at the head; the hand walks from the tail towards the head, clearing visited bits, and
// evicts the first unvisited page, staying there for the next eviction (wrapping to the tail). Unlike
// CLOCK, a surviving page keeps its place, so new pages are met first by the hand only once the
// survivors' bits are clear.
inline std::uint64_t sieve_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    const std::size_t pages = detail::page_count(refs);
    detail::PageList list(pages);
    std::vector<bool> resident(pages), visited(pages);
    std::uint32_t hand = detail::kNone;
    std::size_t used = 0;
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (resident[p]) {
            visited[p] = true;
            continue;
        }
        ++faults;
        if (used == frames) {
            std::uint32_t victim = hand == detail::kNone ? list.oldest() : hand;
            while (visited[victim]) {
                visited[victim] = false;
                victim = list.newer(victim);
                if (victim == detail::kNone) victim = list.oldest();
            }
            hand = list.newer(victim);
            list.remove(victim);
            resident[victim] = false;
        } else {
            ++used;
        }
        list.push_newest(p);
        resident[p] = true;
    }
    return faults;
}

// S3-FIFO (Yang et al., SOSP'23): a small FIFO S of 10% of the frames takes new pages, a main FIFO
// M the rest, a ghost FIFO G remembers as many pages evicted from S as M holds. Each resident page
// counts its hits, capped at 3. An eviction, which frees one frame, takes from S while S holds at
// least its 10%: S's oldest page moves to M (its count reset) if it was hit while in S, else it
// leaves for G and the eviction is done; S's pages move on so until one leaves, M grows past its
// 90% or S is empty. Otherwise, or then, M's oldest page goes back to M's head with its count decremented while
// the count is not zero, else it leaves. A miss on a page in G loads it into M directly.
inline std::uint64_t s3fifo_faults(std::span<const std::uint32_t> refs, std::size_t frames) {
    detail::check_frames(frames);
    const std::size_t pages = detail::page_count(refs);
    const std::size_t small_target = std::max<std::size_t>(1, frames / 10);
    const std::size_t main_target = frames - small_target, ghost_size = main_target;
    enum : std::uint8_t { kOut, kSmall, kMain };
    std::vector<std::uint8_t> where(pages, kOut), hits(pages);
    // G as insertion stamps: a page is in G while fewer than ghost_size pages entered G after it.
    std::vector<std::uint64_t> ghost_stamp(pages);
    std::uint64_t ghost_entries = 0;
    detail::Ring small(frames), main(frames);
    const auto evict_main = [&] {
        for (;;) {
            const std::uint32_t t = main.pop();
            if (hits[t] == 0) {
                where[t] = kOut;
                return;
            }
            --hits[t];
            main.push(t);
        }
    };
    const auto evict = [&] {
        const bool from_small = small.size() >= small_target;
        while (from_small && small.size() > 0) {
            const std::uint32_t t = small.pop();
            if (hits[t] == 0) {
                where[t] = kOut;
                ghost_stamp[t] = ++ghost_entries;
                return;
            }
            hits[t] = 0;
            where[t] = kMain;
            main.push(t);
            if (main.size() > main_target) break;
        }
        evict_main();
    };
    std::uint64_t faults = 0;
    for (const std::uint32_t p : refs) {
        if (where[p] != kOut) {
            if (hits[p] < 3) ++hits[p];
            continue;
        }
        ++faults;
        if (small.size() + main.size() == frames) evict();
        hits[p] = 0;
        if (ghost_stamp[p] != 0 && ghost_entries - ghost_stamp[p] < ghost_size) {
            ghost_stamp[p] = 0;
            where[p] = kMain;
            main.push(p);
        } else {
            where[p] = kSmall;
            small.push(p);
        }
    }
    return faults;
}

inline std::uint64_t faults(Policy policy, std::span<const std::uint32_t> refs, std::size_t frames) {
    switch (policy) {
        case Policy::Opt: return opt_faults(refs, frames);
        case Policy::Lru: return lru_faults(refs, frames);
        case Policy::Fifo: return fifo_faults(refs, frames);
        case Policy::Clock: return clock_faults(refs, frames);
        case Policy::Sieve: return sieve_faults(refs, frames);
        case Policy::S3Fifo: return s3fifo_faults(refs, frames);
    }
    throw std::invalid_argument("unknown replacement policy");
}

}  // namespace usermm_offline
