// The store pool: snapshot stores kept after their snapshots were released, so that the next
// snapshots' copies land on pages that are already there. fork()'s copy-on-write copies into a page
// the kernel allocates without zeroing; a fresh store page is allocated and zeroed first, and then
// overwritten whole by the copy. Process-wide, as the kernel's free lists are: a checkpoint loop's
// snapshot N reuses the store of snapshot N - 2, and a new arena the store of one that is gone.
#pragma once

#include <cstddef>
#include <cstdint>

namespace usermm::detail {

// A store reservation: `pages` pages of MAP_NORESERVE address space, of which the first `backed`
// were written by copies before the pool kept it (the kernel may have taken some since: MADV_FREE).
// `shared`: a fork may have shared the backed pages with a child since they were written, so that
// the first write to each is a copy-on-write fault (the kernel reuses a page no child maps any
// more); `forks` is the number of forks the pool had seen when that was last decided.
struct StoreSpan {
    std::byte* base = nullptr;
    std::size_t pages = 0;
    std::size_t backed = 0;
    bool shared = false;
    std::uint64_t forks = 0;
};

// A store of at least `pages` pages: the kept one with the most pages backed, if one is that large,
// else a fresh reservation (backed 0). Returns 0 or errno.
int store_reserve(std::size_t pages, StoreSpan* out);

// Gives a released snapshot's store back: the pool keeps it, its backed pages freeable, when its
// limit allows (dropping its oldest stores to make room); otherwise it is unmapped.
void store_release(StoreSpan s);

}  // namespace usermm::detail
