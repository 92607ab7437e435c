#!/usr/bin/env bash
# The linker of `dist` builds (scripts/build-dist sets it as cargo's target linker): links as
# rustc asked, and when the output is the trellis binary and TRELLIS_LINK_ORDER names a list
# of functions (scripts/layout/sidecar.txt), links once more with those functions first in
# .text. A sidecar then touches few 64 KiB windows of its code, so the kernel's fault-around
# maps fewer pages (docs/ARCHITECTURE.md, "Code a sidecar runs, laid out together").
# The list names functions by their exact symbols; order.py maps them to this link's symbols
# (a stale name to the one symbol that differs only in its hash). Anything that goes wrong with the order keeps the plain link: never a failed build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cc=${TRELLIS_LINK_CC:-cc}
"$cc" "$@"
list=${TRELLIS_LINK_ORDER:-}
[[ -n $list ]] || exit 0
# The output, from the arguments or from a response file (@FILE) rustc wrote for a long line.
out="" prev=""
for a in "$@"; do
    if [[ $prev == -o ]]; then out=$a; fi
    if [[ $a == @* && -f ${a#@} ]]; then out=$(grep -A1 -x -- -o "${a#@}" | tail -1 || true); fi
    prev=$a
done
[[ $(basename "$out") == trellis-* ]] || exit 0
order=$out.order
# The log's last line says what this link did (scripts/build-dist prints it: rustc does not
# show a successful linker's messages).
unordered() {
    echo "scripts/layout/cc.sh: $1; $out keeps the default layout" >&2
    echo "NOT ORDERED: $1" >>"$order.log"
    exit 0
}
if [[ ! -f $list ]]; then
    : >"$order.log"
    unordered "$list not found"
fi
if ! nm --defined-only "$out" | python3 "$here/order.py" map "$list" >"$order" 2>"$order.log"; then
    unordered "mapping $list failed"
fi
cp "$out" "$out.plain"
if ! "$cc" "$@" -Wl,--symbol-ordering-file="$order" -Wl,--no-warn-symbol-ordering 2>>"$order.log"; then
    mv -f "$out.plain" "$out"
    unordered "the ordered link failed"
fi
rm -f "$out.plain"
