"""FP16 conversion for GPUs: weights and compute in half precision, inputs and outputs kept FP32."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from cxr_infer.spec import ModelSpec

from .modelio import open_model


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Convert with onnxruntime's float16 tool, ``keep_io_types`` so callers still send FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(fp32_path))
    m16 = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=False)
    onnx.save(m16, str(out_path))
    return Path(out_path)


def fp16_parity(fp32_path: str | Path, fp16_path: str | Path, spec: ModelSpec, pixels: np.ndarray) -> Dict:
    """Max |difference in probability| FP16 vs FP32, on the GPU when one is available, else CPU."""
    import onnxruntime as ort

    from cxr_infer.errors import CXRError

    # not "auto": that takes OpenVINO where it is installed, and this checks the onnxruntime providers
    device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    try:
        model16 = open_model(fp16_path, spec=spec, device=device)
        p16 = model16.positive_probability(pixels)
    except CXRError as exc:  # an execution provider without FP16 kernels
        return {"checked": False, "why": f"could not run the FP16 model: {exc}"}
    p32 = open_model(fp32_path, spec=spec).positive_probability(pixels)
    finite = np.isfinite(p16)
    return {"checked": True, "provider": model16.providers[0], "images": int(len(pixels)),
            "non_finite": int(np.sum(~finite)),
            "max_abs_diff_probability": float(np.max(np.abs(p16 - p32)[finite])) if finite.any() else None}


def fp16_refusal(parity: Dict | None) -> str | None:
    """Why an FP16 file must not be written, or None: probabilities that are not numbers mean values
    in the graph went beyond float16's range (+-65504) and became inf, then NaN."""
    if not parity or not parity.get("checked") or not parity.get("non_finite"):
        return None
    return (f"the FP16 file gives no probability (inf or NaN) for {parity['non_finite']} of {parity['images']} "
            "validation images: values inside its graph exceed float16's range (+-65504); use the FP32 file on "
            "the GPU (--force writes the FP16 file anyway)")
