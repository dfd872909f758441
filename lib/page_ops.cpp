#include "page_ops.hpp"

#include <sys/mman.h>

#include <cerrno>

#include "pte.hpp"

namespace usermm::detail {

namespace {
int result(int rc) { return rc == 0 ? 0 : errno; }
}  // namespace

int page_reserve(std::size_t len, void** out) {
    void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return errno;
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
