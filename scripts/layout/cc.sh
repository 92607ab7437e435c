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
if [[ ! -f $list ]]; then
    echo "scripts/layout/cc.sh: $list not found; $out keeps the default layout" >&2
    exit 0
fi
order=$out.order
if ! nm --defined-only "$out" | python3 "$here/order.py" map "$list" >"$order" 2>"$order.log"; then
    echo "scripts/layout/cc.sh: mapping $list failed ($order.log); $out keeps the default layout" >&2
    exit 0
fi
cp "$out" "$out.plain"
if ! "$cc" "$@" -Wl,--symbol-ordering-file="$order" -Wl,--no-warn-symbol-ordering 2>>"$order.log"; then
    echo "scripts/layout/cc.sh: the ordered link failed ($order.log); $out keeps the default layout" >&2
    mv -f "$out.plain" "$out"
    exit 0
fi
rm -f "$out.plain"
