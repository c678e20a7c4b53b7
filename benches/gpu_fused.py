#!/usr/bin/env python3
"""The GPU backend's fused programs against its step-by-step path and the CPU backend, on whatever adapter this
machine has (lavapipe in CI and on the development machine; a real GPU on a GPU host), one run, side by side.

Per model: `edgepack bench MODEL --device cpu`, `--device gpu` (fused: the default) and `--device gpu` with
`EDGEPACK_GPU_FUSED=0` (the step-by-step burn interpreter), medians of `--runs` timed runs after warm-ups, and the
device counters `bench --json` reports for the fused run (dispatches, submissions, device bytes allocated by a
steady-state run). The fused column uses the default tiles (`EDGEPACK_GPU_AUTOTUNE=0`); the tuned column times the
pointwise convolutions' tiles at load (`EDGEPACK_GPU_AUTOTUNE=1`, a fresh cache directory: one load to time them,
a second, timed, that reads the choices back). On an adapter with shader-f16, the fused run again with
`EDGEPACK_GPU_PRECISION=f16` (activations stored as f16, f32 arithmetic; its counters must equal the f32 program's). The INT8 row quantizes the shipped EfficientNet-Lite0 on the shipped photos first.

Usage: benches/gpu_fused.py [--runs 20] [--slow-runs 3] [--rounds 3] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "benches", "peers"))
import mdtable  # noqa: E402
from bench_vs_ort import edgepack_bin  # noqa: E402

BEGIN, END = "<!-- gpu-fused:begin -->", "<!-- gpu-fused:end -->"
SHARED = os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared")


def bench(model, device, runs, warmup, env=None):
    r = subprocess.run([edgepack_bin(), "bench", model, "--device", device, "--runs", str(runs), "--warmup",
                        str(warmup), "--json"], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"edgepack bench {model} --device {device} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--slow-runs", type=int, default=3, help="timed runs of the step-by-step path")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the default and tuned tiles")
    ap.add_argument("--md", help="write the table into this markdown file")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    effnet = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
    int8 = os.path.join(tmp, "effnet_int8.onnx")
    subprocess.run([edgepack_bin(), "quantize", "--budget", "none", effnet, "--calib", os.path.join(ROOT, "assets", "photos"),
                    "--preset", "tf", "--holdout", "0", "--out", int8, "-q"], check=True)
    # (name, file, timed runs: fewer for the 1024×1024 detector)
    models = [("EfficientNet-Lite0 fp32", effnet, a.runs), ("EfficientNet-Lite0 INT8", int8, a.runs),
              ("UltraFace RFB-320 fp32", os.path.join(ROOT, "assets", "models", "ultraface_rfb_320.onnx"), a.runs)]
    for name, f, runs in (("SqueezeNet 1.0 fp32", "squeezenet1.0_fp32.onnx", a.runs),
                          ("YOLOv8n DocLayNet 1024² fp32", "yolov8n-doclaynet.onnx", max(3, a.runs // 4))):
        if os.path.exists(os.path.join(SHARED, "models", f)):
            models.append((name, os.path.join(SHARED, "models", f), runs))
    rows, adapter = [], ""
    for name, path, runs in models:
        cpu = bench(path, "cpu", runs, 2)
        tune = {"EDGEPACK_GPU_AUTOTUNE": "1", "EDGEPACK_CACHE_DIR": tempfile.mkdtemp()}
        bench(path, "gpu", 1, 0, env=tune)
        # Default and tuned tiles in alternating rounds (this host's speed drifts between processes): the
        # median of the rounds' medians.
        fused_ms, tuned_ms = [], []
        for _ in range(a.rounds):
            fused = bench(path, "gpu", runs, 2, env={"EDGEPACK_GPU_AUTOTUNE": "0"})
            tuned = bench(path, "gpu", runs, 2, env=tune)
            fused_ms.append(fused["p50_ms"])
            tuned_ms.append(tuned["p50_ms"])
        steps = bench(path, "gpu", a.slow_runs, 1, env={"EDGEPACK_GPU_FUSED": "0"})
        half = bench(path, "gpu", runs, 2, env={"EDGEPACK_GPU_PRECISION": "f16", "EDGEPACK_GPU_AUTOTUNE": "0"})
        if "f16" not in half["backend"].get("description", ""):
            half = None  # no shader-f16: the request fell back to f32
        elif any(half[k] != fused[k] for k in ("gpu_dispatches_per_run", "gpu_submissions_per_run",
                                                "gpu_alloc_bytes_per_run")):
            raise SystemExit(f"{name}: the f16 program differs from the f32 one: {half}")
        adapter = fused["backend"].get("engine", "")
        row = {
            "model": name,
            "cpu_ms": cpu["p50_ms"],
            "steps_ms": steps["p50_ms"],
            "fused_ms": statistics.median(fused_ms),
            "tuned_ms": statistics.median(tuned_ms),
            "f16_ms": half["p50_ms"] if half else None,
            "dispatches": fused["gpu_dispatches_per_run"],
            "submissions": fused["gpu_submissions_per_run"],
            "alloc": fused["gpu_alloc_bytes_per_run"],
            "load_ms": fused["load_ms"],
            "cpu_threads": cpu.get("threads"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        f"`python3 benches/gpu_fused.py --runs {a.runs} --slow-runs {a.slow_runs} --rounds {a.rounds}` on {adapter}, "
        f"CPU backend with {rows[0]['cpu_threads']} threads; medians (YOLO: a quarter of the runs; fused and tuned: "
        f"the median of {a.rounds} alternating rounds' medians); batch 1.",
        "",
        "| model | cpu ms | gpu step by step ms | gpu fused ms | fused ÷ cpu | step by step ÷ fused | "
        "gpu fused, tiles tuned ms | gpu fused, f16 storage ms | dispatches | submissions | "
        "device bytes allocated per run | load ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        half = "—" if r["f16_ms"] is None else f"{r['f16_ms']:.1f}"
        lines.append(
            f"| {r['model']} | {r['cpu_ms']:.2f} | {r['steps_ms']:.1f} | {r['fused_ms']:.1f} | "
            f"{r['fused_ms'] / r['cpu_ms']:.1f}× | {r['steps_ms'] / r['fused_ms']:.1f}× | "
            f"{r['tuned_ms']:.1f} | {half} | {r['dispatches']} | "
            f"{r['submissions']} | {r['alloc']} | {r['load_ms']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if a.md:
        mdtable.replace_between(a.md, BEGIN, END, table)


if __name__ == "__main__":
    main()
