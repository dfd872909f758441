// Stores: where an arena's evicted pages go (the kernel's swap devices), and SwapFile, the store
// built in. A Store holds pages in numbered slots: usermm asks it for slots, writes pages to them in
// batches, reads them back at a fault (do_swap_page) and releases a slot when no process needs its
// page any more. Errors are per page, so that one bad slot never fails a batch.
//
// Rules for a user-defined Store (the public contract; SwapFile keeps it too):
//  - Every call may come from any thread, concurrently with every other call, but never from a
//    signal handler unless async_signal_safe() is true: usermm calls stores from its own I/O
//    threads, and a faulting thread waits for its page. A store may allocate, lock and block.
//  - A page is page_size() bytes at a page-aligned address (usermm's buffers), so that a store
//    may hand it to O_DIRECT I/O as it is.
//  - A slot's content is what the last successful write put there, until the slot is released;
//    a failed write leaves the page resident in the arena (usermm retries it later), and a failed
//    read is SIGBUS for the program, never a page of zeros.
//  - Slots are reference-counted across fork(): before fork usermm calls retain() for every slot an
//    arena refers to, so that the parent and the child each release their own reference (the
//    kernel's swap_duplicate). A store whose slot table is private to a process must make retain()
//    fail (ENOTSUP): fork() then reads the slots back into the arena before the child exists, and
//    the child's arena stops using the store (it keeps its memory, without a resident limit; one
//    line on stderr), since two processes handing out the same slots of one device would overwrite
//    each other's pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <usermm/export.hpp>

namespace usermm {

// One page of a batch: its slot, its bytes, and the store's answer for it (0, or an errno value).
struct PageIo {
    std::uint64_t slot = 0;
    void* data = nullptr;
    int error = 0;
};

class USERMM_API Store {
public:
    virtual ~Store() = default;

    // Slots for pages about to be written: fills a prefix of `slots` and returns its length (0
    // when the store is full). Each slot starts with one reference.
    virtual std::size_t allocate(std::span<std::uint64_t> slots) = 0;
    // Drops one reference to each slot; a slot without references may be handed out again.
    virtual void release(std::span<const std::uint64_t> slots) = 0;
    // Adds one reference to each slot (before fork). 0, or an errno value with nothing changed.
    virtual int retain(std::span<const std::uint64_t> slots) = 0;

    // Writes and reads a batch; each page's `error` says how it went. Pages of one batch may be
    // written or read in any order and at once; a read's first page is the one a fault waits for
    // (the others are its readahead), so a store that must order them serves it first. A write's `data` may be the page itself in the
    // arena, readable for the call and no longer.
    virtual void write(std::span<PageIo> pages) = 0;
    virtual void read(std::span<PageIo> pages) = 0;

    // Pages the store can hold at once.
    virtual std::uint64_t capacity() const = 0;
    // True if allocate(), release(), read() and write() may run in a signal handler (no
    // allocation, no locks, only async-signal-safe system calls, no exception): then a fault reads
    // its own page, and evicts a batch at the resident limit (direct reclaim), without a thread switch.
    virtual bool async_signal_safe() const noexcept { return false; }
    // For diagnostics: what and where the store is ("swap file /var/tmp/app.swap").
    virtual std::string describe() const = 0;
};

struct SwapFileOptions {
    // Bypass the page cache with O_DIRECT (where the file system refuses it, e.g. ramfs, or with
    // false, the pages written or read are dropped from the page cache after each batch instead),
    // so that swapped pages do not stay in memory and defeat the resident limit. tmpfs accepts
    // O_DIRECT (Linux 6.6 on) but, like ramfs, is memory whichever way: put the file on a disk.
    bool direct = true;
};

// Page slots in one file, created (or truncated) at `path` and removed with the store. The file
// is sparse: it takes disk space only for slots written, lowest free slot first, so that it does
// not grow past the most pages swapped out at once. The slot table lives in memory shared with
// child processes, so retain() works across fork(). async_signal_safe() is true.
class USERMM_API SwapFile final : public Store {
public:
    SwapFile(std::string path, std::uint64_t size_bytes, SwapFileOptions options = {});
    ~SwapFile() override;
    SwapFile(const SwapFile&) = delete;
    SwapFile& operator=(const SwapFile&) = delete;

    std::size_t allocate(std::span<std::uint64_t> slots) override;
    void release(std::span<const std::uint64_t> slots) override;
    int retain(std::span<const std::uint64_t> slots) override;
    void write(std::span<PageIo> pages) override;
    void read(std::span<PageIo> pages) override;
    std::uint64_t capacity() const override;
    bool async_signal_safe() const noexcept override { return true; }
    std::string describe() const override;

    std::uint64_t slots_in_use() const;  // slots with at least one reference
    const std::string& path() const;
    bool direct() const;  // whether O_DIRECT was granted

private:
    struct State;
    std::unique_ptr<State> state_;
};

}  // namespace usermm
