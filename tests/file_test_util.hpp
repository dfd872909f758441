// Real files for the file-VMA tests: a temporary file filled with a pattern whose every byte
// depends on its offset, so that a page read from the wrong place, or half-read, shows.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace usermm_test {

// A file's bytes, read with pread (through the kernel's page cache); aborts if it cannot be read.
inline std::vector<std::uint8_t> read_file(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) std::abort();
    struct stat st;
    if (fstat(fd, &st) != 0) std::abort();
    std::vector<std::uint8_t> out(std::size_t(st.st_size));
    if (pread(fd, out.data(), out.size(), 0) != ssize_t(out.size())) std::abort();
    close(fd);
    return out;
}

inline std::uint8_t pattern_byte(std::uint64_t off) {
    std::uint64_t x = off * 0x9e3779b97f4a7c15ull;
    x ^= x >> 29;
    return std::uint8_t(x ^ (off >> 12));
}

class TempFile {
public:
    explicit TempFile(std::uint64_t size) : size_(size) {
        const char* dir = std::getenv("TMPDIR");
        path_ = std::string(dir && *dir ? dir : "/tmp") + "/usermm-test-XXXXXX";
        fd_ = mkostemp(path_.data(), O_CLOEXEC);
        if (fd_ < 0) std::abort();
        std::vector<std::uint8_t> block(1 << 20);
        for (std::uint64_t at = 0; at < size;) {
            const std::size_t n = std::size_t(std::min<std::uint64_t>(block.size(), size - at));
            for (std::size_t i = 0; i < n; ++i) block[i] = pattern_byte(at + i);
            if (pwrite(fd_, block.data(), n, off_t(at)) != ssize_t(n)) std::abort();
            at += n;
        }
        drop_cache();
    }
    ~TempFile() {
        close(fd_);
        unlink(path_.c_str());
    }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;

    // Writes the file's pages out and drops them from the kernel's page cache: the next access
    // through any mapping reads the disk again (a major fault).
    void drop_cache() const {
        if (fdatasync(fd_) != 0 || posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED) != 0) std::abort();
    }

    int fd() const { return fd_; }  // open read-write
    const std::string& path() const { return path_; }
    std::uint64_t size() const { return size_; }

    // The file's bytes now, read with pread (the kernel's page cache, not usermm's).
    std::vector<std::uint8_t> content() const {
        struct stat st;
        fstat(fd_, &st);
        std::vector<std::uint8_t> out(std::size_t(st.st_size));
        std::size_t done = 0;
        while (done < out.size()) {
            const ssize_t n = pread(fd_, out.data() + done, out.size() - done, off_t(done));
            if (n <= 0) std::abort();
            done += std::size_t(n);
        }
        return out;
    }
    std::vector<std::uint8_t> expected() const {
        std::vector<std::uint8_t> out(static_cast<std::size_t>(size_));
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = pattern_byte(i);
        return out;
    }

private:
    std::uint64_t size_;
    std::string path_;
    int fd_ = -1;
};

}  // namespace usermm_test
