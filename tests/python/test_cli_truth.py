"""Every command tells the truth (issue 25): one regression test per defect a new user met, run through the binary
as a user runs it, and the conventions of the tools they know (exit-code classes, --json documents, completions,
man pages, --version, -q/-v, bench statistics and traces). The live-server load client is tested in
test_serve.py (`test_bench_url_measures_a_live_server`)."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, edgepack_bin, ep

ASSETS = os.path.join(ROOT, "assets")
MNIST = os.path.join(ASSETS, "models", "mnist_cntk_opset8_simplified.onnx")
ULTRA = os.path.join(ASSETS, "models", "ultraface_rfb_320.onnx")
EFFNET = os.path.join(ASSETS, "models", "efficientnet_lite0_fp32.onnx")
SYNSETS = os.path.join(ASSETS, "models", "imagenet_synsets.txt")
PHOTOS = os.path.join(ASSETS, "photos")
OK, FAILURE, USAGE, VERIFY, BAD_INPUT, UNSUPPORTED, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


@pytest.fixture(scope="module")
def faces(binary, tmp_path_factory):
    b = tmp_path_factory.mktemp("faces") / "faces.edgepack"
    ep("pack", ULTRA, "-o", b, "--preset", "ultraface", "--task", "detection")
    return b


@pytest.fixture(scope="module")
def digits(binary, tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    ep("keygen", "-o", d / "release")
    b = d / "mnist.edgepack"
    ep("pack", MNIST, "-o", b, "--preset", "mnist", "--sign", d / "release.key")
    x = d / "x.npy"
    np.save(x, np.zeros((1, 1, 28, 28), np.float32))
    return d, b, x


def mnist_idx(shared):
    m = os.path.join(shared, "data", "mnist")
    return os.path.join(m, "t10k-images-idx3-ubyte.gz"), os.path.join(m, "t10k-labels-idx1-ubyte.gz")


# 1. Several images: one result each, with its path, in the order given.
def test_each_image_gets_its_own_detections(faces, shared):
    crowd = os.path.join(shared, "data", "photos", "ultraface_crowd.jpg")
    astro = os.path.join(shared, "data", "photos", "skimage_astronaut.png")
    alone = {p: json.loads(ep("run", faces, p, "--json").stdout)["results"][0]["detections"] for p in (crowd, astro)}
    assert len(alone[crowd]) == 44 and len(alone[astro]) == 1
    for order in ([crowd, astro], [astro, crowd]):
        r = json.loads(ep("run", faces, *order, "--json").stdout)
        assert [x["input"] for x in r["results"]] == order
        for x in r["results"]:
            assert len(x["detections"]) == len(alone[x["input"]])
            for got, want in zip(x["detections"], alone[x["input"]]):
                assert abs(got["score"] - want["score"]) < 1e-4 and abs(got["x1"] - want["x1"]) < 0.5
    text = ep("run", faces, crowd, astro).stdout
    assert f"{crowd}: 44 detections" in text and f"{astro}: 1 detections" in text, text


def test_each_image_gets_its_own_classes(binary, tmp_path):
    b = tmp_path / "effnet.edgepack"
    ep("pack", EFFNET, "-o", b, "--preset", "tf", "--labels", SYNSETS)
    imgs = [os.path.join(PHOTOS, p) for p in ("skimage_coffee.png", "skimage_chelsea.png")]
    r = json.loads(ep("run", b, *imgs, "--json", "--top-k", "1").stdout)
    assert [x["input"] for x in r["results"]] == imgs
    assert r["results"][0]["top_k"][0]["label"].startswith("espresso")
    assert "cat" in r["results"][1]["top_k"][0]["label"]


# 2. pack checks the preset, the labels and the task against the model, and names the fix.
def test_pack_checks_the_bundle_against_the_model(binary, tmp_path):
    out = tmp_path / "x.edgepack"
    r = ep("pack", MNIST, "-o", out, "--preset", "tf", check=False)
    assert r.returncode == USAGE and "takes 1" in r.stderr and "mnist" in r.stderr, r.stderr
    labels = tmp_path / "imagenet.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
    r = ep("pack", MNIST, "-o", out, "--preset", "mnist", "--labels", labels, check=False)
    assert r.returncode == USAGE and "1000 labels" in r.stderr and "10 classes" in r.stderr, r.stderr
    r = ep("pack", ULTRA, "-o", out, "--preset", "ultraface", check=False)
    assert r.returncode == USAGE and "--task detection" in r.stderr, r.stderr
    assert not out.exists()
    labels.write_text("\n".join(str(i) for i in range(10)) + "\n")
    ep("pack", MNIST, "-o", out, "--preset", "mnist", "--labels", labels)
    assert out.exists()


# 4. No Wayland noise from the GPU probe on a headless machine.
def test_no_xdg_runtime_dir_noise_from_the_gpu_probe(binary):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    for args in (["devices"], ["run", MNIST, "--device", "auto", "--raw", os.path.join(PHOTOS, "skimage_coffee.png"),
                              "--preset", "mnist"]):
        r = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "XDG_RUNTIME_DIR" not in r.stderr, r.stderr


# 5. Errors say each thing once, without Rust Debug text.
def test_errors_say_each_thing_once(digits, tmp_path):
    d, b, x = digits
    r = ep("run", MNIST, tmp_path / "missing.npy", check=False)
    assert r.stderr.count("No such file or directory") == 1, r.stderr
    ep("keygen", "-o", tmp_path / "other")
    r = ep("verify", b, "--key", tmp_path / "other.pub", check=False)
    assert r.stderr.count("wrong key") == 1 and r.stderr.count("signed by") == 1, r.stderr
    data = bytearray(b.read_bytes())
    data[-100] ^= 1
    (tmp_path / "t.edgepack").write_bytes(data)
    r = ep("verify", tmp_path / "t.edgepack", check=False)
    assert r.returncode == VERIFY and r.stderr.count("tampered") == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_rust_debug_text_in_output_or_errors(faces, digits, tmp_path):
    _, b, _ = digits
    text = ep("inspect", b).stdout
    for leak in ("Fp32", "(Classification)", "[Cpu", "Some("):
        assert leak not in text, text
    assert "(classification)" in text and "fp32" in text and "backends cpu, gpu" in text, text
    folders = tmp_path / "data" / "face"
    folders.mkdir(parents=True)
    os.symlink(os.path.join(PHOTOS, "skimage_astronaut.png"), folders / "a.png")
    r = ep("eval", faces, tmp_path / "data", check=False)
    assert r.returncode != 0 and "SsdDetection" not in r.stderr and "{" not in r.stderr, r.stderr


# 6. A collapsed prune is a loud warning, and a failure with --strict.
def test_a_collapsed_prune_warns_and_fails_when_strict(shared, tmp_path):
    images, labels = mnist_idx(shared)
    args = ["prune", MNIST, "--calib", images, "--idx-labels", labels, "--preset", "mnist", "--method", "unstructured",
            "--calib-limit", "64", "--holdout", "200", "--latency-runs", "0", "--amount"]
    r = ep(*args, "0.95", "-o", tmp_path / "p.onnx", "--json")
    assert "accuracy collapsed" in r.stderr and "warning:" in r.stderr, r.stderr
    assert any("collapsed" in w for w in json.loads(r.stdout)["report"]["warnings"])
    r = ep(*args, "0.95", "-o", tmp_path / "p2.onnx", "--strict", check=False)
    assert r.returncode == FAILURE and "--strict" in r.stderr, r.stderr
    assert (tmp_path / "p2.onnx").exists()  # written for inspection
    # A gentle amount holds: no warning.
    r = ep(*args, "0.3", "-o", tmp_path / "p3.onnx", "--strict")
    assert "collapsed" not in r.stderr, r.stderr


# 7. Outputs are checked before the work; a failed report leaves no model behind.
def test_unwritable_outputs_fail_before_the_work(binary, tmp_path):
    common = ["quantize", EFFNET, "--calib", PHOTOS, "--preset", "tf", "--latency-runs", "0"]
    t0 = time.time()
    r = ep(*common, "-o", "/proc/edgepack-q.onnx", check=False)
    assert r.returncode == BAD_INPUT and "cannot write /proc/edgepack-q.onnx" in r.stderr, r.stderr
    assert time.time() - t0 < 10, "the check must come before calibration"
    r = ep(*common, "-o", tmp_path / "q.onnx", "--report", "/proc/edgepack-r.json", check=False)
    assert r.returncode == BAD_INPUT and "edgepack-r.json" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []
    r = ep("prune", MNIST, "--calib", PHOTOS, "--preset", "mnist", "--amount", "0.1", "-o", tmp_path / "no" / "p.onnx",
           check=False)
    assert r.returncode == BAD_INPUT and "does not exist" in r.stderr, r.stderr


# 8. SIGINT/SIGTERM remove the files being written and say so.
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, INTERRUPTED), (signal.SIGTERM, 143)])
def test_an_interrupt_removes_partial_outputs(binary, tmp_path, sig, code):
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([binary, "quantize", MNIST, "--calib", PHOTOS, "--preset", "mnist", "--latency-runs", "0",
                          "-o", out / "q.onnx"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "EDGEPACK_SLOW_WRITES_MS": "20000"})
    deadline = time.time() + 120
    while not any(".tmp-" in f for f in os.listdir(out)):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, (p.returncode, err)
    assert "interrupted" in err and "removed" in err, err
    assert os.listdir(out) == [], os.listdir(out)


# 9. Exit codes are the README's classes.
def test_exit_codes_follow_the_readme_table(digits, tmp_path):
    d, b, x = digits
    cases = {
        "ok": (["run", MNIST, x, "--raw"], OK),
        "--runs 0": (["bench", MNIST, "--runs", "0"], USAGE),
        "--amount 1.5": (["prune", MNIST, "--calib", PHOTOS, "--amount", "1.5", "-o", tmp_path / "p.onnx"], USAGE),
        "bad --shape": (["run", MNIST, x, "--shape", "1,x"], USAGE),
        "no input": (["run", MNIST], USAGE),
        "--preset nosuch": (["run", MNIST, x, "--preset", "nosuch"], USAGE),
        "unknown flag": (["run", MNIST, "--nosuch"], USAGE),
        "wrong key file": (["verify", b, "--key", d / "release.key"], USAGE),
        "unknown --variant": (["run", b, x, "--variant", "nope"], USAGE),
        "missing input file": (["run", MNIST, tmp_path / "missing.npy"], BAD_INPUT),
        "missing model": (["inspect", tmp_path / "missing.onnx"], BAD_INPUT),
        "wrong shape": (["run", MNIST, tmp_path / "bad.npy"], BAD_INPUT),
        "malformed model": (["inspect", tmp_path / "junk.onnx"], BAD_INPUT),
        "wrong signer": (["run", b, x, "--key", tmp_path / "other.pub"], VERIFY),
        "unsupported op": (["inspect", tmp_path / "custom.onnx"], UNSUPPORTED),
        "collapse with --strict": None,  # FAILURE: test_a_collapsed_prune_warns_and_fails_when_strict
    }
    ep("keygen", "-o", tmp_path / "other")
    np.save(tmp_path / "bad.npy", np.zeros((1, 1, 27, 28), np.float32))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07this is not a model")
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("TotallyCustomOp", ["x"], ["y"], name="weird")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "custom.onnx")
    for name, case in cases.items():
        if case is None:
            continue
        args, code = case
        r = ep(*args, check=False)
        assert r.returncode == code, (name, r.returncode, r.stderr)
        if code != OK:
            assert r.stderr.startswith("error:") or "error:" in r.stderr, (name, r.stderr)


# 10. Bad values are refused, not silently accepted.
def test_bad_values_are_refused(digits, tmp_path):
    d, b, x = digits
    r = ep("rewrite", MNIST, tmp_path / "r.onnx", "--opset", "99", check=False)
    assert r.returncode == USAGE and "opset 13" in r.stderr and not (tmp_path / "r.onnx").exists(), r.stderr
    r = ep("rewrite", MNIST, tmp_path / "r.onnx", "--opset", "5", check=False)
    assert r.returncode == USAGE and "downgrade" in r.stderr, r.stderr
    r = ep("quantize", MNIST, "--calib", PHOTOS, "--preset", "mnist", "--exclude", "NoSuchNode", "-o", tmp_path / "q.onnx",
           check=False)
    assert r.returncode == USAGE and "NoSuchNode" in r.stderr, r.stderr
    r = ep("quantize", MNIST, "--calib", PHOTOS, "--preset", "mnist", "--calib-limit", "0", "-o", tmp_path / "q.onnx",
           check=False)
    assert r.returncode == USAGE, r.stderr
    r = ep("run", MNIST, x, "--top-k", "0", check=False)
    assert r.returncode == USAGE, r.stderr
    # batch: a broken image among good ones is written with its error, and the run does not claim success.
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    os.symlink(os.path.join(PHOTOS, "skimage_coffee.png"), imgs / "good.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = ep("batch", b, imgs, "-o", tmp_path / "out.jsonl", check=False)
    assert r.returncode == BAD_INPUT and "1 of 2 items failed" in r.stderr, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and sum("error" in line for line in lines) == 1


# 11. --json failures are JSON documents too.
def test_json_failures_are_documents(digits, tmp_path):
    _, _, x = digits
    r = ep("run", MNIST, tmp_path / "missing.npy", "--json", check=False)
    doc = json.loads(r.stdout)
    assert r.returncode == BAD_INPUT and doc["ok"] is False and doc["error"]["code"] == BAD_INPUT
    assert doc["error"]["kind"] == "bad_input" and "missing.npy" in doc["error"]["message"]
    assert doc["schema_version"] == 1 and doc["edgepack_version"]
    r = ep("bench", MNIST, "--runs", "0", "--json", check=False)
    doc = json.loads(r.stdout)
    assert r.returncode == USAGE and doc["error"]["kind"] == "usage", r.stdout
    ok = json.loads(ep("run", MNIST, x, "--raw", "--json").stdout)
    assert ok["ok"] is True and ok["schema_version"] == 1
    assert ok["backend"]["kind"] == "cpu" and ok["backend"]["threads"] >= 1 and ok["backend"]["selection"]


# 12. The smaller ones.
def test_smaller_defects(digits, tmp_path, faces):
    d, b, x = digits
    version = ep("--version").stdout
    assert ep("pack", "--version").stdout.split()[1] == version.split()[1]
    out = tmp_path / "v.edgepack"
    ep("pack", MNIST, "-o", out, "--preset", "mnist", "--bundle-version", "2.1.0")
    assert json.loads(ep("inspect", out, "--json").stdout)["bundle"]["manifest"]["version"] == "2.1.0"
    r = ep("eval", MNIST, PHOTOS, "--preset", "mnist", "--batch", "4", check=False)
    assert r.returncode == USAGE and "--free-batch" in r.stderr, r.stderr
    r = ep("pack", b, "-o", tmp_path / "again.edgepack", check=False)
    assert r.returncode == USAGE and "bundle" in r.stderr and "protobuf" not in r.stderr, r.stderr
    r = ep("quantize", MNIST, "--calib", PHOTOS, "--preset", "mnist", "-o", tmp_path / "q.onnx")
    assert "0 thread" not in r.stdout, r.stdout
    assert "EDGEPACK_LOG" in ep("--help").stdout
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "EDGEPACK_LOG" in readme
    for cmd in ("run", "eval", "bench"):
        assert "--device" in ep(cmd, "--help").stdout
    # The devices list names the adapter runs use (never an OpenGL one).
    dev = json.loads(ep("devices", "--json").stdout)
    if "api" in dev["gpu"]:
        assert dev["gpu"]["api"] in ("Vulkan", "Metal", "Dx12"), dev


def test_every_json_output_carries_the_schema(digits, faces, tmp_path):
    d, b, x = digits
    docs = [
        ep("inspect", b, "--json").stdout,
        ep("verify", b, "--json").stdout,
        ep("run", b, x, "--raw", "--json").stdout,
        ep("run", faces, os.path.join(PHOTOS, "skimage_astronaut.png"), "--json").stdout,
        ep("bench", MNIST, "--runs", "5", "--json").stdout,
        ep("devices", "--json").stdout,
        ep("pack", MNIST, "-o", tmp_path / "m.edgepack", "--preset", "mnist", "--json").stdout,
    ]
    for doc in docs:
        j = json.loads(doc)
        assert j["schema_version"] == 1 and j["ok"] is True and j["edgepack_version"], doc[:200]


def test_version_completions_and_man_pages(binary, tmp_path):
    v = ep("--version").stdout
    assert "commit " in v and "features:" in v and "tract" in v, v
    for shell, marker in (("bash", "complete -F"), ("zsh", "#compdef edgepack"), ("fish", "complete -c edgepack")):
        script = ep("completions", shell).stdout
        assert marker in script and "quantize" in script, shell
    ep("man", "--out", tmp_path / "man")
    pages = sorted(os.listdir(tmp_path / "man"))
    assert "edgepack.1" in pages and "edgepack-run.1" in pages and "edgepack-quantize.1" in pages, pages
    page = (tmp_path / "man" / "edgepack-run.1").read_text()
    assert ".TH" in page and "top\\-k" in page


def test_quiet_and_verbose(binary, tmp_path):
    args = ["rewrite", MNIST, tmp_path / "r.onnx", "--opset", "8"]
    assert "warning:" in ep(*args).stderr  # "changes nothing"
    assert ep("-q", *args).stderr == ""
    r = ep("run", MNIST, os.path.join(PHOTOS, "skimage_coffee.png"), "--preset", "mnist", "--raw", "-v")
    assert "note: backend" in r.stderr, r.stderr
    assert ep("run", MNIST, "--nosuch", "-q", check=False).returncode == USAGE


def test_bench_statistics_csv_trace_and_duration(binary, tmp_path):
    csv, trace = tmp_path / "t.csv", tmp_path / "t.json"
    r = json.loads(ep("bench", MNIST, "--runs", "30", "--threads", "1", "--csv", csv, "--trace", trace, "--json").stdout)
    lat = r["latency"]
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"] and lat["stddev_ms"] >= 0
    assert len(r["times_ms"]) == r["runs"] == 30
    assert isinstance(r["stability"]["stable"], bool) and len(r["stability"]["window_p50_ms"]) == 3
    rows = csv.read_text().splitlines()
    assert rows[0] == "run,latency_ms" and len(rows) == 31
    t = json.loads(trace.read_text())
    events = t["traceEvents"]
    assert events and all(e["ph"] == "X" and e["dur"] >= 0 for e in events)
    # Named by node: the ONNX model's node names appear (tract keeps them, with suffixes for what it split).
    import onnx
    names = {n.name for n in onnx.load(MNIST).graph.node}
    assert any(any(e["name"].startswith(n) for n in names) for e in events), [e["name"] for e in events][:10]
    r = json.loads(ep("bench", MNIST, "--runs", "1", "--duration", "0.5", "--json").stdout)
    assert r["seconds"] >= 0.5 and r["runs"] > 1
