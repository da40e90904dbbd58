"""Model cards (``cxr-bench card``) on tiny models and tiny reports, and the shipped cards.

``cxr-bench card`` runs end to end through ``cxr_bench.cli.main`` on two tiny models (with a heatmap
and a domain output) and reports made in the test: accuracy on a test folder and on each model's
validation split and heatmaps by the real commands, domain and latency reports written by hand.
The shipped cards in docs/model-cards are regenerated from the shipped files and the committed
reports and compared byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from bench_fixtures import TEST_224, tiny_model
from conftest import shipped_models
from PIL import Image

from cxr_bench import cli

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "docs" / "model-cards"
SECTIONS = ["## Intended use and out-of-scope use", "## Training data and split", "## How the model was chosen",
            "## Metrics", "## Subgroups", "## Calibration", "## Domain check", "## Heatmap examples",
            "## Known failure modes", "## Limitations", "## SHA-256"]


# ---- tiny models and folders
def _with_outputs(path: Path, grid: int = 4) -> Path:
    """Add a heatmap (a ReLU of the channel mean, average-pooled to ``grid`` x ``grid``) and a domain score
    (the mean absolute input) to a tiny model, and name them in its spec."""
    import onnx
    from onnx import TensorProto, helper

    from cxr_infer.spec import SPEC_KEY, ModelSpec

    model = onnx.load(str(path))
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    model.graph.node.extend([
        helper.make_node("AveragePool", ["input"], ["pooled_map"], kernel_shape=[size // grid] * 2,
                         strides=[size // grid] * 2),
        helper.make_node("ReduceMean", ["pooled_map"], ["mean_map"], axes=[1], keepdims=0),  # opset 17
        helper.make_node("Relu", ["mean_map"], ["heatmap"]),
        helper.make_node("Abs", ["input"], ["abs_input"]),
        helper.make_node("ReduceMean", ["abs_input"], ["domain_score"], axes=[1, 2, 3], keepdims=0)])
    model.graph.output.extend([helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", grid, grid]),
                               helper.make_tensor_value_info("domain_score", TensorProto.FLOAT, ["N"])])
    props = {p.key: p.value for p in model.metadata_props}
    spec = ModelSpec.from_json(props[SPEC_KEY]).updated(
        {"heatmap": {"grid": [grid, grid], "method": "test map"},
         "domain": {"threshold": 1.0, "flag_rate_validation": 0.05}},
        outputs={"heatmap": "heatmap", "domain_score": "domain_score"})
    helper.set_model_props(model, {**props, SPEC_KEY: spec.to_json()})
    onnx.save(model, str(path))
    return path


def _train_folder(root: Path, per_label: int = 30) -> Path:
    rng = np.random.default_rng(5)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            pixels = rng.integers(0, 256, (40, 40, 3), np.uint8)
            Image.fromarray(pixels).save(root / label / f"person{i}{label[0]}_bacteria_{i}.png")
    return root


def _split_hash(train: Path, seed: int) -> str:
    from cxr_bench.upstream import validation_split

    return validation_split(train, seed, 0.1, None)[1]


def _test_folder(root: Path) -> Path:
    """Three NORMAL and four PNEUMONIA test images, two of them bacterial and two viral."""
    pneumonia = sorted((TEST_224 / "PNEUMONIA").iterdir())
    chosen = {"NORMAL": sorted((TEST_224 / "NORMAL").iterdir())[:3],
              "PNEUMONIA": [f for f in pneumonia if "bacteria" in f.name][:2] + [f for f in pneumonia
                                                                                if "virus" in f.name][:2]}
    for label, files in chosen.items():
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / label / f.name)
    return root


def _model(path: Path, backbone: str, auc: float, split_hash: str, seed: int, weight: float = 4.0,
           calibration: Optional[dict] = None) -> Path:
    provenance = {"split_hash": split_hash, "split": {"seed": seed, "val_fraction": 0.1, "max_images": None},
                  "metrics": {"validation": {"auc": auc, "threshold": 0.3}}, "weights_origin": "random init",
                  "selection": "highest validation AUC", "best_epoch": 3, "epochs_run": 4}
    intended = {"age_years": [1, 5], "age_margin_years": 0.5, "body_parts": ["CHEST"], "views": ["PA", "AP"],
                "modalities": ["DX"], "source": "tiny test images"}
    tiny_model(path, image_size=32, backbone=backbone, weight=weight,
               spec_overrides={"provenance": provenance, "intended_use": intended, "calibration": calibration})
    return _with_outputs(path)


# ---- cxr-bench card end to end
def _domain_report(models: List[Path]) -> dict:
    from cxr_infer.info import file_sha256

    points = [{"flag_rate": 0.05, "threshold": 1.2, "validation": 0.05,
               "flagged": {"test split": 0.04, "noise": 1.0, "adult_frontal": 0.7, "originals": 0.03}},
              {"flag_rate": 0.1, "threshold": 0.9, "flagged": {"test split": 0.08, "noise": 1.0,
                                                               "adult_frontal": 0.8, "originals": 0.06}}]
    entries = [{"name": m.stem, "path": str(m), "sha256": file_sha256(m), "domain": {"threshold": 1.0},
                "in_domain": {"images": 7, "flag_rate": 1 / 7}, "kinds": {"noise": {"flag_rate": 1.0},
                                                                         "mirrored": {"flag_rate": 0.25}},
                "foreign": {"adult_frontal": {"images": 20, "flag_rate": 0.75}},
                "foreign_classifier": {"all": {"images": 18, "auc": 0.61}},
                "originals": {"images": 10, "flag_rate": 0.1},
                "operating_points": {"source": "set by hand in the test", "points": points}} for m in models]
    return {"kind": "cxr-bench/domain", "created": "x", "command": "by hand", "models": entries,
            "originals": "full-size originals"}


def _latency_report(models: List[Path], ms: List[float]) -> dict:
    from cxr_infer.info import file_sha256

    rows = []
    for m, t in zip(models, ms):
        rows += [{"engine": "onnx", "path": str(m), "name": m.stem, "sha256": file_sha256(m), "batch": 1,
                  "device": "cpu", "removed": None, "median_ms": t, "timed_calls": 40, "threads": 1},
                 {"engine": "onnx", "path": str(m), "name": m.stem, "sha256": file_sha256(m), "batch": 1,
                  "device": "cpu", "removed": ["domain graph"], "median_ms": t / 10, "timed_calls": 40, "threads": 1}]
    return {"kind": "cxr-bench/latency", "created": "x", "command": "by hand", "results": rows}


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """Two tiny models whose validation AUCs tie (the faster wins) and a third without reports; reports made
    by accuracy (test folder and validation splits) and heatmaps, domain and latency written by hand."""
    if not TEST_224.is_dir():
        pytest.skip(f"shared data not found at {TEST_224}")
    root = tmp_path_factory.mktemp("card")
    train, test = _train_folder(root / "train"), _test_folder(root / "test")
    digest = _split_hash(train, 0)
    slow = _model(root / "slow.onnx", "resnet50", 0.99005, digest, seed=0)
    calibration = {"temperature": 1.5, "applied": True, "ece_before": 0.08, "ece_after": 0.03,
                   "threshold_before": 0.5, "threshold_after": 0.45, "images": 6}
    fast = _model(root / "fast.onnx", "inception_v3", 0.99, digest, seed=0, weight=2.0, calibration=calibration)
    bare = _model(root / "bare.onnx", "vgg16", 0.95, digest, seed=0)
    reports = root / "reports"
    both = [str(slow), str(fast)]
    common = ["--bootstrap", "100", "--threads", "1", "--out", str(reports), "-q"]
    assert cli.main(["accuracy", "--model", *both, "--data", str(test), "--name", "test", *common]) == 0
    assert cli.main(["accuracy", "--model", *both, "--validation", str(train), "--name", "validation", *common]) == 0
    assert cli.main(["heatmaps", "--model", *both, "--data", str(test), "--per-kind", "1", "--threads", "1",
                     "--out", str(reports), "-q"]) == 0
    (reports / "domain.json").write_text(json.dumps(_domain_report([slow, fast])))
    (reports / "latency.json").write_text(json.dumps(_latency_report([slow, fast], [5.0, 3.0])))
    out = root / "cards"
    assert cli.main(["card", *both, str(bare), "--reports", str(reports), "--out", str(out), "-q"]) == 0
    return {"root": root, "reports": reports, "out": out, "slow": slow, "fast": fast, "bare": bare}


def _card(carded, name: str) -> str:
    return (carded["out"] / f"{name}.md").read_text()


def _test_entry(carded, stem: str) -> dict:
    report = json.loads((carded["reports"] / "accuracy-test.json").read_text())
    return next(m for m in report["models"] if m["name"] == stem)


def test_a_card_has_every_section_filled_from_the_reports(carded):
    text = _card(carded, "resnet50-fp32")
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    t = _test_entry(carded, "slow")["at_threshold"]
    assert f"| TP / FP / TN / FN | {t['tp']} / {t['fp']} / {t['tn']} / {t['fn']} |" in text
    assert "Validation (spec's record)" not in text and "`accuracy-validation.json`" in text
    # subgroups from the per-image rows: two bacterial and two viral PNEUMONIA images
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in text.splitlines()
            if line.startswith(("| bacterial", "| viral"))}
    assert sorted(rows) == ["bacterial", "viral"] and all(r[0] == "2" for r in rows.values())
    assert sum(int(r[1]) for r in rows.values()) == t["tp"]
    assert "is stored at 224 x 224 px" in text
    # calibration, domain check, heatmaps and the failure modes read the reports
    assert text.count("![Reliability diagram") == 2 and "../reports/calibration-test.png" in text
    assert "| adult frontal X-rays (other hospitals) | 75.0% | 70.0% | 80.0% |" in text
    assert "| full-size originals (training images) | 10.0% | 3.0% | 6.0% |" in text
    assert "mirrored 25.0%" in text and "10 full-size originals" in text
    heatmaps = json.loads((carded["reports"] / "heatmaps.json").read_text())
    grid = next(m for m in heatmaps["models"] if m["name"] == "slow")["grid_image"]
    assert f"](../reports/{grid})" in text and (carded["out"] / "../reports" / grid).is_file()
    assert "| all images |" in text and "Maps without mass" in text
    assert "Not measured" not in text


def test_the_calibration_comes_from_the_spec_and_the_reports(carded):
    text = _card(carded, "inception-v3-fp32").split("## Calibration")[1].split("## Domain check")[0]
    assert ("temperature 1.500 (applied in the graph); ECE 0.0800 before and 0.0300 after on its 6 validation "
            "images; threshold 0.5000 before, 0.4500 after") in text
    ece = {split: json.loads((carded["reports"] / f"accuracy-{split}.json").read_text())["models"][1]["calibration"]
           for split in ("test", "validation")}
    assert f"| test | 7 | {ece['test']['ece']:.4f} |" in text and f"{ece['validation']['ece']:.4f}" in text
    assert "divided by a temperature of 1.500 fitted on validation images to minimise their log loss " \
           "(it softens them" in text
    assert "it is not calibrated" in _card(carded, "resnet50-fp32")


def test_the_choice_follows_the_rule_across_the_files_given(carded):
    text = _card(carded, "vgg16-fp32")
    assert "| `slow.onnx` | resnet50 fp32 | 0.99005 | 5.00 | `latency.json` |" in text
    assert "| `fast.onnx` | inception_v3 fp32 | 0.99000 | 3.00 | `latency.json` |" in text  # the whole file's row
    assert "By this rule the choice is `fast.onnx` (inception_v3 fp32: on a tie, the fastest)." in text


def test_a_card_without_reports_names_the_commands(carded):
    text = _card(carded, "vgg16-fp32")
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    for command in ("cxr-bench accuracy --model bare.onnx --data TEST_DIR", "--validation TRAIN_DIR",
                    "cxr-bench domain --model bare.onnx", "cxr-bench heatmaps --model bare.onnx",
                    "cxr-bench latency --model bare.onnx --batch 1"):
        assert command in text, command
    assert "%" not in text.split("## Metrics")[1].split("## Subgroups")[0]  # no figure made up


def test_cards_are_deterministic_and_indexed(carded):
    again = carded["root"] / "again"  # beside the first cards: the same links to the reports' figures
    assert cli.main(["card", str(carded["slow"]), str(carded["fast"]), str(carded["bare"]), "--reports",
                     str(carded["reports"]), "--out", str(again), "-q"]) == 0
    for card in sorted(carded["out"].glob("*.md")):
        assert (again / card.name).read_bytes() == card.read_bytes(), card.name
    index = (carded["out"] / "index.md").read_text()
    assert [n for n in ("inception-v3-fp32.md", "resnet50-fp32.md", "vgg16-fp32.md") if f"]({n})" in index] == [
        "inception-v3-fp32.md", "resnet50-fp32.md", "vgg16-fp32.md"]


def test_a_report_on_other_bytes_is_refused_in_one_line(carded, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(carded["root"], changed, ignore=shutil.ignore_patterns("cards"))
    model = changed / "slow.onnx"
    report = json.loads((changed / "reports" / "domain.json").read_text())
    for entry in report["models"]:
        entry["path"] = str(changed / Path(entry["path"]).name)  # the copy's reports name the copied files
    (changed / "reports" / "domain.json").write_text(json.dumps(report))
    tiny_model(model, image_size=32, threshold=0.7)  # other bytes at the same path
    capsys.readouterr()
    assert cli.main(["card", str(model), "--reports", str(changed / "reports"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "on other bytes" in err and "re-run cxr-bench domain" in err


# ---- the shipped cards
def _shipped_cards() -> List[Dict[str, str]]:
    from cxr_bench.card_md import read_card_facts

    facts = [read_card_facts(p) for p in sorted(CARDS.glob("*.md")) if p.name != "index.md"]
    return [f for f in facts if f is not None]


def test_the_shipped_cards_are_generated_from_the_files_and_reports(tmp_path):
    """docs/model-cards is what `cxr-bench card` makes of the files the cards name and benchmarks/results."""
    cards = _shipped_cards()
    assert sorted(c["file"] for c in cards) == sorted(m["path"] for m in shipped_models()), \
        "docs/model-cards should hold one card for each file of models/shipped.json"
    missing: Optional[str] = next((c["file"] for c in cards if not (REPO / c["file"]).is_file()), None)
    assert missing is None, f"{missing}: named by a card but not in the repository; regenerate docs/model-cards"
    out = tmp_path / "cards"
    assert cli.main(["card", *(str(REPO / c["file"]) for c in cards), "--out", str(out), "-q"]) == 0
    stale = [p.name for p in sorted(CARDS.glob("*.md")) if (out / p.name).read_text() != p.read_text()]
    assert not stale, (f"{stale} differ from what `cxr-bench card` makes of the files and benchmarks/results: "
                       "regenerate them (cxr-bench card FILES)")
