"""Domain statistics: does an image lie inside the model's training domain?

Method (why this one): a Mahalanobis distance in the model's own pooled penultimate feature
space (the ``features`` output), to the nearest class mean, with one covariance shared by the
classes and shrunk towards a multiple of the identity with the Ledoit-Wolf formula. It needs
only a few statistics (no training images in the file, unlike a k-nearest-neighbour
distance), is a known strong baseline for out-of-distribution detection on penultimate
features (Lee et al. 2018), and the shrinkage keeps the inverse stable with ~1,500 images in
512 or 2,048 dimensions.

Storage (why in the graph): the statistics become FP32 initializers of a few extra nodes
appended to the graph after ``features``, with a new output ``domain_score`` ([N], the
distance). The runtime then needs nothing but the output name and the threshold from the
spec (``outputs.domain_score``, ``domain.threshold``), no linear algebra of its own, and the
classification path (``probabilities``) is untouched: same nodes, same weights, same numbers.

Compactness: the full inverse of a 2,048 x 2,048 covariance would add 16 MB. We keep the top
``rank`` eigenvectors of the shrunk covariance exactly and replace the remaining eigenvalues
by their mean (the probabilistic-PCA form of the covariance), so that

    d_c^2 = |z_c|^2 / s2  +  sum_i p_ci^2 (1 / l_i - 1 / s2),   z_c = f - mu_c,  p_c = V^T z_c

costs one [C, rank] matrix (2 MB at C = 2,048, rank = 256). With ``rank >= C`` it is the exact
shrunk Mahalanobis distance. The score is ``sqrt(min_c d_c^2)``.

Fitting and calibration: statistics are fitted on up to ``fit_count`` class-balanced images of
the *train* part of the run's split, through the model file itself (so an INT8 file gets
statistics of its own, quantized features); the threshold is the (1 - ``flag_rate``) quantile
of the scores of the *val* part, so about ``flag_rate`` of in-domain images are flagged. The
test split is never read.

Standalone use, to add (or refresh) statistics in an existing model file::

    python -m cxr_export.domain runs/gpu2/vgg16 runs/export/vgg16_int8.onnx --data .data/train

Example:
    >>> stats = fit_stats(feats, labels)                  # doctest: +SKIP
    >>> add_domain_graph("m.onnx", stats, "m_dom.onnx")    # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from cxr_infer.preprocess import to_input
from cxr_infer.spec import ModelSpec

from .modelio import read_spec, session, write_spec

DOMAIN_OUTPUT = "domain_score"
PREFIX = "cxr_domain/"
METHOD = "mahalanobis, class means, shared Ledoit-Wolf-shrunk covariance, top-rank eigenvectors exact + mean tail"
DEFAULT_FIT_COUNT = 1500
DEFAULT_RANK = 256
DEFAULT_FLAG_RATE = 0.05


@dataclass
class DomainStats:
    """What the graph needs: class means [K, C], eigenvectors [C, r], eigenvalues [r], tail variance."""

    means: np.ndarray
    vectors: np.ndarray
    eigenvalues: np.ndarray
    tail_variance: float
    shrinkage: float
    n_images: int

    def scores(self, feats: np.ndarray) -> np.ndarray:
        """The reference (float64 numpy) score of features ``[N, C]``: what the graph computes."""
        f = np.asarray(feats, np.float64)
        best = None
        for mu in self.means.astype(np.float64):
            z = f - mu
            p = z @ self.vectors.astype(np.float64)
            d2 = (z * z).sum(1) / self.tail_variance + (p * p) @ (1.0 / self.eigenvalues - 1.0 / self.tail_variance)
            best = d2 if best is None else np.minimum(best, d2)
        return np.sqrt(np.maximum(best, 0.0))


def ledoit_wolf(x: np.ndarray) -> Tuple[np.ndarray, float, float]:
    """Sample covariance of centred rows ``x``, the Ledoit-Wolf shrinkage and the target's scale.

    The shrunk covariance is ``(1 - a) S + a m I`` with ``m = trace(S) / C`` (the same
    estimate as ``sklearn.covariance.ledoit_wolf`` with ``assume_centered=True``).
    """
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
    """Class means and the shrunk shared covariance (top ``rank`` eigenpairs + mean tail) of ``feats``."""
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
    floor = max(1e-12, 1e-9 * float(shrunk[0]))
    shrunk = np.maximum(shrunk, floor)
    r = int(min(rank, f.shape[1]))
    tail = float(shrunk[r:].mean()) if r < f.shape[1] else float(shrunk[-1])
    return DomainStats(means=means.astype(np.float32), vectors=np.ascontiguousarray(vec[:, :r], np.float32),
                       eigenvalues=shrunk[:r].astype(np.float64), tail_variance=tail, shrinkage=float(a),
                       n_images=int(len(f)))


def run_outputs(model_path: str | Path, spec: ModelSpec, pixels: np.ndarray, names: List[str], batch_size: int = 32,
                threads: int = 0) -> List[np.ndarray]:
    """The graph outputs ``names`` for uint8 NHWC ``pixels`` (through the runtime's normalisation)."""
    sess = session(model_path, threads)
    dtype = np.float16 if spec.input_dtype == "float16" else np.float32
    out: List[List[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(pixels), batch_size):
        x = to_input(pixels[i:i + batch_size], spec.mean, spec.std).astype(dtype)
        for j, v in enumerate(sess.run(names, {spec.input_name: x})):
            out[j].append(np.asarray(v, np.float64))
    return [np.concatenate(o) for o in out]


def strip_domain_graph(model) -> None:
    """Remove nodes, initializers and output added by :func:`add_domain_graph` (in place)."""
    g = model.graph
    keep = [n for n in g.node if not n.name.startswith(PREFIX)]
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if not t.name.startswith(PREFIX)]
    del g.initializer[:]
    g.initializer.extend(inits)
    outs = [o for o in g.output if o.name != DOMAIN_OUTPUT]
    del g.output[:]
    g.output.extend(outs)


def _opset(model) -> int:
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [13])


def add_domain_graph(model_path: str | Path, stats: DomainStats, out_path: Optional[str | Path] = None,
                     features_output: str = "features") -> Path:
    """Append the FP32 nodes that compute ``domain_score`` [N] from ``features_output``; write the file.

    Any earlier domain graph is replaced; nothing else in the graph changes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(m)
    g = m.graph
    if features_output not in [o.name for o in g.output]:
        raise ValueError(f"{model_path}: the graph has no {features_output!r} output to compute a domain score from")
    P = PREFIX
    inv_tail = 1.0 / stats.tail_variance
    w = (1.0 / stats.eigenvalues - inv_tail).astype(np.float32)
    c = stats.means.shape[1]
    inits = {
        "means": stats.means.astype(np.float32),
        "vectors": stats.vectors.astype(np.float32),
        "weights": w,
        "inv_tail": np.full((c,), inv_tail, np.float32),
        "axis1": np.array([1], np.int64),
    }
    g.initializer.extend(numpy_helper.from_array(v, P + k) for k, v in inits.items())
    opset = _opset(m)

    def node(op: str, ins: List[str], out: str, **kw: Any):
        return helper.make_node(op, [i if i == features_output else P + i for i in ins], [out if out ==
                                DOMAIN_OUTPUT else P + out], name=P + out, **kw)

    nodes = [
        node("Unsqueeze", [features_output, "axis1"], "f3"),          # [N, 1, C]
        node("Sub", ["f3", "means"], "z"),                              # [N, K, C]
        node("Mul", ["z", "z"], "z2"),
        node("MatMul", ["z2", "inv_tail"], "iso"),                      # [N, K]: |z|^2 / s2
        node("MatMul", ["z", "vectors"], "p"),                          # [N, K, r]
        node("Mul", ["p", "p"], "p2"),
        node("MatMul", ["p2", "weights"], "corr"),                      # [N, K]
        node("Add", ["iso", "corr"], "d2"),
    ]
    if opset >= 18:
        nodes.append(node("ReduceMin", ["d2", "axis1"], "dmin", keepdims=0))
    else:
        nodes.append(node("ReduceMin", ["d2"], "dmin", axes=[1], keepdims=0))
    nodes += [node("Relu", ["dmin"], "dpos"), node("Sqrt", ["dpos"], DOMAIN_OUTPUT)]
    g.node.extend(nodes)
    batch = None
    for o in g.output:
        if o.name == features_output:
            d = o.type.tensor_type.shape.dim
            batch = (d[0].dim_param or d[0].dim_value or None) if len(d) else None
    g.output.append(helper.make_tensor_value_info(DOMAIN_OUTPUT, TensorProto.FLOAT, [batch]))
    out = Path(out_path or model_path)
    onnx.save(m, str(out))
    return out


def calibrate(val_scores: np.ndarray, flag_rate: float = DEFAULT_FLAG_RATE) -> float:
    """The threshold above which ``flag_rate`` of the validation scores lie."""
    if not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag rate {flag_rate} must be in (0, 1)")
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - flag_rate, method="higher"))


def add_domain_stats(model_path: str | Path, train_pixels: np.ndarray, train_labels: np.ndarray,
                     val_pixels: np.ndarray, out_path: Optional[str | Path] = None, rank: int = DEFAULT_RANK,
                     flag_rate: float = DEFAULT_FLAG_RATE, threads: int = 0, source: str = "") -> Dict[str, Any]:
    """Fit on ``train_pixels`` through this file's own features, add the graph, calibrate on ``val_pixels``.

    Writes ``out_path`` (default: in place) and returns the spec's new ``domain`` block.
    The probabilities output is checked to be bit-identical before and after.
    """
    model_path = Path(model_path)
    out = Path(out_path or model_path)
    spec = read_spec(model_path)
    feat_name = spec.features_output
    if not feat_name:
        raise ValueError(f"{model_path}: its spec names no features output (exported with --no-features?)")
    t0 = time.perf_counter()
    probs_before, feats = run_outputs(model_path, spec, train_pixels, [spec.prob_output, feat_name], threads=threads)
    stats = fit_stats(feats, train_labels, rank)
    add_domain_graph(model_path, stats, out, feat_name)
    val_probs, val_scores = run_outputs(out, spec, val_pixels, [spec.prob_output, DOMAIN_OUTPUT], threads=threads)
    probs_after, train_scores = run_outputs(out, spec, train_pixels[:64], [spec.prob_output, DOMAIN_OUTPUT],
                                            threads=threads)
    ref = stats.scores(feats[:64])
    graph_vs_numpy = float(np.max(np.abs(train_scores - ref) / np.maximum(ref, 1e-6))) if len(ref) else 0.0
    if not np.array_equal(probs_after, probs_before[:64]):
        raise RuntimeError(f"{out}: adding the domain graph changed the probabilities (a bug)")
    threshold = calibrate(val_scores, flag_rate)
    block = {
        "method": METHOD,
        "score": "sqrt(min over classes of the squared Mahalanobis distance of the features)",
        "threshold": threshold,
        "target_flag_rate": flag_rate,
        "flag_rate_validation": float(np.mean(val_scores > threshold)),
        "features_output": feat_name,
        "feature_dim": int(feats.shape[1]),
        "rank": int(stats.vectors.shape[1]),
        "shrinkage": stats.shrinkage,
        "tail_variance": stats.tail_variance,
        "fit": {"images": int(len(train_pixels)), "part": "train part of the split, class-balanced",
                "source": source},
        "calibration": {"images": int(len(val_pixels)), "part": "val part of the split",
                        "val_score_median": float(np.median(val_scores)),
                        "train_score_median": float(np.median(stats.scores(feats)))},
        "graph_vs_numpy_max_rel_diff": graph_vs_numpy,
        "probabilities_unchanged": True,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    new = spec.copy()
    new.raw["outputs"] = dict(new.raw["outputs"], domain_score=DOMAIN_OUTPUT)
    new.raw["domain"] = block
    write_spec(out, new)
    return block


def load_sets(ckpt_dir: str | Path, data_dir: str | Path, size: Tuple[int, int], fit_count: int = DEFAULT_FIT_COUNT,
              val_count: Optional[int] = None):
    """(train pixels, train labels, val pixels) from the run's split (never the test split)."""
    from .images import image_set

    tr_px, tr_y, _ = image_set(ckpt_dir, data_dir, "train", fit_count, size)
    va_px, _, _ = image_set(ckpt_dir, data_dir, "val", val_count, size)
    return tr_px, tr_y, va_px


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_export.domain",
                                description="Add (or refresh) out-of-domain statistics in existing cxr model files.",
                                epilog="example: python -m cxr_export.domain runs/gpu2/vgg16 runs/export/vgg16_int8.onnx"
                                       " --data .data/train")
    p.add_argument("checkpoint", help="the cxr-train run folder of the model (its split.json says train / val)")
    p.add_argument("models", nargs="+", help="model file(s) of that run, updated in place unless --out")
    p.add_argument("--data", required=True, help="the training folder the checkpoint was trained on")
    p.add_argument("--out", help="write here instead of in place (one model only)")
    p.add_argument("--fit-count", type=int, default=DEFAULT_FIT_COUNT, help="train images, class-balanced (default 1500)")
    p.add_argument("--val-count", type=int, default=0, help="val images for the threshold (default 0 = all)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="eigenvectors kept exactly (default 256)")
    p.add_argument("--flag-rate", type=float, default=DEFAULT_FLAG_RATE,
                   help="share of in-domain (val) images flagged (default 0.05)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.out and len(args.models) > 1:
        p.error("--out takes one model")
    sets: Dict[Tuple[int, int], Any] = {}
    for path in args.models:
        spec = read_spec(path)
        size = spec.image_size
        if size not in sets:
            sets[size] = load_sets(args.checkpoint, args.data, size, args.fit_count, args.val_count or None)
        tr_px, tr_y, va_px = sets[size]
        block = add_domain_stats(path, tr_px, tr_y, va_px, args.out, args.rank, args.flag_rate, args.threads,
                                 source=str(args.data))
        print(f"{args.out or path}: domain threshold {block['threshold']:.4g} (val flag rate "
              f"{block['flag_rate_validation']:.3f}), {block['fit']['images']} train images, rank {block['rank']}, "
              f"shrinkage {block['shrinkage']:.3f}, {block['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
