#!/usr/bin/env python3
"""The CPU backend at batch 1, 8 and 32 beside onnxruntime's CPU provider, fp32 and INT8, in one run: does a batch
gain per sample over single images, and where does edgepack stand against onnxruntime at each batch?

Every edgepack cell is `edgepack bench MODEL --free-batch --batch B --device cpu --threads T --json`; a second
edgepack row runs the same with `EDGEPACK_ALLOC_CACHE_MB=0` (freed large activations returned to the system, as
before the binary's recycling allocator: every run faults them in again). onnxruntime reads the same batch-freed
graph (`edgepack rewrite --free-batch`) at the same batch and thread count. The three alternate for --rounds rounds;
the table gives the median samples/s over rounds. INT8: `edgepack quantize` on the shipped photos (per-channel QDQ).

Usage: benches/peers/cpu_batch.py [--threads T] [--batches 1,8,32] [--runs 10] [--rounds 3] [--md BENCHMARKS.md]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
from bench_vs_ort import cpu_model, edgepack_bin, ort_bench  # noqa: E402
from gpu_host import MODEL, PHOTOS, ep_bench, free_batch_copy  # noqa: E402

BEGIN, END = "<!-- cpu-batch:begin -->", "<!-- cpu-batch:end -->"
TARGETS = ("edgepack cpu", "edgepack cpu, no block cache", "onnxruntime cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", help="BENCHMARKS.md to update")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    work = tempfile.mkdtemp(prefix="edgepack-cpu-batch-")
    int8 = os.path.join(work, "effnet_int8.onnx")
    subprocess.run([edgepack_bin(), "quantize", "--budget", "none", MODEL, "--calib", PHOTOS, "--preset", "tf",
                    "--holdout", "0", "--latency-runs", "0", "-o", int8], check=True, capture_output=True)
    t = a.threads
    tp = {}
    for label, model in (("fp32", MODEL), ("INT8", int8)):
        ort_model = free_batch_copy(model, os.path.join(work, f"ort_{label}.onnx"))
        for b in batches:
            runs = max(3, a.runs * 8 // b) if b > 1 else a.runs * 8
            cells = {
                TARGETS[0]: lambda: ep_bench(model, "cpu", b, runs, a.warmup, threads=t),
                TARGETS[1]: lambda: ep_bench(model, "cpu", b, runs, a.warmup, {"EDGEPACK_ALLOC_CACHE_MB": "0"}, t),
                TARGETS[2]: lambda: ort_bench(ort_model, t, runs, a.warmup, b),
            }
            for _ in range(a.rounds):
                for name, fn in cells.items():
                    tp.setdefault((label, name, b), []).append(fn()["throughput_per_s"])
            print(label, b, {n: round(statistics.median(tp[label, n, b]), 1) for n in cells}, flush=True)
    med = {k: statistics.median(v) for k, v in tp.items()}
    lines = ["| model | target | batch | samples/s | per sample ÷ own batch 1 | edgepack ÷ onnxruntime |",
             "|---|---|---:|---:|---:|---:|"]
    for label in ("fp32", "INT8"):
        for name in TARGETS:
            for b in batches:
                v = med[label, name, b]
                vs = "—" if name == TARGETS[2] else f"{v / med[label, TARGETS[2], b]:.2f}×"
                lines.append(f"| {label} | {name} | {b} | {v:.0f} | {v / med[label, name, 1]:.2f}× | {vs} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        meta = (f"`python3 benches/peers/cpu_batch.py --threads {t} --batches {a.batches} --runs {a.runs} --rounds "
                f"{a.rounds} --md {a.md}` on {cpu_model()}, {os.cpu_count()} cores, {t} threads; EfficientNet-Lite0 "
                f"with a free batch dim, random input; median samples/s of {a.rounds} alternating rounds.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
