"""Read and write the ``cxr.spec`` of an ONNX file with ``onnx``; open one with the runtime's model layer.

Running a model file always goes through :class:`cxr_infer.model.ModelFile` (one session
set-up, one graph input, one output runner for the Classifier, export and benchmarks);
this module only adds what needs the ``onnx`` package: reading a spec without building a
session, writing one into a file, and writing a copy without some of the graphs added after
export (:func:`write_without`).

Examples:
    >>> from cxr_export.modelio import read_spec   # doctest: +SKIP
    >>> read_spec("model.onnx").precision           # doctest: +SKIP
    'int8'
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from cxr_infer.errors import ModelError
from cxr_infer.model import ModelFile
from cxr_infer.spec import SPEC_KEY, ModelSpec, spec_from_metadata


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


def open_model(model_path: str | Path, threads: int = 0, spec: Optional[ModelSpec] = None,
               device: str = "cpu") -> ModelFile:
    """The model file opened for checks (``threads`` 0: every core), optionally with the ``spec``
    about to be written into it (a file fresh from conversion has none of its own yet)."""
    return ModelFile(model_path, device=device, threads=threads or None, spec=spec)


def write_without(path: str | Path, out: str | Path, names: Sequence[str]) -> Path:
    """A copy of the file ``path`` at ``out`` without the graph additions ``names`` (keys of
    :data:`cxr_export.additions.ADDITIONS`, e.g. ``["domain"]``), its spec adjusted to match
    (:meth:`~cxr_infer.spec.ModelSpec.without_additions`).

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
