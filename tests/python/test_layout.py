"""The runtime's crate ladder (ARCHITECTURE.md), read from `cargo metadata`: what each crate may depend on.

Cargo already refuses cycles; these checks keep the edges that are allowed but wrong out: the kernels importing
ONNX or tract, a backend calling the session, the backend trait naming a backend.
"""
import json
import os
import subprocess

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

RUNTIME_CRATES = {
    "edgepack-core", "edgepack-onnx", "edgepack-kernels", "edgepack-lower", "edgepack-backend", "edgepack-tract",
    "edgepack-interp", "edgepack-gpu", "edgepack-process", "edgepack-bundle", "edgepack-runtime",
}
BACKENDS = {"edgepack-tract", "edgepack-interp", "edgepack-gpu"}


def metadata():
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return {p["name"]: p for p in json.loads(out)["packages"]}


def deps(pkg, kinds=(None,)):
    """Names of a package's dependencies of the given kinds (None: normal, "build", "dev")."""
    return {d["name"] for d in pkg["dependencies"] if d["kind"] in kinds}


def test_the_runtime_is_a_ladder_of_crates():
    pkgs = metadata()
    missing = RUNTIME_CRATES - set(pkgs)
    assert not missing, f"runtime crates missing from the workspace: {missing}"
    for name in RUNTIME_CRATES:
        assert os.path.relpath(pkgs[name]["manifest_path"], ROOT).startswith("runtime/"), name


def test_kernels_import_nothing_of_onnx_prost_or_tract():
    kernels = deps(metadata()["edgepack-kernels"], kinds=(None, "build"))
    forbidden = {d for d in kernels if d.startswith("tract") or d in {"prost", "edgepack-onnx", "edgepack-lower"}}
    assert not forbidden, f"edgepack-kernels depends on {forbidden}"


def test_no_backend_depends_on_the_session_or_on_another_backend():
    pkgs = metadata()
    for b in BACKENDS:
        d = deps(pkgs[b], kinds=(None, "build"))
        assert "edgepack-runtime" not in d, f"{b} depends on the facade (the session)"
        assert not (d & (BACKENDS - {b})), f"{b} depends on another backend: {d & BACKENDS}"
        assert "edgepack-backend" in d, f"{b} does not implement the backend trait crate"


def test_lower_crates_never_name_higher_ones():
    pkgs = metadata()
    order = ["edgepack-core", "edgepack-onnx", "edgepack-kernels", "edgepack-lower", "edgepack-backend"]
    for i, name in enumerate(order):
        above = set(order[i + 1:]) | BACKENDS | {"edgepack-runtime", "edgepack-bundle", "edgepack-process"}
        bad = deps(pkgs[name], kinds=(None, "build")) & above
        assert not bad, f"{name} depends on crates above it: {bad}"
    assert not (deps(pkgs["edgepack-core"]) & RUNTIME_CRATES), "edgepack-core depends on an edgepack crate"
