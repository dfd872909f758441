#include "write_tracking.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include "find_vma.hpp"
#include "page_ops.hpp"
#include "snapshot.hpp"

namespace usermm::detail {

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;

// The uffd engine.

int uffd_enrol(std::uintptr_t at, std::size_t len) { return uffd_register(at, len); }
pte_t uffd_armed_prot(pte_t prot) { return prot; }
int uffd_arm(ArenaCore& a, std::size_t i, std::size_t j, Prot) {
    return uffd_write_protect(a.page_addr(i), (j - i) << g_page_shift, true);
}
bool uffd_withheld_only(ArenaCore&, std::size_t, pte_t v) { return v & to_pte(Prot::Write); }
int uffd_disarm(ArenaCore& a, std::size_t i, std::size_t j, Prot) {
    return uffd_write_protect(a.page_addr(i), (j - i) << g_page_shift, false);
}
int uffd_clear_marks(std::uintptr_t at, std::size_t len) { return uffd_write_protect(at, len, false); }

// The protection does not show the tracking; only pagemap bit 57 does. Every writable page usermm
// tracks must carry that bit, or its next write would go unseen by the snapshots that need it.
void uffd_verify(const ArenaCore& a, const char* call, std::span<const PageSpan> spans) {
    // pagemap answers only reads of whole 8-byte entries, so no buffered stream.
    const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(errno, "{}: cannot open /proc/self/pagemap", call);
    struct Closer {
        int fd;
        ~Closer() { close(fd); }
    } closer{fd};
    constexpr std::uint64_t kUffdWp = std::uint64_t(1) << 57;
    auto tracked_writable = [&a](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        return (v & kPteWriteTracked) && (v & to_pte(Prot::Write)) ? 1 : kNoRun;
    };
    std::vector<std::uint64_t> entries;
    for (const PageSpan& part : spans) {
        for_each_run(part.first, part.last, tracked_writable, [&](std::size_t i, std::size_t j, int) {
            entries.resize(j - i);  // one read per run of tracked pages
            const std::size_t bytes = entries.size() * sizeof(std::uint64_t);
            const off_t at = off_t((a.page_addr(i) >> g_page_shift) * sizeof(std::uint64_t));
            const ssize_t n = pread(fd, entries.data(), bytes, at);
            if (n != ssize_t(bytes))
                fail(n < 0 ? errno : EIO, "{}: cannot read /proc/self/pagemap for [{:#x}, {:#x})", call, a.page_addr(i),
                     a.page_addr(j));
            for (std::size_t k = i; k < j; ++k)
                if (!(entries[k - i] & kUffdWp))
                    fail(EFAULT, "{}: page {:#x} is write-tracked but the kernel does not write-protect it", call,
                         a.page_addr(k));
        });
    }
}

// The pages whose write access was withheld lost their marks in the child: the mprotect engine
// takes them over.
void uffd_after_fork(ArenaCore& a) {
    auto key = [&a](std::size_t i) {
        const pte_t v = a.pte[i].load(kRelaxed);
        return (v & kPteWriteTracked) && (v & to_pte(Prot::Write)) ? int(v) : kNoRun;
    };
    auto convert = [&a](std::size_t i, std::size_t j, int v) {
        if (reprotect_run(a, i, j, pte_to_prot(pte_t(v)) & ~Prot::Write) == 0) return;
        // The pages stay writable, so their snapshots take them now rather than at a write.
        std::uint32_t copies = 0;
        for (std::size_t k = i; k < j; ++k) preserve_for_snapshots(a, k, pte_t(v), &copies);
    };
    for (const PageSpan& span : pte_spans(a, 0, a.page_index(a.end))) for_each_run(span.first, span.last, key, convert);
}

// The mprotect engine.

int mprotect_enrol(std::uintptr_t, std::size_t) { return 0; }
pte_t mprotect_armed_prot(pte_t prot) { return pte_t(prot & ~to_pte(Prot::Write)); }
int mprotect_arm(ArenaCore& a, std::size_t i, std::size_t j, Prot prot) { return protect_run(a, i, j, prot & ~Prot::Write); }
// Only a page whose write access alone was withheld: its VMA may have changed since, and a page
// reset to PROT_NONE (by restore, or protect) must fault to get anything back.
bool mprotect_withheld_only(ArenaCore& a, std::size_t i, pte_t v) {
    const Vma* vma = find_vma(a, a.page_addr(i));
    return vma && vma->start <= a.page_addr(i) && allows(vma->prot, Prot::Write) &&
           pte_to_prot(v) == (vma->prot & ~Prot::Write);
}
int mprotect_disarm(ArenaCore& a, std::size_t i, std::size_t j, Prot prot) {
    return protect_run(a, i, j, prot | Prot::Write);
}
int mprotect_clear_marks(std::uintptr_t, std::size_t) { return 0; }
void mprotect_verify(const ArenaCore&, const char*, std::span<const PageSpan>) {}  // the protections say it all
void mprotect_after_fork(ArenaCore&) {}

constexpr WriteTracker kUffd{Engine::Uffd,   true,        uffd_enrol,       uffd_armed_prot,
                             uffd_arm,       true,        uffd_withheld_only, uffd_disarm,
                             true,           uffd_clear_marks, uffd_verify,  uffd_after_fork};
constexpr WriteTracker kMprotect{Engine::Mprotect, false,                  mprotect_enrol,  mprotect_armed_prot,
                                 mprotect_arm,     false,                  mprotect_withheld_only, mprotect_disarm,
                                 false,            mprotect_clear_marks,   mprotect_verify, mprotect_after_fork};

}  // namespace

const WriteTracker& write_tracker() {
    return tracking_engine() == TrackingEngine::Uffd ? kUffd : kMprotect;
}

}  // namespace usermm::detail
