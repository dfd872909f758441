// Helpers for the stack tests (test_stacks, test_stacks_scale): a ucontext fiber that runs on a
// usermm stack (annotated for ThreadSanitizer, whose shadow call stack must follow the switches),
// recursion to a depth measured by addresses, endless recursion, and an overflow handler that
// records what it was told and leaves by siglongjmp.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <utility>

#include <usermm/usermm.hpp>

#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
}
#endif

namespace stack_test {

inline std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

// The current stack pointer, near enough: the address of this frame.
__attribute__((noinline)) inline std::uintptr_t current_sp() {
    volatile char here = 0;
    return addr(const_cast<char*>(&here));
}

// A context of its own on [bottom, bottom + size), switched to and from with swapcontext.
class Fiber {
public:
    Fiber(void* bottom, std::size_t size, std::function<void()> body) : body_(std::move(body)) {
        if (getcontext(&ctx_) != 0) std::abort();
        ctx_.uc_stack.ss_sp = bottom;
        ctx_.uc_stack.ss_size = size;
        ctx_.uc_link = nullptr;
        const auto self = reinterpret_cast<std::uintptr_t>(this);
        makecontext(&ctx_, reinterpret_cast<void (*)()>(&Fiber::trampoline), 2, unsigned(self >> 32),
                    unsigned(self & 0xffffffffu));
#if defined(__SANITIZE_THREAD__)
        tsan_fiber_ = __tsan_create_fiber(0);
#endif
    }
    explicit Fiber(usermm::Stack& s, std::function<void()> body) : Fiber(s.bottom(), s.size(), std::move(body)) {}
    ~Fiber() {
#if defined(__SANITIZE_THREAD__)
        __tsan_destroy_fiber(tsan_fiber_);
#endif
    }
    Fiber(const Fiber&) = delete;
    Fiber& operator=(const Fiber&) = delete;

    // Runs the fiber until it yields or ends.
    void resume() {
#if defined(__SANITIZE_THREAD__)
        tsan_caller_ = __tsan_get_current_fiber();
        __tsan_switch_to_fiber(tsan_fiber_, 0);
#endif
        if (swapcontext(&caller_, &ctx_) != 0) std::abort();
    }
    // From inside the fiber: back to whoever resumed it.
    void yield() {
#if defined(__SANITIZE_THREAD__)
        __tsan_switch_to_fiber(tsan_caller_, 0);
#endif
        if (swapcontext(&ctx_, &caller_) != 0) std::abort();
    }
    bool done() const { return done_; }
    // For an overflow handler that leaves the fiber by siglongjmp: ThreadSanitizer is told first.
    void left_by_jump() {
#if defined(__SANITIZE_THREAD__)
        __tsan_switch_to_fiber(tsan_caller_, 0);
#endif
    }
    // Runs to the end.
    void run() {
        while (!done_) resume();
    }

private:
    static void trampoline(unsigned hi, unsigned lo) {
        auto* f = reinterpret_cast<Fiber*>((std::uintptr_t(hi) << 32) | lo);
        f->body_();
        f->done_ = true;
        f->yield();
        std::abort();  // never resumed after its end
    }
    ucontext_t ctx_{};
    ucontext_t caller_{};
    std::function<void()> body_;
    bool done_ = false;
    [[maybe_unused]] void* tsan_fiber_ = nullptr;
    [[maybe_unused]] void* tsan_caller_ = nullptr;
};

inline volatile int g_never = 0;  // never set: keeps the recursions below from being proved endless

// Recurses until a frame lies at or below `limit`, calls at_bottom(arg) there, and returns.
__attribute__((noinline)) inline std::size_t dive(std::uintptr_t limit, void (*at_bottom)(void*), void* arg) {
    volatile char buf[900];
    buf[0] = 1;
    buf[899] = 2;
    if (addr(const_cast<char*>(&buf[0])) > limit) return dive(limit, at_bottom, arg) + buf[0];
    if (at_bottom) at_bottom(arg);
    return buf[899];
}

// Recurses without end (a frame of ~300 bytes each, every one touched).
__attribute__((noinline)) inline int forever(int n) {
    volatile char buf[256];
    buf[n & 255] = char(n);
    if (g_never) return n;
    return forever(n + 1) + buf[(n * 7) & 255];
}

// What the last overflow handler call saw, and where to jump.
struct OverflowRecord {
    usermm::StackOverflow seen{};
    volatile int calls = 0;
    volatile bool on_alt_stack = false;
    std::uintptr_t handler_frame = 0;
};
inline OverflowRecord g_overflow;
inline thread_local sigjmp_buf* t_leave_to = nullptr;
inline thread_local Fiber* t_fiber = nullptr;  // the fiber an overflow leaves, for ThreadSanitizer

inline void record_and_leave(const usermm::StackOverflow& o) {
    g_overflow.seen = o;
    g_overflow.calls = g_overflow.calls + 1;
    stack_t ss{};
    sigaltstack(nullptr, &ss);
    g_overflow.on_alt_stack = (ss.ss_flags & SS_ONSTACK) != 0;
    volatile char here = 0;
    g_overflow.handler_frame = addr(const_cast<char*>(&here));
    if (t_fiber) t_fiber->left_by_jump();
    if (t_leave_to) siglongjmp(*t_leave_to, 1);
}

}  // namespace stack_test
