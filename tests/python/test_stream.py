"""Stateful models over a stream (issue 26, item 5): `pack --stream-json` records how Silero VAD runs chunk by chunk
(the input, 64 samples of context, state `stateN` → `state`, `sr` = 16000), and `edgepack run BUNDLE audio.wav`
runs it over the shared test recording with the state carried: MODELS.md's reference is 1875 chunks, 77.4 %
speech and 30 segments, the first at 0.03–2.02 s, 2.69–4.64 s and 4.99–6.85 s. tract cannot plan Silero's `If`
branches, so the CPU session runs it on the kernel interpreter."""
import json
import os

import pytest

from conftest import ep

SILERO_STREAM = {"input": "input", "chunk": 512, "context": 64, "state": [{"input": "state", "output": "stateN"}],
                 "constants": {"sr": 16000}, "output": "output", "sample_rate": 16000}


@pytest.fixture(scope="module")
def silero(shared, binary, tmp_path_factory):
    d = tmp_path_factory.mktemp("silero")
    out = {}
    for m in ("silero_vad", "silero_vad_16k_op15"):
        b = d / f"{m}.edgepack"
        ep("pack", os.path.join(shared, "models", f"{m}.onnx"), "-o", b, "--task", "custom",
           "--stream-json", json.dumps(SILERO_STREAM), "--meta", "license=MIT")
        out[m] = b
    return out


@pytest.mark.parametrize("model", ["silero_vad", "silero_vad_16k_op15"])
def test_silero_vad_streams_the_reference_segments(silero, shared, model):
    wav = os.path.join(shared, "data", "audio", "silero_test_16k.wav")
    doc = json.loads(ep("run", silero[model], wav, "--json").stdout)
    assert "interpreter" in doc["backend"]["engine"], doc["backend"]
    [r] = doc["results"]
    assert r["input"] == wav and r["sample_rate"] == 16000 and r["chunks"] == 1875
    assert round(r["fraction_above"], 3) == 0.774, r["fraction_above"]
    segs = r["segments"]
    assert len(segs) == 30
    for got, want in zip(segs[:3], [(0.03, 2.02), (2.69, 4.64), (4.99, 6.85)]):
        assert abs(got[0] - want[0]) < 0.01 and abs(got[1] - want[1]) < 0.01, segs[:3]
    text = ep("run", silero[model], wav).stdout
    assert "30 segments" in text and "77.4 %" in text, text


def test_a_stream_that_does_not_fit_the_model_is_refused(shared, binary, tmp_path):
    src = os.path.join(shared, "models", "silero_vad.onnx")
    for bad, needle in [({**SILERO_STREAM, "input": "audio"}, "`audio`"),
                        ({**SILERO_STREAM, "state": [{"input": "state", "output": "nope"}]}, "`nope`"),
                        ({**SILERO_STREAM, "constants": {}}, "`sr`")]:
        r = ep("pack", src, "-o", tmp_path / "x.edgepack", "--task", "custom", "--stream-json", json.dumps(bad),
               check=False)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "x.edgepack").exists()


def test_audio_at_another_rate_is_refused(silero, tmp_path):
    import wave
    p = tmp_path / "8k.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 8000)
    r = ep("run", silero["silero_vad"], p, check=False)
    assert r.returncode == 4 and "8000 Hz" in r.stderr and "16000" in r.stderr, r.stderr


def test_audio_for_a_model_without_a_stream_is_a_usage_error(shared, binary):
    r = ep("run", os.path.join(shared, "models", "silero_vad.onnx"),
           os.path.join(shared, "data", "audio", "silero_test_16k.wav"), check=False)
    assert r.returncode == 2 and "--stream-json" in r.stderr, r.stderr
