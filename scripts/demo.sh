#!/bin/bash
# Installs what is missing, builds usermm and runs its demo.
# Usage: scripts/demo.sh [lazy|snapshot|file|checkpoint|swap|far|fibers]   (no argument: all seven)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$root/build-demo" -DCMAKE_BUILD_TYPE=Release -DUSERMM_BUILD_TESTS=OFF -DUSERMM_BUILD_PERF=OFF >/dev/null
cmake --build "$root/build-demo" -j"$(nproc)" --target usermm-demo >/dev/null
if (($# == 0)); then
    for demo in lazy snapshot file checkpoint swap far fibers; do
        echo "=== usermm-demo $demo"
        (cd "$root/build-demo" && ./demo/usermm-demo "$demo")
    done
else
    cd "$root/build-demo" && ./demo/usermm-demo "$@"
fi
