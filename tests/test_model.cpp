// A random walk of map / protect / unmap / prefault / read / write calls, checked after every step
// against a reference model of what the kernel does with mmap / mprotect / munmap: map gives zeros, a
// write sticks, protect keeps content, unmap discards it; neighbouring VMAs with the same protection,
// name and fault-around window are one VMA. The kernel itself is the other witness: verify() compares
// the arena's metadata with /proc/self/maps at every step.
#include <doctest/doctest.h>
#include <sys/resource.h>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <usermm/usermm.hpp>

#include "map_budget.hpp"
#include "test_util.hpp"

namespace {

using usermm::allows;
using usermm::Prot;
using usermm_test::read_byte;
using usermm_test::run_in_child;
using usermm_test::write_byte;

// Write, Exec and Write|Exec are in the list on purpose: the arena must report them with Read added.
constexpr std::array kProts = {Prot::None, Prot::Read, Prot::Write, Prot::ReadWrite, Prot::Exec,
                               Prot::Read | Prot::Exec, Prot::Write | Prot::Exec, Prot::ReadWrite | Prot::Exec};
constexpr std::array kAccesses = {Prot::None, Prot::Read, Prot::Write, Prot::Exec, Prot::ReadWrite,
                                  Prot::Read | Prot::Exec};
constexpr std::array<std::size_t, 3> kFaultAround = {1, 4, 16};
constexpr std::array<std::string_view, 3> kNames = {"", "left", "right"};
constexpr std::size_t kTags = 3;

// Write and Exec imply Read, as on x86-64 without protection keys.
Prot normalized(Prot p) { return p == Prot::None ? p : p | Prot::Read; }

struct Page {
    bool mapped = false;
    Prot prot = Prot::None;
    std::string_view name;
    std::size_t fault_around = 0;
    std::array<std::uint8_t, kTags> tags{};  // bytes at Walk::offsets_; every other byte is zero

    bool same_vma(const Page& o) const {
        return mapped && o.mapped && prot == o.prot && name == o.name && fault_around == o.fault_around;
    }
};

// Pages [first, last) of the arena.
struct Span {
    std::size_t first;
    std::size_t last;
    std::size_t pages() const { return last - first; }
};

struct Config {
    std::uint64_t seed;
    std::size_t pages;    // arena size
    std::size_t max_run;  // most pages one call covers
    int steps;
};

// The errno of the usermm::Error that `call` throws, or 0 if it returns.
int error_of(const std::function<void()>& call) {
    try {
        call();
    } catch (const usermm::Error& e) {
        return e.code().value();
    }
    return 0;
}

class Walk {
public:
    explicit Walk(const Config& config)
        : cfg_(config),
          ps_(usermm::page_size()),
          offsets_{0, ps_ / 2 + 3, ps_ - 1},
          arena_(config.pages * ps_),
          pages_(config.pages),
          rng_(config.seed) {}

    // Returns the arena's counters, for walks that must have taken a particular path.
    usermm::Stats run() {
        // Deaths cost a fork each, so there are a fixed number of them, spread over the walk.
        const int death_every = cfg_.steps / 20;
        for (int step = 0; step < cfg_.steps; ++step) {
            INFO("seed ", cfg_.seed, ", step ", step, ": ", what_);
            what_.clear();
            const std::size_t pick = rng_.below(100);
            if (step % death_every == death_every / 2)
                forbidden_access();
            else if (pick < 14)
                map_fixed();
            else if (pick < 18)
                map_anywhere();
            else if (pick < 33)
                protect();
            else if (pick < 45)
                unmap();
            else if (pick < 53)
                prefault();
            else if (pick < 73)
                read();
            else if (pick < 93)
                write();
            else
                bad_call();
            check_agrees();
        }
        what_ = "final sweep";
        for (std::size_t i = 0; i < pages_.size(); ++i)
            if (pages_[i].mapped && allows(pages_[i].prot, Prot::Read)) check_content(i);
        for (std::size_t i = 0; i < pages_.size(); ++i)
            if (pages_[i].mapped) unmap_span(run_of(i));
        check_agrees();
        CHECK(arena_.vmas().empty());
        return arena_.stats();
    }

private:
    class Rng {
    public:
        explicit Rng(std::uint64_t seed) : gen_(seed) {}
        std::size_t below(std::size_t n) { return std::size_t(gen_() % n); }
        bool chance(std::size_t percent) { return below(100) < percent; }

    private:
        std::mt19937_64 gen_;
    };

    struct Attrs {
        Prot prot;
        std::string_view name;
        std::size_t fault_around;
    };

    // --- the steps ---------------------------------------------------------------------------

    void map_fixed() {
        const auto hole = any_page([](const Page& p) { return !p.mapped; });
        if (!hole) return unmap();
        const Span s = sub_span(run_of(*hole));
        const Attrs a = random_attrs();
        what_ = fmt::format("map {} {} '{}' fa {} at a fixed address", str(s), usermm::to_string(a.prot), a.name,
                            a.fault_around);
        void* got = arena_.map(length_of(s), a.prot,
                               {.name = a.name, .address = ptr(s.first), .fault_around_pages = a.fault_around});
        REQUIRE(got == ptr(s.first));
        apply_map(s, a);
    }

    void map_anywhere() {
        const std::size_t n = 1 + rng_.below(cfg_.max_run);
        const Attrs a = random_attrs();
        what_ = fmt::format("map {} pages {} '{}' fa {} where the arena chooses", n, usermm::to_string(a.prot), a.name,
                            a.fault_around);
        const auto call = [&] {
            return arena_.map(length_of({0, n}), a.prot, {.name = a.name, .fault_around_pages = a.fault_around});
        };
        if (largest_hole() < n) {
            REQUIRE(error_of([&] { call(); }) == ENOMEM);
            return;
        }
        const std::uintptr_t got = addr(call());
        REQUIRE(got >= addr(arena_.base()));
        REQUIRE((got - addr(arena_.base())) % ps_ == 0);
        const Span s{(got - addr(arena_.base())) / ps_, (got - addr(arena_.base())) / ps_ + n};
        what_ += fmt::format(": {}", str(s));
        REQUIRE(s.last <= pages_.size());
        for (std::size_t i = s.first; i < s.last; ++i) REQUIRE_FALSE(pages_[i].mapped);
        apply_map(s, a);
    }

    void protect() {
        const auto m = any_page([](const Page& p) { return p.mapped; });
        if (!m) return map_fixed();
        const Span s = sub_span(run_of(*m));
        const Prot prot = kProts[rng_.below(kProts.size())];
        what_ = fmt::format("protect {} {}", str(s), usermm::to_string(prot));
        arena_.protect(ptr(s.first), length_of(s), prot);
        for (std::size_t i = s.first; i < s.last; ++i) pages_[i].prot = normalized(prot);
    }

    void unmap() {
        const auto m = any_page([](const Page& p) { return p.mapped; });
        if (!m) return map_fixed();
        unmap_span(sub_span(run_of(*m)));
    }

    void unmap_span(Span s) {
        what_ = fmt::format("unmap {}", str(s));
        arena_.unmap(ptr(s.first), length_of(s));
        std::fill(pages_.begin() + std::ptrdiff_t(s.first), pages_.begin() + std::ptrdiff_t(s.last), Page{});
    }

    void prefault() {
        const auto m = any_page([](const Page& p) { return p.mapped; });
        if (!m) return map_fixed();
        const Span s = sub_span(run_of(*m));
        const Prot access = kAccesses[rng_.below(kAccesses.size())];
        what_ = fmt::format("prefault {} for {}", str(s), usermm::to_string(access));
        bool allowed = true;
        for (std::size_t i = s.first; i < s.last; ++i) allowed &= allows(pages_[i].prot, normalized(access));
        const int err = error_of([&] { arena_.prefault(ptr(s.first), length_of(s), access); });
        REQUIRE(err == (access == Prot::None ? EINVAL : allowed ? 0 : EACCES));  // None grants nothing
    }

    void read() {
        const auto i = any_page([](const Page& p) { return p.mapped && allows(p.prot, Prot::Read); });
        if (!i) return map_fixed();
        what_ = fmt::format("read page {}", *i);
        check_content(*i);
    }

    void write() {
        const auto i = any_page([](const Page& p) { return p.mapped && allows(p.prot, Prot::Write); });
        if (!i) return map_fixed();
        const std::size_t tag = rng_.below(kTags);
        const auto value = std::uint8_t(rng_.below(256));
        what_ = fmt::format("write {:#x} to page {} + {:#x}", value, *i, offsets_[tag]);
        write_byte(ptr(*i) + offsets_[tag], value);
        pages_[*i].tags[tag] = value;
    }

    // Calls that must throw and change nothing; check_agrees() then proves nothing changed.
    void bad_call() {
        switch (rng_.below(3)) {
            case 0: {
                const auto hole = any_page([](const Page& p) { return !p.mapped; });
                if (!hole) return;
                const Span s = around(*hole);
                const std::size_t which = rng_.below(3);
                what_ = fmt::format("{} of {}, which has a hole at page {}",
                                    std::array{"protect", "unmap", "prefault"}[which], str(s), *hole);
                REQUIRE(error_of([&] {
                            if (which == 0) arena_.protect(ptr(s.first), length_of(s), Prot::ReadWrite);
                            if (which == 1) arena_.unmap(ptr(s.first), length_of(s));
                            if (which == 2) arena_.prefault(ptr(s.first), length_of(s), Prot::Read);
                        }) == ENOMEM);
                return;
            }
            case 1: {
                const auto m = any_page([](const Page& p) { return p.mapped; });
                if (!m) return;
                const Span s = around(*m);
                what_ = fmt::format("map {} over the VMA at page {}", str(s), *m);
                REQUIRE(error_of([&] { arena_.map(length_of(s), Prot::ReadWrite, {.address = ptr(s.first)}); }) ==
                        EEXIST);
                return;
            }
            default: {
                const auto m =
                    any_page([](const Page& p) { return p.mapped && p.prot != (Prot::ReadWrite | Prot::Exec); });
                if (!m) return;
                // A range of mapped pages that contains the one that forbids the access.
                const Span run = run_of(*m);
                const Span s{*m - rng_.below(std::min(*m - run.first, cfg_.max_run) + 1),
                             *m + 1 + rng_.below(std::min(run.last - *m - 1, cfg_.max_run) + 1)};
                Prot access = Prot::None;
                while (allows(pages_[*m].prot, access)) access = kAccesses[rng_.below(kAccesses.size())];
                what_ = fmt::format("prefault {} for {}, which page {} ({}) forbids", str(s), usermm::to_string(access),
                                    *m, usermm::to_string(pages_[*m].prot));
                REQUIRE(error_of([&] { arena_.prefault(ptr(s.first), length_of(s), access); }) == EACCES);
                return;
            }
        }
    }

    // A read or write the model forbids must kill, the way the kernel kills: by SIGSEGV.
    void forbidden_access() {
        const auto i = any_page([](const Page& p) { return !allows(p.prot, Prot::Write); });
        if (!i) return;
        const bool reading = !allows(pages_[*i].prot, Prot::Read) && rng_.chance(50);
        char* p = ptr(*i) + offsets_[rng_.below(kTags)];
        what_ = fmt::format("{} page {} ({}, {}) in a child", reading ? "read" : "write", *i,
                            pages_[*i].mapped ? "mapped" : "unmapped", usermm::to_string(pages_[*i].prot));
        const usermm_test::ChildEnd end = run_in_child([&] {
            const rlimit no_core{0, 0};
            setrlimit(RLIMIT_CORE, &no_core);
            if (reading)
                (void)read_byte(p);
            else
                write_byte(p, 0xa5);
        });
        INFO("child stderr: ", end.err);
        REQUIRE(end.signal == SIGSEGV);
        CHECK(end.err.find("usermm: SIGSEGV") != std::string::npos);
    }

    // --- checks ------------------------------------------------------------------------------

    void check_agrees() {
        REQUIRE_NOTHROW(arena_.verify());
        REQUIRE(arena_vmas() == model_vmas());
    }

    // The whole page, not only the tags: stale data from an earlier mapping shows up anywhere.
    void check_content(std::size_t i) {
        const auto* p = reinterpret_cast<const std::uint8_t*>(ptr(i));
        const std::size_t tag = rng_.below(kTags);
        REQUIRE(read_byte(p + offsets_[tag]) == pages_[i].tags[tag]);
        std::vector<std::uint8_t> want(ps_, 0);
        for (std::size_t t = 0; t < kTags; ++t) want[offsets_[t]] = pages_[i].tags[t];
        const auto diff = std::size_t(std::mismatch(p, p + ps_, want.begin()).first - p);
        REQUIRE_MESSAGE(diff == ps_, "page ", i, " differs from the model at byte ", diff);
    }

    std::string arena_vmas() const {
        std::string out;
        for (const usermm::VmaInfo& v : arena_.vmas()) {
            const std::size_t first = (addr(v.start) - addr(arena_.base())) / ps_;
            out += fmt::format("[{}, {}) {} '{}' fa {}\n", first, first + v.length / ps_, usermm::to_string(v.prot),
                               v.name, v.fault_around_pages);
        }
        return out;
    }

    std::string model_vmas() const {
        std::string out;
        for (std::size_t i = 0; i < pages_.size();) {
            if (!pages_[i].mapped) {
                ++i;
                continue;
            }
            std::size_t j = i + 1;
            while (j < pages_.size() && pages_[i].same_vma(pages_[j])) ++j;
            out += fmt::format("[{}, {}) {} '{}' fa {}\n", i, j, usermm::to_string(pages_[i].prot), pages_[i].name,
                               pages_[i].fault_around);
            i = j;
        }
        return out;
    }

    // --- the model ---------------------------------------------------------------------------

    void apply_map(Span s, const Attrs& a) {
        for (std::size_t i = s.first; i < s.last; ++i)
            pages_[i] = {true, normalized(a.prot), a.name, a.fault_around, {}};
    }

    Attrs random_attrs() {
        // Mostly the same name and window, so that neighbours often merge; sometimes not, so that they
        // must stay apart.
        return {kProts[rng_.below(kProts.size())], rng_.chance(75) ? kNames[0] : kNames[1 + rng_.below(2)],
                rng_.chance(60) ? 16 : kFaultAround[rng_.below(kFaultAround.size())]};
    }

    template <typename Pred>
    std::optional<std::size_t> any_page(Pred pred) {
        std::vector<std::size_t> fit;
        for (std::size_t i = 0; i < pages_.size(); ++i)
            if (pred(pages_[i])) fit.push_back(i);
        if (fit.empty()) return std::nullopt;
        return fit[rng_.below(fit.size())];
    }

    // The longest run around page i of pages that are all mapped (across VMAs) or all unmapped.
    Span run_of(std::size_t i) const {
        Span s{i, i + 1};
        while (s.first > 0 && pages_[s.first - 1].mapped == pages_[i].mapped) --s.first;
        while (s.last < pages_.size() && pages_[s.last].mapped == pages_[i].mapped) ++s.last;
        return s;
    }

    Span sub_span(Span run) {
        // Whole runs now and then: a map that fills a hole exactly must merge on both sides.
        if (run.pages() <= cfg_.max_run && rng_.chance(25)) return run;
        const std::size_t first = rng_.chance(20) ? run.first : run.first + rng_.below(run.pages());
        const std::size_t most = std::min(run.last - first, cfg_.max_run);
        return {first, first + (rng_.chance(20) ? most : 1 + rng_.below(most))};
    }

    // A few pages either side of page i, whatever they hold.
    Span around(std::size_t i) {
        return {i - rng_.below(std::min<std::size_t>(i, 8) + 1),
                i + 1 + rng_.below(std::min<std::size_t>(pages_.size() - i - 1, 8) + 1)};
    }

    std::size_t largest_hole() const {
        std::size_t best = 0;
        for (std::size_t i = 0; i < pages_.size();) {
            const Span s = run_of(i);
            if (!pages_[i].mapped) best = std::max(best, s.pages());
            i = s.last;
        }
        return best;
    }

    // Lengths that are not page multiples must round up to the same pages.
    std::size_t length_of(Span s) { return s.pages() * ps_ - (rng_.chance(30) ? rng_.below(ps_) : 0); }

    char* ptr(std::size_t page) const { return static_cast<char*>(arena_.base()) + page * ps_; }
    static std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
    static std::string str(Span s) { return fmt::format("pages [{}, {})", s.first, s.last); }

    const Config cfg_;
    const std::size_t ps_;
    const std::array<std::size_t, kTags> offsets_;
    usermm::Arena arena_;
    std::vector<Page> pages_;
    Rng rng_;
    std::string what_;  // the current step, for failure messages
};

}  // namespace

TEST_CASE("model: 256 pages, calls of up to 16 pages") {
    for (std::uint64_t seed = 1; seed < 3; ++seed)
        Walk({.seed = seed, .pages = 256, .max_run = 16, .steps = 2500}).run();
}

TEST_CASE("model: 256 pages, calls of up to the whole arena") {
    Walk({.seed = 3, .pages = 256, .max_run = 256, .steps = 2500}).run();
}

TEST_CASE("model: 64 pages, calls of up to 3 pages, fragmented") {
    Walk({.seed = 4, .pages = 64, .max_run = 3, .steps = 2000}).run();
}

// One byte of PTE per page: unmapping thousands of pages covers whole pages of the PTE table, which
// unmap hands back to the kernel instead of clearing byte by byte. Short walks, because long ones
// fragment the arena until no call is that large.
TEST_CASE("model: 12328 pages, calls of up to the whole arena") {
    for (std::uint64_t seed = 5; seed < 10; ++seed)
        Walk({.seed = seed, .pages = 3 * 4096 + 40, .max_run = 3 * 4096 + 40, .steps = 300}).run();
}

// Past the kernel's mapping budget, faults are resolved coarsely: a whole run of untouched pages
// gets its VMA's full rights at once (do_degraded_fault). Nothing the model can see may change.
TEST_CASE("model: 256 pages, with the kernel's mapping budget spent") {
    namespace detail = usermm::detail;
    usermm::page_size();  // the first arena sets the budget; it must not overwrite this one
    struct RestoreLimit {
        long limit = detail::map_budget_limit();
        ~RestoreLimit() { detail::map_budget_set_limit(limit); }
    } restore;
    detail::map_budget_set_limit(detail::map_budget_used() + 16);
    const usermm::Stats s = Walk({.seed = 6, .pages = 256, .max_run = 16, .steps = 1500}).run();
    CHECK(s.degraded_faults > 0);
}
