#!/usr/bin/env python3
"""`edgepack serve` under load against a FastAPI + onnxruntime service on the same model (issue 6), loopback only.

One run, side by side: a model repository with EfficientNet-Lite0 fp32 (the shipped model, packed with its
pre-processing) twice, `effnet` with dynamic batching (max_batch_size 8, 2 ms; --max-batch) and `effnet_b1`
without (max_batch_size 1); `edgepack serve --device cpu` (--device gpu on a GPU host); the peer `fastapi_ort.py`
under uvicorn (one worker, onnxruntime with one intra-op thread per core). Every target gets the same KServe v2 JSON request (a real photo,
pre-processed by edgepack) from `wrk` (one thread, N keep-alive connections, --duration seconds after a warm-up),
interleaved per client count. Any non-2xx answer or socket error fails the run. The table gives throughput and
p50/p99 latency per client count, and the ratios the issue sets targets for at 32 clients.

Usage: benches/peers/serve_load.py [--clients 1,8,32,64] [--duration 10] [--device cpu|gpu] [--md BENCHMARKS.md]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import mdtable  # noqa: E402

BEGIN, END = "<!-- serve-load:begin -->", "<!-- serve-load:end -->"
WRK = os.environ.get("WRK", "wrk")
MODEL = os.path.join(ROOT, "assets", "models", "efficientnet_lite0_fp32.onnx")
PHOTO = os.path.join(ROOT, "assets", "photos", "skimage_chelsea.png")
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("HEADER_LEN") ~= "" then
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = os.getenv("HEADER_LEN")
end
local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.body = f:read("*a")
f:close()
"""


def edgepack_bin():
    b = os.environ.get("EDGEPACK_BIN")
    if b:
        return b
    return os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "edgepack")


def wait_ready(url, proc, what):
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready")


def ms(s):
    v, unit = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]


GRPC = "127.0.0.1:8792"


def grpc_load(addr, model, x, clients, seconds):
    """N concurrent ModelInfer calls on one gRPC channel for `seconds`: requests/s and latency percentiles. Any
    failed call fails the run."""
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add()
    t.name, t.datatype = "input", "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())

    async def run():
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(addr, options=opts) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            lat = []
            end = time.perf_counter() + seconds

            async def client():
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    await stub.ModelInfer(req)
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*[client() for _ in range(clients)])
            return lat, time.perf_counter() - t0

    lat, wall = asyncio.run(run())
    lat.sort()
    return {"rps": len(lat) / wall, "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3}


def wrk(url, clients, seconds, body, lua, threads=1):
    body_file, header_len = body
    r = subprocess.run([WRK, f"-t{min(threads, clients)}", f"-c{clients}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", lua, url],
                       capture_output=True, text=True,
                       env={**os.environ, "BODY_FILE": body_file, "HEADER_LEN": str(header_len or "")})
    out = r.stdout
    if r.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk against {url} with {clients} clients failed:\n{out}\n{r.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p50 = ms(re.search(r"\s50%\s+(\S+)", out)[1])
    p99 = ms(re.search(r"\s99%\s+(\S+)", out)[1])
    n = int(re.search(r"(\d+) requests in", out)[1])
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--instances", type=int, default=1, help="edgepack workers per model (config.json instances)")
    ap.add_argument("--engine-threads", type=int, default=0,
                    help="engine threads per run (config.json threads; 0 = one per core)")
    ap.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms of the batching model")
    ap.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the batching model")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="edgepack's backend (serve and bench)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (at most one per connection)")
    ap.add_argument("--int8", action="store_true", help="serve the INT8 QDQ model (edgepack quantize) on both services")
    ap.add_argument("--binary", action="store_true", help="also load edgepack with binary tensor requests")
    ap.add_argument("--grpc", action="store_true",
                    help="also load edgepack over KServe v2 gRPC (raw tensors; a grpc.aio client, one channel)")
    ap.add_argument("--md")
    a = ap.parse_args()
    global BEGIN, END
    tag = ("-int8" if a.int8 else "") + ("-gpu" if a.device == "gpu" else "")
    BEGIN, END = f"<!-- serve-load{tag}:begin -->", f"<!-- serve-load{tag}:end -->"
    if not shutil.which(WRK):
        raise SystemExit("wrk is required (apt-get install wrk)")
    clients = [int(c) for c in a.clients.split(",")]
    work = tempfile.mkdtemp(prefix="edgepack-load-")
    procs = []
    body_kib = 0
    try:
        model = MODEL
        if a.int8:
            # INT8 QDQ from `edgepack quantize`, calibrated on the shipped photos; both services run this file.
            model = os.path.join(work, "effnet_int8.onnx")
            subprocess.run([edgepack_bin(), "quantize", "--budget", "none", MODEL, "--calib", os.path.dirname(PHOTO), "--preset", "tf",
                            "--holdout", "0", "--latency-runs", "0", "-o", model], check=True, capture_output=True)
        bundle = os.path.join(work, "effnet.edgepack")
        subprocess.run([edgepack_bin(), "pack", model, "--preset", "tf", "-o", bundle], check=True, capture_output=True)
        repo = os.path.join(work, "repo")
        for name, batch in (("effnet", a.max_batch), ("effnet_b1", 1)):
            os.makedirs(os.path.join(repo, name, "1"))
            shutil.copy(bundle, os.path.join(repo, name, "1", "model.edgepack"))
            json.dump({"max_batch_size": batch, "max_queue_delay_ms": a.delay_ms, "queue_capacity": 1024,
                       "instances": a.instances, "threads": a.engine_threads},
                      open(os.path.join(repo, name, "config.json"), "w"))
        # The request: the photo pre-processed by edgepack, as KServe v2 JSON.
        subprocess.run([edgepack_bin(), "run", bundle, PHOTO, "--save-inputs", work, "--device", "cpu"], check=True,
                       capture_output=True)
        x = np.load(os.path.join(work, "input_input.npy"))
        body_file = os.path.join(work, "request.json")
        json.dump({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
                  open(body_file, "w"))
        body_kib = os.path.getsize(body_file) // 1024
        # The same request with the binary tensor extension (what tritonclient sends by default).
        head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        bin_file = os.path.join(work, "request.bin")
        open(bin_file, "wb").write(head + np.ascontiguousarray(x, np.float32).tobytes())
        bodies = {"json": (body_file, None), "binary": (bin_file, len(head))}
        lua = os.path.join(work, "post.lua")
        open(lua, "w").write(LUA)
        ep = subprocess.Popen([edgepack_bin(), "serve", "--repo", repo, "--addr", "127.0.0.1:8790", "--poll", "0",
                               "--device", a.device] + (["--grpc-addr", GRPC] if a.grpc else []),
                              stderr=subprocess.DEVNULL)
        procs.append(ep)
        peer = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", os.path.dirname(__file__),
                                 "fastapi_ort:app", "--port", "8791", "--log-level", "warning"],
                                env={**os.environ, "MODEL": model})
        procs.append(peer)
        wait_ready("http://127.0.0.1:8790", ep, "edgepack serve")
        wait_ready("http://127.0.0.1:8791", peer, "fastapi")
        targets = {
            "edgepack serve, batching on": ("http://127.0.0.1:8790/v2/models/effnet/infer", "json"),
            "edgepack serve, batching off": ("http://127.0.0.1:8790/v2/models/effnet_b1/infer", "json"),
            "FastAPI + onnxruntime": ("http://127.0.0.1:8791/v2/models/effnet/infer", "json"),
        }
        if a.binary:
            targets["edgepack serve, batching on, binary tensors"] = (targets["edgepack serve, batching on"][0], "binary")
            targets["edgepack serve, batching off, binary tensors"] = (targets["edgepack serve, batching off"][0], "binary")
        if a.grpc:
            targets["edgepack serve, batching on, gRPC"] = ("effnet", "grpc")
            targets["edgepack serve, batching off, gRPC"] = ("effnet_b1", "grpc")
        # Same answer from both services.
        outs = []
        for url in (targets["edgepack serve, batching on"][0], targets["FastAPI + onnxruntime"][0]):
            req = urllib.request.Request(url, data=open(body_file, "rb").read(), headers={"Content-Type": "application/json"})
            outs.append(np.array(json.loads(urllib.request.urlopen(req).read())["outputs"][0]["data"]))
        assert np.argmax(outs[0]) == np.argmax(outs[1]), "the services disagree on top-1"
        load = lambda url, kind, c, secs: (grpc_load(GRPC, url, x, c, secs) if kind == "grpc"  # noqa: E731
                                           else wrk(url, c, secs, bodies[kind], lua, a.wrk_threads))
        for url, kind in targets.values():
            load(url, kind, 8, 3)  # warm-up
        # The engine alone, batch 1 and the largest batch (same batch-freed model the server runs): what batching
        # can gain.
        engine = {}
        for b in (1, a.max_batch):
            r = subprocess.run([edgepack_bin(), "bench", model, "--free-batch", "--batch", str(b), "--device", a.device,
                                "--runs", "20", "--json"], check=True, capture_output=True, text=True)
            engine[b] = json.loads(r.stdout)["p50_ms"]
        rows = []
        for c in clients:
            for name, (url, kind) in targets.items():
                r = load(url, kind, c, a.duration)
                rows.append({"target": name, "clients": c, **r})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    get = lambda t, c: next(r for r in rows if r["target"] == t and r["clients"] == c)  # noqa: E731
    lines = ["| clients | target | requests/s | p50 ms | p99 ms |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['target']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    if 32 in clients:
        on, off, peer = (get(t, 32) for t in list(targets)[:3])
        lines += ["", "At 32 clients (targets: throughput ≥ 2× and p99 ≤ 0.5× FastAPI + onnxruntime; batching ≥ 1.5× "
                  "batch-1 throughput):", "",
                  f"- throughput, edgepack / FastAPI: **{on['rps'] / peer['rps']:.2f}×**",
                  f"- p99, edgepack / FastAPI: **{on['p99_ms'] / peer['p99_ms']:.2f}×**",
                  f"- throughput, batching on / off: **{on['rps'] / off['rps']:.2f}×**",
                  f"- the engine alone (`edgepack bench --free-batch --device {a.device}`): {1000 / engine[1]:.0f} "
                  f"samples/s at batch 1, {a.max_batch * 1000 / engine[a.max_batch]:.0f} samples/s at batch "
                  f"{a.max_batch} (**{engine[1] * a.max_batch / engine[a.max_batch]:.2f}×**)"]
        if a.binary:
            bon, boff = get("edgepack serve, batching on, binary tensors", 32), get("edgepack serve, batching off, binary tensors", 32)
            lines.append(f"- with binary tensors (no JSON parsing), batching on / off: **{bon['rps'] / boff['rps']:.2f}×**")
        if a.grpc:
            gon = get("edgepack serve, batching on, gRPC", 32)
            ref = get("edgepack serve, batching on, binary tensors", 32) if a.binary else on
            lines.append(f"- gRPC / HTTP ({'binary' if a.binary else 'JSON'} tensors), batching on: **{gon['rps'] / ref['rps']:.2f}×** "
                         f"throughput, **{gon['p99_ms'] / ref['p99_ms']:.2f}×** p99")
    table = "\n".join(lines)
    print(table)
    if a.md:
        cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True,
                             text=True).stdout.strip()
        adapter = ""
        if a.device == "gpu":
            from gpu_host import adapter as gpu_adapter
            gpu = gpu_adapter()
            adapter = f" ({gpu['name']} / {gpu['api']}, driver {gpu['driver']})"
        flags = (" --int8" if a.int8 else "") + (" --binary" if a.binary else "") + (" --grpc" if a.grpc else "")
        for opt, default in (("device", "cpu"), ("max_batch", 8), ("wrk_threads", 1), ("duration", 10)):
            if getattr(a, opt) != default:
                flags += f" --{opt.replace('_', '-')} {getattr(a, opt)}"
        meta = (f"`python3 benches/peers/serve_load.py{flags} --md {a.md}` on {os.cpu_count()} cores ({cpu}); EfficientNet-"
                f"Lite0 {'INT8 (QDQ from edgepack quantize)' if a.int8 else 'fp32'}, one 224×224 photo per request as KServe v2 JSON (~{body_kib} KiB), "
                f"wrk with {a.wrk_threads} thread(s) and N connections for {a.duration} s per cell, services and load "
                f"generator on the same machine. edgepack: `--device {a.device}`{adapter}, max batch {a.max_batch}, "
                f"{a.instances} instance(s) per model, engine threads {a.engine_threads or 'one per core'}; the peer: "
                "one uvicorn worker, onnxruntime with one intra-op thread per core, runs off the event loop."
                + (" gRPC rows: the same tensor as raw_input_contents from a Python grpc.aio client (N concurrent calls "
                   "on one channel, as tritonclient.grpc uses one)." if a.grpc else ""))
        mdtable.replace_between(a.md, BEGIN, END, f"{meta}\n\n{table}")


if __name__ == "__main__":
    main()
