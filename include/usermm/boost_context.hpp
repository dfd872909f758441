// usermm stacks for Boost.Context: a StackPool as a StackAllocator (boost::context::fiber,
// callcc), so that fibers get stacks that grow by faults, with guards that cost no kernel mapping.
//
//   usermm::StackPool pool(arena, {.max_size = 1 << 20});
//   boost::context::fiber f{std::allocator_arg, pool.allocator(), fn};
//
// Needs Boost.Context (libboost-context-dev); usermm itself does not link it.
#pragma once

#include <boost/context/stack_context.hpp>

#include <usermm/usermm.hpp>

namespace usermm {

class StackPoolAllocator {
public:
    explicit StackPoolAllocator(StackPool& pool) : pool_(&pool) {}
    boost::context::stack_context allocate() {
        boost::context::stack_context sc;
        sc.sp = pool_->acquire_top();
        sc.size = pool_->stack_size();
        return sc;
    }
    void deallocate(boost::context::stack_context& sc) noexcept { pool_->release_top(sc.sp); }

private:
    StackPool* pool_;
};

inline StackPoolAllocator StackPool::allocator() { return StackPoolAllocator(*this); }

}  // namespace usermm
