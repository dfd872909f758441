// usermm::memory_resource: size classes in memory that outlives the process (see the header).
// Every piece of state is an offset from the heap's start, inside the heap itself.
#include <usermm/memory_resource.hpp>
#include <usermm/usermm.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>

namespace usermm {

namespace {
constexpr std::uint64_t kMagic = 0x524d4d5245535555ull;  // "UUSERMMR"
constexpr std::size_t kMinClass = 4;                      // 16 bytes
constexpr std::size_t kClasses = 48;                      // up to 2^51 bytes: more than any arena
constexpr std::size_t kMaxAlign = 4096;                   // blocks are aligned to min(size, this)
}  // namespace

struct memory_resource::Heap {
    std::uint64_t magic;
    std::uint64_t length;  // of the whole range
    std::uint64_t top;     // offset of the untouched end
    std::uint64_t in_use;
    std::uint64_t root;  // offset of the caller's root pointer's target, 0 for none
    std::uint64_t free[kClasses];  // offset of the first free block of each class; each holds the next
};

memory_resource& memory_resource::format(void* addr, std::size_t length) {
    const auto at = reinterpret_cast<std::uintptr_t>(addr);
    if (at % 16)
        throw Error(EINVAL, fmt::format("usermm::memory_resource::format: addr {:#x} is not 16-byte aligned", at));
    constexpr std::size_t state = sizeof(Heap) + sizeof(memory_resource);
    if (length < state + 16)
        throw Error(EINVAL, fmt::format("usermm::memory_resource::format: length {:#x} at addr {:#x} is below the "
                                        "{} bytes of the heap's state",
                                        length, at, state + 16));
    auto* heap = static_cast<Heap*>(addr);
    std::memset(heap, 0, sizeof *heap);
    heap->magic = kMagic;
    heap->length = length;
    heap->top = (state + 15) / 16 * 16;
    return *new (heap + 1) memory_resource(heap);
}

memory_resource& memory_resource::attach(void* addr) {
    const auto at = reinterpret_cast<std::uintptr_t>(addr);
    auto* heap = static_cast<Heap*>(addr);
    if (at % 16 || heap->magic != kMagic)
        throw Error(EINVAL, fmt::format("usermm::memory_resource::attach: addr {:#x} holds no heap", at));
    return *new (heap + 1) memory_resource(heap);
}

void memory_resource::set_root(void* p) {
    heap_->root = p ? std::uint64_t(static_cast<char*>(p) - reinterpret_cast<char*>(heap_)) : 0;
}
void* memory_resource::root() const { return heap_->root ? reinterpret_cast<char*>(heap_) + heap_->root : nullptr; }
std::size_t memory_resource::capacity() const { return heap_->length; }
std::size_t memory_resource::in_use() const { return heap_->in_use; }

namespace {
// The class of a request: the smallest power of two that holds it and its alignment.
std::size_t size_class(std::size_t bytes, std::size_t alignment) {
    const std::size_t need = std::max({bytes, alignment, std::size_t(1) << kMinClass});
    return std::size_t(std::bit_width(need - 1));
}
}  // namespace

void* memory_resource::do_allocate(std::size_t bytes, std::size_t alignment) {
    if (alignment > kMaxAlign || bytes > (std::size_t(1) << (kClasses - 1))) throw std::bad_alloc();
    const std::size_t c = size_class(bytes, alignment);
    const std::size_t size = std::size_t(1) << c;
    char* const base = reinterpret_cast<char*>(heap_);
    if (const std::uint64_t off = heap_->free[c]) {
        std::memcpy(&heap_->free[c], base + off, sizeof(std::uint64_t));
        heap_->in_use += size;
        return base + off;
    }
    const std::size_t align = std::min(size, kMaxAlign);
    const std::uint64_t start = (heap_->top + align - 1) / align * align;
    if (start > heap_->length || size > heap_->length - start) throw std::bad_alloc();
    heap_->top = start + size;
    heap_->in_use += size;
    return base + start;
}

void memory_resource::do_deallocate(void* p, std::size_t bytes, std::size_t alignment) {
    const std::size_t c = size_class(bytes, alignment);
    const std::uint64_t off = std::uint64_t(static_cast<char*>(p) - reinterpret_cast<char*>(heap_));
    std::memcpy(p, &heap_->free[c], sizeof(std::uint64_t));
    heap_->free[c] = off;
    heap_->in_use -= std::size_t(1) << c;
}

}  // namespace usermm
