#!/bin/bash
# Installs, with apt-get, whatever of usermm's build dependencies this Debian machine lacks.
set -euo pipefail
packages=(g++ cmake make binutils libboost-dev libboost-context-dev libfmt-dev doctest-dev pkg-config libfuse3-dev fuse3
    libhiredis-dev liblz4-dev libzstd-dev libmemcached-dev memcached redis-server redis-tools
    systemtap-sdt-dev linux-perf gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
