"""Percentile-bootstrap confidence intervals and calibration bins for binary classifiers (numpy only).
All bootstrap draws are evaluated at once as a weight matrix (draw x image).

Examples:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1]); p = np.array([0.1, 0.6, 0.4, 0.9])
    >>> sorted(bootstrap_metrics(y, p, 0.5, rounds=200, seed=0))[:3]
    ['accuracy', 'auc', 'f1']
    >>> calibration_bins(y, p, bins=2)["ece"]
    0.25
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

CI_METRICS = ("accuracy", "loss", "precision", "recall", "specificity", "f1", "auc")


def bootstrap_weights(n: int, rounds: int, seed: int = 0) -> np.ndarray:
    """``(rounds, n)`` counts: how often each image appears in each bootstrap draw."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(rounds, n))
    w = np.zeros((rounds, n), dtype=np.float64)
    np.add.at(w, (np.repeat(np.arange(rounds), n), idx.ravel()), 1.0)
    return w


def weighted_auc(y_true: np.ndarray, y_score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of weights ``w`` (ties count half, as :func:`cxr_infer.metrics.roc_auc`);
    NaN where one class is absent."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, w_sorted = s[order], y[order], w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)
    neg = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def weighted_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float, w: np.ndarray) -> Dict[str, np.ndarray]:
    """Every metric of :data:`CI_METRICS` plus counts, one value per row of weights ``w``."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    pred = s >= threshold
    tp, fp, tn, fn = w @ (pred & y), w @ (pred & ~y), w @ (~pred & ~y), w @ (~pred & y)
    pc = np.clip(s, 1e-7, 1 - 1e-7)
    per_image_loss = -(y * np.log(pc) + (~y) * np.log(1 - pc))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / (tp + fp + tn + fn),
                "loss": (w @ per_image_loss) / w.sum(axis=1), "precision": tp / (tp + fp), "recall": tp / (tp + fn),
                "specificity": tn / (tn + fp), "f1": 2 * tp / (2 * tp + fp + fn), "auc": weighted_auc(y, s, w)}


def bootstrap_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float, rounds: int = 1000,
                      seed: int = 0, level: float = 0.95) -> Dict[str, Dict[str, float]]:
    """Percentile-bootstrap interval ``{"lo", "hi", "undefined"}`` of each metric of :data:`CI_METRICS`;
    ``undefined`` counts the draws left out because the metric is undefined in them."""
    n = len(np.asarray(y_true))
    if rounds <= 0 or n == 0:
        return {}
    w = bootstrap_weights(n, rounds, seed)
    vals = weighted_metrics(y_true, y_score, threshold, w)
    alpha = (1.0 - level) / 2.0
    out: Dict[str, Dict[str, float]] = {}
    for k in CI_METRICS:
        ok = np.isfinite(vals[k])
        lo, hi = np.quantile(vals[k][ok], [alpha, 1.0 - alpha]) if ok.any() else (float("nan"), float("nan"))
        out[k] = {"lo": float(lo), "hi": float(hi), "undefined": int((~ok).sum())}
    return out


def calibration_bins(y_true: np.ndarray, y_score: np.ndarray, bins: int = 10) -> Dict[str, object]:
    """Reliability table over equal-width bins of the positive probability: ``bins`` (lo, hi, count,
    mean_predicted, fraction_positive), ``ece`` (count-weighted mean gap), ``mce`` and ``brier``."""
    y = np.asarray(y_true).astype(np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1], right=False), 0, bins - 1)
    rows: List[Dict[str, float]] = []
    ece, mce = 0.0, 0.0
    for b in range(bins):
        m = which == b
        c = int(m.sum())
        mp = float(s[m].mean()) if c else float("nan")
        fp = float(y[m].mean()) if c else float("nan")
        if c:
            gap = abs(fp - mp)
            ece += c / len(s) * gap
            mce = max(mce, gap)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": c,
                     "mean_predicted": mp, "fraction_positive": fp})
    brier = float(np.mean((s - y) ** 2)) if len(s) else float("nan")
    return {"bins": rows, "ece": float(ece), "mce": float(mce), "brier": brier}

