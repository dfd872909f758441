// PROCMAP_QUERY (Linux 6.11): the kernel's VMA at or after an address, one ioctl on /proc/self/maps,
// at a cost that does not grow with the process's mapping count. Debian 12's headers predate it.
// Both worlds ask it: the API to check and count the arena's mappings, the fault path to tell a
// thread's stack from its guard.
#pragma once

#include <sys/ioctl.h>

#include <cstdint>

namespace usermm::detail {

struct ProcmapQuery {
    std::uint64_t size;
    std::uint64_t query_flags;
    std::uint64_t query_addr;
    std::uint64_t vma_start;
    std::uint64_t vma_end;
    std::uint64_t vma_flags;
    std::uint64_t vma_page_size;
    std::uint64_t vma_offset;
    std::uint64_t inode;
    std::uint32_t dev_major;
    std::uint32_t dev_minor;
    std::uint32_t vma_name_size;
    std::uint32_t build_id_size;
    std::uint64_t vma_name_addr;
    std::uint64_t build_id_addr;
};
inline constexpr unsigned long kProcmapQuery = _IOWR('f', 17, ProcmapQuery);
inline constexpr std::uint64_t kQueryReadable = 0x01, kQueryWritable = 0x02, kQueryExecutable = 0x04,
                               kQueryShared = 0x08;
inline constexpr std::uint64_t kQueryCoveringOrNext = 0x10;

}  // namespace usermm::detail
