"""cxr-bench accuracy, summary and CLI on tiny ONNX models and a few shared test images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_fixtures import TEST_224, small_dataset, tiny_model

from cxr_bench import cli
from cxr_bench.summary import build_summary, find_reports

pytestmark = pytest.mark.skipif(not TEST_224.is_dir(), reason=f"shared data not found at {TEST_224}")
#: the keys of every row of summary.json, in order (the contract of cxr_bench.summary)
ROW_KEYS = ("backbone", "precision", "accuracy", "auc", "loss", "precision_score", "recall", "f1",
            "tp", "fp", "tn", "fn", "latency_ms_b1", "torch_latency_ms_b1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = small_dataset(root / "data", per_label=5)
    models = [tiny_model(root / "tiny_fp32.onnx", image_size=32, threshold=0.4),
              tiny_model(root / "tiny_fp16.onnx", image_size=32, precision="fp16", threshold=0.4),
              tiny_model(root / "small_fp32.onnx", image_size=24, backbone="vgg16")]
    out = root / "out"
    rc = cli.main(["accuracy", "--model", *map(str, models), "--data", str(data), "--out", str(out),
                   "--bootstrap", "200", "--threads", "1", "-q"])
    assert rc == 0
    return {"root": root, "data": data, "models": models, "out": out,
            "report": json.loads((out / "accuracy.json").read_text())}


def test_accuracy_files_exist(bench):
    out = bench["out"]
    for name in ("accuracy.json", "accuracy.md", "predictions.csv", "roc.png", "calibration.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_counts_match_recomputation(bench):
    """Counts in JSON and Markdown equal a direct recomputation from predictions.csv."""
    rep, out = bench["report"], bench["out"]
    assert rep["data"]["n_images"] == 10 and rep["data"]["counts"] == {"NORMAL": 5, "PNEUMONIA": 5}
    lines = (out / "predictions.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [r.split(",") for r in lines[1:]]
    assert len(rows) == 10
    y = np.array([int(r[2]) for r in rows])
    md = (out / "accuracy.md").read_text()
    for m in rep["models"]:
        col = header.index(f"p_positive:{m['name']}")
        p = np.array([float(r[col]) for r in rows])
        for key, thr in (("at_threshold", m["threshold"]), ("at_0_5", 0.5)):
            t = m[key]
            pred = p >= thr
            assert t["tp"] == int(np.sum(pred & (y == 1))) and t["fn"] == int(np.sum(~pred & (y == 1)))
            assert t["fp"] == int(np.sum(pred & (y == 0))) and t["tn"] == int(np.sum(~pred & (y == 0)))
            assert t["tp"] + t["fp"] + t["tn"] + t["fn"] == 10
            assert f"{t['tp']} / {t['fp']} / {t['tn']} / {t['fn']}" in md
            assert set(t["ci"]) >= {"accuracy", "loss", "precision", "recall", "specificity", "f1", "auc"}
    assert "| Model | Accuracy | Loss | Precision | Recall | F1 |" in md


def test_fp16_input_model_agrees_with_fp32(bench):
    a, b = bench["report"]["models"][:2]
    assert a["precision"] == "fp32" and b["precision"] == "fp16"
    assert abs(a["at_0_5"]["auc"] - b["at_0_5"]["auc"]) < 0.05
    assert a["at_threshold"]["threshold"] == 0.4


def test_each_image_decoded_once_per_input_size(bench, tmp_path, monkeypatch):
    import cxr_bench.dataset as ds

    calls = []
    real = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cli.main(["accuracy", "--model", *map(str, bench["models"]), "--data", str(bench["data"]), "--out", str(tmp_path),
              "--bootstrap", "0", "--no-plots", "-q"])
    assert len(calls) == 10 * 2  # three models, two input sizes
    assert not (tmp_path / "roc.png").exists()


def test_unreadable_image_is_reported_not_fatal(bench, tmp_path):
    data = small_dataset(tmp_path / "data", per_label=2)
    (data / "NORMAL" / "broken.jpeg").write_bytes(b"not a jpeg at all")
    rc = cli.main(["accuracy", "--model", str(bench["models"][0]), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--bootstrap", "50", "--no-plots", "-q", "--name", "x"])
    assert rc == 0
    rep = json.loads((tmp_path / "o" / "accuracy-x.json").read_text())
    assert rep["models"][0]["n_evaluated"] == 4
    assert "broken.jpeg" in rep["data"]["unreadable"][0]["file"]
    assert "broken.jpeg" in (tmp_path / "o" / "accuracy-x.md").read_text()


def test_errors_say_what_to_do(bench, tmp_path, capsys):
    assert cli.main(["accuracy", "--model", str(tmp_path / "nope.onnx"), "--data", str(bench["data"]),
                     "--out", str(tmp_path)]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert cli.main(["accuracy", "--model", str(bench["models"][0]), "--data", str(tmp_path / "none"),
                     "--out", str(tmp_path)]) == 2
    assert "DIR/NORMAL" in capsys.readouterr().err
    odd = tmp_path / "odd"
    (odd / "CATS").mkdir(parents=True)
    (odd / "CATS" / "a.jpeg").write_bytes((TEST_224 / "NORMAL").iterdir().__next__().read_bytes())
    assert cli.main(["accuracy", "--model", str(bench["models"][0]), "--data", str(odd), "--out", str(tmp_path)]) == 2
    assert "not labels of the model" in capsys.readouterr().err
    notcxr = tmp_path / "plain.onnx"
    import onnx

    m = onnx.load(str(bench["models"][0]))
    del m.metadata_props[:]
    onnx.save(m, str(notcxr))
    assert cli.main(["accuracy", "--model", str(notcxr), "--data", str(bench["data"]), "--out", str(tmp_path)]) == 2
    assert "not a cxr model" in capsys.readouterr().err


def test_help_teaches(capsys):
    for args in (["--help"], ["accuracy", "--help"], ["latency", "--help"], ["e2e", "--help"], ["summary", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 0
        assert "example" in capsys.readouterr().out


def _latency_report(path: Path, created: str, rows):
    path.write_text(json.dumps({"kind": "cxr-bench/latency", "created": created, "machine": {"cpu_model": "X"},
                                "results": rows}))


def test_summary_merges_accuracy_and_latency(bench, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "accuracy.json").write_text((bench["out"] / "accuracy.json").read_text())
    sha = {m["precision"]: m["sha256"] for m in bench["report"]["models"] if m["backbone"] == "resnet50"}
    base = {"device": "cpu", "threads": 2, "batch": 1, "engine": "onnx", "backbone": "resnet50", "path": "a"}
    a = {**base, "precision": "fp32", "sha256": sha["fp32"]}
    _latency_report(out / "latency.json", "2030-01-01T00:00:00Z", [
        {**a, "median_ms": 40.0},
        {**a, "median_ms": 500.0, "heatmap": True},  # the map fetched: not the classification call alone
        {**a, "median_ms": 45.0, "domain_check": True},
        {**base, "precision": "fp16", "sha256": sha["fp16"], "median_ms": 60.0, "path": "b"},
        {**a, "median_ms": 99.0, "batch": 8},
        {**base, "engine": "torch", "precision": "fp32", "median_ms": 120.0, "path": "c"},
        {**a, "median_ms": 70.0, "threads": 1},
    ])
    _latency_report(out / "latency-old.json", "2020-01-01T00:00:00Z", [{**a, "median_ms": 1.0}])
    assert cli.main(["summary", "--results", str(out), "-q"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert isinstance(rows, list) and all(tuple(r) == ROW_KEYS for r in rows)
    by = {(r["backbone"], r["precision"]): r for r in rows}
    assert set(by) == {("resnet50", "fp32"), ("resnet50", "fp16"), ("vgg16", "fp32")}
    r = by[("resnet50", "fp32")]
    assert r["latency_ms_b1"] == 40.0 and r["torch_latency_ms_b1"] == 120.0
    acc = next(m for m in bench["report"]["models"] if m["name"] == "tiny_fp32")["at_threshold"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (acc["tp"], acc["fp"], acc["tn"], acc["fn"])
    assert r["precision_score"] == pytest.approx(acc["precision"]) and r["auc"] == pytest.approx(acc["auc"])
    assert by[("vgg16", "fp32")]["latency_ms_b1"] is None
    md = (out / "summary.md").read_text()
    assert "| Backbone | Precision | Accuracy |" in md and "3.0x" in md
    assert "| File |" in md and "tiny_fp32.onnx` |" in md
    rows1, src = build_summary(find_reports(out), threads=1)
    assert {(x["backbone"], x["precision"]): x for x in rows1}[("resnet50", "fp32")]["latency_ms_b1"] == 70.0


def test_summary_never_merges_two_different_files(bench, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "accuracy.json").write_text((bench["out"] / "accuracy.json").read_text())
    _latency_report(out / "latency.json", "2030-01-01T00:00:00Z", [
        {"device": "cpu", "threads": 1, "batch": 1, "engine": "onnx", "backbone": "vgg16", "precision": "fp32",
         "median_ms": 5.0, "path": str(tmp_path / "another_vgg16.onnx"), "sha256": "0" * 64}])
    rows, src = build_summary(find_reports(out))
    vgg = [r for r in rows if r["backbone"] == "vgg16"]
    assert len(vgg) == 2 and sorted(str(r["latency_ms_b1"]) for r in vgg) == ["5.0", "None"]
    assert any("different model files" in w for w in src["warnings"])


def test_spec_precision_checked_against_graph(tmp_path):
    from cxr_bench.models import inspect_model

    _, facts, warnings = inspect_model(tiny_model(tmp_path / "claims_int8.onnx", precision="int8"))
    assert facts["implied_precision"] == "fp32" and facts["quant_ops"] == 0
    assert warnings and "says precision 'int8'" in warnings[0]
    assert inspect_model(tiny_model(tmp_path / "ok.onnx"))[2] == []


def test_summary_option_after_accuracy(bench, tmp_path):
    rc = cli.main(["accuracy", "--model", str(bench["models"][0]), "--data", str(bench["data"]), "--out", str(tmp_path),
                   "--bootstrap", "0", "--no-plots", "-q", "--summary"])
    assert rc == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["backbone"], r["precision"]) for r in rows] == [("resnet50", "fp32")]
    assert rows[0]["latency_ms_b1"] is None and rows[0]["tp"] is not None


def test_summary_without_reports_says_what_to_run(tmp_path, capsys):
    assert cli.main(["summary", "--results", str(tmp_path)]) == 2
    assert "cxr-bench accuracy" in capsys.readouterr().err


def test_missing_bench_extra_is_one_line_naming_the_install(tmp_path):
    """In a base install (no onnx), cxr-bench names the extra to install instead of a traceback."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    model = tiny_model(tmp_path / "m.onnx", image_size=32)
    code = ("import sys\nsys.modules['onnx'] = None\nfrom cxr_bench.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(repo / p) for p in ("runtime", "export", "benchmarks")))
    r = subprocess.run([sys.executable, "-c", code, "accuracy", "--model", str(model), "--data", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "cxr-bench: error: this command needs the Python package 'onnx', which is not installed: "
        "pip install 'cxr[bench]'"]
