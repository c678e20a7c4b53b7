#!/usr/bin/env python3
"""Engine soak (issue 31): long `edgepack bench --rss-every` runs on every backend, and whether memory stays flat.

For each (backend, model): `edgepack bench MODEL --runs N --rss-every N/10 --json` records the resident set size
and the open file descriptors after every tenth of the runs; the first sample comes after N/10 runs (past the
warm-up) and the later ones may not exceed it by more than 5 %. Backends: tract (the CPU default), the kernel
interpreter (`EDGEPACK_CPU=interp`), the GPU backend (`--device gpu`; lavapipe here, fewer runs: it is a CPU
emulation of a GPU).

    scripts/soak_engine.py [--runs 10000] [--gpu-runs 1000] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402

BEGIN, END = "<!-- soak-engine:begin -->", "<!-- soak-engine:end -->"


def edgepack_bin():
    t = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.environ.get("EDGEPACK_BIN") or os.path.join(t, "release", "edgepack")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--gpu-runs", type=int, default=1000)
    ap.add_argument("--md")
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    a = ap.parse_args()
    shared = os.environ.get("EDGEPACK_SHARED", os.path.join(ROOT, "..", "shared"))
    models = {"MNIST": os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx"),
              "SqueezeNet 1.0": os.path.join(shared, "models", "squeezenet1.0_fp32.onnx")}
    cases = []
    for name, path in models.items():
        if not os.path.exists(path):
            print(f"SKIPPED: {path} is absent", file=sys.stderr)
            continue
        cases += [("tract", name, path, a.runs, {}, ["--device", "cpu"]),
                  ("interpreter", name, path, a.runs, {"EDGEPACK_CPU": "interp"}, ["--device", "cpu"]),
                  ("gpu (wgpu)", name, path, a.gpu_runs, {}, ["--device", "gpu"])]
    rows = ["| backend | model | runs | RSS after first tenth | peak RSS later | growth | open fds | result |",
            "|---|---|---:|---:|---:|---:|---|---|"]
    failed = []
    device = ""
    for backend, name, path, runs, env, extra in cases:
        every = max(1, runs // 10)
        cmd = [edgepack_bin(), "bench", path, "--runs", str(runs), "--warmup", "5", "--rss-every", str(every),
               "--json", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if r.returncode != 0:
            if backend.startswith("gpu") and "no GPU" in (r.stderr + r.stdout):
                print(f"SKIPPED: {backend}: {r.stderr.strip()}", file=sys.stderr)
                continue
            failed.append(f"{backend} {name}: {r.stderr.strip()}")
            continue
        doc = json.loads(r.stdout)
        soak = doc["soak"]
        first = soak["samples"][0]["rss_mb"]
        peak = max(s["rss_mb"] for s in soak["samples"])
        ok = soak["rss_growth_pct"] <= a.max_growth_pct and soak["fds_max"] - soak["fds_first"] <= 2
        if backend.startswith("gpu"):
            device = doc["backend"]["engine"]
        rows.append(f"| {backend} | {name} | {doc['runs']} | {first:.1f} MiB | {peak:.1f} MiB | "
                    f"{soak['rss_growth_pct']:+.2f} % | {soak['fds_first']} → {soak['fds_max']} | "
                    f"{'flat' if ok else 'GROWS'} |")
        print(rows[-1], flush=True)
        if not ok:
            failed.append(f"{backend} {name}: growth {soak['rss_growth_pct']:.2f} %")
    table = "\n".join(rows)
    print(table)
    if a.md:
        note = f"`scripts/soak_engine.py --runs {a.runs} --gpu-runs {a.gpu_runs}`" + (
            f" (GPU: {device})" if device else "")
        mdtable.replace_between(a.md, BEGIN, END, f"{note}:\n\n{table}")
    if failed:
        print("FAIL: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
