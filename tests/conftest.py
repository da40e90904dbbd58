"""Shared fixtures: data paths and a torch-free builder of tiny, valid (and broken) cxr ONNX models.

The tiny model is GlobalAveragePool -> Flatten -> MatMul -> Add -> Softmax: its positive-class
probability rises with image brightness (about 0.5 at gray level 115), so a dark image is
NORMAL and a bright one PNEUMONIA, and any pixel change shows in its score.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: the shared data (``CXR_TEST_DATA`` points elsewhere, e.g. the copy a GPU machine gets)
DATA = Path(os.environ.get("CXR_TEST_DATA") or REPO.parent / "shared" / "data")
FULLRES = DATA / "kermany_fullres" / "train"
SMALL = DATA / "chest_xray_224" / "train"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("runtime", "train", "export", "benchmarks", "hospital"))

sys.path.insert(0, str(REPO / "runtime"))

from cxr_infer.spec import SPEC_KEY, ModelSpec  # noqa: E402

GAIN = 3.0  # logit difference per unit of mean normalised input


def shipped_models() -> list:
    """models/shipped.json's entries (path, backbone, README row), the default first."""
    return json.loads((REPO / "models" / "shipped.json").read_text())["models"]


def fullres_pairs() -> list:
    """(original, its 224 counterpart) for every full-size original; skips when data is absent."""
    if not FULLRES.is_dir():
        pytest.skip(f"shared data not found at {FULLRES}")
    pairs = []
    for f in sorted(FULLRES.glob("*/*.jpeg")):
        twin = SMALL / f.parent.name / f.name
        if twin.is_file():
            pairs.append((f, twin))
    return pairs


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def xray() -> Path:
    """A small full-size original (mode L JPEG), quick to decode."""
    pairs = fullres_pairs()
    return min((f for f, _ in pairs), key=lambda f: f.stat().st_size if "NORMAL" in str(f) else 1 << 60)


@pytest.fixture(scope="session")
def xrays224() -> list:
    if not SMALL.is_dir():
        pytest.skip(f"shared data not found at {SMALL}")
    return sorted(SMALL.glob("NORMAL/*.jpeg"))[:6] + sorted(SMALL.glob("PNEUMONIA/*.jpeg"))[:6]


def build_model(*, labels: Sequence[str] = ("NORMAL", "PNEUMONIA"), positive: Optional[str] = None,
                size: int = 224, batch: Any = "N", dtype: str = "float32", input_name: str = "input",
                prob_output: str = "probabilities", features: bool = False, in_graph: bool = False,
                threshold: float = 0.5, spec: Any = "default", graph_input_name: Optional[str] = None,
                graph_input_shape: Optional[list] = None, graph_prob_output: Optional[str] = None,
                graph_labels: Optional[int] = None, precision: Optional[str] = None) -> bytes:
    """Serialized bytes of a tiny cxr model.

    ``spec``: ``"default"`` (a valid spec matching the graph), ``None`` (no metadata), a dict
    (the raw spec, used as is) or a str (stored verbatim). The ``graph_*`` arguments make the
    graph disagree with its spec.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    labels = list(labels)
    positive = positive or labels[-1]
    n_out = graph_labels or len(labels)
    in_name = graph_input_name or input_name
    out_name = graph_prob_output or prob_output
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    shape = graph_input_shape or [batch, 3, size, size]

    nodes, inits = [], []
    x = in_name
    if dtype == "float16":
        nodes.append(helper.make_node("Cast", [x], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    if in_graph:
        mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1) * 255.0
        std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1) * 255.0
        inits += [numpy_helper.from_array(mean, "mean255"), numpy_helper.from_array(std, "std255")]
        nodes += [helper.make_node("Sub", [x, "mean255"], ["xc"]), helper.make_node("Div", ["xc", "std255"], ["xn"])]
        x = "xn"
    channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 3
    w = np.zeros((channels, n_out), np.float32)
    pos = labels.index(positive) if positive in labels else n_out - 1
    w[:, pos] = GAIN / channels
    b = np.array([0.0 if j == pos else -0.5 * j for j in range(n_out)], np.float32)  # others: fixed logits
    inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["feat"], axis=1),
        helper.make_node("MatMul", ["feat", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [out_name], axis=1),
    ]
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, n_out])]
    if features:
        nodes.append(helper.make_node("Identity", ["feat"], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 3]))
    graph = helper.make_graph(nodes, "tiny_cxr", [helper.make_tensor_value_info(in_name, elem, shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cxr-tests")
    model.ir_version = 8
    if spec == "default":
        spec = ModelSpec.new(backbone="tiny", precision=precision or ("fp16" if dtype == "float16" else "fp32"),
                             threshold=threshold, image_size=size, labels=labels, input_name=input_name,
                             prob_output=prob_output, features_output="features" if features else None,
                             provenance={"note": "built by tests/conftest.py"}).to_dict()
        spec["positive_label"] = positive
        spec["input"]["dtype"] = dtype
        spec["normalization"]["in_graph"] = in_graph
    if spec is not None:
        text = spec if isinstance(spec, str) else json.dumps(spec)
        onnx.helper.set_model_props(model, {SPEC_KEY: text})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected_probability(pixels: np.ndarray) -> float:
    """What the tiny two-label model answers for ``uint8`` pixels ``(H, W, 3)`` (float64 reference)."""
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    norm = (pixels.reshape(-1, 3).astype(np.float64).mean(axis=0) / 255.0 - mean) / std
    z = GAIN * norm.mean()
    return float(1.0 / (1.0 + np.exp(-z)))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir) -> Path:
    """A valid fp32 tiny cxr model file (dynamic batch)."""
    path = model_dir / "tiny.onnx"
    path.write_bytes(build_model())
    return path


@pytest.fixture(scope="session")
def write_model(model_dir):
    """``write_model(name, **build_model_kwargs) -> Path``."""
    def write(name: str, **kwargs: Any) -> Path:
        path = model_dir / name
        path.write_bytes(build_model(**kwargs))
        return path
    return write


@pytest.fixture(scope="session")
def classifier(tiny_model):
    from cxr_infer import Classifier
    return Classifier(tiny_model, threads=1)


def run_cli(*args: str, stdin: Optional[bytes] = None, env: Optional[Dict[str, str]] = None,
            prelude: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m cxr_infer.cli ARGS`` (or ``prelude`` then the CLI) in a fresh process."""
    full_env = dict(os.environ, PYTHONPATH=PYTHONPATH, PYTHONIOENCODING="utf-8")
    full_env.pop("CXR_TIMING", None)
    full_env.update(env or {})
    if prelude is None:
        cmd = [sys.executable, "-m", "cxr_infer.cli", *args]
    else:
        code = prelude + "\nimport sys\nfrom cxr_infer.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=full_env, timeout=timeout, cwd=str(REPO))
