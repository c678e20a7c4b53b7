#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ (cargo fuzz, nightly, AddressSanitizer) for SECONDS each, after replaying
# the committed reproducers of earlier findings (fuzz/regressions/<target>/). A crash, a leak, a timeout or an
# out-of-memory fails the run and leaves its reproducer under $EDGEPACK_FUZZ_HOME/artifacts/<target>/.
#
#   scripts/fuzz.sh SECONDS [TARGET...]     (the test command runs it with 20; RELIABILITY.md has longer runs)
#   EDGEPACK_FUZZ_MD=RELIABILITY.md scripts/fuzz.sh 3600 T  also writes T's row of the table in that file
#   EDGEPACK_FUZZ_RUNS=10000000 ...                         stops a target after that many executions
#
# Installs what it needs when missing: the nightly toolchain (rustup) and cargo-fuzz (crates.io), under ~/.cache.
# The corpus grows across runs in $EDGEPACK_FUZZ_HOME/corpus (seeded each time by fuzz/seeds.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECS=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
HOME_DIR=${EDGEPACK_FUZZ_HOME:-$HOME/.cache/edgepack-fuzz}
TOOLS=$HOME/.cache/edgepack-tools
PY=${PY:-${EDGEPACK_VENV:-$HOME/.cache/edgepack-venv}/bin/python}
export PATH="$TOOLS/bin:$PATH"
CARGO_FUZZ_VERSION=0.13.2

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install -q --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$TOOLS"
fi
[ -x "$PY" ] || { echo "FATAL: no Python at $PY (scripts/test.sh makes the environment)" >&2; exit 1; }

# The instrumented build has its own target folder: other flags, other toolchain than the workspace's.
FUZZ_ARGS=(--fuzz-dir fuzz --target-dir "$HOME/.cache/edgepack-fuzz-target")
cargo +nightly fmt --manifest-path fuzz/Cargo.toml -- --check
cargo +nightly fuzz build "${FUZZ_ARGS[@]}"

mapfile -t ALL < <(cargo +nightly fuzz list --fuzz-dir fuzz)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")

# Each run its own seeds folder and rows file: runs of different targets may go side by side.
mkdir -p "$HOME_DIR"
SEEDS=$(mktemp -d "$HOME_DIR/seeds.XXXXXX")
ROWS=$(mktemp "$HOME_DIR/rows.XXXXXX")
trap 'rm -rf "$SEEDS" "$ROWS"' EXIT
"$PY" fuzz/seeds.py "$SEEDS" --edgepack "${EDGEPACK_BIN:-}" --shared "${EDGEPACK_SHARED:-$ROOT/../shared}"

# libFuzzer's limits: an allocation over 2 GiB or an RSS over 3 GiB is a finding (a size taken from the input
# without a bound), so is one input running 30 s.
LIMITS=(-rss_limit_mb=3072 -malloc_limit_mb=2048 -timeout=30 -print_final_stats=1)
summary=()
rows=()
failed=()
found=()
for t in "${TARGETS[@]}"; do
  printf '\n==> fuzz %s (%s s)\n' "$t" "$SECS"
  corpus="$HOME_DIR/corpus/$t"
  art="$HOME_DIR/artifacts/$t/"
  mkdir -p "$corpus" "$art" "$SEEDS/$t"
  # (A log per target and length: the test command's 20 s runs may go while a long run of the same target does.)
  log="$HOME_DIR/$t.$SECS.log"
  reg="fuzz/regressions/$t"
  if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
    # Every committed reproducer once: each must now run clean.
    if ! cargo +nightly fuzz run "${FUZZ_ARGS[@]}" "$t" "$reg"/* -- "${LIMITS[@]}" -artifact_prefix="$art" \
      > "$log.regressions" 2>&1; then
      tail -40 "$log.regressions"
      failed+=("$t (a committed reproducer fails again)")
      continue
    fi
  fi
  # The seeds enter the corpus once, minimised (libFuzzer's merge keeps the files that add coverage): later runs
  # start from the corpus alone instead of replaying every seed first.
  stamp="$(sha256sum fuzz/seeds.py | cut -c1-16)-$(ls "$SEEDS/$t" | wc -l)"
  if [ "$(cat "$corpus/.seeded" 2>/dev/null)" != "$stamp" ]; then
    if ! cargo +nightly fuzz run "${FUZZ_ARGS[@]}" "$t" "$corpus" "$SEEDS/$t" -- "${LIMITS[@]}" -merge=1 \
      -artifact_prefix="$art" > "$log.merge" 2>&1; then
      tail -60 "$log.merge"
      failed+=("$t (a seed fails: $(ls -t "$art" | head -1))")
      continue
    fi
    echo "$stamp" > "$corpus/.seeded"
  fi
  # A short run (the test command's) replays the committed reproducers and the seeds (above: those fail it), then
  # mutates for SECS from a fixed sample of the corpus (the first 100 files by name: libFuzzer replays the whole
  # corpus before it mutates, whatever -max_total_time says) with a fixed seed, adding nothing to the corpus. What
  # that short search finds is not the change's fault and not reproducible run to run (the target's own hash maps
  # are seeded at random, so coverage, and the search, differ between builds): it is reported loudly, the
  # reproducer kept under $HOME_DIR/findings/, and fails the run only with EDGEPACK_FUZZ_STRICT=1. The long runs
  # (`just fuzz`, RELIABILITY.md) search: random seed, the whole corpus, they grow it, and any finding fails them.
  from="$corpus"
  seed=()
  if [ "$SECS" -le 60 ]; then
    from=$(mktemp -d)
    # (sed, not head: head exits after 100 lines and sort dies of SIGPIPE, which pipefail turns into a failure.)
    find "$corpus" -type f ! -name .seeded | LC_ALL=C sort | sed -n "1,100p" | xargs -r cp -t "$from"
    seed=(-seed="${EDGEPACK_FUZZ_SEED:-1}")
  fi
  runs=()
  [ -n "${EDGEPACK_FUZZ_RUNS:-}" ] && runs=(-runs="$EDGEPACK_FUZZ_RUNS")
  started=$(date +%s)
  if cargo +nightly fuzz run "${FUZZ_ARGS[@]}" "$t" "$from" -- "${LIMITS[@]}" "${seed[@]}" "${runs[@]}" \
    -max_total_time="$SECS" -artifact_prefix="$art" > "$log" 2>&1; then
    status=ok
  else
    tail -60 "$log"
    repro=$(ls -t "$art" | sed -n 1p)
    if [ "$SECS" -le 60 ] && [ "${EDGEPACK_FUZZ_STRICT:-0}" != 1 ]; then
      status=FOUND
      mkdir -p "$HOME_DIR/findings"
      cp "$art/$repro" "$HOME_DIR/findings/$t-$repro" 2>/dev/null || true
      found+=("$t: $HOME_DIR/findings/$t-$repro (replay: cargo +nightly fuzz run --fuzz-dir fuzz $t FILE)")
    else
      status=FAILED
      failed+=("$t (reproducer: $repro)")
    fi
  fi
  [ "$from" != "$corpus" ] && rm -rf "$from"
  execs=$(grep -a -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -a -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  files=$(find "$corpus" -type f ! -name .seeded | wc -l)
  rate=$(grep -a -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
  summary+=("$(printf '%-18s %-6s %12s execs %7s edges %6s corpus files' "$t" "$status" "$execs" "$cov" "$files")")
  rows+=("| \`$t\` | $(($(date +%s) - started)) | $(date -u +%Y-%m-%d) | $status | $execs | $rate | $cov | $files |")
done

printf '\n==> fuzz summary (%s s per target, logs in %s/TARGET.%s.log)\n' "$SECS" "$HOME_DIR" "$SECS"
printf '%s\n' "${summary[@]}"
if [ -n "${EDGEPACK_FUZZ_MD:-}" ]; then
  printf '%s\n' "${rows[@]}" > "$ROWS"
  flock "$HOME_DIR/table.lock" "$PY" scripts/fuzz_table.py "$EDGEPACK_FUZZ_MD" "$ROWS"
fi
if [ ${#found[@]} -gt 0 ]; then
  printf '\n!!!!!!!!!!!!!!!!!!!! NEW FUZZ FINDINGS of the short search (fix them and commit each reproducer under fuzz/regressions/):\n' >&2
  printf '  %s\n' "${found[@]}" >&2
fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
