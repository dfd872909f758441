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
# libc functions usermm wraps (lib/api/stack.cpp): exported under their own names on purpose.
interposed="${returns}pthread_create$"
attached='^(vtable for |typeinfo for |typeinfo name for |non-virtual thunk to |guard variable for )'
# Lines "NAME<tab>ENTITY": the entity is what a symbol names, its function or object without the
# parameter list.
with_entity() { sed -E "h; s/$attached//; s/\(.*//; x; G; s/\n/\t/"; }
internal() { [[ "$1" == *usermm::detail::* || "$1" == *"(anonymous namespace)"* ]]; }

# nm -C prints "ADDRESS TYPE NAME", the demangled name with spaces in it.
dynamic=$(nm -D --defined-only -C "$lib" | cut -d' ' -f2- | with_entity)
exported=$(cut -d' ' -f2- <<<"$dynamic" | cut -f1 | sort -u)
defined=$(nm --defined-only -C "${objects[@]}" | awk '$2 ~ /^[TDBR]$/' | cut -d' ' -f3- | sort -u | with_entity)

status=0
while IFS=$'\t' read -r symbol e; do
    type=${symbol%% *} name=${symbol#* }
    if internal "$e"; then
        echo "exports $name, which is usermm's internals"
        status=1
    elif ! [[ "$e" =~ $public || "$e" =~ $interposed || ( "$type" =~ ^[VWuvw]$ && "$e" =~ $library ) ]]; then
        echo "exports $name ($type), which is not in usermm's public API"
        status=1
    fi
done <<<"$dynamic"

while IFS=$'\t' read -r name e; do
    if [[ "$e" == usermm::* ]] && ! internal "$e" && ! grep -qxF "$name" <<<"$exported"; then
        echo "does not export $name: a public class or function needs USERMM_API (include/usermm/export.hpp), internals belong in usermm::detail"
        status=1
    fi
done <<<"$defined"

[[ $status -eq 0 ]] && echo "$(basename "$lib"): $(grep -c . <<<"$dynamic") dynamic symbols, all usermm's public API"
exit $status
