"""cxr-bench accuracy --validation: each model measured on its own validation split, rebuilt from the
training folder as its spec records and checked against its split hash."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from bench_fixtures import tiny_model
from PIL import Image

from cxr_bench import cli
from cxr_bench.upstream import validation_split


def _train_folder(root: Path, per_label: int = 30) -> Path:
    rng = np.random.default_rng(5)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
                root / label / f"person{i}{label[0]}_bacteria_{i}.png")
    return root


def _model(path: Path, train: Path, seed: int, split_hash: str = "") -> Path:
    digest = split_hash or validation_split(train, seed, 0.1, None)[1]
    return tiny_model(path, image_size=32, spec_overrides={"provenance": {
        "split_hash": digest, "split": {"seed": seed, "val_fraction": 0.1, "max_images": None}}})


def test_accuracy_on_each_models_validation_split(tmp_path, capsys):
    train = _train_folder(tmp_path / "train")
    a, b = _model(tmp_path / "a.onnx", train, 0), _model(tmp_path / "b.onnx", train, 1)
    out = tmp_path / "out"
    assert cli.main(["accuracy", "--model", str(a), str(b), "--validation", str(train), "--bootstrap", "50",
                     "--threads", "1", "--out", str(out), "-q", "--summary"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    own = [validation_split(train, seed, 0.1, None)[0] for seed in (0, 1)]
    assert set(own[0]) != set(own[1])  # two splits: each file is measured on its own images only
    assert report["data"]["split"] == "validation" and report["data"]["n_images"] == len(set(own[0]) | set(own[1]))
    for entry, files in zip(report["models"], own):
        assert entry["n_evaluated"] == len(files) and entry["split"]["images"] == len(files)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    for column, files in zip(("p_positive:a", "p_positive:b"), own):
        assert {r["file"] for r in rows if r[column]} == {str(f.relative_to(train)) for f in files}
    assert {r["size"] for r in rows} == {"40x40"} and report["data"]["stored_sizes"] == {"40x40": len(rows)}
    assert "validation split" in (out / "accuracy.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == []  # summary rows hold held-out figures only
    # --data and --validation together, and a folder that splits into other images, are refused
    with pytest.raises(SystemExit):
        cli.main(["accuracy", "--model", str(a), "--data", str(train), "--validation", str(train)])
    capsys.readouterr()
    other = _model(tmp_path / "c.onnx", train, 0, split_hash="0" * 64)
    assert cli.main(["accuracy", "--model", str(other), "--validation", str(train), "--out", str(out), "-q"]) == 2
    assert "not the model's 00000000" in capsys.readouterr().err


