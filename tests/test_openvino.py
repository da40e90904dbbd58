"""``device="openvino"`` (the onnxruntime-ep-openvino plugin provider) and what ``auto`` takes.

The choice logic, the errors and the cache lock run everywhere. The agreement tests run where
the plugin is installed (``pip install 'cxr[openvino]'``) and offers a device on this CPU (its
1.8 release takes Intel CPUs only); elsewhere they skip, saying which of the two is missing.

Agreement with the CPU provider, every graph output of the three shipped INT8 files, on 64
real test images (32 NORMAL, 32 PNEUMONIA) at their stored 224 px:

- labels: identical, except an image whose CPU-provider probability lies within 0.02 of the
  threshold (none may flip otherwise); max |dp| of every probability <= 0.03 (issue 15
  measured 0.008 on ResNet50 and 0.000 on the others);
- in-domain decisions: identical, except a score within 5% of the domain threshold;
  domain_score and each domain term within 5% of the threshold (relative);
- features: cosine similarity >= 0.99 per image;
- heatmap (Grad-CAM, scaled 0..1 as Classifier does): Pearson correlation >= 0.95 per image
  with a non-flat map, and max |d| <= 0.15.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

from cxr_infer import model as model_mod
from cxr_infer.errors import DeviceError
from cxr_infer.model import (AUTO_OPENVINO_MIN_IMAGES, OPENVINO_PROVIDER, ModelFile, openvino_cache_dir,
                             openvino_options, providers_for, resolve_device)

TEST_224 = REPO.parent / "shared" / "data" / "chest_xray_224" / "test"
SHIPPED = [REPO / "runtime" / "cxr_infer" / "models" / "default.onnx", REPO / "models" / "resnet50_int8.onnx",
           REPO / "models" / "inception_v3_int8.onnx"]
CPU_ONLY = ["CPUExecutionProvider"]


def _openvino_skip_reason() -> str:
    try:
        model_mod.openvino_devices()
    except DeviceError as exc:
        return str(exc)
    return ""


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget what this process learnt about the plugin (so a test can fake its absence)."""
    monkeypatch.setattr(model_mod, "_OPENVINO_REGISTERED", {})


def test_missing_plugin_is_one_clear_device_error(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "onnxruntime_ep_openvino", None)  # import fails
    with pytest.raises(DeviceError, match=r"pip install 'cxr\[openvino\]'"):
        providers_for("openvino", CPU_ONLY)
    assert resolve_device("auto", CPU_ONLY) == "cpu"  # auto never fails for want of the plugin


def test_cli_openvino_without_plugin_exits_2_with_one_line(tiny_model):
    r = run_cli("--model", str(tiny_model), "--device", "openvino", str(REPO / "runtime" / "cxr_infer" / "samples"
                                                                          / "person1_virus_6.jpeg"),
                prelude="import sys; sys.modules['onnxruntime_ep_openvino'] = None")
    assert r.returncode == 2, r.stderr
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "openvino" in err[0] and "Traceback" not in r.stderr.decode()


def test_unsupported_cpu_is_one_clear_device_error(monkeypatch, fresh_registry):
    """Where the plugin loads but offers no device (a non-Intel CPU), the error says so."""
    import onnxruntime as ort

    pytest.importorskip("onnxruntime_ep_openvino")
    if not hasattr(ort, "register_execution_provider_library"):
        pytest.skip("this onnxruntime cannot load plugin providers")
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [])
    monkeypatch.setattr(ort, "register_execution_provider_library", lambda *a: None)
    with pytest.raises(DeviceError, match="offers no device on this CPU"):
        ModelFile(SHIPPED[1], device="openvino", threads=1)


def test_auto_takes_openvino_for_long_runs_only(monkeypatch):
    monkeypatch.setattr(model_mod, "openvino_available", lambda: True)
    assert resolve_device("auto", CPU_ONLY) == "openvino"                      # embedded Classifier
    assert resolve_device("auto", CPU_ONLY, images=AUTO_OPENVINO_MIN_IMAGES) == "openvino"  # a folder
    assert resolve_device("auto", CPU_ONLY, images=1) == "cpu"                  # cxr-infer on one image
    assert resolve_device("auto", CPU_ONLY + ["CUDAExecutionProvider"], images=1) == "cuda"
    assert resolve_device("cpu", CPU_ONLY) == "cpu"
    monkeypatch.setattr(model_mod, "openvino_available", lambda: False)
    assert resolve_device("auto", CPU_ONLY) == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu", CPU_ONLY)


def test_threads_and_cache_go_to_the_plugin_options(monkeypatch, tmp_path):
    opts = openvino_options(3, tmp_path)
    assert '"INFERENCE_NUM_THREADS": "3"' in opts["load_config"] and opts["cache_dir"] == str(tmp_path)
    monkeypatch.setenv("CXR_OPENVINO_CACHE", str(tmp_path / "ov"))
    assert openvino_cache_dir() == tmp_path / "ov"
    monkeypatch.setenv("CXR_OPENVINO_CACHE", "0")
    assert openvino_cache_dir() is None
    assert "cache_dir" not in openvino_options(1, openvino_cache_dir())
    monkeypatch.delenv("CXR_OPENVINO_CACHE")
    assert openvino_cache_dir() == Path.home() / ".cache" / "cxr" / "openvino"


def test_cache_lock_serialises_processes(tmp_path):
    """Two processes compiling into one cache folder take turns (the second finds a complete blob)."""
    import subprocess

    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from cxr_infer.model import _cache_lock\n"
            "with _cache_lock(%r):\n"
            "    t = time.time(); time.sleep(0.4); print(t, time.time())\n") % (str(REPO / "runtime"), str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    spans = sorted(tuple(map(float, p.communicate(timeout=30)[0].split())) for p in procs)
    assert spans[1][0] >= spans[0][1] - 0.01, spans  # no overlap
    assert (tmp_path / ".lock").exists()


# ---------------------------------------------------------------- agreement (plugin and an Intel CPU)


def _images(n_per_label: int = 32) -> np.ndarray:
    from PIL import Image

    files = [f for label in ("NORMAL", "PNEUMONIA") for f in sorted((TEST_224 / label).glob("*"))[:n_per_label]]
    return np.stack([np.asarray(Image.open(f).convert("RGB"), np.uint8) for f in files])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_openvino_agrees_with_the_cpu_provider_on_every_output(path):
    reason = _openvino_skip_reason()
    if reason:
        pytest.skip(reason)
    if not TEST_224.is_dir():
        pytest.skip(f"no test images at {TEST_224}")
    from cxr_infer.classifier import _unit_maps

    cpu = ModelFile(path, device="cpu", threads=2)
    ov = ModelFile(path, device="openvino", threads=2)
    assert ov.device == "openvino" and ov.providers[0] == OPENVINO_PROVIDER
    spec = cpu.spec
    outs = [o for o in (spec.prob_output, spec.features_output, spec.domain_output, spec.domain_terms_output,
                        spec.heatmap_output) if o]
    pixels = _images()
    a = dict(zip(outs, cpu.run(pixels, outs, batch_size=8)))
    b = dict(zip(outs, ov.run(pixels, outs, batch_size=8)))
    pos, thr = spec.positive_index, spec.threshold
    pa, pb = a[spec.prob_output].astype(np.float64), b[spec.prob_output].astype(np.float64)
    assert np.abs(pa - pb).max() <= 0.03
    flipped = (pa[:, pos] >= thr) != (pb[:, pos] >= thr)
    assert not np.any(flipped & (np.abs(pa[:, pos] - thr) > 0.02)), np.flatnonzero(flipped)
    if spec.features_output:
        fa, fb = a[spec.features_output].reshape(len(pixels), -1), b[spec.features_output].reshape(len(pixels), -1)
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-12)
        assert cos.min() >= 0.99
    if spec.domain_output and spec.domain_threshold is not None:
        dthr = spec.domain_threshold
        sa, sb = a[spec.domain_output].reshape(-1), b[spec.domain_output].reshape(-1)
        assert np.abs(sa - sb).max() <= 0.05 * abs(dthr)
        differ = (sa > dthr) != (sb > dthr)
        assert not np.any(differ & (np.abs(sa - dthr) > 0.05 * abs(dthr)))
        if spec.domain_terms_output:
            assert np.abs(a[spec.domain_terms_output] - b[spec.domain_terms_output]).max() <= 0.05 * abs(dthr)
    if spec.heatmap_output:
        ma, mb = _unit_maps(a[spec.heatmap_output]), _unit_maps(b[spec.heatmap_output])
        assert np.abs(ma - mb).max() <= 0.15
        for x, y in zip(ma.reshape(len(ma), -1), mb.reshape(len(mb), -1)):
            if x.std() > 1e-3 and y.std() > 1e-3:
                assert np.corrcoef(x, y)[0, 1] >= 0.95


def test_classifier_and_cli_run_on_openvino(tmp_path):
    reason = _openvino_skip_reason()
    if reason:
        pytest.skip(reason)
    from cxr_infer import Classifier

    sample = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"
    clf = Classifier(device="openvino", threads=2)
    ref = Classifier(device="cpu", threads=2)
    p, q = clf.predict(sample), ref.predict(sample)
    assert clf.device == "openvino" and p.label == q.label and abs(p.probability - q.probability) <= 0.03
    assert Classifier(device="auto", threads=1).device == "openvino"  # embedded: a long-lived session
    r = run_cli("--device", "openvino", "--threads", "2", str(sample), env={"CXR_OPENVINO_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert any(tmp_path.iterdir())  # the compiled model went into the cache folder
