"""`edgepack serve` (issue 6) against real clients over loopback: tritonclient's HTTP client, curl (the README's
examples), promtool on /metrics, raw HTTP for the error cases, and a SIGTERM under load that must lose no accepted
request. The repository is built from the shipped models (assets/), so these tests need nothing from ../shared."""
import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import sys
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, edgepack_bin, ep

MNIST = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
EFFNET = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
SYNSETS = os.path.join(ROOT, "assets", "models", "imagenet_synsets.txt")
PHOTOS = os.path.join(ROOT, "assets", "photos")


def require(tool, why):
    if shutil.which(tool):
        return shutil.which(tool)
    if os.environ.get("CI") == "true":
        pytest.fail(f"REQUIRED: `{tool}` is not installed ({why}); .ci/run installs it")
    pytest.skip(f"SKIPPED: `{tool}` is not installed ({why})")


class Server:
    def __init__(self, repo, *args, wait_ready=True):
        self.proc = subprocess.Popen([edgepack_bin(), "serve", "--repo", str(repo), "--addr", "127.0.0.1:0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = []
        line = self.proc.stderr.readline()
        self.log.append(line)
        m = re.search(r"listening on http://([\d.]+:\d+)", line)
        assert m, f"no address in {line!r}"
        self.url = f"http://{m[1]}"
        self.host = m[1]
        g = re.search(r"and grpc://([\d.]+:\d+)", line)
        self.grpc = g[1] if g else None
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline:
            status, body, _ = self.get("/v2/health/ready")
            if status == 200 or (not wait_ready and b'"unavailable"' in body):
                return
            assert self.proc.poll() is None, "".join(self.log)
            time.sleep(0.2)
        raise AssertionError("server not ready in 300 s:\n" + "".join(self.log))

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)
        except (urllib.error.URLError, ConnectionError) as e:
            return None, str(e).encode(), {}

    def get(self, path):
        return self.request("GET", path)

    def post_json(self, path, obj, headers=None):
        return self.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


def mnist_input(seed):
    rng = np.random.default_rng(seed)
    return rng.random((1, 1, 28, 28), dtype=np.float32)


def mnist_reference(x):
    import onnxruntime as ort

    s = ort.InferenceSession(MNIST, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, binary):
    r = tmp_path_factory.mktemp("repo")
    for v in ("1", "2"):
        (r / "mnist" / v).mkdir(parents=True)
        ep("pack", MNIST, "--preset", "mnist", "-o", r / "mnist" / v / "model.edgepack")
    (r / "mnist" / "config.json").write_text(json.dumps({
        "max_batch_size": 8, "max_queue_delay_ms": 5, "instances": 2,
        "routing": {"default": "1", "shadow": {"version": "2", "percent": 100},
                    "ab": {"a": "1", "b": "2", "percent_b": 50, "header": "x-user"}}}))
    (r / "effnet" / "1").mkdir(parents=True)
    ep("pack", EFFNET, "--preset", "tf", "--labels", SYNSETS, "-o", r / "effnet" / "1" / "model.edgepack")
    (r / "effnet" / "config.json").write_text(json.dumps({"max_batch_size": 4, "max_queue_delay_ms": 2}))
    return r


@pytest.fixture(scope="module")
def server(repo):
    s = Server(repo, "--poll", "0.5", "--max-body-mib", "4", "--device", "cpu", "--grpc-addr", "127.0.0.1:0")
    yield s
    assert s.stop() == 0, "".join(s.log[-20:])


def test_tritonclient_metadata_and_infer(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url=server.host)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("mnist") and c.is_model_ready("mnist", "2")
    meta = c.get_model_metadata("mnist")
    assert meta["name"] == "mnist" and meta["versions"] == ["1", "2"]
    inp = meta["inputs"][0]
    assert inp["datatype"] == "FP32" and inp["shape"] == [-1, 1, 28, 28], inp
    out_name = meta["outputs"][0]["name"]
    for binary in (True, False):
        x = mnist_input(1 if binary else 2)
        i = httpclient.InferInput(inp["name"], list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        o = httpclient.InferRequestedOutput(out_name, binary_data=binary)
        r = c.infer("mnist", [i], outputs=[o], model_version="1", request_id="r1")
        y = r.as_numpy(out_name)
        np.testing.assert_allclose(y, mnist_reference(x), rtol=1e-4, atol=1e-4)
        assert r.get_response()["model_version"] == "1" and r.get_response()["id"] == "r1"
    # No outputs named: tritonclient asks for every output in binary.
    x = mnist_input(3)
    i = httpclient.InferInput(inp["name"], list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    y = c.infer("mnist", [i]).as_numpy(out_name)
    np.testing.assert_allclose(y, mnist_reference(x), rtol=1e-4, atol=1e-4)


def test_tritonclient_grpc_health_metadata_infer_and_errors(server):
    """Issue 30, item 1: KServe v2 gRPC through tritonclient.grpc: health, metadata, config, infer (raw tensors),
    the HTTP error cases as gRPC status codes, and the same metrics."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert server.grpc, "the server printed no gRPC address"
    c = grpcclient.InferenceServerClient(url=server.grpc)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("mnist") and c.is_model_ready("mnist", "2")
    assert c.get_server_metadata().name == "edgepack"
    meta = c.get_model_metadata("mnist")
    assert meta.name == "mnist" and list(meta.versions) == ["1", "2"]
    inp, out = meta.inputs[0], meta.outputs[0]
    assert inp.datatype == "FP32" and list(inp.shape) == [-1, 1, 28, 28], inp
    cfg = c.get_model_config("mnist").config
    assert cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [1, 28, 28], cfg
    x = mnist_input(11)
    i = grpcclient.InferInput(inp.name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    r = c.infer("mnist", [i], outputs=[grpcclient.InferRequestedOutput(out.name)], model_version="2", request_id="g1")
    np.testing.assert_allclose(r.as_numpy(out.name), mnist_reference(x), rtol=1e-4, atol=1e-4)
    resp = r.get_response()
    assert resp.model_version == "2" and resp.id == "g1"
    # A batch of 3 in one request, no outputs named (all of them), the A/B key in the metadata routes it.
    xb = np.concatenate([mnist_input(20 + k) for k in range(3)])
    i = grpcclient.InferInput(inp.name, list(xb.shape), "FP32")
    i.set_data_from_numpy(xb)
    r = c.infer("mnist", [i], headers={"x-user": "user-3"})
    want = np.concatenate([mnist_reference(xb[k:k + 1]) for k in range(3)])
    np.testing.assert_allclose(r.as_numpy(out.name), want, rtol=1e-4, atol=1e-4)
    ab = {c.infer("mnist", [i], headers={"x-user": "user-3"}).get_response().model_version for _ in range(3)}
    assert len(ab) == 1, ab
    # The HTTP error cases, as gRPC codes.
    def code(model, tensor, version="", outputs=None, dtype="FP32"):
        t = grpcclient.InferInput(inp.name if tensor is not None else "x", list((tensor if tensor is not None else x).shape), dtype)
        t.set_data_from_numpy(tensor if tensor is not None else x)
        try:
            c.infer(model, [t], model_version=version, outputs=outputs)
        except InferenceServerException as e:
            return e.status()
        return "OK"
    assert code("nope", x) == "StatusCode.NOT_FOUND"
    assert code("mnist", x, version="9") == "StatusCode.NOT_FOUND"
    assert code("mnist", None) == "StatusCode.INVALID_ARGUMENT"  # wrong input name
    assert code("mnist", x[..., :27].copy()) == "StatusCode.INVALID_ARGUMENT"  # wrong shape
    assert code("mnist", x.astype(np.int32), dtype="INT32") == "StatusCode.INVALID_ARGUMENT"  # wrong dtype
    assert code("mnist", x, outputs=[grpcclient.InferRequestedOutput("nope")]) == "StatusCode.INVALID_ARGUMENT"
    try:
        c.get_model_metadata("nope")
        raise AssertionError("metadata of an unknown model")
    except InferenceServerException as e:
        assert e.status() == "StatusCode.NOT_FOUND"
    # A deadline too short for any run: DEADLINE_EXCEEDED, and the server still answers afterwards.
    ems = c.get_model_metadata("effnet")
    t = grpcclient.InferInput(ems.inputs[0].name, [1] + list(ems.inputs[0].shape[1:]), "FP32")
    t.set_data_from_numpy(np.random.default_rng(0).random([1] + list(ems.inputs[0].shape[1:]), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("effnet", [t], client_timeout=0.0005)
    # DEADLINE_EXCEEDED as a rule; the gRPC client reported CANCELLED once when the 0.5 ms passed while it was still
    # starting the call (a local CI run with a fuzzer on the other core). Either way the call fails, not the server.
    assert e.value.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"), e.value
    assert c.is_server_ready() and c.infer("effnet", [t]).as_numpy(ems.outputs[0].name).shape[0] == 1
    metrics = server.get("/metrics")[1].decode()
    assert re.search(r'edgepack_requests_total\{model="mnist",version="2",endpoint="grpc_infer",status="200"\} \d+', metrics)
    assert re.search(r'edgepack_requests_total\{model="_unknown",version="",endpoint="grpc_infer",status="404"\} \d+', metrics)


def test_classification_output_parameter_over_http_and_grpc(server):
    """Issue 30, item 4: KServe's `classification` output parameter: the top k of each row as
    "score:index:label" strings (labels from the bundle), over HTTP (JSON and binary) and gRPC."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    h = httpclient.InferenceServerClient(url=server.host)
    meta = h.get_model_metadata("effnet")
    name, out = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    shape = [2] + meta["inputs"][0]["shape"][1:]
    x = np.random.default_rng(4).random(shape, dtype=np.float32)
    i = httpclient.InferInput(name, shape, "FP32")
    i.set_data_from_numpy(x)
    logits = h.infer("effnet", [i], outputs=[httpclient.InferRequestedOutput(out)]).as_numpy(out)
    want = [list(np.argsort(-row, kind="stable")[:3]) for row in logits]
    labels = [line.strip() for line in open(SYNSETS)]
    got = []
    for binary in (True, False):
        r = h.infer("effnet", [i], outputs=[httpclient.InferRequestedOutput(out, binary_data=binary, class_count=3)])
        got.append(r.as_numpy(out))
    g = grpcclient.InferenceServerClient(url=server.grpc)
    gi = grpcclient.InferInput(name, shape, "FP32")
    gi.set_data_from_numpy(x)
    got.append(g.infer("effnet", [gi], outputs=[grpcclient.InferRequestedOutput(out, class_count=3)]).as_numpy(out))
    for strings in got:
        assert strings.shape == (2, 3), strings
        for row, idx, lg in zip(strings, want, logits):
            parts = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
            assert [int(p[1]) for p in parts] == idx, (parts, idx)
            assert all(abs(float(p[0]) - lg[int(p[1])]) < 1e-4 for p in parts), parts
            assert all(p[2] == labels[int(p[1])] for p in parts), parts


def readme_curl_examples():
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- serve-curl:begin -->(.*?)<!-- serve-curl:end -->", text, re.S)
    assert m, "README.md has no serve-curl section"
    cmds, cur = [], ""
    for line in m[1].splitlines():
        line = line.rstrip()
        if line.startswith("```") or not (line or cur):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if cur.strip().startswith("curl"):
                cmds.append(cur.strip())
            cur = ""
    return cmds


def served_ok(server, model):
    """Successful inference requests the server counted for `model` (all versions), from /metrics."""
    _, body, _ = server.get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("edgepack_requests_total{") and f'model="{model}"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_bench_url_measures_a_live_server(server, encoding):
    """`edgepack bench --url` (issue 25): a concurrency sweep against the live server; every request it counts as
    done is one the server counted as answered."""
    before = served_ok(server, "mnist")
    extra = ["--binary"] if encoding == "binary" else []
    r = ep("bench", "mnist", "--url", server.url, "--concurrency", "1,4", "--duration", "1", "--json", *extra)
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["encoding"] == encoding and doc["protocol"] == "http"
    levels = {row["concurrency"]: row for row in doc["sweep"]}
    assert sorted(levels) == [1, 4]
    for row in levels.values():
        assert row["errors"] == 0 and row["requests"] > 0, row
        lat = row["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"], row
        assert row["requests_per_s"] > 0 and abs(row["requests_per_s"] * row["seconds"] - row["requests"]) < 1
    # Each connection sends one untimed request first, and one request checks the model before the sweep.
    sent = sum(row["requests"] for row in levels.values()) + 1 + sum(levels)
    assert served_ok(server, "mnist") - before >= sent - 5, (served_ok(server, "mnist") - before, sent)
    text = ep("bench", "mnist", "--url", server.url, "--concurrency", "2", "--duration", "0.5").stdout
    assert "requests/s" in text and "p99 ms" in text, text
    r = ep("bench", "nosuch", "--url", server.url, check=False)
    assert r.returncode == 4 and "nosuch" in r.stderr, r.stderr


def test_readme_curl_examples(server, tmp_path):
    curl = require("curl", "the README's curl examples")
    cmds = readme_curl_examples()
    assert len(cmds) >= 5, cmds
    env = {**os.environ, "EDGEPACK": server.url}
    for cmd in cmds:
        cmd = cmd.replace("curl", curl + " --fail-with-body", 1)
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        if r.stdout.strip().startswith("{"):
            json.loads(r.stdout)


def test_classify_raw_image(server, repo):
    img = os.path.join(PHOTOS, "skimage_chelsea.png")
    s, body, _ = server.request("POST", "/v1/models/effnet:classify?top_k=3", open(img, "rb").read(),
                                {"Content-Type": "image/png"})
    assert s == 200, body
    got = json.loads(body)
    want = json.loads(ep("run", repo / "effnet" / "1" / "model.edgepack", img, "--json", "--top-k", "3", "--device", "cpu").stdout)
    want = want["results"][0]["top_k"]
    assert [p["class_index"] for p in got["predictions"]] == [p["class_index"] for p in want]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want]
    assert "cat" in got["predictions"][0]["label"], got


def test_errors_are_kserve_4xx(server, tmp_path):
    x = mnist_input(0)
    good = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    assert server.post_json("/v2/models/mnist/infer", good)[0] == 200
    cases = {
        "unknown model": ("/v2/models/nope/infer", good, 404),
        "unknown version": ("/v2/models/mnist/versions/9/infer", good, 404),
        "wrong input name": ("/v2/models/mnist/infer", {"inputs": [{**good["inputs"][0], "name": "x"}]}, 400),
        "wrong shape": ("/v2/models/mnist/infer", {"inputs": [{**good["inputs"][0], "shape": [1, 1, 28, 27]}]}, 400),
        "data/shape mismatch": ("/v2/models/mnist/infer", {"inputs": [{**good["inputs"][0], "shape": [2, 1, 28, 28]}]}, 400),
        "wrong dtype": ("/v2/models/mnist/infer", {"inputs": [{**good["inputs"][0], "datatype": "INT32",
                                                               "data": [0] * 784}]}, 400),
        "unknown output": ("/v2/models/mnist/infer", {**good, "outputs": [{"name": "nope"}]}, 400),
        "no inputs": ("/v2/models/mnist/infer", {"inputs": []}, 400),
    }
    for what, (path, body, status) in cases.items():
        s, b, _ = server.post_json(path, body)
        assert s == status, (what, s, b)
        assert "error" in json.loads(b), (what, b)
    s, b, _ = server.request("POST", "/v2/models/mnist/infer", b'{"inputs": [', {"Content-Type": "application/json"})
    assert s == 400 and "error" in json.loads(b)
    # Oversized: refused from Content-Length, before the body is read (curl sends Expect: 100-continue and gets the
    # 413 instead of the go-ahead).
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (5 << 20))
    curl = require("curl", "the oversized-body case")
    r = subprocess.run([curl, "-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "--data-binary",
                        f"@{big}", server.url + "/v2/models/mnist/infer"], capture_output=True, text=True, timeout=60)
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "413" and "error" in json.loads(body), r.stdout[:300]
    s, b, _ = server.get("/v2/models/nope")
    assert s == 404 and "error" in json.loads(b)
    # Made-up names do not become metric labels.
    metrics = server.get("/metrics")[1].decode()
    assert 'model="nope"' not in metrics and 'version="9"' not in metrics
    assert re.search(r'edgepack_requests_total\{model="_unknown",version="",endpoint="infer",status="404"\} \d+', metrics)


def test_dynamic_batching_equals_single_runs(server):
    xs = [mnist_input(100 + k) for k in range(24)]
    want = [mnist_reference(x) for x in xs]

    def one(k):
        body = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": xs[k].ravel().tolist()}]}
        s, b, _ = server.post_json("/v2/models/mnist/versions/1/infer", body)
        assert s == 200, b
        return k, np.array(json.loads(b)["outputs"][0]["data"], np.float32).reshape(want[k].shape)

    with cf.ThreadPoolExecutor(12) as pool:
        for k, y in pool.map(one, range(len(xs))):
            np.testing.assert_allclose(y, want[k], rtol=1e-4, atol=1e-4)
    metrics = server.get("/metrics")[1].decode()
    # Some executed batch held more than one sample.
    m = re.search(r'edgepack_batch_size_bucket\{model="mnist",version="1",le="1"\} (\d+)', metrics)
    c = re.search(r'edgepack_batch_size_count\{model="mnist",version="1"\} (\d+)', metrics)
    assert m and c and int(m[1]) < int(c[1]), metrics


def test_routing_ab_sticky_and_shadow(server):
    x = mnist_input(7)
    body = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    seen = {}
    for user in [f"user-{i}" for i in range(20)]:
        versions = {json.loads(server.post_json("/v2/models/mnist/infer", body, {"x-user": user})[1])["model_version"]
                    for _ in range(3)}
        assert len(versions) == 1, (user, versions)  # sticky
        seen[user] = versions.pop()
    assert set(seen.values()) == {"1", "2"}, seen
    # Without the key: the default version answers; version 2 shadows it and agrees (same model).
    assert json.loads(server.post_json("/v2/models/mnist/infer", body)[1])["model_version"] == "1"
    deadline = time.time() + 10
    while time.time() < deadline:
        m = re.search(r'edgepack_shadow_requests_total\{model="mnist",version="2",result="agree"\} (\d+)',
                      server.get("/metrics")[1].decode())
        if m and int(m[1]) >= 1:
            break
        time.sleep(0.2)
    assert m and int(m[1]) >= 1


def test_promtool_check_metrics(server):
    promtool = require("promtool", "Debian package prometheus")
    text = server.get("/metrics")[1]
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode() + text.decode()[:3000]
    assert b"edgepack_requests_total{" in text and b"edgepack_queue_depth{" in text


def test_a_model_that_cannot_load_is_unavailable_with_its_reason(tmp_path, binary):
    """Issue 30, item 4: a truncated bundle in the repository is listed as unavailable with the reason (metadata and
    ready endpoints, 503 not 404), keeps the server not ready, is logged once (not on every poll), and loads once
    fixed; the other models serve meanwhile."""
    repo = tmp_path / "repo"
    for m in ("good", "bad"):
        (repo / m / "1").mkdir(parents=True)
    ep("pack", MNIST, "--preset", "mnist", "-o", repo / "good" / "1" / "model.edgepack")
    whole = (repo / "good" / "1" / "model.edgepack").read_bytes()
    (repo / "bad" / "1" / "model.edgepack").write_bytes(whole[: len(whole) // 2])
    s = Server(repo, "--poll", "0.2", "--device", "cpu", wait_ready=False)
    try:
        status, body, _ = s.get("/v2/health/ready")
        r = json.loads(body)
        assert status == 503 and r["ready"] is False, r
        assert [(u["model"], u["version"]) for u in r["unavailable"]] == [("bad", "1")] and r["unavailable"][0]["reason"]
        for path in ("/v2/models/bad", "/v2/models/bad/ready", "/v2/models/bad/versions/1"):
            status, body, headers = s.get(path)
            assert status == 503 and "version 1 failed to load" in json.loads(body)["error"], (path, body)
        assert s.get("/v2/models/nope")[0] == 404
        x = mnist_input(5)
        status, _, _ = s.post_json("/v2/models/good/infer", {"inputs": [
            {"name": "Input3", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200
        time.sleep(1.5)  # several polls
        assert sum("loading failed" in line for line in s.log) == 1, "".join(s.log)
        # Fixed in place: loads on the next poll, the server becomes ready.
        (repo / "bad" / "1" / "model.edgepack").write_bytes(whole)
        deadline = time.time() + 60
        while time.time() < deadline and s.get("/v2/health/ready")[0] != 200:
            time.sleep(0.2)
        assert s.get("/v2/health/ready")[0] == 200 and s.get("/v2/models/bad/ready")[0] == 200
    finally:
        assert s.stop() == 0, "".join(s.log[-20:])


def test_repository_index_load_and_unload_over_http_and_grpc(tmp_path, binary):
    """Issue 30, item 4: Triton's repository extension. The index lists every version with its state and the reason
    one is unavailable; unload stops a model (404 afterwards, other models unaffected, polls do not bring it back),
    load brings it back; the same over gRPC (tritonclient.grpc)."""
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    for m in ("a", "b", "broken"):
        (repo / m / "1").mkdir(parents=True)
    ep("pack", MNIST, "--preset", "mnist", "-o", repo / "a" / "1" / "model.edgepack")
    whole = (repo / "a" / "1" / "model.edgepack").read_bytes()
    (repo / "b" / "1" / "model.edgepack").write_bytes(whole)
    (repo / "broken" / "1" / "model.edgepack").write_bytes(whole[:100])
    access = tmp_path / "access.jsonl"
    s = Server(repo, "--poll", "0.2", "--device", "cpu", "--grpc-addr", "127.0.0.1:0", "--access-log", str(access),
               wait_ready=False)
    try:
        def index(ready=None):
            body = json.dumps({} if ready is None else {"ready": ready}).encode()
            status, b, _ = s.request("POST", "/v2/repository/index", body, {"Content-Type": "application/json"})
            assert status == 200, b
            return {(r["name"], r["version"]): (r["state"], r.get("reason", "")) for r in json.loads(b)}
        idx = index()
        assert idx[("a", "1")] == ("READY", "") and idx[("b", "1")] == ("READY", ""), idx
        assert idx[("broken", "1")][0] == "UNAVAILABLE" and idx[("broken", "1")][1], idx
        assert set(index(ready=True)) == {("a", "1"), ("b", "1")}
        assert s.request("POST", "/v2/repository/models/a/unload")[0] == 200
        assert s.get("/v2/models/a/ready")[0] == 404 and s.get("/v2/models/b/ready")[0] == 200
        time.sleep(1.0)  # polls do not load it again
        assert index()[("a", "1")][0] == "UNLOADED" and s.get("/v2/models/a/ready")[0] == 404
        assert s.request("POST", "/v2/repository/models/a/load")[0] == 200
        assert s.get("/v2/models/a/ready")[0] == 200
        status, b, _ = s.request("POST", "/v2/repository/models/broken/load")
        assert status == 503 and "failed to load" in json.loads(b)["error"], b
        assert s.request("POST", "/v2/repository/models/nope/load")[0] == 404
        g = grpcclient.InferenceServerClient(url=s.grpc)
        models = {(m.name, m.version): m.state for m in g.get_model_repository_index().models}
        assert models[("a", "1")] == "READY" and models[("broken", "1")] == "UNAVAILABLE", models
        g.unload_model("b")
        assert not g.is_model_ready("b") and s.get("/v2/models/b/ready")[0] == 404
        g.load_model("b")
        assert g.is_model_ready("b")
        assert g.is_model_ready("broken") is False
        # --access-log: a JSON line per HTTP request and gRPC call, in order, with its status.
        lines = [json.loads(x) for x in access.read_text().splitlines()]
        http = [x for x in lines if x["proto"] == "http"]
        grpc = [x for x in lines if x["proto"] == "grpc"]
        assert all(x["ts"].endswith("Z") and x["ms"] >= 0 and x["remote"].startswith("127.0.0.1:") for x in lines)
        unload = [x for x in http if x["path"] == "/v2/repository/models/a/unload"]
        assert unload and unload[0]["method"] == "POST" and unload[0]["status"] == 200, http
        assert any(x["path"] == "/v2/repository/models/nope/load" and x["status"] == 404 for x in http)
        calls = [x["path"].rsplit("/", 1)[1] for x in grpc]
        assert calls[:2] == ["RepositoryIndex", "RepositoryModelUnload"] and "RepositoryModelLoad" in calls, calls
        assert all(x["grpc_status"] == "Ok" for x in grpc), grpc
    finally:
        assert s.stop() == 0, "".join(s.log[-20:])


def gather_model(clip):
    """y = data[idx] over 4 values: with `clip` the index is clamped (never fails); without it an index past the
    end fails at run time (a 500: the version "returns errors")."""
    import onnx
    from onnx import TensorProto as T, helper as oh

    nodes = [oh.make_node("Clip", ["idx", "lo", "hi"], ["ci"])] if clip else []
    nodes.append(oh.make_node("Gather", ["data", "ci" if clip else "idx"], ["y"], axis=0))
    inits = [oh.make_tensor("data", T.FLOAT, [4], [1, 2, 3, 4])]
    if clip:
        inits += [oh.make_tensor("lo", T.INT64, [], [0]), oh.make_tensor("hi", T.INT64, [], [3])]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("idx", T.INT64, [1])],
                      [oh.make_tensor_value_info("y", T.FLOAT, [1])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 13)])


def test_automatic_canary_rolls_back_errors_and_promotes_a_good_version(tmp_path, binary):
    """Issue 30, item 3: a canary with `auto` limits. Version 2 of `bad` fails on the requests sent: it is rolled back
    to 0 % (logged as a JSON line, counted in the metrics) and every later request goes to version 1; version 2 of
    `good` passes each window and is promoted step by step to 100 %. The rollout endpoint's counts equal the ones
    the test makes from the answers."""
    import onnx

    repo = tmp_path / "repo"
    for m, canary_ok in (("bad", False), ("good", True)):
        for v, clip in (("1", True), ("2", canary_ok)):
            (repo / m / v).mkdir(parents=True)
            onnx.save(gather_model(clip), str(repo / m / v / "model.onnx"))
        auto = {"max_error_rate": 0.05, "min_requests": 20 if m == "bad" else 8, "step_percent": 25 if m == "bad" else 40}
        (repo / m / "config.json").write_text(json.dumps({"max_batch_size": 0, "routing": {
            "default": "1", "canary": {"version": "2", "percent": 50 if m == "bad" else 20, "auto": auto}}}))
    s = Server(repo, "--poll", "0", "--device", "cpu", "--log-json")
    try:
        body = {"inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [7]}]}
        tally = {"bad": {}, "good": {}}
        for m in ("bad", "good"):
            for _ in range(120):
                status, b, _ = s.post_json(f"/v2/models/{m}/infer", body)
                key = (json.loads(b).get("model_version", "2"), status)  # a failed request names no version: v2's
                tally[m][key] = tally[m].get(key, 0) + 1
        # bad: version 2 failed every request it got and was rolled back; all later requests went to version 1.
        assert set(tally["bad"]) == {("1", 200), ("2", 500)}, tally
        r = json.loads(s.get("/v2/models/bad/rollout")[1])
        arms = {a["role"]: a for a in r["arms"]}
        assert arms["default"]["requests"] == tally["bad"][("1", 200)] and arms["default"]["errors"] == 0
        assert arms["canary"]["requests"] == arms["canary"]["errors"] == tally["bad"][("2", 500)] <= 20, (arms, tally)
        assert r["canary"]["state"] == "rolled_back" and r["canary"]["percent"] == 0, r["canary"]
        assert [d["action"] for d in r["canary"]["decisions"]] == ["rollback"]
        assert r["comparisons"][0]["error_rate"]["z"] > 0
        # good: promoted 20 -> 60 -> 100 %, never rolled back, the canary answered correctly.
        g = json.loads(s.get("/v2/models/good/rollout")[1])
        assert g["canary"]["state"] == "promoted" and g["canary"]["percent"] == 100, g["canary"]
        assert [(d["action"], d["to_percent"]) for d in g["canary"]["decisions"]] == [("promote", 60), ("promote", 100)]
        garms = {a["role"]: a for a in g["arms"]}
        assert garms["canary"]["requests"] == tally["good"][("2", 200)] and garms["canary"]["errors"] == 0, (garms, tally)
        assert garms["default"]["requests"] == tally["good"][("1", 200)]
        assert all(json.loads(s.post_json("/v2/models/good/infer", body)[1])["model_version"] == "2" for _ in range(10))
        metrics = s.get("/metrics")[1].decode()
        assert 'edgepack_rollout_decisions_total{model="bad",version="2",decision="rollback"} 1' in metrics
        assert 'edgepack_rollout_decisions_total{model="good",version="2",decision="promote"} 2' in metrics
        assert re.search(r'edgepack_canary_percent\{model="bad",version="2"\} 0\b', metrics), metrics
        logged = [json.loads(x) for x in s.log if x.startswith("{") and "canary decision" in x]
        assert [(x["fields"]["model"], x["fields"]["action"]) for x in logged] == \
            [("bad", "rollback"), ("good", "promote"), ("good", "promote")], logged
    finally:
        assert s.stop() == 0, "".join(s.log[-20:])


class Webhook:
    """A real HTTP receiver for job webhooks: records every POSTed JSON body."""

    def __init__(self):
        import http.server

        got = self.got = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_async_jobs_survive_sigkill_and_call_their_webhook_once(tmp_path, binary):
    """Issue 30, item 2: 20 jobs accepted (202 + Location) by a server that stores but does not run them, the server
    SIGKILLed, restarted with workers: all 20 succeed with the outputs of direct infers, each webhook is called
    once; unknown models and oversized bodies are refused at submission; a finished job can be deleted."""
    repo = tmp_path / "repo"
    (repo / "mnist" / "1").mkdir(parents=True)
    ep("pack", MNIST, "--preset", "mnist", "-o", repo / "mnist" / "1" / "model.edgepack")
    (repo / "mnist" / "config.json").write_text(json.dumps({"max_batch_size": 8, "max_queue_delay_ms": 2}))
    hook = Webhook()
    xs = [mnist_input(300 + k) for k in range(20)]
    body = lambda x: {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",  # noqa: E731
                                  "data": x.ravel().tolist()}]}
    s = Server(repo, "--poll", "0", "--device", "cpu", "--job-workers", "0", "--max-job-mib", "1")
    ids = []
    try:
        for x in xs:
            status, b, headers = s.post_json("/v2/models/mnist/jobs", body(x), {"x-edgepack-webhook": hook.url})
            r = json.loads(b)
            location = {k.lower(): v for k, v in headers.items()}.get("location")
            assert status == 202 and r["status"] == "queued" and location == f"/v2/jobs/{r['id']}", (status, b, headers)
            ids.append(r["id"])
        assert json.loads(s.get(f"/v2/jobs/{ids[0]}")[1])["status"] == "queued"
        # A queued job deleted is cancelled: gone at once, and it never runs (no webhook call after the restart).
        status, b, _ = s.post_json("/v2/models/mnist/jobs", body(xs[0]), {"x-edgepack-webhook": hook.url})
        gone = json.loads(b)["id"]
        status, b, _ = s.request("DELETE", f"/v2/jobs/{gone}")
        assert status == 200 and json.loads(b)["status"] == "cancelled" and s.get(f"/v2/jobs/{gone}")[0] == 404
        assert s.post_json("/v2/models/nope/jobs", body(xs[0]))[0] == 404
        big = tmp_path / "big.json"
        big.write_bytes(b"x" * (2 << 20))
        r = subprocess.run([require("curl", "the oversized job"), "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "--data-binary", f"@{big}", s.url + "/v2/models/mnist/jobs"], capture_output=True, text=True)
        assert r.stdout == "413", r.stdout
        metrics = s.get("/metrics")[1].decode()
        assert re.search(r'edgepack_jobs_queued\{model="mnist"\} 20\b', metrics), metrics
    finally:
        s.proc.kill()  # SIGKILL: no shutdown, nothing flushed by the server
        s.proc.wait(30)
    s = Server(repo, "--poll", "0", "--device", "cpu")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            states = [json.loads(s.get(f"/v2/jobs/{i}")[1]) for i in ids]
            if all(j["status"] == "succeeded" for j in states):
                break
            time.sleep(0.2)
        assert all(j["status"] == "succeeded" for j in states), [j["status"] for j in states]
        for x, j in zip(xs, states):
            status, b, _ = s.post_json("/v2/models/mnist/infer", body(x))
            direct = json.loads(b)["outputs"][0]
            # Jobs run batched with each other: equal to the direct run within float rounding.
            assert status == 200 and j["result"]["outputs"][0]["shape"] == direct["shape"], j
            np.testing.assert_allclose(j["result"]["outputs"][0]["data"], direct["data"], rtol=1e-5, atol=1e-5)
            assert j["result"]["id"] == j["id"] and j["model_version"] == "1"
        while time.time() < deadline and len(hook.got) < len(ids):
            time.sleep(0.2)
        time.sleep(1.0)  # a second call would come now
        calls = [g["id"] for g in hook.got]
        assert sorted(calls) == sorted(ids), (len(calls), len(set(calls)))
        assert all(g["status"] == "succeeded" and g["result"]["outputs"] for g in hook.got)
        assert all(json.loads(s.get(f"/v2/jobs/{i}")[1])["webhook"]["delivered"] for i in ids)
        metrics = s.get("/metrics")[1].decode()
        assert re.search(r'edgepack_jobs_total\{model="mnist",status="succeeded"\} 20\b', metrics), metrics
        assert re.search(r'edgepack_jobs_queued\{model="mnist"\} 0\b', metrics), metrics
        status, b, _ = s.request("DELETE", f"/v2/jobs/{ids[0]}")
        assert status == 200 and json.loads(b)["status"] == "deleted"
        assert s.get(f"/v2/jobs/{ids[0]}")[0] == 404 and s.get("/v2/jobs/" + "0" * 32)[0] == 404
    finally:
        assert s.stop() == 0, "".join(s.log[-20:])
        hook.httpd.shutdown()


def test_two_servers_share_a_redis_job_queue_and_run_each_job_once(tmp_path, binary):
    """Issue 30, item 2: a real redis-server (Debian's package) holds the queue; two `edgepack serve` processes
    given the same --queue each take jobs from it. 200 jobs submitted half to each: every one succeeds, is readable
    from either server, ran on exactly one of them (their success counters add up to 200) and called its webhook
    once."""
    import socket

    redis = require("redis-server", "Debian package redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rproc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    repo = tmp_path / "repo"
    (repo / "mnist" / "1").mkdir(parents=True)
    ep("pack", MNIST, "--preset", "mnist", "-o", repo / "mnist" / "1" / "model.edgepack")
    hook = Webhook()
    servers = []
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.1)
        for k in range(2):
            servers.append(Server(repo, "--poll", "0", "--device", "cpu", "--queue", f"redis://127.0.0.1:{port}",
                                  "--jobs-dir", str(tmp_path / f"spool{k}")))
        xs = [mnist_input(500 + k) for k in range(200)]
        ids = []
        for k, x in enumerate(xs):
            body = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            status, b, _ = servers[k % 2].post_json("/v2/models/mnist/jobs", body, {"x-edgepack-webhook": hook.url})
            assert status == 202, b
            ids.append(json.loads(b)["id"])
        deadline = time.time() + 120
        done = {}
        while time.time() < deadline and len(done) < len(ids):
            for k, i in enumerate(ids):
                if i not in done:
                    j = json.loads(servers[(k + 1) % 2].get(f"/v2/jobs/{i}")[1])  # read from the other server
                    if j["status"] == "succeeded":
                        done[i] = j
            time.sleep(0.2)
        assert len(done) == len(ids), f"{len(done)} of {len(ids)} succeeded"
        want = mnist_reference(xs[7])
        np.testing.assert_allclose(np.array(done[ids[7]]["result"]["outputs"][0]["data"], np.float32).reshape(want.shape),
                                   want, rtol=1e-4, atol=1e-4)
        ran = 0
        for srv in servers:
            m = re.search(r'edgepack_jobs_total\{model="mnist",status="succeeded"\} (\d+)', srv.get("/metrics")[1].decode())
            ran += int(m[1]) if m else 0
        assert ran == len(ids), f"jobs ran {ran} times for {len(ids)} jobs"
        while time.time() < deadline and len(hook.got) < len(ids):
            time.sleep(0.2)
        time.sleep(1.0)
        assert sorted(g["id"] for g in hook.got) == sorted(ids)
    finally:
        for srv in servers:
            assert srv.stop() == 0, "".join(srv.log[-20:])
        rproc.terminate()
        rproc.wait(10)
        hook.httpd.shutdown()


def test_deleting_jobs_while_they_run_never_fails(tmp_path, binary, monkeypatch):
    """A DELETE that meets a worker writing the job's record answers 200 (it answered 500 "Directory not empty" when
    the worker's temporary file appeared in the folder being removed: found by schemathesis). Writes are slowed so
    that each worker write is in flight for a while; every job is deleted right after it is accepted."""
    repo = tmp_path / "repo"
    (repo / "mnist" / "1").mkdir(parents=True)
    ep("pack", MNIST, "--preset", "mnist", "-o", repo / "mnist" / "1" / "model.edgepack")
    monkeypatch.setenv("EDGEPACK_SLOW_WRITES_MS", "40")
    s = Server(repo, "--poll", "0", "--device", "cpu", "--job-workers", "2")
    x = mnist_input(7)
    body = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    try:
        answers = []
        for k in range(30):
            status, b, _ = s.post_json("/v2/models/mnist/jobs", body)
            assert status == 202, b
            jid = json.loads(b)["id"]
            time.sleep(0.01 * (k % 6))  # queued, running, or writing its record when deleted
            status, b, _ = s.request("DELETE", f"/v2/jobs/{jid}")
            assert status == 200, b
            answers.append(json.loads(b)["status"])
            assert s.get(f"/v2/jobs/{jid}")[0] == 404
        assert set(answers) <= {"cancelled", "deleted"}, answers
        time.sleep(0.5)
        left = [p.name for p in (repo / ".jobs").iterdir() if not p.name.startswith(".")]
        assert left == [], left  # nothing of a deleted job is left behind, even by a worker that finished after
    finally:
        assert s.stop() == 0, "".join(s.log[-20:])


def test_raw_image_jobs_and_the_docs_page(server):
    """Issue 30, items 2 and 4: a raw photo as an asynchronous classify job gives what :classify answers directly; a
    :detect job on a classifier fails with the reason; GET /v2/docs is a Swagger UI page over /v2/openapi.json."""
    photo = open(os.path.join(PHOTOS, "skimage_chelsea.png"), "rb").read()
    status, b, _ = server.request("POST", "/v1/models/effnet:classify?top_k=3", photo, {"Content-Type": "image/png"})
    assert status == 200, b
    direct = json.loads(b)["predictions"]
    jobs = {}
    for verb in ("classify", "detect"):
        status, b, _ = server.request("POST", f"/v1/models/effnet:{verb}/jobs?top_k=3", photo, {"Content-Type": "image/png"})
        assert status == 202, b
        jobs[verb] = json.loads(b)["id"]
    assert server.request("POST", "/v1/models/effnet:bogus/jobs", photo)[0] == 404
    assert server.request("POST", "/v1/models/mnist:classify/jobs?top_k=0", photo)[0] == 400
    deadline = time.time() + 60
    while time.time() < deadline:
        got = {v: json.loads(server.get(f"/v2/jobs/{i}")[1]) for v, i in jobs.items()}
        if all(g["status"] in ("succeeded", "failed") for g in got.values()):
            break
        time.sleep(0.1)
    assert got["classify"]["status"] == "succeeded" and got["classify"]["result"]["predictions"] == direct, got
    assert got["detect"]["status"] == "failed" and got["detect"]["error"]["status"] == 400, got["detect"]
    assert "no detection post-processing" in got["detect"]["error"]["message"], got["detect"]
    status, b, headers = server.get("/v2/docs")
    page = b.decode()
    assert status == 200 and headers["content-type"].startswith("text/html"), headers
    assert 'url: "openapi.json"' in page and "swagger-ui-bundle.js" in page and "swagger-ui.css" in page


def test_grafana_dashboard_queries_only_what_the_server_exports(server):
    """Issue 30, item 6: every metric the dashboard (deploy/grafana/edgepack-serve.json) queries is on /metrics, and
    every label it selects or groups by is one those metrics carry."""
    dash = json.load(open(os.path.join(ROOT, "deploy", "grafana", "edgepack-serve.json")))
    x = mnist_input(1)
    for path in ("/v2/models/mnist/infer", "/v2/models/mnist/versions/9/infer"):  # a success and an error
        server.post_json(path, {"inputs": [{"name": "Input3", "shape": list(x.shape), "datatype": "FP32",
                                            "data": x.ravel().tolist()}]})
    text = server.get("/metrics")[1].decode()
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels = {}
    for line in text.splitlines():
        m = re.match(r"^(edgepack_\w+)\{([^}]*)\}", line)
        if m:
            base = re.sub(r"_(bucket|sum|count)$", "", m[1]) if m[1] not in kinds else m[1]
            labels.setdefault(base, set()).update(re.findall(r'(\w+)="', m[2]))
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    exprs += [("variable " + v["name"], v["definition"]) for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 12
    checked = 0
    for title, expr in exprs:
        used = set()
        for name in set(re.findall(r"edgepack_\w+", expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in kinds else name
            assert base in kinds, f"{title}: {name} is not exported"
            if name != base:
                assert kinds[base] == "histogram", f"{title}: {name} on a {kinds[base]}"
            used.add(base)
        groups = re.findall(r"(?:by|ignoring)\s*\(([^)]*)\)", expr) + re.findall(r"label_values\(\w+, *(\w+)\)", expr)
        wanted = {w.strip() for g in groups for w in g.split(",") if w.strip()}
        wanted |= set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", expr))
        seen = set().union(*(labels.get(b, set()) for b in used)) | {"le"}
        # Metrics without samples yet (no rejection happened) cannot show their labels: the rest must.
        if all(b in labels for b in used):
            assert wanted <= seen, f"{title}: labels {wanted - seen} not on {sorted(used)}"
            checked += 1
    assert checked >= 10, f"only {checked} queries had samples to check their labels against"


def test_hot_reload_without_dropping_requests(server, repo):
    x = mnist_input(9)
    body = {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    stop, statuses = threading.Event(), []

    def load():
        while not stop.is_set():
            statuses.append(server.post_json("/v2/models/mnist/infer", body)[0])

    t = threading.Thread(target=load)
    t.start()
    try:
        shutil.copytree(repo / "mnist" / "1", repo / "mnist" / "3")
        deadline = time.time() + 60
        while time.time() < deadline and server.get("/v2/models/mnist/versions/3/ready")[0] != 200:
            time.sleep(0.2)
        assert server.get("/v2/models/mnist/versions/3/ready")[0] == 200
        shutil.rmtree(repo / "mnist" / "3")
        deadline = time.time() + 60
        while time.time() < deadline and server.get("/v2/models/mnist/versions/3/ready")[0] != 404:
            time.sleep(0.2)
        assert server.get("/v2/models/mnist/versions/3/ready")[0] == 404
    finally:
        stop.set()
        t.join()
    assert statuses and set(statuses) == {200}, statuses


def test_sigterm_under_load_loses_no_accepted_request(repo, tmp_path):
    s = Server(repo, "--poll", "0", "--device", "cpu")
    img = open(os.path.join(PHOTOS, "skimage_coffee.png"), "rb").read()
    results = []
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        while not stop.is_set():
            st, b, _ = s.request("POST", "/v1/models/effnet:classify", img, {"Content-Type": "image/png"})
            with lock:
                results.append((st, b))
            if st is None:
                return  # connection refused: the server stopped accepting

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(3)
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(120)
    stop.set()
    for t in threads:
        t.join(120)
    answered = [r for r in results if r[0] is not None]
    refused = len(results) - len(answered)
    bad = [r for r in answered if r[0] != 200]
    print(f"\nSIGTERM under load: {len(answered)} accepted requests answered, {len(bad)} not 200, {refused} refused after")
    assert code == 0, "".join(s.log[-20:])
    assert len(answered) >= 16 and not bad, bad[:3]
    assert any("shutting down" in line for line in s.log), "".join(s.log[-10:])


def test_schemathesis_finds_nothing(server, tmp_path):
    """schemathesis against the served OpenAPI document, every check: first with generated path parameters (unknown
    models and versions, odd names), then with the repository's model and version fixed so generated bodies reach
    the inference and classify handlers. The second run leaves out `positive_data_acceptance`: a request valid for
    the generic document (any tensor name and shape, any bytes as an image) is still refused with 400 by a model
    whose inputs differ, which the KServe protocol intends; every other check (no 5xx, documented status codes and
    content types, response schemas, rejection of invalid data...) runs."""
    st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(st):
        pytest.fail(f"schemathesis is not installed beside {sys.executable} (requirements-test.txt)")
    spec = server.url + "/v2/openapi.json"
    cfg = tmp_path / "deep.toml"  # not schemathesis.toml: that name is loaded from the cwd by every run
    cfg.write_text('[parameters]\n"path.model" = "mnist"\n"path.version" = "1"\n')
    runs = [
        [st, "run", spec, "--checks", "all", "-n", "40", "--generation-deterministic"],
        # The served model named: load/unload would take it away from the tests that follow (their own test).
        [st, "--config-file", str(cfg), "run", spec, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--exclude-operation-id", "repository_load", "--exclude-operation-id", "repository_unload",
         "-n", "40", "--generation-deterministic"],
    ]
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        tail = r.stdout[max(0, r.stdout.find("FAILURES")):][:6000]
        assert r.returncode == 0, tail
        m = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
        assert m and m[1] == m[2] and int(m[1]) > 300, tail
        print(f"\nschemathesis: {m[1]} generated, {m[2]} passed")


def test_a_short_soak_gets_no_server_error_and_the_server_stays_up(binary):
    """Issue 31, item 3, the short form of scripts/soak_serve.py (RELIABILITY.md has the 10-minute run): 20 s of
    mixed good and bad requests from 4 clients, mid-body disconnects and slow clients included, get no 5xx and no
    dropped connection, and the server answers at the end. Memory growth is bounded loosely here (the allocator
    is still warming up after 2 s); the long run holds it to 5 %."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak_serve.py"), "--seconds", "20",
                        "--clients", "4", "--max-growth-pct", "50"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "EDGEPACK_BIN": edgepack_bin()})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS" in r.stdout and "5xx or dropped: 0" in r.stdout, r.stdout
