#!/usr/bin/env python3
"""The engine on a GPU host: `edgepack bench` on the GPU backend beside the CPU backend and onnxruntime's CPU
execution provider, at batch 1, 8 and 32, on EfficientNet-Lite0 fp32 (the shipped model) and INT8 (QDQ from
`edgepack quantize`, calibrated on the shipped photos). One run, side by side; the GPU rows name the adapter.

Every edgepack row is `edgepack bench MODEL --free-batch --batch B --device D --runs R --json` (the batch-freed
model `edgepack serve` runs); onnxruntime reads the same batch-freed graph (`edgepack rewrite --free-batch`) at the
same batch, with a random input and the same numbers of warm-up and timed runs. `--f16` adds the GPU backend at
`EDGEPACK_GPU_PRECISION=f16`.

Usage: benches/peers/gpu_host.py [--batches 1,8,32] [--runs 50] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402
from bench_vs_ort import edgepack_bin, ort_bench  # noqa: E402

BEGIN, END = "<!-- gpu-host:begin -->", "<!-- gpu-host:end -->"
MODEL = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
PHOTOS = os.path.join(ROOT, "assets", "photos")


def ep_bench(model, device, batch, runs, warmup, env=None, threads=0):
    r = subprocess.run([edgepack_bin(), "bench", model, "--free-batch", "--batch", str(batch), "--device", device,
                        "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads), "--json"],
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"edgepack bench {model} --device {device} --batch {batch} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def free_batch_copy(model, out):
    """The model as `--free-batch` runs it (`edgepack rewrite --free-batch`), for onnxruntime at any batch."""
    subprocess.run([edgepack_bin(), "rewrite", model, out, "--free-batch"], check=True, capture_output=True)
    return out


def adapter():
    """The GPU adapter `edgepack devices --json` reports (name, api, device_type, driver, shader_f16)."""
    out = subprocess.run([edgepack_bin(), "devices", "--json"], capture_output=True, text=True, check=True).stdout
    gpu = json.loads(out)["gpu"]
    if "unavailable" in gpu:
        raise SystemExit(f"no GPU adapter: {gpu['unavailable']}")
    return gpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--f16", action="store_true", help="also the GPU backend at f16 (adapters with shader-f16)")
    ap.add_argument("--no-ort", action="store_true", help="leave onnxruntime out")
    ap.add_argument("--torch", action="store_true",
                    help="also PyTorch eager on CUDA (fp32 and fp16) through onnx2torch (benches/peers/torch_eager.py)")
    ap.add_argument("--md", help="BENCHMARKS.md to update")
    a = ap.parse_args()
    gpu = adapter()
    print(f"adapter: {gpu}", flush=True)
    batches = [int(b) for b in a.batches.split(",")]
    work = tempfile.mkdtemp(prefix="edgepack-gpu-host-")
    int8 = os.path.join(work, "effnet_int8.onnx")
    subprocess.run([edgepack_bin(), "quantize", "--budget", "none", MODEL, "--calib", PHOTOS, "--preset", "tf", "--holdout", "0",
                    "--latency-runs", "0", "-o", int8], check=True, capture_output=True)
    rows = []
    for label, model in (("fp32", MODEL), ("INT8", int8)):
        ort_model = None if a.no_ort else free_batch_copy(model, os.path.join(work, f"ort_{label}.onnx"))
        for b in batches:
            cells = [("edgepack cpu", lambda: ep_bench(model, "cpu", b, a.runs, a.warmup)),
                     ("edgepack gpu", lambda: ep_bench(model, "gpu", b, a.runs, a.warmup))]
            if a.f16 and gpu.get("shader_f16"):
                cells.append(("edgepack gpu f16", lambda: ep_bench(model, "gpu", b, a.runs, a.warmup,
                                                                   {"EDGEPACK_GPU_PRECISION": "f16"})))
            if ort_model:
                cells.append(("onnxruntime cpu",
                              lambda: ort_bench(ort_model, os.cpu_count() or 1, a.runs, a.warmup, b)))
            for name, fn in cells:
                r = fn()
                rows.append({"model": label, "target": name, "batch": b, "p50_ms": r["p50_ms"],
                             "throughput_per_s": r["throughput_per_s"], "load_ms": r.get("load_ms"),
                             "first_run_ms": r.get("first_run_ms"), "backend": (r.get("backend") or {}).get("description") if isinstance(r.get("backend"), dict) else r.get("backend"),
                             "dispatches": r.get("gpu_dispatches_per_run")})
                print(json.dumps(rows[-1]), flush=True)
        if a.torch and label == "fp32":
            # The same batch-free ONNX file in PyTorch eager on CUDA (its own process: torch is heavy).
            for f16 in (False, True):
                cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "torch_eager.py"),
                       ort_model or free_batch_copy(model, os.path.join(work, "torch.onnx")), "--batches", a.batches,
                       "--runs", str(a.runs), "--warmup", str(a.warmup)] + (["--f16"] if f16 else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"PyTorch eager skipped: {r.stderr.strip()[-300:]}", flush=True)
                    break
                for line in r.stdout.splitlines():
                    t = json.loads(line)
                    rows.append({"model": label, "target": f"pytorch eager cuda {t['precision']}", "batch": t["batch"],
                                 "p50_ms": t["p50_ms"], "throughput_per_s": t["throughput_per_s"], "load_ms": None,
                                 "first_run_ms": None, "backend": "torch", "dispatches": None})
                    print(json.dumps(rows[-1]), flush=True)
    tp = {(r["model"], r["target"], r["batch"]): r["throughput_per_s"] for r in rows}
    opt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    lines = ["| model | target | batch | p50 ms | samples/s | ÷ edgepack cpu | ÷ own batch 1 | load ms | first run ms | "
             "dispatches |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, t, b = r["model"], r["target"], r["batch"]
        own1 = tp.get((m, t, 1))
        lines.append(f"| {m} | {t} | {b} | {r['p50_ms']:.2f} | {tp[m, t, b]:.0f} | "
                     f"{tp[m, t, b] / tp[m, 'edgepack cpu', b]:.2f}× | "
                     f"{'—' if own1 is None else f'{tp[m, t, b] / own1:.2f}×'} | "
                     f"{opt(r['load_ms'])} | {opt(r['first_run_ms'])} | {opt(r.get('dispatches'))} |")
    top = max(batches)
    summary = [f"- {m}: GPU backend at batch {top} / batch 1: "
               f"**{tp[m, 'edgepack gpu', top] / tp[m, 'edgepack gpu', 1]:.2f}×** samples/s"
               for m in ("fp32", "INT8")]
    table = "\n".join(lines + [""] + summary)
    print(table)
    if a.md:
        cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True,
                             text=True).stdout.strip()
        flags = "".join(f" --{k} {v}" for k, v in (("batches", a.batches), ("runs", a.runs)))
        flags += (" --f16" if a.f16 else "") + (" --torch" if a.torch else "")
        meta = (f"`python3 benches/peers/gpu_host.py{flags} --md {a.md}` on "
                f"{gpu['name']} / {gpu['api']} ({gpu['device_type']}, driver {gpu['driver']}) with {os.cpu_count()} "
                f"CPU cores ({cpu}); EfficientNet-Lite0, random input; `edgepack bench --free-batch` medians of "
                f"{a.runs} runs after {a.warmup} warm-ups, samples/s over the timed runs (inputs uploaded and outputs "
                "read back every run); onnxruntime's CPU execution provider with one intra-op thread per core on "
                "the same file with a free batch dim; PyTorch eager (with --torch): the same file through onnx2torch "
                "on CUDA, channels-last, input copied in and output copied back every run. Load and first run "
                "include every shader compiled for that input shape; dispatches: the fused program's per run.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
