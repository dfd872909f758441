#!/bin/bash
# libusermm exports its public API and nothing else: it is compiled with hidden visibility, and
# include/usermm marks the public classes and functions USERMM_API. This check reads the dynamic
# symbols of a shared build. Each must name a marked class (a member, its vtable or typeinfo:
# private members of an exported class are exported with it) or a marked function, or be a weak
# copy of a standard library or fmt template, which every user of the template emits as well;
# anything of usermm::detail or of an anonymous namespace fails, and so does any other name. The
# other way round, what the library's objects define in namespace usermm outside detail and
# anonymous namespaces is public and must be exported: a public function or class whose mark was
# lost fails.
# Usage: check_exports.sh LIBRARY.so "a.o;b.o;..." INCLUDE_DIR
set -euo pipefail
lib=$1 include=$3
IFS=';' read -r -a objects <<<"$2"

classes=$(sed -nE 's/^(class|struct) USERMM_API ([A-Za-z_][A-Za-z0-9_]*).*/\2/p' "$include"/usermm/*.hpp)
functions=$(sed -nE 's/^USERMM_API [^(]* ([A-Za-z_][A-Za-z0-9_]*)\(.*/\1/p' "$include"/usermm/*.hpp)
if [[ -z "$classes" || -z "$functions" ]]; then
    echo "no USERMM_API class or function found in $include/usermm"
    exit 1
fi
# A template function's name starts with its return type.
returns='^([^<(]* )?'
public="${returns}usermm::($(echo $classes $functions | tr ' ' '|'))(\[abi:[a-z0-9]+\])?(::|$)"
library="${returns}(std|__gnu_cxx|fmt)::"
linker_defined='^(_init|_fini|_edata|_end|__bss_start)$'
attached='^(vtable for |VTT for |construction vtable for .*-in-|typeinfo for |typeinfo name for |non-virtual thunk to |virtual thunk to |guard variable for )'
# What a symbol names: its function or object, without the parameter list.
entity() { sed -E "s/$attached//; s/\(.*//" <<<"$1"; }
internal() { [[ "$1" == *usermm::detail::* || "$1" == *"(anonymous namespace)"* ]]; }

status=0 count=0
# nm -C prints "ADDRESS TYPE NAME", the demangled name with spaces in it.
exported=$(nm -D --defined-only -C "$lib" | cut -d' ' -f3- | sort -u)
while read -r type name; do
    [[ -z "$name" ]] && continue
    count=$((count + 1))
    [[ "$name" =~ $linker_defined ]] && continue
    e=$(entity "$name")
    if internal "$e"; then
        echo "exports $name, which is usermm's internals"
        status=1
    elif ! [[ "$e" =~ $public || ( "$type" =~ ^[VWuvw]$ && "$e" =~ $library ) ]]; then
        echo "exports $name ($type), which is not in usermm's public API"
        status=1
    fi
done < <(nm -D --defined-only -C "$lib" | cut -d' ' -f2-)

while read -r name; do
    e=$(entity "$name")
    if [[ "$e" == usermm::* ]] && ! internal "$e" && ! grep -qxF "$name" <<<"$exported"; then
        echo "does not export $name: a public class or function needs USERMM_API (include/usermm/export.hpp), internals belong in usermm::detail"
        status=1
    fi
done < <(nm --defined-only -C "${objects[@]}" | awk '$2 ~ /^[TDBR]$/' | cut -d' ' -f3- | sort -u)

[[ $status -eq 0 ]] && echo "$(basename "$lib"): $count dynamic symbols, all usermm's public API"
exit $status
