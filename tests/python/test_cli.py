"""The CLI as a user meets it: keys, signed bundles, verification failures, bad inputs, exit codes, the demo.
Uses only files shipped in the repo (assets/), so it runs without ../shared."""
import json
import os
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ROOT, ep

ASSETS = os.path.join(ROOT, "assets")
MNIST = os.path.join(ASSETS, "models", "mnist_cntk_opset8_simplified.onnx")
ULTRA = os.path.join(ASSETS, "models", "ultraface_rfb_320.onnx")

VERIFY, BAD_INPUT, UNSUPPORTED, USAGE = 3, 4, 5, 2


@pytest.fixture(scope="module")
def signed(binary, tmp_path_factory):
    d = tmp_path_factory.mktemp("signed")
    ep("keygen", "-o", d / "release")
    ep("keygen", "-o", d / "other")
    b = d / "mnist.edgepack"
    ep("pack", MNIST, "-o", b, "--preset", "mnist", "--sign", d / "release.key", "--meta", "license=MIT")
    return d, b


def test_signed_bundle_verifies_with_the_right_key_only(signed):
    d, b = signed
    r = ep("verify", b, "--key", d / "release.pub", "--json")
    assert json.loads(r.stdout)["trusted"] is True
    r = ep("verify", b, "--key", d / "other.pub", check=False)
    assert r.returncode == VERIFY and "wrong key" in r.stderr
    r = ep("run", b, "--key", d / "other.pub", "--raw", check=False)
    assert r.returncode == VERIFY
    # The secret key given where the public one belongs is named as such (issue 25, 12).
    r = ep("verify", b, "--key", d / "release.key", check=False)
    assert r.returncode != 0 and "secret signing key" in r.stderr and ".pub" in r.stderr, r.stderr


def test_tampered_and_truncated_bundles_are_rejected(signed, tmp_path):
    d, b = signed
    data = bytearray(open(b, "rb").read())
    man = json.loads(ep("inspect", b, "--json").stdout)["bundle"]["manifest"]
    model = next(m for m in man["members"] if m["path"].endswith(".onnx"))
    bad = bytearray(data)
    bad[model["offset"] + model["size"] // 2] ^= 0x01
    (tmp_path / "tampered.edgepack").write_bytes(bad)
    r = ep("verify", tmp_path / "tampered.edgepack", check=False)
    assert r.returncode == VERIFY and "tampered" in r.stderr
    (tmp_path / "cut.edgepack").write_bytes(data[: len(data) // 2])
    r = ep("verify", tmp_path / "cut.edgepack", check=False)
    assert r.returncode == VERIFY and "truncated" in r.stderr
    r = ep("run", tmp_path / "cut.edgepack", "--raw", check=False)
    assert r.returncode == VERIFY


def test_manifest_matches_the_checked_in_schema(signed):
    import jsonschema
    _, b = signed
    schema = json.load(open(os.path.join(ROOT, "schema", "manifest.v1.schema.json")))
    man = json.loads(ep("inspect", b, "--json").stdout)["bundle"]["manifest"]
    jsonschema.validate(man, schema)
    assert man["format"] == "edgepack" and man["format_version"] == 1
    assert man["variants"][0]["precision"] == "fp32" and len(man["variants"][0]["sha256"]) == 64


def test_bad_inputs_are_typed_errors(binary, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not a model")
    r = ep("run", junk, "--raw", check=False)
    assert r.returncode == BAD_INPUT and "malformed" in r.stderr.lower()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(open(MNIST, "rb").read()[:5000])
    assert ep("run", cut, "--raw", check=False).returncode == BAD_INPUT

    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    assert ep("run", MNIST, x, "--raw").returncode == 0
    np.save(x, np.zeros((1, 1, 27, 28), np.float32))
    r = ep("run", MNIST, x, check=False)
    assert r.returncode == BAD_INPUT and "shape" in r.stderr
    np.save(x, np.zeros((1, 1, 28, 28), np.int64))
    r = ep("run", MNIST, x, check=False)
    assert r.returncode == BAD_INPUT and "dtype" in r.stderr
    r = ep("run", MNIST, "--input", f"nope={x}", check=False)
    assert r.returncode == BAD_INPUT and "unknown input" in r.stderr
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = ep("run", MNIST, img, "--preset", "mnist", check=False)
    assert r.returncode == BAD_INPUT
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ep("eval", MNIST, empty, "--preset", "mnist", check=False)
    assert r.returncode == BAD_INPUT and "no labelled samples" in r.stderr
    assert ep("run", check=False).returncode == USAGE


def test_unsupported_op_names_the_op_and_node(binary, tmp_path):
    node = helper.make_node("TotallyCustomOp", ["x"], ["y"], name="weird_node", domain="")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    r = ep("inspect", p, check=False)
    assert r.returncode == UNSUPPORTED
    assert "TotallyCustomOp" in r.stderr and "weird_node" in r.stderr


def test_detector_bundle_from_shipped_assets(binary, tmp_path):
    b = tmp_path / "faces.edgepack"
    ep("pack", ULTRA, "-o", b, "--preset", "ultraface", "--task", "detection")
    r = json.loads(ep("run", b, os.path.join(ASSETS, "photos", "skimage_astronaut.png"), "--json").stdout)
    dets = r["results"][0]["detections"]
    assert len(dets) == 1 and dets[0]["score"] > 0.99


def test_bench_reports_every_figure(binary):
    r = json.loads(ep("bench", MNIST, "--runs", "20", "--threads", "1", "--json").stdout)
    for k in ["load_ms", "first_run_ms", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "peak_rss_mb"]:
        assert r[k] > 0, k
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["profile"] is None


def test_bench_profile_times_every_op_type(binary):
    r = json.loads(ep("bench", MNIST, "--runs", "10", "--threads", "1", "--profile", "--json").stdout)
    ops = {o["op"]: o for o in r["profile"]}
    assert ops, r
    assert all(o["count"] >= 1 and o["ms_per_run"] >= 0 for o in ops.values())
    # The op times add up to no more than a whole run (plus timer slack).
    assert sum(o["ms_per_run"] for o in ops.values()) <= r["p99_ms"] * 1.5 + 0.5


def test_demo_runs_offline_from_the_embedded_model(binary, tmp_path):
    r = ep("demo", "--out", tmp_path / "demo", "--threads", "1", timeout=600)
    assert "tiger cat" in r.stdout and "espresso" in r.stdout
    assert "quantized to INT8" in r.stdout
    # Calibrated on three photos only; the cat and the espresso are clear-cut, the astronaut is a near tie in fp32.
    same = re.search(r"int8 top-1 = fp32 top-1 on (\d) of 3 images", r.stdout)
    assert same and int(same.group(1)) >= 2, r.stdout
    assert (tmp_path / "demo" / "efficientnet_lite0.edgepack").exists()
    man = json.loads(ep("inspect", tmp_path / "demo" / "efficientnet_lite0.edgepack", "--json").stdout)
    assert "int8" in json.dumps(man) and "quantization.html" in json.dumps(man)
    r = ep("verify", tmp_path / "demo" / "efficientnet_lite0.edgepack", "--key", tmp_path / "demo" / "demo.pub")
    assert "signature valid, trusted key" in r.stdout


def test_eval_on_class_folders_matched_by_label_or_wnid(binary, tmp_path):
    b = tmp_path / "effnet.edgepack"
    ep("pack", os.path.join(ASSETS, "models", "efficientnet_lite0_fp32.onnx"), "-o", b, "--preset", "tf",
       "--labels", os.path.join(ASSETS, "models", "imagenet_synsets.txt"))
    photos = os.path.join(ASSETS, "photos")
    for layout in [{"espresso": "skimage_coffee.png", "tiger cat": "skimage_chelsea.png"},
                   {"n07920052": "skimage_coffee.png", "n02123159": "skimage_chelsea.png"}]:
        root = tmp_path / ("data_" + next(iter(layout)))
        for cls, photo in layout.items():
            (root / cls).mkdir(parents=True)
            os.symlink(os.path.join(photos, photo), root / cls / photo)
        r = json.loads(ep("eval", b, root, "--json").stdout)
        assert r["samples"] == 2
        assert r["top1"] == 1.0, r


def test_a_closed_stdout_pipe_ends_quietly(binary):
    """`edgepack inspect MODEL --json | head -c 10`: the reader goes away before edgepack writes. It must end as
    Unix filters do (SIGPIPE), never with Rust's "failed printing to stdout" panic and exit 101 (issue 25, 3)."""
    import subprocess
    model = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
    p = subprocess.Popen([binary, "inspect", model, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first write
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == -13, (p.returncode, err)  # killed by SIGPIPE, as `cat` is
    assert "panicked" not in err and "Broken pipe" not in err, err
