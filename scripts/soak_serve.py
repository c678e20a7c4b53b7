#!/usr/bin/env python3
"""Soak test of `edgepack serve` (issue 31): SECONDS of mixed good and bad traffic from several clients, and the
server's memory and file descriptors watched the whole time.

Traffic, each client drawing at random: KServe v2 JSON and binary inferences (checked against the first answer),
classify with a PNG, async jobs (submit, poll, delete), health/metadata/metrics reads; and the bad ones: a wrong
shape, malformed JSON, an unknown model, a body over the size limit, a truncated binary body, a junk image, a client
that closes the connection half-way through its body, and a slow client that sends its body a few bytes at a time.

Pass: no 5xx answer and no connection the server dropped on a complete request; the server answers at the end; its
RSS after the warm-up (the first 10 % of the time) never exceeds the first post-warm-up sample by more than 5 %;
the open file descriptors, counted once every client has finished its request in flight and paused, do not grow by
more than 5 %.

    scripts/soak_serve.py [--seconds 600] [--clients 8] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402

BEGIN, END = "<!-- soak-serve:begin -->", "<!-- soak-serve:end -->"
MNIST = os.path.join(ROOT, "assets", "models", "mnist_cntk_opset8_simplified.onnx")
PHOTO = os.path.join(ROOT, "assets", "photos", "skimage_chelsea.png")


def edgepack_bin():
    b = os.environ.get("EDGEPACK_BIN")
    if b:
        return b
    t = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(t, "release", "edgepack")


def proc_status(pid):
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.errors = []
        self.idle = 0  # clients paused between requests (none in flight)

    def set_idle(self, delta):
        with self.lock:
            self.idle += delta

    def add(self, kind, status):
        with self.lock:
            self.counts[(kind, status)] = self.counts.get((kind, status), 0) + 1
            if status is None or (isinstance(status, int) and status >= 500):
                if len(self.errors) < 20:
                    self.errors.append((kind, status))


def request(url, method="GET", body=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return None, b""


def raw_http(host, port, head, body_parts, delay=0.0, close_early=False, continue_body=None):
    """Sends a request over a plain socket (parts of the body apart in time, or stops half-way; with
    `continue_body`, the body only after a `100 Continue`); the final status."""
    s = socket.create_connection((host, port), timeout=30)

    def status():
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return None
            data += chunk
        return int(data.split(b" ", 2)[1])

    try:
        s.sendall(head)
        for p in body_parts:
            s.sendall(p)
            if delay:
                time.sleep(delay)
        if close_early:
            return "closed"
        st = status()
        if st == 100 and continue_body is not None:
            s.sendall(continue_body)
            st = status()
        return st
    finally:
        s.close()


def client(url, stop, pause, tally, seed, reference, photo):
    rng = random.Random(seed)
    host, port = url[len("http://"):].split(":")
    port = int(port)
    x = np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)
    good = json.dumps({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": reference[0].ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 3136}}]}).encode()
    binary = head + reference[0].tobytes()
    jhdr = {"Content-Type": "application/json"}
    bhdr = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    infer = url + "/v2/models/mnist/infer"
    while not stop.is_set():
        if pause.is_set():
            # Between requests: nothing of this client's is in flight until the pause ends.
            tally.set_idle(1)
            while pause.is_set() and not stop.is_set():
                time.sleep(0.05)
            tally.set_idle(-1)
            continue
        k = rng.randrange(16)
        if k <= 3:
            st, b = request(infer, "POST", good, jhdr)
            if st == 200 and not np.allclose(json.loads(b)["outputs"][0]["data"], reference[1], atol=1e-4):
                st = "WRONG"
            tally.add("infer json", st)
        elif k == 4:
            st, _ = request(infer, "POST", binary, bhdr)
            tally.add("infer binary", st)
        elif k == 5:
            st, _ = request(url + "/v1/models/mnist:classify?top_k=3", "POST", photo, {"Content-Type": "image/png"})
            tally.add("classify png", st)
        elif k == 6:
            st, b = request(url + "/v2/models/mnist/jobs", "POST", good, jhdr)
            tally.add("job submit", st)
            if st == 202:
                jid = json.loads(b)["id"]
                st, _ = request(url + f"/v2/jobs/{jid}")
                tally.add("job get", st)
                if rng.random() < 0.5:
                    st, _ = request(url + f"/v2/jobs/{jid}", "DELETE")
                    tally.add("job delete", st)
        elif k == 7:
            path = rng.choice(["/v2/health/ready", "/v2/models/mnist", "/metrics", "/v2/models/mnist/ready"])
            st, _ = request(url + path)
            tally.add("read", st)
        elif k == 8:
            bad = json.dumps({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 27], "datatype": "FP32",
                                          "data": x.ravel()[:756].tolist()}]}).encode()
            tally.add("bad shape", request(infer, "POST", bad, jhdr)[0])
        elif k == 9:
            tally.add("bad json", request(infer, "POST", good[: rng.randrange(1, len(good))], jhdr)[0])
        elif k == 10:
            tally.add("unknown model", request(url + "/v2/models/nope/infer", "POST", good, jhdr)[0])
        elif k == 11:
            # As curl sends a large body: `Expect: 100-continue`, the body only after a 100 (the server refuses
            # from Content-Length first; a client that streams 5 MiB into a closed connection loses the answer).
            hd = (f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Connection: close\r\nExpect: 100-continue\r\nContent-Length: {5 << 20}\r\n\r\n").encode()
            try:
                tally.add("oversized", raw_http(host, port, hd, [], continue_body=b"0" * (5 << 20)))
            except OSError:
                tally.add("oversized", None)
        elif k == 12:
            tally.add("truncated binary", request(infer, "POST", binary[:-100], bhdr)[0])
        elif k == 13:
            junk = photo[:64] + bytes(rng.randrange(256) for _ in range(200))
            tally.add("junk image", request(url + "/v1/models/mnist:classify", "POST", junk,
                                            {"Content-Type": "image/png"})[0])
        elif k == 14:
            hd = (f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(good)}\r\n\r\n").encode()
            try:
                tally.add("disconnect mid-body", raw_http(host, port, hd, [good[: len(good) // 3]], close_early=True))
            except OSError:
                tally.add("disconnect mid-body", "closed")
        else:
            hd = (f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Connection: close\r\nContent-Length: {len(good)}\r\n\r\n").encode()
            step = len(good) // 8 + 1
            parts = [good[i:i + step] for i in range(0, len(good), step)]
            try:
                tally.add("slow client", raw_http(host, port, hd, parts, delay=0.25))
            except OSError:
                tally.add("slow client", None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--md", help="write the result table into this markdown file")
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    a = ap.parse_args()
    ep = edgepack_bin()
    tmp = tempfile.mkdtemp(prefix="soak-")
    try:
        repo = os.path.join(tmp, "repo")
        os.makedirs(os.path.join(repo, "mnist", "1"))
        subprocess.run([ep, "pack", MNIST, "--preset", "mnist", "-o", os.path.join(repo, "mnist", "1", "model.edgepack")],
                       check=True, capture_output=True)
        with open(os.path.join(repo, "mnist", "config.json"), "w") as f:
            json.dump({"max_batch_size": 8, "max_queue_delay_ms": 2}, f)
        proc = subprocess.Popen([ep, "serve", "--repo", repo, "--addr", "127.0.0.1:0", "--device", "cpu",
                                 "--max-body-mib", "4", "--job-ttl-s", "30"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://[\d.]+:\d+)", line)
        assert m, line
        url = m[1]
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        while request(url + "/v2/health/ready")[0] != 200:
            assert proc.poll() is None, "server exited"
            time.sleep(0.2)
        x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
        first = json.loads(request(url + "/v2/models/mnist/infer", "POST", json.dumps(
            {"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                         "data": x.ravel().tolist()}]}).encode(), {"Content-Type": "application/json"})[1])
        reference = (x, np.array(first["outputs"][0]["data"]))
        photo = open(PHOTO, "rb").read()
        stop, pause, tally = threading.Event(), threading.Event(), Tally()
        threads = [threading.Thread(target=client, args=(url, stop, pause, tally, k, reference, photo), daemon=True)
                   for k in range(a.clients)]
        t0 = time.time()
        for t in threads:
            t.start()

        def quiet_fds():
            # Every client finishes its request in flight (a slow client's takes 2 s) and waits; then the server
            # has closed their connections. The count is the fewest of a few samples half a second apart.
            pause.set()
            deadline = time.time() + 60
            while tally.idle < a.clients and time.time() < deadline:
                time.sleep(0.05)
            assert tally.idle == a.clients, f"only {tally.idle} of {a.clients} clients paused within 60 s"
            fds = []
            for _ in range(4):
                time.sleep(0.5)
                fds.append(proc_status(proc.pid)[1])
            pause.clear()
            return min(fds)

        warm = t0 + 0.1 * a.seconds
        samples, fds0, base = [], None, None
        while time.time() - t0 < a.seconds:
            time.sleep(min(5.0, max(0.5, a.seconds / 60)))
            assert proc.poll() is None, "the server exited during the soak"
            rss, _ = proc_status(proc.pid)
            samples.append((time.time() - t0, rss))
            if base is None and time.time() >= warm:
                base = rss
                fds0 = quiet_fds()
        fds1 = quiet_fds()
        stop.set()
        for t in threads:
            t.join(60)
        alive = request(url + "/v2/health/ready")[0] == 200
        later = [r for (s, r) in samples if s >= warm - t0]
        base = base or later[0]
        growth = 100 * (max(later) - base) / base
        fd_growth = fds1 - fds0
        total = sum(tally.counts.values())
        bad = {k: v for k, v in tally.counts.items() if k[1] is None or k[1] == "WRONG"
               or (isinstance(k[1], int) and k[1] >= 500)}
        proc.send_signal(2)
        proc.wait(60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kinds = sorted({k for k, _ in tally.counts})
    rows = ["| request | answers (status: count) |", "|---|---|"]
    for kind in kinds:
        got = sorted(((str(s), n) for (k, s), n in tally.counts.items() if k == kind))
        rows.append(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in got)} |")
    ok = not bad and alive and growth <= a.max_growth_pct and fd_growth <= fds0 * a.max_growth_pct / 100
    summary = (f"{a.seconds:.0f} s, {a.clients} clients, {total} requests ({total / a.seconds:.0f}/s); "
               f"RSS after warm-up {base:.1f} MiB, peak later {max(later):.1f} MiB (growth {growth:+.2f} %); "
               f"open fds with every client paused {fds0} → {fds1}; 5xx or dropped: {sum(bad.values())}; "
               f"answers at the end: {alive}; {'PASS' if ok else 'FAIL'}")
    print("\n".join(rows))
    print(summary)
    if a.md:
        cmd = f"scripts/soak_serve.py --seconds {a.seconds:.0f} --clients {a.clients}"
        mdtable.replace_between(a.md, BEGIN, END, f"`{cmd}` (loopback, `edgepack serve --device cpu`, MNIST):\n\n"
                                + "\n".join(rows) + f"\n\n{summary}")
    if not ok:
        print(f"FAIL: bad answers {bad} {tally.errors}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
