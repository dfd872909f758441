// usermm::memory_resource: a std::pmr::memory_resource whose whole state lives in the memory it
// manages, so that pmr containers built in an arena survive a snapshot image and
// Arena::load(fds, {.at_original_base = true}).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory_resource>

#include <usermm/export.hpp>

namespace usermm {

// A heap over [addr, addr + length) of writable memory (a VMA from Arena::map, say). Its first
// bytes hold the heap's state and this object itself; the rest is handed out by size class
// (powers of two from 16 bytes, each freed block kept for the next request of its class, new
// blocks cut from the untouched end), so only pages actually used are ever touched. Alignments up
// to the page size are honoured. Exhaustion throws std::bad_alloc. Not thread-safe, like
// std::pmr::unsynchronized_pool_resource: one thread at a time.
//
// A container that lives in the heap points to this object (through its polymorphic_allocator)
// and to its own nodes, all inside the range; after loading the arena at its original base,
// attach() makes the object usable again in the new process (it rewrites only the object, whose
// code pointers belong to the process), and the container works as before.
class USERMM_API memory_resource final : public std::pmr::memory_resource {
public:
    // Makes the range an empty heap. addr must be 16-byte aligned; throws usermm::Error (EINVAL)
    // if the range is too small for the heap's state.
    static memory_resource& format(void* addr, std::size_t length);
    // The heap formatted at addr before (in this process, or in the one that wrote the image).
    // Throws usermm::Error (EINVAL) if addr holds none.
    static memory_resource& attach(void* addr);

    // A pointer kept in the heap's state for the caller, e.g. the container to find after a load.
    void set_root(void* p);
    void* root() const;
    std::size_t capacity() const;  // bytes of the range
    std::size_t in_use() const;    // bytes of the blocks handed out and not freed

    memory_resource(const memory_resource&) = delete;
    memory_resource& operator=(const memory_resource&) = delete;

private:
    struct Heap;
    explicit memory_resource(Heap* heap) : heap_(heap) {}
    void* do_allocate(std::size_t bytes, std::size_t alignment) override;
    void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override;
    bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }

    Heap* heap_;
};

}  // namespace usermm
