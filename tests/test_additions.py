"""The export half of the graph-addition registry (``cxr_export.additions``): a fake addition runs end to end.

The fake addition appends one output, the mean of the graph input, under its own name prefix. It is
registered in both halves of the table (``cxr_infer.spec.GRAPH_ADDITIONS`` and
``cxr_export.additions.ADDITIONS``), added to a tiny model file by the loop ``cxr-export`` runs,
named in the spec, read through the runtime's model layer, stripped by ``write_without`` and gone
from an INT8 file (the quantizer sees the classifier alone). Torch-free.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_model

from cxr_export.additions import ADDITIONS, AddContext, Addition, add_all, get_addition, strip_additions
from cxr_export.modelio import read_spec, write_spec, write_without
from cxr_infer.model import ModelFile, graph_input
from cxr_infer.spec import GRAPH_ADDITIONS, GraphAddition

SIZE = 32
PREFIX = "cxr_mean/"
OUTPUT = "input_mean"
#: every addition off but the fake one (the tiny model has no head for a heatmap, no data for a domain check)
ONLY_MEAN = {"domain_stats": False, "heatmap": False, "mean": None}


def add_mean(path, context) -> dict:
    """The fake addition: ``input_mean`` [N], the mean of the graph input times a constant 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    ADDITIONS["mean"].strip(model)  # replaces an earlier one, as every addition does
    source = model.graph.input[0].name
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "one"))
    model.graph.node.extend([
        helper.make_node("ReduceMean", [source], [PREFIX + "raw"], name=PREFIX + "raw", axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", [PREFIX + "raw", PREFIX + "one"], [OUTPUT], name=PREFIX + OUTPUT)])
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N"]))
    onnx.save(model, str(path))
    block = {"method": "mean of the normalised input", "threads": context.threads}
    write_spec(path, read_spec(path).updated({"mean": block}, outputs={OUTPUT: OUTPUT}))
    return block


@pytest.fixture
def fake_addition(monkeypatch):
    graph = GraphAddition("mean", (OUTPUT,), "the mean of the input")
    monkeypatch.setitem(GRAPH_ADDITIONS, "mean", graph)
    entry = Addition(graph, PREFIX, add_mean, lambda block: f"mean ({block['method']})", option="mean")
    monkeypatch.setitem(ADDITIONS, "mean", entry)
    return entry


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(build_model(features=True, size=SIZE))
    return path


def pixels(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


def added_names(path) -> set:
    """The node, initializer and output names of the fake addition in the file at ``path``."""
    import onnx

    g = onnx.load(str(path)).graph
    return ({n.name for n in g.node if n.name.startswith(PREFIX)} | {t.name for t in g.initializer
                                                                     if t.name.startswith(PREFIX)}
            | {o.name for o in g.output if o.name == OUTPUT})


def test_a_registered_addition_runs_end_to_end(fake_addition, tiny, tmp_path):
    lines = []
    add_all([tiny], AddContext(threads=1, options=ONLY_MEAN), lines.append)
    assert lines == ["mean: tiny.onnx: mean (mean of the normalised input)"]
    # named in the spec: its output role and its block
    spec = read_spec(tiny)
    assert spec.outputs.named[OUTPUT] == OUTPUT
    assert spec.to_dict()["mean"] == {"method": "mean of the normalised input", "threads": 1}
    # read through the runtime's model layer, which checks every named output against the graph
    px = pixels()
    model = ModelFile(tiny, threads=1)
    (mean,) = model.run(px, [OUTPUT])
    np.testing.assert_allclose(mean, graph_input(spec, px).mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
    # added again: replaced, not doubled
    add_all([tiny], AddContext(threads=1, options=ONLY_MEAN), lines.append)
    assert len(added_names(tiny)) == 4  # two nodes, one initializer, one output
    # stripped by write_without: graph and spec alike, the classifier untouched
    bare = write_without(tiny, tmp_path / "bare.onnx", ["mean"])
    assert added_names(bare) == set()
    bare_spec = read_spec(bare)
    assert OUTPUT not in bare_spec.outputs.named and "mean" not in bare_spec.to_dict()
    (before,) = model.run(px, ["probabilities"])
    (after,) = ModelFile(bare, threads=1).run(px, ["probabilities"])
    assert np.array_equal(before, after)


def test_quantize_strips_every_registered_addition(fake_addition, tiny, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from cxr_export.quantize import Int8Config, quantize_int8

    add_all([tiny], AddContext(threads=1, options=ONLY_MEAN), lambda line: None)
    assert added_names(tiny)
    int8 = quantize_int8(tiny, tmp_path / "tiny_int8.onnx", pixels(16, 1), read_spec(tiny),
                         Int8Config(calibration_count=16, batch_size=8))
    assert added_names(int8) == set()


def test_when_cxr_export_runs_an_addition(fake_addition, tmp_path):
    needy = Addition(fake_addition.graph, PREFIX, add_mean, str, option="mean_stats", needs_data=True)
    data = tmp_path / "train"
    data.mkdir()
    # the default (None): when what it needs is there
    assert fake_addition.wanted(AddContext(options={}))
    assert not fake_addition.wanted(AddContext(features=False, options={}))
    assert not needy.wanted(AddContext(options={})) and needy.wanted(AddContext(data_dir=data, options={}))
    # off when its option says so, whatever is there
    assert not needy.wanted(AddContext(data_dir=data, options={"mean_stats": False}))
    # asked for: on, or one clear error when the training folder it needs is missing
    assert fake_addition.wanted(AddContext(features=False, options={"mean": True}))
    with pytest.raises(ValueError, match="--mean-stats needs the training folder: pass --calibration DIR"):
        needy.wanted(AddContext(options={"mean_stats": True}))


def test_the_registry_reads_the_runtime_table():
    assert list(ADDITIONS) == ["domain", "heatmap"]  # the order cxr-export adds them in
    for name, entry in ADDITIONS.items():
        assert entry.graph is GRAPH_ADDITIONS[name] and entry.outputs == GRAPH_ADDITIONS[name].outputs
    assert len({entry.prefix for entry in ADDITIONS.values()}) == len(ADDITIONS)
    with pytest.raises(ValueError, match="unknown graph addition 'nope'; choose from domain, heatmap"):
        get_addition("nope")
    with pytest.raises(ValueError, match="unknown graph addition"):
        strip_additions(object(), ["nope"])
