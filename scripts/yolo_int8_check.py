#!/usr/bin/env python3
"""INT8 YOLO judged by its detections (issue 32): `edgepack quantize` with default settings on the DocLayNet
YOLOv8n, then onnxruntime runs the fp32 and the INT8 files on held-out images and counts the fp32 detections the
INT8 model finds again (IoU ≥ 0.5, same class).

The images are composed from the shared data (ocr/ and photos/: 9 files) by fixed crops, scales and a grayscale
copy, so there are enough of them to calibrate on one half and judge on the other; nothing is downloaded.

    scripts/yolo_int8_check.py --edgepack target/release/edgepack --shared ../shared [--work DIR] [--size 1024]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def compose(shared, out):
    """Writes the composed images into out/calib and out/eval (alternating); returns both lists."""
    from PIL import Image, ImageOps

    srcs = [os.path.join(shared, "data", "ocr", f) for f in sorted(os.listdir(os.path.join(shared, "data", "ocr")))]
    srcs += [os.path.join(shared, "data", "photos", f)
             for f in sorted(os.listdir(os.path.join(shared, "data", "photos")))]
    made = []
    for src in srcs:
        im = Image.open(src).convert("RGB")
        w, h = im.size
        stem = os.path.splitext(os.path.basename(src))[0]
        views = {
            "full": im,
            "top": im.crop((0, 0, w, max(8, h * 2 // 3))),
            "bottom": im.crop((0, h // 3, w, h)),
            "left": im.crop((0, 0, max(8, w * 2 // 3), h)),
            "right": im.crop((w // 3, 0, w, h)),
            "half": im.resize((max(8, w // 2), max(8, h // 2)), Image.BILINEAR),
            "gray": ImageOps.grayscale(im).convert("RGB"),
            "pad": ImageOps.expand(im, border=(w // 8, h // 8), fill=(255, 255, 255)),
        }
        for k, v in views.items():
            made.append((f"{stem}_{k}.png", v))
    lists = {"calib": [], "eval": []}
    for i, (name, im) in enumerate(made):
        part = "calib" if i % 2 == 0 else "eval"
        os.makedirs(os.path.join(out, part), exist_ok=True)
        p = os.path.join(out, part, name)
        im.save(p)
        lists[part].append(p)
    return lists


def letterbox(path, size, pad=114):
    """Ultralytics' letterbox with PIL's bilinear resize (as the `yolo` preset): tensor, (r, left, top), (w, h)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    r = min(size / w, size / h)
    nw, nh = round(w * r), round(h * r)
    left, top = round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)
    canvas = np.full((size, size, 3), pad, np.uint8)
    canvas[top:top + nh, left:left + nw] = np.asarray(im.resize((nw, nh), Image.BILINEAR))
    return (canvas.astype(np.float32) / 255.0).transpose(2, 0, 1)[None], (r, left, top), (w, h)


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def nms(boxes, scores, classes, iou_thr, agnostic=False):
    """Greedy NMS, highest score first (ties by index); class-aware unless `agnostic`: the kept indices."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all((not agnostic and classes[k] != classes[i]) or iou(boxes[k], boxes[i]) <= iou_thr for k in keep):
            keep.append(i)
    return keep


def decode(head, size, image_wh, classes=None, score_thr=0.25, iou_thr=0.45):
    """Ultralytics' decoding in numpy: best class per anchor over the threshold (`classes` score rows after the
    4 box rows; default all of them), class-aware NMS, boxes through the inverse letterbox (scale_boxes: gain r,
    centred pad, as `letterbox`) and clipped to the image. Returns the detections (anchor, class, score, box) and
    the geometry (r, left, top)."""
    a = head[0]
    cls = a[4:] if classes is None else a[4:4 + classes]
    best, conf = cls.argmax(0), cls.max(0)
    idx = np.nonzero(conf > score_thr)[0]
    idx = idx[np.argsort(-conf[idx], kind="stable")]
    xyxy = [[a[0, i] - a[2, i] / 2, a[1, i] - a[3, i] / 2, a[0, i] + a[2, i] / 2, a[1, i] + a[3, i] / 2] for i in idx]
    keep = nms(xyxy, conf[idx].tolist(), best[idx].tolist(), iou_thr)
    w, h = image_wh
    r = min(size / w, size / h)
    left, top = round((size - round(w * r)) / 2 - 0.1), round((size - round(h * r)) / 2 - 0.1)
    out = []
    for k in keep:
        i, b = idx[k], xyxy[k]
        box = [min(max((b[0] - left) / r, 0), w), min(max((b[1] - top) / r, 0), h),
               min(max((b[2] - left) / r, 0), w), min(max((b[3] - top) / r, 0), h)]
        out.append({"anchor": int(i), "class": int(best[i]), "score": float(conf[i]), "box": box})
    return out, (r, left, top)


def matched(ref, got, thr=0.5):
    """Greedy one-to-one matching of the reference detections (highest score first) to same-class ones."""
    used, n = set(), 0
    for d in ref:
        cands = [(iou(d["box"], g["box"]), j) for j, g in enumerate(got) if j not in used and g["class"] == d["class"]]
        best = max(cands, default=(0.0, -1))
        if best[0] >= thr:
            used.add(best[1])
            n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edgepack", required=True)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--work", default=None, help="keep the images and models here")
    ap.add_argument("--model", default=None, help="fp32 model (default: the shared yolov8n-doclaynet.onnx)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("quantize_args", nargs="*", help="extra arguments for edgepack quantize (after --)")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    work = a.work or tempfile.mkdtemp(prefix="yolo-int8-")
    model = a.model or os.path.join(a.shared, "models", "yolov8n-doclaynet.onnx")
    lists = compose(a.shared, work)
    bundle = os.path.join(work, "fp32.edgepack")
    subprocess.run([a.edgepack, "pack", model, "--task", "detection", "-o", bundle, "-q"], check=True)
    int8 = os.path.join(work, "int8.onnx")
    cmd = [a.edgepack, "quantize", bundle, "--calib", os.path.join(work, "calib"), "--eval",
           os.path.join(work, "eval"), "-o", int8, "--latency-runs", "0", *a.quantize_args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(int8, so, providers=["CPUExecutionProvider"])
    total = found = extra = 0
    rows = []
    for p in lists["eval"]:
        x, _, wh = letterbox(p, a.size)
        ref, _ = decode(fp.run(None, {"images": x})[0], a.size, wh)
        got, _ = decode(q.run(None, {"images": x})[0], a.size, wh)
        m = matched(ref, got)
        total, found, extra = total + len(ref), found + m, extra + len(got) - m
        rows.append({"image": os.path.basename(p), "fp32": len(ref), "int8": len(got), "matched": m})
    share = found / total if total else 1.0
    res = {"eval_images": len(lists["eval"]), "calib_images": len(lists["calib"]), "fp32_detections": total,
           "matched": found, "matched_share": share, "int8_extra": extra, "per_image": rows,
           "int8_bytes": os.path.getsize(int8), "fp32_bytes": os.path.getsize(model)}
    print(f"fp32 detections on {len(lists['eval'])} held-out images: {total}; found by INT8 (IoU ≥ 0.5, same class): "
          f"{found} ({100 * share:.1f} %); INT8 detections without an fp32 match: {extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
