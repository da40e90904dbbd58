"""Open a cxr model file for a benchmark: the runtime's :class:`~cxr_infer.model.ModelFile` plus
the facts a report must show (file size, SHA-256), and what the graph itself says it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from cxr_infer.info import file_sha256 as sha256_file
from cxr_infer.model import ModelFile
from cxr_infer.spec import ModelSpec


@dataclass
class OnnxModel:
    """A model file opened through the runtime's model layer, with its size and checksum."""

    path: Path
    model: ModelFile
    file_bytes: int
    sha256: str = ""

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def name(self) -> str:
        """The file name without ``.onnx``: how reports name this model."""
        return self.path.stem

    @property
    def label(self) -> str:
        """``backbone precision`` from the spec, e.g. ``resnet50 int8``."""
        return f"{self.spec.backbone} {self.spec.precision}"

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Positive-class probabilities of ``uint8`` pixels ``(N, H, W, 3)``."""
        return self.model.positive_probability(pixels, batch_size=None)

    def describe(self) -> Dict[str, Any]:
        """The facts about this file that a report must show."""
        spec = self.spec
        return {"name": self.name, "path": str(self.path), "file_bytes": self.file_bytes, "sha256": self.sha256,
                "backbone": spec.backbone, "precision": spec.precision, "threshold": spec.threshold,
                "threshold_rule": spec.provenance.threshold_rule, "image_size": list(spec.image_size),
                "labels": spec.labels, "positive_label": spec.positive_label, "input_dtype": spec.input_dtype,
                "providers": self.model.providers, "load_s": self.model.load_s,
                "provenance": spec.to_dict()["provenance"]}


QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeLinear", "QLinearAdd", "QLinearGlobalAveragePool"}


def inspect_model(path: Path) -> Tuple[ModelSpec, Dict[str, Any], List[str]]:
    """The spec, facts read from the graph itself, and a warning where the precision the graph implies
    (``int8`` with quantization ops, ``fp16`` with mostly float16 weights, else ``fp32``) is not the spec's.

    Examples:
        >>> spec, facts, warnings = inspect_model(Path("m_int8.onnx"))  # doctest: +SKIP
        >>> facts["implied_precision"], warnings                        # doctest: +SKIP
        ('int8', [])
    """
    from onnx import TensorProto

    from .upstream import read_graph

    path = Path(path)
    m, spec = read_graph(path)
    quant = sum(1 for node in m.graph.node if node.op_type in QUANT_OPS)
    f16 = sum(1 for t in m.graph.initializer if t.data_type == TensorProto.FLOAT16)
    f32 = sum(1 for t in m.graph.initializer if t.data_type == TensorProto.FLOAT)
    implied = "int8" if quant else ("fp16" if f16 > f32 else "fp32")
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    facts = {"nodes": len(m.graph.node), "quant_ops": quant, "fp16_initializers": f16, "fp32_initializers": f32,
             "implied_precision": implied, "opset": opset}
    warnings = [] if implied == spec.precision else [
        f"{path}: its spec says precision {spec.precision!r} but the graph looks {implied} "
        f"({quant} quantization ops, {f16} fp16 / {f32} fp32 weight tensors); check the export"]
    return spec, facts, warnings


def open_model(path: str | Path, device: str = "cpu", threads: int = 1, checksum: bool = True) -> OnnxModel:
    """Open ``path`` with fixed threads through the runtime's model layer (spec and graph checked)."""
    path = Path(path)
    model = ModelFile(path, device=device, threads=threads)
    return OnnxModel(path=path, model=model, file_bytes=path.stat().st_size,
                     sha256=sha256_file(path) if checksum else "")
