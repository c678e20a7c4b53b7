"""`edgepack batch` (issue 6's batch transform): bulk inference over a folder of images or a JSONL file of KServe v2
requests, output written atomically and resumable after a real interruption (SIGKILL mid-run)."""
import json
import os
import signal
import subprocess
import time

import numpy as np

from conftest import ROOT, edgepack_bin, ep

MNIST = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")


def lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_batch_images_resumes_after_sigkill(tmp_path, binary):
    from PIL import Image

    bundle = tmp_path / "m.edgepack"
    ep("pack", MNIST, "--preset", "mnist", "-o", bundle)
    imgs = tmp_path / "imgs" / "sub"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 1500
    for i in range(n):
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(imgs / f"{i:04d}.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    # Reference: one uninterrupted run.
    ref = tmp_path / "ref.jsonl"
    # A run with a failed item writes every line but exits 4 (bad input), its summary `ok: false` (issue 25).
    r = ep("batch", bundle, tmp_path / "imgs", "-o", ref, "--json", "--threads", "1", check=False)
    assert r.returncode == 4 and "1 of 1501 items failed" in r.stderr, r.stderr
    r = json.loads(r.stdout)
    assert r["ok"] is False and r["error"]["code"] == 4
    assert r["total"] == n + 1 and r["done"] == n + 1 and r["failed"] == 1, r
    want = {x["file"]: x for x in lines(ref)}
    assert len(want) == n + 1 and "error" in want[os.path.join("sub", "broken.png")]
    # Interrupted run: SIGKILL once part of the output is on disk, then resume.
    out = tmp_path / "out.jsonl"
    part = tmp_path / "out.jsonl.part"
    p = subprocess.Popen([edgepack_bin(), "batch", str(bundle), str(tmp_path / "imgs"), "-o", str(out), "--threads", "1",
                          "--sync-every", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not part.exists() or part.stat().st_size < 20000):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists(), "the output must not appear before the run completes"
    assert part.exists()
    # A torn last line, as a crash mid-write leaves it.
    with open(part, "ab") as f:
        f.write(b'{"file": "sub/1499.png", "top_k": [{"cla')
    r = ep("batch", bundle, tmp_path / "imgs", "-o", out, "--json", "--threads", "1", check=False)
    assert r.returncode == 4, r.stderr  # the broken image failed, in this run or the killed one
    r = json.loads(r.stdout)
    assert r["resumed"] > 0 and r["resumed"] + r["done"] == n + 1 and r["failed"] == 1, r
    assert not part.exists()
    got = lines(out)
    assert len(got) == n + 1 and {x["file"] for x in got} == set(want), "every item exactly once"
    for x in got:
        assert x == want[x["file"]], x["file"]
    print(f"\nbatch: killed after {r['resumed']} items, resumed the other {r['done']}; output equals an uninterrupted run")


def test_batch_jsonl_requests(tmp_path, binary):
    import onnxruntime as ort

    reqs = tmp_path / "reqs.jsonl"
    rng = np.random.default_rng(1)
    xs = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(5)]
    with open(reqs, "w") as f:
        for i, x in enumerate(xs):
            f.write(json.dumps({"id": f"r{i}", "inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                          "data": x.ravel().tolist()}]}) + "\n")
        f.write('{"id": "bad", "inputs": [{"name": "Input3", "shape": [1], "datatype": "FP32", "data": [1]}]}\n')
        f.write("{not json\n")
    out = tmp_path / "out.jsonl"
    r = ep("batch", MNIST, reqs, "-o", out, "--json", check=False)
    assert r.returncode == 4, r.stderr
    r = json.loads(r.stdout)
    assert r["total"] == 7 and r["failed"] == 2, r
    got = {x["id"]: x for x in lines(out)}
    s = ort.InferenceSession(MNIST, providers=["CPUExecutionProvider"])
    for i, x in enumerate(xs):
        y = np.array(got[f"r{i}"]["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(y, s.run(None, {"Input3": x})[0].ravel(), rtol=1e-4, atol=1e-4)
    assert "error" in got["bad"] and "error" in got["line 7"]


def test_sharded_batch_merges_to_the_unsharded_output(tmp_path, binary):
    """Issue 30, item 5: `batch --shard I/N` over 4 shards, run in any order, merges (`batch-merge`) to the same
    bytes as one unsharded run; an incomplete set of shards or a bad shard spec is refused clearly."""
    from PIL import Image

    bundle = tmp_path / "m.edgepack"
    ep("pack", MNIST, "--preset", "mnist", "-o", bundle)
    imgs = tmp_path / "imgs"
    for sub in ("a", "b"):
        (imgs / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    n = 37
    for i in range(n):
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(imgs / ("ab"[i % 2]) / f"{i:03d}.png")
    ref = tmp_path / "ref.jsonl"
    ep("batch", bundle, imgs, "-o", ref, "--threads", "1")
    parts, sizes = [], []
    for i in (3, 1, 0, 2):  # any order, as pods finish
        out = tmp_path / f"part-{i}.jsonl"
        r = json.loads(ep("batch", bundle, imgs, "-o", out, "--shard", f"{i}/4", "--json", "--threads", "1").stdout)
        assert r["shard"] == f"{i}/4" and r["failed"] == 0, r
        sizes.append(r["total"])
        side = json.loads((tmp_path / f"part-{i}.jsonl.shard.json").read_text())
        assert side["shard"] == i and side["of"] == 4 and side["total_items"] == n, side
        parts.append(out)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, sizes
    merged = tmp_path / "merged.jsonl"
    r = json.loads(ep("batch-merge", *parts, "-o", merged, "--json").stdout)
    assert r["items"] == n and r["shards"] == 4
    assert merged.read_bytes() == ref.read_bytes()
    # A shard missing: refused (exit 4, bad input), nothing written.
    bad = tmp_path / "bad.jsonl"
    r = ep("batch-merge", *parts[:3], "-o", bad, check=False)
    assert r.returncode == 4 and "shards missing: 2/4" in r.stderr, r.stderr
    assert not bad.exists() and not (tmp_path / "bad.jsonl.part").exists()
    # A shard whose output is cut short: refused.
    (tmp_path / "part-0.jsonl").write_bytes(b"\n".join((tmp_path / "part-0.jsonl").read_bytes().split(b"\n")[:-2]) + b"\n")
    r = ep("batch-merge", *parts, "-o", bad, check=False)
    assert r.returncode == 4 and "incomplete" in r.stderr and not bad.exists(), r.stderr
    # A shard index out of range: a usage error before anything runs.
    r = ep("batch", bundle, imgs, "-o", tmp_path / "x.jsonl", "--shard", "4/4", check=False)
    assert r.returncode == 2 and "0 ≤ I < N" in r.stderr, r.stderr
