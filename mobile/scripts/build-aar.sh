#!/usr/bin/env bash
# Builds an Android AAR (edgepack-mobile.aar): the Kotlin bindings, and libedgepack_mobile.so for arm64-v8a,
# armeabi-v7a and x86_64. NOT runnable on this project's Linux CI: it needs
#   - the Android NDK r26+ (ANDROID_NDK_HOME) and `cargo install cargo-ndk`,
#   - rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android,
#   - JDK 17 and Gradle 8.5+ with the Android Gradle Plugin (ANDROID_HOME with platform 34).
# The app also depends on JNA's Android build: implementation("net.java.dev.jna:jna:5.13.0@aar"), and
# kotlinx-coroutines-core for the suspend functions.
# FEATURES="" (default) builds the small CPU-only engine (the kernel interpreter: kernel nodes and its op set, other
# models go to the cloud under on-unsupported); FEATURES=tract adds tract (every op it runs), FEATURES=gpu the wgpu
# backend (Vulkan); both larger (BENCHMARKS.md, "Mobile library size").
#
#   mobile/scripts/build-aar.sh      output: mobile/android/build/outputs/aar/
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v cargo-ndk >/dev/null || { echo "FATAL: cargo-ndk not found (cargo install cargo-ndk; needs the NDK)" >&2; exit 1; }
command -v gradle >/dev/null || { echo "FATAL: gradle not found" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
FEATURES=${FEATURES:-}
ANDROID=mobile/android
rm -rf "$ANDROID/src/main/jniLibs" "$ANDROID/src/main/kotlin"
cargo ndk -t arm64-v8a -t armeabi-v7a -t x86_64 -o "$ANDROID/src/main/jniLibs" \
  build -p edgepack-mobile --lib --profile mobile --no-default-features ${FEATURES:+--features "$FEATURES"}
# Kotlin sources from the library's metadata (the host build of the same sources).
cargo build --release --manifest-path mobile/uniffi-bindgen/Cargo.toml
cargo build --release -p edgepack-mobile --no-default-features --lib
"$CARGO_TARGET_DIR/release/uniffi-bindgen" generate --library "$CARGO_TARGET_DIR/release/libedgepack_mobile.so" \
  --language kotlin --out-dir "$ANDROID/src/main/kotlin"
(cd "$ANDROID" && gradle --no-daemon assembleRelease)
ls -l "$ANDROID"/build/outputs/aar/
