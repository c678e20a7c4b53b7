#!/usr/bin/env python3
"""INT8 latency: edgepack fp32, edgepack INT8, onnxruntime fp32 and onnxruntime INT8 on the same files, side by side.

The INT8 files come from `edgepack quantize` (first --calib ImageNet-sample images, min-max). For each (model,
threads) the four measurements alternate for --rounds rounds (batch 1, --runs timed runs after --warmup warm-ups);
the table reports medians of the per-round medians and the ratios the fast-INT8 issue targets: edgepack INT8 /
edgepack fp32 (≤ 0.5) and edgepack INT8 / onnxruntime INT8 (≤ 1.5). Writes BENCHMARKS.md between the bench-int8
markers.

Usage: benches/peers/bench_int8.py [--models efficientnet,squeezenet] [--threads 1,2] [--md BENCHMARKS.md]
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from bench_vs_ort import ROOT, edgepack_bin, ep_bench, ort_bench  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402

MODELS = {"efficientnet": ("efficientnet_lite0_fp32.onnx", "tf"), "squeezenet": ("squeezenet1.0_fp32.onnx", "caffe_bgr")}
BEGIN, END = "<!-- bench-int8:begin -->", "<!-- bench-int8:end -->"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--models", default="efficientnet,squeezenet")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(a.shared, "data", "imagenet_sample", "images")
        calib = os.path.join(tmp, "calib")
        os.mkdir(calib)
        for f in sorted(os.listdir(images))[: a.calib]:
            os.symlink(os.path.join(images, f), os.path.join(calib, f))
        for key in a.models.split(","):
            fname, preset = MODELS[key]
            fp32 = os.path.join(a.shared, "models", fname)
            int8 = os.path.join(tmp, f"{key}_int8.onnx")
            subprocess.run([edgepack_bin(), "quantize", "--budget", "none", fp32, "--calib", calib, "--preset", preset, "--holdout", "0",
                            "--latency-runs", "0", "-o", int8], check=True, capture_output=True)
            for t in map(int, a.threads.split(",")):
                m = {k: [] for k in ("ep32", "ep8", "ort32", "ort8")}
                for _ in range(a.rounds):
                    m["ep32"].append(ep_bench(fp32, t, a.runs, a.warmup)["p50_ms"])
                    m["ep8"].append(ep_bench(int8, t, a.runs, a.warmup)["p50_ms"])
                    m["ort32"].append(ort_bench(fp32, t, a.runs, a.warmup)["p50_ms"])
                    m["ort8"].append(ort_bench(int8, t, a.runs, a.warmup)["p50_ms"])
                med = {k: statistics.median(v) for k, v in m.items()}
                rows.append((fname, t, med))
                print(fname, t, {k: round(v, 2) for k, v in med.items()}, flush=True)
    lines = ["| model | threads | edgepack fp32 (ms) | edgepack INT8 (ms) | **INT8/fp32 edgepack** | onnxruntime fp32 (ms) | onnxruntime INT8 (ms) | **edgepack INT8 / onnxruntime INT8** |",
             "|---|---|---|---|---|---|---|---|"]
    for f, t, m in rows:
        lines.append(f"| {f} | {t} | {m['ep32']:.2f} | {m['ep8']:.2f} | **{m['ep8'] / m['ep32']:.2f}** | {m['ort32']:.2f} | "
                     f"{m['ort8']:.2f} | **{m['ep8'] / m['ort8']:.2f}** |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cmd = f"python3 benches/peers/bench_int8.py --runs {a.runs} --rounds {a.rounds} --md {a.md}"
        meta = (f"`{cmd}` on {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; INT8 files from "
                f"`edgepack quantize` ({a.calib} calibration images); median of {a.rounds} alternating rounds of {a.runs} "
                f"timed runs (batch 1). Targets of the fast-INT8 issue: INT8/fp32 ≤ 0.5, edgepack/onnxruntime INT8 ≤ 1.5.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
