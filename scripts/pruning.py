#!/usr/bin/env python3
"""PRUNING.md: `edgepack prune` on EfficientNet-Lite0 and SqueezeNet over the ImageNet sample (issue 8).

Per model, with the samples in a fixed shuffled order (`--shuffle`: the sample is sorted by class):
  1. unstructured: one global threshold on layer-adaptive magnitude scores (OBS updates on 1×1 layers), the largest sparsity within a 1 pt top-1 budget (plan on
     --holdout images after the 256 statistics images), the accuracy curve over uniform sparsities;
  2. structured: channel groups (reconstruction criterion, least-squares repair, kept counts on the CPU kernels'
     16-channel tile), the largest reduction of kernel MACs within a 1 pt top-1 budget (sensitivity scan on 64
     held-out images + plan), the curve over uniform ratios, CPU latency against fp32 (the median ratio of
     interleaved pairs with its 95 % confidence interval, 1 thread, inside the job);
  3. bundles: fp32 as is; the unstructured model with zstd members; pruned + INT8 (`edgepack quantize` on the
     unstructured model) with zstd members; their sizes against the fp32 bundle;
  4. top-1 of every variant with `edgepack eval` on all 1000 images (the statistics images included);
  5. the pruned models on --check-images images through onnxruntime, edgepack CPU and edgepack GPU (lavapipe):
     the same top-1 on each image.

Usage: scripts/pruning.py [--holdout 500] [--check-images 40] [--models efficientnet,squeezenet] [--md PRUNING.md]
                          [--only structured]
Reports (JSON + HTML) stay under --work. `--only structured` reruns the structured part of each model and keeps the
rest from --work/results.json (from an earlier full run).
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
from quant_accuracy import edgepack_bin  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SHARED = os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared")
DATA = os.path.join(SHARED, "data", "imagenet_sample")
MODELS = {
    "efficientnet": ("EfficientNet-Lite0", "efficientnet_lite0_fp32.onnx", "tf"),
    "squeezenet": ("SqueezeNet 1.0", "squeezenet1.0_fp32.onnx", "caffe_bgr"),
}
BEGIN, END = "<!-- pruning:begin -->", "<!-- pruning:end -->"


def ep(*args, capture=True):
    cmd = [edgepack_bin(), *map(str, args)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=capture, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return r.stdout


def top1_eval(model, preset, variant=None):
    args = ["eval", model, DATA, "--preset", preset, "--device", "cpu", "--json"]
    out = json.loads(ep(*args))
    return 100.0 * out["top1"]


def cross_check(models, preset, n):
    """Top-1 of each pruned model on the first n images through onnxruntime, edgepack CPU and edgepack GPU."""
    import csv

    import onnxruntime as ort

    rows = list(csv.DictReader(open(os.path.join(DATA, "labels.csv"))))
    step = max(1, len(rows) // n)
    imgs = [os.path.join(DATA, "images", r["file"]) for r in rows[::step][:n]]
    out = {}
    for name, path in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            ep("run", path, *imgs, "--preset", preset, "--raw", "--device", "cpu", "--save-inputs", f"{tmp}/in",
               "--output-dir", f"{tmp}/cpu")
            ep("run", path, *imgs, "--preset", preset, "--raw", "--device", "gpu", "--output-dir", f"{tmp}/gpu")
            x = np.load(next(os.path.join(f"{tmp}/in", f) for f in os.listdir(f"{tmp}/in")))
            so = ort.SessionOptions()
            so.log_severity_level = 3
            s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            iname = s.get_inputs()[0].name
            ref = np.concatenate([s.run(None, {iname: x[i:i + 1]})[0].reshape(1, -1) for i in range(len(x))])
            cpu = np.load(os.path.join(f"{tmp}/cpu", os.listdir(f"{tmp}/cpu")[0])).reshape(len(x), -1)
            gpu = np.load(os.path.join(f"{tmp}/gpu", os.listdir(f"{tmp}/gpu")[0])).reshape(len(x), -1)
            a, b, c = ref.argmax(1), cpu.argmax(1), gpu.argmax(1)
            out[name] = {"images": len(x), "cpu_equal": int((a == b).sum()), "gpu_equal": int((a == c).sum()),
                         "max_abs_cpu": float(np.abs(ref - cpu).max()), "max_abs_gpu": float(np.abs(ref - gpu).max())}
    return out


def setup(key, args):
    """(title, fp32 model, preset, work folder, the prune arguments every run shares) of one model."""
    title, fname, preset = MODELS[key]
    w = os.path.join(args.work, key)
    os.makedirs(w, exist_ok=True)
    common = ["--calib", DATA, "--preset", preset, "--shuffle", "--calib-limit", 256, "--holdout", args.holdout]
    return title, os.path.join(SHARED, "models", fname), preset, w, common


def run_structured(fp32, w, common, args):
    st, st5 = f"{w}/structured.onnx", f"{w}/structured_5pt.onnx"
    structured = [*common, "--method", "structured", "--levels", "0.0625,0.125,0.1875,0.25,0.375,0.5",
                  "--sensitivity-samples", 64, "--latency-runs", args.latency_runs, "--threads", 1]
    ep("prune", fp32, *structured, "--budget", "top1-drop=1", "--curve", "0.05,0.1,0.15,0.2,0.3", "-o", st)
    ep("prune", fp32, *structured, "--budget", "top1-drop=5", "-o", st5)
    return st, st5


def rerun_structured(key, args, prev):
    """The structured part again; everything else from an earlier full run."""
    _, fp32, preset, w, common = setup(key, args)
    st, st5 = run_structured(fp32, w, common, args)
    out = f"{w}/structured.edgepack"
    ep("pack", st, "-o", out, "--preset", preset, "--main", "pruned:fp32", "--compress", "none")
    r = dict(prev)
    r["sizes"] = {**prev["sizes"], "structured": os.path.getsize(out)}
    r["structured"], r["structured_5pt"] = (json.load(open(p + ".prune.json")) for p in (st, st5))
    r["top1"] = {**prev["top1"], "structured": top1_eval(st, preset), "structured_5pt": top1_eval(st5, preset)}
    r["check"] = {**prev["check"], **cross_check({"structured": st}, preset, args.check_images)}
    return r


def run_model(key, args):
    title, fp32, preset, w, common = setup(key, args)
    un = f"{w}/unstructured.onnx"
    ep("prune", fp32, *common, "--method", "unstructured", "--scope", "global", "--budget", "top1-drop=1",
       "--levels", 0.8, "--curve", "0.1,0.2,0.3,0.4,0.5,0.6,0.7", "--latency-runs", 0, "-o", un)
    st, st5 = run_structured(fp32, w, common, args)
    ru, rs, rs5 = (json.load(open(p + ".prune.json")) for p in (un, st, st5))
    q = f"{w}/unstructured_int8.onnx"
    ep("quantize", "--budget", "none", un, "--calib", DATA, "--preset", preset, "--calib-limit", 100, "--holdout", 100,
       "--latency-runs", 0, "-o", q)
    qf = f"{w}/int8.onnx"
    ep("quantize", "--budget", "none", fp32, "--calib", DATA, "--preset", preset, "--calib-limit", 100, "--holdout", 100,
       "--latency-runs", 0, "-o", qf)
    sizes = {}
    for tag, model, main, comp in [("fp32", fp32, "fp32:fp32", "none"), ("unstructured_zstd", un, "pruned:fp32", "zstd"),
                                   ("structured", st, "pruned:fp32", "none"), ("int8_zstd", qf, "int8:int8", "zstd"),
                                   ("unstructured_int8_zstd", q, "pruned-int8:int8", "zstd")]:
        out = f"{w}/{tag}.edgepack"
        ep("pack", model, "-o", out, "--preset", preset, "--main", main, "--compress", comp)
        sizes[tag] = os.path.getsize(out)
    sizes["unstructured_int8_xz"] = xz_size(q)
    top1 = {tag: top1_eval(m, preset) for tag, m in
            [("fp32", fp32), ("unstructured", un), ("structured", st), ("int8", qf), ("unstructured_int8", q)]}
    check = cross_check({"unstructured": un, "structured": st}, preset, args.check_images)
    top1["structured_5pt"] = top1_eval(st5, preset)
    return {"title": title, "unstructured": ru, "structured": rs, "structured_5pt": rs5, "sizes": sizes, "top1": top1,
            "check": check}


LOWBIT_BEGIN, LOWBIT_END = "<!-- pruning-lowbit:begin -->", "<!-- pruning-lowbit:end -->"


def halves(w):
    """The sample in two disjoint halves of 500 (even and odd rows of labels.csv, so both span every stretch of the
    class-sorted list): folders of their own labels.csv beside a link to the images."""
    rows = list(csv.reader(open(os.path.join(DATA, "labels.csv"))))
    out = []
    for k in (0, 1):
        d = os.path.join(w, f"half{k}")
        os.makedirs(d, exist_ok=True)
        link, images = os.path.join(d, "images"), os.path.join(DATA, "images")
        if os.path.islink(link) and os.readlink(link) != images:
            os.remove(link)
        if not os.path.islink(link):
            os.symlink(images, link)
        with open(os.path.join(d, "labels.csv"), "w", newline="") as f:
            cw = csv.writer(f)
            cw.writerow(rows[0])
            cw.writerows(rows[1:][k::2])
        out.append(d)
    return out


def correct(model, data, preset, path):
    """{image: top-1 right} by `edgepack eval --predictions`."""
    ep("eval", model, data, "--preset", preset, "--device", "cpu", "--predictions", path, "--json")
    return {r["file"]: r["top1"] == r["label"] for r in csv.DictReader(open(path))}


def coded(src, rate, calib, preset, out):
    """`edgepack quantize --weight-only RATE --weight-grid coded --budget none` (calibration and GPTQ on 100 images of
    CALIB, the rate allocation's sensitivities on its other 400), packed with zstd: (report, bundle path, bundle
    bytes). At a size target the bits are placed by the rate allocation; the default gate would add bits to the
    layers it finds sensitive (2 more on the classifier: 320 KB), which a size target has no room for."""
    rep = json.loads(ep("quantize", "--weight-only", f"{rate:g}", "--weight-grid", "coded", "--budget", "none", src,
                        "--calib", calib, "--preset", preset, "--shuffle", "--calib-limit", 100, "--holdout", 400,
                        "--latency-runs", 0, "-o", out, "--json"))["report"]
    bundle = out[:-len(".onnx")] + ".edgepack"
    ep("pack", out, "-o", bundle, "--preset", preset, "--main", "pruned-coded:int8", "--compress", "zstd")
    return rep, bundle, os.path.getsize(bundle)


def fit_rate(src, calib, preset, target, stem):
    """A coded rate (a multiple of 0.05 bits) whose bundle fits TARGET bytes: 4 and 3.5 bits, the secant between
    them, then down by 0.05 until it fits; the largest rate tried that fits. Only sizes decide: no label is read."""
    tried = {}

    def size(r):
        r = round(r, 2)
        if r not in tried:
            tried[r] = coded(src, r, calib, preset, f"{stem}_{r:g}.onnx")
        return tried[r][2]

    s4, s35 = size(4.0), size(3.5)
    r = 3.5 + (target - s35) * 0.5 / (s4 - s35) if s4 != s35 else 3.5
    r = math.floor(min(max(r, 2.0), 6.0) * 20 + 1e-9) / 20
    while size(r) > target and r > 2.0:
        r = round(r - 0.05, 2)
    fits = [x for x in tried if tried[x][2] <= target]
    if not fits:
        raise SystemExit(f"no coded rate down to 2 bits fits {target} bytes: {sizes_of(tried)}")
    best = max(fits)
    return best, tried[best], sizes_of(tried)


def sizes_of(tried):
    return {f"{x:g}": tried[x][2] for x in sorted(tried)}


def run_lowbit(key, args):
    """Pruned + low-bit weights within a size target, cross-fitted: the sample split in two halves; on one half the
    pruning plan (statistics, held-out budget), the coded rate that fits the target and the quantizer's calibration,
    GPTQ and rate allocation; top-1 on the other half, which no step saw; then the halves swap. Each of the 1000 images is judged by
    the model that never saw it, and the drop against fp32 comes with its paired 95 % confidence interval."""
    title, fp32, preset, w, _ = setup(key, args)
    fp32_bundle = f"{w}/fp32.edgepack"
    ep("pack", fp32, "-o", fp32_bundle, "--preset", preset, "--main", "fp32:fp32", "--compress", "none")
    fp32_bytes = os.path.getsize(fp32_bundle)
    target = int(args.lowbit_target * fp32_bytes)
    folds, right = [], {"fp32": {}, "pruned": {}, "final": {}}
    dirs = halves(w)
    for k in (0, 1):
        choose, report = dirs[k], dirs[1 - k]
        un = f"{w}/lowbit{k}_pruned.onnx"
        ep("prune", fp32, "--calib", choose, "--preset", preset, "--shuffle", "--calib-limit", 200, "--holdout", 300,
           "--method", "unstructured", "--scope", "global", "--budget", f"top1-drop={args.lowbit_prune_budget:g}",
           "--levels", 0.8, "--latency-runs", 0, "-o", un)
        plan = json.load(open(un + ".prune.json"))
        rate, (rep, bundle, size), sizes = fit_rate(un, choose, preset, target, f"{w}/lowbit{k}_coded")
        got = {tag: correct(m, report, preset, f"{w}/lowbit{k}_{tag}.csv")
               for tag, m in (("fp32", fp32), ("pruned", un), ("final", bundle))}
        for tag in right:
            right[tag].update(got[tag])
        prec = [la["precision"] for la in rep["layers"]]
        folds.append({"chosen_on": os.path.basename(choose), "reported_on": os.path.basename(report),
                      "sparsity": plan["compute"]["sparsity"], "rate": rate, "sizes": sizes, "bytes": size,
                      "layers": {p: prec.count(p) for p in ("coded", "int8", "fp32") if prec.count(p)},
                      "wider": len((rep.get("budget") or {}).get("float_nodes") or []),
                      "images": len(got["fp32"]),
                      "top1": {t: 100.0 * sum(v.values()) / len(v) for t, v in got.items()}})
    names = sorted(right["fp32"])
    pooled = {}
    for tag in ("pruned", "final"):
        d = np.array([float(right["fp32"][n]) - float(right[tag][n]) for n in names])
        se = d.std(ddof=1) / np.sqrt(len(d))
        pooled[tag] = {"top1": 100.0 * np.mean([right[tag][n] for n in names]), "drop": 100.0 * d.mean(),
                       "ci95": [100.0 * (d.mean() - 1.96 * se), 100.0 * (d.mean() + 1.96 * se)]}
    return {"title": title, "fp32_bytes": fp32_bytes, "target": args.lowbit_target, "images": len(names),
            "fp32_top1": 100.0 * np.mean([right["fp32"][n] for n in names]), "folds": folds, "pooled": pooled,
            "prune_budget": args.lowbit_prune_budget}


def md_lowbit(results):
    L = ["Measured by `scripts/pruning.py --only lowbit`, cross-fitted on two disjoint halves of the 1000 images (even "
         "and odd rows). On the choosing half: `edgepack prune --method unstructured --scope global --budget "
         "top1-drop=B` (statistics on 200 images, the plan on the other 300), then `edgepack quantize --weight-only R "
         "--weight-grid coded --budget none` (calibration and GPTQ on 100 images, the rate allocation on the "
         "other 400: layer sensitivities on 16 of them, kept when they say it is closer; no gate: at a size target the "
         "allocation places the bits), R a multiple of 0.05 bits whose zstd bundle (libzstd, level 1) fits the target, found from the bundle sizes "
         "alone (the secant between 4 and 3.5 bits, then down by 0.05 until it fits). Top-1 by `edgepack eval` of the bundle as shipped on the other half, which no step saw; then "
         "the halves swap. The last row pools the 1000 images, each judged by the model that never saw it; the drop's "
         "95 % confidence interval is that of the paired per-image difference.", ""]
    for r in results.values():
        L += [f"**{r['title']}**: fp32 bundle {r['fp32_bytes']} bytes, target ≤ {r['target']:.0%} of it; pruning budget "
              f"B = {r['prune_budget']:g} pt.", "",
              "| chosen on → reported on | sparsity | coded rate (bundle bytes tried) | layers | bundle | of fp32 | "
              "top-1 fp32 | pruned fp32 | pruned + coded | drop |", "|---|---|---|---|---|---|---|---|---|---|"]
        for f in r["folds"]:
            t = f["top1"]
            tried = ", ".join(f"{x}: {b}" for x, b in f["sizes"].items())
            layers = ", ".join(f"{n} {p}" for p, n in f["layers"].items()) + \
                (f" ({f['wider']} widened by the gate)" if f["wider"] else "")
            L.append(f"| {f['chosen_on']} → {f['reported_on']} ({f.get('images', 500)}) | {pct(f['sparsity'])} | {f['rate']:g} bits "
                     f"({tried}) | {layers} | {f['bytes']} | {f['bytes'] / r['fp32_bytes']:.1%} | {t['fp32']:.1f} | "
                     f"{t['pruned']:.1f} | {t['final']:.1f} | {t['fp32'] - t['final']:+.1f} pt |")
        p, q = r["pooled"]["final"], r["pooled"]["pruned"]
        big = max(f["bytes"] for f in r["folds"])
        L.append(f"| both, pooled ({r['images']}) | | | | ≤ {big} | ≤ {big / r['fp32_bytes']:.1%} | {r['fp32_top1']:.1f} | "
                 f"{q['top1']:.1f} | {p['top1']:.1f} | **{p['drop']:+.1f} pt** (95 % CI {p['ci95'][0]:+.1f} to "
                 f"{p['ci95'][1]:+.1f}; pruning alone {q['drop']:+.1f}) |")
    return "\n".join(L)


def pct(x):
    return f"{100 * x:.1f} %"


def xz_size(path):
    """Bytes of the file under xz -9e (LZMA2, the strongest general-purpose coder of Python's standard library):
    how far a better entropy coder than the bundle's zstd could take the same weights."""
    import lzma
    return len(lzma.compress(open(path, "rb").read(), preset=9 | lzma.PRESET_EXTREME))


def latency_cell(lat):
    if not lat:
        return "-"
    lo, hi = lat.get("ratio_ci") or (float("nan"), float("nan"))
    verdict = "**faster**" if hi < 1 else ("slower" if lo > 1 else "no measured change")
    reps = len(lat.get("replica_ratios") or [])
    return (f"×{lat['ratio']:.3f}, {100 * lat['ci_level']:.1f} % CI ×{lo:.3f}–×{hi:.3f}: {verdict} "
            f"({lat['fp32_ms']:.2f} → {lat['pruned_ms']:.2f} ms; {lat['runs']} interleaved pairs in {reps} "
            "replicas)")


def md(results):
    L = []
    L.append("Generated by `scripts/pruning.py` (`just pruning`); the JSON and HTML reports of every run are under its "
             "work folder. Statistics: the first 256 images of the shuffled sample; plans and curves: the next "
             f"{next(iter(results.values()))['structured']['held_out']['samples']} (held out); final top-1: "
             "`edgepack eval` on all 1000 images. No training anywhere. Repair, unstructured: optimal brain surgeon on "
             "1×1 convolutions (and a classifier Gemm when the samples outnumber its inputs), bias correction elsewhere; "
             "structured: least-squares reconstruction of the removed channels from the kept ones.\n")
    L.append("### Plans within a top-1 budget (on the held-out images)\n")
    L.append("| model | method | budget | pruned | held-out top-1 fp32 → pruned | top-1, 1000 images | MACs | CPU latency (1 thread) | bundle |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        t, s = r["top1"], r["sizes"]
        u, st = r["unstructured"], r["structured"]
        L.append(f"| {r['title']} | unstructured, global magnitude (LAMP) | 1 pt | sparsity {pct(u['compute']['sparsity'])} | "
                 f"{u['fp32']['top1']:.1f} → {u['pruned']['top1']:.1f} | {t['fp32']:.1f} → {t['unstructured']:.1f} | "
                 f"100 % | = | {s['unstructured_zstd'] / s['fp32']:.1%} of fp32 (zstd) |")
        for key, budget in (("structured", "1 pt"), ("structured_5pt", "5 pt")):
            st = r[key]
            lat = st.get("latency") or {}
            size = f"{s['structured'] / s['fp32']:.1%} of fp32" if key == "structured" else \
                f"{st['size']['pruned_bytes'] / st['size']['fp32_bytes']:.1%} of fp32 (file)"
            L.append(f"| {r['title']} | structured channels | {budget} | {sum(g['channels'] - g['kept'] for g in st['groups'])} channels | "
                     f"{st['fp32']['top1']:.1f} → {st['pruned']['top1']:.1f} | {t['fp32']:.1f} → {t[key]:.1f} | "
                     f"{pct(st['compute']['macs_ratio'])} | {latency_cell(lat)} | "
                     f"{size} |")
    L.append("\n### Pruned + INT8 (target: ≤ 15 % of the fp32 bundle within 1.5 pt top-1)\n")
    L.append("| model | bundle | bytes | of fp32 | top-1, 1000 images | drop |")
    L.append("|---|---|---|---|---|---|")
    for r in results.values():
        t, s = r["top1"], r["sizes"]
        for tag, label, k in [("fp32", "fp32", "fp32"), ("int8_zstd", "INT8, zstd", "int8"),
                              ("unstructured_zstd", "unstructured, zstd", "unstructured"),
                              ("unstructured_int8_zstd", "unstructured + INT8, zstd", "unstructured_int8")]:
            L.append(f"| {r['title']} | {label} | {s[tag]} | {s[tag] / s['fp32']:.1%} | {t[k]:.1f} | {t['fp32'] - t[k]:+.1f} pt |")
        if "unstructured_int8_xz" in s:
            x = s["unstructured_int8_xz"]
            L.append(f"| {r['title']} | unstructured + INT8, the ONNX file under xz -9e (not a bundle format: the bound "
                     f"of a stronger coder) | {x} | {x / s['fp32']:.1%} | {t['unstructured_int8']:.1f} | "
                     f"{t['fp32'] - t['unstructured_int8']:+.1f} pt |")
    L.append("\n### Accuracy curves (held-out images, no plan: the same amount everywhere)\n")
    L.append("| model | method | amount | sparsity | MACs | zstd bytes of the ONNX file | top-1 | agreement with fp32 |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        for m in ("unstructured", "structured"):
            for p in r[m]["curve"]:
                L.append(f"| {r['title']} | {m} | {p['amount']} | {pct(p['sparsity'])} | {pct(p['macs_ratio'])} | "
                         f"{p['zstd_bytes']} | {p['metrics']['top1']:.1f} | {p['metrics']['top1_agreement']:.1f} |")
    L.append("\n### The pruned models in onnxruntime and both edgepack backends\n")
    L.append("| model | pruned | images | edgepack CPU top-1 = onnxruntime | edgepack GPU (lavapipe) top-1 = onnxruntime | max abs diff CPU / GPU |")
    L.append("|---|---|---|---|---|---|")
    for r in results.values():
        for m, c in r["check"].items():
            L.append(f"| {r['title']} | {m} | {c['images']} | {c['cpu_equal']}/{c['images']} | {c['gpu_equal']}/{c['images']} | "
                     f"{c['max_abs_cpu']:.2e} / {c['max_abs_gpu']:.2e} |")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdout", type=int, default=500)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--only", choices=["structured", "lowbit"],
                    help="rerun only this part (structured: the rest from --work/results.json; lowbit: the pruned + "
                         "low-bit table, cross-fitted, its own section)")
    ap.add_argument("--check-images", type=int, default=30)
    ap.add_argument("--lowbit-target", type=float, default=0.15, help="--only lowbit: bundle bytes, of fp32's")
    ap.add_argument("--lowbit-prune-budget", type=float, default=0.5,
                    help="--only lowbit: the pruning plan's top-1 budget (pt) on the choosing half")
    ap.add_argument("--models", default="efficientnet,squeezenet")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/edgepack-pruning"))
    ap.add_argument("--md", default=os.path.join(ROOT, "PRUNING.md"))
    ap.add_argument("--cached-only", action="store_true", help="rewrite the tables from --work/results.json (--only lowbit: --work/lowbit.json)")
    args = ap.parse_args()
    if not os.path.isdir(DATA):
        raise SystemExit(f"MISSING: {DATA} (the ImageNet sample is read from ../shared, never shipped)")
    cache = os.path.join(args.work, "results.json")
    os.makedirs(args.work, exist_ok=True)
    if args.only == "lowbit":
        saved = os.path.join(args.work, "lowbit.json")
        if args.cached_only:
            low = json.load(open(saved))
        else:
            low = {k: run_lowbit(k, args) for k in args.models.split(",")}
            json.dump(low, open(saved, "w"), indent=1)
        mdtable.replace_between(args.md, LOWBIT_BEGIN, LOWBIT_END, md_lowbit(low))
        print(json.dumps(low, indent=1))
        print(f"wrote {args.md}")
        return
    results = json.load(open(cache)) if os.path.exists(cache) else {}
    if not args.cached_only:
        for k in args.models.split(","):
            if args.only and k not in results:
                raise SystemExit(f"--only {args.only}: no earlier results for {k} in {cache}; run without --only")
            results[k] = rerun_structured(k, args, results[k]) if args.only else run_model(k, args)
            json.dump(results, open(cache + ".tmp", "w"), indent=1)
            os.replace(cache + ".tmp", cache)
    for k, r in results.items():  # results from before the xz row: measure it on the file they left
        q = os.path.join(args.work, k, "unstructured_int8.onnx")
        if "unstructured_int8_xz" not in r["sizes"] and os.path.exists(q):
            r["sizes"]["unstructured_int8_xz"] = xz_size(q)
    mdtable.replace_between(args.md, BEGIN, END, md({k: results[k] for k in MODELS if k in results}))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
