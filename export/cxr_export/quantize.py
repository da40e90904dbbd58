"""Static INT8 quantization (QDQ, calibrated) and the accuracy gate that guards it.

Defaults: per-channel signed 8-bit weights with reduced range, unsigned 8-bit activations
(S8 activations leave the residual Adds and many convolutions unfused in ONNX Runtime and
are much slower), MinMax calibration on class-balanced training images read through the
runtime's preprocessing, and the final Softmax kept in FP32 so that probabilities keep
their resolution. ``quant_pre_process`` runs first (shape inference, graph optimisation).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from cxr_infer.metrics import binary_metrics
from cxr_infer.model import graph_input
from cxr_infer.spec import ModelSpec

from .modelio import open_model, write_spec

METHODS = ("minmax", "entropy", "percentile")


class GateRefused(RuntimeError):
    """INT8 lost more accuracy than allowed on the validation images."""


def _reader(pixels: np.ndarray, spec: ModelSpec, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(pixels):
                return None
            batch = pixels[self.i:self.i + batch_size]
            self.i += batch_size
            return {spec.input_name: graph_input(spec, batch)}

        def rewind(self):
            self.i = 0

    return Reader()


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_pixels: np.ndarray, spec: ModelSpec,
                  method: str = "minmax", per_channel: bool = True, activation: str = "u8",
                  exclude_nodes: Sequence[str] = (), reduce_range: bool = False, batch_size: int = 16) -> Path:
    """Write a QDQ INT8 model calibrated on ``calib_pixels`` (uint8 NHWC, runtime-preprocessed)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    if len(calib_pixels) == 0:
        raise ValueError("no calibration images")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep.onnx"
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
        exclude_nodes = list(exclude_nodes) + output_softmax_nodes(prep)
        cal = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}[method]
        quantize_static(
            str(prep), str(out_path), _reader(calib_pixels, spec, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=cal, nodes_to_exclude=list(exclude_nodes),
            extra_options={"CalibMovingAverage": False, "ActivationSymmetric": activation == "s8"},
        )
    return out_path


def output_softmax_nodes(path: str | Path) -> list:
    """Names of the Softmax nodes, kept in FP32.

    Quantizing the Softmax would round every probability to a multiple of 1/255 (ties in the
    ROC, a coarse threshold, probabilities that do not sum to one); in FP32 it costs nothing.
    """
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return [n.name for n in m.graph.node if n.op_type == "Softmax" and n.name]


def count_qdq(path: str | Path) -> Dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a model has."""
    import onnx

    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


@dataclass
class GateResult:
    images: int
    agreement: float
    accuracy_fp32: float
    accuracy_int8: float
    auc_fp32: float
    auc_int8: float
    max_abs_diff_probability: float
    threshold: float

    @property
    def accuracy_drop_points(self) -> float:
        return 100.0 * (self.accuracy_fp32 - self.accuracy_int8)

    def as_dict(self) -> Dict:
        d = dict(self.__dict__)
        d["accuracy_drop_points"] = self.accuracy_drop_points
        return d

    def line(self) -> str:
        return (f"INT8 vs FP32 on {self.images} validation images: agreement {self.agreement:.4f}, accuracy "
                f"{self.accuracy_fp32:.4f} -> {self.accuracy_int8:.4f} ({-self.accuracy_drop_points:+.2f} points), "
                f"AUC {self.auc_fp32:.4f} -> {self.auc_int8:.4f}, max |dp| {self.max_abs_diff_probability:.4f}")


def gate(fp32_path: str | Path, int8_path: str | Path, spec: ModelSpec, pixels: np.ndarray, labels: np.ndarray,
         threads: int = 0) -> GateResult:
    """Compare INT8 with FP32 on validation pixels at the model's threshold."""
    p32 = open_model(fp32_path, threads, spec).positive_probability(pixels)
    p8 = open_model(int8_path, threads, spec).positive_probability(pixels)
    t = spec.threshold
    m32, m8 = binary_metrics(labels, p32, t), binary_metrics(labels, p8, t)
    return GateResult(images=int(len(labels)), agreement=float(np.mean((p32 >= t) == (p8 >= t))),
                      accuracy_fp32=m32["accuracy"], accuracy_int8=m8["accuracy"], auc_fp32=m32["auc"],
                      auc_int8=m8["auc"], max_abs_diff_probability=float(np.max(np.abs(p32 - p8))), threshold=t)


def finish_int8(int8_path: Path, spec: ModelSpec, settings: Dict, result: Optional[GateResult]) -> ModelSpec:
    """Write the INT8 file's spec: precision, quantization settings and the gate's figures."""
    s = spec.copy()
    s.raw["precision"] = "int8"
    s.raw.setdefault("export", {})
    s.raw["export"] = dict(s.raw["export"])
    s.raw["export"].pop("parity", None)
    s.raw["export"]["int8"] = dict(settings, qdq_nodes=count_qdq(int8_path),
                                   gate=result.as_dict() if result else None)
    write_spec(int8_path, s)
    return s
