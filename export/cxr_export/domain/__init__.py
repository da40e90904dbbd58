"""The image check: does an image lie inside the model's training domain?

Shrunk Mahalanobis distances to the training images' class means ("branches": thumbnails of the
input, upright against upside down, activations inside the backbone), each standardised on
validation images, the score their largest, appended to the graph (``domain_score``,
``domain_terms``). Modules: :mod:`~cxr_export.domain.stats`, :mod:`~cxr_export.domain.stages`,
:mod:`~cxr_export.domain.graph`, :mod:`~cxr_export.domain.fit`; ``python -m cxr_export.domain``
adds the check to existing files. Design: ``docs/design/domain-check.md``.
"""
from __future__ import annotations

from .fit import (
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
from .graph import PREFIX
from .stages import DEFAULT_STAGE_TALL_ROWS, STAGE_TAPS, default_taps, stage_feature_nodes

__all__ = ["DEFAULT_STAGE_TALL_ROWS", "PREFIX", "STAGE_TAPS", "add_domain_stats", "branch_inputs", "calibrate",
           "default_taps", "fit_branches", "load_sets", "operating_points", "reference_scores", "run_outputs",
           "stage_feature_nodes", "stage_features"]
