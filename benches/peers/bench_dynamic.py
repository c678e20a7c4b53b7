#!/usr/bin/env python3
"""Dynamic INT8 latency: edgepack fp32, edgepack `quantize --mode dynamic`, onnxruntime fp32 and onnxruntime's own
`quantize_dynamic` file, side by side, on a transformer block's MatMuls.

The model is built here (no weights to download): a transformer feed-forward block and its projections on
`[1, T, D]` tokens — `x·Wq`, `x·Wo` (D×D), `x·W1` (D×F) → Relu → `·W2` (F×D) + residual — with seeded random
weights. edgepack quantizes it with `--mode dynamic --budget none` (its held-out samples are random tokens, only the
report uses them); onnxruntime with `quantize_dynamic(per_channel=True, weight_type=QInt8)`. For each thread count
the four measurements alternate for --rounds rounds (batch 1); the table reports medians of the per-round medians.
Writes BENCHMARKS.md between the bench-dynamic markers.

Usage: benches/peers/bench_dynamic.py [--tokens 128] [--dim 384] [--ffn 1536] [--threads 1,2] [--md BENCHMARKS.md]
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
from bench_vs_ort import ROOT, edgepack_bin, ep_bench, ort_bench  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402

BEGIN, END = "<!-- bench-dynamic:begin -->", "<!-- bench-dynamic:end -->"


def block(path, t, d, f):
    rng = np.random.default_rng(0)
    w = lambda name, r, c: numpy_helper.from_array(rng.normal(0, r ** -0.5, (r, c)).astype(np.float32), name)  # noqa: E731
    inits = [w("Wq", d, d), w("Wo", d, d), w("W1", d, f), w("W2", f, d)]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["q", "Wo"], ["o"], name="o_proj"),
             helper.make_node("Add", ["o", "x"], ["h"], name="residual1"),
             helper.make_node("MatMul", ["h", "W1"], ["u"], name="ffn_up"),
             helper.make_node("Relu", ["u"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "W2"], ["v"], name="ffn_down"),
             helper.make_node("Add", ["v", "h"], ["y"], name="residual2")]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, t, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, t, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "block.onnx")
        block(fp32, a.tokens, a.dim, a.ffn)
        data = os.path.join(tmp, "tokens")
        os.mkdir(data)
        rng = np.random.default_rng(1)
        for i in range(6):
            np.save(os.path.join(data, f"{i}.npy"), rng.normal(0, 1, (1, a.tokens, a.dim)).astype(np.float32))
        ours = os.path.join(tmp, "block_dynamic.onnx")
        subprocess.run([edgepack_bin(), "quantize", fp32, "--calib", data, "--calib-limit", "2", "--holdout", "4",
                        "--mode", "dynamic", "--budget", "none", "--latency-runs", "0", "-o", ours], check=True,
                       capture_output=True)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        theirs = os.path.join(tmp, "block_ort_dynamic.onnx")
        quantize_dynamic(fp32, theirs, per_channel=True, weight_type=QuantType.QInt8)
        for t in map(int, a.threads.split(",")):
            m = {k: [] for k in ("ep32", "ep8", "ort32", "ort8")}
            for _ in range(a.rounds):
                m["ep32"].append(ep_bench(fp32, t, a.runs, a.warmup)["p50_ms"])
                m["ep8"].append(ep_bench(ours, t, a.runs, a.warmup)["p50_ms"])
                m["ort32"].append(ort_bench(fp32, t, a.runs, a.warmup)["p50_ms"])
                m["ort8"].append(ort_bench(theirs, t, a.runs, a.warmup)["p50_ms"])
            med = {k: statistics.median(v) for k, v in m.items()}
            row = {"threads": t, **med}
            print(row, flush=True)
            rows.append(row)
    lines = ["| threads | edgepack fp32 ms | edgepack dynamic INT8 ms | INT8 / fp32 | onnxruntime fp32 ms | onnxruntime dynamic INT8 ms | edgepack INT8 / onnxruntime INT8 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['ep32']:.2f} | {r['ep8']:.2f} | {r['ep8'] / r['ep32']:.2f} | "
                     f"{r['ort32']:.2f} | {r['ort8']:.2f} | {r['ep8'] / r['ort8']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                   platform.processor())
        meta = (f"`python3 benches/peers/bench_dynamic.py --tokens {a.tokens} --dim {a.dim} --ffn {a.ffn} --threads "
                f"{a.threads} --rounds {a.rounds} --md {a.md}` — onnxruntime {ort.__version__}, {cpu}; a transformer "
                f"block's four MatMuls on [1, {a.tokens}, {a.dim}] tokens (FFN {a.ffn}), batch 1, medians of "
                f"{a.rounds} rounds of {a.runs} runs.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
