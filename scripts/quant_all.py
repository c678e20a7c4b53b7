#!/usr/bin/env python3
"""`edgepack quantize` on every model in shared/models: it quantizes what it can and says per node why not.

For each model a few real inputs (prepared as shared/tools does, see model_inputs.py) are written as .npy
calibration samples; `edgepack quantize` runs on them; onnxruntime then loads the INT8 file and runs it on the
parity input, and its outputs are compared with the fp32 model's (SQNR over all outputs). Models edgepack refuses
are listed with its error message (exit code 4 = bad input, 5 = unsupported).

Usage: scripts/quant_all.py [--md QUANTIZATION.md] [--only NAME,...]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
import mdtable  # noqa: E402
import model_inputs as mi  # noqa: E402

ort.set_default_logger_severity(3)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BEGIN, END = "<!-- quant-all:begin -->", "<!-- quant-all:end -->"


def edgepack_bin():
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("EDGEPACK_BIN") or os.path.join(tgt, "release", "edgepack")


def magika_features(shared, path):
    cfg = json.load(open(os.path.join(shared, "models/magika_standard_v3_3.config.json")))
    beg, end, pad = cfg["beg_size"], cfg["end_size"], cfg["padding_token"]
    block = cfg.get("block_size", 4096)
    data = open(path, "rb").read()
    head, tail = data[:block].lstrip()[:beg], data[-block:].rstrip()[-end:]
    return np.array([list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail)], np.int32)


def calibration_samples(shared, model):
    """A few real inputs per model: {input name: array} each."""
    d = os.path.join(shared, "data")
    inet = [os.path.join(d, "imagenet_sample", "images", f) for f in sorted(os.listdir(os.path.join(d, "imagenet_sample", "images")))[:8]]
    photos = [os.path.join(d, "photos", f) for f in sorted(os.listdir(os.path.join(d, "photos")))]
    ocr = [os.path.join(d, "ocr", f) for f in sorted(os.listdir(os.path.join(d, "ocr")))]
    if model.startswith("efficientnet"):
        return [{"input": mi.imagenet_input(shared, p, "tf")} for p in inet]
    if model.startswith("squeezenet"):
        return [{"data_0": mi.imagenet_input(shared, p, "caffe_bgr")} for p in inet]
    if model.startswith("mnist"):
        return [{"Input3": x[None]} for x in mi.mnist_first(shared, 16)]
    if model.startswith("ultraface"):
        return [{"input": mi.ultraface_input(p)} for p in photos + inet[:3]]
    if model.startswith("magika"):
        files = photos + ocr + [os.path.join(d, "audio", "silero_test_16k.wav"), os.path.join(d, "DATA.md"),
                                os.path.join(shared, "models", "MODELS.md"), os.path.join(shared, "tools", "smoke_models_ort.py")]
        return [{"bytes": magika_features(shared, p)} for p in files]
    if model == "ppocrv4_det.onnx":
        return [{"x": mi.ppocr_det_input(p)} for p in ocr[:2]]
    if model == "ppocrv4_rec.onnx":
        return [{"x": mi.ppocr_line_input(p, 48, 320, min_w=320)} for p in ocr]
    if model == "ppocr_mobile_v2_cls.onnx":
        return [{"x": mi.ppocr_line_input(p, 48, 192)} for p in ocr]
    if model.startswith("silero"):
        return silero_sequence(shared)
    return None  # no recipe yet: the table says so


SILERO_CALIB_CHUNKS = 48


def silero_sequence(shared, chunks=SILERO_CALIB_CHUNKS, held_out=False):
    """Consecutive 512-sample chunks of the test recording, each with the 64 samples before it as context, as the
    VAD runs on a stream; no `state`: edgepack carries it from one sample to the next (stateN → state). The first
    `chunks` calibrate; `held_out` gives the rest of the recording instead (never seen by the quantizer)."""
    import wave
    with wave.open(os.path.join(shared, "data", "audio", "silero_test_16k.wav")) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    x = np.concatenate([np.zeros(64, np.float32), x])
    n = (len(x) - 64) // 512
    which = range(chunks, n) if held_out else range(chunks)
    return [{"input": x[None, i * 512:i * 512 + 576].copy(), "sr": np.array(16000, np.int64)} for i in which]


def silero_stream_cosine(src, out, shared, held_out=False):
    """fp32 and INT8 run by onnxruntime over the same chunk sequence, each feeding its own state back (from zero
    state at the sequence's first chunk)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    probs = []
    for path in (src, out):
        s, state, ps = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), np.zeros((2, 1, 128), np.float32), []
        for f in silero_sequence(shared, held_out=held_out):
            p, state = s.run(None, {**f, "state": state})
            ps.append(float(np.asarray(p).ravel()[0]))
        probs.append(np.array(ps, np.float64))
    a, b = probs
    # (The app's reading: speech where the probability passes 0.5.)
    agree = 100.0 * float(np.mean((a > 0.5) == (b > 0.5)))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.abs(a - b).max()), agree


def sqnr(ref, got):
    s = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
    e = sum(float(((r.astype(np.float64) - g) ** 2).sum()) for r, g in zip(ref, got))
    return float("inf") if e == 0 else 10 * np.log10(s / e)


def cosine(ref, got):
    a = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
    b = np.concatenate([np.asarray(g, np.float64).ravel() for g in got])
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0


def ort_quantize(src, samples, out, tmp, model):
    """onnxruntime's own static quantizer on the same calibration samples (QDQ, per-channel int8 weights, uint8
    activations, MinMax: its defaults with per-channel on, as scripts/quant_accuracy.py), for the comparison column.
    Recurrent state is fed as the fp32 model computes it over the sequence (its reader has no state carry)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    if max(o.version for o in onnx.load(src, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")) < 13:
        up = os.path.join(tmp, model.replace(".onnx", "_op13.onnx"))
        subprocess.run([edgepack_bin(), "rewrite", src, up, "--opset", "13"], check=True, capture_output=True)
        src = up
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = [dict(f) for f in samples]
    if "state" in names and not any("state" in f for f in feeds):
        state = np.zeros((2, 1, 128), np.float32)
        for f in feeds:
            f["state"] = state
            state = sess.run(None, f)[1]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def run_one(shared, model, tmp):
    src = os.path.join(shared, "models", model)
    cdir = os.path.join(tmp, model + "_calib")
    os.mkdir(cdir)
    samples = calibration_samples(shared, model)
    if samples is None:
        return {"model": model, "rc": None, "error": "not run: scripts/quant_all.py has no calibration inputs for it"}
    for i, feeds in enumerate(samples):
        # One input: one .npy per sample; several: one .npz per sample, an array per input name.
        if len(feeds) > 1:
            np.savez(os.path.join(cdir, f"{i:03d}.npz"), **feeds)
        else:
            np.save(os.path.join(cdir, f"{i:03d}.npy"), next(iter(feeds.values())))
    out = os.path.join(tmp, model.replace(".onnx", "_int8.onnx"))
    cmd = [edgepack_bin(), "quantize", src, "--calib", cdir, "--holdout", "0", "--latency-runs", "0",
           "--layer-samples", "2", "--threads", "2", "-o", out, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    res = {"model": model, "rc": r.returncode}
    if r.returncode != 0:
        res["error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        return res
    rep = json.loads(r.stdout)["report"]
    layers = rep["layers"]
    res.update({
        "int8_layers": sum(l["precision"] == "int8" for l in layers),
        "layers": len(layers),
        "float_ops": rep["float_ops"],
        "float_layers": {l["node"]: l["reason"] for l in layers if l["precision"] == "fp32"},
        "edgepack_sqnr": rep["int8"]["output_sqnr_db"],
        "gate": rep["budget"] and {k: rep["budget"][k] for k in ("text", "met", "reached")},
        "method": rep["method"],
        "folded_bn": len(rep["preparation"]["folded_batchnorm"]),
        "equalized": (rep.get("equalization") or {}).get("used") and rep["equalization"]["groups"],
        "size": rep["size"]["ratio"],
    })
    feeds = mi.all_inputs(shared)[model]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = None
    try:
        ref = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(out, so, providers=["CPUExecutionProvider"]).run(None, feeds)
        res["ort_sqnr"] = sqnr(ref, got)
        res["ort_cosine"] = cosine(ref, got)
        if model.startswith("silero"):
            res["stream"] = silero_stream_cosine(src, out, shared)
            res["stream_held_out"] = silero_stream_cosine(src, out, shared, held_out=True)
    except Exception as e:  # noqa: BLE001 (reported in the table)
        res["ort_error"] = f"{type(e).__name__}: {e}"[:200]
    theirs = os.path.join(tmp, model.replace(".onnx", "_ort_int8.onnx"))
    try:
        if ref is None:
            raise RuntimeError("onnxruntime cannot run the fp32 model")
        ort_quantize(src, samples, theirs, tmp, model)
        got = ort.InferenceSession(theirs, so, providers=["CPUExecutionProvider"]).run(None, feeds)
        res["ortq_cosine"] = cosine(ref, got)
        res["ortq_size"] = os.path.getsize(theirs) / os.path.getsize(src)
        if model.startswith("silero"):
            res["ortq_stream"] = silero_stream_cosine(src, theirs, shared)
            res["ortq_stream_held_out"] = silero_stream_cosine(src, theirs, shared, held_out=True)
    except Exception as e:  # noqa: BLE001 (reported in the table)
        res["ortq_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:160]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=mi.shared_dir())
    ap.add_argument("--only")
    ap.add_argument("--md")
    a = ap.parse_args()
    models = sorted(f for f in os.listdir(os.path.join(a.shared, "models")) if f.endswith(".onnx"))
    if a.only:
        models = [m for m in models if any(m.startswith(o) for o in a.only.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            res = run_one(a.shared, m, tmp)
            print(json.dumps(res), flush=True)
            rows.append(res)
    lines = ["| model | result | int8 layers | kept fp32 (why) | default gate (on calibration inputs) | output SQNR, edgepack runtime (calibration inputs) | onnxruntime runs the INT8 file: output SQNR / cosine vs fp32 | onnxruntime's quantize_static on the same samples: cosine vs fp32 (size) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"] is None:
            lines.append(f"| {r['model']} | {r['error']} | - | - | - | - | - | - |")
            continue
        if r["rc"] != 0:
            lines.append(f"| {r['model']} | refused (exit {r['rc']}): {r['error'].replace('|', '/')} | - | - | - | - | - | - |")
            continue
        why = {**r["float_layers"], **r["float_ops"]}
        reasons = {}
        for node, reason in why.items():
            # "kept fp32 by the budget search (sensitivity rank 7 of 269)": one group for the search's layers.
            reasons.setdefault(re.sub(r" \(sensitivity rank .*\)$", "", reason or "?"), []).append(node)
        kept = "; ".join(f"{len(v)} × {k}" for k, v in reasons.items()) or "none"
        ort_col = f"{r['ort_sqnr']:.1f} dB / {r['ort_cosine']:.4f}" if "ort_sqnr" in r else f"fails: {r['ort_error']}"
        if "stream" in r:
            held = len(silero_sequence(a.shared, held_out=True))
            ort_col += (f"; over the {len(silero_sequence(a.shared))} calibration chunks streamed, own state fed back: speech "
                        f"probability cosine {r['stream'][0]:.4f}, max difference {r['stream'][1]:.3f}; over the {held} "
                        f"held-out chunks after them: cosine {r['stream_held_out'][0]:.4f}, max difference "
                        f"{r['stream_held_out'][1]:.3f}, speech/no-speech (p > 0.5) the same on "
                        f"{r['stream_held_out'][2]:.1f} % of chunks")
        g = r["gate"]
        gate = "-" if not g else f"{'met' if g['met'] else 'not met'} ({g['reached']:.1f})"
        es = "exact" if r["edgepack_sqnr"] is None else f"{r['edgepack_sqnr']:.1f} dB"
        bn = f", {r['folded_bn']} BatchNorm folded" if r["folded_bn"] else ""
        if r.get("method", "").startswith("dynamic"):
            bn += ", dynamic: chosen by --mode auto"
        if r.get("equalized"):
            bn += f", activations equalized ({r['equalized']} channel groups)"
        if "ortq_cosine" in r:
            theirs = f"{r['ortq_cosine']:.4f} ({100 * r['ortq_size']:.0f} %)"
            if "ortq_stream" in r:
                theirs += (f"; streamed: cosine {r['ortq_stream'][0]:.4f}, max difference {r['ortq_stream'][1]:.3f}; "
                           f"held out: cosine {r['ortq_stream_held_out'][0]:.4f}, max difference "
                           f"{r['ortq_stream_held_out'][1]:.3f}, same decision on {r['ortq_stream_held_out'][2]:.1f} %")
        else:
            theirs = f"fails: {r.get('ortq_error', '?').replace('|', '/')}"
        lines.append(f"| {r['model']} | quantized ({100 * r['size']:.0f} % of fp32{bn}) | {r['int8_layers']} of {r['layers']} | {kept} | {gate} | {es} | {ort_col} | {theirs} |")
    table = "\n".join(lines)
    print(table)
    if a.md:
        meta = (f"`python3 scripts/quant_all.py --md {a.md}` — onnxruntime {ort.__version__}; default settings (the "
                "default gate, `--method auto`); calibration on a few real inputs per model (scripts/quant_all.py says which), "
                "which also serve as the gate's held-out samples (no others: optimistic, the report warns); SQNR and "
                "cosine over all outputs against fp32 on the parity input.")
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
