"""Everything cxr-bench takes from ``cxr_export`` and ``cxr_train``, one small function each, importing
its package inside the function: ``import cxr_bench`` loads neither, no other module of this package
imports them, and a missing one is one line saying what to install.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .util import BenchError

if TYPE_CHECKING:  # pragma: no cover
    from cxr_infer.spec import ModelSpec

#: How a user adds what a benchmark needs to an existing model file (the export side's commands).
ADD_DOMAIN_HINT = "python -m cxr_export.domain RUN_DIR MODEL.onnx --data TRAIN_DIR"
ADD_HEATMAP_HINT = "python -m cxr_export.heatmap MODEL.onnx"

TORCH_PACKAGES = ("torch", "torchvision", "safetensors")


@contextmanager
def _needs(what: str) -> Iterator[None]:
    """A missing ``cxr_export``, ``cxr_train`` or torch inside as one :class:`BenchError` line naming the install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        name = (exc.name or "").split(".")[0]
        if name in TORCH_PACKAGES:
            raise BenchError(f"{what} needs PyTorch ({name!r} is not installed): pip install 'cxr[bench,train]'"
                             ) from None
        if name in ("cxr_export", "cxr_train"):
            raise BenchError(f"{what} needs the {name} package, which ships with cxr: pip install 'cxr[bench]'"
                             ) from None
        raise


# ---- cxr_export
def read_graph(path: str | Path) -> Tuple[Any, "ModelSpec"]:
    """The ``onnx.ModelProto`` of a model file (weights not loaded) and its validated spec; one
    :class:`~cxr_infer.errors.ModelError` line for a missing, unreadable or non-cxr file."""
    with _needs("reading a model file's graph"):
        from cxr_export.modelio import load_onnx, spec_of
    graph = load_onnx(path)
    return graph, spec_of(graph, str(path))


def read_spec(path: str | Path) -> "ModelSpec":
    """The validated spec of a model file, read without starting an inference session."""
    return read_graph(path)[1]


def write_without(path: str | Path, out: str | Path, names: Sequence[str]) -> Path:
    """A copy of the model file ``path`` at ``out`` without the graph additions ``names`` (keys of
    :data:`cxr_infer.spec.GRAPH_ADDITIONS`: ``domain``, ``heatmap``), its spec adjusted."""
    from cxr_infer.spec import GRAPH_ADDITIONS

    unknown = [n for n in names if n not in GRAPH_ADDITIONS]
    if unknown:
        raise BenchError(f"unknown graph addition(s) {unknown}: expected {', '.join(GRAPH_ADDITIONS)}")
    with _needs("removing a graph from a model file"):
        from cxr_export.modelio import write_without as _write_without
    return Path(_write_without(path, out, list(names)))


def domain_operating_points(val_scores: Any) -> List[Tuple[float, float]]:
    """``(flag rate, threshold)`` pairs set on validation domain scores as ``cxr-export`` sets a file's."""
    with _needs("setting domain-check operating points"):
        from cxr_export.domain import operating_points
    return [(p["flag_rate"], p["threshold"]) for p in operating_points(val_scores)]


# ---- cxr_train
def checkpoint_summary(folder: str | Path) -> Dict[str, Any]:
    """What a ``cxr-train`` run folder holds (backbone, weights file and size, weights stored as fp16),
    read without torch; ``FileNotFoundError`` or ``ValueError`` where it is not a run folder."""
    with _needs("--checkpoint"):
        from cxr_train.checkpoint import checkpoint_summary as summary
    return summary(folder)


def load_checkpoint(folder: str | Path, map_location: str = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """The trained PyTorch model of a run folder (fp32, eval mode) and its metadata (needs torch)."""
    with _needs("the PyTorch eager baseline (--checkpoint)"):
        from cxr_train.checkpoint import load_checkpoint as load

        return load(folder, map_location=map_location)  # imports torch inside


def validation_split(train_dir: str | Path, seed: int, val_fraction: float, max_images: Optional[int]
                     ) -> Tuple[List[Path], str]:
    """The validation images of a training folder as ``cxr-train`` splits it, and the split's hash
    (:func:`cxr_export.images.rebuild_split`, which ``python -m cxr_export.calibrate`` uses too)."""
    with _needs("--validation"):
        from cxr_export.images import rebuild_split
    val, digest = rebuild_split(train_dir, seed, val_fraction, max_images)
    return [Path(train_dir) / rel for rel, _ in val], digest


# ---- child processes
def source_roots() -> List[str]:
    """The folders holding ``cxr_export`` and ``cxr_train`` (found, not imported), for a child's ``PYTHONPATH``."""
    roots = []
    for name in ("cxr_train", "cxr_export"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin:
            roots.append(str(Path(spec.origin).resolve().parents[1]))
    return roots
