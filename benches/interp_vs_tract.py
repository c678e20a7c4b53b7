#!/usr/bin/env python3
"""The kernel interpreter (the mobile library's CPU engine, EDGEPACK_CPU=interp) beside the tract backend, side by
side in one run: `edgepack bench --device cpu` on EfficientNet-Lite0 and SqueezeNet, fp32 and the INT8 file of
`edgepack quantize`, rounds interleaved (tract, interp, tract, ...), the median of each round's p50. Issue 26 asks
for the interpreter within 1.1x of tract. Table between the interp-vs-tract markers of BENCHMARKS.md with --md.

Usage: benches/interp_vs_tract.py [--threads 1] [--runs 100] [--rounds 5] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402


def edgepack_bin():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("EDGEPACK_BIN") or os.path.join(tgt, "release", "edgepack")


def bench(model, engine, threads, runs):
    env = {**os.environ, "EDGEPACK_CPU": "interp"} if engine == "interp" else dict(os.environ)
    r = subprocess.run([edgepack_bin(), "bench", model, "--device", "cpu", "--threads", str(threads), "--runs",
                        str(runs), "--warmup", "10", "--json"], capture_output=True, text=True, check=True, env=env)
    doc = json.loads(r.stdout)
    assert ("interpreter" in doc["backend"]["engine"]) == (engine == "interp"), doc["backend"]
    return doc["p50_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--md")
    a = ap.parse_args()
    models = [("EfficientNet-Lite0", "efficientnet_lite0_fp32.onnx", "tf"),
              ("SqueezeNet 1.0", "squeezenet1.0_fp32.onnx", "caffe_bgr")]
    photos = os.path.join(ROOT, "assets", "photos")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, fname, preset in models:
            src = os.path.join(a.shared, "models", fname)
            q = os.path.join(tmp, fname.replace(".onnx", "_int8.onnx"))
            subprocess.run([edgepack_bin(), "quantize", "--budget", "none", src, "--calib", photos, "--preset", preset, "--holdout", "0",
                            "--latency-runs", "0", "-q", "-o", q], check=True, capture_output=True)
            for prec, path in (("fp32", src), ("int8", q)):
                t, i = [], []
                for _ in range(a.rounds):
                    t.append(bench(path, "tract", a.threads, a.runs))
                    i.append(bench(path, "interp", a.threads, a.runs))
                mt, mi = statistics.median(t), statistics.median(i)
                rows.append((label, prec, mt, mi, mi / mt))
                print(f"{label} {prec}: tract {mt:.3f} ms, interpreter {mi:.3f} ms, ratio {mi / mt:.3f}", flush=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"`python3 benches/interp_vs_tract.py --threads {a.threads} --runs {a.runs} --rounds {a.rounds} --md "
             f"BENCHMARKS.md` on {cpu}, {os.cpu_count()} cores: p50 of `edgepack bench --device cpu`, median of "
             f"{a.rounds} interleaved rounds.", "",
             "| model | precision | tract p50 ms | interpreter p50 ms | interpreter / tract |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {p} | {t:.3f} | {i:.3f} | {r:.3f} |" for m, p, t, i, r in rows]
    table = "\n".join(lines)
    print(table)
    if a.md:
        mdtable.replace_between(a.md, "<!-- interp-vs-tract:begin -->", "<!-- interp-vs-tract:end -->", table)


if __name__ == "__main__":
    main()
