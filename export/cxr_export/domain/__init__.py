"""The image check: does an image lie inside the model's training domain?

Several tests ("branches"), each a shrunk Mahalanobis distance to the training images' class
means: on standardised thumbnails of the input, upright against upside down, and on channel
statistics of activations inside the backbone (or the pooled features). Each is standardised on
validation images and the score is the largest. The check is nodes appended to the graph
(``domain_score``, ``domain_terms``), so the runtime only reads outputs and a threshold. Modules:
:mod:`~cxr_export.domain.stats` (statistics), :mod:`~cxr_export.domain.stages` (reading the
backbone), :mod:`~cxr_export.domain.graph` (nodes), :mod:`~cxr_export.domain.fit` (fitting and
writing, with an example), :mod:`~cxr_export.domain.cli`. Design: ``docs/design/domain-check.md``.
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
