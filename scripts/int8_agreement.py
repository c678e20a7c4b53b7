#!/usr/bin/env python3
"""Where edgepack and onnxruntime disagree on the same INT8 file, and why (QUANTIZATION.md, int8-agreement).

Quantizes each model (EfficientNet-Lite0, SqueezeNet) with `edgepack quantize` (first --calib ImageNet-sample
images), then runs the INT8 file on --n images after the first 2·calib, identical input tensors everywhere, with:
onnxruntime (default optimizations: fused integer kernels), onnxruntime with graph optimizations disabled (plain
QDQ semantics: float ops between QuantizeLinear/DequantizeLinear), and edgepack's runtime (its integer kernels).
Prints top-1 agreement between each pair and with fp32; exits non-zero when edgepack agrees with optimized
onnxruntime on fewer than --min-agreement percent of the images.

Usage: scripts/int8_agreement.py [--calib 100] [--n 800] [--models efficientnet,squeezenet] [--md QUANTIZATION.md]
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs  # noqa: E402
from quant_accuracy import edgepack_bin, write_npy_dataset  # noqa: E402

ort.set_default_logger_severity(3)
BEGIN, END = "<!-- int8-agreement:begin -->", "<!-- int8-agreement:end -->"


MODELS = {
    "efficientnet": ("EfficientNet-Lite0", "efficientnet_lite0_fp32.onnx", "tf"),
    "squeezenet": ("SqueezeNet 1.0", "squeezenet1.0_fp32.onnx", "caffe_bgr"),
}


def top1(path, xs, optimize):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return [int(np.argmax(s.run(None, {name: x})[0])) for x in xs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=model_inputs.shared_dir())
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--models", default="efficientnet,squeezenet")
    ap.add_argument("--min-agreement", type=float, default=99.5)
    ap.add_argument("--md")
    a = ap.parse_args()
    ev = model_inputs._tools(a.shared)
    data = os.path.join(a.shared, "data", "imagenet_sample")
    rows = list(csv.DictReader(open(os.path.join(data, "labels.csv"))))
    sel = rows[2 * a.calib: 2 * a.calib + a.n]
    out, worst = [], 100.0
    for key in a.models.split(","):
        title, fname, preset = MODELS[key]
        src = os.path.join(a.shared, "models", fname)
        with tempfile.TemporaryDirectory() as tmp:
            cdir = os.path.join(tmp, "calib")
            os.mkdir(cdir)
            for r in rows[: a.calib]:
                os.symlink(os.path.join(data, "images", r["file"]), os.path.join(cdir, r["file"]))
            q = os.path.join(tmp, "int8.onnx")
            subprocess.run([edgepack_bin(), "quantize", "--budget", "none", src, "--calib", cdir, "--preset", preset, "--holdout", "0",
                            "--latency-runs", "0", "-o", q], check=True, capture_output=True)
            xs = [ev.preprocess(os.path.join(data, "images", r["file"]), 256, 224, **ev.PRESETS[preset]) for r in sel]
            ndir = os.path.join(tmp, "npy")
            write_npy_dataset(ndir, xs, [int(r["class_index"]) for r in sel])
            pred = os.path.join(tmp, "pred.csv")
            subprocess.run([edgepack_bin(), "eval", q, ndir, "--predictions", pred, "--threads", "2"], check=True,
                           capture_output=True)
            runs = {
                "fp32 (onnxruntime)": top1(src, xs, True),
                "onnxruntime, optimized": top1(q, xs, True),
                "onnxruntime, no graph optimization": top1(q, xs, False),
                "edgepack": [int(r["top1"]) for r in csv.DictReader(open(pred))],
            }
        names = list(runs)
        agree = lambda p, q: 100.0 * sum(x == y for x, y in zip(runs[p], runs[q])) / len(sel)  # noqa: E731
        worst = min(worst, agree("edgepack", "onnxruntime, optimized"))
        lines = [f"**{title}**", "", "| top-1 agreement | " + " | ".join(names) + " |",
                 "|---" * (len(names) + 1) + "|"]
        for p in names:
            lines.append(f"| {p} | " + " | ".join(f"{agree(p, q):.1f} %" for q in names) + " |")
        out.append("\n".join(lines))
        print(out[-1], flush=True)
    table = "\n\n".join(out)
    if a.md:
        meta = (f"`python3 scripts/int8_agreement.py --calib {a.calib} --n {a.n} --md {a.md}` — onnxruntime "
                f"{ort.__version__}; INT8 files from `edgepack quantize` (first {a.calib} images), {len(sel)} "
                f"ImageNet-sample images ({2 * a.calib + 1}-{2 * a.calib + len(sel)}), identical input tensors; "
                f"edgepack runs its integer kernels.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")
    if worst < a.min_agreement:
        sys.exit(f"edgepack vs optimized onnxruntime: {worst:.1f} % top-1 agreement < {a.min_agreement} %")


if __name__ == "__main__":
    main()
