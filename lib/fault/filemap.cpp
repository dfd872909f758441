#include "filemap.hpp"

#include <sys/mman.h>

#include <algorithm>

#include "page_ops.hpp"

namespace usermm::detail {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

FileRange clamp(FileRange r, FileRange limit) {
    r.first = std::max(r.first, limit.first);
    r.last = std::min(r.last, limit.last);
    if (r.last < r.first) r.last = r.first;
    return r;
}

}  // namespace

FileRange readahead_window(const Vma& vma, std::uint64_t page, FileRange around, std::uint64_t eof) {
    const std::uint64_t most = std::clamp<std::uint64_t>(std::max<std::uint64_t>(vma.readahead_max, vma.fault_around_pages),
                                                         1, kFileProbePages / 2);
    FileRange w;
    switch (vma.advice) {
        case Advice::Random:
            w = {page, page + 1};
            break;
        case Advice::Sequential:
            w = {page, page + most};
            break;
        default:
            if (page == vma.ra_next.load(kRelaxed)) {
                const std::uint64_t grown = 2 * std::uint64_t(vma.ra_window.load(kRelaxed));
                w = {page, page + std::clamp<std::uint64_t>(grown, std::min(around.last - around.first, most), most)};
            } else if (vma.ra_misses.load(kRelaxed) > kReadaroundMisses) {
                w = {page, page + 1};  // random access: what was read around a fault went unused
            } else {
                w = around;
            }
            break;
    }
    const FileRange vma_pages{vma.pgoff, vma.file_page(vma.end)};
    return clamp(clamp(w, vma_pages), {0, eof});
}

void readahead_update(Vma& vma, FileRange read) {
    if (read.first == read.last) return;
    vma.ra_next.store(read.last, kRelaxed);
    vma.ra_window.store(std::uint32_t(read.last - read.first), kRelaxed);
}

int filemap_probe(std::uintptr_t addr, std::size_t n, unsigned char* vec) {
    return page_resident(addr, n << g_page_shift, vec);
}

int filemap_readahead(std::uintptr_t addr, std::size_t len) { return page_advise(addr, len, MADV_WILLNEED); }

}  // namespace usermm::detail
