#!/usr/bin/env python3
"""How long the default (gated) `edgepack quantize` takes on the larger shared models, and what the gate decides.

For each model, real inputs are cut from shared/data (OCR pages and photos: random crops resized to the model's
input, a fixed seed), written as .npy; `edgepack quantize` runs with default settings on --samples calibration
samples and --samples held-out samples (half of those choose the fp32 layers, the other half judge the result),
timed end to end as one process (with `--mode auto`, a static result that misses the gate is followed by a dynamic
one, and the closer is written). The table says the node count, the form written, the sensitivity method the
automatic choice took, whether the default gate was met and the seconds.

Usage: scripts/quant_gate_time.py [--samples 16] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs as mi  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BEGIN, END = "<!-- quant-gate-time:begin -->", "<!-- quant-gate-time:end -->"
# model file -> (height, width) of the crops, (mean, std) of the normalisation, BGR order
MODELS = {
    "ppocrv4_det.onnx": ((640, 640), (0.5, 0.5)),
    "ppocrv4_rec.onnx": ((48, 320), (0.5, 0.5)),
}


def edgepack_bin():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("EDGEPACK_BIN") or os.path.join(tgt, "release", "edgepack")


def crops(shared, hw, norm, n, out, srcs=None):
    """n random crops (fixed seed) of `srcs` (default: every OCR image and photo) as normalised .npy inputs."""
    d = os.path.join(shared, "data")
    if srcs is None:
        srcs = [os.path.join(d, "ocr", f) for f in sorted(os.listdir(os.path.join(d, "ocr")))]
        srcs += [os.path.join(d, "photos", f) for f in sorted(os.listdir(os.path.join(d, "photos")))]
    rng = np.random.default_rng(0)
    os.makedirs(out)
    for k in range(n):
        im = Image.open(srcs[k % len(srcs)]).convert("RGB")
        w, h = im.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
        c = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((hw[1], hw[0]), Image.BILINEAR)
        a = np.asarray(c)[:, :, ::-1].astype(np.float32) / 255.0
        np.save(os.path.join(out, f"{k:03d}.npy"), ((a - norm[0]) / norm[1]).transpose(2, 0, 1)[None].astype(np.float32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=mi.shared_dir())
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--md")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, (hw, norm) in MODELS.items():
            src = os.path.join(a.shared, "models", model)
            data = os.path.join(tmp, model + "_data")
            crops(a.shared, hw, norm, 2 * a.samples, data)
            out = os.path.join(tmp, model.replace(".onnx", "_int8.onnx"))
            cmd = [edgepack_bin(), "quantize", src, "--calib", data, "--calib-limit", str(a.samples), "--holdout",
                   str(a.samples), "--threads", a.threads, "-o", out, "--json"]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            secs = time.time() - t0
            if r.returncode != 0:
                sys.exit(f"{model}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
            rep = json.loads(r.stdout)["report"]
            b = rep["budget"]
            fp32 = sum(l["precision"] == "fp32" for l in rep["layers"])
            row = {
                "model": model, "nodes": len(onnx.load(src).graph.node), "units": len(rep["layers"]),
                "method": rep["sensitivity_method"] or "not needed", "mode": rep["method"].split(" ")[0], "gate": b["text"], "met": b["met"],
                "reached": b["reached"], "judged": b["judged"], "fp32_layers": fp32, "seconds": secs,
                "cosine": min(o["cosine"] for o in rep["int8"]["outputs"]),
                "equalization": rep.get("equalization"),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = ["| model | ONNX nodes | written form (--mode auto) | its quantizable layers | sensitivity | gate | met (choosing samples) | on the report's samples | layers kept fp32 | output cosine | seconds |",
             "|---|---:|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        form = "dynamic" if r["mode"] == "dynamic" else f"static ({r['mode']})"
        e = r.get("equalization")
        if e:
            form += f", equalized ({e['groups']} groups)" if e["used"] else ", equalization tried, not kept"
        lines.append(f"| {r['model']} | {r['nodes']} | {form} | {r['units']} | {r['method']} | {r['gate']} | "
                     f"{'yes' if r['met'] else 'no'} ({r['reached']:.1f}) | {r['judged']:.1f} | {r['fp32_layers']} | "
                     f"{r['cosine']:.4f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        meta = (f"`python3 scripts/quant_gate_time.py --samples {a.samples} --md {a.md}` — default settings, "
                f"{a.samples} calibration + {a.samples} held-out samples cut from shared/data, {a.threads} threads, "
                f"{cpu}, {os.cpu_count()} CPUs; one process per model, wall seconds.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
