"""`edgepack prune` end to end on the real SqueezeNet and ImageNet-sample images: the pruned files load in
onnxruntime and give edgepack's outputs, weights really shrink (structured) or zero out (unstructured), a zstd
bundle of a sparse model is smaller and verifies, the plan meets its budget, bad arguments are refused.
The accuracy curves and budgets on 500 images are PRUNING.md's (scripts/pruning.py)."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import ep
from test_gpu import gpu  # noqa: F401  (fixture: the adapter, or a loud skip / CI failure)


@pytest.fixture(scope="module")
def setup(shared, binary, tmp_path_factory):
    d = tmp_path_factory.mktemp("prune")
    return {
        "dir": d,
        "model": os.path.join(shared, "models", "squeezenet1.0_fp32.onnx"),
        "data": os.path.join(shared, "data", "imagenet_sample"),
        "images": [os.path.join(shared, "data", "imagenet_sample", "images", f) for f in
                   sorted(os.listdir(os.path.join(shared, "data", "imagenet_sample", "images")))[::125][:8]],
    }


def prune(s, out, *extra):
    ep("prune", s["model"], "--calib", s["data"], "--preset", "caffe_bgr", "--shuffle", "--calib-limit", 16,
       "--holdout", 24, "--latency-runs", 3, "-o", out, *extra)
    return json.load(open(str(out) + ".prune.json"))


def outputs(s, model, device, tmp):
    ep("run", model, *s["images"], "--preset", "caffe_bgr", "--raw", "--device", device, "--save-inputs",
       tmp / "in", "--output-dir", tmp / device)
    x = np.load(tmp / "in" / os.listdir(tmp / "in")[0])
    y = np.load(tmp / device / os.listdir(tmp / device)[0]).reshape(len(x), -1)
    return x, y


def ort_outputs(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0].reshape(1, -1) for i in range(len(x))])


def test_structured_pruning_shrinks_the_graph_and_matches_onnxruntime(setup, tmp_path):
    out = setup["dir"] / "structured.onnx"
    r = prune(setup, out, "--method", "structured", "--amount", "0.1", "--curve", "0.05,0.1")
    assert r["compute"]["macs_ratio"] < 0.97 and r["compute"]["pruned_weights"] < r["compute"]["fp32_weights"]
    assert len(r["curve"]) == 2 and all(p["metrics"]["samples"] == 24 for p in r["curve"])
    assert r["latency"]["runs"] == 3 and r["latency"]["fp32_ms"] > 0
    assert any(g["kept"] < g["channels"] for g in r["groups"])
    # conv10's channels are the classes (→ GlobalAveragePool → Softmax → output): never pruned, with the reason.
    conv10 = next(g for g in r["groups"] if g["name"].endswith("conv10_1"))
    assert conv10["blocked"] and conv10["kept"] == conv10["channels"] == 1000, conv10
    html = open(str(out) + ".prune.html").read()
    assert "<svg" in html and "Channel groups" in html
    m = onnx.load(out)
    onnx.checker.check_model(m)
    x, cpu = outputs(setup, out, "cpu", tmp_path)
    ref = ort_outputs(out, x)
    np.testing.assert_allclose(cpu, ref, atol=1e-4)
    assert (cpu.argmax(1) == ref.argmax(1)).all()


def test_structured_pruning_runs_on_the_gpu_backend(setup, gpu, tmp_path):  # noqa: F811
    out = setup["dir"] / "structured_gpu.onnx"
    prune(setup, out, "--method", "structured", "--amount", "0.1")
    x, cpu = outputs(setup, out, "cpu", tmp_path)
    _, g = outputs(setup, out, "gpu", tmp_path)
    assert (g.argmax(1) == cpu.argmax(1)).all()
    np.testing.assert_allclose(g, cpu, atol=1e-3)


def test_unstructured_pruning_zeroes_weights_and_a_zstd_bundle_is_smaller(setup, tmp_path):
    out = setup["dir"] / "sparse.onnx"
    r = prune(setup, out, "--method", "unstructured", "--amount", "0.6")
    assert abs(r["compute"]["sparsity"] - 0.6) < 0.01
    assert r["compute"]["macs_ratio"] == 1.0
    assert r["size"]["pruned_zstd_bytes"] < 0.75 * r["size"]["fp32_zstd_bytes"]
    plain, packed = tmp_path / "plain.edgepack", tmp_path / "zstd.edgepack"
    ep("pack", out, "-o", plain, "--preset", "caffe_bgr", "--main", "pruned:fp32")
    ep("pack", out, "-o", packed, "--preset", "caffe_bgr", "--main", "pruned:fp32", "--compress", "zstd")
    assert os.path.getsize(packed) < 0.75 * os.path.getsize(plain)
    ep("verify", packed)
    info = json.loads(ep("inspect", packed, "--json").stdout)
    mem = next(m for m in info["bundle"]["manifest"]["members"] if m["path"] == "models/pruned.onnx")
    assert mem["encoding"]["codec"] == "zstd" and info["bundle"]["manifest"]["format_version"] == 2
    # The bundle runs to the same outputs as the file, which onnxruntime agrees with.
    x, a = outputs(setup, out, "cpu", tmp_path / "a")
    _, b = outputs(setup, packed, "cpu", tmp_path / "b")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ort_outputs(out, x), atol=1e-4)
    # A flipped byte inside the compressed model member: refused as tampered (exit 3).
    raw = bytearray(open(packed, "rb").read())
    raw[mem["offset"] + mem["size"] // 2] ^= 0x20
    bad = tmp_path / "bad.edgepack"
    bad.write_bytes(bytes(raw))
    r = ep("run", bad, setup["images"][0], check=False)
    assert r.returncode == 3 and "tampered" in r.stderr, r.stderr


def test_plan_meets_its_budget(setup):
    out = setup["dir"] / "planned.onnx"
    r = prune(setup, out, "--method", "structured", "--budget", "agreement=90", "--levels", "0.25,0.5",
              "--sensitivity-samples", 4)
    plan = r["plan"]
    assert plan["met"] and r["pruned"]["top1_agreement"] >= 90
    assert plan["probes"][0]["steps"] == 0 and len(plan["probes"]) >= 2
    assert len(r["sensitivity"]) == len([g for g in r["groups"] if not g["blocked"] and g["channels"] >= 2])


@pytest.mark.parametrize("args,code,needle", [
    # Bad flags and values are usage errors (2); a criterion the model cannot serve is bad input (4).
    (["--amount", "0.1", "--budget", "top1-drop=1"], 2, "exactly one"),
    (["--amount", "1.5"], 2, "within"),
    (["--amount", "0.1", "--criterion", "magic"], 2, "unknown criterion"),
    (["--amount", "0.1", "--criterion", "bn-scale"], 4, "BatchNormalization"),
    (["--amount", "0.1", "--method", "random"], 2, "'random'"),
])
def test_bad_arguments_are_refused(setup, args, code, needle):
    r = ep("prune", setup["model"], "--calib", setup["data"], "--preset", "caffe_bgr", "--calib-limit", 2,
           "--holdout", 2, "-o", setup["dir"] / "never.onnx", *args, check=False)
    assert r.returncode == code and needle in r.stderr, (r.returncode, r.stderr)
    assert not os.path.exists(setup["dir"] / "never.onnx")
