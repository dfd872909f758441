// Snapshot images: the checkpoint format Snapshot::write_to writes and Arena::load reads.
//
// Version 3. Integers are little-endian; every record is a multiple of 8 bytes long.
//   header  "USERMMSN", u32 version = 3, u32 page_size, u64 arena_base (where the arena was),
//           u64 arena_size, u64 range_offset, u64 range_length, u64 chain[2] (the arena's random
//           identity), u64 sequence, u64 base_chain[2], u64 base_sequence (both 0 for a full
//           image, else the chain and sequence of the image this one is an increment to),
//           u32 vma_count, u32 0
//   vmas    vma_count × {u64 offset, u64 length, u32 prot, u32 fault_around_pages, char name[40]},
//           ascending and disjoint, inside the range
//   pages   ascending by offset: {u64 offset, u32 kind (1: page_size bytes of data follow,
//           2: the page is zero), u32 0} [data]
//   end     {u64 UINT64_MAX, u32 kind = 0x444e45 ("END"), u32 0, u64 page_records, u64 data_pages,
//           u64 image_bytes, u64 checksum}
// Offsets are relative to the arena's base. The checksum is the CRC-32C of every byte before it,
// zero-extended to 64 bits (see Checksum). Version 2 differs only in its checksum, which load and
// image_info still read. A full image holds every page that was not zero, each inside a
// VMA; an increment holds every page that changed since its base (with zero records for pages that
// became zero) and the complete VMA table. The end record's fixed size and image_bytes let a
// reader find the images of an append-only log from its end (image_info).
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nmmintrin.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <optional>

#include <boost/crc.hpp>

#include "arena_ops.hpp"
#include "file_vma.hpp"
#include "find_vma.hpp"
#include "snapshot_read.hpp"

namespace usermm {

using namespace detail;

namespace {

constexpr char kMagic[8] = {'U', 'S', 'E', 'R', 'M', 'M', 'S', 'N'};
constexpr std::uint32_t kVersion = 3;
constexpr std::uint32_t kOldestVersion = 2;  // what load and image_info still read
constexpr std::uint32_t kKindData = 1, kKindZero = 2, kKindEnd = 0x444e45;
constexpr std::uint64_t kEndOffset = ~std::uint64_t(0);
constexpr std::uint64_t kMaxAddress = 1ull << 47;  // the user half of an x86-64 address space
constexpr std::uint32_t kMaxFaultAround = 1u << 20;  // what map() accepts

using Chain = std::array<std::uint64_t, 2>;

struct Header {
    char magic[8];
    std::uint32_t version;
    std::uint32_t page_size;
    std::uint64_t arena_base;
    std::uint64_t arena_size;
    std::uint64_t range_offset;
    std::uint64_t range_length;
    Chain chain;
    std::uint64_t sequence;
    Chain base_chain;
    std::uint64_t base_sequence;
    std::uint32_t vma_count;
    std::uint32_t reserved;
};

struct VmaEntry {
    std::uint64_t offset;
    std::uint64_t length;
    std::uint32_t prot;
    std::uint32_t fault_around_pages;
    char name[kVmaNameMax];
};

struct PageEntry {
    std::uint64_t offset;
    std::uint32_t kind;
    std::uint32_t reserved;
};

struct EndEntry {
    std::uint64_t page_records;
    std::uint64_t data_pages;
    std::uint64_t image_bytes;
    std::uint64_t checksum;
};

constexpr std::size_t kTrailer = sizeof(PageEntry) + sizeof(EndEntry);

static_assert(sizeof(Header) % 8 == 0 && sizeof(VmaEntry) % 8 == 0 && sizeof(PageEntry) % 8 == 0);
static_assert(std::endian::native == std::endian::little, "images are little-endian; add byte swaps here");

// Version 3's checksum is CRC-32C (Castagnoli: polynomial 0x1EDC6F41, input and output reflected,
// initial value and final XOR 0xFFFFFFFF; "123456789" gives 0xE3069283), the CRC of iSCSI and
// ext4 metadata, so that any CRC-32C tool can check an image. boost::crc_optimal computes it a byte
// at a time, at 0.18 GB/s on the test VM, a twelfth of version 2's checksum; the SSE4.2 crc32
// instruction computes the same CRC 8 bytes at a time (4.6-6.3 GB/s there) and is used where the
// CPU has it. Version 2's own checksum mixes each 8-byte word in with a rotate and an odd
// multiply. Neither is cryptographic: they catch truncation and corruption, not forgery.
using Crc32c = boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true>;

__attribute__((target("sse4.2"))) std::uint32_t crc32c_sse42(std::uint32_t crc, const unsigned char* p,
                                                               std::size_t n) {
    std::uint64_t c = crc;
    for (std::size_t i = 0; i < n; i += 8) {
        std::uint64_t w;
        std::memcpy(&w, p + i, 8);
        c = _mm_crc32_u64(c, w);
    }
    return std::uint32_t(c);
}

// The checksum of an image of `version` (2 or 3), over whole 8-byte words.
class Checksum {
public:
    explicit Checksum(std::uint32_t version = kVersion)
        : version2_(version == 2), sse42_(__builtin_cpu_supports("sse4.2")) {}

    void add(const void* p, std::size_t n) {
        const auto* bytes = static_cast<const unsigned char*>(p);
        if (version2_) {
            for (std::size_t i = 0; i < n; i += 8) {
                std::uint64_t w;
                std::memcpy(&w, bytes + i, 8);
                h_ = std::rotl(h_ ^ w, 29) * 0x9e3779b97f4a7c15ull;
            }
        } else if (sse42_) {
            crc_ = crc32c_sse42(crc_, bytes, n);
        } else {
            soft_.process_bytes(bytes, n);
        }
    }
    std::uint64_t value() const {
        if (version2_) return h_;
        return sse42_ ? ~crc_ : soft_.checksum();
    }
    const char* name() const { return version2_ ? "version 2's checksum" : "CRC-32C"; }

private:
    bool version2_;
    bool sse42_;
    std::uint64_t h_ = 0x6a09e667f3bcc908ull;
    std::uint32_t crc_ = 0xFFFFFFFF;  // the crc32 instruction's register: reflected, before the final XOR
    Crc32c soft_;
};

// What is wrong with a header on its own, or an empty string. The same rules as map() and the
// Arena constructor, so that a load never builds what the API would have refused.
std::string header_problem(const Header& h) {
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return "not a usermm snapshot image";
    if (h.version < kOldestVersion || h.version > kVersion)
        return fmt::format("version {} (this usermm reads versions {} to {})", h.version, kOldestVersion, kVersion);
    if (h.page_size != g_page_size) return fmt::format("page size {} (this machine's is {})", h.page_size, g_page_size);
    if (h.arena_size == 0 || h.arena_size % g_page_size || h.arena_base == 0 || h.arena_base % g_page_size ||
        h.arena_base >= kMaxAddress ||
        h.arena_size > kMaxAddress - h.arena_base)
        return fmt::format("arena base {:#x} size {:#x} is not a page-aligned range of the user address space",
                           h.arena_base, h.arena_size);
    if (h.range_offset % g_page_size || h.range_length % g_page_size || h.range_offset > h.arena_size ||
        h.range_length > h.arena_size - h.range_offset || h.range_length == 0)
        return fmt::format("range offset {:#x} length {:#x} does not fit arena size {:#x}", h.range_offset,
                           h.range_length, h.arena_size);
    if (h.sequence == 0 || h.chain == Chain{}) return "no chain identity or sequence";
    if ((h.base_sequence == 0) != (h.base_chain == Chain{}))
        return fmt::format("base chain and base sequence {} disagree on whether it is an increment", h.base_sequence);
    if (h.base_chain == h.chain && h.base_sequence >= h.sequence)
        return fmt::format("is snapshot {} but an increment to snapshot {} of its own chain, which is not older",
                           h.sequence, h.base_sequence);
    if (h.vma_count > h.range_length / g_page_size) return fmt::format("{} VMAs in {:#x} bytes", h.vma_count, h.range_length);
    if (h.reserved) return "reserved header field is not zero";
    return {};
}

std::string chain_text(const Chain& c) { return fmt::format("{:016x}{:016x}", c[0], c[1]); }

// Writes an image through a buffer. Runs between batches of pages read out of the arena, with no
// usermm lock or snapshot slot held; the blocking write itself runs with the caller's signal mask,
// so that a reader that never reads cannot make SIGTERM or an alarm wait (the page walk around it
// blocks asynchronous signals, see visit_snapshot_pages).
class ImageWriter {
public:
    ImageWriter(int fd, const char* call) : fd_(fd), call_(call) {
        buf_.reserve(kBuffer);
        pthread_sigmask(SIG_SETMASK, nullptr, &caller_mask_);
    }

    void put(const void* p, std::size_t n) {
        sum_.add(p, n);
        put_raw(p, n);
    }
    void finish(std::uint64_t page_records, std::uint64_t data_pages) {
        const PageEntry end{kEndOffset, kKindEnd, 0};
        put(&end, sizeof end);
        const EndEntry tail{page_records, data_pages, bytes_ + sizeof(EndEntry), 0};
        put(&tail, sizeof tail - 8);
        const std::uint64_t sum = sum_.value();
        put_raw(&sum, 8);
        flush();
    }

private:
    static constexpr std::size_t kBuffer = 1 << 20;

    void put_raw(const void* p, std::size_t n) {
        bytes_ += n;
        const auto* bytes = static_cast<const std::byte*>(p);
        if (buf_.size() + n > kBuffer) flush();
        if (n >= kBuffer) {
            write_all(bytes, n);
            return;
        }
        buf_.insert(buf_.end(), bytes, bytes + n);
    }
    void flush() {
        write_all(buf_.data(), buf_.size());
        buf_.clear();
    }
    void write_all(const std::byte* p, std::size_t n) {
        struct CallerMask {
            sigset_t held;
            explicit CallerMask(const sigset_t& caller) { pthread_sigmask(SIG_SETMASK, &caller, &held); }
            ~CallerMask() { pthread_sigmask(SIG_SETMASK, &held, nullptr); }
        } unblocked(caller_mask_);
        while (n) {
            const ssize_t w = ::write(fd_, p, n);
            // As write(2): a handler installed without SA_RESTART interrupts the call.
            if (w < 0 && errno == EINTR)
                fail(EINTR, "{}: write to fd {} interrupted by a signal; the image is incomplete", call_, fd_);
            if (w < 0) fail(errno, "{}: write to fd {} failed", call_, fd_);
            p += w;
            n -= std::size_t(w);
        }
    }

    int fd_;
    const char* call_;
    sigset_t caller_mask_;
    std::vector<std::byte> buf_;
    std::uint64_t bytes_ = 0;
    Checksum sum_;
};

// Reads the images of one descriptor back to back: from offset 0 with pread, or from a pipe or
// socket as it comes.
class ImageReader {
public:
    ImageReader(int fd, std::size_t fd_index) : fd_(fd), fd_index_(fd_index) {}

    // Starts the next image: true if there is one (the descriptor is not at its end).
    bool next_image() {
        if (pos_ == len_ && !refill()) return false;
        ++image_;
        image_start_ = offset();
        return true;
    }
    // The header says which checksum covers the image, itself included.
    void get_header(Header& h) {
        get_raw(&h, sizeof h, "header");
        sum_ = Checksum(h.version);
        sum_.add(&h, sizeof h);
    }
    void get(void* p, std::size_t n, const char* what) {
        get_raw(p, n, what);
        sum_.add(p, n);
    }
    // After the end record: the counts and the stored checksum must match.
    void finish(std::uint64_t page_records, std::uint64_t data_pages) {
        EndEntry tail{};
        get(&tail, sizeof tail - 8, "end record");
        const std::uint64_t expected = sum_.value();
        get_raw(&tail.checksum, 8, "checksum");
        if (tail.page_records != page_records || tail.data_pages != data_pages)
            corrupt("the end record counts {} pages ({} with data), the image holds {} ({})", tail.page_records,
                    tail.data_pages, page_records, data_pages);
        if (tail.image_bytes != offset() - image_start_)
            corrupt("the end record says the image is {} bytes long, it is {}", tail.image_bytes, offset() - image_start_);
        if (tail.checksum != expected)
            corrupt("checksum {:#x} does not match the content ({}: {:#x})", tail.checksum, sum_.name(), expected);
    }

    int fd() const { return fd_; }
    std::uint64_t image_start() const { return image_start_; }
    std::string where() const {
        return fmt::format("usermm::Arena::load: fd {} (descriptor {}), image {} at offset {:#x}", fd_, fd_index_, image_,
                           image_start_);
    }
    template <typename... Args>
    [[noreturn]] void corrupt(fmt::format_string<Args...> format, Args&&... args) const {
        throw Error(EINVAL, where() + ": " + fmt::format(format, std::forward<Args>(args)...));
    }

private:
    std::uint64_t offset() const { return file_offset_ - (len_ - pos_); }

    void get_raw(void* p, std::size_t n, const char* what) {
        auto* out = static_cast<std::byte*>(p);
        const std::uint64_t at = offset();
        std::size_t found = 0;
        while (found < n) {
            if (pos_ == len_ && !refill())
                corrupt("truncated: the {} at offset {:#x} needs {} bytes, the descriptor ends after {}", what, at, n,
                        found);
            const std::size_t k = std::min(n - found, len_ - pos_);
            std::memcpy(out + found, buf_ + pos_, k);
            pos_ += k;
            found += k;
        }
    }
    // False at the end of the descriptor.
    bool refill() {
        for (;;) {
            ssize_t r = stream_ ? ::read(fd_, buf_, sizeof buf_) : ::pread(fd_, buf_, sizeof buf_, off_t(file_offset_));
            if (r < 0 && errno == ESPIPE && !stream_ && file_offset_ == 0) {
                stream_ = true;
                continue;
            }
            if (r < 0 && errno == EINTR) continue;
            if (r < 0)
                throw Error(errno, fmt::format("{}: read at offset {:#x} failed", where(), file_offset_));
            pos_ = 0;
            len_ = std::size_t(r);
            file_offset_ += std::uint64_t(r);
            return r > 0;
        }
    }

    int fd_;
    std::size_t fd_index_;
    std::size_t image_ = 0;  // 1, 2, ... in this descriptor
    std::uint64_t image_start_ = 0;
    bool stream_ = false;
    std::byte buf_[1 << 16];
    std::size_t pos_ = 0, len_ = 0;
    std::uint64_t file_offset_ = 0;  // of the byte after the buffer's content
    Checksum sum_;
};

void write_header(ImageWriter& out, const SnapshotCore& s, const SnapshotCore* base) {
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.version = kVersion;
    h.page_size = std::uint32_t(g_page_size);
    h.arena_base = s.arena_base;
    h.arena_size = s.arena_size;
    h.range_offset = s.first << g_page_shift;
    h.range_length = (s.last - s.first) << g_page_shift;
    h.chain = s.chain;
    h.sequence = s.sequence;
    if (base) {
        h.base_chain = base->chain;
        h.base_sequence = base->sequence;
    }
    h.vma_count = std::uint32_t(s.vmas.size());
    out.put(&h, sizeof h);
    for (const auto& v : s.vmas) {
        VmaEntry e{v.start - s.arena_base, v.end - v.start, unsigned(v.prot), v.fault_around_pages, {}};
        std::memcpy(e.name, v.name, kVmaNameMax);
        out.put(&e, sizeof e);
    }
}

void write_page(ImageWriter& out, std::size_t page, const std::byte* content, bool zero) {
    const PageEntry e{std::uint64_t(page) << g_page_shift, zero ? kKindZero : kKindData, 0};
    out.put(&e, sizeof e);
    if (!zero) out.put(content, g_page_size);
}

// An image's header and VMA table as read and checked.
struct LoadedHeader {
    Header header;
    std::vector<VmaEntry> vmas;
};

LoadedHeader read_header(ImageReader& in) {
    LoadedHeader l{};
    in.get_header(l.header);
    const Header& h = l.header;
    if (const std::string problem = header_problem(h); !problem.empty()) in.corrupt("{}", problem);
    std::uint64_t prev_end = h.range_offset;
    const std::uint64_t range_end = h.range_offset + h.range_length;
    for (std::uint32_t i = 0; i < h.vma_count; ++i) {
        VmaEntry e{};
        in.get(&e, sizeof e, "VMA record");
        if (e.offset < prev_end || e.offset >= range_end || e.length == 0 || e.offset % g_page_size ||
            e.length % g_page_size || e.length > range_end - e.offset)
            in.corrupt("VMA record {} (offset {:#x}, length {:#x}) is not page-aligned, in order and inside the range "
                       "[{:#x}, {:#x})",
                       i, e.offset, e.length, h.range_offset, range_end);
        if (e.prot & ~7u) in.corrupt("VMA record {} (offset {:#x}) has protection {:#x}", i, e.offset, e.prot);
        if (e.fault_around_pages > kMaxFaultAround)
            in.corrupt("VMA record {} (offset {:#x}) has fault-around {} pages, above map()'s 2^20", i, e.offset,
                       e.fault_around_pages);
        if (!std::memchr(e.name, 0, kVmaNameMax))
            in.corrupt("VMA record {} (offset {:#x}) has a name of more than {} bytes", i, e.offset, kVmaNameMax - 1);
        prev_end = e.offset + e.length;
        l.vmas.push_back(e);
    }
    return l;
}

// Page runs [first, last) of the new arena that hold data from some image.
using Runs = std::vector<std::pair<std::size_t, std::size_t>>;

// Reads the page records of an image into the new arena, which has no VMA yet: data goes in
// through /proc/self/mem, which ignores PROT_NONE, so the pages stay inaccessible (and the kernel
// mapping one piece) until the layout is known; only pages the image names are touched. A zero
// record drops a page an earlier image filled and costs nothing otherwise.
void read_pages(ImageReader& in, const LoadedHeader& l, ArenaCore& a, Runs& written) {
    static constexpr const char* call = "usermm::Arena::load";
    const Header& h = l.header;
    const bool full = h.base_sequence == 0;
    constexpr std::size_t kBatch = 64;
    std::vector<std::byte> batch(kBatch << g_page_shift);
    std::size_t batch_first = 0, batch_n = 0;
    auto flush = [&] {
        if (!batch_n) return;
        if (const int err = page_write_raw(a.page_addr(batch_first), batch.data(), batch_n << g_page_shift))
            fail(err, "{}: cannot write [{:#x}, {:#x}) of the new arena", call, a.page_addr(batch_first),
                 a.page_addr(batch_first + batch_n));
        for (std::size_t k = batch_first; k < batch_first + batch_n; ++k) {
            const pte_t v = a.pte[k].load(std::memory_order_relaxed);
            a.note_resident(v, pte_t(v | kPtePopulated | kPteDirty));
            a.pte[k].store(pte_t(v | kPtePopulated | kPteDirty), std::memory_order_relaxed);
            a.note_changed(k);
        }
        if (!written.empty() && written.back().second == batch_first)
            written.back().second += batch_n;
        else
            written.push_back({batch_first, batch_first + batch_n});
        batch_n = 0;
    };

    std::uint64_t records = 0, data_pages = 0;
    std::uint64_t next = h.range_offset;
    const std::uint64_t range_end = h.range_offset + h.range_length;
    auto vma = l.vmas.begin();
    for (;;) {
        PageEntry e{};
        in.get(&e, sizeof e, "page record");
        if (e.offset == kEndOffset && e.kind == kKindEnd && e.reserved == 0) break;
        if (e.offset < next || e.offset % g_page_size || e.offset >= range_end || e.reserved)
            in.corrupt("page record at offset {:#x} is out of order or outside the range [{:#x}, {:#x})", e.offset,
                       h.range_offset, range_end);
        const std::size_t page = a.page_index(a.base + e.offset);
        if (e.kind == kKindData) {
            while (vma != l.vmas.end() && vma->offset + vma->length <= e.offset) ++vma;
            if (vma == l.vmas.end() || vma->offset > e.offset)
                in.corrupt("page record at offset {:#x} holds data outside every VMA of the image", e.offset);
            if (batch_n == kBatch || (batch_n && batch_first + batch_n != page)) flush();
            if (!batch_n) batch_first = page;
            in.get(batch.data() + (batch_n++ << g_page_shift), g_page_size, "page data");
            ++data_pages;
        } else if (e.kind == kKindZero) {
            if (full) in.corrupt("page record at offset {:#x} is a zero page, which a full image never holds", e.offset);
            const pte_t v = a.pte[page].load(std::memory_order_relaxed);
            if (v & kPtePopulated) {
                if (const int err = page_discard(a.page_addr(page), g_page_size))
                    fail(err, "{}: cannot drop page {:#x} of the new arena", call, a.page_addr(page));
                a.note_resident(v, pte_t(v & ~kPtePopulated));
                a.pte[page].store(pte_t(v & ~kPtePopulated), std::memory_order_relaxed);
            }
        } else {
            in.corrupt("page record at offset {:#x} has unknown kind {}", e.offset, e.kind);
        }
        next = e.offset + g_page_size;
        ++records;
    }
    flush();
    in.finish(records, data_pages);
}

// What an image's instant had no VMA for held no data then, whatever an earlier image put there
// (a whole-arena snapshot skips file VMAs: the pages under one leave no zero record). Drops that
// data and keeps `written` to what lies inside the image's VMAs. Cost: the runs and the VMAs.
void drop_outside_vmas(ArenaCore& a, const LoadedHeader& l, Runs& written) {
    static constexpr const char* call = "usermm::Arena::load";
    std::sort(written.begin(), written.end());
    Runs merged;  // images overlap: one run per stretch of pages
    for (auto [first, last] : written) {
        if (!merged.empty() && first <= merged.back().second)
            merged.back().second = std::max(merged.back().second, last);
        else
            merged.push_back({first, last});
    }
    Runs kept;
    auto vma = l.vmas.begin();
    auto drop = [&](std::size_t first, std::size_t last) {
        if (first >= last) return;
        if (const int err = page_discard(a.page_addr(first), (last - first) << g_page_shift))
            fail(err, "{}: cannot drop [{:#x}, {:#x}) of the new arena", call, a.page_addr(first), a.page_addr(last));
        for (std::size_t k = first; k < last; ++k) {
            a.note_resident(a.pte[k].load(std::memory_order_relaxed), 0);
            a.pte[k].store(0, std::memory_order_relaxed);
        }
    };
    for (auto [first, last] : merged) {
        std::size_t page = first;
        while (page < last) {
            const std::uintptr_t off = a.page_addr(page) - a.base;
            while (vma != l.vmas.end() && vma->offset + vma->length <= off) ++vma;
            const std::size_t vma_first = vma == l.vmas.end() ? last : a.page_index(a.base + vma->offset);
            if (vma_first > page) {  // a hole up to the next VMA
                drop(page, std::min(last, vma_first));
                page = std::min(last, vma_first);
                continue;
            }
            const std::size_t end = std::min(last, a.page_index(a.base + vma->offset + vma->length));
            if (!kept.empty() && kept.back().second == page)
                kept.back().second = end;
            else
                kept.push_back({page, end});
            page = end;
        }
    }
    written = std::move(kept);
}

// The last image's layout, on an arena whose pages are all PROT_NONE: its VMAs go into the tree,
// and the pages that hold data (all inside them) get their VMA's protection (one mprotect per run,
// while the map budget allows; the rest fault in). Cost: the VMAs and the runs.
void install_layout(ArenaCore& a, const LoadedHeader& l, const Runs& written) {
    static constexpr const char* call = "usermm::Arena::load";
    std::vector<std::unique_ptr<Vma>> vmas;
    for (const VmaEntry& e : l.vmas) {
        auto v = std::make_unique<Vma>();
        v->prot = normalize(Prot(e.prot));
        v->fault_around_pages = e.fault_around_pages;
        set_name(*v, std::string_view(e.name, strnlen(e.name, kVmaNameMax)));
        vmas.push_back(std::move(v));
    }
    ApiGuard<std::lock_guard<RwSpinLock>> guard(a.lock);
    for (std::size_t i = 0; i < vmas.size(); ++i)
        insert_vma(a, vmas[i].release(), a.base + l.vmas[i].offset, l.vmas[i].length);
    for (auto [first, last] : written) {
        for (std::size_t page = first; page < last;) {
            const std::uintptr_t at = a.page_addr(page);
            const Vma* v = find_vma(a, at);  // every written page lies in one (drop_outside_vmas)
            const std::size_t end = std::min(last, a.page_index(v->end));
            if (v->prot != Prot::None &&
                map_budget_used() + map_count_delta(a, page, end, v->prot) <= map_budget_limit()) {
                if (const int err = protect_run(a, page, end, v->prot))
                    fail(err, "{}: mprotect of [{:#x}, {:#x}) to {} failed", call, at, a.page_addr(end),
                         to_string(v->prot));
                for (std::size_t k = page; k < end; ++k) {
                    const pte_t old = a.pte[k].load(std::memory_order_relaxed);
                    a.note_resident(old, pte_with_prot(old, v->prot));
                    a.pte[k].store(pte_with_prot(old, v->prot), std::memory_order_relaxed);
                }
            }
            page = end;
        }
    }
    a.last_hit.store(nullptr, std::memory_order_relaxed);
}

}  // namespace

std::array<std::uint64_t, 2> detail::new_arena_identity() {
    std::array<std::uint64_t, 2> id{};
    for (std::size_t got = 0; got < sizeof id;) {
        const ssize_t r = getrandom(reinterpret_cast<char*>(id.data()) + got, sizeof id - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail(errno, "usermm::Arena: getrandom for the arena's identity failed");
        got += std::size_t(r);
    }
    return id;
}

void Snapshot::write_to(int fd) const {
    static constexpr const char* call = "usermm::Snapshot::write_to";
    if (!core_) fail(EINVAL, "{}: the snapshot was moved from", call);
    require_self_mem(call);
    const SnapshotCore& s = *core_;
    ImageWriter out(fd, call);
    write_header(out, s, nullptr);
    std::uint64_t records = 0;
    visit_snapshot_pages(
        s, s.first, s.last,
        [&](std::size_t page, const std::byte* content, bool zero) {
            if (zero) return;
            write_page(out, page, content, false);
            ++records;
        },
        false);
    out.finish(records, records);
}

void Snapshot::write_to(int fd, const Snapshot& previous) const {
    static constexpr const char* call = "usermm::Snapshot::write_to";
    if (!core_ || !previous.core_) fail(EINVAL, "{}: a snapshot was moved from", call);
    require_self_mem(call);
    const SnapshotCore& s = *core_;
    const SnapshotCore& p = *previous.core_;
    if (p.arena_id != s.arena_id)
        fail(EINVAL, "{}: previous snapshot {} belongs to another arena", call, p.sequence);
    if (p.first != s.first || p.last != s.last)
        fail(EINVAL, "{}: previous snapshot {} covers [{:#x}, {:#x}), not this one's [{:#x}, {:#x})", call,
             p.sequence, p.page_addr(p.first), p.page_addr(p.last), s.page_addr(s.first), s.page_addr(s.last));
    if (p.sequence >= s.sequence)
        fail(EINVAL, "{}: previous snapshot {} is not older than this one ({})", call, p.sequence, s.sequence);
    if (!s.arena) fail(EINVAL, "{}: the arena of snapshot {} is gone, and with it the record of changes", call, s.sequence);

    // Pages changed after `previous` up to this snapshot: the union of the change records between,
    // read from their words (a record holds only the words with a change).
    std::vector<std::size_t> changed;
    {
        ApiGuard<SharedGuard<RwSpinLock>> guard(s.arena->lock);
        for (const ChangeRecord& r : s.arena->history) {
            if (r.sequence <= p.sequence || r.sequence > s.sequence) continue;
            for (const auto& [word, bits] : r.words)
                for (std::uint64_t b = bits; b; b &= b - 1) {
                    const std::size_t page = r.first + word * 64 + std::size_t(std::countr_zero(b));
                    if (s.covers(page)) changed.push_back(page);
                }
        }
    }
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    ImageWriter out(fd, call);
    write_header(out, s, &p);
    std::uint64_t records = 0, data_pages = 0;
    for (std::size_t k = 0; k < changed.size();) {
        std::size_t m = k + 1;
        while (m < changed.size() && changed[m] == changed[m - 1] + 1) ++m;
        visit_snapshot_pages(s, changed[k], changed[m - 1] + 1,
                             [&](std::size_t at, const std::byte* content, bool zero) {
                                 if (same_as_snapshot(p, at, content, zero)) return;
                                 write_page(out, at, content, zero);
                                 ++records;
                                 data_pages += !zero;
                             });
        k = m;
    }
    out.finish(records, data_pages);
}

Arena Arena::load(std::span<const int> image_fds, const LoadOptions& options) {
    static constexpr const char* call = "usermm::Arena::load";
    if (image_fds.empty()) fail(EINVAL, "{}: no image given", call);
    init_process();
    std::optional<Arena> arena;
    LoadedHeader last{};
    Runs written;
    for (std::size_t i = 0; i < image_fds.size(); ++i) {
        ImageReader in(image_fds[i], i);
        if (!in.next_image()) in.corrupt("truncated: the descriptor holds no image (0 bytes from offset 0)");
        do {
            LoadedHeader l = read_header(in);
            const Header& h = l.header;
            if (!arena) {
                if (h.base_sequence != 0)
                    in.corrupt("is an increment to snapshot {} of chain {}; the first image must be a full one",
                               h.base_sequence, chain_text(h.base_chain));
                void* const at = options.at_original_base ? ptr_of(h.arena_base) : nullptr;
                try {
                    arena.emplace(Arena(h.arena_size, at));
                } catch (const Error& e) {
                    if (!at || e.code().value() != EEXIST) throw;
                    fail(EEXIST, "{}: the original range [{:#x}, {:#x}) is not free: {}", in.where(), h.arena_base,
                         h.arena_base + h.arena_size, e.what());
                }
            } else {
                const Header& prev = last.header;
                if (h.base_sequence == 0) in.corrupt("is a full image where an increment was expected");
                if (h.base_chain != prev.chain)
                    in.corrupt("is an increment of another chain: it applies to snapshot {} of chain {}, but the image "
                               "before it is snapshot {} of chain {}",
                               h.base_sequence, chain_text(h.base_chain), prev.sequence, chain_text(prev.chain));
                if (h.base_sequence != prev.sequence)
                    in.corrupt("is an increment to snapshot {}, but the image before it is snapshot {}",
                               h.base_sequence, prev.sequence);
                if (h.arena_base != prev.arena_base || h.arena_size != prev.arena_size ||
                    h.range_offset != prev.range_offset || h.range_length != prev.range_length)
                    in.corrupt("covers another range than the images before it");
            }
            read_pages(in, l, *arena->core_, written);
            drop_outside_vmas(*arena->core_, l, written);
            last = std::move(l);
        } while (in.next_image());
    }
    install_layout(*arena->core_, last, written);
    return std::move(*arena);
}

std::vector<ImageInfo> image_info(int fd) {
    static constexpr const char* call = "usermm::image_info";
    init_process();
    struct stat st {};
    if (fstat(fd, &st) != 0) fail(errno, "{}: fstat of fd {} failed", call, fd);
    if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))
        fail(ESPIPE, "{}: fd {} is a pipe or socket; only a file can be read from its end", call, fd);
    auto read_at = [&](void* p, std::size_t n, std::uint64_t at, const char* what) {
        for (std::size_t done = 0; done < n;) {
            const ssize_t r = pread(fd, static_cast<char*>(p) + done, n - done, off_t(at + done));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) fail(errno, "{}: fd {}: read of the {} at offset {:#x} failed", call, fd, what, at);
            if (r == 0)
                fail(EINVAL, "{}: fd {}: truncated: the {} at offset {:#x} needs {} bytes, the file ends after {}", call,
                     fd, what, at, n, done);
            done += std::size_t(r);
        }
    };
    std::vector<ImageInfo> out;
    for (std::uint64_t end = std::uint64_t(st.st_size); end > 0;) {
        if (end < sizeof(Header) + kTrailer)
            fail(EINVAL, "{}: fd {}: the {} bytes before offset {:#x} are too few for an image", call, fd, end, end);
        std::byte trailer[kTrailer];
        read_at(trailer, kTrailer, end - kTrailer, "end record");
        PageEntry marker{};
        EndEntry tail{};
        std::memcpy(&marker, trailer, sizeof marker);
        std::memcpy(&tail, trailer + sizeof marker, sizeof tail);
        if (marker.offset != kEndOffset || marker.kind != kKindEnd || tail.image_bytes > end ||
            tail.image_bytes < sizeof(Header) + kTrailer)
            fail(EINVAL, "{}: fd {}: no image ends at offset {:#x}", call, fd, end);
        const std::uint64_t start = end - tail.image_bytes;
        Header h{};
        read_at(&h, sizeof h, start, "header");
        if (const std::string problem = header_problem(h); !problem.empty())
            fail(EINVAL, "{}: fd {}: the image at offset {:#x} (ending at {:#x}): {}", call, fd, start, end, problem);
        // Every record has its size: a length that cannot hold the counted ones is not this image's.
        const std::uint64_t page_bytes = sizeof(PageEntry) + g_page_size;
        if (tail.data_pages > tail.page_records || tail.page_records > tail.image_bytes / sizeof(PageEntry) ||
            tail.image_bytes - sizeof(Header) - kTrailer <
                std::uint64_t(h.vma_count) * sizeof(VmaEntry) + tail.data_pages * page_bytes +
                    (tail.page_records - tail.data_pages) * sizeof(PageEntry))
            fail(EINVAL, "{}: fd {}: the image at offset {:#x} is {} bytes long, too short for {} VMAs and {} pages ({} "
                 "with data)",
                 call, fd, start, tail.image_bytes, h.vma_count, tail.page_records, tail.data_pages);
        out.push_back({start, tail.image_bytes, h.chain, h.sequence, h.base_chain, h.base_sequence, ptr_of(h.arena_base),
                       h.arena_size, h.range_offset, h.range_length, h.vma_count, tail.page_records, tail.data_pages});
        end = start;
    }
    std::reverse(out.begin(), out.end());
    return out;
}

}  // namespace usermm
