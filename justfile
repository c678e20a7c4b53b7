# edgepack task runner (https://github.com/casey/just). Every recipe is a plain command you can also run by hand.
# cargo's own default (target/ here) unless set, so `cargo run` and the recipes share one build.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() + "/target")

# Offline demo: quantize the shipped EfficientNet-Lite0, pack fp32 + int8 signed, verify, classify the shipped photos
demo:
    cargo run --release -- demo

# Everything CI runs: lint, Rust tests, Python acceptance tests against onnxruntime
test:
    ./scripts/test.sh

# Fast subset (skips dataset-wide accuracy runs)
test-quick:
    ./scripts/test.sh --quick

# edgepack vs onnxruntime, side by side, ratios into BENCHMARKS.md
bench:
    cargo build --release --workspace
    python3 benches/peers/bench_vs_ort.py --md BENCHMARKS.md

# edgepack serve vs FastAPI + onnxruntime under load (needs wrk, fastapi, uvicorn); tables into BENCHMARKS.md
bench-serve:
    cargo build --release --workspace
    python3 benches/peers/serve_load.py --md BENCHMARKS.md
    python3 benches/peers/serve_load.py --int8 --binary --md BENCHMARKS.md

# On a GPU host (Vulkan driver): the GPU backend vs the CPU backend and onnxruntime at batch 1/8/32, and
# `edgepack serve --device gpu` under load (needs wrk, fastapi, uvicorn); tables into BENCHMARKS.md
bench-gpu-host:
    cargo build --release --workspace
    EDGEPACK_BIN=$CARGO_TARGET_DIR/release/edgepack ./benches/gpu_host.sh

# CPU runtime vs onnxruntime on every shared model, table into CONFORMANCE.md
conformance:
    cargo build --release --workspace
    python3 scripts/ort_parity.py --md CONFORMANCE.md

# INT8: edgepack quantize beside onnxruntime's quantizer (ImageNet, MNIST, UltraFace), every shared model, and the
# edgepack/onnxruntime agreement analysis; tables into QUANTIZATION.md
quant-accuracy:
    cargo build --release --workspace
    python3 scripts/quant_accuracy.py --md QUANTIZATION.md
    python3 scripts/quant_all.py --md QUANTIZATION.md
    python3 scripts/int8_agreement.py --md QUANTIZATION.md

# Pruning: edgepack prune on EfficientNet-Lite0 and SqueezeNet (curves, 1 pt budgets, latency, zstd and INT8
# bundle sizes, onnxruntime and both backends on the pruned files); tables into PRUNING.md
pruning:
    cargo build --release --workspace
    python3 scripts/pruning.py --md PRUNING.md

# Every fuzz target for SECONDS each (RELIABILITY.md), the table rewritten
fuzz SECONDS="600":
    cargo build --release --workspace
    EDGEPACK_BIN=$CARGO_TARGET_DIR/release/edgepack EDGEPACK_FUZZ_MD=RELIABILITY.md ./scripts/fuzz.sh {{SECONDS}}

# The soak runs: every backend over 10000 runs, the server under 10 minutes of mixed traffic (BENCHMARKS.md)
soak:
    cargo build --release --workspace
    python3 scripts/soak_engine.py --md BENCHMARKS.md
    python3 scripts/soak_serve.py --md BENCHMARKS.md

# aarch64 (issue 27): Debian's cross toolchain in a chroot under ~/.cache/armprobe (root; reused), the kernels'
# property tests under qemu (-cpu max, Cortex-A76, Cortex-A53), every shared model against onnxruntime, the
# aarch64 phone library for the Python bindings test, and the stripped aarch64 mobile library sizes. The host
# binary makes the INT8 reference files; `scripts/aarch64.sh count-models` then prints the instruction counts.
aarch64:
    cargo build --release --workspace
    EDGEPACK_BIN="${CARGO_TARGET_DIR:-target}/release/edgepack" ./scripts/aarch64.sh all

# Shell completions (bash, zsh, fish) and man pages into $CARGO_TARGET_DIR/share (install them from there)
completions:
    cargo build --release
    mkdir -p $CARGO_TARGET_DIR/share/completions
    $CARGO_TARGET_DIR/release/edgepack completions bash > $CARGO_TARGET_DIR/share/completions/edgepack.bash
    $CARGO_TARGET_DIR/release/edgepack completions zsh > $CARGO_TARGET_DIR/share/completions/_edgepack
    $CARGO_TARGET_DIR/release/edgepack completions fish > $CARGO_TARGET_DIR/share/completions/edgepack.fish
    $CARGO_TARGET_DIR/release/edgepack man --out $CARGO_TARGET_DIR/share/man/man1

lint:
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

# Swift/Kotlin/Python bindings of the mobile SDK (uniffi) into $CARGO_TARGET_DIR/bindings (mobile/README.md)
bindings:
    ./scripts/bindings.sh

# Swift for Linux (Debian's swiftlang) in the Debian root of scripts/aarch64.sh; the Swift checks run in the test command
swift-setup:
    ./scripts/swift.sh setup

# Stripped size of the CPU-only mobile library (`mobile` profile) into BENCHMARKS.md; a separate, long build
mobile-size:
    ./scripts/mobile_size.sh --md BENCHMARKS.md --abort

# Cold build times of the README's commands in a fresh target dir (~20 min) into BENCHMARKS.md
build-times:
    ./scripts/build_times.sh --md BENCHMARKS.md

# KServe v2 server on the repository REPO (README "Serving")
serve REPO:
    cargo run --release -- serve --repo {{REPO}}

# Regenerate the ONNX protobuf types from runtime/proto/onnx-ml.proto
proto:
    cargo run --release --manifest-path tools/onnx-proto-gen/Cargo.toml

# Regenerate schema/manifest.v1.schema.json from the manifest types
schema:
    EDGEPACK_UPDATE_SCHEMA=1 cargo test --release manifest_schema
