#!/usr/bin/env python3
"""edgepack vs onnxruntime latency on the same models and thread counts, measured side by side in one run.

For each (model, threads): `edgepack bench --json` and an onnxruntime session (CPU EP, intra-op threads = T, same
input shape, same numbers of warm-up and timed runs) alternate for --rounds rounds; the table reports the median
of the per-round medians and the ratio edgepack/onnxruntime (< 1 means edgepack is faster).
Writes the table into BENCHMARKS.md between the bench-vs-ort markers.

Usage: benches/peers/bench_vs_ort.py [--runs 30] [--rounds 3] [--md BENCHMARKS.md] [--models a,b] [--threads 1,2]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402
MODELS = ["efficientnet_lite0_fp32.onnx", "squeezenet1.0_fp32.onnx", "ultraface_rfb_320.onnx", "ppocrv4_det.onnx",
          "ppocrv4_rec.onnx", "ppocr_mobile_v2_cls.onnx"]
# Input shapes of models with free image dimensions (RapidOCR's sizes: a 48-pixel text line 320 wide, the
# orientation classifier's 48×192, a 480×640 page for the detector).
SHAPES = {"ppocrv4_det.onnx": [1, 3, 480, 640], "ppocrv4_rec.onnx": [1, 3, 48, 320],
          "ppocr_mobile_v2_cls.onnx": [1, 3, 48, 192]}
BEGIN, END = "<!-- bench-vs-ort:begin -->", "<!-- bench-vs-ort:end -->"


def edgepack_bin():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("EDGEPACK_BIN") or os.path.join(tgt, "release", "edgepack")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ep_bench(model, threads, runs, warmup, shape=None):
    cmd = [edgepack_bin(), "bench", model, "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup),
           "--json"]
    if shape:
        name = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name
        cmd += ["--shape", f"{name}=" + ",".join(map(str, shape))]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def ort_bench(model, threads, runs, warmup, batch=1, shape=None):
    """onnxruntime's CPU provider on `model` at `batch` (its leading dim; symbolic dims are 1): load time, median
    latency and samples/s over the timed runs."""
    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1e3
    i = s.get_inputs()[0]
    shape = shape or [batch] + [d if isinstance(d, int) else 1 for d in i.shape[1:]]
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    for _ in range(warmup + 1):
        s.run(None, {i.name: x})
    ts = []
    t0 = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {i.name: x})
        ts.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    return {"p50_ms": statistics.median(ts), "load_ms": load_ms, "throughput_per_s": batch * runs / wall,
            "backend": f"onnxruntime {ort.__version__} CPU EP, {threads} threads"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", help="BENCHMARKS.md to update")
    a = ap.parse_args()
    rows = []
    for fname in a.models.split(","):
        model = os.path.join(a.shared, "models", fname)
        for t in map(int, a.threads.split(",")):
            e, o, loads, rss = [], [], [], []
            for _ in range(a.rounds):
                r = ep_bench(model, t, a.runs, a.warmup, SHAPES.get(fname))
                e.append(r["p50_ms"])
                loads.append(r["load_ms"])
                rss.append(r["peak_rss_mb"] or 0)
                o.append(ort_bench(model, t, a.runs, a.warmup, shape=SHAPES.get(fname))["p50_ms"])
            em, om = statistics.median(e), statistics.median(o)
            rows.append((fname, t, em, om, em / om, statistics.median(loads), max(rss)))
            print(f"{fname} threads={t}: edgepack p50 {em:.2f} ms, onnxruntime p50 {om:.2f} ms, ratio {em / om:.2f}", flush=True)
    lines = ["| model | threads | edgepack p50 (ms) | onnxruntime p50 (ms) | ratio edgepack/ort | edgepack load (ms) | edgepack peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for f, t, em, om, ratio, load, rss in rows:
        f = f + (" " + "×".join(map(str, SHAPES[f])) if f in SHAPES else "")
        lines.append(f"| {f} | {t} | {em:.2f} | {om:.2f} | **{ratio:.2f}** | {load:.0f} | {rss:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cmd = f"python3 benches/peers/bench_vs_ort.py --runs {a.runs} --rounds {a.rounds} --md BENCHMARKS.md"
        meta = (f"Measured with `{cmd}` on {platform.machine()} ({cpu_model()}), {os.cpu_count()} cores, "
                f"onnxruntime {ort.__version__}; "
                f"median of {a.rounds} alternating rounds of {a.runs} timed runs each (batch 1, after {a.warmup} warm-ups).")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
