#!/usr/bin/env bash
# The project's test command (README): lint, Rust tests, then the Python acceptance tests that compare edgepack
# with onnxruntime on the real models of ../shared. Sets up its own Python environment on first use.
#
#   ./scripts/test.sh            everything
#   ./scripts/test.sh --quick    skip the slow dataset-wide accuracy tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

# cargo's own default (the checkout's target/) unless set, so `cargo run` and the scripts share one build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
VENV=${EDGEPACK_VENV:-$HOME/.cache/edgepack-venv}

need() { command -v "$1" >/dev/null 2>&1 || { echo "FATAL: '$1' is required but not installed ($2)" >&2; exit 1; }; }
need cargo "install Rust with rustup"
need python3 "install CPython 3.10+"

step() { printf '\n==> %s\n' "$*"; }

step "Python environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { echo "FATAL: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-test.txt
PY="$VENV/bin/python"

if [ -d ../shared/models ]; then
  export EDGEPACK_SHARED=${EDGEPACK_SHARED:-$(cd ../shared && pwd)}
elif [ "${CI:-}" = "true" ]; then
  echo "FATAL: ../shared is required in CI (real models and data) and is missing" >&2; exit 1
else
  echo "WARNING: ../shared is absent: the model/data acceptance tests will be SKIPPED" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

# Cargo does not record which checkout built a path crate: with one target dir shared between clones, a crate built
# from another checkout can look fresh and be tested instead of this one. Clean this workspace's own crates (the
# dependencies stay cached) so what is linted, tested and run is built from these sources.
step "clean the workspace crates in the shared target dir"
mapfile -t CRATES < <(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print("\n".join(p["name"] for p in json.load(sys.stdin)["packages"]))')
cargo clean --release -q $(printf -- '-p %s ' "${CRATES[@]}")

step "cargo clippy (warnings are errors)"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo test (release: numerics on real models are too slow unoptimised)"
cargo test --release --workspace

step "build the edgepack binary"
cargo build --release --workspace
export EDGEPACK_BIN="$CARGO_TARGET_DIR/release/edgepack"

step "aarch64 under qemu (scripts/aarch64.sh test): kernel property tests on three CPU models, shared models = onnxruntime"
PY="$PY" ./scripts/aarch64.sh test

step "Swift for Linux in the same Debian root (scripts/swift.sh setup): the Swift bindings test runs there"
./scripts/swift.sh setup

step "fuzz: every target of fuzz/ for ${EDGEPACK_FUZZ_SECONDS:-20} s after its committed reproducers (scripts/fuzz.sh)"
PY="$PY" ./scripts/fuzz.sh "${EDGEPACK_FUZZ_SECONDS:-20}"

step "Python acceptance tests (real clients: onnxruntime, jsonschema, the edgepack binary)"
PYTEST_ARGS=(-q -rs tests/python)
[ "$QUICK" = 1 ] && PYTEST_ARGS+=(-m "not slow")
[ "${CI:-}" = "true" ] && export EDGEPACK_REQUIRE_SHARED=1
"$PY" -m pytest "${PYTEST_ARGS[@]}"
