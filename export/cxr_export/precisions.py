"""The precisions ``cxr-export`` writes beside the FP32 file, one table entry each: :data:`PRECISIONS`.

An entry converts the FP32 file, verifies the result and says what the spec records;
:func:`write_precision` runs any entry the same way. Adding one: ``CONTRIBUTING.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from cxr_infer.spec import ModelSpec

from .modelio import write_spec
from .quantize import Int8Config


@dataclass
class ExportJob:
    """What every precision needs: the FP32 file and its spec, the run's images and settings."""

    fp32: Path
    spec: ModelSpec
    ckpt_dir: Path
    data_dir: Optional[Path]
    size: Tuple[int, int]
    int8: Int8Config = field(default_factory=Int8Config)
    parity_pixels: Optional[np.ndarray] = None
    gate_count: Optional[int] = None
    threads: int = 0


@dataclass(frozen=True)
class Outcome:
    """A converted file: where, the spec block written into it, one line for people, a refusal."""

    path: Path
    block: Dict[str, Any]
    line: str
    refusal: Optional[str] = None


@dataclass(frozen=True)
class Precision:
    """One precision: ``make(job, out) -> (spec block, summary line, refusal or None)``."""

    name: str
    suffix: str
    description: str
    make: Callable[[ExportJob, Path], Tuple[Dict[str, Any], str, Optional[str]]]


def _make_int8(job: ExportJob, out: Path) -> Tuple[Dict[str, Any], str, Optional[str]]:
    from . import images
    from .quantize import count_qdq, gate, quantize_int8

    if job.data_dir is None:
        raise ValueError("--int8 needs --calibration DIR (the training folder the checkpoint was trained on)")
    config = job.int8
    calibration, _, _ = images.image_set(job.ckpt_dir, job.data_dir, "train", config.calibration_count, job.size)
    quantize_int8(job.fp32, out, calibration, job.spec, config)
    val_px, val_y, _ = images.image_set(job.ckpt_dir, job.data_dir, "val", job.gate_count, job.size)
    result = gate(job.fp32, out, job.spec, val_px, val_y, job.threads)
    block = dict(config.spec_block(), calibration_images=int(len(calibration)), qdq_nodes=count_qdq(out),
                 gate=result.as_dict())
    refusal = None
    if result.accuracy_drop_points > config.max_drop_points:
        refusal = (f"INT8 accuracy drops {result.accuracy_drop_points:.2f} points (> --max-drop "
                   f"{config.max_drop_points}); try --calibration-method percentile or entropy, more "
                   "--calibration-count, or --exclude-nodes; --force writes it anyway")
    return block, result.line(), refusal


def _make_fp16(job: ExportJob, out: Path) -> Tuple[Dict[str, Any], str, Optional[str]]:
    import json

    from .fp16 import convert_fp16, fp16_parity, fp16_refusal

    convert_fp16(job.fp32, out)
    parity = fp16_parity(job.fp32, out, job.spec, job.parity_pixels) if job.parity_pixels is not None else None
    return {"io_types": "float32 (kept)", "parity": parity}, f"parity: {json.dumps(parity)}", fp16_refusal(parity)


PRECISIONS: Dict[str, Precision] = {
    p.name: p for p in (
        Precision("int8", "_int8", "static INT8 (QDQ) for CPUs, calibrated on training images, gated on validation",
                  _make_int8),
        Precision("fp16", "_fp16", "FP16 weights and compute for GPUs, FP32 inputs and outputs", _make_fp16),
    )
}


def write_precision(name: str, job: ExportJob) -> Outcome:
    """Convert ``job.fp32`` to precision ``name`` beside it, verify it, and write its spec."""
    precision = PRECISIONS[name]
    out = job.fp32.with_name(job.fp32.stem + precision.suffix + job.fp32.suffix)
    block, line, refusal = precision.make(job, out)
    # FP32's block, less its parity with PyTorch (that describes another graph), plus this precision's
    record = {k: v for k, v in job.spec.to_dict().get("export", {}).items() if k != "parity"}
    write_spec(out, job.spec.updated({"precision": name, "export": {**record, name: block}}))
    return Outcome(out, block, line, refusal)
