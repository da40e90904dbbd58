"""cxr-bench statistics against hand-computed confusion matrices and known values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_bench.stats import bootstrap_metrics, bootstrap_weights, calibration_bins, weighted_auc, weighted_metrics
from cxr_infer.metrics import binary_metrics, roc_auc

# 10 images; at threshold 0.5: TP 4 (0.9 0.8 0.7 0.6), FN 1 (0.3), FP 2 (0.55 0.65), TN 3 (0.1 0.2 0.4)
Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.55, 0.65, 0.1, 0.2, 0.4])


def test_hand_computed_confusion_and_ratios():
    m = binary_metrics(Y, P, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 2, 3, 1)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    # AUC by counting: positive-negative pairs ranked correctly, of 25
    wins = sum((p > n) + 0.5 * (p == n) for p in P[Y == 1] for n in P[Y == 0])
    assert m["auc"] == pytest.approx(wins / 25) == pytest.approx(21 / 25)
    loss = -np.mean(np.where(Y == 1, np.log(P), np.log(1 - P)))
    assert m["loss"] == pytest.approx(loss)


def test_other_threshold_moves_counts():
    m = binary_metrics(Y, P, 0.68)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 0, 5, 2)


def test_weighted_metrics_with_unit_weights_equal_point_metrics():
    w = np.ones((1, len(Y)))
    wm = weighted_metrics(Y, P, 0.5, w)
    pm = binary_metrics(Y, P, 0.5)
    for k in ("tp", "fp", "tn", "fn", "accuracy", "loss", "precision", "recall", "specificity", "f1", "auc"):
        assert float(wm[k][0]) == pytest.approx(pm[k]), k


def test_weighted_auc_handles_ties_and_duplicates():
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.9, 0.1, 0.5])
    assert weighted_auc(y, s, np.ones(5))[0] == pytest.approx(roc_auc(y, s))
    # weight 2 on an image == that image listed twice
    w = np.array([[2, 1, 1, 1, 1]])
    y2, s2 = np.r_[y, 1], np.r_[s, 0.5]
    assert weighted_auc(y, s, w)[0] == pytest.approx(roc_auc(y2, s2))
    assert math.isnan(weighted_auc(np.ones(3), np.array([0.1, 0.2, 0.3]), np.ones(3))[0])


def test_bootstrap_weights_are_resamples():
    w = bootstrap_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and np.all(w.sum(axis=1) == 7)
    assert np.array_equal(w, bootstrap_weights(7, 50, seed=3))


def test_bootstrap_intervals_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    a = bootstrap_metrics(y, p, 0.5, rounds=400, seed=1)
    b = bootstrap_metrics(y, p, 0.5, rounds=400, seed=1)
    assert a == b
    point = binary_metrics(y, p, 0.5)
    for k, ci in a.items():
        assert ci["lo"] <= point[k] <= ci["hi"], k
        assert ci["hi"] - ci["lo"] < 0.2, k


def test_calibration_bins_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    c = calibration_bins(y, p, bins=2)
    b0, b1 = c["bins"]
    assert (b0["count"], b1["count"]) == (2, 2)
    assert b0["mean_predicted"] == pytest.approx(0.25) and b0["fraction_positive"] == pytest.approx(0.5)
    assert b1["mean_predicted"] == pytest.approx(0.75) and b1["fraction_positive"] == pytest.approx(0.5)
    assert c["ece"] == pytest.approx(0.25)
    assert c["brier"] == pytest.approx(np.mean((p - y) ** 2))
    # probability 1.0 lands in the last bin, not past it
    assert calibration_bins(np.array([1]), np.array([1.0]), bins=10)["bins"][-1]["count"] == 1
