"""``python -m cxr_export.calibrate``: operating points and a temperature fitted on a file's validation images.

Torch-free tiny models (``conftest.build_model``) on a small synthetic training folder whose split the
model's spec records, so the tool rebuilds its validation images; plus a copy of a shipped file with
the real training folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import GAIN, PYTHONPATH, REPO, SMALL, build_model, run_cli

from cxr_export import calibrate
from cxr_export.domain import add_domain_stats
from cxr_export.images import file_validation_split, load_entries, rebuild_split
from cxr_export.modelio import read_spec
from cxr_infer import Classifier
from cxr_infer.spec import SPEC_KEY

pytest.importorskip("onnx")

SIZE = 32
SPLIT = {"seed": 0, "val_fraction": 0.2, "max_images": None}
BLOCK_KEYS = {"method", "temperature", "applied", "images", "part", "bins", "ece_before", "ece_after", "nll_before",
              "nll_after", "threshold_before", "threshold_after", "reliability"}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """A training folder of gray 'X-rays': PNEUMONIA a little brighter than NORMAL, overlapping."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cal_data") / "train"
    rng = np.random.default_rng(0)
    for label, level in (("NORMAL", 105), ("PNEUMONIA", 125)):
        (root / label).mkdir(parents=True)
        for i in range(150):
            img = np.clip(rng.normal(level, 12) + rng.normal(0, 4, (SIZE, SIZE, 1)), 0, 255).astype(np.uint8)
            Image.fromarray(img.repeat(3, axis=2)).save(root / label / f"person{i + 1000 * (label > 'O')}_x.png")
    return root


def tiny(path: Path, train_dir: Path, gain: float = 10.0, threshold: float = 0.3, features: bool = False) -> Path:
    """The tiny model with its logits scaled by ``gain`` (10: far too sure of itself) and a spec that
    records ``train_dir``'s split."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(build_model(size=SIZE, threshold=threshold, features=features))
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * gain, "W"))
    spec = json.loads({p.key: p.value for p in model.metadata_props}[SPEC_KEY])
    spec["provenance"] = {"split": SPLIT, "split_hash": rebuild_split(train_dir, **SPLIT)[1]}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {SPEC_KEY: json.dumps(spec)})
    onnx.save(model, str(path))
    return path


def validation(spec, train_dir):
    entries = file_validation_split(spec, train_dir)
    return load_entries(entries, train_dir, spec.image_size), np.array([e[1] for e in entries])


def margin_of(pixels, gain=10.0):
    """The tiny model's logit margin (float64), as ``conftest.expected_probability`` computes it."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    norm = (pixels.reshape(len(pixels), -1, 3).astype(np.float64).mean(axis=1) / 255.0 - mean) / std
    return gain * GAIN * norm.mean(axis=1)


def positive(path, pixels):
    return Classifier(path, threads=1).model.positive_probability(pixels)


def graph_nodes(path):
    import onnx

    return [(n.op_type, n.name, list(n.input), list(n.output)) for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def calibrated(train_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    src = tiny(folder / "sure.onnx", train_dir)
    result = calibrate.calibrate_file(src, train_dir, folder / "sure_cal.onnx", threads=1)
    return src, folder / "sure_cal.onnx", result


def test_temperature_lowers_ece_and_keeps_every_label(calibrated, train_dir):
    src, out, result = calibrated
    spec, before = read_spec(out), read_spec(src)
    block = spec.to_dict()["calibration"]
    assert set(block) == BLOCK_KEYS and block == result["calibration"]
    assert block["applied"] is True and block["temperature"] > 1.5  # an over-confident model is cooled
    assert block["ece_after"] < block["ece_before"] and block["nll_after"] < block["nll_before"]
    t = block["temperature"]
    # the threshold moved with the temperature, so every label is the same
    assert block["threshold_before"] == before.threshold == 0.3
    assert spec.threshold == block["threshold_after"] == pytest.approx(1 / (1 + np.exp(-np.log(0.3 / 0.7) / t)))
    assert spec.threshold > 0.35
    pixels, _ = validation(before, train_dir)
    p0, p1 = positive(src, pixels), positive(out, pixels)
    assert np.array_equal(p0 >= before.threshold, p1 >= spec.threshold)
    np.testing.assert_allclose(p0, 1 / (1 + np.exp(-margin_of(pixels))), atol=1e-5)
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-margin_of(pixels) / t)), atol=1e-5)
    assert not np.allclose(p0, p1, atol=1e-3)
    # the graph: one Div named cxr_calibration/ right before the Softmax
    nodes = graph_nodes(out)
    div = [n for n in nodes if n[1].startswith(calibrate.PREFIX)]
    assert [n[0] for n in div] == ["Div"] and div[0][2][0] == "logits"
    assert nodes[nodes.index(div[0]) + 1][0] == "Softmax" and nodes[nodes.index(div[0]) + 1][2] == div[0][3]
    # the runtime's typed view, and the reliability table of the probabilities the file gives
    view = spec.calibration
    assert (view.temperature, view.applied, view.images) == (pytest.approx(t), True, len(pixels))
    assert (view.ece_before, view.threshold_after) == (block["ece_before"], spec.threshold)
    rows = block["reliability"]["bins"]
    assert len(rows) == 10 and sum(r["count"] for r in rows) == len(pixels)
    assert set(rows[0]) == {"lo", "hi", "count", "mean_predicted", "observed"}
    assert read_spec(src).calibration is None


def test_ece_is_cxr_bench_accuracy_s(train_dir):
    from cxr_bench.stats import calibration_bins

    rng = np.random.default_rng(3)
    p = np.r_[rng.uniform(0, 1, 500), 0.0, 0.1, 0.5, 1.0]
    y = (rng.uniform(0, 1, len(p)) < p ** 2).astype(int)
    bench = calibration_bins(y, p, 10)
    assert calibrate.expected_calibration_error(y, p) == pytest.approx(bench["ece"], abs=1e-12)
    mine = calibrate.reliability(y, p)
    assert [r["count"] for r in mine] == [r["count"] for r in bench["bins"]]


def test_fitted_temperature_minimises_the_nll():
    rng = np.random.default_rng(1)
    margin = rng.normal(0, 4, 2000)
    y = (rng.uniform(0, 1, 2000) < 1 / (1 + np.exp(-margin / 2.5))).astype(int)  # true temperature 2.5
    t = calibrate.fit_temperature(y, margin)
    assert t == pytest.approx(2.5, rel=0.1)
    assert calibrate.nll(y, margin, t) <= min(calibrate.nll(y, margin, t * f) for f in (0.98, 1.02))


def test_rerun_refits_instead_of_stacking(calibrated, train_dir, tmp_path):
    _, out, result = calibrated
    again = tmp_path / "again.onnx"
    second = calibrate.calibrate_file(out, train_dir, again, threads=1)["calibration"]
    first = result["calibration"]
    assert [n[0] for n in graph_nodes(again) if n[1].startswith(calibrate.PREFIX)] == ["Div"]
    assert second["temperature"] == pytest.approx(first["temperature"], rel=1e-6)
    assert second["threshold_before"] == 0.3 and read_spec(again).threshold == pytest.approx(read_spec(out).threshold)
    assert second["ece_before"] == pytest.approx(first["ece_before"])  # measured before the temperature
    pixels, _ = validation(read_spec(out), train_dir)
    np.testing.assert_allclose(positive(again, pixels), positive(out, pixels), atol=1e-6)


def test_no_temperature(calibrated, train_dir, tmp_path, capsys):
    src, out, result = calibrated
    plain = tmp_path / "plain.onnx"
    assert calibrate.main([str(src), "--data", str(train_dir), "--out", str(plain), "--no-temperature",
                           "--threads", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{plain}: no temperature;") and len(line.splitlines()) == 1
    block = read_spec(plain).to_dict()["calibration"]
    assert block["temperature"] is None and block["applied"] is False and block["ece_after"] == block["ece_before"]
    assert read_spec(plain).threshold == 0.3 and graph_nodes(plain) == graph_nodes(src)
    # a temperature already in the file stays
    kept = tmp_path / "kept.onnx"
    calibrate.calibrate_file(out, train_dir, kept, temperature=False, threads=1)
    assert graph_nodes(kept) == graph_nodes(out) and read_spec(kept).threshold == read_spec(out).threshold
    assert read_spec(kept).calibration.temperature == pytest.approx(result["calibration"]["temperature"])


def test_a_temperature_that_does_not_lower_the_ece_stays_out(calibrated, train_dir, tmp_path, monkeypatch):
    src, _, _ = calibrated
    monkeypatch.setattr(calibrate, "fit_temperature", lambda y, margin: 50.0)  # flattens every probability
    out = tmp_path / "untouched.onnx"
    block = calibrate.calibrate_file(src, train_dir, out, threads=1)["calibration"]
    assert block["applied"] is False and block["temperature"] == 50.0 and block["ece_after"] >= block["ece_before"]
    assert graph_nodes(out) == graph_nodes(src) and read_spec(out).threshold == 0.3
    assert block["threshold_after"] == block["threshold_before"] == 0.3


def test_operating_points_and_words_for_a_file_without_them(train_dir, tmp_path):
    src = tiny(tmp_path / "dom.onnx", train_dir, gain=1.0, features=True)
    spec = read_spec(src)
    pixels, _ = validation(spec, train_dir)
    add_domain_stats(src, pixels, np.arange(len(pixels)) % 2, pixels, threads=1, features_branch=True)
    # as the shipped files are: no operating points, no words
    data = read_spec(src).to_dict()
    for key in ("operating_points",):
        data["domain"].pop(key)
    for b in data["domain"]["branches"]:
        b.pop("words")
    from cxr_export.modelio import write_spec
    from cxr_infer.spec import ModelSpec

    write_spec(src, ModelSpec(data))
    assert read_spec(src).domain_operating_points == []
    result = calibrate.calibrate_file(src, train_dir, tmp_path / "dom_cal.onnx", threads=1)
    assert result["operating_points"].startswith("10 written (none before); words for 5 branches")
    new = read_spec(tmp_path / "dom_cal.onnx")
    dom = new.to_dict()["domain"]
    assert [r for r, _ in new.domain_operating_points] == [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert dict(new.domain_operating_points)[0.05] == pytest.approx(dom["threshold"])  # the file's own rate
    assert dom["threshold"] == data["domain"]["threshold"]  # the file's own threshold stays
    assert [b["words"] for b in dom["branches"]] == [
        "the model's features", "image layout at 16x16", "image layout at 8x8",
        "the chest's overall shape in the frame (4x4)", "orientation (upright versus upside down)"]
    again = calibrate.calibrate_file(tmp_path / "dom_cal.onnx", train_dir, tmp_path / "dom_cal2.onnx", threads=1)
    assert again["operating_points"] == "10 kept (up to date)"


def test_bad_input_is_one_line_and_exit_2(calibrated, train_dir, tmp_path, capsys):
    src, _, _ = calibrated
    nospec = tmp_path / "nospec.onnx"
    nospec.write_bytes(build_model(spec=None))
    other = tmp_path / "other"
    shutil.copytree(train_dir, other)
    next((other / "NORMAL").glob("*.png")).unlink()  # another folder: another split
    work = tmp_path / "work.onnx"
    shutil.copy(src, work)
    cases = [([str(nospec), "--data", str(train_dir)], f"{nospec}: has no cxr.spec"),
             ([str(work), "--data", str(tmp_path / "missing")], "no such training folder"),
             ([str(work), "--data", str(other)], "not the file's"),
             ([str(tmp_path / "none.onnx"), "--data", str(train_dir)], "no such model file"),
             ([str(work), str(work), "--data", str(train_dir), "--out", str(tmp_path / "x.onnx")], "--out takes one")]
    for argv, why in cases:
        assert calibrate.main(argv + ["--threads", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and "Traceback" not in err, err
        assert err.startswith("python -m cxr_export.calibrate: error: ")
    assert read_spec(work).calibration is None  # nothing was written
    # in a batch, the other files are still calibrated
    assert calibrate.main([str(nospec), str(work), "--data", str(train_dir), "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert "nospec.onnx" in captured.err and captured.out.startswith(f"{work}: T ")
    assert read_spec(work).calibration.applied is True


def test_help_has_examples():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cxr_export.calibrate", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=PYTHONPATH), cwd=str(REPO), timeout=60)
    assert out.returncode == 0 and "--no-temperature" in out.stdout and "examples:" in out.stdout


def test_shipped_default_recalibrates_to_itself(tmp_path):
    """The shipped default (MobileNetV3-Large INT8) through the tool again, with the real training folder (about
    30 s on 2 cores): it refits the temperature from the logits before the one in the file, so it finds
    the same temperature and operating points, keeps one Div after the logits' DequantizeLinear, and
    --domain-flag-rate 10% works."""
    shipped = REPO / "runtime" / "cxr_infer" / "models" / "default.onnx"
    if not SMALL.is_dir() or not shipped.is_file():
        pytest.skip("the shared training images or the shipped file are missing")
    original, before = shipped.read_bytes(), read_spec(shipped)
    assert before.calibration is not None and before.calibration.applied and before.domain_operating_points
    out = tmp_path / "default.onnx"
    result = calibrate.calibrate_file(shipped, SMALL, out, threads=2)
    assert shipped.read_bytes() == original  # the shipped file is read, never written
    block = result["calibration"]
    assert block["images"] == 523 and block["applied"] is True
    # INT8 kernels differ between CPUs in the last bits of the logits, so the refit agrees closely, not exactly
    assert block["temperature"] == pytest.approx(before.calibration.temperature, rel=1e-2)
    assert block["threshold_before"] == pytest.approx(0.5) and block["ece_after"] < block["ece_before"]
    spec = read_spec(out)
    assert [r for r, _ in spec.domain_operating_points] == [r for r, _ in before.domain_operating_points]
    assert [t for _, t in spec.domain_operating_points] == pytest.approx(
        [t for _, t in before.domain_operating_points], rel=1e-3)
    assert spec.domain_threshold == before.domain_threshold and all(b.words for b in spec.domain.branches)
    nodes = graph_nodes(out)
    (div,) = [n for n in nodes if n[1].startswith(calibrate.PREFIX)]
    writer = next(n for n in nodes if div[2][0] in n[3])
    assert writer[0] == "DequantizeLinear"
    clf = Classifier(out, threads=2, domain_flag_rate=0.10)
    assert clf.domain_threshold == pytest.approx(dict(spec.domain_operating_points)[0.10])
    sample = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"
    assert clf.predict(str(sample)).label in spec.labels
    r = run_cli("--model", str(out), "--domain-flag-rate", "10%", "--info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["domain_check"]["threshold"] == pytest.approx(clf.domain_threshold)


def test_fp16_file_divides_in_half_precision(train_dir, tmp_path):
    import onnx

    from cxr_export.fp16 import convert_fp16
    from cxr_export.modelio import write_spec

    src = tiny(tmp_path / "sure.onnx", train_dir)
    half = convert_fp16(src, tmp_path / "sure_fp16.onnx")
    write_spec(half, read_spec(src).updated({"precision": "fp16"}))
    result = calibrate.calibrate_file(half, train_dir, tmp_path / "sure_fp16_cal.onnx", threads=1)
    assert result["calibration"]["applied"] is True
    model = onnx.load(str(tmp_path / "sure_fp16_cal.onnx"))
    (t,) = [i for i in model.graph.initializer if i.name == calibrate.TEMPERATURE_VALUE]
    assert t.data_type == onnx.TensorProto.FLOAT16
    pixels, _ = validation(read_spec(src), train_dir)
    p0, p1 = positive(half, pixels), positive(tmp_path / "sure_fp16_cal.onnx", pixels)
    assert np.array_equal(p0 >= 0.3, p1 >= read_spec(tmp_path / "sure_fp16_cal.onnx").threshold)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained for two epochs on 240 real images at 64 px."""
    pytest.importorskip("torch")
    if not SMALL.is_dir():
        pytest.skip(f"shared data not found at {SMALL}")
    from cxr_train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("cal_run")
    train(TrainConfig("tiny", str(SMALL), str(out), epochs=2, max_images=240, image_size=64, batch_size=32,
                      ema=0.0, progress=False, seed=1, save_last=False), log=lambda *a: None)
    return out


def test_cxr_export_calibrates_every_file_it_writes(run_dir, tmp_path, capsys):
    from cxr_export.cli import main

    out = tmp_path / "tiny.onnx"
    assert main([str(run_dir), "--out", str(out), "--int8", "--calibration", str(SMALL), "--calibration-count", "32",
                 "--max-drop", "100", "--threads", "2"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calibration: ")]
    assert len(said) == 2 and all("operating points: 10 kept (up to date)" in line for line in said)  # already there
    for path in (out, tmp_path / "tiny_int8.onnx"):
        spec = read_spec(path)
        block = spec.to_dict()["calibration"]
        assert set(block) == BLOCK_KEYS and block["images"] == 24 and len(spec.domain_operating_points) == 10
        assert block["applied"] is (block["ece_after"] < block["ece_before"])
        divs = [n for n in graph_nodes(path) if n[1].startswith(calibrate.PREFIX)]
        assert len(divs) == int(block["applied"])
    plain = tmp_path / "plain.onnx"
    assert main([str(run_dir), "--out", str(plain), "--calibration", str(SMALL), "--no-temperature",
                 "--no-heatmap", "--threads", "2"]) == 0
    assert read_spec(plain).calibration.temperature is None and read_spec(plain).calibration.applied is False
