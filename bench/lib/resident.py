#!/usr/bin/env python3
"""Which code of a running binary is resident: python3 resident.py PID [TOP].

Reads /proc/PID/maps and /proc/PID/pagemap (present bit) for the mappings of the process's
own executable, attributes each resident page of its text to the symbols on it (from `nm`,
so the binary needs its symbol table) and prints MiB resident by crate (the first path
segment of the demangled name; C code by prefix). Needs root or the process's owner."""
import collections, os, re, struct, subprocess, sys

pid, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25
exe = os.readlink(f"/proc/{pid}/exe")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Virtual address (as in the file's symbols) of each resident page of the executable.
resident = set()
loads = []
with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pm:
    for line in maps:
        f = line.split()
        if len(f) < 6 or f[5] != exe:
            continue
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        off = int(f[2], 16)
        loads.append((lo, hi, off, f[1]))
base = min(lo - off for lo, _, off, _ in loads)  # PIE load bias (first mapping at offset 0)
with open(f"/proc/{pid}/pagemap", "rb") as pm:
    for lo, hi, off, perm in loads:
        pm.seek(lo // PAGE * 8)
        data = pm.read((hi - lo) // PAGE * 8)
        for i in range(len(data) // 8):
            (entry,) = struct.unpack_from("<Q", data, i * 8)
            if entry >> 63 & 1:
                resident.add(lo - base + i * PAGE)
# Symbols with sizes, demangled; attribute each symbol's resident bytes.
out = subprocess.run(["nm", "-S", "-C", "--defined-only", exe], capture_output=True, text=True).stdout
by_crate = collections.Counter()
total = collections.Counter()
for line in out.splitlines():
    p = line.split(" ", 3)
    if len(p) < 4 or p[2] not in "tTwW":
        continue
    addr, size, name = int(p[0], 16), int(p[1], 16), p[3]
    n = re.sub(r"^[<&*\s]+|^_<", "", name)
    m = re.match(r"(?:dyn |impl |mut )?([A-Za-z_][A-Za-z0-9_]*)::", n)
    crate = m.group(1) if m else "(C) " + re.split(r"[_.]", name.lstrip("_"))[0][:14]
    total[crate] += size
    a = addr
    while a < addr + size:
        end = min((a // PAGE + 1) * PAGE, addr + size)
        if a // PAGE * PAGE in resident:
            by_crate[crate] += end - a
        a = end
# Resident pages by section (a page shared by two sections counts for the first).
sections = []
for line in subprocess.run(["readelf", "-SW", exe], capture_output=True, text=True).stdout.splitlines():
    f = line.replace("[ ", "[").split()
    if len(f) > 6 and f[0].startswith("[") and f[1].startswith(".") and int(f[3], 16):
        sections.append((int(f[3], 16), int(f[5], 16), f[1]))
by_section = collections.Counter()
for page in resident:
    name = next((n for a, size, n in sorted(sections) if a // PAGE * PAGE <= page < a + size), "(other)")
    by_section[name] += PAGE
print(f"{exe}: {len(resident) * PAGE / 2**20:.1f} MiB of its pages resident; by section: "
      + ", ".join(f"{n} {b / 2**20:.2f}" for n, b in by_section.most_common()) + " MiB")
print("text resident by crate (MiB resident / MiB in the binary):")
for crate, b in by_crate.most_common(top):
    print(f"  {b / 2**20:6.2f} / {total[crate] / 2**20:5.2f}  {crate}")
