"""The image check's statistics (numpy): class means and a shrunk shared covariance, per branch.

A branch is a Mahalanobis distance to the nearest class mean, with one Ledoit-Wolf-shrunk
covariance shared by the classes, or the orientation test, a log-ratio of two such distances.
Why these methods: ``docs/design/domain-check.md``.

Examples:
    >>> stats = fit_stats(np.random.default_rng(0).normal(size=(200, 6)), np.arange(200) % 2, rank=3)
    >>> stats.means.shape, stats.vectors.shape
    ((2, 6), (6, 3))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from cxr_infer.model import graph_input
from cxr_infer.spec import ModelSpec

DEFAULT_RANK = 256
THUMB, THUMB_COARSE, THUMB_COARSEST = 16, 8, 4  # thumbnail sides: the layout, coarser, the chest's overall shape
THUMB_GRIDS = (THUMB, THUMB_COARSE, THUMB_COARSEST)
STD_EPS = 1e-6      # added to a thumbnail's variance before dividing (a flat image stays finite)
LOG_EPS = 1e-6      # added to squared distances before the orientation branch's logarithm

#: How a reason names a branch (``words`` in the spec), by name; others by :func:`branch_words`.
BRANCH_WORDS: Dict[str, str] = {
    "features": "the model's features",
    "orientation": "orientation (upright versus upside down)",
    f"thumb{THUMB_COARSEST}": f"the chest's overall shape in the frame ({THUMB_COARSEST}x{THUMB_COARSEST})",
}


@dataclass
class DomainStats:
    """What the graph needs: class means [K, C], eigenvectors [C, r], eigenvalues [r], tail variance."""

    means: np.ndarray
    vectors: np.ndarray
    eigenvalues: np.ndarray
    tail_variance: float
    shrinkage: float

    def d2(self, feats: np.ndarray) -> np.ndarray:
        """Squared distance to the nearest class mean (float64): what the graph computes."""
        f = np.asarray(feats, np.float64)
        best = None
        for mu in self.means.astype(np.float64):
            z = f - mu
            p = z @ self.vectors.astype(np.float64)
            d2 = (z * z).sum(1) / self.tail_variance + (p * p) @ (1.0 / self.eigenvalues - 1.0 / self.tail_variance)
            best = d2 if best is None else np.minimum(best, d2)
        return np.maximum(best, 0.0)


@dataclass
class Branch:
    """One term of the score, ``(value - centre) / scale``: ``kind`` "distance" or "orientation" on
    ``source``, a graph output, ``"thumbnail"`` (of side ``grid``) or ``"stage"`` (of ``tensor``)."""

    name: str
    kind: str
    source: str
    stats: DomainStats
    grid: int = 0
    centre: float = 0.0
    scale: float = 1.0
    tensor: str = ""
    row_step: int = 1

    def values(self, x: np.ndarray) -> np.ndarray:
        """The raw branch value for inputs ``x`` [N, C] (features, or standardised thumbnails)."""
        if self.kind == "distance":
            return np.sqrt(self.stats.d2(x))
        if self.kind == "orientation":
            return np.log(self.stats.d2(x) + LOG_EPS) - np.log(self.stats.d2(rotate180(x, self.grid)) + LOG_EPS)
        raise ValueError(f"unknown branch kind {self.kind!r}")

    def describe(self, model_input: str) -> Dict[str, Any]:
        """The branch as the spec's ``domain.branches`` lists it, with the ``words`` a reason names it by."""
        if self.source == "thumbnail":
            src = f"{self.grid}x{self.grid} thumbnail (AveragePool) of {model_input}, standardised per image"
        elif self.source == "stage":
            src = f"channel means and standard deviations of {self.tensor}" + (
                f", read on one row in {self.row_step}" if self.row_step > 1 else "")
        else:
            src = self.source
        return {"name": self.name, "words": branch_words(self), "kind": self.kind, "input": src,
                "dim": int(self.stats.means.shape[1]), "rank": int(self.stats.vectors.shape[1]),
                "shrinkage": self.stats.shrinkage, "tail_variance": self.stats.tail_variance,
                "centre": self.centre, "scale": self.scale}


def branch_words(branch: Branch) -> str:
    """How a reason names ``branch`` (the same words the runtime uses for files written without them).

    Examples:
        >>> stats = DomainStats(np.zeros((1, 2)), np.zeros((2, 1)), np.ones(1), 1.0, 0.0)
        >>> branch_words(Branch("stage2", "distance", "stage", stats, tensor="t"))
        "image statistics at the network's stage 2"
    """
    if branch.name in BRANCH_WORDS:
        return BRANCH_WORDS[branch.name]
    if branch.source == "thumbnail":
        return f"image layout at {branch.grid}x{branch.grid}"
    if branch.source == "stage" and branch.name.startswith("stage"):
        return f"image statistics at the network's stage {branch.name[len('stage'):]}"
    return branch.name


def rotate180(x: np.ndarray, grid: int) -> np.ndarray:
    """Flattened [N, 3 * g * g] thumbnails turned upside down (180 degrees)."""
    return x.reshape(len(x), -1, grid, grid)[:, :, ::-1, ::-1].reshape(len(x), -1)


def pool_kernel(spec: ModelSpec, grid: int) -> Tuple[int, int]:
    """The AveragePool kernel (= stride) that turns the model's input into a ``grid`` x ``grid`` thumbnail."""
    w, h = spec.image_size
    return max(1, h // grid), max(1, w // grid)


def standardise(x: np.ndarray) -> np.ndarray:
    """Each row to zero mean and unit variance (what the graph does to a thumbnail)."""
    x = x - x.mean(1, keepdims=True)
    return x / np.sqrt((x * x).mean(1, keepdims=True) + STD_EPS)


def thumbnails(spec: ModelSpec, pixels: np.ndarray, grid: int = THUMB) -> np.ndarray:
    """What the graph's AveragePool and standardisation make of the input: [N, 3 * grid * grid]."""
    kh, kw = pool_kernel(spec, grid)
    out = []
    for i in range(0, len(pixels), 64):
        x = graph_input(spec, pixels[i:i + 64]).astype(np.float32)
        n, c, h, w = x.shape
        oh, ow = h // kh, w // kw
        t = x[:, :, :oh * kh, :ow * kw].reshape(n, c, oh, kh, ow, kw).mean(axis=(3, 5))
        out.append(t.reshape(n, -1).astype(np.float64))
    t = np.concatenate(out) if out else np.zeros((0, 3 * grid * grid))
    return standardise(t)


def ledoit_wolf(x: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """``(S, a, m)``: the shrunk covariance of centred rows ``x`` is ``(1 - a) S + a m I`` (Ledoit-Wolf)."""
    n, c = x.shape
    s = x.T @ x / n
    m = float(np.trace(s)) / c
    delta = max(float((s * s).sum()) / c - m * m, 0.0)
    x2 = (x * x).sum(1)
    beta = (float((x2 * x2).sum()) / n - float((s * s).sum())) / (c * n)
    beta = min(max(beta, 0.0), delta)
    a = 0.0 if delta == 0.0 else beta / delta
    return s, a, m


def fit_stats(feats: np.ndarray, labels: np.ndarray, rank: int = DEFAULT_RANK) -> DomainStats:
    """Class means and the shrunk shared covariance of ``feats``: its top ``rank`` eigenpairs, and the
    mean of the other eigenvalues."""
    f = np.asarray(feats, np.float64)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    if len(f) < 2 or not classes:
        raise ValueError("domain statistics need at least two feature rows")
    means = np.stack([f[labels == k].mean(0) for k in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    s, a, m = ledoit_wolf(centred)
    lam, vec = np.linalg.eigh(s)
    lam, vec = lam[::-1], vec[:, ::-1]
    shrunk = (1.0 - a) * np.maximum(lam, 0.0) + a * m
    shrunk = np.maximum(shrunk, max(1e-12, 1e-9 * float(shrunk[0])))  # a floor, so that the inverse stays finite
    r = int(min(rank, f.shape[1]))
    tail = float(shrunk[r:].mean()) if r < f.shape[1] else float(shrunk[-1])
    return DomainStats(means=means.astype(np.float32), vectors=np.ascontiguousarray(vec[:, :r], np.float32),
                       eigenvalues=shrunk[:r].astype(np.float64), tail_variance=tail, shrinkage=float(a))
