"""The out-of-domain check: statistics written into a tiny model file, read back by the runtime.

Torch-free: the tiny model's ``features`` are the three channel means of its normalised input,
its "training images" are gray images of varying brightness, so a saturated colour image is
far outside the domain and a gray one inside.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_model, run_cli

from cxr_export import domain
from cxr_export.modelio import read_spec
from cxr_export.onnxgraph import tensor_elem_type
from cxr_infer import Classifier, ModelError
from cxr_infer.model import graph_input

SIZE = 32


def gray_images(n: int, seed: int) -> np.ndarray:
    """Gray 'X-rays': a random brightness, small noise, a little colour jitter per image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 180, size=(n, 1, 1, 1))
    jitter = np.array([0.0, 3.0, -3.0]) * rng.normal(1.0, 0.3, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 5, (n, SIZE, SIZE, 1)) + jitter, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("domain") / "plain.onnx"
    path.write_bytes(build_model(features=True, size=SIZE))
    return path


@pytest.fixture(scope="module")
def domain_model(plain_model):
    train = gray_images(300, 0)
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    out = plain_model.with_name("with_domain.onnx")
    block = domain.add_domain_stats(plain_model, train, labels, gray_images(200, 1), out_path=out, threads=1,
                                    features_branch=True)
    return out, block, train


def red() -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[..., 0] = 255
    return img


def test_stats_round_trip_through_the_file(domain_model, plain_model):
    import onnx

    path, block, train = domain_model
    spec = read_spec(path)
    assert spec.domain_output == "domain_score" and spec.to_dict()["domain"] == block
    assert spec.domain_threshold == pytest.approx(block["threshold"]) and block["threshold"] > 0
    assert block["fit"]["images"] == 300 and block["calibration"]["images"] == 200
    assert abs(block["flag_rate_validation"] - 0.05) <= 0.02
    m = onnx.load(str(path))
    assert [o.name for o in m.graph.output] == ["probabilities", "features", "domain_score", "domain_terms"]
    assert {t.name for t in m.graph.initializer if t.name.startswith(domain.PREFIX)} >= {
        domain.PREFIX + "centres", domain.PREFIX + "p0/W", domain.PREFIX + "p1/W"}  # the statistics live in the file
    # the graph computes what the numpy reference computes from the same features and thumbnails
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    val = gray_images(200, 1)
    plain_spec = read_spec(plain_model)
    feats = domain.run_outputs(plain_model, plain_spec, train, ["features"])[0]
    val_feats = domain.run_outputs(plain_model, plain_spec, val, ["features"])[0]
    branches, keys, _ = domain.fit_branches(spec, "features", domain.branch_inputs(spec, train, feats), labels,
                                            domain.branch_inputs(spec, val, val_feats), features_branch=True)
    assert [b.name for b in branches] == [b["name"] for b in block["branches"]] == [
        "features", "thumb16", "thumb8", "thumb4", "orientation"]
    assert [b.centre for b in branches] == pytest.approx([b["centre"] for b in block["branches"]])
    assert [b.scale for b in branches] == pytest.approx([b["scale"] for b in block["branches"]])
    inputs = domain.branch_inputs(spec, train[:20], feats[:20])
    graph, terms = domain.run_outputs(path, spec, train[:20], ["domain_score", "domain_terms"])
    assert terms.shape == (20, len(branches)) and spec.domain_terms_output == "domain_terms"
    np.testing.assert_allclose(terms.max(axis=1), graph, rtol=1e-6)  # the score is the largest term
    np.testing.assert_allclose(graph, domain.reference_scores(branches, [inputs[k] for k in keys]), rtol=1e-3,
                               atol=1e-3)
    # probabilities are untouched
    before = domain.run_outputs(plain_model, plain_spec, train[:20], ["probabilities"])[0]
    after = domain.run_outputs(path, spec, train[:20], ["probabilities"])[0]
    assert np.array_equal(before, after)


def test_refreshing_replaces_the_old_statistics(domain_model, tmp_path):
    import onnx

    path, _, train = domain_model
    again = tmp_path / "again.onnx"
    domain.add_domain_stats(path, train[:100], np.zeros(100, int), train[100:160], out_path=again, rank=2)
    m = onnx.load(str(again))
    assert [o.name for o in m.graph.output].count("domain_score") == 1
    assert read_spec(again).to_dict()["domain"]["rank"] == 2


def test_far_input_flagged_training_like_not(domain_model):
    path, _, train = domain_model
    clf = Classifier(path, threads=1)
    assert clf.domain_available
    inside = clf.predict(train[0])
    outside = clf.predict(red())
    assert inside.in_domain is True and outside.in_domain is False
    assert outside.domain_score > clf.domain_threshold > inside.domain_score
    assert outside.to_dict()["in_domain"] is False and outside.to_dict()["domain_score"] == outside.domain_score
    # batches agree with single calls
    batch = clf.predict([train[0], red()])
    assert [p.in_domain for p in batch] == [True, False]
    assert clf.info()["domain_check"]["available"] is True
    assert clf.info()["domain_check"]["branches"] == ["features", "thumb16", "thumb8", "thumb4", "orientation"]
    assert clf.info()["domain_check"]["flags_of_in_domain_validation"] == pytest.approx(0.05, abs=0.02)
    off = Classifier(path, threads=1, domain_check=False)
    assert off.predict(red()).in_domain is None and off.predict(red()).probability == outside.probability


def ramp_images(n: int, seed: int) -> np.ndarray:
    """'X-rays' with a layout: dark at the top, bright at the bottom, any exposure and contrast."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1.0, 1.0, SIZE).reshape(1, SIZE, 1, 1)
    level, contrast = rng.uniform(70, 170, (n, 1, 1, 1)), rng.uniform(20, 60, (n, 1, 1, 1))
    return np.clip(level + contrast * ramp + rng.normal(0, 6, (n, SIZE, SIZE, 1)), 0, 255).astype(np.uint8).repeat(
        3, axis=3)


def test_upside_down_and_inverted_are_flagged(plain_model, tmp_path):
    """The layout branches: a flipped or inverted image is outside, whatever its exposure."""
    train, val = ramp_images(300, 2), ramp_images(200, 3)
    out = tmp_path / "ramp.onnx"
    block = domain.add_domain_stats(plain_model, train, np.arange(300) % 2, val, out_path=out, threads=1,
                                    features_branch=True)
    clf = Classifier(out, threads=1)
    upright = ramp_images(40, 4)
    flags = lambda imgs: [p.in_domain is False for p in clf.predict(list(imgs))]  # noqa: E731
    assert sum(flags(upright)) <= 6  # about 5% of in-domain images, by construction
    assert all(flags(upright[:, ::-1, ::-1]))  # upside down
    assert all(flags(255 - upright))  # inverted gray levels
    # the features branch alone (the channel means of this tiny model) could not tell them apart
    feats = domain.run_outputs(plain_model, read_spec(plain_model), np.concatenate([upright, upright[:, ::-1, ::-1]]),
                               ["features"])[0]
    np.testing.assert_allclose(feats[:40], feats[40:], atol=1e-5)
    assert block["flagged_validation_by_branch"].keys() == {"features", "thumb16", "thumb8", "thumb4", "orientation"}


def checkered(images: np.ndarray, amplitude: int = 40) -> np.ndarray:
    """The same images with a one-pixel checkerboard of +-``amplitude`` added: every channel mean and
    every 2 x 2 (and coarser) average stays as it was, only the pixel-level spread changes."""
    sign = np.where((np.arange(SIZE)[:, None] + np.arange(SIZE)[None, :]) % 2 == 0, 1, -1)[None, :, :, None]
    return (images.astype(int) + amplitude * sign).astype(np.uint8)  # 60..180 +- 40 stays in 0..255


def test_stage_branch_flags_what_pooled_features_and_thumbnails_cannot(plain_model, tmp_path):
    """A stage branch (channel means and standard deviations of a graph tensor, here the tiny model's
    input) flags a checkered image; its plain twin is not flagged, and no other branch sees a difference."""
    train, val = gray_images(300, 5), gray_images(200, 6)
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    out = tmp_path / "stage.onnx"
    # every row (the row subsample is tested with the quantized read)
    block = domain.add_domain_stats(plain_model, train, labels, val, out_path=out, threads=1, taps=["input"],
                                    features_branch=True, stage_tall_rows=0)
    names = [b["name"] for b in block["branches"]]
    assert names == ["features", "thumb16", "thumb8", "thumb4", "orientation", "stage1"]
    assert block["stage_tensors"] == ["input"] and "channel means and standard deviations of input" in \
        block["branches"][-1]["input"]
    spec = read_spec(out)
    plain = gray_images(40, 7)
    plain = np.clip(plain, 60, 180)  # room for the checkerboard
    twin = checkered(plain)
    score_p, terms_p = domain.run_outputs(out, spec, plain, ["domain_score", "domain_terms"])
    score_c, terms_c = domain.run_outputs(out, spec, twin, ["domain_score", "domain_terms"])
    thr = block["threshold"]
    assert np.mean(score_p > thr) <= 0.15 and np.all(score_c > thr)
    assert np.all(np.argmax(terms_c, axis=1) == names.index("stage1"))  # the stage branch fired
    np.testing.assert_allclose(terms_c[:, :5], terms_p[:, :5], rtol=1e-3, atol=1e-3)  # the others saw no change
    # graph == numpy reference, stage branch included
    stages = domain.stage_features(out, spec, twin, ["input"])
    x = graph_input(spec, twin).astype(np.float64)
    np.testing.assert_allclose(stages[0], np.c_[x.mean(axis=(2, 3)), x.std(axis=(2, 3))], rtol=1e-3, atol=1e-3)
    plain_spec = read_spec(plain_model)
    feats = domain.run_outputs(plain_model, plain_spec, twin, ["features"])[0]
    fit_in, val_in = [domain.branch_inputs(spec, imgs,
                                           domain.run_outputs(plain_model, plain_spec, imgs, ["features"])[0],
                                           domain.stage_features(plain_model, plain_spec, imgs, ["input"]))
                      for imgs in (train, val)]
    branches, keys, _ = domain.fit_branches(spec, "features", fit_in, labels, val_in, taps=["input"],
                                            features_branch=True)
    ref = domain.reference_scores(branches, [domain.branch_inputs(spec, twin, feats, stages)[k] for k in keys])
    np.testing.assert_allclose(score_c, ref, rtol=1e-3, atol=1e-3)
    # probabilities untouched
    before = domain.run_outputs(plain_model, read_spec(plain_model), twin, ["probabilities"])[0]
    assert np.array_equal(before, domain.run_outputs(out, spec, twin, ["probabilities"])[0])


def test_stage_branch_reads_the_quantized_tensor(plain_model, tmp_path):
    """In a QDQ graph a stage branch reads the quantized integers through a Cast (no DequantizeLinear
    of its own), the scale folded into its weights and the zero point into its centres; a tensor
    taller than ``stage_tall_rows`` is read on every second row, a Slice of those integers. The
    statistics are the dequantized tensor's (of those rows), and graph == numpy reference."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(plain_model))  # the tiny model with a Q/DQ pair on its input, as an INT8 file has
    scale, zero = np.float32(1 / 64), np.uint8(128)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale), "q_scale"),
                                    numpy_helper.from_array(np.array(zero), "q_zero")])
    model.graph.node.extend([helper.make_node("QuantizeLinear", ["input", "q_scale", "q_zero"], ["input_q"]),
                             helper.make_node("DequantizeLinear", ["input_q", "q_scale", "q_zero"], ["input_dq"])])
    qdq = tmp_path / "qdq.onnx"
    onnx.save(model, str(qdq))
    train, val = gray_images(200, 5), gray_images(100, 6)
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    qdq_spec, imgs = read_spec(qdq), gray_images(20, 7)
    feats = domain.run_outputs(qdq, qdq_spec, imgs, ["features"])[0]

    def agrees_with_numpy(out, rows: int) -> None:
        """The stage statistics are the dequantized tensor's, and the file's score its reference's."""
        spec = read_spec(out)
        stages = domain.stage_features(qdq, qdq_spec, imgs, ["input"], row_step=rows)
        x = graph_input(spec, imgs).astype(np.float64)[:, :, ::rows, :]
        xq = (np.clip(np.round(x / scale) + 128, 0, 255) - 128) * scale  # what the DequantizeLinear gives
        np.testing.assert_allclose(stages[0], np.c_[xq.mean(axis=(2, 3)), xq.std(axis=(2, 3))], rtol=1e-4, atol=1e-4)
        fit_in, val_in = [domain.branch_inputs(spec, i, domain.run_outputs(qdq, qdq_spec, i, ["features"])[0],
                                               domain.stage_features(qdq, qdq_spec, i, ["input"], row_step=rows))
                          for i in (train, val)]
        branches, keys, _ = domain.fit_branches(spec, "features", fit_in, labels, val_in, taps=["input"],
                                                stage_row_step=rows)
        ref = domain.reference_scores(branches, [domain.branch_inputs(spec, imgs, feats, stages)[k] for k in keys])
        np.testing.assert_allclose(domain.run_outputs(out, spec, imgs, ["domain_score"])[0], ref, rtol=1e-3, atol=1e-3)

    # the whole tensor (the fixture's 32 rows are not taller than the default 32): the quantized tensor
    # itself through a Cast, statistics mapped to the dequantized tensor's (mean s (q - z), sd s sd(q))
    full = tmp_path / "full.onnx"
    assert domain.DEFAULT_STAGE_TALL_ROWS == 32
    block = domain.add_domain_stats(qdq, train, labels, val, out_path=full, threads=1, taps=["input"])
    assert block["stage_tall_rows"] == 32 and block["stage_row_steps"] == [1]
    graph = onnx.load(str(full)).graph
    assert not any(n.op_type in ("Slice", "DequantizeLinear") and n.name.startswith(domain.PREFIX)
                   for n in graph.node)  # the check reads integers: no DequantizeLinear of its own
    reads = {n.input[0]: n for n in graph.node if n.name.startswith(domain.PREFIX)}
    assert reads["input_q"].op_type == "Cast"
    # the scale is folded into the weights and the zero point into the centres: no node of their own
    assert not any(n.name.endswith(("feat_x", "feat_z", "mean_z")) for n in graph.node)
    assert reads[reads["input_q"].output[0]].op_type in ("ReduceMean", "Mul")  # means over positions, no pooling
    # the orientation branch's rotated thumbnail shares the 16 x 16 branch's statistics: one Gemm, one weight
    gemm_weights = [n.input[1] for n in graph.node if n.op_type == "Gemm" and n.name.startswith(domain.PREFIX)]
    assert len(gemm_weights) == len(set(gemm_weights)) == len(block["branches"]) - 1
    pooled = {n.name: n.op_type for n in graph.node if n.name.endswith("/pooled")}
    assert pooled[domain.PREFIX + "thumb16/pooled"] == "MatMul"  # block averages of the input as MatMuls
    agrees_with_numpy(full, 1)
    # taller than stage_tall_rows: every 2nd row, a Slice of whole rows of the integers, then the same read
    rows = tmp_path / "rows.onnx"
    block = domain.add_domain_stats(qdq, train, labels, val, out_path=rows, threads=1, taps=["input"],
                                    stage_tall_rows=31)
    assert block["stage_tall_rows"] == 31 and block["stage_row_steps"] == [2]
    assert "read on one row in 2" in block["branches"][-1]["input"]
    graph = onnx.load(str(rows)).graph
    reads = {n.input[0]: n for n in graph.node if n.name.startswith(domain.PREFIX)}
    assert reads["input_q"].op_type == "Slice" and reads[reads["input_q"].output[0]].op_type == "Cast"
    agrees_with_numpy(rows, 2)
    # a DequantizeLinear whose scale is per channel (or computed) keeps the float read
    per_channel = onnx.load(str(qdq))
    per_channel.graph.initializer.append(numpy_helper.from_array(np.full(3, scale, np.float32), "q_scale3"))
    dq = next(n for n in per_channel.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "input_dq")
    dq.input[1] = "q_scale3"
    dq.input[2] = ""
    nodes, _ = domain.stage_feature_nodes(per_channel, "input", "k/")
    assert nodes[0].op_type == "ReduceMean" and nodes[0].input[0] == "input_dq"


def test_default_taps_follow_the_backbone(plain_model):
    assert domain.default_taps(read_spec(plain_model), plain_model) == []  # "tiny": no table entry
    assert set(domain.STAGE_TAPS) == {"vgg16", "resnet50", "inception_v3", "mobilenet_v3_large", "efficientnet_b0"}
    assert len(domain.STAGE_TAPS["mobilenet_v3_large"]) == len(domain.STAGE_TAPS["efficientnet_b0"]) == 4
    assert len(domain.STAGE_TAPS["vgg16"]) == 4 and len(domain.STAGE_TAPS["inception_v3"]) == 3
    assert len(domain.STAGE_TAPS["resnet50"]) == 2  # two bottleneck-inner activations (see STAGE_TAPS)


def test_a_registered_backbone_brings_its_taps_and_the_spec_its_words(plain_model, tmp_path, monkeypatch):
    """The taps are a fact of the backbone's registry entry: a backbone registered with taps gets a
    stage branch for each its graph has, and every branch's reason words travel in the spec, worded
    as the runtime words files that lack them."""
    from dataclasses import replace

    from cxr_export.modelio import write_spec
    from cxr_infer.spec import LEGACY_BRANCH_WORDS
    from cxr_train.backbones import BACKBONES

    monkeypatch.setitem(BACKBONES, "tapped", replace(BACKBONES["tiny"], name="tapped",
                                                     domain_taps=("pooled", "no_such_tensor")))
    path = tmp_path / "tapped.onnx"
    path.write_bytes(plain_model.read_bytes())
    write_spec(path, read_spec(path).updated({"backbone": "tapped"}))
    assert domain.STAGE_TAPS["tapped"] == ("pooled", "no_such_tensor")
    assert domain.default_taps(read_spec(path), path) == ["pooled"]  # the graph's tensors only
    train = gray_images(200, 12)
    block = domain.add_domain_stats(path, train, (train.mean(axis=(1, 2, 3)) > 120).astype(int),
                                    gray_images(100, 13), threads=1)
    assert block["stage_tensors"] == ["pooled"]
    words = {b["name"]: b["words"] for b in block["branches"]}
    assert list(words) == ["thumb16", "thumb8", "thumb4", "orientation", "stage1"]
    assert words == {name: LEGACY_BRANCH_WORDS[name] for name in words}
    assert {b.name: b.words for b in read_spec(path).domain.branches} == words


def test_old_model_without_stats_still_loads(plain_model):
    clf = Classifier(plain_model, threads=1)
    p = clf.predict(red())
    assert not clf.domain_available and p.in_domain is None and p.domain_score is None
    assert clf.info()["domain_check"]["available"] is False
    r = run_cli("--model", str(plain_model), "--info", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["domain_check"]["available"] is False


def test_spec_naming_a_domain_output_needs_a_threshold(tmp_path):
    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="tiny", features_output="features").to_dict()
    spec["outputs"]["domain_score"] = "domain_score"
    with pytest.raises(ModelError, match="domain.threshold"):
        ModelSpec(spec).validate()


@pytest.fixture(scope="module")
def images(domain_model, tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    gray, color = d / "gray.png", d / "photo.png"
    Image.fromarray(domain_model[2][0]).save(gray)
    Image.fromarray(red()).save(color)
    return gray, color


def test_cli_marks_and_rejects(domain_model, images):
    path, _, _ = domain_model
    gray, color = images
    r = run_cli("--model", str(path), str(gray), str(color))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[1].endswith(" ok") and "OUTSIDE (!): image unlike the training X-rays (domain score" in lines[2]
    assert "1 of 2 inputs look outside the model's domain" in r.stderr.decode()
    r = run_cli("--model", str(path), "--format", "jsonl", str(gray), str(color))
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [o["in_domain"] for o in rows] == [True, False] and rows[1]["domain_score"] > 0
    r = run_cli("--model", str(path), "--format", "csv", "--reject-out-of-domain", str(gray), str(color))
    assert r.returncode == 1
    out = r.stdout.decode().splitlines()
    assert out[0] == "path,label,probability,threshold,in_domain,domain_score,domain_reasons,error"
    assert out[1].split(",")[4] == "true" and "not classified: outside the model's intended use: image unlike" in out[2]
    assert f"{color}: not classified: outside the model's intended use: image unlike the training X-rays" \
        in r.stderr.decode()


def test_reject_needs_statistics(plain_model, images):
    r = run_cli("--model", str(plain_model), "--reject-out-of-domain", str(images[0]))
    assert r.returncode == 2 and "neither domain statistics nor an intended_use" in r.stderr.decode()


def test_bench_domain_report(domain_model, plain_model, xrays224, tmp_path):
    import shutil

    from cxr_bench.cli import main
    from cxr_bench.domain import auroc

    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0 and auroc(np.array([1.0]), np.array([1.0])) == 0.5
    data = tmp_path / "data"
    for f in xrays224[:3] + xrays224[6:9]:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    out = tmp_path / "out"
    rc = main(["domain", "--model", str(domain_model[0]), str(plain_model), "--data", str(data), "--count", "4",
               "--kinds", "documents,noise,inverted,upside_down,rotated_90,cropped", "--out", str(out), "-q"])
    assert rc == 1  # the plain model has no statistics
    rep = json.loads((out / "domain.json").read_text())
    m = rep["models"][0]
    assert m["in_domain"]["images"] == 6 and set(m["kinds"]) == {"documents", "noise", "inverted", "upside_down",
                                                                "rotated_90", "cropped"}
    assert m["kinds"]["noise"]["images"] == 4 and m["kinds"]["noise"]["flag_rate"] == 1.0  # colour noise: far away
    assert rep["models"][1]["domain"] is None
    md = (out / "domain.md").read_text()
    assert "## Flag rate" in md and "| Model | features | thumb16 | thumb8 | thumb4 | orientation |" in md


def test_bench_latency_times_the_check(domain_model, plain_model, tmp_path):
    """--domain-check both: models with statistics are timed with and without the domain output."""
    from cxr_bench.cli import main

    rc = main(["latency", "--model", str(domain_model[0]), str(plain_model), "--batch", "1", "--threads", "1",
               "--repeats", "1", "--iterations", "3", "--warmup", "1", "--domain-check", "both", "--out",
               str(tmp_path), "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "latency.json").read_text())
    runs = {r["name"]: r["processes"][0]["outputs"] for r in rep["results"]}
    assert runs == {"with_domain": ["probabilities"], "with_domain +domain check": ["probabilities", "domain_score"],
                    "plain": ["probabilities"]}
    assert [c["kind"] for c in rep["comparisons"]] == ["domain check on vs off"]
    assert "+domain check" in (tmp_path / "latency.md").read_text()
    # "off" is the file without its domain graph (onnxruntime would run it anyway), not just fewer outputs
    rows = {r["name"]: r for r in rep["results"]}
    assert rows["with_domain"]["removed"] == ["domain graph"]
    assert rows["with_domain"]["run_file_bytes"] < rows["with_domain"]["file_bytes"]
    assert "removed" not in rows["with_domain +domain check"] and "removed" not in rows["plain"]
    assert all(r["median_ms"] > 0 for r in rows.values())


def test_bench_domain_foreign_folder(domain_model, xrays224, tmp_path):
    """--foreign DIR: each sub-folder a kind, flag rate and AUROC each; files.csv findings give the AUC."""
    import shutil

    from PIL import Image

    from cxr_bench.cli import main

    data = tmp_path / "data"
    for f in xrays224[:3] + xrays224[6:9]:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    foreign = tmp_path / "foreign"
    (foreign / "photos").mkdir(parents=True)
    rows = ["file,source,finding,view,modality,age,original_size,license"]
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), (i * 60, 200, 30), np.uint8)).save(foreign / "photos" / f"p{i}.png")
        rows.append(f"photos/p{i}.png,test,{'No finding' if i % 2 else 'Pneumonia'},AP,X-ray,,40x40,none")
    (foreign / "mixed").mkdir()  # two sources: images like the training ones, and far ones
    for i, img in enumerate(gray_images(4, 12)):
        Image.fromarray(img).save(foreign / "mixed" / f"near{i}.png")
        Image.fromarray(red()).save(foreign / "mixed" / f"far{i}.png")
        rows += [f"mixed/near{i}.png,near,,AP,X-ray,,32x32,none", f"mixed/far{i}.png,far,,AP,X-ray,,32x32,none"]
    (foreign / "files.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["domain", "--model", str(domain_model[0]), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--foreign", str(foreign), "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "domain.json").read_text())
    (m,) = rep["models"]
    assert m["foreign"]["photos"]["images"] == 4 and m["foreign"]["photos"]["flag_rate"] == 1.0
    assert m["foreign"]["photos"]["auroc"] == 1.0
    assert m["foreign"]["photos"]["by_source"] == {}  # one source: nothing to compare
    by_source = m["foreign"]["mixed"]["by_source"]
    assert {k: v["images"] for k, v in by_source.items()} == {"far": 4, "near": 4}
    assert by_source["far"]["flag_rate"] == 1.0 and by_source["near"]["flag_rate"] <= 0.25
    md = (out / "domain.md").read_text()
    assert "evaluation only" in md and "mixed: far (4)" in md and "mixed: near (4)" in md


def test_bench_domain_originals_control(domain_model, xrays224, tmp_path):
    """--originals DIR: in-domain images at their original size, read the runtime's way; flag rate
    and the names of the flagged files; a bright colour image among them is the one flagged."""
    import shutil

    from PIL import Image

    from cxr_bench.cli import main

    data = tmp_path / "data"
    for f in xrays224[:3] + xrays224[6:9]:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    originals = tmp_path / "originals" / "NORMAL"
    originals.mkdir(parents=True)
    for i, img in enumerate(gray_images(5, 7)):
        Image.fromarray(img).resize((97, 83)).save(originals / f"g{i}.png")  # not at the model's size
    Image.fromarray(np.stack([red()[..., 0]] * 3, -1)).save(originals / "white.png")
    Image.fromarray(red()).resize((97, 83)).save(originals / "red.png")
    out = tmp_path / "out"
    assert main(["domain", "--model", str(domain_model[0]), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--originals", str(originals.parent), "--out", str(out), "-q"]) == 0
    (m,) = json.loads((out / "domain.json").read_text())["models"]
    assert m["originals"]["images"] == 7
    assert "NORMAL/red.png" in m["originals"]["flagged"]
    assert not any(f.startswith("NORMAL/g") for f in m["originals"]["flagged"])
    assert m["originals"]["flag_rate"] == pytest.approx(len(m["originals"]["flagged"]) / 7)
    assert "In-domain originals through the runtime" in (out / "domain.md").read_text()
    assert main(["domain", "--model", str(domain_model[0]), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--originals", str(tmp_path / "nowhere"), "--out", str(out), "-q"]) != 0


def test_domain_scores_that_are_not_numbers_are_refused(tmp_path):
    """A file whose statistics give inf or NaN for some images (here features = sqrt of the pooled
    pixels, NaN for dark images; in an FP16 file, values past float16's range) gets no domain
    check: one error naming the file, the count and the cause, the file left as it was. It used to
    fail later, on the operating points' 'finite thresholds' rule, naming neither."""
    import onnx

    model = onnx.load_from_string(build_model(features=True, size=SIZE))
    (node,) = [n for n in model.graph.node if n.output[0] == "features"]
    node.op_type = "Sqrt"
    path = tmp_path / "sqrt.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    pool = gray_images(600, 3)
    bright = pool[pool.mean(axis=(1, 2, 3)) > 135][:200]  # normalised means above 0: finite features
    labels = (bright.mean(axis=(1, 2, 3)) > 155).astype(int)
    val = pool[:100]
    dark = int(np.sum(val.mean(axis=(1, 2, 3)) < 110))  # normalised means below 0 in every channel
    assert dark > 0
    with pytest.raises(ValueError, match=r"sqrt.onnx: its domain score is not a number \(inf or NaN\) for "
                                         r"\d+ of 100 validation images.*float16") as err:
        domain.add_domain_stats(path, bright, labels, val, threads=1, features_branch=True)
    assert int(str(err.value).split(" for ")[1].split(" of ")[0]) >= dark
    assert path.read_bytes() == before and not path.with_name(path.name + ".tmp").exists()


def test_stage_branch_on_an_fp16_file(plain_model, tmp_path):
    """An FP16 file's stage tensors are float16: the branch casts them to FP32 (cxr-export --fp16
    failed here once, 'Type (tensor(float)) ... does not match expected type (tensor(float16))')."""
    import onnx

    from cxr_export.fp16 import convert_fp16
    from cxr_export.modelio import write_spec

    fp16 = tmp_path / "tiny_fp16.onnx"
    convert_fp16(plain_model, fp16)
    write_spec(fp16, read_spec(plain_model).updated({"precision": "fp16"}))
    assert tensor_elem_type(onnx.load(str(fp16)), "pooled") == onnx.TensorProto.FLOAT16
    train = gray_images(200, 0)
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    out = tmp_path / "tiny_fp16_domain.onnx"
    block = domain.add_domain_stats(fp16, train, labels, gray_images(100, 1), out_path=out, threads=1,
                                    taps=["pooled"])
    assert [b["name"] for b in block["branches"]][-1] == "stage1" and block["graph_vs_numpy_max_diff"] < 0.05
    clf = Classifier(out, threads=1)
    assert clf.predict(gray_images(1, 5)[0]).in_domain is True and clf.predict(red()).in_domain is False
    # every second row of a tall float16 tensor (the 32-row image): sliced, then cast; still the numpy reference
    (half,) = [n.output[0] for n in onnx.load(str(fp16)).graph.node if n.op_type == "Cast"
               and tensor_elem_type(onnx.load(str(fp16)), n.output[0]) == onnx.TensorProto.FLOAT16][:1]
    rows = domain.add_domain_stats(fp16, train, labels, gray_images(100, 1), out_path=out, threads=1,
                                   taps=[half], stage_tall_rows=16)
    assert rows["graph_vs_numpy_max_diff"] < 0.05 and rows["stage_row_steps"] == [2]
    ops = [(n.op_type, n.input[0]) for n in onnx.load(str(out)).graph.node if n.name.startswith(domain.PREFIX)]
    assert ("Slice", half) in ops and ops.index(("Slice", half)) < ops.index(("Cast", "cxr_domain/stage1/rows"))


def test_without_the_features_branch(plain_model, tmp_path):
    """The default: no pooled-features branch where stage branches read the model
    (it stays where none do); the graph still equals its numpy reference, the runtime names the
    branches it has, and a far image is flagged."""
    train, val = gray_images(300, 8), gray_images(200, 9)
    labels = (train.mean(axis=(1, 2, 3)) > 120).astype(int)
    staged = domain.add_domain_stats(plain_model, train, labels, val, out_path=tmp_path / "staged.onnx", threads=1,
                                     taps=["pooled"])
    assert [b["name"] for b in staged["branches"]] == ["thumb16", "thumb8", "thumb4", "orientation", "stage1"]
    bare = domain.add_domain_stats(plain_model, train, labels, val, out_path=tmp_path / "bare.onnx", threads=1, taps=[])
    assert [b["name"] for b in bare["branches"]][0] == "features"  # no stage branch: the features one stays
    out = tmp_path / "no_features.onnx"
    block = domain.add_domain_stats(plain_model, train, labels, val, out_path=out, threads=1, taps=[],
                                    features_branch=False)
    names = [b["name"] for b in block["branches"]]
    assert names == ["thumb16", "thumb8", "thumb4", "orientation"]
    assert block["graph_vs_numpy_max_diff"] <= 0.05 and block["probabilities_unchanged"]
    clf = Classifier(out, threads=1)
    gray, far = clf.predict(gray_images(1, 10)[0]), clf.predict(red())
    assert gray.in_domain is True and far.in_domain is False
    words = {b.name: b.words for b in clf.spec.domain.branches}
    assert len(far.domain_reasons) == 1 and any(words[n] in far.domain_reasons[0] for n in names)
    assert "the model's features" not in far.domain_reasons[0]
    spec = read_spec(out)
    (terms,) = domain.run_outputs(out, spec, gray_images(4, 11), ["domain_terms"])
    assert terms.shape == (4, 4)


def test_bench_graphcost_pairs_the_file_with_a_copy_without_its_check(domain_model, tmp_path, capsys):
    """cxr-bench graphcost: the file against a copy without its domain graph, in one worker process;
    a row per file with both timings, the graph's node count and the cost; a file without the graph
    to measure is one line and exit status 2."""
    import onnx

    from cxr_bench.cli import main

    out = tmp_path / "out"
    assert main(["graphcost", "--model", str(domain_model[0]), "--processes", "2", "--blocks", "2", "--warmup", "1",
                 "--calls", "3", "--threads", "1", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "graphcost.json").read_text())
    (row,) = rep["rows"]
    nodes = sum(1 for n in onnx.load(str(domain_model[0])).graph.node if n.name.startswith(domain.PREFIX))
    assert row["graph_nodes"] == nodes > 10
    assert len(row["processes"]) == 2 and row["off_ms"] > 0 and row["on_ms"] > 0
    assert row["cost"] == pytest.approx(float(np.median([p["on_ms"] / p["off_ms"] - 1 for p in row["processes"]])))
    assert row["cost_min"] <= row["cost"] <= row["cost_max"]
    assert "out-of-domain check" in (out / "graphcost.md").read_text()
    capsys.readouterr()
    assert main(["graphcost", "--model", str(domain_model[0]), "--graph", "heatmap", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no heatmap graph" in err[0]


def test_a_failed_check_leaves_the_file_as_it_was(plain_model, tmp_path, monkeypatch):
    """add_domain_stats writes beside the target and replaces it only after its checks: when one
    fails (here the graph-vs-numpy check, forced), the file keeps its bytes and no temp file stays."""
    import shutil

    target = tmp_path / "m.onnx"
    shutil.copy(plain_model, target)
    before = target.read_bytes()
    train = gray_images(120, 3)
    monkeypatch.setattr(domain.fit, "reference_scores", lambda branches, inputs: np.full(len(inputs[0]), 1e6))
    with pytest.raises(RuntimeError, match="numpy reference"):
        domain.add_domain_stats(target, train, np.arange(120) % 2, gray_images(60, 4), threads=1)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_operating_points_choose_a_stricter_or_looser_check(domain_model, plain_model):
    """cxr-export writes a threshold per validation flag rate; domain_flag_rate picks (and interpolates)
    one, domain_threshold sets one, and a stricter point flags about its share of validation-like images."""
    path, block, _ = domain_model
    spec = read_spec(path)
    points = spec.domain_operating_points
    rates = [r for r, _ in points]
    assert rates == sorted(rates) and {0.01, 0.05, 0.10, 0.30} <= set(rates)
    assert [t for _, t in points] == sorted((t for _, t in points), reverse=True)
    assert dict(points)[0.05] == pytest.approx(block["threshold"])  # the file's own point is one of them
    val = gray_images(200, 1)  # the images the thresholds were set on
    own = Classifier(path, threads=1)
    strict = Classifier(path, threads=1, domain_flag_rate=0.30)
    assert own.domain_threshold == pytest.approx(Classifier(path, threads=1, domain_flag_rate=0.05).domain_threshold)
    assert strict.domain_threshold == pytest.approx(dict(points)[0.30])
    assert strict.domain_threshold < own.domain_threshold
    mid = Classifier(path, threads=1, domain_flag_rate=0.125).domain_threshold  # between 0.10 and 0.15
    assert dict(points)[0.15] <= mid <= dict(points)[0.10]
    flagged = np.mean([p.in_domain is False for p in strict.predict(list(val))])
    assert abs(flagged - 0.30) <= 0.02 and np.mean([p.in_domain is False for p in own.predict(list(val))]) <= 0.07
    assert strict.info()["domain_check"]["threshold_source"].startswith("flags 30.0% of the file's validation")
    # results made with another threshold than the file's name it (SR parameters and UIDs, FHIR Device)
    from cxr_hospital.report import model_identity

    assert not own.domain_threshold_overridden and model_identity(own).domain_threshold is None
    assert not Classifier(path, threads=1, domain_flag_rate=0.05).domain_threshold_overridden  # the file's own
    assert strict.domain_threshold_overridden and model_identity(strict).domain_threshold == strict.domain_threshold
    assert [p["flag_rate"] for p in own.info()["domain_check"]["operating_points"]] == rates
    # a raw threshold: just below one image's score flags it, just above does not
    score = own.predict(val[0]).domain_score
    assert Classifier(path, threads=1, domain_threshold=score - 1e-3).predict(val[0]).in_domain is False
    assert Classifier(path, threads=1, domain_threshold=score + 1e-3).predict(val[0]).in_domain is True
    with pytest.raises(ValueError, match="not both"):
        Classifier(path, threads=1, domain_threshold=1.0, domain_flag_rate=0.1)
    with pytest.raises(ModelError, match=r"outside the file's operating points \(0.01 to 0.3\)"):
        Classifier(path, threads=1, domain_flag_rate=0.5)
    with pytest.raises(ValueError, match="domain_check=True"):
        Classifier(path, threads=1, domain_flag_rate=0.1, domain_check=False)
    with pytest.raises(ModelError, match="has no domain statistics"):
        Classifier(plain_model, threads=1, domain_threshold=1.0)


def predating_points(src, dst, **provenance):
    """A copy of the file at ``src`` as files exported before operating points were written (its
    provenance updated with ``provenance``)."""
    from cxr_export.modelio import write_spec

    dst.write_bytes(src.read_bytes())
    data = read_spec(dst).to_dict()
    del data["domain"]["operating_points"]
    write_spec(dst, read_spec(dst).updated({"domain": data["domain"], "provenance": {**data["provenance"],
                                                                                    **provenance}}))
    return dst


def test_a_file_without_operating_points_takes_a_threshold(domain_model, tmp_path):
    old = predating_points(domain_model[0], tmp_path / "old.onnx")
    assert read_spec(old).domain_operating_points == []
    with pytest.raises(ModelError, match="has no domain operating points .* pass a domain threshold"):
        Classifier(old, threads=1, domain_flag_rate=0.1)
    assert Classifier(old, threads=1, domain_threshold=0.25).domain_threshold == 0.25


@pytest.mark.parametrize("points", [
    "0.05", [{"flag_rate": 0.1, "threshold": 1.0}, {"flag_rate": 0.05, "threshold": 1.5}],  # rates decrease
    [{"flag_rate": 0.05, "threshold": 1.0}, {"flag_rate": 0.1, "threshold": 1.5}],  # thresholds increase
    [{"flag_rate": 1.0, "threshold": 1.0}], [{"flag_rate": 0.05, "threshold": "1.5"}],
    [{"flag_rate": 0.05, "threshold": float("nan")}], [[0.05, 1.5]]])
def test_malformed_operating_points_are_refused(points):
    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="tiny", features_output="features").to_dict()
    spec["outputs"]["domain_score"] = "domain_score"
    spec["domain"] = {"threshold": 1.5, "operating_points": points}
    with pytest.raises(ModelError, match="domain.operating_points must be a list"):
        ModelSpec(spec).validate()


def test_cli_domain_strictness(domain_model, images):
    path, _, _ = domain_model
    gray, color = images
    r = run_cli("--model", str(path), "--format", "jsonl", "--domain-threshold", "1e9", str(gray), str(color))
    assert r.returncode == 0 and [json.loads(x)["in_domain"] for x in r.stdout.decode().splitlines()] == [True, True]
    r = run_cli("--model", str(path), "--format", "jsonl", "--domain-threshold=-1e9", str(gray), str(color))
    assert [json.loads(x)["in_domain"] for x in r.stdout.decode().splitlines()] == [False, False]
    r = run_cli("--model", str(path), "--domain-flag-rate", "10%", "--info", "--json")
    dom = json.loads(r.stdout)["domain_check"]
    assert r.returncode == 0 and dom["threshold"] == pytest.approx(dict(read_spec(path).domain_operating_points)[0.10])
    for bad, why in ((["--domain-flag-rate", "2"], "not a share in (0, 1)"),
                     (["--domain-threshold", "x"], "is not a number"),
                     (["--domain-flag-rate", "0.1", "--domain-threshold", "1"], "not allowed with argument")):
        r = run_cli("--model", str(path), *bad, str(gray))
        assert r.returncode == 2 and why in r.stderr.decode(), r.stderr
    r = run_cli("--model", str(path), "--domain-flag-rate", "0.6", str(gray))
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "outside the file's operating points" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_bench_domain_operating_points(domain_model, xrays224, tmp_path, capsys):
    """The table comes from the file's points; for a file without them, from its validation images,
    rebuilt from the training folder and checked against the file's split hash."""
    import shutil

    from cxr_bench.cli import main
    from cxr_train import data as D

    data = tmp_path / "data"
    for f in xrays224[:3] + xrays224[6:9]:
        (data / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f.parent.name / f.name)
    out = tmp_path / "out"
    assert main(["domain", "--model", str(domain_model[0]), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--out", str(out), "-q"]) == 0
    (m,) = json.loads((out / "domain.json").read_text())["models"]
    op = m["operating_points"]
    assert op["source"] == "the file's domain.operating_points"
    assert [p["flag_rate"] for p in op["points"]] == [r for r, _ in read_spec(domain_model[0]).domain_operating_points]
    assert all(p["flagged"]["noise"] == 1.0 for p in op["points"])
    assert "## Operating points" in (out / "domain.md").read_text()
    # a file without points, whose provenance names the split of a small training folder
    from PIL import Image

    train = tmp_path / "train"
    for label, imgs in (("NORMAL", gray_images(40, 21)), ("PNEUMONIA", gray_images(40, 22))):
        (train / label).mkdir(parents=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(train / label / f"person{i}{label[0]}_x_{i}.png")
    tr, va = D.split_by_patient(D.scan_folder(train), 0.1, 0)
    old = predating_points(domain_model[0], tmp_path / "old.onnx", split_hash=D.manifest(tr, va, train, 0, 0.1)["hash"])
    assert main(["domain", "--model", str(old), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--validation", str(train), "--out", str(out), "-q"]) == 0
    (m,) = json.loads((out / "domain.json").read_text())["models"]
    op = m["operating_points"]
    assert op["source"] == f"quantiles of the domain scores of the file's {len(va)} validation images"
    assert all(abs(p["validation"] - p["flag_rate"]) <= 1.0 / len(va) + 1e-9 or p["flag_rate"] < 1.0 / len(va)
               for p in op["points"])
    # the wrong folder is refused, naming both splits
    predating_points(domain_model[0], old, split_hash="0" * 64)
    capsys.readouterr()
    assert main(["domain", "--model", str(old), "--data", str(data), "--count", "2", "--kinds", "noise",
                 "--validation", str(train), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "the split rebuilt from it (seed 0, validation fraction 0.1, all images) is" in err
    assert "not the model's 00000000" in err
