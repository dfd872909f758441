// A library that exports what libusermm must not: tests/check_exports.sh must refuse it.
#include <usermm/export.hpp>

namespace usermm::detail {

USERMM_API int exported_by_mistake() { return 1; }

}  // namespace usermm::detail
