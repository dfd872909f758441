// USERMM_API marks what libusermm exports: the library is built with -fvisibility=hidden, so a
// class or function declared without it stays inside the library (README, "Exported symbols").
#pragma once

#define USERMM_API __attribute__((visibility("default")))
