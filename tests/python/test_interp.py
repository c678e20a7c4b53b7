"""The kernel interpreter (the CPU backend of builds without tract, e.g. the mobile library's small build; chosen
in full builds with EDGEPACK_CPU=interp) through the real CLI: the same answers as the tract backend on fp32 and
INT8 models (from `edgepack quantize`), with onnxruntime's top-1, and the ONNX node suite on its plain ops."""
import os
import re
import subprocess

import numpy as np
import pytest

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
    ep("quantize", src, "--calib", PHOTOS, "--preset", preset, "--holdout", "0", "--latency-runs", "0", "-o", q)
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

    path = tmp_path / "matmul.onnx"
    g = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    r = ep("bench", path, "--device", "cpu", "--runs", "1", check=False, env=INTERP)
    assert r.returncode == 5 and "MatMul" in r.stderr and "cpu backend" in r.stderr, r.stderr
    assert ep("bench", path, "--device", "cpu", "--runs", "1").returncode == 0  # tract runs it


def test_onnx_node_suite_on_the_interpreter(tmp_path):
    """Every node-test case of the interpreter's plain ops (`interp::OPS`). What fails: function-body variants that
    use ops outside the set (Less, ReduceMax, CastLike), 1-D/3-D and dilated pooling, blocked quantization, the
    training-mode Dropout (numpy's random draws) and element types the runtime does not carry."""
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
    assert pct_expr >= 75.0, md.read_text()
