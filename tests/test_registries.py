"""The runtime's registries: a fake entry added to each runs end to end through every caller.

Output formats (``cxr_infer.formats``), devices (``cxr_infer.devices``) and the graph additions
the spec knows (``cxr_infer.spec.GRAPH_ADDITIONS``). The export side of the graph additions and
the bench commands have their own registry tests (test_additions.py, test_bench_registry.py).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cxr_infer import Classifier, DeviceError
from cxr_infer import cli as cli_module
from cxr_infer import formats as formats_module
from cxr_infer.devices import DEVICES, Device, device_choices, resolve_device
from cxr_infer.formats import BUILTIN_FORMATS, OutputFormat, ResultWriter, get_format, output_formats
from cxr_infer.spec import GRAPH_ADDITIONS, ModelSpec


class UpperWriter(ResultWriter):
    """A fake format: one line per input, the label in capitals and the reasons it failed."""

    def result(self, path, prediction):
        self.out.write(f"{path} -> {prediction.label.upper()} {prediction.probability:.3f}\n")

    def error(self, path, message):
        self.out.write(f"{path} !! {message}\n")

    def close(self):
        self.out.write("END\n")


@pytest.fixture
def fake_format(monkeypatch):
    monkeypatch.setattr(formats_module, "_REGISTERED", {})
    fmt = OutputFormat("shout", "a line per input in capitals", UpperWriter)
    formats_module.register_format(fmt)
    return fmt


def test_a_registered_format_runs_through_cxr_infer(fake_format, tiny_model, xrays224, tmp_path, capsys):
    missing = tmp_path / "missing.jpeg"
    status = cli_module.main(["--model", str(tiny_model), "--format", "shout", str(xrays224[0]), str(missing)])
    out = capsys.readouterr()
    assert status == 1  # one input failed
    lines = out.out.splitlines()
    assert lines[0].startswith(f"{xrays224[0]} -> ") and lines[0].split()[2] in ("NORMAL", "PNEUMONIA")
    assert lines[1] == f"{missing} !! no such file" and lines[2] == "END"
    assert f"cxr-infer: {missing}: no such file" in out.err
    assert get_format("shout") is fake_format and "shout" in output_formats(plugins=False)


def test_format_entries_say_what_is_missing_and_which_inputs_they_refuse(monkeypatch, tiny_model, xrays224,
                                                                         tmp_path, capsys):
    monkeypatch.setattr(formats_module, "_REGISTERED", {})
    formats_module.register_format(OutputFormat("needs-x", "d", UpperWriter, missing=lambda: "pip install x"))
    assert cli_module.main(["--model", str(tiny_model), "--format", "needs-x", str(xrays224[0])]) == 2
    assert "--format needs-x: pip install x" in capsys.readouterr().err
    formats_module.register_format(OutputFormat("pngs-only", "d", UpperWriter, target="folder",
                                                input_problem=lambda p: None if p.endswith(".png") else "not a PNG"))
    assert cli_module.main(["--model", str(tiny_model), "--format", "pngs-only", str(xrays224[0])]) == 2
    assert "writes into a folder: give it with --output DIR" in capsys.readouterr().err
    status = cli_module.main(["--model", str(tiny_model), "--format", "pngs-only", "--output", str(tmp_path / "o"),
                              str(xrays224[0])])
    out = capsys.readouterr()
    assert status == 1 and f"{xrays224[0]} !! not a PNG" in out.out and (tmp_path / "o").is_dir()


def test_every_format_is_listed_in_help_and_hospital_formats_come_from_entry_points(capsys):
    assert list(BUILTIN_FORMATS) == ["table", "jsonl", "csv"]
    found = output_formats()
    assert {"dicom-sr", "fhir"} <= set(found)
    assert found["dicom-sr"].writer.__module__ == "cxr_hospital.sr" and found["dicom-sr"].target == "folder"
    with pytest.raises(SystemExit):
        cli_module.main(["--help"])
    text = capsys.readouterr().out
    for name in found:
        assert f"\n  {name} " in text, name


def _fake_device(monkeypatch, **changes) -> Device:
    """A device that runs onnxruntime's CPU provider under another name (what a new entry is)."""
    device = Device("fakecpu", "onnxruntime", "the CPU provider under a test name", check=lambda available: None,
                    providers=lambda request, available: ["CPUExecutionProvider"])
    device = replace(device, **changes)
    monkeypatch.setitem(DEVICES, "fakecpu", device)
    return device


def test_a_registered_device_runs_through_the_classifier_and_cxr_infer(monkeypatch, tiny_model, xrays224,
                                                                        capsys):
    _fake_device(monkeypatch, started=("CPUExecutionProvider",))
    assert "fakecpu" in device_choices() and resolve_device("fakecpu") == "fakecpu"
    clf = Classifier(tiny_model, device="fakecpu", threads=1)
    assert clf.providers == ["CPUExecutionProvider"]
    expected = Classifier(tiny_model, threads=1).predict(str(xrays224[0])).probability
    assert clf.predict(str(xrays224[0])).probability == pytest.approx(expected, abs=1e-6)
    assert cli_module.main(["--model", str(tiny_model), "--device", "fakecpu", "--format", "jsonl",
                            str(xrays224[0])]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["probability"] == pytest.approx(expected, abs=1e-6)


def test_a_device_that_is_missing_or_does_not_start_is_one_device_error(monkeypatch, tiny_model, xrays224, capsys):
    _fake_device(monkeypatch, check=lambda available: "device 'fakecpu' needs a fake card: pip install fake")
    with pytest.raises(DeviceError, match="needs a fake card"):
        Classifier(tiny_model, device="fakecpu")
    assert cli_module.main(["--model", str(tiny_model), "--device", "fakecpu", str(xrays224[0])]) == 2
    assert capsys.readouterr().err.strip().endswith("needs a fake card: pip install fake")
    _fake_device(monkeypatch, started=("FakeExecutionProvider",))  # opens, but on another provider
    with pytest.raises(DeviceError, match="could not start its provider"):
        Classifier(tiny_model, device="fakecpu")


def test_graph_additions_name_their_outputs_and_blocks_once():
    spec = ModelSpec.new(backbone="tiny", features_output="features")
    with_all = spec.updated({"domain": {"threshold": 1.0}, "heatmap": {"grid": [7, 7]}},
                            outputs={"domain_score": "domain_score", "domain_terms": "domain_terms",
                                     "heatmap": "heatmap"})
    assert with_all.domain.threshold == 1.0 and with_all.heatmap.grid == (7, 7)
    bare = with_all.without_additions(list(GRAPH_ADDITIONS))
    assert bare == spec and bare.domain is None and bare.heatmap is None
    for addition in GRAPH_ADDITIONS.values():
        only = with_all.without_additions([addition.name])
        assert not set(addition.outputs) & set(only.outputs.named) and addition.name not in only.to_dict()
