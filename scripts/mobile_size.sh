#!/usr/bin/env bash
# Stripped size of the mobile library for x86_64 Linux, CPU-only (`--no-default-features`), with the `mobile`
# profile of Cargo.toml, with tract (`--features tract`) and without (the kernel interpreter alone); writes the
# table between the mobile-size markers of BENCHMARKS.md with --md.
#
#   scripts/mobile_size.sh [--md BENCHMARKS.md] [--abort] [--ops FILE]
# --abort also measures panic = "abort"; --ops FILE adds a selective build of the interpreter with only the ops of
# FILE (what `edgepack ops MODEL... -o FILE` writes; the build reads it through EDGEPACK_INTERP_OPS).
# A separate build (own profile and feature set): tens of minutes on 2 cores the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo's own default (the checkout's target/) unless set, so `cargo run` and the scripts share one build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
MD=""; ABORT=0; OPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --md) MD=$2; shift 2 ;;
    --abort) ABORT=1; shift ;;
    --ops) OPS=$(realpath "$2"); shift 2 ;;
    *) echo "usage: $0 [--md FILE] [--abort] [--ops FILE]" >&2; exit 2 ;;
  esac
done
rows=()
measure() {  # name, extra cargo args...
  local name=$1; shift
  cargo build -q -p edgepack-mobile --lib --profile mobile --no-default-features "$@"
  local so="$CARGO_TARGET_DIR/mobile/libedgepack_mobile.so"
  strip --strip-all -o /tmp/edgepack_mobile_stripped.so "$so"
  local bytes; bytes=$(stat -c %s /tmp/edgepack_mobile_stripped.so)
  local gz; gz=$(gzip -9 -c /tmp/edgepack_mobile_stripped.so | wc -c)
  rows+=("| $name | $(awk -v b="$bytes" 'BEGIN{printf "%.2f", b/1048576}') MiB ($bytes B) | $(awk -v b="$gz" 'BEGIN{printf "%.2f", b/1048576}') MiB |")
  echo "$name: $bytes bytes stripped, $gz gzip -9" >&2
}
measure 'CPU-only with tract (`--features tract`: every op tract runs)' --features tract
measure 'CPU-only, kernel interpreter (no features: kernel nodes + its op set)'
if [ -n "$OPS" ]; then
  n=$(grep -cv '^\s*\(#\|$\)' "$OPS")
  EDGEPACK_INTERP_OPS=$OPS measure "CPU-only, kernel interpreter, selective: the $n ops of \`$(basename "$OPS")\`"
  cargo build -q -p edgepack-mobile --lib --profile mobile --no-default-features  # leave the default build in place
fi
if [ "$ABORT" = 1 ]; then
  CARGO_PROFILE_MOBILE_PANIC=abort measure 'CPU-only, kernel interpreter, panic = "abort"'
  cargo build -q -p edgepack-mobile --lib --profile mobile --no-default-features  # leave the default build in place
fi
table=$(printf '%s\n' "| x86_64 Linux cdylib (libedgepack_mobile.so, strip --strip-all) | size | gzip -9 |" "|---|---|---|" "${rows[@]}")
echo "$table"
if [ -n "$MD" ]; then
  python3 - "$MD" "$table" <<'PY'
import re, sys
path, table = sys.argv[1], sys.argv[2]
text = open(path).read()
block = f"<!-- mobile-size:begin -->\n{table}\n<!-- mobile-size:end -->"
if "<!-- mobile-size:begin -->" in text:
    text = re.sub(r"<!-- mobile-size:begin -->.*?<!-- mobile-size:end -->", lambda m: block, text, flags=re.S)
else:
    text += "\n## Mobile library size\n\nCommand: `scripts/mobile_size.sh --md BENCHMARKS.md --abort` (rustc " \
            + __import__("subprocess").run(["rustc", "--version"], capture_output=True, text=True).stdout.split()[1] \
            + "). Target: at most 4 MB for the CPU-only library.\n\n" + block + "\n"
tmp = path + ".tmp"
open(tmp, "w").write(text)
import os
os.replace(tmp, path)
PY
fi
