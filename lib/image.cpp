// Snapshot images: the checkpoint format Snapshot::write_to writes and Arena::load reads.
//
// Version 1. Integers are little-endian; every record is a multiple of 8 bytes long.
//   header  "USERMMSN", u32 version = 1, u32 page_size, u64 arena_size, u64 range_offset,
//           u64 range_length, u64 sequence, u64 base_sequence (0 for a full image, else the
//           sequence of the image this one is an increment to), u32 vma_count, u32 0
//   vmas    vma_count × {u64 offset, u64 length, u32 prot, u32 fault_around_pages, char name[40]}
//   pages   ascending by offset: {u64 offset, u32 kind (1: page_size bytes of data follow,
//           2: the page is zero), u32 0} [data]
//   end     {u64 UINT64_MAX, u32 kind = 0x444e45 ("END"), u32 0, u64 page_records, u64 checksum}
// Offsets are relative to the arena's base. The checksum is computed over every byte before it,
// 8 bytes at a time (see Checksum). A full image holds every page that was not zero; an increment
// holds every page that changed since its base (with zero records for pages that became zero)
// and the complete VMA table.
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <optional>

#include "arena_ops.hpp"
#include "find_vma.hpp"
#include "snapshot_read.hpp"

namespace usermm {

using namespace detail;

namespace {

constexpr char kMagic[8] = {'U', 'S', 'E', 'R', 'M', 'M', 'S', 'N'};
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kKindData = 1, kKindZero = 2, kKindEnd = 0x444e45;
constexpr std::uint64_t kEndOffset = ~std::uint64_t(0);

struct Header {
    char magic[8];
    std::uint32_t version;
    std::uint32_t page_size;
    std::uint64_t arena_size;
    std::uint64_t range_offset;
    std::uint64_t range_length;
    std::uint64_t sequence;
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
    std::uint64_t checksum;
};

static_assert(sizeof(Header) % 8 == 0 && sizeof(VmaEntry) % 8 == 0 && sizeof(PageEntry) % 8 == 0);
static_assert(std::endian::native == std::endian::little, "images are little-endian; add byte swaps here");

// A 64-bit checksum over 8-byte words: each word is mixed in with a rotate and an odd multiply, so
// that a changed, lost or reordered word changes the result. Not cryptographic: it catches
// truncation and corruption, not forgery.
class Checksum {
public:
    void add(const void* p, std::size_t n) {
        const auto* bytes = static_cast<const unsigned char*>(p);
        for (std::size_t i = 0; i < n; i += 8) {
            std::uint64_t w;
            std::memcpy(&w, bytes + i, 8);
            h_ = std::rotl(h_ ^ w, 29) * 0x9e3779b97f4a7c15ull;
        }
    }
    std::uint64_t value() const { return h_; }

private:
    std::uint64_t h_ = 0x6a09e667f3bcc908ull;
};

class ImageWriter {
public:
    ImageWriter(int fd, const char* call) : fd_(fd), call_(call) { buf_.reserve(kBuffer); }

    void put(const void* p, std::size_t n) {
        sum_.add(p, n);
        put_raw(p, n);
    }
    void finish(std::uint64_t page_records) {
        const PageEntry end{kEndOffset, kKindEnd, 0};
        put(&end, sizeof end);
        const EndEntry tail{page_records, 0};
        put(&tail.page_records, 8);
        const std::uint64_t sum = sum_.value();
        put_raw(&sum, 8);
        flush();
    }

private:
    static constexpr std::size_t kBuffer = 1 << 20;

    void put_raw(const void* p, std::size_t n) {
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
        while (n) {
            const ssize_t w = ::write(fd_, p, n);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) fail(errno, "{}: write to fd {} failed", call_, fd_);
            p += w;
            n -= std::size_t(w);
        }
    }

    int fd_;
    const char* call_;
    std::vector<std::byte> buf_;
    Checksum sum_;
};

class ImageReader {
public:
    ImageReader(int fd, std::size_t index) : fd_(fd), index_(index) {}

    void get(void* p, std::size_t n) {
        get_raw(p, n);
        sum_.add(p, n);
    }
    // After the end record: the stored checksum must match, and nothing may follow.
    void finish(std::uint64_t page_records) {
        EndEntry tail{};
        get(&tail.page_records, 8);
        const std::uint64_t expected = sum_.value();
        get_raw(&tail.checksum, 8);
        if (tail.page_records != page_records)
            corrupt("the end record counts {} pages, the image holds {}", tail.page_records, page_records);
        if (tail.checksum != expected) corrupt("checksum {:#x} does not match the content ({:#x})", tail.checksum, expected);
        char extra;
        if (::read(fd_, &extra, 1) > 0 || pos_ < len_) corrupt("data follows the end record");
    }

    template <typename... Args>
    [[noreturn]] void corrupt(fmt::format_string<Args...> format, Args&&... args) {
        throw Error(EINVAL, fmt::format("usermm::Arena::load: image {} (fd {}): ", index_, fd_) +
                                fmt::format(format, std::forward<Args>(args)...));
    }

private:
    void get_raw(void* p, std::size_t n) {
        auto* out = static_cast<std::byte*>(p);
        while (n) {
            if (pos_ == len_) refill();
            const std::size_t k = std::min(n, len_ - pos_);
            std::memcpy(out, buf_ + pos_, k);
            pos_ += k;
            out += k;
            n -= k;
        }
    }
    void refill() {
        for (;;) {
            const ssize_t r = ::read(fd_, buf_, sizeof buf_);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0)
                throw Error(errno, fmt::format("usermm::Arena::load: image {} (fd {}): read failed", index_, fd_));
            if (r == 0) corrupt("truncated");
            pos_ = 0;
            len_ = std::size_t(r);
            return;
        }
    }

    int fd_;
    std::size_t index_;
    std::byte buf_[1 << 16];
    std::size_t pos_ = 0, len_ = 0;
    Checksum sum_;
};

void write_header(ImageWriter& out, const SnapshotCore& s, std::uint64_t base_sequence) {
    Header h{};
    std::memcpy(h.magic, kMagic, sizeof kMagic);
    h.version = kVersion;
    h.page_size = std::uint32_t(g_page_size);
    h.arena_size = s.arena_size;
    h.range_offset = s.first << g_page_shift;
    h.range_length = (s.last - s.first) << g_page_shift;
    h.sequence = s.sequence;
    h.base_sequence = base_sequence;
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

// An image's header and VMA table as read.
struct LoadedHeader {
    Header header;
    std::vector<VmaEntry> vmas;
};

LoadedHeader read_header(ImageReader& in) {
    LoadedHeader l{};
    in.get(&l.header, sizeof l.header);
    const Header& h = l.header;
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) in.corrupt("not a usermm snapshot image");
    if (h.version != kVersion) in.corrupt("version {} (this usermm reads version {})", h.version, kVersion);
    if (h.page_size != g_page_size) in.corrupt("page size {} (this machine's is {})", h.page_size, g_page_size);
    constexpr std::uint64_t kMaxArena = 1ull << 47;  // the user half of an x86-64 address space
    if (h.arena_size > kMaxArena) in.corrupt("arena size {:#x} is larger than an address space", h.arena_size);
    if (h.arena_size % g_page_size || h.range_offset % g_page_size || h.range_length % g_page_size ||
        h.range_offset > h.arena_size || h.range_length > h.arena_size - h.range_offset || h.range_length == 0)
        in.corrupt("range offset {:#x} length {:#x} does not fit arena size {:#x}", h.range_offset, h.range_length,
                   h.arena_size);
    if (h.vma_count > h.range_length / g_page_size) in.corrupt("{} VMAs in {:#x} bytes", h.vma_count, h.range_length);
    std::uint64_t prev_end = h.range_offset;
    for (std::uint32_t i = 0; i < h.vma_count; ++i) {
        VmaEntry e{};
        in.get(&e, sizeof e);
        const std::uint64_t range_end = h.range_offset + h.range_length;
        if (e.offset < prev_end || e.offset >= range_end || e.length == 0 || e.offset % g_page_size ||
            e.length % g_page_size || e.length > range_end - e.offset || (e.prot & ~7u) || e.name[kVmaNameMax - 1])
            in.corrupt("VMA record {} (offset {:#x}, length {:#x}) is invalid", i, e.offset, e.length);
        prev_end = e.offset + e.length;
        l.vmas.push_back(e);
    }
    return l;
}

// Reads the page records of an image into the arena (whose range is one read-write VMA now).
void read_pages(ImageReader& in, const Header& h, char* arena_base) {
    std::uint64_t records = 0;
    std::uint64_t next = h.range_offset;
    for (;;) {
        PageEntry e{};
        in.get(&e, sizeof e);
        if (e.offset == kEndOffset && e.kind == kKindEnd) break;
        if (e.offset < next || e.offset % g_page_size || e.offset >= h.range_offset + h.range_length)
            in.corrupt("page record at offset {:#x} is out of order or outside the range", e.offset);
        char* page = arena_base + e.offset;
        if (e.kind == kKindData)
            in.get(page, g_page_size);
        else if (e.kind == kKindZero)
            std::memset(page, 0, g_page_size);
        else
            in.corrupt("page record at offset {:#x} has unknown kind {}", e.offset, e.kind);
        next = e.offset + g_page_size;
        ++records;
    }
    in.finish(records);
}

}  // namespace

void Snapshot::write_to(int fd) const {
    static constexpr const char* call = "usermm::Snapshot::write_to";
    if (!core_) fail(EINVAL, "{}: the snapshot was moved from", call);
    require_self_mem(call);
    const SnapshotCore& s = *core_;
    ImageWriter out(fd, call);
    write_header(out, s, 0);
    std::uint64_t records = 0;
    visit_snapshot_pages(s, s.first, s.last, [&](std::size_t page, const std::byte* content, bool zero) {
        if (zero) return;
        write_page(out, page, content, false);
        ++records;
    });
    out.finish(records);
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

    // Pages changed after `previous` up to this snapshot: the union of the change records between.
    std::vector<bool> changed(s.last - s.first);
    {
        ApiGuard<SharedGuard<RwSpinLock>> guard(s.arena->lock);
        for (const ChangeRecord& r : s.arena->history)
            if (r.sequence > p.sequence && r.sequence <= s.sequence)
                for (std::size_t page = s.first; page < s.last; ++page)
                    if (r.changed(page)) changed[page - s.first] = true;
    }
    ImageWriter out(fd, call);
    write_header(out, s, p.sequence);
    std::uint64_t records = 0;
    for (std::size_t page = s.first; page < s.last;) {
        if (!changed[page - s.first]) {
            ++page;
            continue;
        }
        std::size_t end = page + 1;
        while (end < s.last && changed[end - s.first]) ++end;
        visit_snapshot_pages(s, page, end, [&](std::size_t at, const std::byte* content, bool zero) {
            write_page(out, at, content, zero);
            ++records;
        });
        page = end;
    }
    out.finish(records);
}

Arena Arena::load(std::span<const int> image_fds) {
    static constexpr const char* call = "usermm::Arena::load";
    if (image_fds.empty()) fail(EINVAL, "{}: no image given", call);
    init_process();
    std::optional<Arena> arena;
    LoadedHeader last{};
    char* base = nullptr;
    for (std::size_t i = 0; i < image_fds.size(); ++i) {
        ImageReader in(image_fds[i], i);
        LoadedHeader l = read_header(in);
        const Header& h = l.header;
        if (i == 0) {
            if (h.base_sequence != 0)
                in.corrupt("is an increment to snapshot {}; the first image must be a full one", h.base_sequence);
            arena.emplace(h.arena_size);
            base = static_cast<char*>(arena->base());
            arena->map(h.range_length, Prot::ReadWrite, {.address = base + h.range_offset});
        } else {
            const Header& prev = last.header;
            if (h.base_sequence == 0) in.corrupt("is a full image where an increment was expected");
            if (h.base_sequence != prev.sequence)
                in.corrupt("is an increment to snapshot {}, but the image before it is snapshot {}", h.base_sequence,
                           prev.sequence);
            if (h.arena_size != prev.arena_size || h.range_offset != prev.range_offset ||
                h.range_length != prev.range_length)
                in.corrupt("covers another range than the images before it");
        }
        read_pages(in, h, base);
        last = std::move(l);
    }

    // The VMA layout of the last image: cut the one read-write VMA at every boundary, then give
    // each piece its protection, name and fault-around, and unmap the holes.
    const Header& h = last.header;
    ArenaCore& a = *arena->core_;
    const Range range{a.base + h.range_offset, a.base + h.range_offset + h.range_length};
    std::vector<Range> holes;
    std::uintptr_t at = range.start;
    for (const VmaEntry& e : last.vmas) {
        if (a.base + e.offset > at) holes.push_back({at, a.base + e.offset});
        at = a.base + e.offset + e.length;
    }
    if (at < range.end) holes.push_back({at, range.end});
    std::vector<std::unique_ptr<Vma>> spares;
    for (std::size_t i = 0; i < 2 * last.vmas.size(); ++i) spares.push_back(std::make_unique<Vma>());
    {
        ApiGuard<ExclusiveGuard<RwSpinLock>> guard(a.lock);
        std::size_t spare = 0;
        for (const VmaEntry& e : last.vmas) {
            const Range r{a.base + e.offset, a.base + e.offset + e.length};
            split_at(a, r.start, spares[spare++]);
            split_at(a, r.end, spares[spare++]);
            Vma* found = find_vma(a, r.start);
            if (!found || found->start != r.start || found->end != r.end)
                fail(EINVAL, "{}: VMA record at offset {:#x} does not fit the image's range", call, e.offset);
            Vma& v = *found;
            v.prot = normalize(Prot(e.prot));
            v.fault_around_pages = e.fault_around_pages;
            set_name(v, std::string_view(e.name, strnlen(e.name, kVmaNameMax)));
            change_pages(a, call, r, [p = v.prot](Prot old) { return old & p; });
        }
        a.last_hit.store(nullptr, std::memory_order_relaxed);
        merge_range(a, range.start, range.end);
    }
    for (const Range& hole : holes) arena->unmap(ptr_of(hole.start), hole.end - hole.start);
    return std::move(*arena);
}

}  // namespace usermm
