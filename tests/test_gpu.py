"""The runtime on a real GPU: CUDA (and TensorRT where onnxruntime-gpu offers it) against the CPU.

These run only where the installed onnxruntime has the CUDA provider (onnxruntime-gpu on a GPU
machine: ``train/gpu_verify.sh`` runs them there); elsewhere they skip, saying why. What the
runtime does *without* a GPU (a clear error, exit 2) is tested in test_cli.py and
test_classifier.py on every machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHONPATH, REPO, build_model, expected_probability

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("this onnxruntime has no CUDAExecutionProvider (CPU build or no GPU)", allow_module_level=True)

from cxr_infer import Classifier  # noqa: E402
from cxr_infer.preprocess import load_image  # noqa: E402

DEFAULT = REPO / "runtime" / "cxr_infer" / "models" / "default.onnx"
SAMPLE = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"
GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@pytest.fixture(scope="module")
def test_pixels(xrays224):
    return np.stack([load_image(f) for f in xrays224[:32]])


@pytest.fixture(autouse=True)
def no_tensorrt(monkeypatch, tmp_path):
    """CUDA alone unless a test asks for TensorRT (its engine builds take minutes)."""
    monkeypatch.setenv("CXR_TENSORRT", "0")
    monkeypatch.setenv("CXR_TRT_CACHE", str(tmp_path / "trt"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_model_on_cuda_matches_the_reference(tmp_path, test_pixels, dtype):
    path = tmp_path / f"tiny_{dtype}.onnx"
    path.write_bytes(build_model(dtype=dtype))
    clf = Classifier(path, device="cuda")
    assert clf.providers[0] == "CUDAExecutionProvider"
    got = [r.probabilities["PNEUMONIA"] for r in clf.predict(list(test_pixels[:8]))]
    want = [expected_probability(p) for p in test_pixels[:8]]
    assert got == pytest.approx(want, abs=2e-3 if dtype == "float16" else 1e-5)


def test_default_model_on_cuda_agrees_with_the_cpu(test_pixels):
    """The shipped INT8 file: same labels and in-domain decisions, probabilities close."""
    cpu = Classifier(DEFAULT, device="cpu").predict(list(test_pixels))
    gpu_clf = Classifier(DEFAULT, device="cuda")
    assert gpu_clf.providers[0] in GPU
    gpu = gpu_clf.predict(list(test_pixels))
    dp = max(abs(a.probabilities["PNEUMONIA"] - b.probabilities["PNEUMONIA"]) for a, b in zip(cpu, gpu))
    assert dp < 0.02
    assert [r.label for r in cpu] == [r.label for r in gpu]
    assert [r.in_domain for r in cpu] == [r.in_domain for r in gpu]
    heat = gpu_clf.predict(str(SAMPLE), heatmap=True).heatmap
    assert heat is not None and np.isfinite(heat).all() and heat.max() == pytest.approx(1.0, abs=1e-3)


def test_cxr_infer_device_cuda_on_the_sample():
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CXR_TENSORRT="0")
    runs = {d: subprocess.run([sys.executable, "-m", "cxr_infer.cli", str(SAMPLE), "--device", d, "--format", "csv"],
                              capture_output=True, text=True, env=env, cwd=str(REPO), timeout=300)
            for d in ("cpu", "cuda")}
    assert runs["cuda"].returncode == 0, runs["cuda"].stderr
    label = [line.split(",")[1] for line in runs["cpu"].stdout.splitlines()[1:]]
    assert label == [line.split(",")[1] for line in runs["cuda"].stdout.splitlines()[1:]]


def test_tensorrt_builds_an_engine_into_the_stated_cache(tmp_path, monkeypatch, test_pixels):
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime-gpu has no TensorrtExecutionProvider")
    cache = tmp_path / "engines"
    monkeypatch.setenv("CXR_TENSORRT", "1")
    monkeypatch.setenv("CXR_TRT_CACHE", str(cache))
    path = tmp_path / "tiny.onnx"
    path.write_bytes(build_model())
    try:
        clf = Classifier(path, device="cuda")
    except Exception as exc:  # the TensorRT libraries themselves may be missing on the machine
        pytest.skip(f"TensorRT did not start: {str(exc).splitlines()[0]}")
    if clf.providers[0] != "TensorrtExecutionProvider":
        pytest.skip(f"onnxruntime fell back to {clf.providers[0]} (TensorRT libraries missing?)")
    r = clf.predict(test_pixels[0])
    assert r.probabilities["PNEUMONIA"] == pytest.approx(expected_probability(test_pixels[0]), abs=1e-3)
    assert any(Path(cache).iterdir())
