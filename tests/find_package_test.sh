#!/bin/bash
# Installs the built usermm into a scratch prefix, then configures, builds and runs a separate
# project against it with find_package(usermm).
# Usage: find_package_test.sh BUILD_DIR SOURCE_DIR "EXTRA_CXX_FLAGS" [CXX_COMPILER]
set -euo pipefail
build=$1 source=$2 flags=${3:-} cxx=${4:-c++}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
cmake -S "$source/tests/consumer" -B "$scratch/build" -DCMAKE_PREFIX_PATH="$scratch/prefix" \
    -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$scratch/build" >/dev/null
"$scratch/build/consumer"
