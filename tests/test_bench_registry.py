"""cxr-bench's registries: a fake entry in each runs end to end through ``cxr_bench.cli.main``.

Commands (``cxr_bench.commands.COMMANDS``): a fake command that counts the images of a folder
gets its sub-parser, its report files, ``--summary``, ``cxr-bench summary`` and its one-line
result. Devices (the runtime's ``cxr_infer.devices.DEVICES``): a fake device is a ``--device``
choice of accuracy and a row of formats. Also: reports go to a new folder under the current
directory unless --out names one; the parser loads nothing heavy; export and train are reached
through ``cxr_bench.upstream`` alone; the default out-of-domain kinds need no scikit-image.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from bench_fixtures import tiny_model
from PIL import Image

from cxr_bench import cli
from cxr_bench.commands import COMMANDS, Command, Summary, command_for_kind

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "cxr_bench"


def _count_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="a folder of images")


def _count_run(args: argparse.Namespace) -> Tuple[dict, int]:
    from cxr_bench.dataset import image_files
    from cxr_bench.util import md_table, new_report, write_report

    files = image_files(Path(args.data), "--data needs a folder of images")
    report = new_report("test/count", folder=str(args.data), images=len(files))
    write_report(Path(args.out), "count", args.name, report,
                 lambda r: "# Count\n\n" + md_table(["folder", "images"], [[r["folder"], r["images"]]]) + "\n",
                 args.quiet)
    return report, 0


COUNT = Command(name="count", kind="test/count", arguments=_count_arguments, run=_count_run,
                summary=lambda r: Summary(f"{r['images']} images", f"- `{r['folder']}` holds {r['images']} images"),
                help="count the images of a folder (100% fake)", description="Counts images.",
                epilog="example:\n  cxr-bench count --data DIR\n", example="cxr-bench count --data DIR")


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(COMMANDS, "count", COUNT)
    return COUNT


def _images(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"img{i}.png")
    return folder


def _labelled(root: Path) -> Path:
    _images(root / "NORMAL", 3)
    _images(root / "PNEUMONIA", 3)
    return root


def test_a_registered_command_runs_end_to_end(counting, tmp_path, capsys):
    data = _images(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert cli.main(["count", "--data", str(data), "--out", str(out), "-q", "--summary"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip() == f"cxr-bench count: 3 images ({out / 'count.md'})"
    report = json.loads((out / "count.json").read_text())
    assert report["kind"] == "test/count" and report["images"] == 3
    assert report["files"] == {"json": "count.json", "markdown": "count.md"}
    assert "| folder | images |" in (out / "count.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == []  # the row contract: accuracy and latency only
    md = (out / "summary.md").read_text()
    assert "### `count.json`: cxr-bench count" in md and f"- `{data}` holds 3 images" in md
    # the summary command finds it by its kind, beside the other commands' reports
    (out / "summary.md").unlink()
    assert cli.main(["summary", "--results", str(out), "-q"]) == 0
    assert "cxr-bench count" in (out / "summary.md").read_text()
    assert command_for_kind("test/count") is counting


def test_every_command_is_in_help_and_has_the_report_arguments(counting, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    for name, command in COMMANDS.items():
        assert f"\n    {name}" in text and command.example in text, name
    for name, command in COMMANDS.items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert "example" in text, name
        if command.kind is not None:
            assert "--summary" in text and "./cxr-bench-" in text, name


def test_reports_go_to_a_new_folder_under_the_current_directory(counting, tmp_path, monkeypatch, capsys):
    data = _images(tmp_path / "data", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["count", "--data", str(data), "-q"]) == 0
    assert cli.main(["count", "--data", str(data), "-q"]) == 0
    folders = sorted(work.glob("cxr-bench-count-*"))
    assert len(folders) == 2 and all((f / "count.json").is_file() for f in folders)
    assert str(folders[0]) in capsys.readouterr().out.splitlines()[0]
    # a run that fails leaves no folder behind
    assert cli.main(["count", "--data", str(tmp_path / "missing"), "-q"]) == 2
    assert len(list(work.glob("cxr-bench-count-*"))) == 2
    # cxr-bench summary with no arguments: the reports of those folders, into a new folder of its own
    assert cli.main(["summary", "-q"]) == 0
    (summary,) = work.glob("cxr-bench-summary-*")
    assert (summary / "summary.md").read_text().count("cxr-bench count") == 2


def test_e2e_needs_images_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["e2e", "--model", str(tmp_path / "m.onnx")])
    assert exc.value.code == 2 and "--images" in capsys.readouterr().err


def _fake_device(monkeypatch, **changes):
    from cxr_infer.devices import DEVICES, Device

    device = Device("fakecpu", "onnxruntime", "the CPU provider under a test name", check=lambda available: None,
                    providers=lambda request, available: ["CPUExecutionProvider"])
    monkeypatch.setitem(DEVICES, "fakecpu", replace(device, **changes))


def test_a_registered_device_runs_through_accuracy_and_formats(monkeypatch, tmp_path, capsys):
    _fake_device(monkeypatch)
    model = tiny_model(tmp_path / "tiny.onnx", image_size=32)
    data = _labelled(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(["accuracy", "--model", str(model), "--data", str(data), "--device", "fakecpu", "--bootstrap",
                     "0", "--no-plots", "--threads", "1", "--out", str(out), "-q"]) == 0
    (entry,) = json.loads((out / "accuracy.json").read_text())["models"]
    assert entry["providers"] == ["CPUExecutionProvider"] and entry["n_evaluated"] == 6
    # formats: a device the default plan does not name runs every file
    assert cli.main(["formats", "--model", str(model), "--data", str(data), "--providers", "cpu,fakecpu",
                     "--iterations", "2", "--throughput-batch", "2", "--threads", "1", "--out", str(out), "-q"]) == 0
    rows = json.loads((out / "formats.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("cpu", "ok"), ("fakecpu", "ok")]
    assert rows[1]["label_agreement"] == 1.0
    # a device that cannot run here: one line saying what to install, exit 2
    _fake_device(monkeypatch, check=lambda available: "device 'fakecpu' needs a fake card: pip install fake")
    capsys.readouterr()
    assert cli.main(["accuracy", "--model", str(model), "--data", str(data), "--device", "fakecpu",
                     "--out", str(out), "-q"]) == 2
    assert capsys.readouterr().err.strip().endswith("needs a fake card: pip install fake")


def test_the_parser_loads_nothing_heavy():
    code = ("import sys\nfrom cxr_bench.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'onnx', 'PIL', 'torch', 'matplotlib', 'cxr_export',"
            " 'cxr_train') if m in sys.modules))")
    env = {"PYTHONPATH": ":".join(str(REPO / p) for p in ("runtime", "benchmarks", "export", "train"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_export_and_train_are_reached_through_upstream_alone():
    """Every import of cxr_export or cxr_train in the package is in cxr_bench.upstream."""
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [(path.name, n) for n in names if n.split(".")[0] in ("cxr_export", "cxr_train")]
    assert found and {name for name, _ in found} == {"upstream.py"}, found


def test_default_kinds_need_no_scikit_image(monkeypatch):
    """The bench extra alone (matplotlib, no scikit-image) builds every out-of-domain kind."""
    import random

    from cxr_bench import domain_kinds

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    xrays = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), np.uint8)
    built = domain_kinds.build_kinds(xrays, 3, (32, 32))
    assert list(built) == list(domain_kinds.KINDS)
    assert all(px.shape == (3, 32, 32, 3) for px, _ in built.values())
    assert built["photos"][1] == ["matplotlib:grace_hopper.jpg"]
    assert built["medical_other"][1] == ["matplotlib:s1045.ima (MRI)"]
    px, _ = domain_kinds.make_photos(2, (32, 32), random.Random(0), domain_kinds._medical_sources())
    assert px.std() > 10  # the MRI slice, not a blank image
