"""cxr-infer, run as a user runs it: ``python -m cxr_infer.cli`` in a fresh process."""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from conftest import run_cli

from cxr_infer import classifier as classifier_module


@pytest.fixture(scope="module")
def tree(tmp_path_factory, xrays224, xray):
    """scans/ with nested folders, a PNG, an extension-less DICOM, and files that must be skipped."""
    root = tmp_path_factory.mktemp("scans")
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for f in xrays224[:3]:
        shutil.copy(f, root / "a" / f.name)
    for f in xrays224[6:8]:
        shutil.copy(f, root / "a" / "b" / f.name)
    from PIL import Image
    Image.open(xrays224[3]).save(root / "a" / "b" / "scan.PNG")
    shutil.copy(xrays224[4], root / ".hidden" / "skip.jpeg")
    (root / "a" / "notes.txt").write_text("not an image")
    try:
        import numpy as np
        from test_dicom import make_dicom
        (root / "a" / "IM000001").write_bytes(make_dicom(np.asarray(Image.open(xray).convert("L"))))
        (root / "a" / "b" / "IM000002").write_bytes(make_dicom(np.asarray(Image.open(xray).convert("L")))[132:])
        (root / "a" / "b" / "README").write_text("extension-less, not DICOM: skipped")
    except ImportError:  # pragma: no cover  (pydicom absent)
        pass
    return root


def _jsonl(r) -> list:
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def test_help_teaches_and_needs_no_heavy_imports():
    blocker = "import sys\nfor m in ('numpy', 'PIL', 'onnxruntime', 'torch'):\n    sys.modules[m] = None\n"
    r = run_cli("--help", prelude=blocker)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for needle in ("examples:", "--model", "--format", "jsonl", "--threshold", "--batch-size", "--device",
                   "--output", "--info", "--threads", "exit status", "cxr-infer --model"):
        assert needle in out


def test_folder_file_and_glob_in_one_run(tiny_model, tree, xrays224):
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", str(tree), str(xrays224[5]),
                str(tree / "a" / "*.jpeg"))
    assert r.returncode == 0, r.stderr
    rows = _jsonl(r)
    paths = [o["path"] for o in rows]
    assert len(paths) == len(set(paths)) == 3 + 2 + 1 + 2 + 1  # globbed files are already listed once
    assert str(tree / "a" / "b" / "scan.PNG") in paths and str(tree / "a" / "IM000001") in paths
    assert str(tree / "a" / "b" / "IM000002") in paths  # DICOM without preamble
    assert not any(".hidden" in p or p.endswith(".txt") for p in paths)
    for o in rows:
        assert set(o) >= {"path", "label", "probability", "threshold"}
        assert o["label"] in ("NORMAL", "PNEUMONIA") and 0 <= o["probability"] <= 1 and o["threshold"] == 0.5
        assert o["label"] == ("PNEUMONIA" if o["probability"] >= 0.5 else "NORMAL")


def test_scores_match_the_python_api(tiny_model, classifier, xrays224):
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", "--batch-size", "3", *map(str, xrays224))
    api = classifier.predict(list(xrays224))
    assert [round(p.probability, 6) for p in api] == [o["probability"] for o in _jsonl(r)]


def test_recursive_glob(tiny_model, tree):
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", str(tree / "**" / "*.jpeg"))
    assert r.returncode == 0
    assert len(_jsonl(r)) == 5


def test_table_is_the_default(tiny_model, xrays224):
    r = run_cli("--model", str(tiny_model), str(xrays224[0]), str(xrays224[6]))
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["path", "label", "probability", "threshold", "domain"]
    assert lines[1].split()[-1] == "n/a"  # no domain statistics in the tiny model
    assert len(lines) == 3 and lines[1].startswith(str(xrays224[0]))
    assert r.stderr == b""


def test_csv_to_output_file_with_threshold(tiny_model, xrays224, tmp_path):
    out = tmp_path / "out.csv"
    missing = tmp_path / "missing.jpeg"
    r = run_cli("--model", str(tiny_model), "--format", "csv", "--threshold", "0", "--output", str(out),
                str(xrays224[0]), str(missing), str(xrays224[1]))
    assert r.returncode == 1
    assert r.stdout == b""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [row["path"] for row in rows] == [str(xrays224[0]), str(missing), str(xrays224[1])]
    assert rows[0]["label"] == "PNEUMONIA" and float(rows[0]["threshold"]) == 0.0 and rows[0]["error"] == ""
    assert rows[1]["error"] == "no such file" and rows[1]["label"] == ""
    assert r.stderr.decode().splitlines()[0] == f"cxr-infer: {missing}: no such file"


def test_parquet_table_holds_the_jsonl_records(tiny_model, xrays224, tmp_path):
    """--format parquet (the cxr.formats entry point of .[ray]): one row per input in input order with
    the JSON Lines record's values, a failed input as a row with its error, exit 1 as for jsonl."""
    pq = pytest.importorskip("pyarrow.parquet")
    bad = tmp_path / "notes.jpeg"
    bad.write_text("not an image")
    inputs = [str(xrays224[0]), str(bad), str(xrays224[-1]), str(xrays224[1])]
    jsonl = run_cli("--model", str(tiny_model), "--format", "jsonl", *inputs)
    table = tmp_path / "out.parquet"
    r = run_cli("--model", str(tiny_model), "--format", "parquet", "--output", str(table), *inputs)
    assert jsonl.returncode == r.returncode == 1, r.stderr
    records = [json.loads(line) for line in jsonl.stdout.decode().splitlines()]
    rows = pq.read_table(table).to_pylist()
    assert [row["path"] for row in rows] == [rec["path"] for rec in records] == inputs
    for row, rec in zip(rows, records):
        assert (row["error"] is None) == ("error" not in rec)
        if row["error"] is None:
            assert row["label"] == rec["label"] and row["in_domain"] == rec["in_domain"]
            assert row["probability"] == pytest.approx(rec["probability"], abs=1e-6)
            assert row["probabilities"] == pytest.approx(rec["probabilities"], abs=1e-6)
        else:
            assert row["error"] == rec["error"]
    assert rows[1]["error"] and rows[1]["label"] is None


def test_info_json_prints_the_whole_spec(tiny_model):
    r = run_cli("--model", str(tiny_model), "--info", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["spec"]["backbone"] == "tiny" and info["spec"]["labels"] == ["NORMAL", "PNEUMONIA"]
    assert info["inputs"][0]["shape"][1:] == [3, 224, 224]


def test_info_is_a_short_summary_people_read(tiny_model):
    from cxr_infer.info import file_sha256

    r = run_cli("--model", str(tiny_model), "--info")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode().splitlines()
    width = len(text[0]) - len(text[0][len("model"):].lstrip())  # the key column
    lines = {line[:width].strip(): line[width:] for line in text}
    assert lines["sha256"] == file_sha256(tiny_model) and lines["backbone"] == "tiny, fp32"
    assert lines["labels"].startswith("NORMAL, PNEUMONIA (positive: PNEUMONIA)")
    assert lines["image check"].startswith("none") and lines["validation"] == "not recorded in the file"
    assert len(r.stdout) < 2000
    r = run_cli("--model", str(tiny_model), "--json", str(tiny_model))
    assert r.returncode == 2 and "--json goes with --info" in r.stderr.decode()


def test_stdin(tiny_model, xrays224):
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", "-", stdin=xrays224[0].read_bytes())
    assert r.returncode == 0
    assert _jsonl(r)[0]["path"] == "-" and "label" in _jsonl(r)[0]


@pytest.mark.parametrize("args,needle", [
    ((), "no inputs given"),
    (("--threshold", "1.5", "x.jpeg"), "not in [0, 1]"),
    (("--batch-size", "0", "x.jpeg"), "must be at least 1"),
    (("--format", "xml", "x.jpeg"), "unknown format 'xml' (choose one of table, jsonl, csv, dicom-sr, fhir"),
    (("--device", "tpu", "x.jpeg"), "invalid choice"),
])
def test_usage_errors_exit_2(tiny_model, args, needle):
    r = run_cli("--model", str(tiny_model), *args)
    assert r.returncode == 2
    assert needle in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_unwritable_output_exit_2(tiny_model, xrays224, tmp_path):
    r = run_cli("--model", str(tiny_model), "--output", str(tmp_path / "no" / "such" / "dir.csv"), str(xrays224[0]))
    assert r.returncode == 2 and "cannot write" in r.stderr.decode()


def test_empty_folder_and_unmatched_glob_exit_1(tiny_model, tmp_path, xrays224):
    (tmp_path / "empty").mkdir()
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", str(tmp_path / "empty"),
                str(tmp_path / "*.jpeg"), str(xrays224[0]))
    assert r.returncode == 1
    rows = _jsonl(r)
    assert rows[0]["error"] == "folder holds no image files" and rows[1]["error"] == "no files match this pattern"
    assert "label" in rows[2]


def test_without_model_uses_the_shipped_default(xrays224):
    """The repository ships a default model (MobileNetV3-Large INT8): no --model classifies with it."""
    assert classifier_module.DEFAULT_MODEL.is_file()
    r = run_cli("--format", "jsonl", str(xrays224[0]))
    assert r.returncode == 0, r.stderr.decode()
    (row,) = _jsonl(r)
    assert row["label"] in ("NORMAL", "PNEUMONIA") and row["in_domain"] in (True, False)
    info = run_cli("--info")
    assert info.returncode == 0 and "mobilenet_v3_large" in info.stdout.decode() and "int8" in info.stdout.decode()


def test_no_default_model_installed_message(xrays224, tmp_path):
    missing = str(tmp_path / "none.onnx")
    prelude = f"import cxr_infer.classifier as c, pathlib\nc.DEFAULT_MODEL = pathlib.Path({missing!r})"
    r = run_cli(str(xrays224[0]), prelude=prelude)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "no default model is installed yet" in err and "cxr-infer --model MODEL.onnx" in err
    assert err.count("\n") == 1 and r.stdout == b""


def test_cuda_without_provider_exit_2(tiny_model, xrays224):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = run_cli("--model", str(tiny_model), "--device", "cuda", str(xrays224[0]))
    assert r.returncode == 2 and "has no CUDAExecutionProvider" in r.stderr.decode()


def test_timing_and_threads(tiny_model, xrays224):
    r = run_cli("--model", str(tiny_model), "--threads", "1", "--timing", str(xrays224[0]))
    assert r.returncode == 0
    line = r.stderr.decode().strip().splitlines()[-1]
    for phase in ("import=", "session=", "preprocess=", "inference=", "total="):
        assert phase in line
    r = run_cli("--model", str(tiny_model), str(xrays224[0]), env={"CXR_TIMING": "1"})
    assert "cxr-infer timing:" in r.stderr.decode()


def test_progress_bar_only_on_a_tty(capsys, monkeypatch):
    from cxr_infer.cli import Progress
    bar = Progress(40, enabled=True)
    for _ in range(40):
        bar.step()
    bar.close()
    err = capsys.readouterr().err
    assert "40/40" in err and "#" * 30 in err
    off = Progress(40, enabled=False)
    off.step()
    off.close()
    assert capsys.readouterr().err == ""


def test_expand_inputs_keeps_order_and_drops_duplicates(tree):
    from cxr_infer.cli import expand_inputs
    first = str(tree / "a" / "b" / "scan.PNG")
    entries = expand_inputs([first, str(tree / "a" / "b"), first])
    assert entries[0] == (first, None) and len(entries) == 4  # scan.PNG, 2 JPEGs, IM000002
    assert all(problem is None for _, problem in entries)


def test_linked_folders_are_followed_once_and_a_file_is_classified_once(tmp_path, xrays224):
    """A folder linked into the scanned one (a mounted share, a PACS export) is searched too, where
    it used to be skipped without a word; a link back up ends the descent instead of looping; and
    one file reached by two paths (through the link and by name) is classified once."""
    from cxr_infer.cli import expand_inputs

    real, scan = tmp_path / "real", tmp_path / "scan"
    (real / "sub").mkdir(parents=True)
    scan.mkdir()
    shutil.copy(xrays224[0], real / "sub" / "a.jpeg")
    shutil.copy(xrays224[1], scan / "b.jpeg")
    (scan / "linked").symlink_to(real, target_is_directory=True)
    (real / "sub" / "back").symlink_to(scan, target_is_directory=True)  # a cycle
    linked = str(scan / "linked" / "sub" / "a.jpeg")
    assert expand_inputs([str(scan), str(real / "sub" / "a.jpeg")]) == [(str(scan / "b.jpeg"), None), (linked, None)]
    r = run_cli(str(scan), "--format", "csv")
    assert r.returncode == 0, r.stderr.decode()
    assert [row.split(",")[0] for row in r.stdout.decode().splitlines()[1:]] == [str(scan / "b.jpeg"), linked]


def test_every_command_reports_an_error_in_one_line(monkeypatch):
    """cxr-infer, cxr-pacs, cxr-node and cxr-serve print what cxr_infer.errors.one_line makes of an error:
    a cxr error's own message, anything else named as unexpected, its traceback only with CXR_DEBUG."""
    from cxr_infer.errors import ModelError, one_line

    monkeypatch.delenv("CXR_DEBUG", raising=False)
    assert one_line(ModelError("m.onnx: not an ONNX file\n(protobuf)")) == "m.onnx: not an ONNX file (protobuf)"
    assert one_line(KeyError("x")) == "unexpected error: KeyError: 'x' (set CXR_DEBUG=1 for the traceback)"
    monkeypatch.setenv("CXR_DEBUG", "1")
    with pytest.raises(KeyError):
        one_line(KeyError("x"))
    assert one_line(ModelError("m.onnx: missing")) == "m.onnx: missing"
