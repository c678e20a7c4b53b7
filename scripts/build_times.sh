#!/usr/bin/env bash
# Cold build times of the README's commands, in a fresh target dir (crates already downloaded), one after the
# other as a new user runs them; writes the table between the build-times markers of BENCHMARKS.md with --md.
#
#   scripts/build_times.sh [--md BENCHMARKS.md]      ~20 min on 2 cores (the test command also lints: cargo clippy checks every dependency once more)
# Each step after the first must compile only what it adds: the line "Compiling lines" counts them per step
# (the demo's plain `cargo build --release` right after `--workspace` must say 0).
set -euo pipefail
cd "$(dirname "$0")/.."
MD=""
[ "${1:-}" = "--md" ] && MD=$2
TGT=$(mktemp -d /tmp/edgepack-cold-XXXXXX)
export CARGO_TARGET_DIR=$TGT
trap 'rm -rf "$TGT"' EXIT
rows=()
step() {  # label, command...
  local label=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$TGT.log" 2>&1 || { cat "$TGT.log" >&2; exit 1; }
  local t1; t1=$(date +%s.%N)
  local n; n=$(grep -c '^ *Compiling ' "$TGT.log" || true)
  rows+=("| \`$label\` | $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", b-a}') s | $n |")
  echo "$label: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", b-a}') s, $n crates compiled" >&2
}
step "cargo run --release -- demo" cargo run --release -- demo --out "$TGT/demo"
step "cargo build --release --workspace" cargo build --release --workspace
step "cargo build --release" cargo build --release
step "cargo test --release --workspace --no-run" cargo test --release --workspace --no-run
rm -f "$TGT.log"
table=$(printf '%s\n' "| command (in this order, fresh target dir) | wall time | Compiling lines |" "|---|---|---|" "${rows[@]}")
echo "$table"
if [ -n "$MD" ]; then
  python3 - "$MD" "$table" "$(nproc)" "$(rustc --version | cut -d' ' -f2)" <<'PY'
import re, sys
path, table, cores, rustc = sys.argv[1:5]
text = open(path).read()
block = f"<!-- build-times:begin -->\n{table}\n<!-- build-times:end -->"
if "<!-- build-times:begin -->" in text:
    text = re.sub(r"<!-- build-times:begin -->.*?<!-- build-times:end -->", lambda m: block, text, flags=re.S)
else:
    text += (f"\n## Build times\n\nCommand: `scripts/build_times.sh --md BENCHMARKS.md` ({cores} cores, rustc {rustc}, "
             "crates already downloaded). The README's two commands share one target dir and one feature "
             "resolution, so each step compiles only what it adds.\n\n" + block + "\n")
tmp = path + ".tmp"
open(tmp, "w").write(text)
__import__("os").replace(tmp, path)
PY
fi
