"""Real inputs for every model in shared/models, prepared exactly as shared/tools does (PIL, numpy).

Used by ort_parity.py (CPU runtime vs onnxruntime) and the Python tests. Each entry maps a model file to
{input name: numpy array}.
"""
import gzip
import json
import math
import os
import sys
import wave

import numpy as np
from PIL import Image


def shared_dir():
    d = os.environ.get("EDGEPACK_SHARED") or os.path.join(os.path.dirname(__file__), "..", "..", "shared")
    return os.path.abspath(d)


def _tools(shared):
    sys.path.insert(0, os.path.join(shared, "tools"))
    import eval_imagenet_ort  # noqa: E402  (the reference preprocessing)
    return eval_imagenet_ort


def imagenet_input(shared, path, preset):
    ev = _tools(shared)
    return ev.preprocess(path, 256, 224, **ev.PRESETS[preset])


def mnist_first(shared, n=1):
    with gzip.open(os.path.join(shared, "data/mnist/t10k-images-idx3-ubyte.gz")) as f:
        data = f.read()
    imgs = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    return imgs[:n].astype(np.float32)[:, None]


def ultraface_input(path):
    im = Image.open(path).convert("RGB")
    x = (np.asarray(im.resize((320, 240), Image.BILINEAR), np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def silero_inputs(shared):
    with wave.open(os.path.join(shared, "data/audio/silero_test_16k.wav")) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    chunk = np.concatenate([np.zeros((1, 64), np.float32), x[None, 16000:16512]], 1).astype(np.float32)
    return {"input": chunk, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def magika_input(shared):
    cfg = json.load(open(os.path.join(shared, "models/magika_standard_v3_3.config.json")))
    beg, end, pad = cfg["beg_size"], cfg["end_size"], cfg["padding_token"]
    block = cfg.get("block_size", 4096)
    data = open(os.path.join(shared, "data/photos/dog.jpg"), "rb").read()
    head = data[:block].lstrip()[:beg]
    tail = data[-block:].rstrip()[-end:]
    f = list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail)
    return np.array([f], np.int32)


def _bgr(path):
    return np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]


def ppocr_det_input(path):
    img = _bgr(path)
    h, w = img.shape[:2]
    ratio = 736.0 / min(h, w) if min(h, w) < 736 else 1.0
    rh, rw = int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)
    im = np.asarray(Image.fromarray(img[:, :, ::-1]).resize((rw, rh), Image.BILINEAR))[:, :, ::-1]
    return ((im.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def ppocr_line_input(path, H, W, min_w=None):
    img = _bgr(path)
    h, w = img.shape[:2]
    if min_w:
        W = int(H * max(min_w / H, w / h))
    rw = min(W, int(math.ceil(H * w / h)))
    im = np.asarray(Image.fromarray(img[:, :, ::-1]).resize((rw, H), Image.BILINEAR))[:, :, ::-1]
    x = np.zeros((1, 3, H, W), np.float32)
    x[0, :, :, :rw] = (im.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return x


# Every model of shared/models, in the order of the tables (the keys of all_inputs).
MODEL_FILES = [
    "efficientnet_lite0_fp32.onnx", "squeezenet1.0_fp32.onnx", "mnist_cntk_opset7.onnx",
    "mnist_cntk_opset8_simplified.onnx", "ultraface_rfb_320.onnx", "silero_vad.onnx", "silero_vad_16k_op15.onnx",
    "magika_standard_v3_3.onnx", "ppocrv4_det.onnx", "ppocrv4_rec.onnx", "ppocr_mobile_v2_cls.onnx",
]


def all_inputs(shared):
    d = os.path.join(shared, "data")
    ph = os.path.join(d, "photos")
    return {
        "efficientnet_lite0_fp32.onnx": {"input": imagenet_input(shared, os.path.join(ph, "skimage_chelsea.png"), "tf")},
        "squeezenet1.0_fp32.onnx": {"data_0": imagenet_input(shared, os.path.join(ph, "skimage_coffee.png"), "caffe_bgr")},
        "mnist_cntk_opset7.onnx": {"Input3": mnist_first(shared)},
        "mnist_cntk_opset8_simplified.onnx": {"Input3": mnist_first(shared)},
        "ultraface_rfb_320.onnx": {"input": ultraface_input(os.path.join(ph, "ultraface_crowd.jpg"))},
        "silero_vad.onnx": silero_inputs(shared),
        "silero_vad_16k_op15.onnx": silero_inputs(shared),
        "magika_standard_v3_3.onnx": {"bytes": magika_input(shared)},
        "ppocrv4_det.onnx": {"x": ppocr_det_input(os.path.join(d, "ocr/ch_en_num.jpg"))},
        "ppocrv4_rec.onnx": {"x": ppocr_line_input(os.path.join(d, "ocr/en_rec.jpg"), 48, 320, min_w=320)},
        "ppocr_mobile_v2_cls.onnx": {"x": ppocr_line_input(os.path.join(d, "ocr/text_cls.jpg"), 48, 192)},
    }
