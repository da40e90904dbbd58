"""``cxr-bench formats``: every provider x precision in one table, rows that cannot run say why.

Tiny FP32, FP16 and INT8 (a real QDQ graph, quantized by cxr_export) files of one backbone on a
few test X-rays. Where this onnxruntime has no CUDA or TensorRT provider (CI) those rows must be
skipped with the reason; on a GPU machine the same test expects them to run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import build_model

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def files(tmp_path_factory, xrays224):
    from cxr_export.modelio import read_spec, write_spec
    from cxr_export.quantize import Int8Config, quantize_int8
    from cxr_infer.preprocess import load_image

    d = tmp_path_factory.mktemp("formats")
    fp32, fp16, int8 = d / "tiny.onnx", d / "tiny_fp16.onnx", d / "tiny_int8.onnx"
    fp32.write_bytes(build_model())
    fp16.write_bytes(build_model(dtype="float16"))
    calib = np.stack([load_image(f) for f in xrays224[:8]])
    quantize_int8(fp32, int8, calib, read_spec(fp32), Int8Config(calibration_count=8))
    write_spec(int8, read_spec(fp32).updated({"precision": "int8"}))
    data = d / "data"
    for f in xrays224[:4] + xrays224[6:10]:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    return fp32, fp16, int8, data


def test_formats_table_rows_status_and_agreement(files, tmp_path):
    import onnxruntime as ort

    from cxr_bench.cli import main

    fp32, fp16, int8, data = files
    out = tmp_path / "out"
    rc = main(["formats", "--model", str(fp32), str(fp16), str(int8), "--data", str(data), "--providers",
               "cpu,cuda,tensorrt", "--iterations", "3", "--throughput-batch", "4", "--threads", "1", "--out",
               str(out), "-q"])
    rep = json.loads((out / "formats.json").read_text())
    rows = {(r["provider"], r["precision"]): r for r in rep["rows"]}
    # the default plan, in its order: CPU FP32/INT8, CUDA FP32/FP16/INT8, TensorRT FP16/INT8
    assert list(rows) == [("cpu", "fp32"), ("cpu", "int8"), ("cuda", "fp32"), ("cuda", "fp16"), ("cuda", "int8"),
                          ("tensorrt", "fp16"), ("tensorrt", "int8")]
    assert rc == (1 if any(r["status"].startswith("failed") for r in rep["rows"]) else 0)
    available = ort.get_available_providers()
    for (provider, _precision), r in rows.items():
        assert set(r) >= {"backbone", "provider", "precision", "status", "size_mb"}
        assert r["backbone"] == "tiny" and r["size_mb"] > 0
        wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}[provider]
        if wanted not in available:
            assert r["status"].startswith("skipped: ") and wanted in r["status"], r["status"]
            continue
        assert r["status"] == "ok", r["status"]
        assert r["tp"] + r["fp"] + r["tn"] + r["fn"] == 8
        assert r["accuracy"] == pytest.approx((r["tp"] + r["tn"]) / 8)
        assert r["ms_b1"] > 0 and r["images_per_s_b64"] > 0 and r["first_call_s"] >= 0
        assert r["reference"] == "cpu fp32" and r["label_agreement"] >= 0.75
    ref, q = rows[("cpu", "fp32")], rows[("cpu", "int8")]
    assert ref["max_abs_dp"] == 0.0 and ref["label_agreement"] == 1.0
    assert 0.0 < q["max_abs_dp"] < 0.25  # INT8 rounding moves the probabilities (8 calibration images)
    md = (out / "formats.md").read_text()
    assert "| tiny | cpu | int8 | ok |" in md and "## Goals" in md


def test_formats_matches_the_accuracy_report(files, tmp_path):
    """The table's accuracy and counts are those cxr-bench accuracy reports for the same file."""
    from cxr_bench.cli import main

    fp32, _, _, data = files
    assert main(["formats", "--model", str(fp32), "--data", str(data), "--providers", "cpu", "--iterations", "2",
                 "--throughput-batch", "2", "--threads", "1", "--out", str(tmp_path), "-q"]) == 0
    assert main(["accuracy", "--model", str(fp32), "--data", str(data), "--bootstrap", "0", "--no-plots",
                 "--threads", "1", "--out", str(tmp_path), "-q"]) == 0
    (row,) = json.loads((tmp_path / "formats.json").read_text())["rows"]
    at = json.loads((tmp_path / "accuracy.json").read_text())["models"][0]["at_threshold"]
    assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (at["tp"], at["fp"], at["tn"], at["fn"])
    assert row["accuracy"] == pytest.approx(at["accuracy"]) and row["auc"] == pytest.approx(at["auc"])


def test_formats_all_rows_and_bad_input(files, tmp_path, capsys):
    """--rows all puts every file on every provider; a text file as model is one line and exit 2."""
    from cxr_bench.cli import main

    fp32, fp16, _, data = files
    assert main(["formats", "--model", str(fp32), str(fp16), "--data", str(data), "--providers", "cpu", "--rows",
                 "all", "--iterations", "2", "--throughput-batch", "2", "--threads", "1", "--out", str(tmp_path),
                 "-q"]) == 0
    rows = json.loads((tmp_path / "formats.json").read_text())["rows"]
    assert [(r["provider"], r["precision"], r["status"]) for r in rows] == [("cpu", "fp32", "ok"),
                                                                          ("cpu", "fp16", "ok")]
    assert rows[1]["label_agreement"] == 1.0 and rows[1]["max_abs_dp"] < 1e-2  # FP16 vs FP32
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model\n")
    capsys.readouterr()
    assert main(["formats", "--model", str(bad), "--data", str(data), "--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.onnx" in err[0] and "Traceback" not in err[0]
    assert main(["formats", "--model", str(fp32), "--data", str(data), "--providers", "gpu", "--out",
                 str(tmp_path), "-q"]) == 2


def test_formats_report_survives_a_stopped_run(files, tmp_path, monkeypatch):
    """The report is rewritten after every row: a run stopped during its third row (a device call's
    limit, a hung TensorRT build) leaves its first two rows, compared, marked incomplete."""
    from cxr_bench import formats

    fp32, _, int8, data = files
    real, calls = formats.measure_row, []

    def stopped_at_third(*a, **k):
        calls.append(a[2])
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a kill leaves: the process ends in the middle of a row
        return real(*a, **k)

    monkeypatch.setattr(formats, "measure_row", stopped_at_third)
    with pytest.raises(KeyboardInterrupt):
        formats.run_formats([fp32, int8], data, tmp_path, providers=["cpu", "openvino"], rows="all", iterations=2,
                            batch=2, threads=1, quiet=True)
    rep = json.loads((tmp_path / "formats.json").read_text())
    assert rep["complete"] is False and rep["rows_planned"] == 4 and calls == ["cpu", "cpu", "openvino"]
    assert [(r["provider"], r["precision"], r["status"]) for r in rep["rows"]] == [("cpu", "fp32", "ok"),
                                                                                  ("cpu", "int8", "ok")]
    assert rep["rows"][1]["reference"] == "cpu fp32" and 0.0 < rep["rows"][1]["max_abs_dp"] < 0.25
    assert "probabilities" not in rep["rows"][0]
    assert "**Partial:** 2 of the 4 planned rows" in (tmp_path / "formats.md").read_text()


def test_formats_time_limit_skips_the_rows_left(files, tmp_path, monkeypatch):
    """--time-limit: no row starts after it; those rows say so, and the finished report is complete."""
    import time
    import types

    from cxr_bench import formats
    from cxr_bench.cli import main

    fp32, _, int8, data = files
    clock = types.SimpleNamespace(now=0.0, perf_counter=time.perf_counter)
    clock.monotonic = lambda: clock.now
    real = formats.measure_row

    def slow_row(*a, **k):  # each row takes 100 s on this clock
        clock.now += 100.0
        return real(*a, **k)

    monkeypatch.setattr(formats, "time", clock)
    monkeypatch.setattr(formats, "measure_row", slow_row)
    assert main(["formats", "--model", str(fp32), str(int8), "--data", str(data), "--providers", "cpu",
                 "--time-limit", "50", "--iterations", "2", "--throughput-batch", "2", "--threads", "1",
                 "--out", str(tmp_path), "-q"]) == 0
    rep = json.loads((tmp_path / "formats.json").read_text())
    assert rep["complete"] is True and rep["time_limit_s"] == 50
    # the first row starts at 0 s and ends at 100 s: the second is past the limit
    assert [(r["precision"], r["status"]) for r in rep["rows"]] == [
        ("fp32", "ok"), ("int8", "skipped: time limit of 50 s reached before this row started")]
    assert rep["rows"][1]["size_mb"] > 0
    assert "| tiny | cpu | int8 | skipped: time limit of 50 s reached before this row started |" in \
        (tmp_path / "formats.md").read_text()
    with pytest.raises(SystemExit) as stop:
        main(["formats", "--model", str(fp32), "--data", str(data), "--time-limit", "0", "--out", str(tmp_path)])
    assert stop.value.code == 2


def test_formats_two_runs_of_one_backbone(files, tmp_path):
    """Two files of one backbone and precision from different training runs (the GPU round's new
    VGG16 INT8 beside the shipped default): the table names each file in those rows, and each is
    compared with a CPU row of its own run, never with the other run's FP32 file."""
    from cxr_bench.cli import main
    from cxr_export.modelio import read_spec, write_spec

    fp32, _, int8, data = files
    other = tmp_path / "other_int8.onnx"
    shutil.copy(int8, other)
    spec = read_spec(other)
    write_spec(other, spec.updated({"provenance": {**spec.provenance.fields, "trained": "2026-11-28T01:36:16+00:00"}}))
    assert main(["formats", "--model", str(fp32), str(int8), str(other), "--data", str(data), "--providers", "cpu",
                 "--iterations", "2", "--throughput-batch", "2", "--threads", "1", "--out", str(tmp_path), "-q"]) == 0
    rows = {Path(r["file"]).name: r for r in json.loads((tmp_path / "formats.json").read_text())["rows"]}
    assert rows["tiny_int8.onnx"]["reference"] == "cpu fp32" and not rows["tiny_int8.onnx"]["is_reference"]
    assert rows["other_int8.onnx"]["reference"] == "cpu int8" and rows["other_int8.onnx"]["is_reference"]
    assert rows["other_int8.onnx"]["trained"] == "2026-11-28T01:36:16+00:00"
    md = (tmp_path / "formats.md").read_text()
    assert "| tiny | cpu | fp32 | ok |" in md
    assert "| tiny (`tiny_int8.onnx`) | cpu | int8 | ok |" in md
    assert "| tiny (`other_int8.onnx`) | cpu | int8 | ok |" in md


def test_formats_compares_in_domain_decisions_on_domain_data(tmp_path):
    """--domain-data: each row's in-domain decisions on the labelled images and on unlabelled ones
    (here two lateral views and a file that is no image), against the CPU reference row."""
    from conftest import DATA, REPO

    from cxr_bench.cli import main
    from cxr_infer.devices import DEVICES

    shipped = REPO / "runtime" / "cxr_infer" / "models" / "default.onnx"
    test, lateral = DATA / "chest_xray_224" / "test", DATA / "foreign_cxr" / "lateral"
    if not (test.is_dir() and lateral.is_dir()):
        pytest.skip("needs ../shared/data (chest_xray_224/test and foreign_cxr/lateral)")
    extra = tmp_path / "extra"
    extra.mkdir()
    for f in sorted(lateral.iterdir())[:2]:
        shutil.copy(f, extra / f.name)
    (extra / "notes.png").write_text("not an image\n")
    out = tmp_path / "out"
    rc = main(["formats", "--model", str(shipped), "--data", str(test), "--limit", "2", "--providers", "cpu,openvino",
               "--domain-data", str(extra), "--iterations", "3", "--throughput-batch", "2", "--threads", "2",
               "--out", str(out), "-q"])
    assert rc == 0
    rep = json.loads((out / "formats.json").read_text())
    assert rep["domain_data"] == {"folders": [str(extra)], "n_images": 3, "unreadable": 1}
    rows = {r["provider"]: r for r in rep["rows"]}
    cpu = rows["cpu"]
    assert cpu["is_reference"] and cpu["domain_images"] == 4 + 2 and cpu["domain_decisions_differ"] == 0
    assert cpu["domain_max_abs_dscore_rel"] == 0.0
    md = (out / "formats.md").read_text()
    assert "in-domain decisions differ" in md and "3 unlabelled images" in md and "(1 unreadable)" in md
    if DEVICES["openvino"].missing() is not None:
        assert rows["openvino"]["status"].startswith("skipped: ")
        return
    ov = rows["openvino"]
    assert ov["status"] == "ok" and ov["domain_images"] == 6
    assert ov["domain_decisions_differ"] <= 1 and 0.0 < ov["domain_max_abs_dscore_rel"] <= 0.6
    assert f"{ov['domain_decisions_differ']} of 6, " in md
