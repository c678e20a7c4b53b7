#!/usr/bin/env bash
# Generates the Swift, Kotlin and Python bindings of the mobile crate from the built library (uniffi library mode,
# with the in-repo uniffi-bindgen), puts the library beside the Python module (the generated module loads it from
# its own folder), and a Linux module map for Swift under swift/linux/.
#
#   scripts/bindings.sh [OUT]        default OUT: $CARGO_TARGET_DIR/bindings
#   EDGEPACK_MOBILE_FEATURES=...     cargo features of the library, defaults off (unset: the crate's defaults,
#                                    tract and the GPU; "": the kernel interpreter alone, as scripts/mobile_size.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo's own default (the checkout's target/) unless set, so `cargo run` and the scripts share one build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
OUT=${1:-$CARGO_TARGET_DIR/bindings}

# The whole workspace, as the test command builds it: one feature resolution, so nothing is rebuilt twice; the
# generator is a workspace of its own (its uniffi `cli` feature would change the engine's dependency features).
cargo build --release -q --workspace
cargo build --release -q --manifest-path mobile/uniffi-bindgen/Cargo.toml
if [ -n "${EDGEPACK_MOBILE_FEATURES+set}" ]; then
  # Another feature set of the library alone (e.g. "" for the kernel interpreter without tract or the GPU).
  cargo build --release -q -p edgepack-mobile --lib --no-default-features --features "$EDGEPACK_MOBILE_FEATURES"
fi
LIB=$CARGO_TARGET_DIR/release/libedgepack_mobile.so
BINDGEN=$CARGO_TARGET_DIR/release/uniffi-bindgen
[ -f "$LIB" ] || { echo "FATAL: $LIB was not built" >&2; exit 1; }

rm -rf "$OUT"
for lang in python kotlin swift; do
  "$BINDGEN" generate --library "$LIB" --language "$lang" --out-dir "$OUT/$lang" >/dev/null
done
cp "$LIB" "$OUT/python/"
# The generated module map is Apple's (`use "Darwin"`, which Linux lacks; the XCFramework ships it as is): Swift on
# Linux gets one without Apple's modules, beside a copy of the header it names.
mkdir -p "$OUT/swift/linux"
cp "$OUT/swift/EdgepackMobileFFI.h" "$OUT/swift/linux/"
grep -v 'use "Darwin"' "$OUT/swift/EdgepackMobileFFI.modulemap" > "$OUT/swift/linux/module.modulemap"
echo "bindings in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
