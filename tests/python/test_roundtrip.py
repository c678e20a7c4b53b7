"""Acceptance: the graph type writes ONNX back losslessly: byte-identical files, and onnxruntime gives
identical outputs on a re-written (topologically re-sorted) file."""
import os

import numpy as np
import onnxruntime as ort
import pytest

import model_inputs
from conftest import ep

def ort_outputs(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


MODELS = [
    "efficientnet_lite0_fp32.onnx", "squeezenet1.0_fp32.onnx", "mnist_cntk_opset7.onnx", "ultraface_rfb_320.onnx",
    "silero_vad.onnx", "magika_standard_v3_3.onnx", "ppocr_mobile_v2_cls.onnx",
]


@pytest.mark.parametrize("fname", MODELS)
def test_rewrite_is_lossless(shared, binary, tmp_path, fname):
    src = os.path.join(shared, "models", fname)
    plain = tmp_path / "plain.onnx"
    ep("rewrite", src, plain)
    assert open(src, "rb").read() == plain.read_bytes()
    sorted_ = tmp_path / "sorted.onnx"
    ep("rewrite", src, sorted_, "--topo-sort")
    feeds = model_inputs.all_inputs(shared)[fname]
    a, b = ort_outputs(src, feeds), ort_outputs(sorted_, feeds)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("fname", ["squeezenet1.0_fp32.onnx", "mnist_cntk_opset7.onnx",
                                   "mnist_cntk_opset8_simplified.onnx", "ultraface_rfb_320.onnx"])
def test_opset_upgrade_keeps_results(shared, binary, tmp_path, fname):
    """The opset-13 upgrade pass (Softmax axis semantics, Dropout, attribute→input ops) changes no result."""
    import onnx
    src = os.path.join(shared, "models", fname)
    up = tmp_path / "op13.onnx"
    ep("rewrite", src, up, "--opset", "13")
    m = onnx.load(str(up))
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [13]
    onnx.checker.check_model(m)
    feeds = model_inputs.all_inputs(shared)[fname]
    a, b = ort_outputs(src, feeds), ort_outputs(up, feeds)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert np.max(np.abs(x - y)) <= 1e-6 * max(1.0, float(np.max(np.abs(x))))


@pytest.mark.parametrize("fname", ["efficientnet_lite0_fp32.onnx", "squeezenet1.0_fp32.onnx"])
def test_rewrite_free_batch_runs_batches_in_onnxruntime(shared, binary, tmp_path, fname):
    """`rewrite --free-batch` writes the graph `serve` batches (EfficientNet-Lite0's Reshape to [1, 1280] copies
    the batch instead): onnxruntime runs it at batch 3 with the same results as three single runs."""
    import onnx
    src = os.path.join(shared, "models", fname)
    freed = tmp_path / "freed.onnx"
    ep("rewrite", src, freed, "--free-batch")
    (name, x), = model_inputs.all_inputs(shared)[fname].items()
    m = onnx.load(str(freed))
    assert next(i for i in m.graph.input if i.name == name).type.tensor_type.shape.dim[0].dim_param
    rng = np.random.default_rng(3)
    xs = [x] + [(x + rng.normal(0, 0.5, x.shape)).astype(x.dtype) for _ in range(2)]
    batched = ort_outputs(freed, {name: np.concatenate(xs)})[0]
    singles = np.concatenate([ort_outputs(src, {name: xi})[0] for xi in xs])
    assert batched.shape == singles.shape and batched.shape[0] == 3
    assert np.max(np.abs(batched - singles)) <= 1e-4 * max(1.0, float(np.max(np.abs(singles))))
    # A model with no leading dim of 1 to free is refused as bad input (exit 4), not written unchanged.
    r = ep("rewrite", freed, tmp_path / "again.onnx", "--free-batch", check=False)
    assert r.returncode == 4 and "no input has a leading dim" in r.stderr
