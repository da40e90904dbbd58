"""Tiny, valid cxr ONNX models and small image folders for the cxr-bench tests (torch-free).

Example:
    >>> path = tiny_model(tmp_path / "tiny.onnx", image_size=32)   # doctest: +SKIP
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_224 = SHARED_DATA / "chest_xray_224" / "test"
FULLRES_TRAIN = SHARED_DATA / "kermany_fullres" / "train"


def tiny_model(path: Path, image_size: int = 32, precision: str = "fp32", threshold: float = 0.5,
               weight: float = 4.0, backbone: str = "resnet50", spec_overrides: Optional[dict] = None) -> Path:
    """Write a cxr model: GlobalAveragePool -> Gemm -> Softmax, with a valid ``cxr.spec``.

    P(positive) falls with the mean of the normalised red channel (darker lungs, hazier image), so it is a (poor but
    real) classifier with spread-out probabilities. ``precision="fp16"`` makes a float16 input.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cxr_infer.spec import SPEC_KEY, ModelSpec

    fp16 = precision == "fp16"
    in_type = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes = []
    first = "input"
    if fp16:
        nodes.append(helper.make_node("Cast", ["input"], ["input_f32"], to=TensorProto.FLOAT))
        first = "input_f32"
    nodes += [
        helper.make_node("GlobalAveragePool", [first], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "Wf" if fp16 else "W", "Bf" if fp16 else "B"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    wdt = np.float16 if fp16 else np.float32  # fp16 weights: the graph really is fp16 (cxr-bench checks)
    w = np.array([[weight, 0.0, 0.0], [-weight, 0.0, 0.0]], dtype=wdt)
    b = np.array([0.0, 0.3], dtype=wdt)
    if fp16:
        nodes[1:1] = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
                      helper.make_node("Cast", ["B"], ["Bf"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "tiny_cxr",
        [helper.make_tensor_value_info("input", in_type, ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cxr-tests")
    model.ir_version = 8
    spec = ModelSpec.new(backbone=backbone, precision=precision, threshold=threshold, image_size=image_size,
                         provenance={"note": "tiny test model"})
    if fp16:
        spec = spec.updated({"input": {**spec.to_dict()["input"], "dtype": "float16"}})
    spec = spec.updated(spec_overrides or {})
    helper.set_model_props(model, {SPEC_KEY: spec.to_json()})
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def small_dataset(dest: Path, per_label: int = 4, source: Path = TEST_224) -> Path:
    """Copy the first ``per_label`` images of each label of ``source`` into ``dest``."""
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        out = dest / sub.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(sub.iterdir())[:per_label]:
            shutil.copy(f, out / f.name)
    return dest


def fullres_images(count: int = 2) -> List[Path]:
    """The first ``count`` full-size JPEGs (alternating labels) of the shared originals."""
    normal = sorted((FULLRES_TRAIN / "NORMAL").iterdir())
    pneu = sorted((FULLRES_TRAIN / "PNEUMONIA").iterdir())
    out: List[Path] = []
    for a, b in zip(normal, pneu):
        out += [a, b]
    return out[:count]
