"""Read and write the ``cxr.spec`` of an ONNX file with ``onnx``; open one with the runtime's model layer.

Running a model file always goes through :class:`cxr_infer.model.ModelFile` (one session
set-up, one graph input, one output runner for the Classifier, export and benchmarks);
this module only adds what needs the ``onnx`` package: reading a spec without building a
session, and writing one into a file.

Example:
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


def strip_added_nodes(model, prefix: str, outputs: Sequence[str]) -> None:
    """Remove the nodes and initializers whose names start with ``prefix`` and the graph
    ``outputs`` that cxr added after export (in place): how a domain graph or heatmap is replaced."""
    graph = model.graph
    keep = [n for n in graph.node if not n.name.startswith(prefix)]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if not t.name.startswith(prefix)]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    kept_outputs = [o for o in graph.output if o.name not in outputs]
    del graph.output[:]
    graph.output.extend(kept_outputs)


#: the spec's output roles of the graphs cxr adds after export, and the spec block of each
ADDED_OUTPUTS = {"domain": ("domain_score", "domain_terms"), "heatmap": ("heatmap",)}


def spec_without_graphs(spec: ModelSpec, domain: bool = False, heatmap: bool = False) -> ModelSpec:
    """A copy of ``spec`` that no longer names the domain graph's (``domain``) and/or the Grad-CAM
    graph's (``heatmap``) outputs, nor has their blocks: the spec of the file without them."""
    return spec.without_additions([name for name, gone in (("domain", domain), ("heatmap", heatmap)) if gone])


def write_without_graphs(path: str | Path, out: str | Path, domain: bool, heatmap: bool) -> Path:
    """A copy of the file ``path`` at ``out`` without its domain graph (``domain``) and/or Grad-CAM
    graph (``heatmap``), its spec adjusted (:func:`spec_without_graphs`)."""
    import onnx

    from .domain import strip_domain_graph
    from .heatmap import strip_heatmap_graph

    model = onnx.load(str(path), load_external_data=True)
    if domain:
        strip_domain_graph(model)
    if heatmap:
        strip_heatmap_graph(model)
    onnx.save(model, str(out))
    write_spec(out, spec_without_graphs(read_spec(path), domain, heatmap))
    return Path(out)
