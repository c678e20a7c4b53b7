#!/usr/bin/env python3
"""INT8 accuracy: edgepack quantize beside onnxruntime.quantization.quantize_static, same calibration images.

Calibrates on the first --calib images of shared/data/imagenet_sample (sorted order = labels.csv order) and
evaluates fp32, edgepack INT8 and onnxruntime INT8 (QDQ, per-channel, uint8 activations / int8 weights, same
range method) on the remaining images, all three run by onnxruntime so only the quantization differs.
Writes the table into QUANTIZATION.md between the quant-accuracy markers (--md).

Usage: scripts/quant_accuracy.py [--models efficientnet,squeezenet] [--calib 200] [--method minmax] [--md QUANTIZATION.md]
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODELS = {
    "efficientnet": ("efficientnet_lite0_fp32.onnx", "tf"),
    "squeezenet": ("squeezenet1.0_fp32.onnx", "caffe_bgr"),
}
BEGIN, END = "<!-- quant-accuracy:begin -->", "<!-- quant-accuracy:end -->"


def edgepack_bin():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("EDGEPACK_BIN") or os.path.join(tgt, "release", "edgepack")


class Reader(CalibrationDataReader):
    def __init__(self, paths, name, prep):
        self.items = iter(paths)
        self.name, self.prep = name, prep

    def get_next(self):
        p = next(self.items, None)
        return None if p is None else {self.name: self.prep(p)}


def evaluate(model, rows, images, prep, name):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    top1 = top5 = 0
    preds = []
    for r in rows:
        y = s.run(None, {name: prep(os.path.join(images, r["file"]))})[0].reshape(-1)
        order = np.argsort(-y)[:5]
        label = int(r["class_index"])
        top1 += int(order[0] == label)
        top5 += int(label in order)
        preds.append(int(order[0]))
    return 100.0 * top1 / len(rows), 100.0 * top5 / len(rows), preds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=model_inputs.shared_dir())
    ap.add_argument("--models", default="efficientnet,squeezenet")
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--method", default="minmax", choices=["minmax", "percentile"])
    ap.add_argument("--md")
    a = ap.parse_args()
    ev = model_inputs._tools(a.shared)
    data = os.path.join(a.shared, "data", "imagenet_sample")
    images = os.path.join(data, "images")
    rows = list(csv.DictReader(open(os.path.join(data, "labels.csv"))))
    calib_rows, eval_rows = rows[: a.calib], rows[a.calib:]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calib_dir = os.path.join(tmp, "calib")
        os.mkdir(calib_dir)
        for r in calib_rows:
            os.symlink(os.path.join(images, r["file"]), os.path.join(calib_dir, r["file"]))
        for key in a.models.split(","):
            fname, preset = MODELS[key]
            src = os.path.join(a.shared, "models", fname)
            prep = lambda p, preset=preset: ev.preprocess(p, 256, 224, **ev.PRESETS[preset])  # noqa: E731
            name = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).get_inputs()[0].name
            ours = os.path.join(tmp, f"{key}_edgepack_int8.onnx")
            r = subprocess.run([edgepack_bin(), "quantize", src, "--calib", calib_dir, "--calib-limit", str(a.calib),
                                "--preset", preset, "--method", a.method, "-o", ours, "--json"],
                               capture_output=True, text=True, check=True)
            info = json.loads(r.stdout)
            theirs = os.path.join(tmp, f"{key}_ort_int8.onnx")
            # onnxruntime's quantizer emits per-channel QDQ that is invalid below opset 13 and does not upgrade:
            # give it the same model upgraded by `edgepack rewrite --opset 13` (identical results, see tests).
            ort_src = src
            if max(o.version for o in __import__("onnx").load(src, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")) < 13:
                ort_src = os.path.join(tmp, f"{key}_op13.onnx")
                subprocess.run([edgepack_bin(), "rewrite", src, ort_src, "--opset", "13"], capture_output=True, check=True)
            quantize_static(ort_src, theirs, Reader([os.path.join(images, x["file"]) for x in calib_rows], name, prep),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax if a.method == "minmax" else CalibrationMethod.Percentile)
            f1, f5, fp = evaluate(src, eval_rows, images, prep, name)
            e1, e5, epred = evaluate(ours, eval_rows, images, prep, name)
            o1, o5, opred = evaluate(theirs, eval_rows, images, prep, name)
            agree = lambda p: 100.0 * sum(x == y for x, y in zip(p, fp)) / len(fp)  # noqa: E731
            size = os.path.getsize(src)
            res = {"model": fname, "fp32": (f1, f5), "edgepack": (e1, e5), "ort": (o1, o5),
                   "edgepack_agree": agree(epred), "ort_agree": agree(opred),
                   "edgepack_size": os.path.getsize(ours) / size, "ort_size": os.path.getsize(theirs) / size,
                   "skipped": info["summary"]["skipped"]}
            print(json.dumps(res), flush=True)
            results.append(res)
    lines = [f"| model | fp32 top-1 / top-5 | edgepack INT8 | drop | onnxruntime INT8 | drop | top-1 agreement with fp32 (edgepack / ort) | size vs fp32 (edgepack / ort) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f1, f5 = r["fp32"]
        e1, e5 = r["edgepack"]
        o1, o5 = r["ort"]
        lines.append(f"| {r['model']} | {f1:.1f} / {f5:.1f} | {e1:.1f} / {e5:.1f} | **{f1 - e1:+.1f}** | {o1:.1f} / {o5:.1f} | {f1 - o1:+.1f} | "
                     f"{r['edgepack_agree']:.1f} % / {r['ort_agree']:.1f} % | {100 * r['edgepack_size']:.1f} % / {100 * r['ort_size']:.1f} % |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cmd = f"python3 scripts/quant_accuracy.py --calib {a.calib} --method {a.method} --md QUANTIZATION.md"
        meta = (f"`{cmd}` — onnxruntime {ort.__version__}; calibration: the first {a.calib} images of "
                f"imagenet_sample (sorted), evaluation: the other {len(eval_rows)}; every model run by onnxruntime "
                f"(so only the quantization differs); range method {a.method} for both; models below opset 13 are given to "
                f"onnxruntime's quantizer upgraded by `edgepack rewrite --opset 13`. Drop = fp32 − INT8 top-1 (pt).")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
