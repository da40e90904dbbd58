"""The Python API: Classifier and Prediction on tiny real models and real X-rays."""
from __future__ import annotations

import dataclasses
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import expected_probability
from PIL import Image

from cxr_infer import Classifier, DeviceError, InputError, ModelError, ModelSpec, Prediction, load_image
from cxr_infer import classifier as classifier_module


def test_predict_path_matches_reference_math(classifier, xrays224):
    p = classifier.predict(xrays224[0])
    assert isinstance(p, Prediction)
    assert p.source == str(xrays224[0])
    expect = expected_probability(load_image(xrays224[0]))
    assert p.probability == pytest.approx(expect, abs=1e-5)
    assert p.threshold == 0.5
    assert set(p.probabilities) == {"NORMAL", "PNEUMONIA"}
    assert p.probabilities["PNEUMONIA"] == p.probability
    assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert p.label == ("PNEUMONIA" if expect >= 0.5 else "NORMAL")
    assert p.positive == (p.label == "PNEUMONIA")


def test_prediction_is_frozen_and_serialisable(classifier, xrays224):
    p = classifier.predict(xrays224[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.label = "NORMAL"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.probabilities["NORMAL"] = 1.0  # type: ignore[index]
    d = p.to_dict()
    assert d["path"] == str(xrays224[0]) and d["label"] == p.label and d["probabilities"]["NORMAL"] > 0


def test_dark_is_normal_bright_is_pneumonia(classifier):
    dark = classifier.predict(np.full((300, 260), 20, np.uint8))
    bright = classifier.predict(np.full((300, 260), 230, np.uint8))
    assert dark.label == "NORMAL" and dark.probability < 0.05
    assert bright.label == "PNEUMONIA" and bright.probability > 0.95


def test_every_input_kind_scores_the_same(classifier, xray):
    by_path = classifier.predict(xray)
    img = Image.open(xray)
    for item in (str(xray), xray.read_bytes(), img, np.asarray(img.convert("L"))):
        p = classifier.predict(item)
        assert p.probability == pytest.approx(by_path.probability, abs=2e-3), type(item)
        assert p.source == (str(xray) if isinstance(item, str) else None)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_list_gives_list_in_order_whatever_the_batch(classifier, xrays224, batch_size):
    singles = [classifier.predict(f).probability for f in xrays224]
    batch = classifier.predict(list(xrays224), batch_size=batch_size)
    assert [p.source for p in batch] == [str(f) for f in xrays224]
    assert [p.probability for p in batch] == pytest.approx(singles, abs=1e-6)
    assert classifier.predict(tuple(xrays224[:2]))[1].source == str(xrays224[1])
    assert classifier.predict([]) == []


def test_threshold_override_flips_labels(tiny_model, xrays224):
    low = Classifier(tiny_model, threads=1, threshold=0.0)
    high = Classifier(tiny_model, threads=1, threshold=1.0)
    assert all(p.label == "PNEUMONIA" and p.threshold == 0.0 for p in low.predict(xrays224))
    assert all(p.label == "NORMAL" for p in high.predict(xrays224))


def test_spec_threshold_is_the_default(write_model, xrays224):
    clf = Classifier(write_model("t07.onnx", threshold=0.7), threads=1)
    assert clf.threshold == 0.7 and clf.spec.threshold == 0.7
    assert isinstance(clf.spec, ModelSpec)
    p = clf.predict(xrays224[0])
    assert p.threshold == 0.7 and p.label == ("PNEUMONIA" if p.probability >= 0.7 else "NORMAL")


def test_errors_raise_or_return(classifier, xrays224, tmp_path):
    missing = tmp_path / "missing.jpeg"
    with pytest.raises(InputError, match="no such file"):
        classifier.predict(missing)
    assert isinstance(classifier.predict(missing, errors="return"), InputError)
    mixed = classifier.predict([xrays224[0], missing, xrays224[1]], errors="return")
    assert [type(r).__name__ for r in mixed] == ["Prediction", "InputError", "Prediction"]
    with pytest.raises(ValueError):
        classifier.predict(xrays224[0], errors="ignore")


def test_thread_safe_on_one_shared_session(tiny_model, xrays224):
    """Eight threads hammer one Classifier; every answer equals the sequential one."""
    clf = Classifier(tiny_model, threads=2)
    expected = {str(f): clf.predict(f).probability for f in xrays224}
    start = threading.Barrier(8)

    def work(seed: int):
        start.wait()
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(6):
            picks = [xrays224[i] for i in rng.integers(0, len(xrays224), size=int(rng.integers(1, 5)))]
            out.extend((p.source, p.probability) for p in clf.predict(picks, batch_size=2))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for chunk in pool.map(work, range(8)) for r in chunk]
    assert len(results) > 8 * 6
    for source, prob in results:
        assert prob == pytest.approx(expected[source], abs=1e-6)


def test_threads_default_to_the_cores_we_may_use(tiny_model):
    import os
    clf = Classifier(tiny_model)
    assert clf.threads == len(os.sched_getaffinity(0))
    assert clf.model.session.get_session_options().intra_op_num_threads == clf.threads
    one = Classifier(tiny_model, threads=1)
    assert one.model.session.get_session_options().intra_op_num_threads == 1
    spin = "session.intra_op.allow_spinning"
    assert clf.model.session.get_session_options().get_session_config_entry(spin) == "0"
    spinning = Classifier(tiny_model, threads=1, session_config={spin: "1"})
    assert spinning.model.session.get_session_options().get_session_config_entry(spin) == "1"


def _openvino_installed(monkeypatch, installed: bool) -> None:
    """Make the registry's OpenVINO entry say it is (or is not) installed here."""
    from dataclasses import replace

    from cxr_infer.devices import DEVICES
    monkeypatch.setitem(DEVICES, "openvino", replace(DEVICES["openvino"],
                                                     check=lambda available: None if installed else "not installed"))


def test_device_selection(monkeypatch):
    from cxr_infer.devices import DEVICES, SessionRequest, resolve_device
    request, cpu = SessionRequest(b"", "m.onnx", 1), ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert DEVICES["cpu"].providers(request, both) == ["CPUExecutionProvider"]
    _openvino_installed(monkeypatch, False)
    assert resolve_device("auto", cpu) == "cpu"
    _openvino_installed(monkeypatch, True)  # pip install 'cxr[openvino]'
    assert resolve_device("auto", cpu) == "openvino"
    assert resolve_device("auto", cpu, images=1) == "cpu"
    assert resolve_device("auto", both) == "cuda"
    with_trt = DEVICES["cuda"].providers(request, ["TensorrtExecutionProvider", *both])
    assert with_trt[0][0] == "TensorrtExecutionProvider" and with_trt[1:] == both
    monkeypatch.setenv("CXR_TENSORRT", "0")
    assert DEVICES["cuda"].providers(request, ["TensorrtExecutionProvider", *both])[0] == "CUDAExecutionProvider"
    assert re.search(r"no CUDAExecutionProvider.*cxr\[gpu\]",
                     DEVICES["cuda"].missing(["AzureExecutionProvider", "CPUExecutionProvider"]))
    assert DEVICES["tensorrt"].missing(both).startswith("device 'tensorrt' requested")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu", cpu)


def test_cuda_unavailable_is_a_device_error(tiny_model, monkeypatch):
    import onnxruntime as ort
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="device 'cuda' requested"):
        Classifier(tiny_model, device="cuda")
    _openvino_installed(monkeypatch, False)
    assert Classifier(tiny_model, device="auto", threads=1).device == "cpu"
    assert Classifier(tiny_model, device="auto", threads=1, images=1).device == "cpu"


def test_fp16_model(write_model, xrays224, classifier):
    clf = Classifier(write_model("fp16.onnx", dtype="float16"), threads=1)
    assert clf.spec.precision == "fp16" and clf.spec.input_dtype == "float16"
    for a, b in zip(clf.predict(xrays224), classifier.predict(xrays224)):
        assert a.probability == pytest.approx(b.probability, abs=5e-3)


def test_normalisation_in_graph(write_model, xrays224, classifier):
    clf = Classifier(write_model("ingraph.onnx", in_graph=True), threads=1)
    assert clf.spec.normalization_in_graph
    for a, b in zip(clf.predict(xrays224), classifier.predict(xrays224)):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_static_batch_models(write_model, xrays224, classifier, batch):
    clf = Classifier(write_model(f"static{batch}.onnx", batch=batch), threads=1)
    got = clf.predict(xrays224[:7], batch_size=3)
    assert len(got) == 7
    for a, b in zip(got, classifier.predict(xrays224[:7])):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)


def test_features_output_and_three_labels(write_model):
    clf = Classifier(write_model("three.onnx", labels=["NORMAL", "PNEUMONIA", "OTHER"], positive="PNEUMONIA",
                                 features=True), threads=1)
    assert clf.spec.features_output == "features"
    dark = clf.predict(np.full((64, 64), 10, np.uint8))
    assert len(dark.probabilities) == 3
    assert dark.label == "NORMAL"  # not positive: the most probable of the other labels
    assert clf.predict(np.full((64, 64), 250, np.uint8)).label == "PNEUMONIA"


def test_model_from_bytes_and_info(tiny_model):
    clf = Classifier(tiny_model.read_bytes(), threads=1, warmup=False)
    info = clf.info()
    assert info["spec"]["backbone"] == "tiny" and info["inputs"][0]["name"] == "input"
    assert info["providers"] == ["CPUExecutionProvider"]
    assert "tiny" in repr(clf)


def test_default_model_slot(monkeypatch, tiny_model, tmp_path):
    monkeypatch.setattr(classifier_module, "DEFAULT_MODEL", tmp_path / "default.onnx")
    with pytest.raises(ModelError, match="no default model is installed yet.*--model"):
        Classifier()
    monkeypatch.setattr(classifier_module, "DEFAULT_MODEL", tiny_model)
    assert Classifier(threads=1).spec.backbone == "tiny"


def test_default_model_path_is_package_data():
    assert classifier_module.DEFAULT_MODEL.parent.name == "models"
    assert classifier_module.DEFAULT_MODEL.parent.parent.name == "cxr_infer"


def test_prefetch_keeps_order_and_every_result(tiny_model, xrays224, tmp_path, monkeypatch):
    """Decoding the next batch in a worker thread changes nothing a caller sees: the same
    results in the same order, each bad input's error in its place, none lost or doubled."""
    from cxr_infer.errors import InputError

    text = tmp_path / "notes.jpeg"
    text.write_text("not an image\n")
    items = [xrays224[0], tmp_path / "missing.jpeg", xrays224[1], text, *xrays224[2:7], xrays224[0]]
    on = Classifier(tiny_model, threads=1, batch_size=2)
    off = Classifier(tiny_model, threads=1, batch_size=2, prefetch=False)
    assert on.prefetch and not off.prefetch
    timing = {}
    got = list(on.iter_predict(items, timing=timing))
    want = off.predict_many(items)
    assert len(got) == len(want) == len(items)
    for a, b in zip(got, want):
        assert type(a) is type(b)
        if isinstance(a, InputError):
            assert str(a) == str(b)
        else:
            assert (a.source, a.label) == (b.source, b.label)
            assert a.probability == pytest.approx(b.probability, abs=1e-6)
    assert [type(r).__name__ for r in got[:4]] == ["Prediction", "InputError", "Prediction", "InputError"]
    assert got[0].probability == pytest.approx(got[-1].probability, abs=1e-6)  # same image first and last
    assert timing["preprocess"] > 0 and timing["inference"] > 0
    early = on.iter_predict(items)  # a caller that stops early leaves no decode thread behind
    assert next(early).source == got[0].source
    early.close()
    monkeypatch.setenv("CXR_PREFETCH", "0")
    assert not Classifier(tiny_model, threads=1).prefetch
