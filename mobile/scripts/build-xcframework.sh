#!/usr/bin/env bash
# Builds EdgepackMobileFFI.xcframework (static libraries for iOS devices and the simulators) and a Swift Package
# (EdgepackMobile) around it. NOT runnable on Linux: it needs macOS with Xcode 15+ (xcodebuild, lipo) and
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios
# FEATURES="" (default) builds the small CPU-only engine (the kernel interpreter: kernel nodes and its op set, other
# models go to the cloud under on-unsupported); FEATURES=tract adds tract (every op it runs), FEATURES=gpu the wgpu
# backend (Metal); both larger (BENCHMARKS.md, "Mobile library size").
#
#   mobile/scripts/build-xcframework.sh [OUT]      default OUT: target/apple
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v xcodebuild >/dev/null || { echo "FATAL: xcodebuild not found (macOS with Xcode required)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${1:-$CARGO_TARGET_DIR/apple}
FEATURES=${FEATURES:-}
PROFILE=mobile
build() { cargo build -p edgepack-mobile --lib --profile "$PROFILE" --no-default-features ${FEATURES:+--features "$FEATURES"} --target "$1"; }
for t in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios; do build "$t"; done
lib() { echo "$CARGO_TARGET_DIR/$1/$PROFILE/libedgepack_mobile.a"; }

rm -rf "$OUT" && mkdir -p "$OUT/sim" "$OUT/headers" "$OUT/Package/Sources/EdgepackMobile"
lipo -create "$(lib aarch64-apple-ios-sim)" "$(lib x86_64-apple-ios)" -output "$OUT/sim/libedgepack_mobile.a"

# Swift sources and the C header from the library's metadata (any build of the same sources; here the host's).
cargo build --release --manifest-path mobile/uniffi-bindgen/Cargo.toml
cargo build --release -p edgepack-mobile --no-default-features --lib
"$CARGO_TARGET_DIR/release/uniffi-bindgen" generate --library "$CARGO_TARGET_DIR/release/libedgepack_mobile.dylib" \
  --language swift --out-dir "$OUT/gen"
cp "$OUT/gen/EdgepackMobileFFI.h" "$OUT/headers/"
cp "$OUT/gen/EdgepackMobileFFI.modulemap" "$OUT/headers/module.modulemap"

xcodebuild -create-xcframework \
  -library "$(lib aarch64-apple-ios)" -headers "$OUT/headers" \
  -library "$OUT/sim/libedgepack_mobile.a" -headers "$OUT/headers" \
  -output "$OUT/Package/EdgepackMobileFFI.xcframework"
cp "$OUT/gen/EdgepackMobile.swift" "$OUT/Package/Sources/EdgepackMobile/"
cat > "$OUT/Package/Package.swift" <<'SWIFT'
// swift-tools-version:5.9
import PackageDescription

let package = Package(
    name: "EdgepackMobile",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [.library(name: "EdgepackMobile", targets: ["EdgepackMobile"])],
    targets: [
        .binaryTarget(name: "EdgepackMobileFFI", path: "EdgepackMobileFFI.xcframework"),
        .target(name: "EdgepackMobile", dependencies: ["EdgepackMobileFFI"]),
    ]
)
SWIFT
echo "Swift package: $OUT/Package (add it in Xcode: File > Add Package Dependencies > Add Local)"
