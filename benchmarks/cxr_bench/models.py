"""Open a cxr model file: its spec, an onnxruntime session, and a description for reports.

Example:
    >>> m = open_model("runs/export/resnet50_int8.onnx", threads=2)   # doctest: +SKIP
    >>> m.spec.backbone, m.spec.precision, m.name                     # doctest: +SKIP
    ('resnet50', 'int8', 'resnet50_int8')
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from cxr_infer.errors import ModelError
from cxr_infer.spec import SPEC_KEY, ModelSpec

from .util import BenchError, sha256_file

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int):
    """Fixed-thread session options used for every measurement (intra = ``threads``, inter = 1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def providers_for(device: str) -> List[str]:
    """The execution providers for ``device`` (``cpu`` or ``cuda``), checked to be available."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise BenchError(f"unknown device {device!r}: use --device cpu or --device cuda")
    available = ort.get_available_providers()
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise BenchError(f"--device {device}: onnxruntime {ort.__version__} has no {wanted} "
                         f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install '.[gpu]') "
                         f"or use --device cpu")
    return [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])


@dataclass
class OnnxModel:
    """A loaded cxr model: path, parsed spec, session and load time."""

    path: Path
    spec: ModelSpec
    session: Any
    load_s: float
    file_bytes: int
    sha256: str = ""
    providers: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The file name without ``.onnx``: how reports name this model."""
        return self.path.stem

    @property
    def label(self) -> str:
        """``backbone precision`` from the spec, e.g. ``resnet50 int8``."""
        return f"{self.spec.backbone} {self.spec.precision}"

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Positive-class probabilities of a model-input batch (see :func:`model_input`)."""
        out = self.session.run([self.spec.prob_output], {self.spec.input_name: x})[0]
        return np.asarray(out, dtype=np.float64)[:, self.spec.positive_index]

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Positive-class probabilities of ``uint8`` pixels ``(N, H, W, 3)``."""
        return self.predict_proba(model_input(self.spec, pixels))

    def describe(self) -> Dict[str, Any]:
        """The facts about this file that a report must show."""
        prov = self.spec.raw.get("provenance", {})
        return {
            "name": self.name,
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "sha256": self.sha256,
            "backbone": self.spec.backbone,
            "precision": self.spec.precision,
            "threshold": self.spec.threshold,
            "threshold_rule": self.spec.raw.get("threshold_rule") or prov.get("threshold_rule"),
            "image_size": list(self.spec.image_size),
            "labels": self.spec.labels,
            "positive_label": self.spec.positive_label,
            "input_dtype": self.spec.input_dtype,
            "providers": self.providers,
            "load_s": self.load_s,
            "provenance": prov,
        }


def resize_method(spec: ModelSpec) -> str:
    """The spec's resize method (``bicubic`` for every cxr model so far)."""
    return str(spec.raw["resize"].get("method", "bicubic"))


def model_input(spec: ModelSpec, pixels: np.ndarray) -> np.ndarray:
    """The graph input for ``uint8`` pixels ``(N, H, W, 3)``, exactly as the runtime's
    ``Classifier`` builds it: :func:`to_input` with the spec's mean/std (or raw pixels when
    normalisation is in the graph), cast to the spec's input dtype."""
    from cxr_infer.preprocess import to_input

    dtype = np.float16 if spec.input_dtype == "float16" else np.float32
    if spec.normalization_in_graph:
        return np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2), dtype=dtype)
    x = to_input(pixels, spec.mean, spec.std)
    return x if dtype is np.float32 else x.astype(dtype)


QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeLinear", "QLinearAdd", "QLinearGlobalAveragePool"}


def _load_onnx(path: Path):
    import onnx

    _check_file(path)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise ModelError(f"{path}: not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None


def _spec_of(m, path: Path) -> ModelSpec:
    meta = {p.key: p.value for p in m.metadata_props}
    if SPEC_KEY not in meta:
        raise ModelError(f"{path}: no '{SPEC_KEY}' in the ONNX metadata: not a cxr model (export it with cxr-export)")
    return ModelSpec.from_json(meta[SPEC_KEY], source=str(path))


def read_spec(path: Path) -> ModelSpec:
    """The validated spec of ``path`` without building an inference session."""
    path = Path(path)
    return _spec_of(_load_onnx(path), path)


def inspect_model(path: Path) -> Tuple[ModelSpec, Dict[str, Any], List[str]]:
    """The spec, facts read from the graph itself, and warnings where the two disagree.

    The precision a graph implies: ``int8`` when it holds quantization ops, ``fp16`` when most
    float weights are float16, else ``fp32``. A spec that claims otherwise is reported (a
    report must never file an INT8 model's figures under FP32).

    Example:
        >>> spec, facts, warnings = inspect_model(Path("m_int8.onnx"))  # doctest: +SKIP
        >>> facts["implied_precision"], warnings                        # doctest: +SKIP
        ('int8', [])
    """
    from onnx import TensorProto

    path = Path(path)
    m = _load_onnx(path)
    spec = _spec_of(m, path)
    ops: Dict[str, int] = {}
    for node in m.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    quant = sum(n for op, n in ops.items() if op in QUANT_OPS)
    f16 = sum(1 for t in m.graph.initializer if t.data_type == TensorProto.FLOAT16)
    f32 = sum(1 for t in m.graph.initializer if t.data_type == TensorProto.FLOAT)
    implied = "int8" if quant else ("fp16" if f16 > f32 else "fp32")
    facts = {"nodes": sum(ops.values()), "quant_ops": quant, "fp16_initializers": f16, "fp32_initializers": f32,
             "implied_precision": implied, "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                                                        default=None)}
    warnings = []
    if implied != spec.precision:
        warnings.append(f"{path}: its spec says precision {spec.precision!r} but the graph looks {implied} "
                        f"({quant} quantization ops, {f16} fp16 / {f32} fp32 weight tensors); check the export")
    return spec, facts, warnings


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: no such model file (pass the path of a .onnx file made by cxr-export)")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; pass the .onnx file itself")


def open_model(path: str | Path, device: str = "cpu", threads: int = 1, checksum: bool = True) -> OnnxModel:
    """Build a session for ``path`` with fixed threads; the spec is read from its metadata."""
    import onnxruntime as ort

    path = Path(path)
    _check_file(path)
    providers = providers_for(device)
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=providers)
    except Exception as exc:
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    load_s = time.perf_counter() - t0
    meta = sess.get_modelmeta().custom_metadata_map
    if SPEC_KEY not in meta:
        raise ModelError(f"{path}: no '{SPEC_KEY}' in the ONNX metadata: not a cxr model (export it with cxr-export)")
    spec = ModelSpec.from_json(meta[SPEC_KEY], source=str(path))
    names = [o.name for o in sess.get_outputs()]
    if spec.prob_output not in names:
        raise ModelError(f"{path}: spec names output {spec.prob_output!r} but the graph has {names}")
    return OnnxModel(path=path, spec=spec, session=sess, load_s=load_s, file_bytes=path.stat().st_size,
                     sha256=sha256_file(path) if checksum else "", providers=list(sess.get_providers()))
