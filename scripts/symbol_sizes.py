#!/usr/bin/env python3
"""Bytes of defined symbols per crate in a shared library (`nm -S -C`), largest first: where a library's size goes.

    python3 scripts/symbol_sizes.py $CARGO_TARGET_DIR/release/libedgepack_mobile.so [--top 25]

Reads an unstripped build (the `mobile` profile strips its output; the release build keeps symbols). Generic code is
counted under the crate that defines it (core/alloc/std generics instantiated by other crates count as core...)."""
import argparse
import collections
import re
import subprocess

ap = argparse.ArgumentParser()
ap.add_argument("lib")
ap.add_argument("--top", type=int, default=25)
a = ap.parse_args()
out = subprocess.run(["nm", "--size-sort", "-S", "--defined-only", "-C", a.lib], capture_output=True, text=True, check=True).stdout
sizes = collections.Counter()
for line in out.splitlines():
    parts = line.split(None, 3)
    if len(parts) < 4:
        continue
    name = parts[3].lstrip("<").replace("impl ", "")
    m = re.match(r"&?(?:dyn )?([A-Za-z_0-9]+)::", name)
    sizes[m.group(1) if m else "(other)"] += int(parts[1], 16)
print(f"{sum(sizes.values()) / 1e6:.2f} MB of symbols in {a.lib}")
for crate, n in sizes.most_common(a.top):
    print(f"{n / 1e6:8.2f} MB  {crate}")
