"""Issue 32: Ultralytics YOLO end to end. Dynamic-axes exports (symbolic input dims, anchors made with
Shape/Range/Expand, value_info traced at another shape) run on tract, the interpreter and the GPU backend with
onnxruntime's outputs at several batch sizes and input sizes; the letterbox pre-processing is PIL's resize plus
Ultralytics' padding; `pack` reads the export's metadata and the bundle gives the reference detections; the YOLO
decoding of segment and pose heads equals a numpy reference on head outputs made for the test."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ort_parity
import yolo_int8_check
import yolo_variants
from conftest import edgepack_bin, ep

YOLO = "yolov8n-doclaynet.onnx"
iou = yolo_int8_check.iou


@pytest.fixture(scope="module")
def variants(shared, tmp_path_factory):
    """The shared static export, its dynamic-axes variant with value_info traced at 1×3×320×320 (the file users
    get) and the same variant without value_info (onnxruntime runs it at any shape: the reference)."""
    d = tmp_path_factory.mktemp("yolo")
    src = os.path.join(shared, "models", YOLO)
    out = {"static": src}
    for name, trace in (("dynamic", (1, 3, 320, 320)), ("reference", None)):
        p = str(d / f"{name}.onnx")
        onnx.save(yolo_variants.make(src, trace), p)
        out[name] = p
    return out


def _ort(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def _compare(got, ref, what):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    # Boxes are in pixels (hundreds), scores in 0..1: each part within 1e-3 of its own scale.
    for rows, scale in ((slice(0, 4), max(1.0, float(np.abs(ref[:, :4]).max()))), (slice(4, None), 1.0)):
        err = float(np.abs(got[:, rows] - ref[:, rows]).max())
        assert err <= 1e-3 * scale, (what, rows, err, scale)


CPU_CASES = [(1, 320), (4, 320), (1, 640), (4, 640), (1, 1024)]


@pytest.mark.parametrize("cpu", ["tract", "interp"])
def test_dynamic_axes_exports_match_onnxruntime_on_the_cpu_backends(variants, binary, cpu):
    """The dynamic export whose traced value_info contradicts every shape but 1×3×320×320 (tract refused it:
    "Impossible to unify Sym(batch) with Val(1)"), at batch 1 and 4 and sizes 320/640/1024, and the static export,
    equal onnxruntime's outputs on both CPU backends."""
    env = {"EDGEPACK_CPU": cpu}
    rng = np.random.default_rng(3)
    for b, s in CPU_CASES:
        x = rng.random((b, 3, s, s), dtype=np.float32)
        ref = _ort(variants["reference"], x)
        r = ort_parity.edgepack_outputs(variants["dynamic"], {"images": x}, ["output0"], edgepack_bin(), threads=2,
                                        env=env)
        assert "outputs" in r, (cpu, b, s, r)
        _compare(r["outputs"]["output0"], ref, (cpu, b, s))
    x = rng.random((1, 3, 1024, 1024), dtype=np.float32)
    r = ort_parity.edgepack_outputs(variants["static"], {"images": x}, ["output0"], edgepack_bin(), threads=2, env=env)
    _compare(r["outputs"]["output0"], _ort(variants["static"], x), (cpu, "static"))


def test_dynamic_axes_export_runs_on_the_gpu_backend(variants, binary):
    """The GPU backend (lavapipe here) runs the dynamic export: its anchors (Range from the feature maps' shapes)
    are folded on the host per plan, the rest runs on the device; several batch sizes and input sizes."""
    a = json.loads(ep("devices", "--json").stdout)["gpu"]
    if "unavailable" in a:
        msg = f"SKIPPED: no GPU adapter ({a['unavailable']}); install mesa-vulkan-drivers for lavapipe"
        if os.environ.get("EDGEPACK_REQUIRE_GPU") == "1":
            pytest.fail(msg.replace("SKIPPED", "REQUIRED"))
        pytest.skip(msg)
    rng = np.random.default_rng(4)
    for b, s in [(1, 320), (2, 320), (1, 640)]:
        x = rng.random((b, 3, s, s), dtype=np.float32)
        r = ort_parity.edgepack_outputs(variants["dynamic"], {"images": x}, ["output0"], edgepack_bin(), device="gpu")
        assert "outputs" in r, (b, s, r)
        _compare(r["outputs"]["output0"], _ort(variants["reference"], x), ("gpu", b, s))


def test_letterbox_preset_is_pil_resize_plus_ultralytics_padding(shared, variants, tmp_path):
    """`--preset yolo` on a bare model: the input tensor of a PNG equals the PIL letterbox (Ultralytics' rounding,
    `yolo_int8_check.letterbox`) pixel for pixel (landscape cuts of two photos: the padding above and below)."""
    for img in ("skimage_astronaut.png", "skimage_coffee.png"):
        path = os.path.join(shared, "data", "photos", img)
        from PIL import Image

        w, h = Image.open(path).size
        # The input is symbolic: the preset's default size, 640×640; a landscape cut makes the padding.
        cut = tmp_path / f"cut_{img}"
        Image.open(path).crop((0, 0, w, max(1, h * 2 // 3))).save(cut)
        out = tmp_path / f"in_{img}"
        ep("run", variants["dynamic"], cut, "--preset", "yolo", "--raw", "--save-inputs", out)
        got = np.load(out / "input_images.npy")
        ref, _, _ = yolo_int8_check.letterbox(cut, 640)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        # Pixel for pixel (x·(1/255) and x/255 differ in the last float bit).
        assert np.array_equal(np.rint(got * 255), np.rint(ref * 255)), float(np.abs(got - ref).max())


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_bundle_gives_the_reference_detections(shared, variants, tmp_path, which):
    """`pack --task detection` reads the export's metadata (task, names, imgsz): YOLO post-processing, the 11
    DocLayNet labels, the letterbox preset at 1024; `edgepack run` on the bundle gives the reference detections of
    MODELS.md (same classes, IoU ≥ 0.9), for the static export and for its dynamic-axes variant."""
    ref = json.load(open(os.path.join(shared, "models", "reference_results", "yolov8n-doclaynet.detections.json")))
    model = variants[which]
    if which == "dynamic":
        m = onnx.load(model)  # the variant keeps the export's metadata, imgsz [1024, 1024] included
        assert any(p.key == "imgsz" for p in m.metadata_props)
    bundle = tmp_path / "doc.edgepack"
    ep("pack", model, "--task", "detection", "--class-agnostic", "-o", bundle)
    manifest = json.loads(ep("inspect", bundle, "--json").stdout)["bundle"]["manifest"]
    assert manifest["postprocess"]["kind"] == "yolo" and manifest["postprocess"]["classes"] == 11, manifest
    assert manifest["preprocess"]["resize"] == {"mode": "letterbox", "width": 1024, "height": 1024, "pad": 114,
                                                "anchor": "center"}, manifest["preprocess"]
    for img, want in ref["detections"].items():
        doc = json.loads(ep("run", bundle, os.path.join(shared, "data", "ocr", img), "--json").stdout)
        got = doc["results"][0]["detections"]
        assert len(got) == len(want), (img, got, want)
        for w in want:
            best = max(got, key=lambda g: iou([g["x1"], g["y1"], g["x2"], g["y2"]], w["box_xyxy_image_px"]))
            overlap = iou([best["x1"], best["y1"], best["x2"], best["y2"]], w["box_xyxy_image_px"])
            assert best["label"] == w["class"] and overlap >= 0.9, (img, w, best, overlap)
            assert abs(best["score"] - w["score"]) < 0.02, (img, w, best)


def test_batch_and_serve_detect_give_the_run_detections(shared, tmp_path):
    """`edgepack batch` over a folder and `edgepack serve`'s `POST /v1/models/{m}:detect` with the raw JPEG give
    the detections `edgepack run` gives on the same bundle."""
    import shutil

    from test_serve import Server

    bundle = tmp_path / "repo" / "doc" / "1" / "model.edgepack"
    bundle.parent.mkdir(parents=True)
    ep("pack", os.path.join(shared, "models", YOLO), "--task", "detection", "--class-agnostic", "-o", bundle)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for f in ("en.jpg", "ch_en_num.jpg"):
        shutil.copy(os.path.join(shared, "data", "ocr", f), imgs / f)
    want = {f: json.loads(ep("run", bundle, imgs / f, "--json").stdout)["results"][0]["detections"]
            for f in ("en.jpg", "ch_en_num.jpg")}
    out = tmp_path / "out.jsonl"
    ep("batch", bundle, imgs, "-o", out)
    got = {x["file"]: x["detections"] for x in map(json.loads, open(out))}
    assert got == want, (got, want)
    server = Server(tmp_path / "repo", "--device", "cpu")
    try:
        status, body, _ = server.request("POST", "/v1/models/doc:detect", (imgs / "en.jpg").read_bytes(),
                                         {"Content-Type": "image/jpeg"})
        assert status == 200, body
        dets = json.loads(body)["detections"]
        assert [d["label"] for d in dets] == [d["label"] for d in want["en.jpg"]], (dets, want["en.jpg"])
        for a, b in zip(dets, want["en.jpg"]):
            assert all(abs(a[k] - b[k]) < 1e-3 for k in ("x1", "y1", "x2", "y2", "score")), (a, b)
    finally:
        assert server.stop() == 0, "".join(server.log[-20:])


# --- segment and pose decoding against numpy -----------------------------------------------------------------


def constant_head_model(path, outputs, size):
    """A model taking `images [1,3,size,size]` whose outputs are the given arrays (tied to the input by adding
    0·mean(images), so nothing is folded away)."""
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    outs = []
    for name, arr in outputs.items():
        inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}_c"))
        nodes.append(helper.make_node("Add", [f"{name}_c", "z"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                        [1, 3, size, size])], outs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


def make_head(rng, n, classes, extra, size, transposed=False):
    """Head outputs [1, 4+classes+extra, n]: boxes spread over the frame, a few confident anchors (some
    overlapping, so NMS has work), the rest under the threshold."""
    cx, cy = rng.uniform(40, size - 40, n), rng.uniform(40, size - 40, n)
    w, h = rng.uniform(20, 120, n), rng.uniform(20, 120, n)
    scores = rng.uniform(0, 0.2, (classes, n))
    hot = rng.choice(n, 12, replace=False)
    scores[rng.integers(0, classes, 12), hot] = rng.uniform(0.4, 0.95, 12)
    # Duplicates of the first three hot anchors, shifted a little: suppressed by NMS.
    for k in range(3):
        j = hot[-1 - k]
        cx[j], cy[j], w[j], h[j] = cx[hot[k]] + 3, cy[hot[k]] - 2, w[hot[k]], h[hot[k]]
        scores[:, j] = 0
        scores[np.argmax(scores[:, hot[k]]), j] = scores[:, hot[k]].max() - 0.05
    head = np.concatenate([np.stack([cx, cy, w, h]), scores, extra], 0)[None]
    return head.transpose(0, 2, 1) if transposed else head


def mask_reference(coeffs, protos, box, geo, size):
    """The mask of one detection in image pixels: logits Σ coeff·proto sampled bilinearly (edges clamped) at each
    pixel centre of the box (mapped into the model input, then the prototype grid), on where positive."""
    r, left, top = geo
    m, mh, mw = protos.shape
    logit = np.tensordot(coeffs, protos, 1)
    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    cx, cy = xs + 0.5, ys + 0.5
    inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
    pu = np.clip((cx * r + left) * mw / size - 0.5, 0, mw - 1)
    pv = np.clip((cy * r + top) * mh / size - 0.5, 0, mh - 1)
    u0, v0 = np.floor(pu).astype(int), np.floor(pv).astype(int)
    u1, v1 = np.minimum(u0 + 1, mw - 1), np.minimum(v0 + 1, mh - 1)
    fu, fv = pu - u0, pv - v0
    val = ((logit[v0, u0] * (1 - fu) + logit[v0, u1] * fu) * (1 - fv)
           + (logit[v1, u0] * (1 - fu) + logit[v1, u1] * fu) * fv)
    return inside & (val > 0), (x0, y0)


def rle_decode(m):
    bits = np.zeros(sum(m["rle"]), bool)
    at = 0
    for k, n in enumerate(m["rle"]):
        bits[at:at + n] = k % 2 == 1
        at += n
    return bits.reshape(m["height"], m["width"])


def _image(tmp_path, w, h):
    from PIL import Image

    p = tmp_path / f"img_{w}x{h}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    return p


@pytest.mark.parametrize("transposed", [False, True])
def test_segment_decoding_equals_the_numpy_reference(binary, tmp_path, transposed):
    """A segment head (3 classes, 32 mask coefficients, prototypes 32×80×80 for a 320 input) made for the test:
    the detections, their boxes in image pixels and their masks (run-length encoded over the box) equal the numpy
    reference; the head is read in either layout ([1, A, N] or [1, N, A])."""
    rng = np.random.default_rng(7)
    size, classes, n = 320, 3, 400
    coeffs = rng.normal(0, 1, (32, n))
    head = make_head(rng, n, classes, coeffs, size, transposed)
    protos = rng.normal(0, 1, (1, 32, 80, 80))
    model = tmp_path / "seg.onnx"
    constant_head_model(model, {"output0": head, "output1": protos}, size)
    post = {"kind": "yolo", "classes": classes, "task": {"type": "segment"}}
    bundle = tmp_path / "seg.edgepack"
    ep("pack", model, "--task", "detection", "--preset", "yolo", "--postprocess-json", json.dumps(post), "-o", bundle)
    img = _image(tmp_path, 500, 300)
    got = json.loads(ep("run", bundle, img, "--json").stdout)["results"][0]["detections"]
    chw = head[0].T if transposed else head[0]
    want, geo = yolo_int8_check.decode(chw[None].astype(np.float32), size, (500, 300), classes)
    assert len(got) == len(want) and len(want) >= 8, (len(got), len(want))
    for g, w in zip(got, want):
        assert g["class_index"] == w["class"] and abs(g["score"] - w["score"]) < 1e-5, (g, w)
        assert np.allclose([g["x1"], g["y1"], g["x2"], g["y2"]], w["box"], atol=1e-2), (g, w)
        ref_mask, (x0, y0) = mask_reference(chw[4 + classes:, w["anchor"]].astype(np.float32),
                                            protos[0].astype(np.float32), w["box"], geo, size)
        m = g["mask"]
        assert (m["x"], m["y"]) == (x0, y0) and (m["height"], m["width"]) == ref_mask.shape, (m, ref_mask.shape)
        mine = rle_decode(m)
        assert ref_mask.any() and (~ref_mask).any()
        # Pixels whose logit is within float rounding of 0 may differ.
        assert (mine != ref_mask).mean() < 0.002, (mine != ref_mask).mean()


def test_pose_decoding_equals_the_numpy_reference(binary, tmp_path):
    """A pose head (1 class, 17 keypoints × (x, y, score)) made for the test: boxes and keypoints in image pixels
    equal the numpy reference (keypoints through the same inverse letterbox as the boxes)."""
    rng = np.random.default_rng(8)
    size, n, k = 320, 300, 17
    kp = np.concatenate([np.stack([rng.uniform(0, size, n), rng.uniform(0, size, n), rng.uniform(0, 1, n)])
                         for _ in range(k)], 0)
    head = make_head(rng, n, 1, kp, size)
    model = tmp_path / "pose.onnx"
    constant_head_model(model, {"output0": head}, size)
    post = {"kind": "yolo", "classes": 1, "task": {"type": "pose", "keypoints": k}}
    bundle = tmp_path / "pose.edgepack"
    ep("pack", model, "--task", "detection", "--preset", "yolo", "--postprocess-json", json.dumps(post), "-o", bundle)
    img = _image(tmp_path, 240, 400)
    got = json.loads(ep("run", bundle, img, "--json").stdout)["results"][0]["detections"]
    want, (r, left, top) = yolo_int8_check.decode(head.astype(np.float32), size, (240, 400), 1)
    assert len(got) == len(want) and len(want) >= 5, (len(got), len(want))
    for g, w in zip(got, want):
        assert np.allclose([g["x1"], g["y1"], g["x2"], g["y2"]], w["box"], atol=1e-2), (g, w)
        col = head[0, 5:, w["anchor"]].reshape(k, 3)
        ref = np.stack([(col[:, 0] - left) / r, (col[:, 1] - top) / r, col[:, 2]], 1)
        mine = np.array([[p["x"], p["y"], p["score"]] for p in g["keypoints"]])
        assert np.allclose(mine, ref, atol=1e-2), (mine[:3], ref[:3])


def test_int8_keeps_the_fp32_detections(shared, binary, tmp_path):
    """Issue 32: INT8 by `edgepack quantize` with default settings finds ≥ 95 % of the fp32 detections again (IoU ≥
    0.5, same class), onnxruntime running both files on held-out images composed from the shared data. The
    defaults that make it: the quantizer's gate for a YOLO detector counts detections (`detections=97` on the
    choosing half), the decode after the head's last convolutions stays fp32 (its output Concat joins pixel
    coordinates and 0..1 scores), and SiLU's Sigmoid reads the dequantized value like its Mul."""
    out = tmp_path / "res.json"
    yolo_int8_check.main(["--edgepack", edgepack_bin(), "--shared", shared, "--work", str(tmp_path / "w"),
                          "--json", str(out)])
    r = json.load(open(out))
    print(f"\nYOLOv8n INT8: {r['matched']} of {r['fp32_detections']} fp32 detections found "
          f"({100 * r['matched_share']:.1f} %), {r['int8_extra']} extra; INT8 file {r['int8_bytes']} bytes")
    assert r["fp32_detections"] >= 30, r
    assert r["matched_share"] >= 0.95, r
    report = json.load(open(tmp_path / "w" / "int8.onnx.report.json"))
    assert "detections" in json.dumps(report["budget"]), report["budget"]
