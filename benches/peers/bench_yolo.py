#!/usr/bin/env python3
"""YOLOv8n at 640×640 on the CPU: edgepack beside onnxruntime, fp32 and INT8, 1 and 2 threads (issue 32).

The 640 model is the shared DocLayNet YOLOv8n (exported at 1024) in its dynamic-axes form
(`scripts/yolo_variants.py`), its input fixed at 1×3×640×640; the INT8 file is `edgepack quantize` of it with
default settings, calibrated on the images `scripts/yolo_int8_check.py` composes from the shared data. Both
runtimes run the same files (onnxruntime its INT8 QDQ file with its own fused integer kernels), alternating for
--rounds rounds; the table gives the median of the per-round medians and the ratio edgepack/onnxruntime.

Usage: benches/peers/bench_yolo.py [--runs 10] [--rounds 5] [--md BENCHMARKS.md] [--work DIR]
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, HERE)
import bench_vs_ort  # noqa: E402
import mdtable  # noqa: E402
import yolo_int8_check  # noqa: E402
import yolo_variants  # noqa: E402

BEGIN, END = "<!-- bench-yolo:begin -->", "<!-- bench-yolo:end -->"


def model_640(shared, path):
    m = yolo_variants.make(os.path.join(shared, "models", "yolov8n-doclaynet.onnx"), None)
    yolo_variants.set_dims(m.graph.input[0], [1, 3, 640, 640])
    yolo_variants.set_dims(m.graph.output[0], [1, 15, 8400])
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=None)
    ap.add_argument("--md", help="BENCHMARKS.md to update")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="bench-yolo-")
    fp32 = os.path.join(work, "yolov8n-640.onnx")
    int8 = os.path.join(work, "yolov8n-640.int8.onnx")
    if not os.path.exists(fp32):
        model_640(a.shared, fp32)
    if not os.path.exists(int8):
        yolo_int8_check.compose(a.shared, work)
        subprocess.run([bench_vs_ort.edgepack_bin(), "quantize", fp32, "--preset", "yolo", "--calib",
                        os.path.join(work, "calib"), "--eval", os.path.join(work, "eval"), "-o", int8,
                        "--latency-runs", "0", "-q"], check=True)
    rows = []
    for prec, model in (("fp32", fp32), ("int8", int8)):
        for t in map(int, a.threads.split(",")):
            e, o = [], []
            for _ in range(a.rounds):
                e.append(bench_vs_ort.ep_bench(model, t, a.runs, a.warmup)["p50_ms"])
                o.append(bench_vs_ort.ort_bench(model, t, a.runs, a.warmup)["p50_ms"])
            em, om = statistics.median(e), statistics.median(o)
            rows.append((prec, t, em, om))
            print(f"{prec} threads={t}: edgepack {em:.1f} ms, onnxruntime {om:.1f} ms, ratio {em / om:.2f}", flush=True)
    lines = ["| YOLOv8n 640×640 | threads | edgepack p50 (ms) | onnxruntime p50 (ms) | ratio edgepack/ort |",
             "|---|---|---|---|---|"]
    lines += [f"| {p} | {t} | {em:.1f} | {om:.1f} | **{em / om:.2f}** |" for p, t, em, om in rows]
    table = "\n".join(lines)
    print(table)
    if a.md:
        cmd = f"python3 benches/peers/bench_yolo.py --runs {a.runs} --rounds {a.rounds} --md BENCHMARKS.md"
        meta = (f"Measured with `{cmd}` on {platform.machine()} ({bench_vs_ort.cpu_model()}), {os.cpu_count()} "
                f"cores, onnxruntime {ort.__version__}; median of {a.rounds} alternating rounds of {a.runs} timed "
                f"runs each (batch 1, after {a.warmup} warm-ups).")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
