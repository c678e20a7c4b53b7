#!/usr/bin/env python3
"""Weight grids compared layer by layer at equal weight SQNR (issue 29 item 5): int4 blocks (`--weight-only 4`,
blocks of up to 32 with a float16 scale each, the clipping of least squared error) against the coded grid
(`--weight-only N --weight-grid coded`: int8 storage of a per-channel step proportional to the channel's RMS). For
each Conv/Gemm weight (depthwise convolutions excluded, as both modes keep them int8) the coded step is bisected
until its weight SQNR equals the int4 blocks', and its cost is the zstd (level 1, the packager's) size of its int8
codes plus a float32 scale per channel. No data, no model run: weights only.

Usage: scripts/weight_grids.py [MODEL.onnx]   (default: shared/models/efficientnet_lite0_fp32.onnx)
"""
import os
import sys

import numpy as np
import onnx
import zstandard
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared")


def int4_blocks(w, group=32):
    """edgepack's int4 blocks (quantize/src/weight_only.rs `quantize_blocks`): (dequantized weight, bits per weight)."""
    rows = w.reshape(w.shape[0], -1)
    b = next((g for g in range(group, (group + 1) // 2 - 1, -1) if rows.shape[1] % g == 0), None)
    if b is None:
        return None
    blocks = rows.reshape(-1, b)
    m = np.abs(blocks).max(1, keepdims=True)
    m[m == 0] = 1
    best, err = np.zeros_like(blocks), np.full((blocks.shape[0], 1), np.inf)
    for k in range(9):
        s = np.maximum((m * (1 - 0.05 * k) / 7).astype(np.float16).astype(np.float32), np.float32(6e-8))
        q = np.clip(np.round(blocks / s), -8, 7) * s
        e = ((blocks - q) ** 2).sum(1, keepdims=True)
        best, err = np.where(e < err, q, best), np.minimum(e, err)
    return best.reshape(w.shape), 4 + 16 / b


def coded_at(w, target_db):
    """The coded grid at the weight SQNR `target_db`: (bits per weight after zstd, codes' entropy)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    rms = np.sqrt((rows ** 2).mean(1, keepdims=True))
    rms[rms == 0] = 1
    power = (rows ** 2).sum()
    lo, hi = -12.0, 4.0
    for _ in range(40):
        a = 2 ** ((lo + hi) / 2)
        q = np.clip(np.round(rows / (a * rms)), -127, 127)
        if 10 * np.log10(power / ((rows - q * a * rms) ** 2).sum()) > target_db:
            lo = (lo + hi) / 2
        else:
            hi = (lo + hi) / 2
    q = np.clip(np.round(rows / (2 ** lo * rms)), -127, 127).astype(np.int8)
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    z = len(zstandard.ZstdCompressor(level=1).compress(q.tobytes())) * 8
    return (z + 32 * rows.shape[0]) / q.size, float(-(p * np.log2(p)).sum())


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(SHARED, "models", "efficientnet_lite0_fp32.onnx")
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    print(f"# {os.path.basename(path)}: int4 blocks against the coded grid at the same weight SQNR\n")
    print("| layer | weights | int4 SQNR | int4 bits | coded bits (zstd) | coded entropy |")
    print("|---|---:|---:|---:|---:|---:|")
    tot = np.zeros(3)
    for n in m.graph.node:
        grouped = any(a.name == "group" and a.i > 1 for a in n.attribute)
        if n.op_type not in ("Conv", "Gemm") or grouped or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = inits[n.input[1]].astype(np.float32)
        r = int4_blocks(w)
        if r is None:
            continue
        dq, bits = r
        db = 10 * np.log10((w.astype(np.float64) ** 2).sum() / ((w - dq).astype(np.float64) ** 2).sum())
        zbits, h = coded_at(w, db)
        print(f"| {n.name} | {w.size} | {db:.1f} dB | {bits:.2f} | {zbits:.2f} | {h:.2f} |")
        tot += np.array([w.size, bits * w.size, zbits * w.size])
    print(f"\nall {int(tot[0])} weights: int4 blocks {tot[1] / tot[0]:.2f} bits per weight, the coded grid "
          f"{tot[2] / tot[0]:.2f} at the same SQNR per layer ({100 * (1 - tot[2] / tot[1]):.0f} % fewer bits)")


if __name__ == "__main__":
    main()
