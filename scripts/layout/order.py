#!/usr/bin/env python3
"""The function order of the trellis binary (docs/ARCHITECTURE.md, "Code a sidecar runs,
laid out together").

  order.py record CALLGRIND_OUT... > sidecar.txt
      The functions of the trellis binary that ran in callgrind profiles (recorded with
      --demangle=no), hottest first, by their exact symbol names.
  nm --defined-only BINARY | order.py map sidecar.txt > ORDER
      The symbols of one link for the names in the list, in the list's order: what lld's
      --symbol-ordering-file reads (scripts/layout/cc.sh). A summary goes to stderr.

A legacy Rust symbol ends in a hash (`17h<16 hex>E`) of the crate's cargo metadata (profile,
rustc and dependency versions) and of a generic function's type arguments; it does not change
with the code inside a function, so a list recorded on a `dist` build finds its functions in
later `dist` builds by their exact names. A name that is not found (a dependency or the
toolchain changed) still finds the one symbol that differs from it only in the hash or in a
`.llvm.<digits>` suffix; where several do (the instances of a generic function), none is
taken, since ordering all of them would spread the code again. A stale list thus costs only
layout, never a build."""
import collections
import re
import sys

_HASH = re.compile(r"17h[0-9a-f]{16}E$")
_SUFFIX = re.compile(r"(\.llvm\.\d+|'\d+)+$")


def stem(name):
    """A symbol's name without what differs between builds of the same code."""
    return _HASH.sub("E", _SUFFIX.sub("", name))


def exact_order(listed, defined):
    """The symbols of `defined` named in `listed`, in the order of `listed`, each once: the
    exact name, else the only symbol with the name's stem."""
    exact = set(defined)
    by_stem = collections.defaultdict(list)
    for name in defined:
        by_stem[stem(name)].append(name)
    out, seen = [], set()
    for name in listed:
        if name in exact:
            sym = name
        else:
            found = by_stem.get(stem(name), ())
            if len(found) != 1:
                continue
            sym = found[0]
        if sym not in seen:
            seen.add(sym)
            out.append(sym)
    return out


def nm_names(lines):
    """Names of the defined symbols in `nm` output ("ADDRESS TYPE NAME")."""
    names = []
    for line in lines:
        f = line.split(None, 2)
        if len(f) == 3:
            names.append(f[2].rstrip("\n"))
    return names


def executed(lines, object_prefix="trellis"):
    """Self instructions by function of one callgrind profile, for the functions of the
    object whose file name starts with `object_prefix`."""
    cost = collections.Counter()
    names = {}  # callgrind's compressed strings: "(id) name" once, then "(id)"

    def name_of(value):
        m = re.match(r"\((\d+)\)\s*(.*)$", value)
        if not m:
            return value
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), "")

    ob_names = {}
    ob = fn = ""
    after_calls = False
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith(("ob=", "cob=")):
            key, value = line.split("=", 1)
            m = re.match(r"\((\d+)\)\s*(.*)$", value)
            path = value
            if m:
                if m.group(2):
                    ob_names[m.group(1)] = m.group(2)
                path = ob_names.get(m.group(1), "")
            if key == "ob":
                ob = path
        elif line.startswith("fn="):
            fn = name_of(line[3:])
        elif line.startswith("cfn="):
            name_of(line[4:])  # defines the id; the callee's own cost is under its fn=
        elif line.startswith("calls="):
            after_calls = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_calls:
                after_calls = False  # the call's inclusive cost, not the caller's own
                continue
            f = line.split()
            if len(f) >= 2 and fn and not fn.startswith("0x"):
                if ob.rsplit("/", 1)[-1].startswith(object_prefix):
                    cost[fn] += int(f[1])
    return cost


def record(profiles):
    """The list: the functions that ran, most self instructions first."""
    total = collections.Counter()
    for path in profiles:
        with open(path, encoding="utf-8", errors="replace") as f:
            for name, n in executed(f).items():
                total[re.sub(r"'\d+$", "", name)] += n  # callgrind's recursion levels
    return [name for name, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]


def main(argv):
    if len(argv) >= 3 and argv[1] == "record":
        for name in record(argv[2:]):
            print(name)
        return 0
    if len(argv) == 3 and argv[1] == "map":
        with open(argv[2], encoding="utf-8") as f:
            listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        order = exact_order(listed, nm_names(sys.stdin))
        sys.stdout.write("".join(name + "\n" for name in order))
        print(f"{len(listed)} names listed, {len(order)} symbols ordered", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
