#!/usr/bin/env python3
"""Weight rounding and 4-bit weights, judged by onnxruntime (QUANTIZATION.md, issue 29 items 4 and 5).

For the ImageNet models the calibration split is scripts/quant_accuracy.py's: `edgepack quantize` calibrates on the
first --edgepack-calib images of shared/data/imagenet_sample and holds out the rest of the first --calib images for
its gate; every other image is evaluated, by onnxruntime, for each variant:
- INT8 (QDQ) at every `--rounding`: nearest, bias-correction, gptq, gptq+bias-correction, sequential, all layers
  INT8 (`--budget none`), without equalization; nearest and gptq+bias-correction with activations equalized
  (`--equalize on`); then the defaults (the gate, `--rounding auto`, `--equalize auto`);
- 4-bit weight-only (`--weight-only 4`, blocks of 32): nearest, gptq+bias-correction and sequential with every
  layer at its lowest width, then the default gate.
Sizes are the ONNX file and its zstd bundle (`edgepack pack --compress zstd`) against fp32's. The default 4-bit
file also runs through `edgepack eval` on the same input tensors: its top-1 must equal onnxruntime's on that file
(edgepack's loader unpacks the int4 weights itself).

Usage: scripts/quant_rounding.py [--models efficientnet,squeezenet] [--md QUANTIZATION.md]
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs  # noqa: E402
from quant_accuracy import IMAGENET, accuracy, ep, imagenet_split, predict, write_npy_dataset  # noqa: E402

BEGIN, END = "<!-- quant-rounding:begin -->", "<!-- quant-rounding:end -->"
VARIANTS = [
    ("INT8, nearest", ["--budget", "none", "--rounding", "nearest", "--equalize", "off"]),
    ("INT8, bias correction", ["--budget", "none", "--rounding", "bias-correction", "--equalize", "off"]),
    ("INT8, GPTQ", ["--budget", "none", "--rounding", "gptq", "--equalize", "off"]),
    ("INT8, GPTQ + bias correction", ["--budget", "none", "--rounding", "gptq+bias-correction", "--equalize", "off"]),
    ("INT8, GPTQ + bias correction layer by layer", ["--budget", "none", "--rounding", "sequential", "--equalize",
                                                     "off"]),
    ("INT8, nearest, activations equalized", ["--budget", "none", "--rounding", "nearest", "--equalize", "on"]),
    ("INT8, GPTQ + bias correction, activations equalized", ["--budget", "none", "--rounding", "gptq+bias-correction",
                                                             "--equalize", "on"]),
    ("INT8, defaults (gate, rounding auto, equalize auto)", []),
    ("4-bit weights, nearest", ["--weight-only", "4", "--budget", "none", "--rounding", "nearest"]),
    ("4-bit weights, GPTQ + bias correction", ["--weight-only", "4", "--budget", "none", "--rounding",
                                                "gptq+bias-correction"]),
    ("4-bit weights, GPTQ + bias correction layer by layer", ["--weight-only", "4", "--budget", "none",
                                                              "--rounding", "sequential"]),
    ("4-bit weights, defaults (gate, rounding auto)", ["--weight-only", "4"]),
]


def run_model(key, a, tmp):
    src, preset, name, cdir, _, eval_rows, prep = imagenet_split(key, a, tmp)
    fname = IMAGENET[key][0]
    xs = [prep(r) for r in eval_rows]
    labels = [int(r["class_index"]) for r in eval_rows]
    fp = predict(src, xs, name)
    fp32_bundle = os.path.join(tmp, f"{key}_fp32.edgepack")
    ep("pack", src, "-o", fp32_bundle, "--preset", preset, "--compress", "none")
    out = {"model": fname, "eval": len(xs), "fp32": accuracy(fp, labels)[0], "variants": []}
    for i, (label, extra) in enumerate(VARIANTS):
        q = os.path.join(tmp, f"{key}_{i}.onnx")
        t0 = time.time()
        rep = json.loads(ep("quantize", src, "--calib", cdir, "--calib-limit", a.edgepack_calib, "--holdout",
                            a.calib - a.edgepack_calib, "-o", q, "--json", "--threads", a.threads, "--preset", preset,
                            *extra).stdout)["report"]
        secs = time.time() - t0
        bundle = os.path.join(tmp, f"{key}_{i}.edgepack")
        ep("pack", q, "-o", bundle, "--preset", preset, "--compress", "zstd")
        pq = predict(q, xs, name)
        agree = 100.0 * sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(pq, fp)) / len(fp)
        f, g = np.stack([np.ravel(x) for x in fp]), np.stack([np.ravel(y) for y in pq])
        sqnr = 10 * np.log10(float((f.astype(np.float64) ** 2).sum()) / max(float(((f - g).astype(np.float64) ** 2).sum()), 1e-30))
        prec = [la["precision"] for la in rep["layers"]]
        v = {"label": label, "args": " ".join(extra) or "(none)", "top1": accuracy(pq, labels)[0], "agree": agree,
             "file": os.path.getsize(q) / os.path.getsize(src),
             "bundle": os.path.getsize(bundle) / os.path.getsize(fp32_bundle),
             "layers": {p: prec.count(p) for p in ("int4", "int8", "fp32") if prec.count(p)},
             "rounding": rep["rounding"], "seconds": secs, "sqnr": sqnr, "equalization": rep.get("equalization")}
        if extra == ["--weight-only", "4"]:
            ndir = os.path.join(tmp, f"{key}_npy")
            write_npy_dataset(ndir, xs, labels)
            preds = os.path.join(tmp, f"{key}_pred.csv")
            ep("eval", q, ndir, "--predictions", preds, "--threads", a.threads)
            rt = [int(r["top1"]) for r in csv.DictReader(open(preds))]
            v["runtime_vs_ort"] = 100.0 * sum(int(t == np.argmax(y)) for t, y in zip(rt, pq)) / len(rt)
        out["variants"].append(v)
        print(f"{key}: {label}: top-1 {v['top1']:.2f} (fp32 {out['fp32']:.2f}), {v['bundle']:.1%} bundle, "
              f"{secs:.0f} s", flush=True)
    return out


def md(results, cmd):
    L = [f"Measured by `{cmd}` (onnxruntime runs every file on the evaluation images; the calibration and gate "
         "images are never evaluated). File and bundle sizes against fp32's (bundle: `edgepack pack --compress zstd` "
         "against the uncompressed fp32 bundle).", "",
         "| model | variant | layers | top-1 (eval images) | drop | agreement with fp32 | output SQNR vs fp32 | file | "
         "zstd bundle | rounding kept (choosing samples) | activation equalization (choosing samples) | seconds |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        for v in r["variants"]:
            layers = ", ".join(f"{n} {p}" for p, n in v["layers"].items())
            cmp = "; ".join(f"{k} {x:.3g}" for k, x in v["rounding"].get("compared", []))
            used = v["rounding"]["used"]
            kept = ("gptq+bias-correction" if used["gptq"] and used["bias_correction"] else "gptq" if used["gptq"]
                    else "bias-correction" if used["bias_correction"] else "nearest")
            kept += " (layer by layer)" if used.get("sequential") else ""
            e = v["equalization"]
            eq = "-" if e is None else (f"{'used' if e['used'] else 'not kept'}, {e['groups']} groups ("
                                        + "; ".join(f"{k} {x:.3g}" for k, x in e["compared"]) + ")")
            rt = f" (edgepack's runtime = onnxruntime on {v['runtime_vs_ort']:.1f} % of top-1)" if "runtime_vs_ort" in v else ""
            L.append(f"| {r['model']} ({r['eval']} images, fp32 {r['fp32']:.2f}) | {v['label']} | {layers} | "
                     f"{v['top1']:.2f}{rt} | {v['top1'] - r['fp32']:+.2f} pt | {v['agree']:.1f} % | {v['sqnr']:.1f} dB | "
                     f"{v['file']:.1%} | {v['bundle']:.1%} | {kept}{f' ({cmp})' if cmp else ''} | {eq} | {v['seconds']:.0f} |")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=model_inputs.shared_dir())
    ap.add_argument("--models", default="efficientnet,squeezenet")
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--edgepack-calib", type=int, default=100)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--md")
    a = ap.parse_args()
    if not os.path.isdir(os.path.join(a.shared, "data", "imagenet_sample")):
        raise SystemExit(f"MISSING: {a.shared}/data/imagenet_sample (never shipped; see shared/data/DATA.md)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.models.split(","):
            results[k] = run_model(k, a, tmp)
    print(json.dumps(results, indent=1))
    if a.md:
        cmd = f"scripts/quant_rounding.py --models {a.models} --calib {a.calib} --edgepack-calib {a.edgepack_calib}"
        mdtable.replace_between(a.md, BEGIN, END, md(results, cmd))
        print(f"wrote {a.md}")


if __name__ == "__main__":
    main()
