#!/usr/bin/env python3
"""CPU runtime vs onnxruntime on every model in shared/models, on real inputs.

For each model: run onnxruntime (pip) and `edgepack run --input NAME=x.npy --output-dir`, then compare every
output (max |diff|, cosine). Models edgepack cannot load are listed with the error (the missing op).
With --device gpu: the GPU backend against the CPU backend (and onnxruntime) on the same inputs.
Writes a markdown table (--md) and JSON (--json).

Usage: ort_parity.py [--edgepack PATH] [--device cpu|gpu] [--md CONFORMANCE.md] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs  # noqa: E402

MARK_BEGIN = "<!-- ort-parity:begin -->"
MARK_END = "<!-- ort-parity:end -->"
GPU_BEGIN = "<!-- gpu-parity:begin -->"
GPU_END = "<!-- gpu-parity:end -->"


def default_edgepack():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(__file__), "..", "target")
    return os.path.join(tgt, "release", "edgepack")


def onnxruntime_outputs(model_path, feeds, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def edgepack_outputs(model_path, feeds, names, edgepack, threads=1, device="cpu", env=None):
    """`edgepack run --raw` on one backend: {output name: array}, or {"error", "exit_code"} when it cannot run.
    `env`: extra environment (e.g. EDGEPACK_CPU=interp for the kernel interpreter)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [edgepack, "run", model_path, "--raw", "--threads", str(threads), "--device", device,
                "--output-dir", os.path.join(tmp, "out")]
        for k, v in feeds.items():
            p = os.path.join(tmp, f"in_{k}.npy")
            np.save(p, v)
            args += ["--input", f"{k}={p}"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
        if r.returncode != 0:
            err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"
            return {"error": err, "exit_code": r.returncode}
        out = {}
        for n in names:
            safe = "".join(c if (c.isalnum() or c in "_-.") else "_" for c in n)
            out[n] = np.load(os.path.join(tmp, "out", f"{safe}.npy"))
        return {"outputs": out}


def diff(name, ref_v, got):
    """Max |difference| and cosine of one output against a reference."""
    a = np.asarray(ref_v, np.float64).ravel()
    b = np.asarray(got, np.float64).ravel()
    shape_ok = tuple(np.shape(ref_v)) == tuple(np.shape(got))
    denom = np.linalg.norm(a) * np.linalg.norm(b) if shape_ok else 0
    cos = float(a @ b / denom) if denom > 0 else (1.0 if shape_ok and np.allclose(a, b) else 0.0)
    return {
        "name": name,
        "shape": list(np.shape(ref_v)),
        "shape_equal": shape_ok,
        "max_abs_diff": float(np.max(np.abs(a - b))) if shape_ok and a.size else (0.0 if shape_ok else None),
        "max_abs_ref": float(np.max(np.abs(a))) if a.size else 0.0,
        "cosine": cos if shape_ok else None,
    }


def compare(model_path, feeds, edgepack, threads=1, device="cpu", env=None):
    """One backend against onnxruntime."""
    ref = onnxruntime_outputs(model_path, feeds, threads)
    r = edgepack_outputs(model_path, feeds, list(ref), edgepack, threads, device, env)
    if "error" in r:
        return {"loaded": False, "exit_code": r["exit_code"], "error": r["error"]}
    return {"loaded": True, "outputs": [diff(n, ref[n], r["outputs"][n]) for n in ref]}


def compare_gpu(model_path, feeds, edgepack, threads=1):
    """The GPU backend against the CPU backend (what issue 5 asks: cosine >= 0.9999) and against onnxruntime."""
    ref = onnxruntime_outputs(model_path, feeds, threads)
    cpu = edgepack_outputs(model_path, feeds, list(ref), edgepack, threads, "cpu")
    gpu = edgepack_outputs(model_path, feeds, list(ref), edgepack, threads, "gpu")
    if "error" in gpu:
        return {"loaded": False, "exit_code": gpu["exit_code"], "error": gpu["error"]}
    if "error" in cpu:
        return {"loaded": True, "cpu_error": cpu["error"], "outputs": []}
    outs = []
    for n in ref:
        d = diff(n, cpu["outputs"][n], gpu["outputs"][n])
        d["cosine_vs_ort"] = diff(n, ref[n], gpu["outputs"][n])["cosine"]
        g, c = gpu["outputs"][n], cpu["outputs"][n]
        # Classifier-shaped outputs ([1, classes] and the like): the top-1 of both backends.
        if g.size >= 2 and g.size == max(g.shape) and g.dtype.kind == "f":
            d["top1"] = [int(np.argmax(c)), int(np.argmax(g))]
        outs.append(d)
    return {"loaded": True, "outputs": outs}


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def md_table(results, loads, columns, cells):
    """One row per output of each model; `cells(o)` gives the cells after the output's name and shape."""
    rows = [f"| model | {loads} | output | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for fname, r in results.items():
        if not r["loaded"]:
            rows.append(f"| `{fname}` | **no** (exit {r['exit_code']}): {r['error'].replace('|', '/')} |"
                        + " |" * (len(columns) + 1))
            continue
        for o in r["outputs"]:
            rows.append(f"| `{fname}` | yes | `{o['name']}` {o['shape']} | " + " | ".join(cells(o)) + " |")
    return "\n".join(rows)


def cpu_table(results):
    return md_table(results, "loads in edgepack (tract)", ["max abs diff", "max abs value", "cosine"],
                    lambda o: [fmt(o["max_abs_diff"], ".3g"), f"{o['max_abs_ref']:.3g}",
                               fmt(o["cosine"], ".7f", "shape differs")])


def gpu_table(results):
    return md_table(results, "runs on the gpu backend",
                    ["max abs diff vs cpu", "max abs value", "cosine vs cpu", "cosine vs onnxruntime",
                     "top-1 cpu / gpu"],
                    lambda o: [fmt(o["max_abs_diff"], ".3g"), f"{o['max_abs_ref']:.3g}",
                               fmt(o["cosine"], ".7f", "shape differs"), fmt(o["cosine_vs_ort"], ".7f"),
                               f"{o['top1'][0]} / {o['top1'][1]}" if "top1" in o else ""])


def adapter(edgepack):
    r = subprocess.run([edgepack, "devices", "--json"], capture_output=True, text=True, timeout=300)
    g = json.loads(r.stdout)["gpu"]
    return g.get("name") or g.get("unavailable") or str(g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edgepack", default=default_edgepack())
    ap.add_argument("--shared", default=model_inputs.shared_dir())
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="cpu: the CPU backend vs onnxruntime; gpu: the GPU backend vs the CPU backend and onnxruntime")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args()
    inputs = model_inputs.all_inputs(a.shared)
    results = {}
    for fname, feeds in inputs.items():
        path = os.path.join(a.shared, "models", fname)
        results[fname] = (compare_gpu if a.device == "gpu" else compare)(path, feeds, a.edgepack)
        print(fname, json.dumps(results[fname]), flush=True)
    table = gpu_table(results) if a.device == "gpu" else cpu_table(results)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)
    if a.md:
        if a.device == "gpu":
            cmd = "python3 scripts/ort_parity.py --device gpu --md CONFORMANCE.md"
            meta = (f"Generated by `{cmd}` (adapter: {adapter(a.edgepack)}; onnxruntime {ort.__version__}; 1 thread; "
                    "the same real inputs). The GPU backend's outputs against the CPU backend's, and against "
                    "onnxruntime. `tests/python/test_gpu.py::test_shared_models_match_cpu` asserts cosine vs cpu "
                    "≥ 0.9999 and the same top-1 for every model the GPU backend runs, and a typed error naming the "
                    "op for the others.")
            mdtable.replace_between(a.md, GPU_BEGIN, GPU_END, f"{meta}\n\n{table}")
        else:
            cmd = "python3 scripts/ort_parity.py --md CONFORMANCE.md"
            meta = f"Generated by `{cmd}` (onnxruntime {ort.__version__}, 1 thread, real inputs from shared/data)."
            mdtable.replace_between(a.md, MARK_BEGIN, MARK_END, f"{meta}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
