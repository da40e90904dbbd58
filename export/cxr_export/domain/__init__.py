"""The image check: does an image lie inside the model's training domain?

Several tests ("branches"), each a shrunk Mahalanobis distance to the training images' class
means, on standardised thumbnails of the input, an upright-versus-upside-down ratio and the
channel statistics of activations inside the backbone (or the pooled features); each is
standardised on validation images and the score is the largest. The check is nodes appended to
the graph (outputs ``domain_score`` and ``domain_terms``), so the runtime only reads outputs and
a threshold. Methods and measurements: ``docs/design/domain-check.md``.

Modules: :mod:`~cxr_export.domain.stats` (the statistics), :mod:`~cxr_export.domain.stages`
(reading tensors inside the backbone), :mod:`~cxr_export.domain.graph` (the nodes),
:mod:`~cxr_export.domain.fit` (fitting, calibration, writing a file) and
:mod:`~cxr_export.domain.cli` (``python -m cxr_export.domain``).

Examples:
    >>> block = add_domain_stats("m.onnx", train_px, train_y, val_px, "m_dom.onnx")   # doctest: +SKIP
    >>> block["threshold"], block["flag_rate_validation"]                            # doctest: +SKIP
    (1.31, 0.05)
"""
from __future__ import annotations

from .cli import main
from .fit import (
    DEFAULT_FIT_COUNT,
    DEFAULT_FLAG_RATE,
    add_domain_stats,
    branch_inputs,
    calibrate,
    fit_branches,
    load_sets,
    operating_points,
    reference_scores,
    run_outputs,
    stage_features,
)
from .graph import DOMAIN_OUTPUT, PREFIX, TERMS_OUTPUT, add_domain_graph, strip_domain_graph
from .stages import DEFAULT_STAGE_TALL_ROWS, STAGE_TAPS, default_taps, stage_feature_nodes
from .stats import Branch, DomainStats, fit_stats

__all__ = [
    "DEFAULT_FIT_COUNT", "DEFAULT_FLAG_RATE", "DEFAULT_STAGE_TALL_ROWS", "DOMAIN_OUTPUT", "PREFIX", "STAGE_TAPS",
    "TERMS_OUTPUT", "Branch", "DomainStats", "add_domain_graph", "add_domain_stats", "branch_inputs", "calibrate",
    "default_taps", "fit_branches", "fit_stats", "load_sets", "main", "operating_points", "reference_scores",
    "run_outputs", "stage_feature_nodes", "stage_features", "strip_domain_graph",
]
