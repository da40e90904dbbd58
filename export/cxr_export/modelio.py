"""Read and write the ``cxr.spec`` of an ONNX file, and run a model file on pixels.

Example:
    >>> from cxr_export.modelio import read_spec   # doctest: +SKIP
    >>> read_spec("model.onnx").precision           # doctest: +SKIP
    'int8'
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cxr_infer.preprocess import to_input
from cxr_infer.spec import SPEC_KEY, ModelSpec


def write_spec(model_path: str | Path, spec: ModelSpec, out_path: Optional[str | Path] = None) -> Path:
    """Store ``spec`` (validated) in the model's ``metadata_props`` under ``cxr.spec``."""
    import onnx

    spec.validate(str(model_path))
    m = onnx.load(str(model_path), load_external_data=True)
    keep = [p for p in m.metadata_props if p.key != SPEC_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    entry = m.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, spec.to_json()
    m.producer_name = "cxr"
    out = Path(out_path or model_path)
    onnx.save(m, str(out))
    return out


def read_spec(model_path: str | Path) -> ModelSpec:
    """The validated spec of a model file (``ModelError`` when absent or invalid)."""
    import onnx

    from cxr_infer.errors import ModelError

    m = onnx.load(str(model_path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == SPEC_KEY:
            return ModelSpec.from_json(p.value, str(model_path))
    raise ModelError(f"{model_path}: no cxr.spec in the model's metadata")


def session(model_path: str | Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=so, providers=list(providers))


def run_probs(sess, spec: ModelSpec, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Positive-class probabilities of uint8 NHWC ``pixels`` through an ORT session."""
    out = []
    dtype = np.float16 if spec.input_dtype == "float16" else np.float32
    for i in range(0, len(pixels), batch_size):
        x = to_input(pixels[i:i + batch_size], spec.mean, spec.std).astype(dtype)
        probs = sess.run([spec.prob_output], {spec.input_name: x})[0]
        out.append(probs[:, spec.positive_index].astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0)
