// fork() takes the counter slab's lock last (it is a leaf), so that the child never inherits it held.
#pragma once

namespace usermm::detail {

void vma_counters_lock_for_fork();
void vma_counters_unlock_after_fork();

}  // namespace usermm::detail
