"""One way to run a model file: every caller feeds the graph the same input (cxr_infer.model).

The Classifier, the export checks (INT8 gate, calibration reader, domain statistics, FP16
parity) and the benchmarks (accuracy, latency worker) all go through ``ModelFile``; these tests
record what each of them actually hands onnxruntime, for an FP32, an FP16 and a
normalise-in-graph model, and hold it to an independent float64 reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
for sub in ("runtime", "export", "benchmarks"):
    sys.path.insert(0, str(REPO / sub))

from cxr_infer.errors import ModelError  # noqa: E402
from cxr_infer.model import ModelFile, graph_input  # noqa: E402

pytest.importorskip("onnx")

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
KINDS = {"fp32": {}, "fp16": {"dtype": "float16"}, "in_graph": {"in_graph": True}}


def reference_input(pixels: np.ndarray, kind: str) -> np.ndarray:
    """What the graph must receive, computed in float64 without the runtime's code."""
    x = pixels.astype(np.float64).transpose(0, 3, 1, 2)
    if kind != "in_graph":
        x = (x / 255.0 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    return x


@pytest.fixture()
def feeds(monkeypatch):
    """Every input array handed to any onnxruntime session while the test runs."""
    import onnxruntime as ort

    seen = []
    original = ort.InferenceSession.run

    def recording_run(self, output_names, input_feed, *args, **kwargs):
        seen.extend(np.array(v) for v in input_feed.values())
        return original(self, output_names, input_feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    return seen


def pixels(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), np.uint8)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_caller_feeds_the_same_input(kind, write_model, feeds):
    from cxr_bench.models import open_model as bench_open
    from cxr_export import domain
    from cxr_export.fp16 import fp16_parity
    from cxr_export.modelio import read_spec
    from cxr_export.quantize import _reader, gate
    from cxr_infer import Classifier

    path = write_model(f"layer_{kind}.onnx", features=True, **KINDS[kind])
    spec = read_spec(path)
    px = pixels()
    expected = reference_input(px, kind)
    dtype = np.float16 if kind == "fp16" else np.float32
    tolerance = 1e-3 if kind == "fp16" else 1e-5  # float16 keeps 11 bits: |x| < 3 rounds by < 2e-3

    callers = {
        "Classifier": lambda: Classifier(path, threads=1, warmup=False).predict(list(px)),
        "bench accuracy": lambda: bench_open(path, threads=1).predict_pixels(px),
        "export gate": lambda: gate(path, path, spec, px, np.array([0, 1, 0, 1, 0])),
        "export domain statistics": lambda: domain.run_outputs(path, spec, px, ["features"], threads=1),
        "export fp16 parity": lambda: fp16_parity(path, path, spec, px),
    }
    got = {}
    for name, call in callers.items():
        feeds.clear()
        call()
        assert feeds, f"{name} ran no session"
        got[name] = np.concatenate(feeds)
    reader = _reader(px, spec, batch_size=len(px))
    got["export INT8 calibration"] = next(iter(reader.get_next().values()))
    for name, x in got.items():
        assert x.dtype == dtype, name
        assert x.shape == expected.shape or x.shape[0] % len(px) == 0, name
        x = x[-len(px):] if x.shape[0] > len(px) else x  # the gate runs two models on the same pixels
        np.testing.assert_allclose(x.astype(np.float64), expected, rtol=0, atol=tolerance, err_msg=name)
        np.testing.assert_array_equal(x[-len(px):], graph_input(spec, px), err_msg=name)


def test_latency_worker_times_the_graph_input_of_real_pixels(write_model, feeds):
    from cxr_bench.worker import _onnx_runner

    path = write_model("layer_worker.onnx", in_graph=True)
    run, info = _onnx_runner({"path": str(path), "batch": 3, "threads": 1, "seed": 7})
    feeds.clear()
    run()
    (x,) = feeds
    px = np.random.default_rng(7).integers(0, 256, (3, 224, 224, 3), np.uint8)
    np.testing.assert_array_equal(x, reference_input(px, "in_graph").astype(np.float32))
    assert info["outputs"] == ["probabilities"] and info["load_s"] >= 0


def test_static_batch_runs_in_padded_chunks(write_model):
    path = write_model("layer_static.onnx", batch=4)
    model = ModelFile(path, threads=1)
    assert model.static_batch == 4
    px = pixels(6, seed=3)
    (probs,) = model.run(px, [model.spec.prob_output])
    assert probs.shape == (6, 2)
    for i in range(6):  # each image gets what it gets alone (the padding never leaks in)
        np.testing.assert_allclose(probs[i], model.run(px[i:i + 1], [model.spec.prob_output])[0][0], atol=1e-6)


def test_named_outputs_only_and_clear_errors(write_model, tmp_path):
    path = write_model("layer_outputs.onnx", features=True)
    model = ModelFile(path, threads=1)
    probs, feats = model.run(pixels(2), ["probabilities", "features"], batch_size=1)
    assert probs.shape == (2, 2) and feats.shape == (2, 3)
    with pytest.raises(ModelError, match="no output 'heatmap'"):
        model.run(pixels(1), ["heatmap"])
    with pytest.raises(ModelError, match="no such model file"):
        ModelFile(tmp_path / "missing.onnx")
    # a spec handed in is held to the graph like the file's own
    from cxr_infer.spec import ModelSpec

    wrong = ModelSpec.new(backbone="tiny", image_size=128)
    with pytest.raises(ModelError, match="expected \\[N, 3, 128, 128\\]"):
        ModelFile(path, spec=wrong)
