"""The shipped model files are what README.md, docs/, models/README.md and the benchmark reports say.

Files: models/shipped.json lists them: ``runtime/cxr_infer/models/default.onnx`` (the embedded
default, INT8 MobileNetV3-Large), and ResNet50, VGG16 and InceptionV3 INT8 in ``models/``. Fast
and torch-free: onnxruntime for the runtime view, onnx (the test extra) to read the graph's nodes.

Arithmetic differs between CPUs (AVX2, AVX-512 VNNI, AMX run different INT8 kernels), so the
checks hold labels and in-domain status of an image far from its thresholds, never exact digits.
The figures README.md and docs/ report (the Results table, the out-of-domain flag rates) are matched
to benchmarks/results/*.json by the files' SHA-256: README's numbers were measured on these
very bytes, so a re-shipped model without re-measured reports fails here.
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "runtime"))

from conftest import shipped_models  # noqa: E402

from cxr_infer import Classifier  # noqa: E402
from cxr_infer.spec import SPEC_KEY, ModelSpec  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SAMPLE = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"
DEFAULT = REPO / "runtime" / "cxr_infer" / "models" / "default.onnx"

#: pooled feature width of each shipped backbone
FEATURES = {"resnet50": 2048, "vgg16": 512, "inception_v3": 2048, "mobilenet_v3_large": 960}
#: file -> (backbone, README's name in its Results table, pooled feature width of the backbone), from
#: models/shipped.json, the one list of the shipped files
SHIPPED = {m["path"]: (m["backbone"], m["name"], FEATURES[m["backbone"]]) for m in shipped_models()}
FILES = list(SHIPPED)
#: README: "at each model's threshold (0.5)"; the labels every cxr model uses.
THRESHOLD = 0.5
LABELS = ["NORMAL", "PNEUMONIA"]
#: README: the domain score is the largest of eight tests (six for ResNet50, seven for InceptionV3), its
#: threshold flags 5% of validation: three thumbnails, the orientation ratio and the stage statistics
#: (VGG16: four stage ends; ResNet50: two activations inside bottleneck blocks; InceptionV3: three stage
#: ends; MobileNetV3-Large: the residual Adds closing its first four stages), no pooled features
_LAYOUT = {"thumb16", "thumb8", "thumb4", "orientation"}
DOMAIN_BRANCHES = {"vgg16": _LAYOUT | {"stage1", "stage2", "stage3", "stage4"},
                   "resnet50": _LAYOUT | {"stage1", "stage2"},
                   "inception_v3": _LAYOUT | {"stage1", "stage2", "stage3"},
                   "mobilenet_v3_large": _LAYOUT | {"stage1", "stage2", "stage3", "stage4"}}
#: README: the shipped models' intended use (the Kermany training data)
INTENDED_USE = {"age_years": [1, 5], "age_margin_years": 0.5, "body_parts": ["CHEST"], "views": ["PA", "AP"],
                "modalities": ["CR", "DX", "DR"]}
#: the stage tensors taller than 32 rows, read on every second row (VGG16 and MobileNetV3: 112 and 56 rows;
#: InceptionV3: 54)
ROWS_SUBSAMPLED = {"vgg16": 2, "resnet50": 0, "inception_v3": 1, "mobilenet_v3_large": 2}
#: README: the Grad-CAM grid of each backbone at 224 x 224
HEATMAP_GRID = {"vgg16": [14, 14], "resnet50": [14, 14], "inception_v3": [25, 25], "mobilenet_v3_large": [7, 7]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def sessions():
    import onnxruntime as ort

    out = {}
    for rel in FILES:
        sess = ort.InferenceSession(str(REPO / rel), providers=["CPUExecutionProvider"])
        out[rel] = sess
    return out


@pytest.fixture(scope="module")
def specs(sessions):
    return {rel: ModelSpec.from_json(s.get_modelmeta().custom_metadata_map[SPEC_KEY], source=rel)
            for rel, s in sessions.items()}


@pytest.fixture(scope="module")
def graphs():
    onnx = pytest.importorskip("onnx")
    return {rel: onnx.load(str(REPO / rel)) for rel in FILES}


@pytest.fixture(scope="module")
def readme() -> str:
    return (REPO / "README.md").read_text()


@pytest.mark.parametrize("rel", FILES)
def test_file_is_a_real_model_not_a_pointer(rel):
    path = REPO / rel
    assert path.is_file(), f"{rel} is missing"
    head = path.read_bytes()[:200]
    assert not head.startswith(b"version https://git-lfs"), f"{rel} is a Git LFS pointer, not the model"
    assert path.stat().st_size > 5_000_000, f"{rel}: {path.stat().st_size} bytes is too small for a CNN"


@pytest.mark.parametrize("rel", FILES)
def test_spec_says_backbone_int8_labels_threshold(rel, specs):
    spec = specs[rel]
    backbone = SHIPPED[rel][0]
    assert spec.backbone == backbone
    assert spec.precision == "int8"
    assert spec.labels == LABELS and spec.positive_label == "PNEUMONIA"
    assert spec.threshold == pytest.approx(THRESHOLD)
    assert spec.image_size == (224, 224)
    assert spec.input_dtype == "float32"
    assert spec.to_dict()["resize"]["method"] == "bicubic" and spec.to_dict()["resize"]["convert"] == "RGB"


@pytest.mark.parametrize("rel", FILES)
def test_graph_is_int8_qdq_with_fp32_softmax(rel, graphs, specs):
    """README: static INT8 (QDQ, per-channel S8 weights, U8 activations); runtime README: the
    output Softmax in FP32. The graph's QDQ counts are the ones cxr-export recorded."""
    g = graphs[rel].graph
    ops = collections.Counter(n.op_type for n in g.node)
    recorded = specs[rel].to_dict()["export"]["int8"]["qdq_nodes"]
    assert ops["QuantizeLinear"] == recorded["QuantizeLinear"] > 0
    assert ops["DequantizeLinear"] == recorded["DequantizeLinear"] > 0
    int8_weights = [t for t in g.initializer if t.data_type == 3]  # TensorProto.INT8
    uint8_points = [t for t in g.initializer if t.data_type == 2]  # TensorProto.UINT8
    assert int8_weights, "no INT8 weights"
    assert uint8_points, "no U8 activation zero points"
    producer = {o: n for n in g.node for o in n.output}
    prob = specs[rel].prob_output
    assert producer[prob].op_type == "Softmax", f"{prob} is made by {producer[prob].op_type}, not an FP32 Softmax"
    consumers = [n.op_type for n in g.node if prob in n.input]
    assert "QuantizeLinear" not in consumers


@pytest.mark.parametrize("rel", FILES)
def test_outputs_exist_and_the_spec_names_them(rel, sessions, specs):
    spec = specs[rel]
    outs = {o.name: o for o in sessions[rel].get_outputs()}
    named = spec.to_dict()["outputs"]
    for role in ("probabilities", "features", "domain_score", "domain_terms", "heatmap"):
        assert named.get(role), f"the spec names no {role} output"
        assert named[role] in outs, f"the spec's {role} output {named[role]!r} is not a graph output"
    assert spec.prob_output == named["probabilities"]
    assert spec.features_output == named["features"]
    assert spec.domain_output == named["domain_score"]
    assert outs[spec.prob_output].shape[-1] == len(LABELS)
    assert outs[spec.features_output].shape[-1] == SHIPPED[rel][2]
    assert len(outs[spec.domain_output].shape) == 1  # one score per image
    assert outs[spec.heatmap_output].shape[1:] == HEATMAP_GRID[SHIPPED[rel][0]]


@pytest.mark.parametrize("rel", FILES)
def test_intended_use_and_heatmap_blocks(rel, specs):
    """README: every shipped file says its intended use (header checks on) and carries Grad-CAM."""
    spec = specs[rel]
    assert {k: spec.to_dict()["intended_use"][k] for k in INTENDED_USE} == INTENDED_USE
    assert spec.to_dict()["heatmap"]["grid"] == HEATMAP_GRID[SHIPPED[rel][0]]
    assert spec.to_dict()["heatmap"]["probabilities_unchanged"] == "bit for bit"


@pytest.mark.parametrize("rel", FILES)
def test_operating_points_calibration_and_heatmap_switch(rel, specs):
    """Every shipped file carries operating points (so --domain-flag-rate works), a temperature fitted on
    its validation images that left the threshold at 0.5, and a signed map computed only on request."""
    spec = specs[rel]
    rates = [r for r, _ in spec.domain_operating_points]
    assert 0.05 in rates and 0.10 in rates
    assert dict(spec.domain_operating_points)[0.05] == pytest.approx(spec.domain_threshold)
    cal = spec.calibration
    assert cal is not None and cal.applied and cal.images > 0 and cal.ece_after < cal.ece_before
    assert cal.threshold_after == pytest.approx(THRESHOLD) and spec.threshold == pytest.approx(THRESHOLD)
    assert spec.heatmap.signed and spec.heatmap.switch in spec.switches


@pytest.mark.parametrize("rel", FILES)
def test_domain_flag_rate_10_percent_works(rel):
    """cxr-infer --domain-flag-rate 10% on each shipped file: the threshold of that operating point."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "cxr_infer.cli", "--model", str(REPO / rel), "--domain-flag-rate",
                          "10%", "--info", "--json"], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "runtime"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    check = json.loads(out.stdout)["domain_check"]
    assert check["threshold"] == pytest.approx(dict(ModelSpec.from_json(
        json.dumps(json.loads(out.stdout)["spec"]), source=rel).domain_operating_points)[0.10])
    assert check["threshold"] < json.loads(out.stdout)["spec"]["domain"]["threshold"]


@pytest.mark.parametrize("rel", FILES)
def test_domain_threshold_and_branches(rel, specs):
    spec = specs[rel]
    dom = spec.to_dict()["domain"]
    assert spec.domain_threshold is not None and np.isfinite(spec.domain_threshold) and spec.domain_threshold > 0
    assert {b["name"] for b in dom["branches"]} == DOMAIN_BRANCHES[SHIPPED[rel][0]]
    assert dom["target_flag_rate"] == pytest.approx(0.05)
    assert dom["flag_rate_validation"] == pytest.approx(0.05, abs=0.01)  # "flags 5% of the validation images"
    assert dom["probabilities_unchanged"] is True


@pytest.mark.parametrize("rel", FILES)
def test_domain_graph_reads_stage_tensors_as_integers(rel, graphs, specs):
    """README: the check reads the quantized stage tensors through a Cast (no DequantizeLinear of
    its own: that, beside the fused convolution reading the same tensor, was most of its cost); a
    tensor taller than 32 rows on every second row, a Slice of the integers before the Cast."""
    nodes = [n for n in graphs[rel].graph.node if n.name.startswith("cxr_domain/")]
    assert nodes and not any(n.op_type == "DequantizeLinear" for n in nodes)
    producer = {o: n for n in graphs[rel].graph.node for o in n.output}
    stage_reads = [n for n in nodes if n.op_type == "Cast" and "/stage" in n.name]
    assert len(stage_reads) == len(DOMAIN_BRANCHES[SHIPPED[rel][0]]) - len(_LAYOUT)
    sliced = [producer[n.input[0]] for n in stage_reads if producer[n.input[0]].op_type == "Slice"]
    read = [producer[n.input[0]] for n in stage_reads if producer[n.input[0]].op_type != "Slice"] + \
        [producer[s.input[0]] for s in sliced]
    assert all(n.op_type == "QuantizeLinear" for n in read)
    steps = specs[rel].to_dict()["domain"]["stage_row_steps"]
    assert len(sliced) == sum(k == 2 for k in steps) == ROWS_SUBSAMPLED[SHIPPED[rel][0]]


def test_default_model_is_the_embedded_one_and_labels_the_sample():
    """README quick start: the embedded default (an INT8 MobileNetV3-Large) classifies the bundled
    sample; samples/README.md: the sample is class PNEUMONIA, a test image, and the default gives it a
    probability and a domain score far from their thresholds on every CPU."""
    clf = Classifier()
    assert Path(clf.info()["model"]).resolve() == DEFAULT.resolve()
    spec = clf.info()["spec"]
    assert spec["backbone"] == SHIPPED[FILES[0]][0] and spec["precision"] == "int8"
    r = clf.predict(str(SAMPLE))
    assert r.label == "PNEUMONIA"
    assert r.probability > 0.7
    assert r.in_domain is True
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("rel", FILES[1:])
def test_other_shipped_models_run_through_the_classifier(rel):
    r = Classifier(str(REPO / rel)).predict(str(SAMPLE))
    assert r.label in LABELS
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert r.in_domain is True  # a test X-ray, score far below the threshold


#: full-size Kermany originals (in domain) the image check may flag: the test split's rate is 3-5%
#: and benchmarks/results/domain.md measures 3.8% on these; a check that reacts to how the
#: runtime decodes and resizes a file (rather than to the X-ray) flags most of them.
MAX_ORIGINALS_FLAGGED = 0.08


@pytest.fixture(scope="module")
def originals():
    """Every full-size original (the runtime decodes and resizes them as any user's file)."""
    from conftest import fullres_pairs

    return [f for f, _ in fullres_pairs()]


@pytest.mark.parametrize("rel", FILES)
def test_full_size_originals_pass_the_image_check(rel, originals):
    """Kermany X-rays handed over at their original size are as in-domain as the 224 test split.
    (The test split was resized offline and re-saved as JPEG; foreign images take the runtime's
    path. A finest-scale texture test looked excellent on adults for that reason alone.)"""
    clf = Classifier(str(REPO / rel), threads=2)
    results = clf.predict([str(f) for f in originals], batch_size=16)
    flagged = [f.name for f, r in zip(originals, results) if r.in_domain is False]
    assert len(originals) >= 100 and all(r.in_domain is not None for r in results)
    assert len(flagged) / len(originals) <= MAX_ORIGINALS_FLAGGED, flagged


def _readme_row(readme: str, name: str) -> dict:
    """README's Results table row ``name`` as {column header: cell}."""
    header = None
    for line in readme.splitlines():
        if not line.strip().startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif cells[0] == name:
            return dict(zip(header, cells))
    raise AssertionError(f"README.md's Results table has no row {name!r}")


@pytest.mark.parametrize("rel", FILES)
def test_readme_results_row_was_measured_on_these_bytes(rel, readme):
    """README's Results row of each shipped model = benchmarks/results/accuracy-shipped.json's
    entry whose SHA-256 is this file's (accuracy, precision, recall, F1, AUC, TP/FP/TN/FN)."""
    report = json.loads((RESULTS / "accuracy-shipped.json").read_text())
    sha = _sha256(REPO / rel)
    entry = [m for m in report["models"] if m.get("sha256") == sha]
    assert entry, (f"{rel} (sha256 {sha[:12]}) is not among the models measured in "
                   f"benchmarks/results/accuracy-shipped.json: re-measure after re-shipping a model")
    m = entry[0]
    assert m["backbone"] == SHIPPED[rel][0] and m["precision"] == "int8"
    row = _readme_row(readme, SHIPPED[rel][1])
    at = m["at_threshold"]
    assert at["threshold"] == pytest.approx(THRESHOLD)
    assert row["Accuracy"] == f"{at['accuracy']:.4f}", \
        f"README accuracy {row['Accuracy']} vs measured {at['accuracy']:.4f}"
    for col, key in (("F1", "f1"), ("AUC", "auc"), ("Precision", "precision"), ("Recall", "recall")):
        assert row[col] == f"{at[key]:.4f}", f"README {col} {row[col]} vs measured {at[key]:.4f}"
    assert row["TP/FP/TN/FN"] == f"{at['tp']}/{at['fp']}/{at['tn']}/{at['fn']}"


@pytest.mark.parametrize("rel", FILES)
def test_readme_latency_was_measured_on_these_bytes(rel, readme):
    """README's ms (b1) = benchmarks/results/latency-checks-b1.json's median for this very file as
    it is (no graph removed), batch 1, as Classifier runs it: probabilities and domain check, the map
    not asked for."""
    report = json.loads((RESULTS / "latency-checks-b1.json").read_text())
    sha = _sha256(REPO / rel)
    rows = [r for r in report["results"] if r.get("sha256") == sha and r["batch"] == 1 and r.get("domain_check")
            and not r.get("heatmap") and not r.get("removed")]
    assert len(rows) == 1, f"{rel}: no as-shipped batch-1 row in latency-checks-b1.json (re-measure it)"
    row = _readme_row(readme, SHIPPED[rel][1])
    assert float(row["ms (b1)"]) == pytest.approx(rows[0]["median_ms"], rel=0.006)


@pytest.mark.parametrize("page", ["README.md", "docs/intended-use.md"])
def test_stated_domain_flag_rates_were_measured_on_these_bytes(page):
    """README and the intended-use page: "3.5 to 5.0% of the test X-rays are flagged", and 100% of
    every out-of-domain kind; benchmarks/results/domain.json holds it for these bytes."""
    match = re.search(r"([\d.]+) to ([\d.]+)%\s+of the test X-rays are flagged",
                      " ".join((REPO / page).read_text().split()))
    assert match, f"{page} no longer states the test split's flag rate"
    lo, hi = float(match.group(1)), float(match.group(2))
    report = json.loads((RESULTS / "domain.json").read_text())
    by_sha = {m["sha256"]: m for m in report["models"]}
    rates = []
    for rel in FILES:
        m = by_sha.get(_sha256(REPO / rel))
        assert m, f"{rel} is not among the models measured in benchmarks/results/domain.json"
        rates.append(round(100 * m["in_domain"]["flag_rate"], 1))
        flagged = {kind: k["flag_rate"] for kind, k in m["kinds"].items() if kind != "mirrored"}  # mirrored: a control
        assert all(rate == 1.0 for rate in flagged.values()), flagged
    assert min(rates) == lo and max(rates) == hi, (rates, lo, hi)


def test_readme_names_the_shipped_files(readme):
    for rel in FILES:
        assert rel in readme, f"README.md does not name {rel}"
    models_readme = (REPO / "models" / "README.md").read_text()
    for rel in FILES:
        assert rel in models_readme, f"models/README.md does not name {rel}"


def test_docs_operating_points_were_measured_on_these_bytes():
    """docs/intended-use.md's table of thresholds set to flag 10% of the validation images = the
    operating points benchmarks/results/domain.json measured on these bytes (cxr-bench domain
    --validation)."""
    report = json.loads((RESULTS / "domain.json").read_text())
    by_sha = {m["sha256"]: m for m in report["models"]}
    text = " ".join((REPO / "docs" / "intended-use.md").read_text().split())
    for rel in FILES:
        m = by_sha.get(_sha256(REPO / rel))
        assert m and m.get("operating_points"), f"{rel}: no operating points in benchmarks/results/domain.json"
        (p,) = [p for p in m["operating_points"]["points"] if p["flag_rate"] == pytest.approx(0.10)]
        name = SHIPPED[rel][1].split()[1]  # "MobileNetV3", "ResNet50", "VGG16", "InceptionV3"
        row = re.search(r"\| " + re.escape(name) + r"(?: \(default\))? \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+)% \| "
                        r"([\d.]+)% \| 100% \|", text)
        assert row, f"docs/intended-use.md's operating-point table has no row for {name}"
        assert float(row.group(1)) == pytest.approx(p["threshold"], abs=6e-5)
        assert float(row.group(2)) == round(100 * p["flagged"]["test split"], 1)
        assert float(row.group(3)) == round(100 * p["flagged"]["originals"], 1)
        assert float(row.group(4)) == round(100 * p["flagged"]["adult_frontal"], 1)
        assert p["flagged"]["lateral"] == p["flagged"]["ct"] == 1.0
        assert all(p["flagged"][k] == 1.0 for k in m["kinds"] if k != "mirrored")
