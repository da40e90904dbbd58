"""Everything cxr-bench takes from the export and training packages, as small declared functions.

Benchmarks measure model files through the runtime (:mod:`cxr_infer`); a few commands also need
something only ``cxr_export`` or ``cxr_train`` knows: a file's graph and spec read with ``onnx``, a
copy of a file without one of its added graphs, the domain check's operating-point rule, a
training run's split or checkpoint. Each of those is one function here, importing its package
inside the function, so ``import cxr_bench`` and ``cxr-bench --help`` load neither, and no other
module of this package imports them (``tests/test_bench_registry.py`` holds that).

``cxr_export`` and ``cxr_train`` ship in every install of cxr; the functions here need no torch
except :func:`load_checkpoint` (``cxr-bench latency --checkpoint``: ``pip install 'cxr[bench,train]'``).
Where a package is missing the error says what to install, in one line.

Examples:
    >>> from cxr_bench import upstream
    >>> graph, spec = upstream.read_graph("models/resnet50_int8.onnx")     # doctest: +SKIP
    >>> upstream.write_without("m.onnx", "/tmp/bare.onnx", ["domain"])     # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .util import BenchError

if TYPE_CHECKING:  # pragma: no cover
    from cxr_infer.spec import ModelSpec

#: How a user adds what a benchmark needs to an existing model file (the export side's commands).
ADD_DOMAIN_HINT = "python -m cxr_export.domain RUN_DIR MODEL.onnx --data TRAIN_DIR"
ADD_HEATMAP_HINT = "python -m cxr_export.heatmap MODEL.onnx"

TORCH_PACKAGES = ("torch", "torchvision", "safetensors")


def _missing(exc: ModuleNotFoundError, what: str) -> BenchError:
    """One line naming the install for a missing cxr package or torch; other names re-raised."""
    name = (exc.name or "").split(".")[0]
    if name in TORCH_PACKAGES:
        return BenchError(f"{what} needs PyTorch ({name!r} is not installed): pip install 'cxr[bench,train]'")
    if name in ("cxr_export", "cxr_train"):
        return BenchError(f"{what} needs the {name} package, which ships with cxr: pip install 'cxr[bench]'")
    raise exc


# ---------------------------------------------------------------- cxr_export


def read_graph(path: str | Path) -> Tuple[Any, "ModelSpec"]:
    """The ``onnx.ModelProto`` of a model file (weights not loaded) and its validated spec; one
    :class:`~cxr_infer.errors.ModelError` line for a missing, unreadable or non-cxr file."""
    try:
        from cxr_export.modelio import load_onnx, spec_of
    except ModuleNotFoundError as exc:
        raise _missing(exc, "reading a model file's graph") from None
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
    try:
        from cxr_export.modelio import write_without as _write_without
    except ModuleNotFoundError as exc:
        raise _missing(exc, "removing a graph from a model file") from None
    return Path(_write_without(path, out, list(names)))


def domain_operating_points(val_scores: Any) -> List[Tuple[float, float]]:
    """``(flag rate, threshold)`` pairs set on validation domain scores the way ``cxr-export``
    writes a file's ``domain.operating_points``: the same rates, the same quantile rule."""
    try:
        from cxr_export.domain import operating_points
    except ModuleNotFoundError as exc:
        raise _missing(exc, "setting domain-check operating points") from None
    return [(p["flag_rate"], p["threshold"]) for p in operating_points(val_scores)]


# ---------------------------------------------------------------- cxr_train


def checkpoint_summary(folder: str | Path) -> Dict[str, Any]:
    """What a ``cxr-train`` run folder holds (backbone, weights file and size, whether the weights
    are stored as fp16), read without torch. ``FileNotFoundError`` or ``ValueError`` as
    :func:`cxr_train.checkpoint.checkpoint_summary` raises them."""
    try:
        from cxr_train.checkpoint import checkpoint_summary as summary
    except ModuleNotFoundError as exc:
        raise _missing(exc, "--checkpoint") from None
    return summary(folder)


def load_checkpoint(folder: str | Path, map_location: str = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """The trained PyTorch model of a run folder (fp32, eval mode) and its metadata (needs torch)."""
    try:
        from cxr_train.checkpoint import load_checkpoint as load

        return load(folder, map_location=map_location)  # imports torch inside
    except ModuleNotFoundError as exc:
        raise _missing(exc, "the PyTorch eager baseline (--checkpoint)") from None


def validation_split(train_dir: str | Path, seed: int, val_fraction: float, max_images: Optional[int]
                     ) -> Tuple[List[Path], str]:
    """The validation images of a training folder as ``cxr-train`` splits it (scanned, subsampled to
    ``max_images``, split by patient) and the split's hash, to check against a file's ``split_hash``."""
    try:
        from cxr_train import data
    except ModuleNotFoundError as exc:
        raise _missing(exc, "--validation") from None
    train, val = data.make_split(Path(train_dir), seed, val_fraction, max_images)
    return [Path(v.path) for v in val], data.manifest(train, val, Path(train_dir), seed, val_fraction)["hash"]


# ---------------------------------------------------------------- child processes


def source_roots() -> List[str]:
    """The folders holding ``cxr_export`` and ``cxr_train``, for a child process's ``PYTHONPATH``
    (a checkout keeps them in ``export/`` and ``train/``); found without importing either."""
    roots = []
    for name in ("cxr_train", "cxr_export"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin:
            roots.append(str(Path(spec.origin).resolve().parents[1]))
    return roots
