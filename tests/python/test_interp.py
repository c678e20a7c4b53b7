"""The kernel interpreter (the CPU backend of builds without tract, e.g. the mobile library's small build; chosen
in full builds with EDGEPACK_CPU=interp) through the real CLI: the same answers as the tract backend on fp32 and
INT8 models (from `edgepack quantize`), with onnxruntime's top-1, and the ONNX node suite on its plain ops."""
import os
import re
import subprocess

import numpy as np
import pytest

import model_inputs
import ort_parity
from conftest import ROOT, edgepack_bin, ep
from test_gpu import node_dir

ASSETS = os.path.join(ROOT, "assets")
PHOTOS = os.path.join(ASSETS, "photos")
INTERP = {"EDGEPACK_CPU": "interp"}


def outputs(model, preset, photo, out, env=None):
    r = ep("run", model, os.path.join(PHOTOS, photo), "--preset", preset, "--device", "cpu", "--json",
           "--output-dir", out, env=env)
    return {f: np.load(os.path.join(out, f)) for f in sorted(os.listdir(out))}, r.stdout


@pytest.mark.parametrize("model,preset,photo", [
    ("efficientnet_lite0_fp32.onnx", "tf", "skimage_chelsea.png"),
    ("ultraface_rfb_320.onnx", "ultraface", "skimage_astronaut.png"),
])
def test_fp32_and_int8_match_tract(tmp_path, model, preset, photo):
    src = os.path.join(ASSETS, "models", model)
    q = tmp_path / "q.onnx"
    ep("quantize", "--budget", "none", src, "--calib", PHOTOS, "--preset", preset, "--holdout", "0", "--latency-runs", "0", "-o", q)
    for name, m in (("fp32", src), ("int8", str(q))):
        want, _ = outputs(m, preset, photo, tmp_path / f"{name}_tract")
        got, log = outputs(m, preset, photo, tmp_path / f"{name}_interp", env=INTERP)
        assert "kernel interpreter" in log, log
        assert want.keys() == got.keys()
        for k in want:
            a, b = want[k].astype(np.float64).ravel(), got[k].astype(np.float64).ravel()
            assert want[k].shape == got[k].shape, k
            # The same kernels run on both: the numbers agree to float rounding of the few plain ops.
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-6), (name, k, np.abs(a - b).max())
            assert a.argmax() == b.argmax(), (name, k)


def test_ops_outside_the_set_are_refused_by_name(tmp_path):
    """A model with an op outside the interpreter's set: exit 5 (unsupported operator), naming the op and backend."""
    import onnx
    from onnx import TensorProto, helper

    path = tmp_path / "det.onnx"
    g = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="det")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    r = ep("bench", path, "--device", "cpu", "--runs", "1", check=False, env=INTERP)
    assert r.returncode == 5 and "Det" in r.stderr and "cpu backend" in r.stderr, r.stderr


@pytest.mark.parametrize("fname", model_inputs.MODEL_FILES + ["yolov8n-doclaynet.onnx"])
def test_every_shared_model_matches_onnxruntime(shared, binary, fname):
    """Issue 26: every shared model runs on the interpreter with onnxruntime's outputs (Silero VAD's `If` and
    LSTM, PP-OCR's recogniser, Magika, a YOLOv8 detector included), at the parity tolerances of the tract backend."""
    path = os.path.join(shared, "models", fname)
    if fname in model_inputs.MODEL_FILES:
        feeds = model_inputs.all_inputs(shared)[fname]
    else:
        import onnxruntime as ort
        i = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0]
        feeds = {i.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape],
                                                         dtype=np.float32)}
    r = ort_parity.compare(path, feeds, edgepack_bin(), env=INTERP)
    assert r["loaded"], r
    for o in r["outputs"]:
        assert o["shape_equal"], o
        assert o["cosine"] >= 0.9999, o
        assert o["max_abs_diff"] <= 1e-3 * max(1.0, o["max_abs_ref"]), o


def test_onnx_node_suite_on_the_interpreter(tmp_path):
    """Every node-test case of the interpreter's ops (`interp::OPS`; CONFORMANCE_INTERP.md). What fails: the
    training-mode Dropout (numpy's random draws), antialiased Resize, If branches with optional/sequence values,
    and element types the runtime does not carry. Issue 26 asks for at least 95 % of the claimed cases."""
    exe = os.path.join(os.path.dirname(edgepack_bin()), "examples", "node_tests")
    assert os.path.exists(exe), f"{exe} missing: cargo build --examples builds it"
    md = tmp_path / "table.md"
    r = subprocess.run([exe, node_dir(), "--device", "cpu", "--md", str(md)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **INTERP})
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"(\d+) passed, (\d+) failed \(([\d.]+) % of all\).*?([\d.]+) % of the claimed cases", r.stdout)
    assert m, r.stdout[-2000:]
    passed, failed, pct_expr = int(m[1]), int(m[2]), float(m[4])
    print(f"\nONNX node tests on the kernel interpreter: {passed} passed, {failed} failed ({pct_expr} % of claimed)")
    assert passed + failed > 300, "the suite looks incomplete"
    assert pct_expr >= 95.0, md.read_text()


def test_a_selective_build_runs_its_models_only(binary, tmp_path):
    """Issue 26: `edgepack ops` lists what a set of models needs, and the interpreter built with that list
    (EDGEPACK_INTERP_OPS, as the mobile library's selective build takes it) has exactly those ops: its unit test
    checks the table, and that a model needing another op is refused by name. Built in a target dir of its own
    (the interpreter's crates only; cached under ~/.cache)."""
    import json
    ops = tmp_path / "tiny.ops"
    model = os.path.join(ASSETS, "models", "efficientnet_lite0_fp32.onnx")
    doc = json.loads(ep("ops", model, "-o", ops, "--json").stdout)
    assert doc["ops"] == ["Reshape"] and "EpConv" in doc["kernel_nodes"] and doc["not_in_interpreter"] == [], doc
    assert ops.read_text().splitlines()[-1] == "Reshape"
    env = {**os.environ, "EDGEPACK_INTERP_OPS": str(ops),
           "CARGO_TARGET_DIR": os.path.join(os.path.expanduser("~"), ".cache", "edgepack-selective-target")}
    r = subprocess.run(["cargo", "test", "--release", "-p", "edgepack-interp", "--lib", "--", "selective",
                        "--nocapture"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "a_selective_build_has_exactly_its_ops ... ok" in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("fname,preset", [("efficientnet_lite0_fp32.onnx", "tf"), ("squeezenet1.0_fp32.onnx", "caffe_bgr"),
                                          ("ultraface_rfb_320.onnx", "ultraface"),
                                          ("mnist_cntk_opset8_simplified.onnx", "mnist")])
def test_int8_files_match_onnxruntime(shared, binary, tmp_path, fname, preset):
    """Issue 26: the INT8 files of `edgepack quantize` give onnxruntime's outputs on the interpreter (the same QDQ
    file in both; the interpreter's integer kernels use onnxruntime's requantization)."""
    src = os.path.join(shared, "models", fname)
    q = tmp_path / "q.onnx"
    ep("quantize", "--budget", "none", src, "--calib", PHOTOS, "--preset", preset, "--holdout", "0", "--latency-runs", "0", "-o", q)
    feeds = model_inputs.all_inputs(shared)[fname]
    r = ort_parity.compare(str(q), feeds, edgepack_bin(), env=INTERP)
    assert r["loaded"], r
    for o in r["outputs"]:
        assert o["shape_equal"] and o["cosine"] >= 0.999, o
