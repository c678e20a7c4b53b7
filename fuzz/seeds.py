"""Writes the seed corpus of every fuzz target into DIR/<target>/ (scripts/fuzz.sh calls it; nothing is downloaded).

Seeds come from what the engine meets for real: the shared models and the ONNX node suite (the `onnx` pip
package), bundles packed by the `edgepack` binary (plain, compressed, signed), the README's KServe requests in JSON,
binary and gRPC form, images of every colour type and JPEG mode, and numpy/IDX files of every dtype.

    python fuzz/seeds.py DIR [--edgepack BIN] [--shared ../shared]
"""

import argparse
import glob
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np


def put(d, name, data):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def onnx_seeds(out, shared):
    import onnx

    n = 0
    mnists = [os.path.join(shared, "models", f"mnist_cntk_opset{v}.onnx") for v in ("7", "8_simplified")] if shared else []
    for path in [p for p in mnists if os.path.exists(p)]:
        put(out, os.path.basename(path), open(path, "rb").read())
        n += 1
    # The node suite: one small model per operator and attribute case (a few KB each).
    suite = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")
    for model in sorted(glob.glob(os.path.join(suite, "*", "model.onnx"))):
        data = open(model, "rb").read()
        if len(data) <= 16384:
            put(out, os.path.basename(os.path.dirname(model)) + ".onnx", data)
            n += 1
    return n


def bundle_seeds(bundle_dir, manifest_dir, edgepack, shared, tmp):
    if not edgepack or not shared:
        return 0
    mnist = os.path.join(shared, "models", "mnist_cntk_opset8_simplified.onnx")
    if not os.path.exists(mnist):
        return 0
    key = os.path.join(tmp, "k")
    subprocess.run([edgepack, "keygen", "-o", key], check=True, capture_output=True)
    labels = os.path.join(tmp, "labels.txt")
    with open(labels, "w") as f:
        f.write("\n".join(str(i) for i in range(10)) + "\n")
    variants = {
        "plain": [],
        "labels": ["--labels", labels],
        "signed": ["--sign", key + ".key"],
        "compressed": ["--compress", "zstd"],
    }
    n = 0
    for name, extra in variants.items():
        out = os.path.join(tmp, name + ".edgepack")
        r = subprocess.run([edgepack, "pack", mnist, "--preset", "mnist", "-o", out, *extra], capture_output=True,
                           text=True)
        if r.returncode != 0:
            print(f"seeds: pack {name} failed: {r.stderr.strip()}", file=sys.stderr)
            continue
        data = open(out, "rb").read()
        put(bundle_dir, name + ".edgepack", data)
        # The manifest target's form: manifest JSON, NUL, the members (as they follow the manifest).
        flags, mlen = struct.unpack_from("<I", data, 12)[0], struct.unpack_from("<Q", data, 16)[0]
        start = 32 + (96 if flags & 1 else 0)
        manifest = data[start:start + mlen]
        first = min(m["offset"] for m in json.loads(manifest)["members"])
        put(manifest_dir, name + ".bin", manifest + b"\0" + data[first:])
        n += 1
    return n


def request_seeds(json_dir, bin_dir, grpc_dir):
    x = np.arange(784, dtype=np.float32) / 784
    req = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}]}
    put(json_dir, "mnist.json", json.dumps(req).encode())
    nested = {"id": "7", "parameters": {"binary_data_output": True},
              "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
                         {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                         {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
              "outputs": [{"name": "y", "parameters": {"classification": 3}}, {"name": "z"}]}
    put(json_dir, "nested.json", json.dumps(nested).encode())
    put(json_dir, "fp16.json", json.dumps({"inputs": [{"name": "h", "shape": [3], "datatype": "FP16",
                                                       "data": [1.0, -2.5, 65504]}]}).encode())
    for dt, np_dt in [("FP32", np.float32), ("UINT8", np.uint8), ("INT32", np.int32), ("FP16", np.float16)]:
        raw = np.arange(6).astype(np_dt).tobytes()
        head = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": dt,
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
        put(bin_dir, dt.lower() + ".bin", struct.pack("<H", len(head)) + head + raw)
    try:
        from tritonclient.grpc import service_pb2
    except ImportError:
        print("seeds: tritonclient.grpc is not installed: no gRPC seeds", file=sys.stderr)
        return
    r = service_pb2.ModelInferRequest(model_name="mnist", id="1")
    t = r.inputs.add(name="Input3", datatype="FP32", shape=[1, 1, 28, 28])
    r.raw_input_contents.append(x.tobytes())
    r.outputs.add(name="Plus214_Output_0")
    put(grpc_dir, "raw.pb", r.SerializeToString())
    r = service_pb2.ModelInferRequest(model_name="m")
    t = r.inputs.add(name="x", datatype="INT64", shape=[3])
    t.contents.int64_contents.extend([1, 2, 3])
    t = r.inputs.add(name="b", datatype="BOOL", shape=[2])
    t.contents.bool_contents.extend([True, False])
    o = r.outputs.add(name="y")
    o.parameters["classification"].int64_param = 2
    put(grpc_dir, "typed.pb", r.SerializeToString())


def image_seeds(out, shared):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8))
    forms = {"rgb": rgb, "gray": rgb.convert("L"), "rgba": rgb.convert("RGBA"), "la": rgb.convert("LA"),
             "palette": rgb.convert("P"), "bw": rgb.convert("1"), "gray16": rgb.convert("I;16")}
    for name, im in forms.items():
        b = io.BytesIO()
        im.save(b, "PNG")
        put(out, name + ".png", b.getvalue())
    for name, kw in {"baseline": {}, "progressive": {"progressive": True}, "q10": {"quality": 10},
                     "sub444": {"subsampling": 0}}.items():
        b = io.BytesIO()
        rgb.save(b, "JPEG", **kw)
        put(out, name + ".jpg", b.getvalue())
    b = io.BytesIO()
    rgb.convert("L").save(b, "JPEG")
    put(out, "gray.jpg", b.getvalue())
    b = io.BytesIO()
    rgb.convert("CMYK").save(b, "JPEG")
    put(out, "cmyk.jpg", b.getvalue())
    photos = os.path.join(shared, "data", "photos") if shared else ""
    for p in sorted(glob.glob(os.path.join(photos, "*")))[:2]:
        im = Image.open(p).convert("RGB")
        im.thumbnail((64, 64))
        b = io.BytesIO()
        im.save(b, "JPEG")
        put(out, os.path.basename(p) + ".jpg", b.getvalue())


def data_seeds(out):
    for dt in ["<f4", "<f2", "<f8", "<i8", "<i4", "<i2", "|i1", "|u1", "<u2", "|b1", ">f4"]:
        b = io.BytesIO()
        np.save(b, np.arange(6).astype(dt).reshape(2, 3))
        put(out, dt.replace("<", "le").replace(">", "be").replace("|", "") + ".npy", b.getvalue())
    b = io.BytesIO()
    np.save(b, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    put(out, "fortran.npy", b.getvalue())
    for name, save in [("stored.npz", np.savez), ("deflated.npz", np.savez_compressed)]:
        b = io.BytesIO()
        save(b, input=np.ones((1, 3), np.float32), state=np.zeros((2, 1, 4), np.float32), sr=np.array(16000))
        put(out, name, b.getvalue())
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", allowZip64=True) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.save(f, np.arange(4, dtype=np.float32))
    put(out, "zip64.npz", b.getvalue())
    put(out, "images.idx3", bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 3) + bytes(range(18)))
    put(out, "labels.idx1", bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + bytes([1, 2, 3, 4]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--edgepack", default=os.environ.get("EDGEPACK_BIN"))
    ap.add_argument("--shared", default=os.environ.get("EDGEPACK_SHARED"))
    a = ap.parse_args()
    d = lambda t: os.path.join(a.dir, t)  # noqa: E731
    n = onnx_seeds(d("onnx_load"), a.shared)
    onnx_seeds(d("onnx_structured"), a.shared)
    with tempfile.TemporaryDirectory() as tmp:
        nb = bundle_seeds(d("bundle_open"), d("manifest"), a.edgepack, a.shared, tmp)
    request_seeds(d("kserve_json"), d("kserve_binary"), d("grpc_infer"))
    image_seeds(d("image_preprocess"), a.shared)
    data_seeds(d("npy_npz_idx"))
    counts = {t: len(os.listdir(d(t))) for t in sorted(os.listdir(a.dir)) if os.path.isdir(d(t))}
    print(f"seeds: {n} models, {nb} bundles; per target {counts}")


if __name__ == "__main__":
    main()
