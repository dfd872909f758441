// Which write-tracking engine runs: the one USERMM_ENGINE asks for, else userfaultfd exactly where
// the running kernel offers what it needs. The tests the engine reaches run once per engine
// (tests/CMakeLists.txt); this test says which one a run had, so a kernel without userfaultfd
// write-protect (before 6.4, no WP_UNPOPULATED) shows up as such instead of as a silent second
// mprotect run.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <string_view>

#include <usermm/usermm.hpp>

#include "page_ops_api.hpp"

namespace {

// Asked independently of the library: SIGBUS mode, write-protect faults and WP_UNPOPULATED.
bool kernel_offers_uffd_wp() {
    const int fd = int(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
    if (fd < 0) return false;
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP | (1ull << 13);
    const bool ok = ioctl(fd, UFFDIO_API, &api) == 0;
    close(fd);
    return ok;
}

}  // namespace

TEST_CASE("the write-tracking engine is the one asked for, or userfaultfd where the kernel has it") {
    usermm::page_size();  // sets the process up, engine included
    const bool uffd = usermm::detail::tracking_engine() == usermm::detail::TrackingEngine::Uffd;
    MESSAGE("write-tracking engine: " << std::string(uffd ? "uffd" : "mprotect"));
    const char* env = std::getenv("USERMM_ENGINE");
    if (env && std::string_view(env) == "mprotect")
        CHECK_FALSE(uffd);
    else
        CHECK(uffd == kernel_offers_uffd_wp());
}
