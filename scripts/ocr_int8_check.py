#!/usr/bin/env python3
"""PP-OCRv4 after `edgepack quantize` with default settings, judged the way an app uses it, in onnxruntime.

- rec: the text of each single-line image of shared/data/ocr (greedy CTC with the model's own character list),
  fp32 against INT8: identical or not, and the characters that differ.
- det: the probability map thresholded at 0.3 (RapidOCR's threshold) on each page, then DB's box extraction (as
  PaddleOCR/RapidOCR: each connected text region, kept when its mean probability is at least 0.5 and its sides 3
  pixels or more, its box grown by area × 1.5 / perimeter): the boxes of fp32 and INT8 matched one to one at
  IoU ≥ 0.5; also the IoU of the text pixels and the number of text row bands (MODELS.md's reference figure).

Calibration and the gate use the inputs scripts/quant_all.py uses (the four OCR images as lines for rec, two pages
for det): shared/data/ocr holds four images only, so the images judged here are among the calibration inputs.
det is also quantized without the pages: 16 calibration and 16 held-out 640×640 crops of the photos and the two
single-line images (scripts/quant_gate_time.py's crops), so its pages are judged unseen.
Prints a markdown table; --md writes it into QUANTIZATION.md between the ocr-int8 markers.

Usage: scripts/ocr_int8_check.py [--md QUANTIZATION.md]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs as mi  # noqa: E402
from quant_all import calibration_samples, edgepack_bin  # noqa: E402

BEGIN, END = "<!-- ocr-int8:begin -->", "<!-- ocr-int8:end -->"


def quantize(shared, model, tmp):
    cdir = os.path.join(tmp, model + "_calib")
    os.mkdir(cdir)
    for i, feeds in enumerate(calibration_samples(shared, model)):
        np.save(os.path.join(cdir, f"{i:03d}.npy"), next(iter(feeds.values())))
    out = os.path.join(tmp, model.replace(".onnx", "_int8.onnx"))
    r = subprocess.run([edgepack_bin(), "quantize", os.path.join(shared, "models", model), "--calib", cdir,
                        "--holdout", "0", "--latency-runs", "0", "--json", "-o", out], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{model}: {r.stderr.strip()}")
    rep = json.loads(r.stdout)["report"]
    return out, rep


def quantize_without_pages(shared, tmp, n=16):
    """det calibrated and gated on crops that exclude the two pages it is judged on."""
    import quant_gate_time as qgt
    d = os.path.join(shared, "data")
    srcs = [os.path.join(d, "ocr", f) for f in ("en_rec.jpg", "text_cls.jpg")]
    srcs += [os.path.join(d, "photos", f) for f in sorted(os.listdir(os.path.join(d, "photos")))]
    cdir = os.path.join(tmp, "det_held_out_calib")
    qgt.crops(shared, *qgt.MODELS["ppocrv4_det.onnx"], 2 * n, cdir, srcs=srcs)
    out = os.path.join(tmp, "ppocrv4_det_held_out_int8.onnx")
    r = subprocess.run([edgepack_bin(), "quantize", os.path.join(shared, "models", "ppocrv4_det.onnx"), "--calib", cdir,
                        "--calib-limit", str(n), "--holdout", str(n), "--latency-runs", "0", "--json", "-o", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ppocrv4_det (without the pages): {r.stderr.strip()}")
    return out, json.loads(r.stdout)["report"]


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ctc_text(probs, chars):
    ids = probs[0].argmax(-1)
    out, prev = [], 0
    for i in ids:
        if i != prev and i != 0:
            out.append(chars[i - 1] if i - 1 < len(chars) else " ")
        prev = i
    return "".join(out)


def bands(mask):
    rows = mask.any(axis=1)
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def text_boxes(prob, thresh=0.3, box_thresh=0.5, unclip=1.5, min_side=3):
    """DB post-processing on a probability map, with axis-aligned boxes where DB fits rotated rectangles:
    [x0, y0, x1, y1] per text region (8-connected pixels over `thresh`), highest box score first."""
    mask = prob > thresh
    h, w = mask.shape
    label = np.zeros(mask.shape, np.int32)
    boxes, n = [], 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0] = n
        stack, ys, xs = [(y0, x0)], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not label[v, u]:
                        label[v, u] = n
                        stack.append((v, u))
        ys, xs = np.array(ys), np.array(xs)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        # DB's box score: the mean probability over the region's box (its rotated rectangle there), not only
        # over the pixels above the threshold.
        score = float(prob[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean())
        if min(bw, bh) < min_side or score < box_thresh:
            continue
        d = bw * bh * unclip / (2 * (bw + bh))
        boxes.append((score, [xs.min() - d, ys.min() - d, xs.max() + 1 + d, ys.max() + 1 + d]))
    return [b for _, b in sorted(boxes, key=lambda t: -t[0])]


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_boxes(ref, got, thr=0.5):
    """Greedy one-to-one matching of `ref` to `got` at IoU ≥ thr: the IoU of each match."""
    used, ious = set(), []
    for r in ref:
        best = max(((box_iou(r, g), j) for j, g in enumerate(got) if j not in used), default=(0.0, -1))
        if best[0] >= thr:
            used.add(best[1])
            ious.append(best[0])
    return ious


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=mi.shared_dir())
    ap.add_argument("--md")
    a = ap.parse_args()
    ocr = os.path.join(a.shared, "data", "ocr")
    lines = ["| model | form written (default settings) | image | fp32 | INT8 | same |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(a.shared, "models", "ppocrv4_rec.onnx")
        q, rep = quantize(a.shared, "ppocrv4_rec.onnx", tmp)
        meta = {p.key: p.value for p in onnx.load(src).metadata_props}
        chars = meta["character"].split("\n")
        form = f"{rep['method'].split(' ')[0]}, {100 * rep['size']['ratio']:.0f} % of fp32"
        s32, s8 = session(src), session(q)
        for f in ("en_rec.jpg", "text_cls.jpg"):
            x = mi.ppocr_line_input(os.path.join(ocr, f), 48, 320, min_w=320)
            t32, t8 = ctc_text(s32.run(None, {"x": x})[0], chars), ctc_text(s8.run(None, {"x": x})[0], chars)
            print(json.dumps({"rec": f, "fp32": t32, "int8": t8}, ensure_ascii=False), flush=True)
            lines.append(f"| ppocrv4_rec | {form} | {f} | {t32} | {t8} | {'yes' if t32 == t8 else 'no'} |")
        src = os.path.join(a.shared, "models", "ppocrv4_det.onnx")
        s32 = session(src)
        for label, (q, rep) in (("", quantize(a.shared, "ppocrv4_det.onnx", tmp)),
                                (", calibrated without these pages", quantize_without_pages(a.shared, tmp))):
            form = f"{rep['method'].split(' ')[0]}, {100 * rep['size']['ratio']:.0f} % of fp32{label}"
            e = rep.get("equalization")
            if e and e["used"]:
                form += ", activations equalized"
            s8 = session(q)
            for f in ("ch_en_num.jpg", "en.jpg"):
                x = mi.ppocr_det_input(os.path.join(ocr, f))
                p32, p8 = s32.run(None, {"x": x})[0][0, 0], s8.run(None, {"x": x})[0][0, 0]
                m32, m8 = p32 > 0.3, p8 > 0.3
                iou = float((m32 & m8).sum() / max((m32 | m8).sum(), 1))
                b32, b8 = text_boxes(p32), text_boxes(p8)
                ious = match_boxes(b32, b8)
                row = {"det": f, "form": form, "boxes_fp32": len(b32), "boxes_int8": len(b8), "matched": len(ious),
                       "matched_iou_mean": float(np.mean(ious)) if ious else None,
                       "matched_iou_min": float(np.min(ious)) if ious else None,
                       "bands_fp32": bands(m32), "bands_int8": bands(m8), "iou": iou}
                print(json.dumps(row), flush=True)
                same = len(ious) == len(b32) == len(b8)
                at = f", IoU {row['matched_iou_mean']:.3f} on average, {row['matched_iou_min']:.3f} at least" if ious else ""
                lines.append(f"| ppocrv4_det | {form} | {f} | {len(b32)} text boxes ({row['bands_fp32']} row bands) | "
                             f"{len(b8)} boxes, {len(ious)} matched at IoU ≥ 0.5{at}; {row['bands_int8']} bands; "
                             f"text-pixel IoU {iou:.3f} | {'same boxes' if same else 'no'} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        head = (f"`python3 scripts/ocr_int8_check.py --md {a.md}` — onnxruntime {ort.__version__} runs fp32 and the "
                "INT8 file of `edgepack quantize` (default settings; calibration and gate on the inputs of "
                "scripts/quant_all.py, which include these images: shared/data/ocr has four; the rows \"calibrated "
                "without these pages\": 16 + 16 held-out crops of shared/data/photos and the two line images).")
        mdtable.replace_between(a.md, BEGIN, END, f"{head}\n\n{table}")


if __name__ == "__main__":
    main()
