"""Acceptance: `edgepack eval` through bundle + preprocessing reproduces the onnxruntime reference figures of
shared/models/MODELS.md, and UltraFace finds the reference faces."""
import csv
import json
import os

import pytest

from conftest import ep


def eval_json(bundle, data, *extra):
    return json.loads(ep("eval", bundle, data, "--json", "--threads", "2", *extra).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("key,top1,top5,ref_csv", [
    ("efficientnet", 87.3, 97.0, "efficientnet_lite0_fp32.predictions.csv"),
    ("squeezenet", 60.1, 81.8, "squeezenet1.0_fp32.predictions.csv"),
])
def test_imagenet_accuracy_matches_reference(bundles, shared, tmp_path, key, top1, top5, ref_csv):
    preds = tmp_path / "pred.csv"
    r = eval_json(bundles[key], os.path.join(shared, "data", "imagenet_sample"), "--predictions", preds)
    assert r["samples"] == 1000
    print(f"{key}: top-1 {100 * r['top1']:.1f} (ref {top1}), top-5 {100 * r['top5']:.1f} (ref {top5})")
    assert abs(100 * r["top1"] - top1) <= 0.2 + 1e-9
    assert abs(100 * r["top5"] - top5) <= 0.2 + 1e-9
    # Per-image top-1 agreement with onnxruntime's own predictions on the same images.
    ref = {row["file"]: row["top1"] for row in csv.DictReader(open(os.path.join(shared, "models", "reference_results", "threads1", ref_csv)))}
    ours = {row["file"]: row["top1"] for row in csv.DictReader(open(preds))}
    agree = sum(ours[f] == ref[f] for f in ref) / len(ref)
    print(f"{key}: per-image top-1 agreement with onnxruntime {100 * agree:.1f} %")
    assert agree >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("key", ["mnist7", "mnist8"])
def test_mnist_accuracy(bundles, shared, key):
    mn = os.path.join(shared, "data", "mnist")
    r = eval_json(bundles[key], os.path.join(mn, "t10k-images-idx3-ubyte.gz"), "--idx-labels", os.path.join(mn, "t10k-labels-idx1-ubyte.gz"), "--batch", "1")
    assert r["samples"] == 10000
    print(f"{key}: {100 * r['top1']:.2f} % (ref 98.91)")
    assert abs(100 * r["top1"] - 98.91) < 0.005


@pytest.mark.parametrize("photo,faces", [("ultraface_crowd.jpg", 44), ("skimage_astronaut.png", 1)])
def test_ultraface_finds_the_reference_faces(bundles, shared, photo, faces):
    r = json.loads(ep("run", bundles["ultraface"], os.path.join(shared, "data", "photos", photo), "--json").stdout)
    [res] = r["results"]
    assert res["input"].endswith(photo)
    assert len(res["detections"]) == faces
    if photo == "skimage_astronaut.png":
        d = res["detections"][0]
        # MODELS.md: score 1.00, box ≈ [180,62,268,174] px
        assert d["score"] > 0.99
        for got, want in zip([d["x1"], d["y1"], d["x2"], d["y2"]], [180, 62, 268, 174]):
            assert abs(got - want) < 4


def test_photos_classify_as_the_reference(bundles, shared):
    ph = os.path.join(shared, "data", "photos")
    r = json.loads(ep("run", bundles["efficientnet"], os.path.join(ph, "skimage_chelsea.png"), os.path.join(ph, "skimage_coffee.png"), "--json").stdout)
    assert [x["input"] for x in r["results"]] == [os.path.join(ph, "skimage_chelsea.png"), os.path.join(ph, "skimage_coffee.png")]
    chelsea = [c["label"].split(",")[0] for c in r["results"][0]["top_k"][:3]]
    assert chelsea == ["tiger cat", "Egyptian cat", "tabby"]
    coffee = r["results"][1]["top_k"][0]
    assert coffee["label"].startswith("espresso") and coffee["score"] > 0.9
