"""The mobile SDK (issue 7) through its generated bindings, not Rust stand-ins: the uniffi-generated Python module,
the Kotlin sources on the JVM and the Swift sources (Swift for Linux, issue 33) run mobile/tests/bindings_test.py,
BindingsTest.kt and BindingsTest.swift, one list of checks, against the built library and a real `edgepack serve` on
loopback; the Swift header is also checked against the library's exported symbols.

Fixtures come from the shipped assets (no ../shared needed): bundles packed by the edgepack binary (one signed),
a model with an operator no backend has, expected outputs from onnxruntime, a live server, a slow one and a dead
port."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, ep
from test_serve import EFFNET, MNIST, PHOTOS, SYNSETS, Server

ULTRAFACE = os.path.join(ROOT, "assets", "models", "ultraface_rfb_320.onnx")
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
KOTLIN_HOME = os.path.join(ROOT, ".tools", "node_modules", "kotlin-compiler")
JNA = "/usr/share/java/jna.jar"


def required(what, why):
    msg = f"{what} is not available ({why})"
    if os.environ.get("CI") == "true":
        pytest.fail("REQUIRED: " + msg + "; .ci/run installs it")
    print("\n" + "!" * 20 + " SKIPPED: " + msg)
    pytest.skip("SKIPPED: " + msg)


@pytest.fixture(scope="module")
def bindings(tmp_path_factory):
    out = tmp_path_factory.mktemp("bindings")
    r = subprocess.run([os.path.join(ROOT, "scripts", "bindings.sh"), str(out)], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


class SlowServer:
    """Accepts connections and answers nothing for `delay` seconds: a cloud that is up but too slow."""

    def __init__(self, delay=5.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.delay = delay
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(c,), daemon=True).start()

    def _hold(self, c):
        time.sleep(self.delay)
        try:
            c.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        except OSError:
            pass
        c.close()


def dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


def custom_op_model(path):
    """MNIST's inputs and outputs around an operator of a domain no backend implements."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("Input3", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("Plus214_Output_0", TensorProto.FLOAT, [1, 10])
    node = helper.make_node("Mystery", ["Input3"], ["Plus214_Output_0"], name="mystery_0", domain="com.example.ops")
    g = helper.make_graph([node], "custom", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example.ops", 1)])
    onnx.save(m, path)


def slow_model(path, rows=256, depth=48):
    """MNIST's inputs and outputs around `depth` MatMuls of a [rows, 784] activation by one shared 784×784 weight
    (~12 GFLOP): a device run of a few hundred ms, for on-timeout hand-overs that do not hang on a close race."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    init = [
        numpy_helper.from_array((rng.standard_normal((784, 784)) / 28.0).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((784, 10)) / 28.0).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([784, 1], dtype=np.int64), "column"),
        numpy_helper.from_array(np.array([1, 784], dtype=np.int64), "row"),
        numpy_helper.from_array(np.ones((1, rows), dtype=np.float32), "ones"),
    ]
    # h0 = x^T · ones: [784, rows]; then h = w · h, `depth` times; the mean column through a 784×10 head.
    nodes = [helper.make_node("Reshape", ["Input3", "column"], ["x"], name="to_column"),
             helper.make_node("MatMul", ["x", "ones"], ["h0"], name="widen")]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", ["w", f"h{i}"], [f"h{i + 1}"], name=f"mm{i}"))
    nodes.append(helper.make_node("ReduceMean", [f"h{depth}"], ["m"], name="mean", axes=[1], keepdims=1))
    nodes.append(helper.make_node("Reshape", ["m", "row"], ["r"], name="to_row"))
    nodes.append(helper.make_node("MatMul", ["r", "head"], ["Plus214_Output_0"], name="head"))
    x = helper.make_tensor_value_info("Input3", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("Plus214_Output_0", TensorProto.FLOAT, [1, 10])
    g = helper.make_graph(nodes, "slow", [x], [y], initializer=init)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


@pytest.fixture(scope="module")
def fixtures(bindings, tmp_path_factory, binary):
    d = tmp_path_factory.mktemp("mobile-fixtures")
    ep("keygen", "-o", d / "key")
    pub = next(p for p in d.iterdir() if p.name.endswith(".pub"))
    sec = next(p for p in d.iterdir() if p.name.startswith("key") and not p.name.endswith(".pub"))
    ep("pack", EFFNET, "--preset", "tf", "--labels", SYNSETS, "--sign", sec, "-o", d / "effnet.edgepack")
    ep("pack", EFFNET, "--preset", "tf", "--labels", SYNSETS, "-o", d / "unsigned.edgepack")
    ep("pack", ULTRAFACE, "--preset", "ultraface", "--task", "detection", "-o", d / "ultraface.edgepack")
    ep("pack", MNIST, "--preset", "mnist", "-o", d / "mnist.edgepack")
    custom_op_model(str(d / "custom_op.onnx"))
    slow_model(str(d / "slow_mnist.onnx"))
    x = np.random.default_rng(7).random((1, 1, 28, 28), dtype=np.float32)
    (d / "mnist_input.bin").write_bytes(x.tobytes())
    import onnxruntime as ort

    s = ort.InferenceSession(MNIST, providers=["CPUExecutionProvider"])
    (d / "mnist_expected.bin").write_bytes(s.run(None, {"Input3": x})[0].astype("<f4").tobytes())

    repo = d / "repo"
    served = [("effnet", d / "effnet.edgepack"), ("ultraface", d / "ultraface.edgepack"), ("mnist", d / "mnist.edgepack")]
    # The shared YOLOv8n (AGPL: test use only, never committed): the detector apps ship most, through the bindings.
    shared = os.path.abspath(os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    yolo = os.path.join(shared, "models", "yolov8n-doclaynet.onnx")
    yolo_fx = {}
    if os.path.exists(yolo):
        ep("pack", yolo, "--task", "detection", "--class-agnostic", "-o", d / "yolo.edgepack")
        served.append(("doclayout", d / "yolo.edgepack"))
        ref = json.load(open(os.path.join(shared, "models", "reference_results", "yolov8n-doclaynet.detections.json")))
        yolo_fx = {"yolo": str(d / "yolo.edgepack"), "yolo_image": os.path.join(shared, "data", "ocr", "en.jpg"),
                   "yolo_reference": ref["detections"]["en.jpg"]}
    else:
        print(f"\n{'!' * 20} SKIPPED: the YOLO check (no {yolo})")
    for name, src in served:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(src, repo / name / "1" / "model.edgepack")
    server = Server(repo, "--device", "cpu")
    slow = SlowServer()
    fx = {
        "module_dir": str(bindings / "python"),
        "effnet": str(d / "effnet.edgepack"),
        "unsigned": str(d / "unsigned.edgepack"),
        "ultraface": str(d / "ultraface.edgepack"),
        "mnist": str(d / "mnist.edgepack"),
        "mnist_onnx": MNIST,
        "custom_op": str(d / "custom_op.onnx"),
        "slow_mnist": str(d / "slow_mnist.onnx"),
        "public_key": str(pub),
        "mnist_input": str(d / "mnist_input.bin"),
        "mnist_input_name": "Input3",
        "mnist_expected": str(d / "mnist_expected.bin"),
        "photos": {k: os.path.join(PHOTOS, f"skimage_{k}.png") for k in ("chelsea", "coffee", "astronaut")},
        "serve": server.url,
        "slow": slow.url,
        "dead": dead_url(),
        **yolo_fx,
    }
    # The stream API's check needs Silero VAD and its test recording from ../shared (skipped loudly without).
    shared = os.path.abspath(os.environ.get("EDGEPACK_SHARED") or os.path.join(ROOT, "..", "shared"))
    silero = os.path.join(shared, "models", "silero_vad.onnx")
    if os.path.exists(silero):
        import wave
        spec = {"input": "input", "chunk": 512, "context": 64, "state": [{"input": "state", "output": "stateN"}],
                "constants": {"sr": 16000}, "output": "output", "sample_rate": 16000}
        ep("pack", silero, "--task", "custom", "--stream-json", json.dumps(spec), "-o", d / "silero.edgepack")
        with wave.open(os.path.join(shared, "data", "audio", "silero_test_16k.wav")) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        (d / "silero_audio.f32").write_bytes((pcm.astype(np.float32) / 32768.0).astype("<f4").tobytes())
        fx.update(silero=str(d / "silero.edgepack"), silero_audio=str(d / "silero_audio.f32"))
    else:
        print(f"\n{'!' * 20} SKIPPED: the stream check (no {silero})")
    (d / "fixtures.json").write_text(json.dumps(fx, indent=1))
    # The Kotlin test reads a flat properties file.
    flat = {**{k: v for k, v in fx.items() if isinstance(v, str)}, **{f"photo.{k}": v for k, v in fx["photos"].items()}}
    for i, det in enumerate(fx.get("yolo_reference", [])):
        flat.update({f"yolo_reference.{i}.class": det["class"], f"yolo_reference.{i}.box": ",".join(map(str, det["box_xyxy_image_px"]))})
    if "yolo_reference" in fx:
        flat["yolo_reference.count"] = str(len(fx["yolo_reference"]))
    (d / "fixtures.properties").write_text("".join(f"{k}={v}\n" for k, v in flat.items()))
    yield d
    assert server.stop() == 0, "".join(server.log[-20:])


def expected_checks(fixtures):
    """How many checks each language runs with these fixtures: the whole list (mobile/README.md) but the YOLO and
    stream checks when ../shared lacks their model."""
    fx = json.loads((fixtures / "fixtures.json").read_text())
    names = re.findall(CHECK_SOURCES["Python"][1], open(os.path.join(ROOT, "mobile", "tests", CHECK_SOURCES["Python"][0])).read())
    return len(names) - ("yolo" not in fx) - ("silero" not in fx)


def summary(out):
    m = re.findall(r"^(\d+) passed, (\d+) failed$", out, re.M)
    assert m, "no `N passed, N failed` line:\n" + out[-3000:]
    return int(m[-1][0]), int(m[-1][1])


def test_python_bindings(fixtures):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "mobile", "tests", "bindings_test.py"), str(fixtures / "fixtures.json")],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-2000:])
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0 and passed == expected_checks(fixtures), r.stdout[-6000:] + r.stderr[-3000:]


def test_python_bindings_kernel_interpreter_build(fixtures, tmp_path):
    """The library without tract or the GPU (`--no-default-features`: the CPU backend is edgepack's kernel
    interpreter, the build whose size BENCHMARKS.md reports) passes the same Python checks; the one model outside
    the interpreter's op set is refused at load with a typed error naming the op."""
    out = tmp_path / "bindings"
    r = subprocess.run([os.path.join(ROOT, "scripts", "bindings.sh"), str(out)], capture_output=True, text=True,
                       timeout=3600, env=dict(os.environ, EDGEPACK_MOBILE_FEATURES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    fx = json.loads((fixtures / "fixtures.json").read_text())
    fx.update(module_dir=str(out / "python"), cpu="interp")
    (tmp_path / "fixtures.json").write_text(json.dumps(fx))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "mobile", "tests", "bindings_test.py"), str(tmp_path / "fixtures.json")],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-2000:])
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0 and passed == expected_checks(fixtures), r.stdout[-6000:] + r.stderr[-3000:]
    assert "kernel-interpreter build" in r.stdout, r.stdout[-3000:]


def test_python_bindings_on_aarch64(fixtures, tmp_path):
    """Issue 27: the phone library for aarch64 (the small build, as phones ship it) passes the same Python checks,
    loaded by the same generated module in an aarch64 CPython under qemu -cpu max (the cloud checks against the
    server on this host's loopback). `scripts/aarch64.sh test` (part of the test command) builds the library and
    the Python."""
    root = os.environ.get("ARMPROBE_ROOT") or os.path.expanduser("~/.cache/armprobe")
    ch = os.path.join(root, os.environ.get("ARMPROBE_SUITE", "trixie") + "-root")
    lib = os.path.join(ch, "var/cache/armprobe-target/aarch64-unknown-linux-gnu/release/libedgepack_mobile.so")
    qemu, pyroot = os.path.join(ch, "usr/bin/qemu-aarch64"), os.path.join(root, "arm64py")
    python = os.path.join(pyroot, "usr/bin/python3.13")
    for path in (lib, qemu, python):
        if not os.path.exists(path):
            required(path, "scripts/aarch64.sh test builds it")
    out = tmp_path / "bindings"
    r = subprocess.run([os.path.join(ROOT, "scripts", "bindings.sh"), str(out)], capture_output=True, text=True,
                       timeout=3600, env=dict(os.environ, EDGEPACK_MOBILE_FEATURES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    module = tmp_path / "aarch64"
    module.mkdir()
    shutil.copy(out / "python" / "edgepack_mobile.py", module)
    shutil.copy(lib, module)
    fx = json.loads((fixtures / "fixtures.json").read_text())
    fx.update(module_dir=str(module), cpu="interp", emulated=True)
    (tmp_path / "fixtures.json").write_text(json.dumps(fx))
    test = os.path.join(ROOT, "mobile", "tests", "bindings_test.py")
    r = subprocess.run([qemu, "-cpu", "max", "-L", pyroot, python, "-c",
                        "import platform, runpy, sys; print('machine', platform.machine(), flush=True); "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                        test, str(tmp_path / "fixtures.json")],
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-2000:])
    assert "machine aarch64" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    passed, failed = summary(r.stdout)
    # Four checks are wall-clock bounds tuned for native speed: skipped under the emulator (they run on x86).
    assert r.returncode == 0 and failed == 0 and passed == expected_checks(fixtures) - 4, r.stdout[-6000:] + r.stderr[-3000:]
    assert len(re.findall(r"^SKIP ", r.stdout, re.M)) == 4, r.stdout[-3000:]
    assert "kernel-interpreter build" in r.stdout, r.stdout[-3000:]


def test_kotlin_bindings(fixtures, bindings, tmp_path):
    kotlinc = os.path.join(KOTLIN_HOME, "bin", "kotlinc")
    if not os.path.exists(kotlinc):
        required("kotlinc", "npm install --prefix .tools kotlin-compiler@2.4.20")
    if not os.path.exists(JNA):
        required("JNA", "apt-get install libjna-java")
    if not shutil.which("java"):
        required("java", "apt-get install default-jdk-headless")
    coroutines = os.path.join(KOTLIN_HOME, "lib", "kotlinx-coroutines-core-jvm.jar")
    stdlib = os.path.join(KOTLIN_HOME, "lib", "kotlin-stdlib.jar")
    sources = [str(p) for p in (bindings / "kotlin").rglob("*.kt")] + [os.path.join(ROOT, "mobile", "tests", "BindingsTest.kt")]
    jar = tmp_path / "bindings-test.jar"
    cp = os.pathsep.join([JNA, coroutines])
    r = subprocess.run([kotlinc, *sources, "-cp", cp, "-nowarn", "-d", str(jar)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    libdir = bindings / "python"  # the built library (copied there by scripts/bindings.sh)
    r = subprocess.run(["java", f"-Djna.library.path={libdir}", "-cp", os.pathsep.join([str(jar), cp, stdlib]),
                        "BindingsTestKt", str(fixtures / "fixtures.properties")], capture_output=True, text=True, timeout=900)
    print(r.stdout[-4000:], r.stderr[-2000:])
    passed, failed = summary(r.stdout)
    assert r.returncode == 0 and failed == 0 and passed == expected_checks(fixtures), r.stdout[-6000:] + r.stderr[-3000:]


def test_swift_header_matches_the_library(bindings, tmp_path):
    """Beside the Swift run (test_swift_bindings): the generated C header parses as plain C (gcc, clang's
    nullability spelled out), declares exactly the `uniffi_*`/`ffi_*` functions the library exports, and the
    Linux module map differs from Apple's only by its `use "Darwin"`."""
    headers = list((bindings / "swift").glob("*.h"))
    assert len(headers) == 1, headers
    swift = list((bindings / "swift").glob("*.swift"))
    assert len(swift) == 1 and re.search(r"\bclass Engine\b", swift[0].read_text())
    apple = (bindings / "swift" / "EdgepackMobileFFI.modulemap").read_text()
    linux = (bindings / "swift" / "linux" / "module.modulemap").read_text()
    assert 'use "Darwin"' in apple and 'use "Darwin"' not in linux and "module EdgepackMobileFFI" in linux
    assert [x for x in apple.splitlines() if "Darwin" not in x] == linux.splitlines(), (apple, linux)
    unit = tmp_path / "include_header.c"
    unit.write_text(f'#include "{headers[0]}"\nint main(void) {{ return 0; }}\n')
    r = subprocess.run(["gcc", "-fsyntax-only", "-std=c11", "-Wall", "-Werror", "-D_Nonnull=", "-D_Nullable=", str(unit)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = headers[0].read_text()
    declared = set(re.findall(r"\b((?:uniffi|ffi)_edgepack_mobile_\w+)\s*\(", text))
    lib = bindings / "python" / "libedgepack_mobile.so"
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if re.search(r" T (uniffi|ffi)_edgepack_mobile_", line)}
    assert declared, "no functions in the header"
    assert declared == exported, f"header only: {sorted(declared - exported)[:10]}; library only: {sorted(exported - declared)[:10]}"


def test_swift_bindings(fixtures, bindings):
    """Issue 33: the generated Swift, compiled by Swift for Linux (Debian's swiftlang, in the Debian root that
    scripts/aarch64.sh makes) with the Linux module map scripts/bindings.sh writes, runs BindingsTest.swift against
    the library and the live server."""
    if os.geteuid() != 0:
        required("root", "scripts/swift.sh runs the Swift toolchain in a chroot")
    root = os.environ.get("ARMPROBE_ROOT") or os.path.expanduser("~/.cache/armprobe")
    if not os.path.exists(os.path.join(root, os.environ.get("ARMPROBE_SUITE", "trixie") + "-root", ".armprobe-ok")):
        required("the Debian root of scripts/aarch64.sh", "scripts/aarch64.sh test makes it")
    r = subprocess.run([os.path.join(ROOT, "scripts", "swift.sh"), "test", str(bindings), str(fixtures / "fixtures.json")],
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout[-4000:], r.stderr[-3000:])
    assert "FATAL" not in r.stderr, r.stderr[-3000:]
    passed, failed = summary(r.stdout.split("==> the README example")[0])
    assert r.returncode == 0 and failed == 0 and passed == expected_checks(fixtures), r.stdout[-6000:] + r.stderr[-3000:]
    # mobile/README.md's Swift example, run on the signed EfficientNet bundle, the chelsea photo and the server.
    example = r.stdout.split("==> the README example", 1)[1]
    assert re.search(r"^282 tiger cat 0\.3\d+$", example, re.M), example
    assert "answered on the device by " in example and "not an image: " in example, example
    assert re.search(r"^best: tiger cat from the cloud: .*below 0\.99", example, re.M), example


CHECK_SOURCES = {
    "Python": ("bindings_test.py", r'@check\("([^"]+)"'),
    "Kotlin": ("BindingsTest.kt", r'\bcheck\("([^"]+)"\)'),
    "Swift": ("BindingsTest.swift", r'\bc\.check\("([^"]+)"\)'),
}


def test_the_three_languages_run_the_same_checks():
    """One list of checks for Python, Kotlin and Swift, in the same order, and mobile/README.md's table is that
    list."""
    lists = {}
    for lang, (name, pattern) in CHECK_SOURCES.items():
        lists[lang] = re.findall(pattern, open(os.path.join(ROOT, "mobile", "tests", name)).read())
        assert len(lists[lang]) >= 18, (lang, lists[lang])
    assert lists["Kotlin"] == lists["Python"], set(lists["Kotlin"]) ^ set(lists["Python"])
    assert lists["Swift"] == lists["Python"], set(lists["Swift"]) ^ set(lists["Python"])
    readme = open(os.path.join(ROOT, "mobile", "README.md")).read()
    table = re.findall(r"^\| \d+ \| ([^|]+?) \| ✓ \| ✓ \| ✓ \|$", readme, re.M)
    assert table == lists["Python"], set(table) ^ set(lists["Python"])
