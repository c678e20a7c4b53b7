#!/usr/bin/env python3
"""Reference cases for the aarch64 model checks (issue 27), made on this (x86-64) host with onnxruntime.

For every shared model (the inputs of model_inputs.py; YOLOv8n on a fixed random input) and the INT8 files
`edgepack quantize` makes of EfficientNet-Lite0 and SqueezeNet: a folder with the model, its inputs, onnxruntime's
outputs and a `case.txt` for `runtime/examples/model_check.rs`, which runs them on aarch64 under qemu.
The tolerances are those of the x86 tests (tests/python/test_interp.py): fp32 cosine >= 0.9999 and
max |diff| <= 1e-3 * max(1, max |ref|); INT8 files cosine >= 0.999.

Usage: arm_cases.py OUT_DIR --edgepack BIN [--only NAME,...]
Cases whose inputs (model file, this script) have not changed are kept (a stamp per case).
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
import model_inputs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = "data/photos"
INT8 = {"efficientnet_lite0_int8": ("efficientnet_lite0_fp32.onnx", "tf"),
        "squeezenet1.0_int8": ("squeezenet1.0_fp32.onnx", "caffe_bgr")}


def safe(name):
    return "".join(c if (c.isalnum() or c in "_-.") else "_" for c in name)


def digest(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def write_case(out, name, model_src, feeds, cosine, rel, stamp):
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, "stamp")) and open(os.path.join(d, "stamp")).read() == stamp:
        return d
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    shutil.copy(model_src, os.path.join(d, "model.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_src, so, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    lines = ["model\tmodel.onnx", f"cosine\t{cosine}", f"rel\t{rel}"]
    for k, v in feeds.items():
        np.save(os.path.join(d, f"in_{safe(k)}.npy"), v)
        lines.append(f"input\t{k}\tin_{safe(k)}.npy")
    for k, v in outs.items():
        np.save(os.path.join(d, f"ref_{safe(k)}.npy"), v)
        lines.append(f"expect\t{k}\tref_{safe(k)}.npy")
    with open(os.path.join(d, "case.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(d, "stamp"), "w") as f:
        f.write(stamp)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--edgepack", required=True)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    shared = model_inputs.shared_dir()
    only = set(filter(None, a.only.split(",")))
    os.makedirs(a.out, exist_ok=True)
    inputs = model_inputs.all_inputs(shared)
    me = os.path.abspath(__file__)
    for fname in model_inputs.MODEL_FILES + ["yolov8n-doclaynet.onnx"]:
        name = fname[:-5]
        if only and name not in only:
            continue
        path = os.path.join(shared, "models", fname)
        if fname in inputs:
            feeds = inputs[fname]
        else:
            i = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0]
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds = {i.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
        print(write_case(a.out, name, path, feeds, 0.9999, 1e-3, digest(path, me)), flush=True)
    for name, (fname, preset) in INT8.items():
        if only and name not in only:
            continue
        src = os.path.join(shared, "models", fname)
        stamp = digest(src, me, a.edgepack)
        d = os.path.join(a.out, name)
        if os.path.exists(os.path.join(d, "stamp")) and open(os.path.join(d, "stamp")).read() == stamp:
            print(d, flush=True)
            continue
        q = os.path.join(a.out, f"{name}.onnx")
        subprocess.run([a.edgepack, "quantize", "--budget", "none", src, "--calib", os.path.join(shared, PHOTOS), "--preset", preset,
                        "--holdout", "0", "--latency-runs", "0", "-o", q], check=True, stdout=subprocess.DEVNULL)
        print(write_case(a.out, name, q, inputs[fname], 0.999, "inf", stamp), flush=True)
        for f in (q, q + ".report.json", q + ".report.html"):
            os.remove(f)


if __name__ == "__main__":
    main()
