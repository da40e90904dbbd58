"""Read and write the ``cxr.spec`` of an ONNX file with ``onnx``; open one with the runtime's model layer.

Running a file always goes through :class:`cxr_infer.model.ModelFile`; this module adds what needs
``onnx`` and what every graph addition does when it writes a file (:func:`staged`).

Examples:
    >>> read_spec("model.onnx").precision           # doctest: +SKIP
    'int8'
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cxr_infer.errors import ModelError
from cxr_infer.model import ModelFile
from cxr_infer.spec import SPEC_KEY, ModelSpec, spec_from_metadata

from .onnxgraph import keep_only


def write_spec(model_path: str | Path, spec: ModelSpec, out_path: Optional[str | Path] = None) -> Path:
    """Store ``spec`` (validated) in the model's ``metadata_props`` under ``cxr.spec``."""
    import onnx

    spec.validate(str(model_path))
    m = onnx.load(str(model_path), load_external_data=True)
    keep_only(m.metadata_props, lambda p: p.key != SPEC_KEY)
    entry = m.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, spec.to_json()
    m.producer_name = "cxr"
    out = Path(out_path or model_path)
    onnx.save(m, str(out))
    return out


def load_onnx(model_path: str | Path):
    """The ``onnx.ModelProto`` of a file (weights not loaded), or one clear :class:`ModelError`."""
    import onnx

    path = Path(model_path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file (pass the path of a .onnx file made by cxr-export)")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; pass the .onnx file itself")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise ModelError(f"{path}: not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None


def spec_of(model, source: str) -> ModelSpec:
    """The validated spec of a loaded ``onnx.ModelProto``."""
    return spec_from_metadata({p.key: p.value for p in model.metadata_props}, source)


def read_spec(model_path: str | Path) -> ModelSpec:
    """The validated spec of a model file, without building an inference session."""
    return spec_of(load_onnx(model_path), str(model_path))


def open_model(model_path: str | Path | bytes, threads: int = 0, spec: Optional[ModelSpec] = None,
               device: str = "cpu") -> ModelFile:
    """The model file opened for checks (``threads`` 0: every core), with the ``spec`` to use if given."""
    return ModelFile(model_path, device=device, threads=threads or None, spec=spec)


def write_without(path: str | Path, out: str | Path, names: Sequence[str]) -> Path:
    """A copy of ``path`` at ``out`` without the graph additions ``names``, its spec to match.

    Examples:
        >>> write_without("m.onnx", "m_plain.onnx", ["domain", "heatmap"])   # doctest: +SKIP
        PosixPath('m_plain.onnx')
    """
    import onnx

    from .additions import strip_additions

    model = onnx.load(str(path), load_external_data=True)
    strip_additions(model, names)
    onnx.save(model, str(out))
    write_spec(out, read_spec(path).without_additions(names))
    return Path(out)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A path beside ``out`` to write to, moved over ``out`` if the block succeeds, else removed."""
    path = out.with_name(out.name + ".tmp")
    try:
        yield path
        os.replace(path, out)
    finally:
        path.unlink(missing_ok=True)


def probability_change(before: np.ndarray, after: np.ndarray, spec: ModelSpec, out: Path, what: str,
                       fp16_tolerance: float) -> float:
    """The largest change of a probability; ``RuntimeError`` unless 0 (FP16 on a CPU: ``fp16_tolerance``)."""
    change = float(np.max(np.abs(np.asarray(after, np.float64) - before))) if len(after) else 0.0
    if (change != 0.0 and spec.precision != "fp16") or change > fp16_tolerance:
        raise RuntimeError(f"{out}: adding the {what} changed the probabilities by {change:.3g} (a bug)")
    return change
