"""Binary classification metrics in plain numpy, shared by training, export and benchmarks.

Labels are 0/1 with 1 the positive class (PNEUMONIA); scores are probabilities of 1.

Examples:
    >>> import numpy as np
    >>> m = binary_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.4, 0.6]), 0.5)
    >>> m["tp"], m["fp"], m["tn"], m["fn"], m["accuracy"]
    (1, 1, 1, 1, 0.5)
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def confusion(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> Dict[str, int]:
    """Counts of TP, FP, TN, FN when ``score >= threshold`` predicts positive."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(y_score) >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
        "fn": int(np.sum(~pred & y)),
    }


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN with one class."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks for ties
    i = 0
    n = len(s)
    while i < n:
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, y_score: np.ndarray):
    """False and true positive rates and thresholds, one point per distinct score."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.where(np.diff(s_sorted))[0], len(s) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (1 + distinct) - tps
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thresholds


def log_loss(y_true: np.ndarray, y_score: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log) of the positive-class probabilities."""
    y = np.asarray(y_true).astype(np.float64)
    p = np.clip(np.asarray(y_score, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    """Accuracy, loss, precision, recall (sensitivity), specificity, F1, AUC and the counts."""
    c = confusion(y_true, y_score, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    out: Dict[str, float] = dict(c)
    out.update(
        n=int(tp + fp + tn + fn),
        threshold=float(threshold),
        accuracy=_ratio(tp + tn, tp + fp + tn + fn),
        loss=log_loss(y_true, y_score),
        precision=precision,
        recall=recall,
        sensitivity=recall,
        specificity=_ratio(tn, tn + fp),
        f1=f1,
        auc=roc_auc(y_true, y_score),
    )
    return out


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J).

    Ties are broken towards the threshold nearest 0.5. The returned value lies halfway
    between adjacent distinct scores so that tiny numeric changes (INT8) do not flip it.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.unique(np.asarray(y_score, dtype=np.float64))
    if len(s) < 2 or y.all() or (~y).all():
        return 0.5
    cands = np.r_[(s[:-1] + s[1:]) / 2.0]
    best, best_j = 0.5, -np.inf
    for t in cands:
        c = confusion(y, y_score, t)
        j = c["tp"] / (c["tp"] + c["fn"]) + c["tn"] / (c["tn"] + c["fp"]) - 1
        if j > best_j + 1e-12 or (abs(j - best_j) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_j = float(t), j
    return best
