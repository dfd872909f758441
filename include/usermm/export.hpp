// USERMM_API marks what libusermm exports. The library is compiled with -fvisibility=hidden: a class
// or function of namespace usermm declared without it stays inside the library, which
// tests/check_exports.sh refuses (README.md, "Two commands").
#pragma once

#define USERMM_API __attribute__((visibility("default")))
