#include "page_ops.hpp"

#include <sys/mman.h>

#include <cerrno>

#include "pte.hpp"

namespace usermm::detail {

namespace {
int result(int rc) { return rc == 0 ? 0 : errno; }
}  // namespace

// The kernel merges neighbouring pieces of a private mapping only if they share one anon_vma, and
// creates the anon_vma at the first write into a piece. If that first write happened after the
// reservation was split by mprotect, every written piece would get its own anon_vma and never merge
// with its neighbours again, which defeats the map budget. So the reservation is written once while
// it is still one piece, then made PROT_NONE and emptied.
int page_reserve(std::size_t len, void** out) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return errno;
    *static_cast<volatile char*>(p) = 0;
    if (madvise(p, len, MADV_DONTNEED) != 0 || mprotect(p, len, PROT_NONE) != 0) {
        const int err = errno;
        munmap(p, len);
        return err;
    }
    *out = p;
    return 0;
}

int page_alloc_table(std::size_t len, void** out) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return errno;
    *out = p;
    return 0;
}

int page_release(std::uintptr_t addr, std::size_t len) { return result(munmap(reinterpret_cast<void*>(addr), len)); }

int page_protect(std::uintptr_t addr, std::size_t len, Prot prot) {
    return result(mprotect(reinterpret_cast<void*>(addr), len, to_mmap_prot(prot)));
}

int page_discard(std::uintptr_t addr, std::size_t len) {
    return result(madvise(reinterpret_cast<void*>(addr), len, MADV_DONTNEED));
}

}  // namespace usermm::detail
