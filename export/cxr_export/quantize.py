"""Static INT8 quantization (QDQ, calibrated) and the accuracy gate that guards it.

The defaults (:class:`Int8Config`) and why: ``docs/export.md``; the spec records them as they are.

Examples:
    >>> Int8Config(calibration_method="percentile").weights
    's8 per-channel'
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from cxr_infer.metrics import binary_metrics
from cxr_infer.model import graph_input
from cxr_infer.spec import ModelSpec

from .modelio import open_model

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("u8", "s8")


@dataclass(frozen=True)
class Int8Config:
    """How an INT8 file is made and gated; stored in its spec under ``export.int8``."""

    calibration_method: str = "minmax"
    calibration_count: int = 300
    per_channel: bool = True
    activations: str = "u8"
    reduce_range: bool = True
    nodes_excluded: Tuple[str, ...] = ()
    max_drop_points: float = 1.0
    batch_size: int = 16
    format: str = field(default="QDQ", init=False)
    calibration_source: str = field(default="training part of the split", init=False)

    def __post_init__(self) -> None:
        if self.calibration_method not in METHODS:
            raise ValueError(f"calibration method {self.calibration_method!r}: choose one of {', '.join(METHODS)}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations {self.activations!r}: choose one of {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "nodes_excluded", tuple(self.nodes_excluded))

    @property
    def weights(self) -> str:
        return "s8 per-channel" if self.per_channel else "s8 per-tensor"

    def spec_block(self) -> Dict[str, Any]:
        """The settings as the spec records them."""
        block = {key: value for key, value in asdict(self).items() if key != "batch_size"}
        return dict(block, nodes_excluded=list(self.nodes_excluded), weights=self.weights)


def _reader(pixels: np.ndarray, spec: ModelSpec, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self.batches, None)

        def rewind(self):
            self.batches = ({spec.input_name: graph_input(spec, pixels[i:i + batch_size])}
                            for i in range(0, len(pixels), batch_size))

    return Reader()


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_pixels: np.ndarray, spec: ModelSpec,
                  config: Int8Config = Int8Config()) -> Path:
    """Write a QDQ INT8 model calibrated on ``calib_pixels`` (uint8 NHWC, runtime-preprocessed)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .additions import strip_additions

    if len(calib_pixels) == 0:
        raise ValueError("no calibration images")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        # the quantizer sees the classifier alone: the graph additions are fitted anew on the INT8 file
        core = Path(tmp) / "core.onnx"
        model = onnx.load(str(fp32_path), load_external_data=True)
        strip_additions(model)
        onnx.save(model, str(core))
        prep = Path(tmp) / "prep.onnx"
        quant_pre_process(str(core), str(prep), skip_symbolic_shape=True)
        # the Softmax stays FP32: quantized, every probability would be a multiple of 1/255
        prepared = onnx.load(str(prep), load_external_data=False).graph.node
        exclude_nodes = list(config.nodes_excluded) + [n.name for n in prepared if n.op_type == "Softmax" and n.name]
        calibration = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}[config.calibration_method]
        quantize_static(
            str(prep), str(out_path), _reader(calib_pixels, spec, config.batch_size),
            quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=config.reduce_range,
            activation_type=QuantType.QUInt8 if config.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=calibration, nodes_to_exclude=exclude_nodes,
            extra_options={"CalibMovingAverage": False, "ActivationSymmetric": config.activations == "s8"},
        )
    return out_path


def count_qdq(path: str | Path) -> Dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a model has."""
    import onnx

    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    return {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}


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
        return dict(self.__dict__, accuracy_drop_points=self.accuracy_drop_points)

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
