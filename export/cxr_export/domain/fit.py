"""Fitting and calibrating the image check on a model file's own outputs, and writing it in.

Fitted on class-balanced images of the split's *train* part through the file itself (an INT8 file
gets statistics of its own tensors), standardised and calibrated on its *val* part; the test
split is never read. Why: ``docs/design/domain-check.md``.

Examples:
    >>> block = add_domain_stats("m.onnx", train_px, train_y, val_px, "m_dom.onnx")   # doctest: +SKIP
    >>> block["threshold"], block["flag_rate_validation"]                            # doctest: +SKIP
    (1.31, 0.05)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.spec import ModelSpec

from ..modelio import open_model, probability_change, read_spec, staged, write_spec
from .graph import DOMAIN_OUTPUT, PREFIX, TERMS_OUTPUT, add_domain_graph, strip_domain_graph
from .stages import DEFAULT_STAGE_TALL_ROWS, default_taps, per_tap, stage_feature_nodes, stage_row_steps
from .stats import DEFAULT_RANK, THUMB, THUMB_GRIDS, Branch, fit_stats, pool_kernel, thumbnails

METHOD = ("max of branches, each standardised on validation (median 0, 95th percentile 1): Mahalanobis "
          "distance on a per-image standardised 16x16, 8x8 and 4x4 input thumbnail, an upright-vs-180-degrees "
          "log-likelihood ratio on the 16x16 thumbnail, on the channel means and standard deviations of "
          "activations inside the backbone (stage_tensors), and on the pooled features where the file has that "
          "branch (see branches); class means, shared Ledoit-Wolf-shrunk covariance, top-rank eigenvectors exact "
          "+ mean tail")
SCORE = ("max over branches of (value - centre) / scale; a branch's value is sqrt(min over classes of the squared "
         "Mahalanobis distance), or for orientation log(d2 upright) - log(d2 rotated 180 degrees)")
DEFAULT_FIT_COUNT = 1500
#: the rank of a stage branch (``rank``: of the others; see the design page, "Rank")
DEFAULT_STAGE_RANK = 128
DEFAULT_FLAG_RATE = 0.05
CENTRE_Q, SCALE_Q = 0.5, 0.95
#: the validation flag rates whose thresholds a file carries (``domain.operating_points``), besides its own
OPERATING_RATES = (0.01, 0.02, 0.03, 0.05, 0.075, 0.10, 0.15, 0.20, 0.25, 0.30)
#: the largest change of an FP16 file's probabilities accepted when the graph is added (on a CPU)
FP16_TOLERANCE = 5e-3
#: the largest relative difference accepted between the graph's score and the numpy reference
GRAPH_TOLERANCE = 0.05


def run_outputs(model: str | Path | bytes, spec: ModelSpec, pixels: np.ndarray, names: List[str],
                batch_size: int = 32, threads: int = 0) -> List[np.ndarray]:
    """The graph outputs ``names`` (float64) for uint8 NHWC ``pixels``, through the runtime's model layer."""
    return [np.asarray(v, np.float64) for v in open_model(model, threads, spec).run(pixels, names, batch_size)]


def stage_features(model_path: str | Path, spec: ModelSpec, pixels: np.ndarray, tensors: List[str],
                   batch_size: int = 32, threads: int = 0, row_step: int | Sequence[int] = 1) -> List[np.ndarray]:
    """Each stage branch's input ``[N, 2 C]`` for ``pixels``, by the nodes the domain graph appends."""
    import onnx
    from onnx import TensorProto, helper

    if not tensors:
        return []
    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    names = []
    for i, (t, step) in enumerate(zip(tensors, per_tap(row_step, len(tensors)))):
        nodes, feat = stage_feature_nodes(model, t, f"{PREFIX}probe{i + 1}/", step)
        model.graph.node.extend(nodes)
        model.graph.output.append(helper.make_tensor_value_info(feat, TensorProto.FLOAT, None))
        names.append(feat)
    # the probe has no domain outputs, whatever the spec says
    return run_outputs(model.SerializeToString(), spec.without_additions(["domain"]), pixels, names, batch_size,
                       threads)


def reference_scores(branches: List[Branch], inputs: List[np.ndarray]) -> np.ndarray:
    """The score the graph computes, from each branch's inputs (float64 numpy)."""
    return np.max(np.stack([(br.values(x) - br.centre) / br.scale for br, x in zip(branches, inputs)]), axis=0)


def standardise_branch(br: Branch, val_values: np.ndarray) -> None:
    """Set the branch's centre and scale from its validation values (median 0, 95th percentile 1)."""
    v = np.asarray(val_values, np.float64)
    br.centre = float(np.quantile(v, CENTRE_Q))
    spread = float(np.quantile(v, SCALE_Q)) - br.centre
    br.scale = spread if spread > 1e-6 * max(1.0, abs(br.centre)) else max(1e-6, 1e-3 * abs(br.centre))


def calibrate(val_scores: np.ndarray, flag_rate: float = DEFAULT_FLAG_RATE) -> float:
    """The threshold above which ``flag_rate`` of the validation scores lie.

    Examples:
        >>> calibrate(np.arange(100.0), 0.05)
        95.0
    """
    if not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag rate {flag_rate} must be in (0, 1)")
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - flag_rate, method="higher"))


def operating_points(val_scores: np.ndarray, rates: Sequence[float] = OPERATING_RATES) -> List[Dict[str, float]]:
    """The spec's ``domain.operating_points``: the threshold of each flag rate (``cxr-infer --domain-flag-rate``)."""
    return [{"flag_rate": float(r), "threshold": calibrate(val_scores, float(r))} for r in sorted(set(rates))]


def branch_inputs(spec: ModelSpec, pixels: np.ndarray, feats: np.ndarray,
                  stages: Optional[List[np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Each branch's input for ``pixels``: ``features``, ``thumb16``, ..., and ``stages`` as ``stage1``, ..."""
    out = {"features": feats}
    out.update({f"thumb{g}": thumbnails(spec, pixels, g) for g in THUMB_GRIDS})
    out.update({f"stage{i + 1}": s for i, s in enumerate(stages or [])})
    return out


def fit_branches(spec: ModelSpec, feat_name: str, train: Dict[str, np.ndarray], labels: np.ndarray,
                 val: Dict[str, np.ndarray], rank: int = DEFAULT_RANK, taps: Optional[List[str]] = None,
                 features_branch: bool = False, stage_rank: int = DEFAULT_STAGE_RANK,
                 stage_row_step: int | Sequence[int] = 1) -> Tuple[List[Branch], List[str], np.ndarray]:
    """The branches fitted on ``train`` and standardised on ``val``, the input each reads (a key of
    :func:`branch_inputs`) and their validation terms ``[branches, N]``."""
    grids = {f"thumb{grid}": grid for grid in THUMB_GRIDS}
    stats = {key: fit_stats(train[key], labels, rank) for key in grids}
    branches = [Branch(key, "distance", "thumbnail", stats[key], grid) for key, grid in grids.items()]
    branches.append(Branch("orientation", "orientation", "thumbnail", stats[f"thumb{THUMB}"], THUMB))
    keys = list(grids) + [f"thumb{THUMB}"]
    if features_branch:
        branches.insert(0, Branch("features", "distance", feat_name, fit_stats(train["features"], labels, rank)))
        keys.insert(0, "features")
    for i, (tensor, step) in enumerate(zip(taps or [], per_tap(stage_row_step, len(taps or [])))):
        key = f"stage{i + 1}"
        branches.append(Branch(key, "distance", "stage", fit_stats(train[key], labels, stage_rank),
                               tensor=tensor, row_step=step))
        keys.append(key)
    terms = []
    for br, k in zip(branches, keys):
        v = br.values(val[k])
        standardise_branch(br, v)
        terms.append((v - br.centre) / br.scale)
    return branches, keys, np.stack(terms)


def _check_staged(model_path: Path, staged: Path, out: Path, spec: ModelSpec, branches: List[Branch],
                  keys: List[str], train: Dict[str, np.ndarray], train_pixels: np.ndarray, probs_before: np.ndarray,
                  val_pixels: np.ndarray, threads: int) -> Tuple[np.ndarray, float, float]:
    """Finite scores, probabilities unchanged, graph equal to numpy: (val scores, change, graph-vs-numpy)."""
    (val_scores,) = run_outputs(staged, spec, val_pixels, [DOMAIN_OUTPUT], threads=threads)
    bad = int(np.sum(~np.isfinite(val_scores)))
    if bad:
        raise ValueError(f"{model_path}: its domain score is not a number (inf or NaN) for {bad} of "
                         f"{len(val_scores)} validation images: values inside the graph leave the file's "
                         "number range (float16: +-65504); leave this precision out, or --no-domain-stats")
    k = min(16, len(train_pixels))
    probs_after, train_scores = run_outputs(staged, spec, train_pixels[:k], [spec.prob_output, DOMAIN_OUTPUT],
                                            threads=threads)
    ref = reference_scores(branches, [train[key][:k] for key in keys])
    graph_vs_numpy = float(np.max(np.abs(train_scores - ref) / np.maximum(np.abs(ref), 1.0))) if len(ref) else 0.0
    change = probability_change(probs_before[:k], probs_after, spec, out, "domain graph", FP16_TOLERANCE)
    if graph_vs_numpy > GRAPH_TOLERANCE:
        raise RuntimeError(f"{out}: the graph's domain score differs from the numpy reference by "
                           f"{graph_vs_numpy:.3g} (a bug)")
    return val_scores, change, graph_vs_numpy


def _domain_block(spec: ModelSpec, branches: List[Branch], val_terms: np.ndarray, val_scores: np.ndarray,
                  flag_rate: float, taps: List[str], stage_tall_rows: int, stage_row_step: List[int],
                  fit: Dict[str, Any], graph_vs_numpy: float, change: float, seconds: float) -> Dict[str, Any]:
    """The spec's ``domain`` block for a fitted, calibrated and checked check."""
    threshold = calibrate(val_scores, flag_rate)
    deciding = {br.name: float(np.mean((np.argmax(val_terms, 0) == j) & (val_scores > threshold)))
                for j, br in enumerate(branches)}
    return {
        "method": METHOD, "score": SCORE, "stage_tensors": taps, "stage_tall_rows": int(stage_tall_rows),
        "stage_row_steps": [int(k) for k in stage_row_step], "threshold": threshold, "target_flag_rate": flag_rate,
        "flag_rate_validation": float(np.mean(val_scores > threshold)),
        "operating_points": operating_points(val_scores, tuple(OPERATING_RATES) + (flag_rate,)),
        "flagged_validation_by_branch": deciding, "features_output": spec.features_output,
        "branches": [br.describe(spec.input_name) for br in branches],
        "rank": int(branches[0].stats.vectors.shape[1]), "shrinkage": branches[0].stats.shrinkage, "fit": fit,
        "calibration": {"images": int(len(val_scores)), "part": "val part of the split",
                        "val_score_median": float(np.median(val_scores))},
        "graph_vs_numpy_max_diff": graph_vs_numpy,
        "probabilities_unchanged": True if change == 0.0 else f"within {change:.2g} (FP16 on CPU)",
        "seconds": round(seconds, 1),
    }


def add_domain_stats(model_path: str | Path, train_pixels: np.ndarray, train_labels: np.ndarray,
                     val_pixels: np.ndarray, out_path: Optional[str | Path] = None, rank: int = DEFAULT_RANK,
                     flag_rate: float = DEFAULT_FLAG_RATE, threads: int = 0, source: str = "",
                     taps: Optional[List[str]] = None, features_branch: Optional[bool] = None,
                     stage_rank: int = DEFAULT_STAGE_RANK,
                     stage_tall_rows: int = DEFAULT_STAGE_TALL_ROWS) -> Dict[str, Any]:
    """Fit the check on ``train_pixels``, calibrate it on ``val_pixels``, write it into ``out_path``
    (default: in place) once every check passed, and return the spec's ``domain`` block.

    ``taps`` (default :func:`default_taps`), ``features_branch`` (default: only without taps),
    ``stage_rank`` and ``stage_tall_rows`` are the options of ``python -m cxr_export.domain``.
    """
    model_path = Path(model_path)
    out = Path(out_path or model_path)
    spec = read_spec(model_path)
    feat_name = spec.features_output
    if not feat_name:
        raise ValueError(f"{model_path}: its spec names no features output (exported with --no-features?)")
    t0 = time.perf_counter()
    probs_before, feats = run_outputs(model_path, spec, train_pixels, [spec.prob_output, feat_name], threads=threads)
    (val_feats,) = run_outputs(model_path, spec, val_pixels, [feat_name], threads=threads)
    taps = default_taps(spec, model_path) if taps is None else list(taps)
    if features_branch is None:  # the model's own representation is read by the stage branches, or by this one
        features_branch = not taps
    if stage_tall_rows < 0:
        raise ValueError(f"stage_tall_rows must be 0 (every row) or a positive row count, not {stage_tall_rows}")
    steps = stage_row_steps(model_path, taps, stage_tall_rows)
    train_in = branch_inputs(spec, train_pixels, feats,
                             stage_features(model_path, spec, train_pixels, taps, threads=threads, row_step=steps))
    val_in = branch_inputs(spec, val_pixels, val_feats,
                           stage_features(model_path, spec, val_pixels, taps, threads=threads, row_step=steps))
    branches, keys, val_terms = fit_branches(spec, feat_name, train_in, train_labels, val_in, rank, taps,
                                             features_branch, stage_rank, steps)
    with staged(out) as path:
        add_domain_graph(model_path, branches, path, {grid: pool_kernel(spec, grid) for grid in THUMB_GRIDS})
        val_scores, change, graph_vs_numpy = _check_staged(model_path, path, out, spec, branches, keys, train_in,
                                                           train_pixels, probs_before, val_pixels, threads)
        fit = {"images": int(len(train_pixels)), "part": "train part of the split, class-balanced", "source": source}
        block = _domain_block(spec, branches, val_terms, val_scores, flag_rate, taps, stage_tall_rows, steps, fit,
                              graph_vs_numpy, change, time.perf_counter() - t0)
        write_spec(path, spec.updated({"domain": block},
                                      outputs={"domain_score": DOMAIN_OUTPUT, "domain_terms": TERMS_OUTPUT}))
    return block


def load_sets(ckpt_dir: str | Path, data_dir: str | Path, size: Tuple[int, int], fit_count: int = DEFAULT_FIT_COUNT,
              val_count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, train labels, val pixels) from the run's split (never the test split)."""
    from ..images import image_set

    tr_px, tr_y, _ = image_set(ckpt_dir, data_dir, "train", fit_count, size)
    va_px, _, _ = image_set(ckpt_dir, data_dir, "val", val_count, size)
    return tr_px, tr_y, va_px
