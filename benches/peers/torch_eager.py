#!/usr/bin/env python3
"""PyTorch eager on CUDA, the anchor of the GPU-host table: the same ONNX file converted by onnx2torch
(`onnx2torch.convert`), channels-last, cuDNN benchmark mode, a pinned host input copied in and the output copied
back on every run, `torch.cuda.synchronize()` before the clock is read (the work `edgepack bench` times).

The model must take any batch (`edgepack rewrite MODEL OUT --free-batch`). Prints one JSON object per batch:
{"batch", "precision", "p50_ms", "throughput_per_s"}. The GPU host has no network: onnx2torch travels as a wheel
(`pip download --no-deps onnx2torch`, installed with `pip install --no-index --target`).

Usage: benches/peers/torch_eager.py MODEL [--batches 1,8,32,128] [--runs 30] [--warmup 5] [--f16]
"""
import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--f16", action="store_true", help="half precision (weights and activations)")
    a = ap.parse_args()
    import onnx
    import onnx2torch
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.backends.cudnn.benchmark = True
    m = onnx.load(a.model)
    dims = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    net = onnx2torch.convert(m).eval().cuda().to(memory_format=torch.channels_last)
    dtype = torch.float16 if a.f16 else torch.float32
    net = net.to(dtype)
    for b in (int(x) for x in a.batches.split(",")):
        x = torch.randn(b, *dims[1:], dtype=dtype).pin_memory()
        times = []
        with torch.inference_mode():
            for i in range(a.warmup + a.runs):
                t = time.perf_counter()
                y = net(x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last))
                y = (y[0] if isinstance(y, (tuple, list)) else y).cpu()
                torch.cuda.synchronize()
                if i >= a.warmup:
                    times.append((time.perf_counter() - t) * 1e3)
        p50 = statistics.median(times)
        print(json.dumps({"batch": b, "precision": "f16" if a.f16 else "f32", "p50_ms": p50,
                          "throughput_per_s": b * len(times) / (sum(times) / 1e3)}), flush=True)


if __name__ == "__main__":
    main()
