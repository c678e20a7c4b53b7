"""First steps of `edgepack quantize` (issue: calibrated INT8): the QDQ output runs unchanged in onnxruntime,
keeps top-1, and edgepack's own runtime agrees with onnxruntime on the INT8 model."""
import csv
import json
import os
import re

import numpy as np
import onnxruntime as ort
import pytest

import model_inputs
from conftest import ROOT, ep

CALIB, HELD_OUT = 32, (200, 300)


@pytest.fixture(scope="module")
def int8_effnet(shared, binary, tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    calib = d / "calib"
    calib.mkdir()
    images = os.path.join(shared, "data", "imagenet_sample", "images")
    for f in sorted(os.listdir(images))[:CALIB]:
        os.symlink(os.path.join(images, f), calib / f)
    out = d / "effnet_int8.onnx"
    ep("quantize", os.path.join(shared, "models", "efficientnet_lite0_fp32.onnx"), "--calib", calib, "--preset", "tf",
       "-o", out, "--threads", "2")
    return out


def test_int8_model_runs_in_onnxruntime_and_keeps_top1(shared, int8_effnet, tmp_path):
    ev = model_inputs._tools(shared)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(os.path.join(shared, "models", "efficientnet_lite0_fp32.onnx"), so)
    int8 = ort.InferenceSession(str(int8_effnet), so)
    ops = {n.op_type for n in __import__("onnx").load(str(int8_effnet)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    rows = list(csv.DictReader(open(os.path.join(shared, "data", "imagenet_sample", "labels.csv"))))[slice(*HELD_OUT)]
    ort_int8_top1 = {}
    agree = 0
    for r in rows:
        x = ev.preprocess(os.path.join(shared, "data", "imagenet_sample", "images", r["file"]), 256, 224, **ev.PRESETS["tf"])
        a = int(fp32.run(None, {"input": x})[0].argmax())
        b = int(int8.run(None, {"input": x})[0].argmax())
        agree += a == b
        ort_int8_top1[r["file"]] = b
    print(f"int8 vs fp32 top-1 agreement (onnxruntime, {len(rows)} held-out images): {100 * agree / len(rows):.1f} %")
    assert agree / len(rows) >= 0.95
    assert os.path.getsize(int8_effnet) <= 0.27 * os.path.getsize(os.path.join(shared, "models", "efficientnet_lite0_fp32.onnx"))

    # edgepack's runtime on the same INT8 file agrees with onnxruntime.
    preds = tmp_path / "pred.csv"
    ep("eval", int8_effnet, os.path.join(shared, "data", "imagenet_sample"), "--preset", "tf", "--skip", HELD_OUT[0],
       "--limit", HELD_OUT[1] - HELD_OUT[0], "--predictions", preds, "--threads", "2")
    ours = {row["file"]: int(row["top1"]) for row in csv.DictReader(open(preds))}
    same = sum(ours[f] == ort_int8_top1[f] for f in ort_int8_top1) / len(ort_int8_top1)
    print(f"edgepack vs onnxruntime top-1 on the INT8 model: {100 * same:.1f} %")
    # Identical tensors fed to both give 99 % (tract runs QDQ as float fake-quant, onnxruntime fuses integer
    # kernels: borderline images flip); JPEG decoding differences cost up to one more point here. The issue's
    # 99 % on 800 held-out images is measured by the quantization report, not by this smoke test.
    assert same >= 0.97


def assert_quantized_activations_match_onnxruntime(model_path, feeds, tmp_path):
    """Every QuantizeLinear output (uint8) of `model_path`: edgepack's CPU runtime equals onnxruntime's, bit for bit,
    both as computed by the integer kernels (NHWC values `NAME__nhwc` of the kernel graph) and by the float-op
    lowering (NCHW values under their own names). Returns how many kernel outputs were compared."""
    import onnx
    m = onnx.load(str(model_path))
    qs = [n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    for q in qs:
        m.graph.output.append(onnx.helper.make_tensor_value_info(q, onnx.TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    theirs = ort.InferenceSession(m.SerializeToString(), so).run(None, feeds)[1:]
    (name, x), = feeds.items()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "values"
    args = ["run", model_path, "--input", f"{name}={tmp_path / 'x.npy'}", "--output-dir", out]
    for q in qs:
        args += ["--value", q]
    ep(*args)
    for q, t in zip(qs, theirs):
        ours = np.load(out / (re.sub(r"[^A-Za-z0-9._-]", "_", q) + ".npy"))
        assert ours.dtype == np.uint8 and np.array_equal(ours, t), f"{q}: {(ours != t).sum()} values differ"
    # The kernel graph: which Q outputs its integer kernels compute (the graph it runs, dumped at load).
    dump = tmp_path / "lowered.onnx"
    ep("run", model_path, "--input", f"{name}={tmp_path / 'x.npy'}", env={"EDGEPACK_DUMP_LOWERED": dump})
    low = onnx.load(str(dump))
    made = {o for n in low.graph.node if n.domain == "ai.edgepack" for o in n.output}
    kq = [(q, t) for q, t in zip(qs, theirs) if q + "__nhwc" in made]
    out_k = tmp_path / "kernel_values"
    args = ["run", model_path, "--input", f"{name}={tmp_path / 'x.npy'}", "--output-dir", out_k]
    for q, _ in kq:
        args += ["--value", q + "__nhwc"]
    ep(*args)
    for q, t in kq:
        ours = np.load(out_k / (re.sub(r"[^A-Za-z0-9._-]", "_", q + "__nhwc") + ".npy"))
        assert ours.dtype == np.uint8 and ours.ndim == 4, q
        ours = ours.transpose(0, 3, 1, 2)
        assert np.array_equal(ours, t), f"kernel output {q}: {(ours != t).sum()} values differ"
    return len(kq)


def test_runtime_computes_onnxruntime_integer_arithmetic_bit_for_bit(shared, int8_effnet, tmp_path):
    """Every quantized activation of the INT8 EfficientNet: edgepack's CPU runtime (QDQ lowered to exact integer
    accumulation + onnxruntime's requantization and QLinearAdd arithmetic) equals onnxruntime's fused kernels."""
    images = os.path.join(shared, "data", "imagenet_sample", "images")
    for f in sorted(os.listdir(images))[400:402]:
        x = model_inputs.imagenet_input(shared, os.path.join(images, f), "tf")
        d = tmp_path / f
        d.mkdir()
        assert assert_quantized_activations_match_onnxruntime(int8_effnet, {"input": x}, d) > 50


def test_quantize_refuses_bad_input_clearly(binary, tmp_path):
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ep("quantize", mnist, "--calib", empty, "--preset", "mnist", "-o", tmp_path / "q.onnx", check=False)
    assert r.returncode == 4 and "no images, .npy or .npz" in r.stderr
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    # MNIST is opset 8: upgraded, then quantized (no longer refused).
    assert ep("quantize", mnist, "--calib", calib, "-o", tmp_path / "m.onnx").returncode == 0
    np.save(calib / "x.npy", np.zeros((1, 1, 27, 28), np.float32))
    effnet = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
    r = ep("quantize", effnet, "--calib", calib, "-o", tmp_path / "q.onnx", check=False)
    assert r.returncode == 4 and "shape" in r.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_old_opset_model_is_upgraded_and_quantized(shared, binary, tmp_path):
    """SqueezeNet is opset 7 (IR 3, initializers listed as inputs): upgraded to 13, then QDQ; onnxruntime runs it."""
    calib = tmp_path / "calib"
    calib.mkdir()
    images = os.path.join(shared, "data", "imagenet_sample", "images")
    for f in sorted(os.listdir(images))[:16]:
        os.symlink(os.path.join(images, f), calib / f)
    out = tmp_path / "sq_int8.onnx"
    src = os.path.join(shared, "models", "squeezenet1.0_fp32.onnx")
    # One conv kept in fp32 (as mixed precision does): it must stay fp32 in onnxruntime too (fp32 guard).
    ep("quantize", src, "--calib", calib, "--preset", "caffe_bgr", "-o", out, "--threads", "2",
       "--exclude", "Conv_fire2/squeeze1x1_1", "--holdout", "0", "--latency-runs", "0")
    x = model_inputs.imagenet_input(shared, os.path.join(images, sorted(os.listdir(images))[300]), "caffe_bgr")
    assert assert_quantized_activations_match_onnxruntime(out, {"data_0": x}, tmp_path) > 30
    ev = model_inputs._tools(shared)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(src, so)
    int8 = ort.InferenceSession(str(out), so)
    assert [i.name for i in int8.get_inputs()] == ["data_0"]
    rows = list(csv.DictReader(open(os.path.join(shared, "data", "imagenet_sample", "labels.csv"))))[200:260]
    agree = 0
    for r in rows:
        x = ev.preprocess(os.path.join(images, r["file"]), 256, 224, **ev.PRESETS["caffe_bgr"])
        agree += int(fp32.run(None, {"data_0": x})[0].argmax() == int8.run(None, {"data_0": x})[0].argmax())
    print(f"squeezenet int8 vs fp32 top-1 agreement: {100 * agree / len(rows):.1f} %")
    assert agree / len(rows) >= 0.9


def test_quantize_reads_a_signed_bundle_once_with_its_key(binary, tmp_path):
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    ep("keygen", "-o", tmp_path / "k")
    ep("keygen", "-o", tmp_path / "other")
    b = tmp_path / "mnist.edgepack"
    ep("pack", mnist, "-o", b, "--preset", "mnist", "--sign", tmp_path / "k.key")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.full((1, 1, 28, 28), 128.0, np.float32))
    r = ep("quantize", b, "--calib", calib, "--key", tmp_path / "k.pub", "-o", tmp_path / "q.onnx", "--json")
    assert r.returncode == 0 and os.path.exists(tmp_path / "q.onnx")
    r = ep("quantize", b, "--calib", calib, "--key", tmp_path / "other.pub", "-o", tmp_path / "q2.onnx", check=False)
    assert r.returncode == 3 and not os.path.exists(tmp_path / "q2.onnx")


def _mnist_idx(shared):
    d = os.path.join(shared, "data", "mnist")
    return os.path.join(d, "t10k-images-idx3-ubyte.gz"), os.path.join(d, "t10k-labels-idx1-ubyte.gz")


def test_budget_search_report_and_a_budget_that_cannot_be_met(shared, binary, tmp_path):
    """MNIST calibrated on IDX samples: an unreachable SQNR budget makes the search keep the most sensitive layers in
    fp32 up to the cap, warns, writes the best candidate, and the report (JSON + HTML/SVG) says what it reached."""
    import xml.etree.ElementTree as ET
    imgs, lbls = _mnist_idx(shared)
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    out = tmp_path / "m.onnx"
    r = ep("quantize", mnist, "--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 50,
           "--holdout", 100, "--budget", "sqnr=99", "--max-float-fraction", 0.4, "--sensitivity-samples", 4,
           "--mode", "static", "-o", out)
    assert "budget output SQNR ≥ 99 dB: NOT met" in r.stdout and "warning: budget" in r.stderr
    rep = json.load(open(f"{out}.report.json"))
    b = rep["budget"]
    assert b["met"] is False and b["max_float_nodes"] == 2 and len(b["probes"]) >= 2
    assert [p["float_nodes"] for p in b["probes"]] == sorted(p["float_nodes"] for p in b["probes"])
    # The written model is the best candidate: its SQNR is the best of the probes, and its fp32 layers are the
    # most sensitive ones with the reason given.
    best = max(p["value"] for p in b["probes"])
    assert abs(b["reached"] - best) < 1e-9
    fp32 = [l for l in rep["layers"] if l["precision"] == "fp32"]
    assert len(fp32) == len(b["float_nodes"]) and all("budget search" in l["reason"] for l in fp32)
    assert all(l["sensitivity_db"] is not None for l in rep["layers"])
    # The first half of the held-out samples chose the fp32 layers; the report measures the other half.
    assert rep["held_out"]["labelled"] and rep["int8"]["samples"] == 50 and rep["fp32"]["top1"] > 90
    assert rep["calibration"]["which"] == "first 50" and rep["selection"]["which"] == "samples 51-100"
    assert rep["held_out"]["which"] == "samples 101-150" and rep["selection"]["samples"] == 50
    assert isinstance(b["judged"], float) and rep["sensitivity_method"] == "exact"
    html = open(f"{out}.report.html").read()
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) >= 3
    for s in svgs:
        ET.fromstring(s)  # well-formed SVG
    # The file runs in onnxruntime.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ort.InferenceSession(str(out), so).run(None, {"Input3": np.zeros((1, 1, 28, 28), np.float32)})

    # A budget the all-INT8 model meets: no search, no fp32 layer.
    r = ep("quantize", mnist, "--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 50,
           "--holdout", 200, "--budget", "top1-drop=0.5", "-o", tmp_path / "m2.onnx", "--json")
    rep = json.loads(r.stdout)["report"]
    assert rep["budget"]["met"] and rep["budget"]["float_nodes"] == [] and len(rep["budget"]["probes"]) == 1
    assert rep["fp32"]["top1"] - rep["int8"]["top1"] <= 0.5


def test_default_gate_none_and_one_pass_sensitivity(shared, binary, tmp_path):
    """Without --budget the default gate applies (top-1 agreement on a classifier) on samples apart from the
    report's; --budget none is all INT8 measured on every held-out sample; the one-pass sensitivity ranks the same
    layers as the exact one."""
    imgs, lbls = _mnist_idx(shared)
    mnist = os.path.join(shared, "models", "mnist_cntk_opset7.onnx")
    common = ["--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 50, "--holdout", 60,
              "--latency-runs", 0, "--json"]
    rep = json.loads(ep("quantize", mnist, *common, "-o", tmp_path / "d.onnx").stdout)["report"]
    assert rep["budget"]["text"] == "default (top-1 agreement ≥ 97 %)" and rep["budget"]["met"]
    assert rep["selection"]["which"] == "samples 51-80" and rep["held_out"]["which"] == "samples 81-110"
    assert rep["int8"]["samples"] == 30 and rep["budget"]["judged"] is not None
    rep = json.loads(ep("quantize", mnist, *common, "--budget", "none", "-o", tmp_path / "n.onnx").stdout)["report"]
    assert rep["budget"] is None and rep["selection"] is None and rep["int8"]["samples"] == 60
    assert rep["int8"]["outputs"][0]["cosine"] > 0.99
    ranks = {}
    for m in ("exact", "local"):
        rep = json.loads(ep("quantize", mnist, *common, "--sensitivity", "--sensitivity-method", m,
                            "-o", tmp_path / f"{m}.onnx").stdout)["report"]
        assert rep["sensitivity_method"] == m
        sens = {l["node"]: l["sensitivity_db"] for l in rep["layers"] if l["precision"] == "int8"}
        assert all(v is not None for v in sens.values()) and len(sens) >= 5
        ranks[m] = sorted(sens, key=sens.get)
    # Both put the same layer first (the one whose quantization costs the most).
    assert ranks["exact"][0] == ranks["local"][0], ranks
    # A non-classifier gets the fidelity gate, per output.
    r = ep("quantize", mnist, *common, "--budget", "fidelity=20,0.99", "-o", tmp_path / "f.onnx")
    assert json.loads(r.stdout)["report"]["budget"]["text"] == "every output SQNR ≥ 20 dB or cosine ≥ 0.99"


def test_budgets_that_cannot_be_checked_and_unsupported_models_are_clear(shared, binary, tmp_path):
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        np.save(calib / f"{i}.npy", np.full((1, 1, 28, 28), 40.0 * i, np.float32))
    q = tmp_path / "q.onnx"
    r = ep("quantize", mnist, "--calib", calib, "--budget", "top1-drop=1", "-o", q, check=False)
    assert r.returncode == 4 and "labelled" in r.stderr and not q.exists()
    # Bad flag values are usage errors (exit 2, issue 25).
    r = ep("quantize", mnist, "--calib", calib, "--budget", "speed=2", "-o", q, check=False)
    assert r.returncode == 2 and "unknown budget" in r.stderr
    r = ep("quantize", mnist, "--calib", calib, "--method", "kl", "-o", q, check=False)
    assert r.returncode == 2 and "'kl'" in r.stderr and "minmax" in r.stderr
    r = ep("quantize", mnist, "--calib", calib, "-o", tmp_path / "missing" / "q.onnx", check=False)
    assert r.returncode == 4 and "does not exist" in r.stderr
    # Silero VAD has three inputs: .npy samples are refused with what to give instead (one .npz per sample).
    r = ep("quantize", os.path.join(shared, "models", "silero_vad_16k_op15.onnx"), "--calib", calib, "-o", q, check=False)
    assert r.returncode == 4, r.stderr
    assert "3 inputs (input, state, sr)" in r.stderr and ".npz" in r.stderr and not q.exists()
    # The older export keeps every layer inside If control flow: nothing to quantize, the reason per node.
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "0.npz", **model_inputs.silero_inputs(shared))
    r = ep("quantize", os.path.join(shared, "models", "silero_vad.onnx"), "--calib", npz, "-o", q, check=False)
    assert r.returncode == 5 and "nothing to quantize" in r.stderr and "If_0: control flow" in r.stderr, r.stderr


def test_pack_carries_both_variants_and_the_report(shared, binary, tmp_path):
    imgs, lbls = _mnist_idx(shared)
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    q = tmp_path / "m.int8.onnx"
    ep("quantize", mnist, "--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 32,
       "--holdout", 32, "--latency-runs", 0, "-o", q)
    b = tmp_path / "mnist.edgepack"
    ep("pack", mnist, "--preset", "mnist", "--variant", f"int8={q}", "--report", f"{q}.report.json",
       "--report", f"{q}.report.html", "-o", b)
    man = json.loads(ep("inspect", b, "--json").stdout)
    text = json.dumps(man)
    assert "int8" in text and "m.int8.onnx.report.json" in text and "m.int8.onnx.report.html" in text
    # Both variants run from the bundle and agree with the fp32 digit on a test image.
    sample = tmp_path / "x.npy"
    np.save(sample, model_inputs.mnist_first(shared, 3)[2:3])
    outs = []
    for v in ("fp32", "int8"):
        r = ep("run", b, sample, "--variant", v, "--raw", "--json")
        outs.append(np.array(json.loads(r.stdout)["outputs"][0]["data"]).argmax())
    assert outs[0] == outs[1]


def test_speed_gate_keeps_layers_without_an_integer_kernel_in_fp32(tmp_path):
    """The CPU runtime tells quantize which INT8 layers it has no integer kernel for (MNIST's MatMul/Gemm, its
    convolutions followed by a bias Add): they are reported, and with --speed-gate kept in fp32 with that reason."""
    import json
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(calib / f"x{i}.npy", rng.uniform(0, 255, (1, 1, 28, 28)).astype(np.float32))
    plain = ep("quantize", mnist, "--calib", calib, "--holdout", "0", "--latency-runs", "0", "--json", "-o", tmp_path / "a.onnx")
    ra = json.load(open(tmp_path / "a.onnx.report.json"))
    assert any("no integer kernel" in w for w in ra["warnings"]), ra["warnings"]
    ep("quantize", mnist, "--calib", calib, "--holdout", "0", "--latency-runs", "0", "--speed-gate", "-o", tmp_path / "b.onnx")
    rb = json.load(open(tmp_path / "b.onnx.report.json"))
    gated = [l for l in rb["layers"] if (l.get("reason") or "").startswith("speed gate")]
    assert gated and all(l["precision"] == "fp32" for l in gated), rb["layers"]
    assert any(l["op"] in ("Gemm", "MatMul") for l in gated)
    # MNIST's convolutions feed a separate bias Add, not a Q: not a kernel pattern either, so they are gated too;
    # without the gate the same layers are INT8.
    assert all(l["precision"] == "int8" for l in ra["layers"] if l["node"] in {g["node"] for g in gated})
    assert plain.returncode == 0


def test_quantize_flags_config_file_and_report_footer(binary, tmp_path):
    """Issue 29 item 6: --config (every flag, the command line wins), --op-types, --per-tensor, --shuffle/--seed,
    progress lines on a non-terminal stderr, and the report's footer (version, command line, time)."""
    import onnx
    from onnx import numpy_helper
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(3)
    for i in range(16):
        # Sorted by scale, like a class-sorted folder: the first samples are the quiet ones.
        np.save(calib / f"x{i:02}.npy", (rng.random((1, 1, 28, 28)) * (i + 1) * 16).astype(np.float32))
    cfg = tmp_path / "quantize.toml"
    cfg.write_text('method = "mse"\ncalib_limit = 4\nholdout = 4\nop_types = ["Conv"]\nper_tensor = true\n'
                   'shuffle = true\nseed = 7\nlatency_runs = 0\n')
    out = tmp_path / "q.onnx"
    r = ep("quantize", mnist, "--calib", calib, "--config", cfg, "--method", "minmax", "-o", out)
    # stderr is a pipe here: plain progress lines instead of bars.
    assert re.search(r"^calibrate: \d+ steps$", r.stderr, re.M) and "calibrate: done" in r.stderr, r.stderr
    rep = json.load(open(str(out) + ".report.json"))
    assert rep["method"] == "minmax"  # the command line overrides the file
    assert "shuffled, seed 7" in rep["calibration"]["source"]
    lo, hi = rep["int8"]["ci95"]["top1_agreement"]  # every accuracy figure has its 95 % interval
    assert 0 <= lo <= rep["int8"]["top1_agreement"] <= hi <= 100 and hi - lo > 10  # 4 samples say little
    prec = {l["op"]: l["precision"] for l in rep["layers"]}
    assert prec.get("Conv") == "int8" and all(p == "fp32" for op, p in prec.items() if op != "Conv"), prec
    assert any(l["reason"] == "not among --op-types" for l in rep["layers"] if l["op"] != "Conv")
    prov = rep["provenance"]
    assert prov["edgepack"] and "--config" in prov["command"] and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", prov["utc"])
    assert prov["command"] in open(str(out) + ".report.html").read().replace("&quot;", '"').replace("&#x27;", "'")
    m = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq_scales = [inits[n.input[1]] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 4]
    assert dq_scales and all(s.size == 1 for s in dq_scales), "per-tensor conv weights have one scale each"
    # Another seed takes other samples (this folder's samples differ in range, so the calibration differs).
    out2 = tmp_path / "q2.onnx"
    ep("quantize", mnist, "--calib", calib, "--config", cfg, "--seed", "8", "-o", out2)
    assert out.read_bytes() != out2.read_bytes()
    # Bad configuration: one line, usage exit code, nothing written.
    cfg.write_text('methd = "mse"\n')
    r = ep("quantize", mnist, "--calib", calib, "--config", cfg, "-o", tmp_path / "bad.onnx", check=False)
    assert r.returncode == 2 and "`methd` is not a flag of `edgepack quantize`" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.onnx").exists()
    r = ep("quantize", mnist, "--calib", calib, "--op-types", "Softmax", "-o", tmp_path / "bad.onnx", check=False)
    assert r.returncode == 2 and "--op-types Softmax" in r.stderr


def _two_input_model(path):
    """`ids` (int64 token ids) and `mask` (float): Gather → Mul(mask) → MatMul → Add → Relu → MatMul → y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (32, 16)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("Mul", ["emb", "mask"], ["masked"], name="apply_mask"),
             helper.make_node("MatMul", ["masked", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "two_inputs",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
                           helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 6, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))


def test_a_two_input_model_calibrates_from_npz(binary, tmp_path):
    """Issue 29, item 2: one .npz per sample (one array per input name, stored or deflated); the integer input
    passes through unquantized; onnxruntime runs the INT8 file close to fp32 on held-out samples."""
    model = tmp_path / "two.onnx"
    _two_input_model(model)
    data = tmp_path / "npz"
    data.mkdir()
    rng = np.random.default_rng(5)
    feeds = []
    for i in range(60):
        f = {"ids": rng.integers(0, 32, (1, 6)).astype(np.int64),
             "mask": (rng.random((1, 6, 1)) > 0.2).astype(np.float32)}
        feeds.append(f)
        (np.savez_compressed if i % 2 else np.savez)(data / f"{i:03d}.npz", **f)
    out = tmp_path / "two_int8.onnx"
    r = ep("quantize", model, "--calib", data, "--calib-limit", 40, "--holdout", 20, "--latency-runs", 0, "--json",
           "-o", out)
    rep = json.loads(r.stdout)["report"]
    assert rep["calibration"]["samples"] == 40 and rep["int8"]["samples"] == 10
    assert {l["node"]: l["precision"] for l in rep["layers"]}["fc1"] == "int8"
    import onnx
    g = onnx.load(str(out)).graph
    assert [i.name for i in g.input] == ["ids", "mask"]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "ids" for n in g.node)
    assert any(n.op_type == "DequantizeLinear" and n.output[0].startswith("W1") for n in g.node)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref, got = ort.InferenceSession(str(model), so), ort.InferenceSession(str(out), so)
    a = np.concatenate([ref.run(None, f)[0].ravel() for f in feeds[40:]])
    b = np.concatenate([got.run(None, f)[0].ravel() for f in feeds[40:]])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    # The same samples as one folder per input (.npy files of the same names): the same calibration.
    per = tmp_path / "per_input"
    for name in ("ids", "mask"):
        (per / name).mkdir(parents=True)
        for i, f in enumerate(feeds):
            np.save(per / name / f"{i:03d}.npy", f[name])
    r = ep("quantize", model, "--calib", per, "--calib-limit", 40, "--holdout", 20, "--latency-runs", 0, "--json",
           "-o", tmp_path / "two_per_input.onnx")
    rep2 = json.loads(r.stdout)["report"]
    assert rep2["calibration"]["samples"] == 40 and rep2["int8"] == rep["int8"]
        # A sample missing an input, or a bare .npy for a two-input model: a clear error naming the inputs.
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "0.npz", ids=feeds[0]["ids"])
    r = ep("quantize", model, "--calib", bad, "-o", tmp_path / "x.onnx", check=False)
    assert r.returncode == 4 and "missing: mask" in r.stderr, r.stderr
    np.save(bad / "1.npy", feeds[0]["mask"])
    os.remove(bad / "0.npz")
    r = ep("quantize", model, "--calib", bad, "-o", tmp_path / "x.onnx", check=False)
    assert r.returncode == 4 and "2 inputs (ids, mask)" in r.stderr and ".npz" in r.stderr, r.stderr


def test_recurrent_state_is_carried_over_the_sample_sequence(binary, tmp_path):
    """Issue 29, item 2: `state` in, `stateN` out: calibration feeds each step the previous step's state (zeros
    first), so the ranges cover the state the model reaches over a sequence, not just its first step."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(1).normal(0, 0.5, (4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Mul", ["state", "decay"], ["kept"], name="decay_state"),
         helper.make_node("Add", ["kept", "x"], ["stateN"], name="accumulate"),
         helper.make_node("MatMul", ["stateN", "W"], ["y"], name="readout")],
        "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.full((1,), 0.9, np.float32), "decay"), numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    model = tmp_path / "rnn.onnx"
    onnx.save(m, str(model))
    data = tmp_path / "seq"
    data.mkdir()
    xs = [np.random.default_rng(i).random((1, 4)).astype(np.float32) for i in range(60)]
    for i, x in enumerate(xs):
        np.savez(data / f"{i:03d}.npz", x=x)
    out = tmp_path / "rnn_int8.onnx"
    r = ep("quantize", model, "--calib", data, "--calib-limit", 40, "--holdout", 20, "--latency-runs", 0, "--json",
           "-o", out)
    rep = json.loads(r.stdout)["report"]
    assert rep["recurrent_state"] == ["state ← stateN"]
    # Over 40 steps of x in [0, 1) the state reaches about 5-9; one step from zeros would stay below 1.
    q = onnx.load(str(out))
    scale = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name.startswith("stateN_scale"))
    assert float(scale) * 255 > 4.0, float(scale) * 255
    # onnxruntime runs the INT8 file over the held-out steps, feeding its own state back, close to fp32.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    outs = []
    for path in (model, out):
        s, state, ys = ort.InferenceSession(str(path), so), np.zeros((1, 4), np.float32), []
        for x in xs:
            y, state = s.run(None, {"x": x, "state": state})
            ys.append(y.ravel())
        outs.append(np.concatenate(ys[40:]))
    a, b = outs
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_dynamic_quantization_of_matmul_gemm_and_lstm_runs_in_onnxruntime(binary, tmp_path):
    """Issue 29, item 3: --mode dynamic writes onnxruntime's quantize_dynamic form (DynamicQuantizeLinear +
    MatMulInteger for MatMul/Gemm, int8 LSTM weights behind DequantizeLinear); both runtimes run it, close to fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(7)
    H = 24
    f = lambda *s, sd=0.3: rng.normal(0, sd, s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f(16, 32), "W1"), numpy_helper.from_array(f(1, 4 * H, 32, sd=0.2), "W"),
             numpy_helper.from_array(f(1, 4 * H, H, sd=0.2), "R"), numpy_helper.from_array(f(5, H), "W3"),
             numpy_helper.from_array(f(5), "b3"), numpy_helper.from_array(np.array([1, H], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="proj"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("LSTM", ["r1", "W", "R"], ["Y", "Y_h"], name="lstm", hidden_size=H),
             helper.make_node("Reshape", ["Y_h", "shape"], ["last"], name="flatten"),
             helper.make_node("Gemm", ["last", "W3", "b3"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    model = tmp_path / "lstm.onnx"
    onnx.save(m, str(model))
    data = tmp_path / "x"
    data.mkdir()
    xs = [rng.normal(0, 1, (8, 1, 16)).astype(np.float32) for _ in range(30)]
    for i, x in enumerate(xs):
        np.save(data / f"{i:03d}.npy", x)
    out = tmp_path / "lstm_dyn.onnx"
    r = ep("quantize", model, "--calib", data, "--calib-limit", 10, "--holdout", 20, "--mode", "dynamic", "--budget",
           "none", "--json", "-o", out)
    rep = json.loads(r.stdout)["report"]
    assert {l["node"]: l["precision"] for l in rep["layers"]} == {"proj": "int8", "lstm": "int8", "head": "int8"}
    assert rep["method"].startswith("dynamic") and rep["size"]["ratio"] < 0.4
    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2, ops
    lstm = next(n for n in q.graph.node if n.op_type == "LSTM")
    producer = {o: n for n in q.graph.node for o in n.output}
    assert all(producer[lstm.input[i]].op_type == "DequantizeLinear" for i in (1, 2))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref, got = ort.InferenceSession(str(model), so), ort.InferenceSession(str(out), so)
    a = np.concatenate([ref.run(None, {"x": x})[0].ravel() for x in xs[10:]])
    b = np.concatenate([got.run(None, {"x": x})[0].ravel() for x in xs[10:]])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.995
    # edgepack's runtime measured the same file on the same samples (its report), with its integer kernel for
    # the dynamic MatMuls, and computes what onnxruntime computes.
    assert rep["int8"]["outputs"][0]["cosine"] > 0.995
    prof = json.loads(ep("bench", out, "--profile", "--runs", 3, "--json").stdout)
    assert any(p["op"] == "EpDynGemm" and p["count"] == 2 for p in prof["profile"]), prof["profile"]
    import ort_parity
    r = ort_parity.compare(str(out), {"x": xs[12]}, binary)
    assert r["loaded"] and r["outputs"][0]["max_abs_diff"] <= 1e-5 * max(1.0, r["outputs"][0]["max_abs_ref"]), r
    # --mode auto (the default): static INT8 first; when it misses the gate, dynamic too, and the closer one is
    # written, the report saying which and why.
    r = ep("quantize", model, "--calib", data, "--calib-limit", 10, "--holdout", 20, "--budget", "sqnr=99",
           "--max-float-fraction", 0, "--json", "-o", tmp_path / "auto.onnx")
    rep = json.loads(r.stdout)["report"]
    chosen = [w for w in rep["warnings"] if w.startswith(("dynamic quantization chosen", "static INT8 kept"))]
    assert len(chosen) == 1, rep["warnings"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "auto.onnx")).graph.node]
    assert ("MatMulInteger" in ops) == chosen[0].startswith("dynamic"), (chosen, ops)
    assert rep["method"].startswith("dynamic") == chosen[0].startswith("dynamic")


def test_signed_and_symmetric_activations(shared, binary, tmp_path):
    """Issue 29, item 6: --activation-type s8 writes int8 QDQ pairs (onnxruntime's S8S8), --symmetric-activations
    ranges symmetric around 0; onnxruntime runs both, edgepack's runtime computes what onnxruntime computes."""
    import onnx
    from onnx import numpy_helper
    import ort_parity
    imgs, lbls = _mnist_idx(shared)
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    x = model_inputs.mnist_first(shared, 1)
    for flags, ty, sym in ((["--activation-type", "s8"], 3, False), (["--symmetric-activations"], 2, True),
                           (["--activation-type", "s8", "--symmetric-activations"], 3, True)):
        out = tmp_path / f"m{len(flags)}{ty}.onnx"
        r = ep("quantize", mnist, "--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 50,
               "--holdout", 100, "--budget", "none", "--latency-runs", 0, "--json", "-o", out, *flags)
        rep = json.loads(r.stdout)["report"]
        assert rep["int8"]["top1_agreement"] >= 98, rep["int8"]
        g = onnx.load(str(out)).graph
        zps = [t for t in g.initializer if t.name.endswith("_zero_point") and not t.dims and t.data_type in (2, 3)]
        acts = [t for t in zps if any(n.op_type == "QuantizeLinear" and n.input[2] == t.name for n in g.node)]
        assert acts and all(t.data_type == ty for t in acts), [(t.name, t.data_type) for t in acts]
        if sym:
            assert all(int(numpy_helper.to_array(t)) == (0 if ty == 3 else 128) for t in acts)
        p = ort_parity.compare(str(out), {"Input3": x}, binary)
        assert p["loaded"] and p["outputs"][0]["cosine"] > 0.99999, p
    # int8 activations are the uint8 ones shifted by 128: edgepack runs the s8 file on its uint8 integer kernels
    # and gets exactly what the u8 file (same ranges) gives.
    u8, s8 = tmp_path / "u8.onnx", tmp_path / "s8.onnx"
    for path, flags in ((u8, []), (s8, ["--activation-type", "s8"])):
        ep("quantize", mnist, "--calib", imgs, "--idx-labels", lbls, "--preset", "mnist", "--calib-limit", 50,
           "--holdout", 100, "--budget", "none", "--rounding", "nearest", "--latency-runs", 0, "-o", path, *flags)
    a = ort_parity.edgepack_outputs(str(s8), {"Input3": x}, ["Plus214_Output_0"], binary, 1, "cpu", None)
    b = ort_parity.edgepack_outputs(str(u8), {"Input3": x}, ["Plus214_Output_0"], binary, 1, "cpu", None)
    assert np.array_equal(a["outputs"]["Plus214_Output_0"], b["outputs"]["Plus214_Output_0"]), (a, b)


def test_weight_only_4bit_with_fitted_rounding_runs_in_onnxruntime(shared, binary, tmp_path):
    """Issue 29, items 4 and 5: --weight-only 4 writes packed int4 blocks behind com.microsoft.DequantizeLinear
    (float16 scales) that onnxruntime runs; GPTQ + bias correction bring it much closer to fp32 than rounding to
    nearest does; edgepack's loader unpacks it and computes what onnxruntime computes; a bundle says int4."""
    import onnx
    import ort_parity
    src = os.path.join(shared, "models", "efficientnet_lite0_fp32.onnx")
    data = os.path.join(shared, "data", "imagenet_sample")
    reports = {}
    for r in ("nearest", "gptq+bias-correction"):
        out = tmp_path / f"w4_{r}.onnx"
        res = ep("quantize", src, "--calib", data, "--preset", "tf", "--shuffle", "--calib-limit", 32, "--holdout", 64,
                 "--weight-only", "4", "--budget", "none", "--rounding", r, "--latency-runs", 3, "--json", "-o", out)
        reports[r] = (out, json.loads(res.stdout)["report"])
    out, rep = reports["gptq+bias-correction"]
    near = reports["nearest"][1]
    assert rep["rounding"]["used"] == {"gptq": True, "bias_correction": True, "sequential": False}
    print(f"4-bit output SQNR: nearest {near['int8']['output_sqnr_db']:.1f} dB, gptq+bc {rep['int8']['output_sqnr_db']:.1f} dB")
    assert rep["int8"]["output_sqnr_db"] > near["int8"]["output_sqnr_db"] + 3
    assert rep["int8"]["top1_agreement"] >= 85, rep["int8"]  # 92 % on 800 images (QUANTIZATION.md)
    assert rep["weight_only"] == {"bits": 4, "group": 32, "coded": False}
    assert sum(la["precision"] == "int4" for la in rep["layers"]) >= 30
    assert os.path.getsize(out) <= 0.17 * os.path.getsize(src)
    # Weight-only runs at fp32 speed on edgepack's CPU backend (int4, and weight-only int8, unpacked once at load):
    # printed, not asserted (a timing on a shared 2-core machine is a benchmark's business; it read 1.6 with a
    # fuzzer on the other core).
    w8 = json.loads(ep("quantize", src, "--calib", data, "--preset", "tf", "--shuffle", "--calib-limit", 8,
                       "--holdout", 8, "--weight-only", "8", "--budget", "none", "--rounding", "nearest",
                       "--latency-runs", 5, "--json", "-o", tmp_path / "w8.onnx").stdout)["report"]
    print(f"weight-only latency vs fp32: int4 x{rep['latency']['ratio']:.2f}, int8 x{w8['latency']['ratio']:.2f}")
    assert w8["weight_only"]["bits"] == 8 and w8["int8"]["outputs"][0]["cosine"] > 0.97, w8["int8"]  # 0.99 here
    g = onnx.load(str(out)).graph
    assert any(t.data_type == onnx.TensorProto.INT4 for t in g.initializer)
    assert any(n.op_type == "DequantizeLinear" and n.domain == "com.microsoft" for n in g.node)
    assert not any(n.op_type == "QuantizeLinear" for n in g.node), "activations stay float"
    x = np.random.RandomState(3).rand(1, 3, 224, 224).astype(np.float32)
    p = ort_parity.compare(str(out), {"input": x}, binary, 2)
    assert p["loaded"] and p["outputs"][0]["cosine"] > 0.99999 and p["outputs"][0]["max_abs_diff"] < 1e-3, p
    bundle = tmp_path / "w4.edgepack"
    ep("pack", out, "-o", bundle, "--preset", "tf", "--main", "int4:int4", "--compress", "zstd")
    info = json.loads(ep("inspect", bundle, "--json").stdout)
    variants = info["bundle"]["manifest"]["variants"]
    assert [v["precision"] for v in variants] == ["int4"], variants


def test_coded_weight_grid_is_plain_int8_onnx_closer_than_int4_blocks_at_the_same_bundle_size(shared, binary, tmp_path):
    """Issue 29, item 5: `--weight-only 4 --weight-grid coded` stores int8 codes on a per-channel step whose codes
    carry 4 bits of entropy. The file is standard int8 DequantizeLinear that onnxruntime runs; its zstd bundle is
    about the size of the int4 blocks' bundle and its output closer to fp32 (same calibration, same rounding, every
    layer at its narrow width); edgepack's loader computes what onnxruntime computes."""
    import onnx
    import ort_parity
    src = os.path.join(shared, "models", "efficientnet_lite0_fp32.onnx")
    data = os.path.join(shared, "data", "imagenet_sample")
    common = ["--calib", data, "--preset", "tf", "--shuffle", "--calib-limit", 32, "--holdout", 64, "--weight-only",
              "4", "--budget", "none", "--latency-runs", 0, "--json"]
    rep, size = {}, {}
    for grid in ("blocks", "coded"):
        out = tmp_path / f"{grid}.onnx"
        rep[grid] = json.loads(ep("quantize", src, *common, "--weight-grid", grid, "-o", out).stdout)["report"]
        bundle = tmp_path / f"{grid}.edgepack"
        ep("pack", out, "-o", bundle, "--preset", "tf", "--main", f"{grid}:int8", "--compress", "zstd")
        size[grid] = os.path.getsize(bundle)
    sq = {g: rep[g]["int8"]["output_sqnr_db"] for g in rep}
    print(f"\n4-bit weights, blocks vs coded: bundle {size['blocks']} vs {size['coded']} bytes, output SQNR "
          f"{sq['blocks']:.1f} vs {sq['coded']:.1f} dB, agreement {rep['blocks']['int8']['top1_agreement']:.1f} vs "
          f"{rep['coded']['int8']['top1_agreement']:.1f} %")
    coded = rep["coded"]
    assert coded["weight_only"] == {"bits": 4, "group": 32, "coded": True}
    # The rate allocation (bits by layer for the same total) is tried and reported; on this model it is kept.
    alloc = coded["rate_allocation"]
    print(f"rate allocation: {alloc['compared'][0]:.1f} → {alloc['compared'][1]:.1f} dB on the choosing samples, "
          f"bits {min(alloc['bits'].values()):.1f}–{max(alloc['bits'].values()):.1f}")
    assert alloc["used"] and alloc["compared"][1] > alloc["compared"][0], alloc
    assert all(3.0 <= b <= 6.0 for b in alloc["bits"].values()), alloc
    assert sum(la["precision"] == "coded" for la in coded["layers"]) >= 30, coded["layers"]
    # About the same bundle (int4 blocks also shrink under zstd, to ~4.15 bits per weight; the codes take ~4.05),
    # measurably closer to fp32: 9.1 dB for int4 blocks, 11.9 dB for the coded grid at 4 bits in every layer and
    # 15.5 dB with the bits allocated by layer.
    assert size["coded"] < 1.05 * size["blocks"], size
    assert sq["coded"] > sq["blocks"] + 2, sq
    g = onnx.load(str(tmp_path / "coded.onnx")).graph
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in g.initializer)
    assert not any(n.domain == "com.microsoft" for n in g.node), "standard ONNX only"
    assert not any(n.op_type == "QuantizeLinear" for n in g.node), "activations stay float"
    x = np.random.RandomState(4).rand(1, 3, 224, 224).astype(np.float32)
    p = ort_parity.compare(str(tmp_path / "coded.onnx"), {"input": x}, binary, 2)
    assert p["loaded"] and p["outputs"][0]["cosine"] > 0.99999 and p["outputs"][0]["max_abs_diff"] < 1e-3, p
    r = ep("quantize", src, *common, "--weight-only", "5", "-o", tmp_path / "x.onnx", check=False)
    assert r.returncode == 2 and "--weight-grid coded" in r.stderr, r.stderr
    for bad in ("1.5", "6.5", "nan"):
        r = ep("quantize", src, *common, "--weight-grid", "coded", "--weight-only", bad, "-o", tmp_path / "x.onnx",
               check=False)
        assert r.returncode == 2 and "2 to 6 bits" in r.stderr, (bad, r.stderr)
    # A fractional rate sizes the bundle between whole bits (the way to a size target).
    frac = tmp_path / "coded35.onnx"
    f = json.loads(ep("quantize", src, *common, "--weight-grid", "coded", "--weight-only", "3.5", "-o", frac).stdout)
    assert f["report"]["weight_only"]["bits"] == 3.5, f["report"]["weight_only"]
    ep("pack", frac, "-o", tmp_path / "coded35.edgepack", "--preset", "tf", "--compress", "zstd")
    s35 = os.path.getsize(tmp_path / "coded35.edgepack")
    print(f"coded grid at 3.5 bits: bundle {s35} bytes ({s35 / size['coded']:.3f} of 4 bits')")
    assert 0.8 * size["coded"] < s35 < 0.95 * size["coded"], (s35, size["coded"])
    # Under a gate, the layers it finds too sensitive get 2 more bits on the same grid, not plain int8 (which costs
    # EfficientNet-Lite0's classifier 7.2 bits per weight once coded).
    gated = [a for a in common if a not in ("--budget", "none")]
    g = json.loads(ep("quantize", src, *gated, "--weight-grid", "coded", "--budget", "sqnr=60", "--max-float-fraction",
                      "0.1", "-o", tmp_path / "gated.onnx").stdout)["report"]
    wider = [la for la in g["layers"] if (la["reason"] or "").startswith("kept at 2 more bits")]
    assert wider and all(la["precision"] == "coded" for la in wider), g["layers"]


def test_method_auto_tries_mse_ranges_when_minmax_misses_the_gate(binary, tmp_path):
    """Issue 29: `--method auto` (the default) quantizes with min-max ranges and, when that misses the gate, with MSE
    ranges too, keeping the closer on the choosing samples (PP-OCRv4 det gives fp32's text boxes only with MSE).
    A gate no INT8 model meets (SQNR 80 dB) makes both passes run: auto's result is the better of `--method minmax`
    and `--method mse`, and a gate min-max meets never starts the MSE pass."""
    mnist = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(5)
    for i in range(24):
        np.save(calib / f"x{i:02}.npy", (rng.exponential(40.0, (1, 1, 28, 28))).astype(np.float32))
    common = ["--calib", calib, "--calib-limit", "16", "--holdout", "8", "--mode", "static", "--latency-runs", "0",
              "--threads", "1", "--json"]  # one thread: the three runs' figures compare exactly
    rep = {}
    for m in ("auto", "minmax", "mse"):
        r = ep("quantize", mnist, *common, "--budget", "sqnr=80", "--method", m, "-o", tmp_path / f"{m}.onnx")
        rep[m] = json.loads(r.stdout)["report"]
    reached = {m: rep[m]["budget"]["reached"] for m in rep}
    assert not any(rep[m]["budget"]["met"] for m in rep), reached
    best = "mse" if reached["mse"] > reached["minmax"] else "minmax"
    assert rep["auto"]["method"] == best and reached["auto"] == reached[best], (reached, rep["auto"]["warnings"])
    said = [w for w in rep["auto"]["warnings"] if "(--method auto)" in w]
    assert len(said) == 1 and said[0].startswith("MSE ranges chosen" if best == "mse" else "min-max ranges kept"), said
    assert not any("(--method auto)" in w for m in ("minmax", "mse") for w in rep[m]["warnings"])
    # The default gate, met by min-max: no MSE pass.
    met = json.loads(ep("quantize", mnist, *common, "-o", tmp_path / "met.onnx").stdout)["report"]
    assert met["budget"]["met"] and met["method"] == "minmax", met["budget"]
    assert not any("(--method auto)" in w for w in met["warnings"]), met["warnings"]


def test_activation_equalization_is_tried_kept_when_closer_and_runs_in_onnxruntime(shared, binary, tmp_path):
    """Issue 29, item 4: `--equalize` moves each channel's range into the weights that read it (SqueezeNet's fire
    modules: ReLU, MaxPool and Concat carry the scale). `on` writes the equalized model, `off` never tries it,
    `auto` (the default) tries it and keeps whichever is closer to fp32 on the choosing samples; onnxruntime runs the
    equalized INT8 file as closely to fp32 as the plain one (QUANTIZATION.md: +2.5 dB output SQNR on 800 images)."""
    import onnxruntime as ort
    from PIL import Image
    src = os.path.join(shared, "models", "squeezenet1.0_fp32.onnx")
    data = os.path.join(shared, "data", "imagenet_sample")
    common = ["--calib", data, "--preset", "caffe_bgr", "--shuffle", "--calib-limit", 24, "--holdout", 24,
              "--budget", "none", "--rounding", "nearest", "--latency-runs", 0, "--threads", 1, "--json"]
    rep = {}
    for e in ("off", "on", "auto"):
        r = ep("quantize", src, *common, "--equalize", e, "-o", tmp_path / f"{e}.onnx")
        rep[e] = json.loads(r.stdout)["report"]
    assert "equalization" not in rep["off"]
    on = rep["on"]["equalization"]
    assert on["used"] and on["groups"] >= 20 and on["channels"] >= 2000, on
    (k0, as_given), (k1, equalized) = on["compared"]
    assert (k0, k1) == ("as given", "equalized") and as_given == pytest.approx(rep["off"]["int8"]["output_sqnr_db"])
    auto = rep["auto"]["equalization"]
    assert auto["used"] == (equalized > as_given), auto
    kept = "on" if auto["used"] else "off"
    assert rep["auto"]["int8"]["output_sqnr_db"] == pytest.approx(rep[kept]["int8"]["output_sqnr_db"])
    # onnxruntime runs both files; neither strays from fp32 on a real image.
    img = sorted(f for f in os.listdir(os.path.join(data, "images")))[-1]
    rgb = np.asarray(Image.open(os.path.join(data, "images", img)).convert("RGB").resize((224, 224)), np.float32)
    x = (rgb[:, :, ::-1] - np.array([103.939, 116.779, 123.68], np.float32)).transpose(2, 0, 1)[None].copy()
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0].ravel()  # noqa: E731
    ref = run(src)
    for e in ("off", "on"):
        y = run(tmp_path / f"{e}.onnx")
        assert np.dot(y, ref) / (np.linalg.norm(y) * np.linalg.norm(ref)) > 0.98, e
