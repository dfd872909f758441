#!/bin/bash
# Installs what is missing, then builds and runs every test in three builds: optimised with
# warnings as errors, AddressSanitizer + UndefinedBehaviorSanitizer, and ThreadSanitizer. Ends with
# one line that adds up all three ctest runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
jobs=$(nproc)
passed=0 failed=0

# Configures, builds and tests one configuration. Any failure (configure, build, a test, no test
# at all) makes it return 1; `set -e` does not apply inside a function called with `||`.
run() {
    local name=$1
    shift
    local dir="$root/build-ci/$name"
    echo "=== $name"
    cmake -S "$root" -B "$dir" -DUSERMM_WERROR=ON "$@" >/dev/null || return 1
    cmake --build "$dir" -j"$jobs" 2>&1 | grep -Ev '^\[ *[0-9]+%\]'
    ((PIPESTATUS[0] == 0)) || { echo "build of $name failed"; failed=$((failed + 1)); return 1; }
    local log="$dir/ctest.log" status=0
    (cd "$dir" && ctest --output-on-failure --no-tests=error -j"$jobs" --timeout 600 ${CTEST_ARGS:-}) 2>&1 |
        tee "$log" || status=1
    local line
    line=$(grep -E 'tests passed, [0-9]+ tests failed out of [0-9]+' "$log" | tail -1) || true
    if [[ -z "$line" ]]; then
        echo "ctest of $name printed no summary"
        failed=$((failed + 1))
        return 1
    fi
    local total fails
    total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
    fails=$(sed -E 's/.*tests passed, ([0-9]+) tests failed.*/\1/' <<<"$line")
    passed=$((passed + total - fails))
    failed=$((failed + fails))
    return $status
}

overall=0
run release -DCMAKE_BUILD_TYPE=RelWithDebInfo || overall=1
run asan -DCMAKE_BUILD_TYPE=Debug -DUSERMM_SANITIZE=address,undefined -DUSERMM_BUILD_PERF=OFF || overall=1
run tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUSERMM_SANITIZE=thread -DUSERMM_BUILD_PERF=OFF \
    -DUSERMM_BUILD_DEMO=OFF || overall=1
echo "all builds: $passed passed, $failed failed"
exit $overall
