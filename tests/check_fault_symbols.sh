#!/bin/bash
# The fault world may call only async-signal-safe functions (lib/core/fault_world.hpp). This check reads
# the undefined symbols of the fault-path object files: every one must be defined by another of
# those files or be on the allow-list below; an allocator, a throw or a mutex fails with its name.
# The allow-list holds POSIX's async-signal-safe functions and Linux system calls whose glibc
# wrappers do nothing but trap (mmap, madvise, mincore, ioctl, syscall). The fault world is the
# folder lib/fault: the calls only the API world makes live in lib/api/page_ops_api.cpp.
# Usage: check_fault_symbols.sh "a.o;b.o;..."
set -euo pipefail
IFS=';' read -r -a objects <<<"$1"

allowed='^(_GLOBAL_OFFSET_TABLE_|__errno_location|__stack_chk_fail|clock_gettime|madvise|mmap|mmap64|mprotect|munmap|write|raise|sigaction|sigemptyset|sigfillset|sigaddset|sigdelset|sigismember|pthread_sigmask|sched_yield|pthread_self|open|open64|close|ioctl|syscall|mincore|pread|pread64|pwrite|pwrite64|pwritev|pwritev64|getpid|fstat|fstat64|memcpy|memset|memmove|__(asan|ubsan|tsan|sanitizer|msan)_.*|__assert_fail)$'
forbidden='^(malloc|calloc|realloc|free|_Zn[wa].*|_Zd[la].*|__cxa_throw|__cxa_allocate_exception|__cxa_begin_catch|pthread_mutex_.*|printf|fprintf|puts|fwrite|_ZN3fmt.*)$'

defined=$(nm --defined-only "${objects[@]}" | awk 'NF == 3 { print $3 }' | sort -u)
undefined=$(nm -u "${objects[@]}" | awk 'NF == 2 && $1 == "U" { print $2 }' | sort -u)
external=$(comm -23 <(echo "$undefined") <(echo "$defined"))

status=0
while read -r sym; do
    [[ -z "$sym" ]] && continue
    if [[ "$sym" =~ $forbidden ]]; then
        echo "fault path calls forbidden $sym ($(echo "$sym" | c++filt))"
        status=1
    elif ! [[ "$sym" =~ $allowed ]]; then
        echo "fault path calls $sym ($(echo "$sym" | c++filt)), which is not on the async-signal-safe allow-list"
        status=1
    fi
done <<<"$external"
[[ $status -eq 0 ]] && echo "fault path: $(echo "$external" | grep -c .) external symbols, all async-signal-safe"
exit $status
