"""The image check: does an image lie inside the model's training domain?

Several tests ("branches"), each a Mahalanobis distance to the training images' class means
with a shrunk shared covariance: on standardised thumbnails of the model's input (its layout
at 16 x 16, 8 x 8 and 4 x 4), an upright-versus-upside-down log-likelihood ratio, on the
channel statistics of activations inside the backbone (the taps on the backbone's registry
entry) and, where a file has no such taps, on the pooled features. Each test's value is
standardised on validation images; the score is the largest, and its threshold flags a chosen
share of validation images. The check is a few nodes appended to the graph (outputs
``domain_score`` and ``domain_terms``), so the runtime only reads outputs and a threshold.

Modules, one job each: :mod:`~cxr_export.domain.stats` (the statistics and branches),
:mod:`~cxr_export.domain.stages` (reading tensors inside the backbone),
:mod:`~cxr_export.domain.graph` (the nodes), :mod:`~cxr_export.domain.fit` (fitting,
calibration, writing a file) and :mod:`~cxr_export.domain.cli` (``python -m
cxr_export.domain``). Methods, figures and why the shipped check was chosen:
``docs/design/domain-check.md``.

Examples:
    >>> block = add_domain_stats("m.onnx", train_px, train_y, val_px, "m_dom.onnx")   # doctest: +SKIP
    >>> block["threshold"], block["flag_rate_validation"]                            # doctest: +SKIP
    (1.31, 0.05)
"""
from __future__ import annotations

from cxr_infer.model import graph_input

from ..onnxgraph import tensor_elem_type
from .cli import main
from .fit import (
    CENTRE_Q,
    DEFAULT_FIT_COUNT,
    DEFAULT_FLAG_RATE,
    DEFAULT_STAGE_RANK,
    FP16_TOLERANCE,
    METHOD,
    OPERATING_RATES,
    SCALE_Q,
    add_domain_stats,
    branch_inputs,
    calibrate,
    fit_branches,
    load_sets,
    operating_points,
    reference_scores,
    run_outputs,
    stage_features,
    standardise_branch,
)
from .graph import DOMAIN_OUTPUT, PREFIX, TERMS_OUTPUT, add_domain_graph, strip_domain_graph
from .stages import (
    DEFAULT_STAGE_TALL_ROWS,
    STAGE_TAPS,
    default_taps,
    resolve_tap,
    stage_feature_nodes,
    stage_nodes,
    stage_row_steps,
)
from .stats import (
    BRANCH_WORDS,
    DEFAULT_RANK,
    LOG_EPS,
    STD_EPS,
    THUMB,
    THUMB_COARSE,
    THUMB_COARSEST,
    THUMB_GRIDS,
    Branch,
    DomainStats,
    branch_words,
    fit_stats,
    ledoit_wolf,
    pool_kernel,
    rotate180,
    standardise,
    thumbnails,
)

__all__ = [
    "BRANCH_WORDS", "CENTRE_Q", "DEFAULT_FIT_COUNT", "DEFAULT_FLAG_RATE", "DEFAULT_RANK", "DEFAULT_STAGE_RANK",
    "DEFAULT_STAGE_TALL_ROWS", "DOMAIN_OUTPUT", "FP16_TOLERANCE", "LOG_EPS", "METHOD", "OPERATING_RATES", "PREFIX",
    "SCALE_Q", "STAGE_TAPS", "STD_EPS", "TERMS_OUTPUT", "THUMB", "THUMB_COARSE", "THUMB_COARSEST", "THUMB_GRIDS",
    "Branch", "DomainStats", "add_domain_graph", "add_domain_stats", "branch_inputs", "branch_words", "calibrate",
    "default_taps", "fit_branches", "fit_stats", "graph_input", "ledoit_wolf", "load_sets", "main",
    "operating_points", "pool_kernel", "reference_scores", "resolve_tap", "rotate180", "run_outputs",
    "stage_feature_nodes", "stage_features", "stage_nodes", "stage_row_steps", "standardise", "standardise_branch",
    "strip_domain_graph", "tensor_elem_type", "thumbnails",
]
