"""The generated Python bindings against the built library: classify, detect, run, errors, async, a foreign HTTP
transport, and the cloud fallback against a real `edgepack serve` on loopback.

    python bindings_test.py FIXTURES.json

FIXTURES.json (written by tests/python/test_bindings.py) names the generated module's folder, the bundles, the
photos, the expected outputs and the endpoints (a live server, a slow one, a dead port). Prints `N passed, N failed`
and exits non-zero on any failure."""
import asyncio
import json
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

FX = json.load(open(sys.argv[1]))
sys.path.insert(0, FX["module_dir"])
import edgepack_mobile as ep  # noqa: E402

RESULTS = []
# Under an emulator (the aarch64 library under qemu) device runs and the HTTP client are tens of times slower:
# checks whose assertions are wall-clock bounds tuned for native speed are skipped there, and said so.
EMULATED = bool(FX.get("emulated"))


def check(name, wall_clock=False):
    def wrap(f):
        if wall_clock and EMULATED:
            print(f"SKIP {name} (emulated CPU: its wall-clock bounds assume native speed)", flush=True)
            return f
        t0 = time.time()
        try:
            f()
            RESULTS.append((name, True))
            print(f"PASS {name} ({time.time() - t0:.2f} s)", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, the run goes on
            RESULTS.append((name, False))
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return f

    return wrap


def read(path):
    with open(path, "rb") as f:
        return f.read()


def opts(backend=ep.Backend.CPU, cloud=None, key=None):
    return ep.EngineOptions(backend=backend, threads=1, variant=None, verification_key=key, cloud=cloud)


def cloud(endpoint, model, policy, **kw):
    return ep.CloudConfig(endpoint=endpoint, model=model, policy=policy, **kw)


PHOTO = {k: read(v) for k, v in FX["photos"].items()}
KEY = open(FX["public_key"]).read()
MNIST_IN = ep.NamedTensor(name=FX["mnist_input_name"], dtype=ep.DType.F32, shape=[1, 1, 28, 28],
                          data=read(FX["mnist_input"]))
MNIST_OUT = read(FX["mnist_expected"])


def f32(b):
    import struct
    return struct.unpack(f"<{len(b) // 4}f", b)


def close(a, b, tol=1e-4):
    x, y = f32(a), f32(b)
    return len(x) == len(y) and all(abs(p - q) <= tol * (1 + abs(q)) for p, q in zip(x, y))


def top_labels(classes, n=3):
    return [c.label.split(",")[0] for c in classes[:n]]


class UrllibTransport(ep.HttpTransport):
    """A foreign transport (what an app does with URLSession or OkHttp), counting its calls; `fail` makes it raise."""

    def __init__(self):
        self.calls = 0
        self.fail = False

    def send(self, request):
        self.calls += 1
        if self.fail:
            raise ep.TransportError.Failed("simulated network down")
        req = urllib.request.Request(request.url, data=bytes(request.body), method=request.method,
                                     headers={h.name: h.value for h in request.headers})
        try:
            with urllib.request.urlopen(req, timeout=request.timeout_ms / 1000) as r:
                return ep.HttpResponse(status=r.status, headers=[ep.HttpHeader(name=k, value=v) for k, v in r.headers.items()],
                                       body=r.read())
        except urllib.error.HTTPError as e:
            return ep.HttpResponse(status=e.code, headers=[ep.HttpHeader(name=k, value=v) for k, v in e.headers.items()],
                                   body=e.read())
        except TimeoutError as e:
            raise ep.TransportError.Timeout(str(e))
        except OSError as e:
            raise ep.TransportError.Failed(str(e))


# --- device ---------------------------------------------------------------------------------------------------

effnet = ep.Engine.open(FX["effnet"], opts(key=KEY))


@check("sdk version and model info")
def _():
    assert ep.sdk_version()
    info = effnet.info()
    assert [i.name for i in info.inputs] == ["input"] or len(info.inputs) == 1, info.inputs
    assert info.inputs[0].dtype == ep.DType.F32 and info.inputs[0].shape[1:] == [3, 224, 224], info.inputs[0]
    assert len(info.labels) == 1000 and info.task == "classification"
    assert info.trusted and info.signer, info
    assert info.device_backend and "cpu" in info.device_backend.lower(), info.device_backend
    if FX.get("cpu") == "interp":
        assert "kernel interpreter" in info.device_backend, info.device_backend
        print(f"(kernel-interpreter build: {info.device_backend})", flush=True)
    assert info.device_error is None and info.cloud is None


@check("classify the shipped photos on the device")
def _():
    r = effnet.classify(PHOTO["chelsea"], 5)
    assert top_labels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"], top_labels(r.classes)
    assert len(r.classes) == 5 and r.classes[0].index == 282
    assert r.provenance.place == ep.Place.DEVICE and "cpu" in r.provenance.backend.lower()
    assert "no cloud" in r.provenance.reason and r.provenance.latency_ms > 0
    c = effnet.classify(PHOTO["coffee"], 1).classes
    assert c[0].label.startswith("espresso") and c[0].score > 0.9, c


@check("detect the face in the astronaut photo")
def _():
    face = ep.Engine.open(FX["ultraface"], opts())
    assert face.info().task == "detection"
    d = face.detect(PHOTO["astronaut"]).detections
    assert len(d) == 1, d
    b = d[0]
    assert b.score > 0.9 and 0 <= b.x1 < b.x2 <= 512 and 0 <= b.y1 < b.y2 <= 512, b
    assert b.x2 - b.x1 > 50, b  # a face, not a speck


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


if "yolo" in FX:
    @check("detect document regions with YOLOv8 on the device and through the cloud")
    def _():
        img = read(FX["yolo_image"])
        local = ep.Engine.open(FX["yolo"], opts()).detect(img).detections
        assert len(local) == len(FX["yolo_reference"]), (local, FX["yolo_reference"])
        for want in FX["yolo_reference"]:
            best = max(local, key=lambda d: iou([d.x1, d.y1, d.x2, d.y2], want["box_xyxy_image_px"]))
            assert best.label == want["class"], (best, want)
            assert iou([best.x1, best.y1, best.x2, best.y2], want["box_xyxy_image_px"]) >= 0.9, (best, want)
            assert best.mask is None and best.keypoints == [], best
        remote = ep.Engine.cloud_only(cloud(FX["serve"], "doclayout", ep.FallbackPolicy.ALWAYS), None).detect(img)
        assert remote.provenance.place == ep.Place.CLOUD
        assert [d.label for d in remote.detections] == [d.label for d in local], (remote.detections, local)
        assert all(abs(a.x1 - b.x1) < 0.5 and abs(a.y2 - b.y2) < 0.5 for a, b in zip(remote.detections, local))
else:
    print("SKIP detect document regions with YOLOv8 (no shared model)", flush=True)


@check("the GPU backend (wgpu) through the bindings")
def _():
    if FX.get("cpu") == "interp":
        # The small build has no GPU backend: asking for it is a typed error that says so.
        try:
            ep.Engine.open(FX["effnet"], opts(backend=ep.Backend.GPU))
        except ep.EdgepackError.Internal as e:
            assert "no GPU backend" in str(e), e
            return
        raise AssertionError("a build without the gpu feature opened a GPU engine")
    try:
        g = ep.Engine.open(FX["effnet"], opts(backend=ep.Backend.GPU))
    except (ep.EdgepackError.Internal, ep.EdgepackError.Unavailable, ep.EdgepackError.UnsupportedOp) as e:
        if os.environ.get("EDGEPACK_REQUIRE_GPU"):
            raise
        print(f"!!!!!!!!!! SKIPPED the GPU check: no usable adapter ({e})", flush=True)
        return
    assert "gpu" in g.info().device_backend.lower(), g.info().device_backend
    r = g.classify(PHOTO["chelsea"], 3)
    assert "gpu" in r.provenance.backend.lower() and top_labels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"]
    cpu = effnet.classify(PHOTO["chelsea"], 3).classes
    assert all(abs(a.score - b.score) < 1e-3 for a, b in zip(r.classes, cpu)), (r.classes, cpu)


@check("run named tensors as bytes equals onnxruntime")
def _():
    m = ep.Engine.from_bytes(read(FX["mnist"]), opts())
    r = m.run([MNIST_IN])
    assert len(r.outputs) == 1 and r.outputs[0].dtype == ep.DType.F32 and r.outputs[0].shape == [1, 10]
    assert close(r.outputs[0].data, MNIST_OUT), (f32(r.outputs[0].data), f32(MNIST_OUT))


# --- errors ---------------------------------------------------------------------------------------------------

def raises(exc, f, *a):
    try:
        f(*a)
    except exc as e:
        return e
    raise AssertionError(f"expected {exc.__name__}")


@check("typed errors for bad input")
def _():
    m = ep.Engine.from_bytes(read(FX["mnist"]), opts())
    bad_shape = ep.NamedTensor(name=MNIST_IN.name, dtype=ep.DType.F32, shape=[1, 1, 28, 27], data=bytes(28 * 27 * 4))
    e = raises(ep.EdgepackError.InvalidInput, m.run, [bad_shape])
    assert "shape" in str(e), e
    bad_len = ep.NamedTensor(name=MNIST_IN.name, dtype=ep.DType.F32, shape=[1, 1, 28, 28], data=bytes(10))
    raises(ep.EdgepackError.InvalidInput, m.run, [bad_len])
    bad_dtype = ep.NamedTensor(name=MNIST_IN.name, dtype=ep.DType.I64, shape=[1, 1, 28, 28], data=bytes(28 * 28 * 8))
    assert "dtype" in str(raises(ep.EdgepackError.InvalidInput, m.run, [bad_dtype]))
    bad_name = ep.NamedTensor(name="nope", dtype=ep.DType.F32, shape=[1, 1, 28, 28], data=MNIST_IN.data)
    raises(ep.EdgepackError.InvalidInput, m.run, [bad_name])
    raises(ep.EdgepackError.Image, effnet.classify, b"not an image", 5)
    bare = ep.Engine.from_bytes(read(FX["mnist_onnx"]), opts())  # a bare .onnx: no pre-processing to apply
    assert "pre-processing" in str(raises(ep.EdgepackError.Processing, bare.classify, PHOTO["coffee"], 5))


@check("typed errors for bad bundles and keys")
def _():
    raises(ep.EdgepackError.Io, ep.Engine.open, "/nonexistent/model.edgepack", opts())
    data = read(FX["effnet"])
    raises(ep.EdgepackError.InvalidBundle, ep.Engine.from_bytes, data[: len(data) // 2], opts())
    tampered = bytearray(data)
    tampered[len(data) - 1000] ^= 0xFF
    raises(ep.EdgepackError.InvalidBundle, ep.Engine.from_bytes, bytes(tampered), opts())
    raises(ep.EdgepackError.InvalidBundle, ep.Engine.from_bytes, read(FX["unsigned"]), opts(key=KEY))
    raises(ep.EdgepackError.InvalidBundle, ep.Engine.open, FX["effnet"], opts(key="edgepack-ed25519-public:garbage"))
    raises(ep.EdgepackError.InvalidModel, ep.Engine.from_bytes, b"\x08\x07garbage", opts())
    e = raises(ep.EdgepackError.UnsupportedOp, ep.Engine.from_bytes, read(FX["custom_op"]), opts())
    assert e.op.endswith("Mystery") and e.node, (e.op, e.node)
    raises(ep.EdgepackError.InvalidInput, ep.Engine.cloud_only, cloud("ftp://x", "m", ep.FallbackPolicy.ALWAYS), None)


# --- async ----------------------------------------------------------------------------------------------------

@check("async variants")
def _():
    m = ep.Engine.from_bytes(read(FX["mnist"]), opts())

    async def main():
        a, b, r = await asyncio.gather(effnet.classify_async(PHOTO["chelsea"], 3), effnet.classify_async(PHOTO["coffee"], 1),
                                       m.run_async([MNIST_IN]))
        assert top_labels(a.classes) == ["tiger cat", "Egyptian cat", "tabby"]
        assert b.classes[0].label.startswith("espresso")
        assert close(r.outputs[0].data, MNIST_OUT)
        try:
            await effnet.classify_async(b"junk", 3)
            raise AssertionError("no error")
        except ep.EdgepackError.Image:
            pass
        face = ep.Engine.open(FX["ultraface"], opts())
        d = await face.detect_async(PHOTO["astronaut"])
        assert len(d.detections) == 1

    asyncio.run(main())


# --- cloud fallback against a real `edgepack serve` ---------------------------------------------------------------

SERVE, SLOW, DEAD = FX["serve"], FX["slow"], FX["dead"]


@check("offline: the device answers, the dead cloud is never asked")
def _():
    t = UrllibTransport()
    e = ep.Engine.open(FX["effnet"], opts(cloud=cloud(DEAD, "effnet", ep.FallbackPolicy.ON_ERROR)), t)
    r = e.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.DEVICE and "on-error" in r.provenance.reason
    assert t.calls == 0 and e.breaker() == ep.BreakerState.CLOSED(failures=0)


@check("a model the device cannot run is answered by the cloud")
def _():
    e = ep.Engine.from_bytes(read(FX["custom_op"]), opts(cloud=cloud(SERVE, "mnist", ep.FallbackPolicy.ON_UNSUPPORTED)))
    info = e.info()
    assert info.device_backend is None and "Mystery" in info.device_error, info
    r = e.run([MNIST_IN])
    assert r.provenance.place == ep.Place.CLOUD, r.provenance
    assert "cannot run" in r.provenance.reason and "Mystery" in r.provenance.device_error
    assert "version 1" in r.provenance.backend, r.provenance.backend
    assert close(r.outputs[0].data, MNIST_OUT)
    # Never: the same model is a typed error at open.
    raises(ep.EdgepackError.UnsupportedOp, ep.Engine.from_bytes, read(FX["custom_op"]),
           opts(cloud=cloud(SERVE, "mnist", ep.FallbackPolicy.NEVER)))


@check("cloud results equal device results (classify, detect, run; foreign transport)")
def _():
    t = UrllibTransport()
    c = ep.Engine.cloud_only(cloud(SERVE, "effnet", ep.FallbackPolicy.ALWAYS), t)
    r = c.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.CLOUD and t.calls == 1
    d = effnet.classify(PHOTO["chelsea"], 3)
    assert [x.index for x in r.classes] == [x.index for x in d.classes]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(r.classes, d.classes))
    assert top_labels(r.classes) == top_labels(d.classes)
    f = ep.Engine.cloud_only(cloud(SERVE, "ultraface", ep.FallbackPolicy.ALWAYS), None)
    dets = f.detect(PHOTO["astronaut"]).detections
    local = ep.Engine.open(FX["ultraface"], opts()).detect(PHOTO["astronaut"]).detections
    assert len(dets) == len(local) == 1 and abs(dets[0].x1 - local[0].x1) < 0.5, (dets, local)
    m = ep.Engine.cloud_only(cloud(SERVE, "mnist", ep.FallbackPolicy.ALWAYS, version="1"), t)
    out = m.run([MNIST_IN])
    assert out.provenance.backend.endswith("version 1") and close(out.outputs[0].data, MNIST_OUT)
    # The server's own error comes back typed.
    e = raises(ep.EdgepackError.Cloud, m.run, [ep.NamedTensor(name="nope", dtype=ep.DType.F32, shape=[1], data=bytes(4))])
    assert e.status == 400, e


@check("cloud down: device result, or a typed error, within the deadline", wall_clock=True)
def _():
    e = ep.Engine.open(FX["effnet"], opts(cloud=cloud(DEAD, "effnet", ep.FallbackPolicy.ALWAYS, deadline_ms=1000)))
    t0 = time.time()
    r = e.classify(PHOTO["chelsea"], 3)
    assert time.time() - t0 < 1.0 + 0.5
    assert r.provenance.place == ep.Place.DEVICE and r.provenance.cloud_error, r.provenance
    assert top_labels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"]
    c = ep.Engine.cloud_only(cloud(DEAD, "effnet", ep.FallbackPolicy.ALWAYS, deadline_ms=1000), None)
    t0 = time.time()
    raises(ep.EdgepackError.Transport, c.classify, PHOTO["chelsea"], 3)
    assert time.time() - t0 < 1.5


@check("slow cloud: the deadline is honoured", wall_clock=True)
def _():
    c = ep.Engine.cloud_only(cloud(SLOW, "effnet", ep.FallbackPolicy.ALWAYS, deadline_ms=300), None)
    t0 = time.time()
    e = raises(ep.EdgepackError.Timeout, c.classify, PHOTO["chelsea"], 3)
    took = time.time() - t0
    assert 0.25 < took < 0.8, took
    assert e.deadline_ms == 300
    d = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SLOW, "effnet", ep.FallbackPolicy.ALWAYS, deadline_ms=300)))
    t0 = time.time()
    r = d.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.DEVICE and "deadline" in r.provenance.cloud_error, r.provenance
    assert time.time() - t0 < 0.3 + 0.5


@check("on-timeout: a slow device hands over to the cloud", wall_clock=True)
def _():
    slow = read(FX["slow_mnist"])  # a device run of hundreds of ms; the server's mnist answers in a few
    t0 = time.time()
    ep.Engine.from_bytes(slow, opts()).run([MNIST_IN])
    device_s = time.time() - t0
    e = ep.Engine.from_bytes(slow, opts(cloud=cloud(SERVE, "mnist", ep.FallbackPolicy.ON_TIMEOUT, device_timeout_ms=20)))
    t0 = time.time()
    r = e.run([MNIST_IN])
    assert r.provenance.place == ep.Place.CLOUD and "took over 20 ms" in r.provenance.reason, (r.provenance, device_s)
    assert close(r.outputs[0].data, MNIST_OUT) and time.time() - t0 < device_s, (time.time() - t0, device_s)
    e = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SERVE, "effnet", ep.FallbackPolicy.ON_TIMEOUT, device_timeout_ms=20000)))
    r = e.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.DEVICE and "within 20000 ms" in r.provenance.reason, r.provenance
    # A slow cloud: a hedge, not a wait. The device's answer wins as soon as it comes.
    e = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SLOW, "effnet", ep.FallbackPolicy.ON_TIMEOUT, device_timeout_ms=1,
                                                      deadline_ms=3000)))
    t0 = time.time()
    r = e.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.DEVICE and "answered first" in r.provenance.reason, r.provenance
    assert time.time() - t0 < 1.0 and top_labels(r.classes) == ["tiger cat", "Egyptian cat", "tabby"]


@check("on-low-confidence: unsure device results go to the cloud", wall_clock=True)
def _():
    unsure = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SERVE, "effnet", ep.FallbackPolicy.ON_LOW_CONFIDENCE, min_confidence=0.99)))
    r = unsure.classify(PHOTO["chelsea"], 3)
    assert r.provenance.place == ep.Place.CLOUD and "below 0.99" in r.provenance.reason, r.provenance
    sure = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SERVE, "effnet", ep.FallbackPolicy.ON_LOW_CONFIDENCE, min_confidence=0.1)))
    assert sure.classify(PHOTO["chelsea"], 3).provenance.place == ep.Place.DEVICE


@check("circuit breaker: opens after N failures, refuses at once, half-opens, closes on success")
def _():
    t = UrllibTransport()
    t.fail = True
    cfg = cloud(SERVE, "effnet", ep.FallbackPolicy.ALWAYS, breaker_failures=2, breaker_cooldown_ms=400)
    c = ep.Engine.cloud_only(cfg, t)
    raises(ep.EdgepackError.Transport, c.classify, PHOTO["coffee"], 1)
    assert c.breaker() == ep.BreakerState.CLOSED(failures=1)
    raises(ep.EdgepackError.Transport, c.classify, PHOTO["coffee"], 1)
    assert c.breaker().is_OPEN(), c.breaker()
    t0 = time.time()
    e = raises(ep.EdgepackError.CircuitOpen, c.classify, PHOTO["coffee"], 1)
    assert time.time() - t0 < 0.1 and t.calls == 2 and 0 < e.retry_in_ms <= 400, (t.calls, e.retry_in_ms)
    time.sleep(0.45)
    assert c.breaker() == ep.BreakerState.HALF_OPEN()
    raises(ep.EdgepackError.Transport, c.classify, PHOTO["coffee"], 1)  # the trial fails: open again
    assert c.breaker().is_OPEN() and t.calls == 3
    time.sleep(0.45)
    t.fail = False
    r = c.classify(PHOTO["coffee"], 1)  # the trial succeeds: closed
    assert r.provenance.place == ep.Place.CLOUD and c.breaker() == ep.BreakerState.CLOSED(failures=0)


@check("circuit breaker with a device: open means an immediate device answer")
def _():
    t = UrllibTransport()
    t.fail = True
    e = ep.Engine.open(FX["effnet"], opts(cloud=cloud(SERVE, "effnet", ep.FallbackPolicy.ALWAYS, breaker_failures=1,
                                                      breaker_cooldown_ms=60000)), t)
    r1 = e.classify(PHOTO["coffee"], 1)
    assert r1.provenance.place == ep.Place.DEVICE and "simulated" in r1.provenance.cloud_error
    r2 = e.classify(PHOTO["coffee"], 1)
    assert r2.provenance.place == ep.Place.DEVICE and "breaker open" in r2.provenance.cloud_error, r2.provenance
    assert t.calls == 1


@check("a transport that raises an unexpected exception is a typed error")
def _():
    class Broken(ep.HttpTransport):
        def send(self, request):
            raise RuntimeError("bug in the app's transport")

    c = ep.Engine.cloud_only(cloud(SERVE, "effnet", ep.FallbackPolicy.ALWAYS), Broken())
    e = raises(ep.EdgepackError.Transport, c.classify, PHOTO["coffee"], 1)
    assert "bug in the app" in str(e) or "raised" in str(e), e


if "silero" in FX:
    @check("stream: Silero VAD in 32 ms chunks, state carried, gives the reference's 30 speech segments")
    def _():
        import array
        audio = array.array("f", read(FX["silero_audio"])).tolist()
        s = ep.Engine.open(FX["silero"], opts()).open_stream()
        assert s.chunk_len() == 512 and s.sample_rate() == 16000
        values = []
        for i in range(0, len(audio), 512):
            values += [step.value for step in s.push(audio[i:i + 512])]
        assert len(values) == 1875, len(values)
        speech = [v > 0.5 for v in values] + [False]
        starts = [k for k in range(len(speech) - 1) if speech[k] and (k == 0 or not speech[k - 1])]
        assert len(starts) == 30 and abs(sum(speech) / 1875 - 0.774) < 0.001, (len(starts), sum(speech))
        assert round(starts[0] * 512 / 16000, 2) == 0.03, starts[:3]
        # Uneven pushes give the same values; reset starts over.
        s.reset()
        again = [st.value for st in s.push(audio[:700])] + [st.value for st in s.push(audio[700:2048])]
        assert again == values[:4], (again, values[:4])
        out = s.push(audio[2048:2560])[0].outputs
        assert [o.name for o in out] == ["output"], [o.name for o in out]  # the state stays inside
else:
    print("SKIP stream: no Silero VAD fixture (../shared absent)", flush=True)


passed = sum(ok for _, ok in RESULTS)
failed = len(RESULTS) - passed
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
