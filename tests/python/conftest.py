"""Shared fixtures: the edgepack binary, the shared models/data, and bundles packed once per session."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def edgepack_bin():
    b = os.environ.get("EDGEPACK_BIN")
    if b:
        return b
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(tgt, "release", "edgepack")


def ep(*args, check=True, timeout=1200, env=None):
    """Runs the edgepack binary; returns the CompletedProcess (stdout/stderr as text). `env`: extra variables."""
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    r = subprocess.run([edgepack_bin(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and r.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(map(str, args))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def shared():
    d = os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared")
    d = os.path.abspath(d)
    if not os.path.isdir(os.path.join(d, "models")):
        msg = f"SKIPPED: shared models/data not found at {d}; the acceptance tests against real models did not run"
        if os.environ.get("EDGEPACK_REQUIRE_SHARED"):
            pytest.fail(msg.replace("SKIPPED", "REQUIRED"))
        print("\n" + "!" * 20 + " " + msg, file=sys.stderr)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def binary():
    b = edgepack_bin()
    if not os.path.exists(b):
        pytest.fail(f"edgepack binary not built at {b} (cargo build --release)")
    return b


@pytest.fixture(scope="session")
def bundles(shared, binary, tmp_path_factory):
    """The shared models packed with the pre/post-processing of MODELS.md."""
    d = tmp_path_factory.mktemp("bundles")
    m = os.path.join(shared, "models")
    synsets = os.path.join(shared, "data", "imagenet_synsets.txt")
    out = {}
    specs = {
        "efficientnet": ("efficientnet_lite0_fp32.onnx", ["--preset", "tf", "--labels", synsets]),
        "squeezenet": ("squeezenet1.0_fp32.onnx", ["--preset", "caffe_bgr", "--labels", synsets]),
        "mnist7": ("mnist_cntk_opset7.onnx", ["--preset", "mnist"]),
        "mnist8": ("mnist_cntk_opset8_simplified.onnx", ["--preset", "mnist"]),
        "ultraface": ("ultraface_rfb_320.onnx", ["--preset", "ultraface", "--task", "detection"]),
    }
    for key, (fname, extra) in specs.items():
        path = d / f"{key}.edgepack"
        ep("pack", os.path.join(m, fname), "-o", path, *extra)
        out[key] = str(path)
    return out
