"""Domain statistics: does an image lie inside the model's training domain?

Method (why this one): a Mahalanobis distance in the model's own pooled penultimate feature
space (the ``features`` output), to the nearest class mean, with one covariance shared by the
classes and shrunk towards a multiple of the identity with the Ledoit-Wolf formula. It needs
only a few statistics (no training images in the file, unlike a k-nearest-neighbour
distance), is a known strong baseline for out-of-distribution detection on penultimate
features (Lee et al. 2018), and the shrinkage keeps the inverse stable with ~1,500 images in
512 or 2,048 dimensions.

Several branches, because pooled features alone are not enough. Global average pooling throws
the image's layout away: an upside-down or heavily cropped X-ray has ordinary features
(measured on VGG16 INT8: AUROC 0.51 and 0.38 against test X-rays). And the last layer is not
the best place to see a change of population: adult chest X-rays from other hospitals are told
from the test X-rays far better by the statistics of the *intermediate* stages (texture,
exposure and edge statistics; the "feature ensemble" of Lee et al. 2018) and by the coarse
shape of the image. The branches are:

    features      the distance above on the ``features`` output
    thumb16       the same distance on a 16 x 16 thumbnail of the model's input (an
                  AveragePool of the normalised image, 768 numbers), *standardised per image*
                  (zero mean, unit variance): layout and colour, free of the exposure and
                  contrast that vary between X-rays and would otherwise dominate the covariance
    thumb8        the same on an 8 x 8 thumbnail (192 numbers, a better-conditioned covariance)
    thumb4        the same on a 4 x 4 thumbnail (48 numbers): the overall shape of the chest in
                  the frame (an adult chest fills it differently from a 1-5 year old's)
    orientation   log d2(thumb16) - log d2(thumb16 rotated 180 degrees): how much nearer the
                  training X-rays the image lies upside down than as given (a likelihood-ratio
                  test of "is it upright?", which a distance alone answers poorly because a
                  flipped chest is still chest-like)
    stage1..4     the distance on the channel means and standard deviations (GlobalAveragePool
                  of x and of x * x; 2 C numbers) of the end of each of the backbone's first four
                  stages (:data:`STAGE_TAPS`; in an INT8 file the DequantizeLinear output the next
                  layer reads, so the classifier's own nodes are untouched)

Measured (fitted on the train part, calibrated on val, 5% of val flagged; Kermany test split
and ``../shared/data/foreign_cxr``, the latter for measuring only, never fitted on), the four
old branches vs. these nine, VGG16 / ResNet50 / InceptionV3 INT8: adult frontal X-rays flagged
47 / 58 / 53% -> 87 / 82 / 89% (AUROC against the test X-rays 0.905 / 0.963 / 0.950 -> 0.971 /
0.981 / 0.979), lateral 92 / 100 / 92% -> 100%, CT 100%, test split 3.2 / 1.8 / 1.8% -> at
most 5%, and every kind ``cxr-bench domain`` builds still 100%. Tried and not kept: the last
stage's statistics (adds nothing to ``features``; on VGG16 INT8 the deeper stages separate
adults poorly, AUROC 0.65-0.80), a 2 x 2 grid of each stage (no better than mean and std),
log-statistics, a lower rank, a 32 x 32 thumbnail (worse: too many dimensions for 1,500
images), and the *sum* of the standardised terms instead of their largest (better on some
models for adults, but it loses upside-down and vertically flipped X-rays on VGG16 and no
longer says which test fired).

Also tried (2026-11-29, on cached statistics; measured on ``foreign_cxr`` and chosen against it,
so read these as leads, not as evidence), none of which closes the gap to 95% of adults:
k-nearest-neighbour distances instead of Mahalanobis on the same inputs (ResNet50 adults 84-91%
alone, 82% in the max), a Mahalanobis distance on the vector of branch terms (70-96%, with the
test split at up to 6%), and a small CNN trained on train images against synthetic
"adult-like" stretching and zooming of them (AUROC 0.14: adults looked *less* transformed).
One candidate looked like the answer and was a trap: the log mean absolute detail of a 2 x 2
average-pool pyramid (5 levels, a model-free texture statistic) flagged 96% of adults on its
own and 93-96% in the max. But it flagged 72% of the 160 full-size Kermany originals read
through the runtime (``../shared/data/kermany_fullres``): its signal was the finest level, where
the offline-resized, re-saved 224 px training and test JPEGs differ from any image the runtime
resizes itself. Without that level it flagged 26% of adults. ``cxr-bench domain --originals``
reports that control; every branch must keep it near the test split's rate.

Each branch value ``v`` is mapped to ``(v - centre) / scale`` with ``centre`` its median and
``centre + scale`` its 95th percentile on the *validation* images (out of sample, so a branch
that overfits its fitting images gets no unfair weight), and the score is the largest of them;
``domain_terms`` ([N, branches]) holds every term, so the runtime can say which test fired.

Storage (why in the graph): the statistics become FP32 initializers of a few extra nodes
appended to the graph after ``features``, with a new output ``domain_score`` ([N]). The
runtime then needs nothing but the output name and the threshold from the spec
(``outputs.domain_score``, ``domain.threshold``), no linear algebra of its own, and the
classification path (``probabilities``) is untouched: same nodes, same weights, same numbers.

Compactness: the full inverse of a 2,048 x 2,048 covariance would add 16 MB. We keep the top
``rank`` eigenvectors of the shrunk covariance exactly and replace the remaining eigenvalues
by their mean (the probabilistic-PCA form of the covariance), so that

    d_c^2 = |z_c|^2 / s2  +  sum_i p_ci^2 (1 / l_i - 1 / s2),   z_c = f - mu_c,  p_c = V^T z_c

costs one [C, rank] matrix (2 MB at C = 2,048, rank = 256). With ``rank >= C`` it is the exact
shrunk Mahalanobis distance. A branch's distance is ``sqrt(min_c d_c^2)``.

Cost: every call pays for these nodes, whatever outputs it asks for (onnxruntime runs every node
of a graph). At batch 1 with 2 threads the 201 nodes add 11% / 30% / 18% to the shipped VGG16 /
ResNet50 / InceptionV3 INT8 classifiers (benchmarks/results/latency-checks-b1.md): about a
third in the stage statistics and the layout transposes onnxruntime inserts to read NHWC
tensors in NCHW, the rest in the nine distance chains, whose many small nodes cost more in
dispatch than in arithmetic at batch 1. Tried and not kept (2026-11-29): the same math in fewer
nodes (ReduceMean stage statistics that onnxruntime could read in NHWC, the 8 x 8 and 4 x 4
thumbnails pooled from the 16 x 16 one, one eigenvector product per branch instead of one per
class, every branch's tail as one [N, B] expression: 201 -> 173 nodes) took the ResNet50 file
from 11.68 to 11.60 ms, within noise. Reading each stage tensor at every second row and column
(a Slice before its dequantization; timed only, not refitted) took the check's cost from 26% to
21% (ResNet50), 16% to 10% (VGG16) and 17% to 14% (InceptionV3) in one run. Reaching 5% needs
fewer branches or tensors, not tidier nodes. About half of the Grad-CAM graph's cost (heatmap.py) is one duplicated weight dequantization.

Fitting and calibration: statistics are fitted on up to ``fit_count`` class-balanced images of
the *train* part of the run's split, through the model file itself (so an INT8 file gets
statistics of its own, quantized features); centres, scales and the threshold come from the
*val* part, the threshold being the (1 - ``flag_rate``) quantile of the graph's scores there,
so about ``flag_rate`` of in-domain images are flagged. The test split is never read.

Standalone use, to add (or refresh) statistics in an existing model file::

    python -m cxr_export.domain runs/gpu2/vgg16 runs/export/vgg16_int8.onnx --data .data/train

Example:
    >>> block = add_domain_stats("m.onnx", train_px, train_y, val_px, "m_dom.onnx")   # doctest: +SKIP
    >>> block["threshold"], block["flag_rate_validation"]                            # doctest: +SKIP
    (1.31, 0.05)
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from cxr_infer.model import graph_input
from cxr_infer.spec import ModelSpec

from .modelio import open_model, read_spec, spec_without_graphs, write_spec

DOMAIN_OUTPUT = "domain_score"
#: [N, branches]: each branch's standardised term, so the runtime can say which test fired
TERMS_OUTPUT = "domain_terms"
PREFIX = "cxr_domain/"
METHOD = ("max of branches, each standardised on validation (median 0, 95th percentile 1): Mahalanobis "
          "distance on pooled features, on a per-image standardised 16x16, 8x8 and 4x4 input thumbnail, an "
          "upright-vs-180-degrees log-likelihood ratio on the 16x16 thumbnail, and on the channel means and "
          "standard deviations of the backbone's first four stage outputs; class means, shared "
          "Ledoit-Wolf-shrunk covariance, top-rank eigenvectors exact + mean tail")
DEFAULT_FIT_COUNT = 1500
DEFAULT_RANK = 256
DEFAULT_FLAG_RATE = 0.05
THUMB = 16          # thumbnail side of the layout branch
THUMB_COARSE = 8    # and of the coarse one
THUMB_COARSEST = 4  # and of the coarsest one (the overall shape of the chest: 48 numbers)
THUMB_GRIDS = (THUMB, THUMB_COARSE, THUMB_COARSEST)
#: stage outputs whose channel means and standard deviations get a branch each, per backbone (the
#: torch-export tensor names; in an INT8 QDQ file the branch reads the DequantizeLinear output that the
#: next layer reads). Chosen by rule: the end of each of the backbone's first four stages (VGG16: the
#: max-pool closing blocks 1 to 4; ResNet50: the stem max-pool and the ends of layer1..layer3;
#: InceptionV3: the two stem max-pools, Mixed_5d and Mixed_6e). The last stage is left out: it is what
#: the ``features`` branch already pools.
STAGE_TAPS: Dict[str, Tuple[str, ...]] = {
    "vgg16": ("/features.4/MaxPool_output_0", "/features.9/MaxPool_output_0", "/features.16/MaxPool_output_0",
              "/features.23/MaxPool_output_0"),
    "resnet50": ("/maxpool/MaxPool_output_0", "/relu_9/Relu_output_0", "/relu_21/Relu_output_0",
                 "/relu_39/Relu_output_0"),
    "inception_v3": ("/maxpool1/MaxPool_output_0", "/maxpool2/MaxPool_output_0", "/Concat_2_output_0",
                     "/Concat_7_output_0"),
}
STD_EPS = 1e-6      # added to a thumbnail's variance before dividing (a flat image stays finite)
LOG_EPS = 1e-6      # added to squared distances before the orientation branch's logarithm
CENTRE_Q, SCALE_Q = 0.5, 0.95


@dataclass
class DomainStats:
    """What the graph needs: class means [K, C], eigenvectors [C, r], eigenvalues [r], tail variance."""

    means: np.ndarray
    vectors: np.ndarray
    eigenvalues: np.ndarray
    tail_variance: float
    shrinkage: float
    n_images: int

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
    """One term of the score: ``(value - centre) / scale``.

    ``kind`` "distance": ``value = sqrt(d2(x))``; "orientation": ``value = log(d2(x) + eps) -
    log(d2(rot180(x)) + eps)``. ``source`` is a graph output name (the features),
    ``"thumbnail"`` with ``grid`` its side, or ``"stage"`` with ``tensor`` the 4-D graph tensor
    whose channel means and standard deviations (``[N, 2 C]``) are the branch's input.
    """

    name: str
    kind: str
    source: str
    stats: DomainStats
    grid: int = 0
    centre: float = 0.0
    scale: float = 1.0
    tensor: str = ""

    def values(self, x: np.ndarray) -> np.ndarray:
        """The raw branch value for inputs ``x`` [N, C] (features, or standardised thumbnails)."""
        if self.kind == "distance":
            return np.sqrt(self.stats.d2(x))
        if self.kind == "orientation":
            return np.log(self.stats.d2(x) + LOG_EPS) - np.log(self.stats.d2(rotate180(x, self.grid)) + LOG_EPS)
        raise ValueError(f"unknown branch kind {self.kind!r}")

    def describe(self, model_input: str) -> Dict[str, Any]:
        src = (f"{self.grid}x{self.grid} thumbnail (AveragePool) of {model_input}, standardised per image"
               if self.source == "thumbnail" else
               f"channel means and standard deviations of {self.tensor}" if self.source == "stage" else self.source)
        return {"name": self.name, "kind": self.kind, "input": src, "dim": int(self.stats.means.shape[1]),
                "rank": int(self.stats.vectors.shape[1]), "shrinkage": self.stats.shrinkage,
                "tail_variance": self.stats.tail_variance, "centre": self.centre, "scale": self.scale}


def rotate180(x: np.ndarray, grid: int) -> np.ndarray:
    """Flattened [N, 3 * g * g] thumbnails turned upside down (180 degrees)."""
    n = len(x)
    return x.reshape(n, -1, grid, grid)[:, :, ::-1, ::-1].reshape(n, -1)


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
    """The graph outputs ``names`` (float64) for uint8 NHWC ``pixels``, through the runtime's model layer."""
    outs = open_model(model_path, threads, spec).run(pixels, names, batch_size)
    return [np.asarray(v, np.float64) for v in outs]


def strip_domain_graph(model) -> None:
    """Remove nodes, initializers and output added by :func:`add_domain_graph` (in place)."""
    from .modelio import strip_added_nodes

    strip_added_nodes(model, PREFIX, (DOMAIN_OUTPUT, TERMS_OUTPUT))


def resolve_tap(model, tensor: str) -> str:
    """The tensor a stage branch reads for ``tensor``: in a QDQ graph the output of the
    DequantizeLinear that follows its QuantizeLinear (what the next layer reads, so the classifier's
    own nodes keep their single consumer); otherwise ``tensor`` itself."""
    g = model.graph
    known = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    if tensor not in known:
        raise ValueError(f"the graph has no tensor {tensor!r} for a stage branch")
    for q in g.node:
        if q.op_type == "QuantizeLinear" and q.input[0] == tensor:
            for d in g.node:
                if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]:
                    return d.output[0]
    return tensor


def tensor_elem_type(model, tensor: str) -> int:
    """The ONNX element type of ``tensor`` (declared, or by shape inference; FLOAT when unknown)."""
    from onnx import TensorProto, shape_inference

    g = model.graph
    for v in list(g.value_info) + list(g.output) + list(g.input):
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an uninferable graph: assume FP32, as cxr's graphs are
        return TensorProto.FLOAT
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    return TensorProto.FLOAT


def stage_feature_nodes(model, tensor: str, key: str) -> Tuple[List[Any], str]:
    """FP32 nodes computing ``[N, 2 C]``: the channel means and standard deviations of ``tensor``
    (an FP16 file's tensor is cast to FP32 first, so the statistics and the distances stay FP32)."""
    from onnx import TensorProto, helper

    x = resolve_tap(model, tensor)
    nodes: List[Any] = []

    def node(op: str, ins: List[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [key + out], name=key + out, **kw))
        return key + out

    if tensor_elem_type(model, x) == TensorProto.FLOAT16:
        x = node("Cast", [x], "x32", to=TensorProto.FLOAT)
    mean = node("Flatten", [node("GlobalAveragePool", [x], "gap")], "mean", axis=1)
    msq = node("Flatten", [node("GlobalAveragePool", [node("Mul", [x, x], "x2")], "gap2")], "msq", axis=1)
    var = node("Relu", [node("Sub", [msq, node("Mul", [mean, mean], "mean2")], "var0")], "var")
    feat = node("Concat", [mean, node("Sqrt", [var], "sd")], "feat", axis=1)
    return nodes, feat


def stage_features(model_path: str | Path, spec: ModelSpec, pixels: np.ndarray, tensors: List[str],
                   batch_size: int = 32, threads: int = 0) -> List[np.ndarray]:
    """Each stage branch's input ``[N, 2 C]`` for ``pixels``, computed by the same nodes the domain
    graph appends (run on a copy of the file with those nodes as extra outputs)."""
    import onnx
    from onnx import TensorProto, helper

    if not tensors:
        return []
    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    spec = spec_without_graphs(spec, domain=True)  # the probe has no domain outputs, whatever the spec says
    names = []
    for i, t in enumerate(tensors):
        nodes, feat = stage_feature_nodes(model, t, f"{PREFIX}probe{i + 1}/")
        model.graph.node.extend(nodes)
        model.graph.output.append(helper.make_tensor_value_info(feat, TensorProto.FLOAT, None))
        names.append(feat)
    from cxr_infer.model import ModelFile

    m = ModelFile(model.SerializeToString(), threads=threads or None, spec=spec)
    return [np.asarray(v, np.float64) for v in m.run(pixels, names, batch_size)]


def default_taps(spec: ModelSpec, model_path: str | Path) -> List[str]:
    """The stage tensors of :data:`STAGE_TAPS` for this file's backbone that its graph has (none for
    other backbones: they get the thumbnail and features branches only)."""
    import onnx

    wanted = STAGE_TAPS.get(str(spec.raw.get("backbone", "")), ())
    if not wanted:
        return []
    model = onnx.load(str(model_path), load_external_data=False)
    known = {o for n in model.graph.node for o in n.output}
    return [t for t in wanted if t in known]


def _opset(model) -> int:
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [13])


def add_domain_graph(model_path: str | Path, branches: List[Branch], out_path: Optional[str | Path] = None,
                     kernels: Optional[Dict[int, Tuple[int, int]]] = None) -> Path:
    """Append the FP32 nodes computing ``domain_score`` [N] = max over ``branches``; write the file.

    ``kernels`` maps a thumbnail grid to its AveragePool kernel (default: 224 / grid). Any
    earlier domain graph is replaced; nothing else changes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    graph = model.graph
    outputs = [o.name for o in graph.output]
    opset = _opset(model)
    prefix = PREFIX
    nodes: List[Any] = []
    inits: Dict[str, np.ndarray] = {prefix + "axis1": np.array([1], np.int64),
                                    prefix + "axes123": np.array([1, 2, 3], np.int64),
                                    prefix + "std_eps": np.array(STD_EPS, np.float32),
                                    prefix + "log_eps": np.array(LOG_EPS, np.float32)}

    def node(op: str, ins: List[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    def reduce(op: str, x: str, axes: str, out: str) -> str:
        if opset >= 18:
            return node(op, [x, prefix + axes], out, keepdims=1 if op == "ReduceMean" else 0)
        return node(op, [x], out, axes=inits[prefix + axes].tolist(), keepdims=1 if op == "ReduceMean" else 0)

    thumbs: Dict[int, Tuple[str, str]] = {}  # grid -> (standardised [N, 3, grid, grid], flattened)
    x32: List[str] = []  # the graph input as FP32, made once if a thumbnail needs it

    def thumbnail(grid: int) -> Tuple[str, str]:
        """(standardised [N, 3, grid, grid], flattened [N, 3 grid grid]) for the graph input."""
        if grid in thumbs:
            return thumbs[grid]
        names = f"{prefix}thumb{grid}/"
        if not x32:
            x = graph.input[0].name
            fp32 = graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
            x32.append(x if fp32 else node("Cast", [x], prefix + "x32", to=TensorProto.FLOAT))
        x = x32[0]
        kernel = list((kernels or {}).get(grid, (224 // grid, 224 // grid)))
        x = node("AveragePool", [x], names + "pooled", kernel_shape=kernel, strides=kernel)
        centred = node("Sub", [x, reduce("ReduceMean", x, "axes123", names + "mean")], names + "centred")
        var = reduce("ReduceMean", node("Mul", [centred, centred], names + "sq"), "axes123", names + "var")
        sd = node("Sqrt", [node("Add", [var, prefix + "std_eps"], names + "var_eps")], names + "sd")
        x4 = node("Div", [centred, sd], names + "std")
        thumbs[grid] = (x4, node("Flatten", [x4], names + "flat", axis=1))
        return thumbs[grid]

    stages: Dict[str, str] = {}  # tensor -> its [N, 2C] channel means and standard deviations

    def stage(tensor: str) -> str:
        if tensor not in stages:
            new_nodes, feat = stage_feature_nodes(model, tensor, f"{prefix}stage{len(stages) + 1}/")
            nodes.extend(new_nodes)
            stages[tensor] = feat
        return stages[tensor]

    done: Dict[Tuple[str, int], str] = {}
    stats_prefix: Dict[int, str] = {}

    def d2(x: str, stats: DomainStats, branch: str, tag: str) -> str:
        """Squared distance [N] of ``x`` [N, C] to the nearest class mean (computed once per input and stats)."""
        if (x, id(stats)) in done:
            return done[(x, id(stats))]
        key = stats_prefix.setdefault(id(stats), branch)
        if key == branch:
            inv_tail = 1.0 / stats.tail_variance
            inits.update({key + "means": stats.means.astype(np.float32),
                          key + "vectors": stats.vectors.astype(np.float32),
                          key + "weights": (1.0 / stats.eigenvalues - inv_tail).astype(np.float32),
                          key + "inv_tail": np.full((stats.means.shape[1],), inv_tail, np.float32)})
        name = branch + tag
        f3 = node("Unsqueeze", [x, prefix + "axis1"], name + "f3")                      # [N, 1, C]
        z = node("Sub", [f3, key + "means"], name + "z")                              # [N, K, C]
        iso = node("MatMul", [node("Mul", [z, z], name + "z2"), key + "inv_tail"], name + "iso")        # [N, K]
        p = node("MatMul", [z, key + "vectors"], name + "p")                          # [N, K, r]
        corr = node("MatMul", [node("Mul", [p, p], name + "p2"), key + "weights"], name + "corr")     # [N, K]
        done[(x, id(stats))] = reduce("ReduceMin", node("Add", [iso, corr], name + "d2all"), "axis1", name + "d2")
        return done[(x, id(stats))]

    terms = []
    for index, br in enumerate(branches):
        branch = f"{prefix}b{index}/"
        if br.source == "thumbnail":
            x4, x = thumbnail(br.grid)
        elif br.source == "stage":
            x4, x = "", stage(br.tensor)
        elif br.source in outputs:
            x4, x = "", br.source
        else:
            raise ValueError(f"{model_path}: the graph has no {br.source!r} output to compute a domain score from")
        if br.kind == "distance":
            value = node("Sqrt", [node("Relu", [d2(x, br.stats, branch, "")], branch + "d2pos")], branch + "value")
        elif br.kind == "orientation":
            if not x4:
                raise ValueError("the orientation branch works on a thumbnail")
            flip = np.ascontiguousarray(np.eye(br.grid, dtype=np.float32)[::-1])
            inits[branch + "flip"] = flip
            rot_w = node("MatMul", [x4, branch + "flip"], branch + "rot_w")
            rot = node("MatMul", [branch + "flip", rot_w], branch + "rot")
            rot = node("Flatten", [rot], branch + "rot_flat", axis=1)
            up_eps = node("Add", [d2(x, br.stats, branch, ""), prefix + "log_eps"], branch + "up_eps")
            down_eps = node("Add", [d2(rot, br.stats, branch, "rot_"), prefix + "log_eps"], branch + "down_eps")
            up = node("Log", [up_eps], branch + "log_up")
            down = node("Log", [down_eps], branch + "log_down")
            value = node("Sub", [up, down], branch + "value")
        else:
            raise ValueError(f"unknown branch kind {br.kind!r}")
        inits[branch + "centre"] = np.array(br.centre, np.float32)
        inits[branch + "inv_scale"] = np.array(1.0 / br.scale, np.float32)
        centred = node("Sub", [value, branch + "centre"], branch + "centred")
        terms.append(node("Mul", [centred, branch + "inv_scale"], branch + "term"))
    node("Max", terms, DOMAIN_OUTPUT) if len(terms) > 1 else node("Identity", terms, DOMAIN_OUTPUT)
    nodes[-1].name = prefix + DOMAIN_OUTPUT
    columns = [node("Unsqueeze", [term, prefix + "axis1"], term + "_col") for term in terms]
    node("Concat", columns, TERMS_OUTPUT, axis=1)
    nodes[-1].name = prefix + TERMS_OUTPUT
    graph.initializer.extend(numpy_helper.from_array(array, key) for key, array in inits.items())
    graph.node.extend(nodes)
    batch = None
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims):
        batch = dims[0].dim_param or dims[0].dim_value or None
    graph.output.append(helper.make_tensor_value_info(DOMAIN_OUTPUT, TensorProto.FLOAT, [batch]))
    graph.output.append(helper.make_tensor_value_info(TERMS_OUTPUT, TensorProto.FLOAT, [batch, len(terms)]))
    out = Path(out_path or model_path)
    onnx.save(model, str(out))
    return out


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
    """The threshold above which ``flag_rate`` of the validation scores lie."""
    if not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag rate {flag_rate} must be in (0, 1)")
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - flag_rate, method="higher"))


def branch_inputs(spec: ModelSpec, pixels: np.ndarray, feats: np.ndarray,
                  stages: Optional[List[np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Each branch source's numbers for ``pixels``: the features, the standardised thumbnails and
    the stage statistics (``stages``, from :func:`stage_features`) as ``stage1``, ``stage2``, ..."""
    out = {"features": feats}
    out.update({f"thumb{g}": thumbnails(spec, pixels, g) for g in THUMB_GRIDS})
    out.update({f"stage{i + 1}": s for i, s in enumerate(stages or [])})
    return out


def fit_branches(spec: ModelSpec, feat_name: str, train: Dict[str, np.ndarray], labels: np.ndarray,
                 val: Dict[str, np.ndarray], rank: int = DEFAULT_RANK, taps: Optional[List[str]] = None,
                 features_branch: bool = True) -> Tuple[List[Branch], List[str], np.ndarray]:
    """The branches fitted on ``train`` and standardised on ``val``, which input each reads, and
    their standardised validation terms ``[branches, N]``. ``taps``: the tensors of the stage
    branches (``train`` and ``val`` hold their statistics as ``stage1``, ``stage2``, ...).
    ``features_branch=False`` leaves out the branch on the pooled features (see
    :func:`add_domain_stats`)."""
    s16 = fit_stats(train[f"thumb{THUMB}"], labels, rank)
    s8 = fit_stats(train[f"thumb{THUMB_COARSE}"], labels, rank)
    s4 = fit_stats(train[f"thumb{THUMB_COARSEST}"], labels, rank)
    branches = [Branch(f"thumb{THUMB}", "distance", "thumbnail", s16, THUMB),
                Branch(f"thumb{THUMB_COARSE}", "distance", "thumbnail", s8, THUMB_COARSE),
                Branch(f"thumb{THUMB_COARSEST}", "distance", "thumbnail", s4, THUMB_COARSEST),
                Branch("orientation", "orientation", "thumbnail", s16, THUMB)]
    keys = [f"thumb{THUMB}", f"thumb{THUMB_COARSE}", f"thumb{THUMB_COARSEST}", f"thumb{THUMB}"]
    if features_branch:
        branches.insert(0, Branch("features", "distance", feat_name, fit_stats(train["features"], labels, rank)))
        keys.insert(0, "features")
    for i, tensor in enumerate(taps or []):
        key = f"stage{i + 1}"
        branches.append(Branch(key, "distance", "stage", fit_stats(train[key], labels, rank), tensor=tensor))
        keys.append(key)
    terms = []
    for br, k in zip(branches, keys):
        v = br.values(val[k])
        standardise_branch(br, v)
        terms.append((v - br.centre) / br.scale)
    return branches, keys, np.stack(terms)


def add_domain_stats(model_path: str | Path, train_pixels: np.ndarray, train_labels: np.ndarray,
                     val_pixels: np.ndarray, out_path: Optional[str | Path] = None, rank: int = DEFAULT_RANK,
                     flag_rate: float = DEFAULT_FLAG_RATE, threads: int = 0, source: str = "",
                     taps: Optional[List[str]] = None, features_branch: bool = True) -> Dict[str, Any]:
    """Fit on ``train_pixels`` through this file's own features, standardise and calibrate on ``val_pixels``.

    ``taps``: the graph tensors that get a stage branch each (default :func:`default_taps`, by the
    spec's backbone; ``[]`` for none). ``features_branch=False`` leaves out the branch on the
    pooled features: measured on 2026-11-29, it is the branch INT8 rounding moves most (an
    engine's integer kernels move ResNet50's by up to 0.97 of its threshold, its stage
    statistics by at most 0.09), and without it the shipped files' own terms flagged 88.0 / 81.0
    / 93.0% of foreign_cxr's adults against 86.7 / 82.3 / 89.2% (a lead chosen after looking at
    that set, not yet shipped). Writes ``out_path`` (default: in place) and returns the spec's new
    ``domain`` block. The probabilities output is checked to be bit-identical before and after.
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
    train_in = branch_inputs(spec, train_pixels, feats,
                             stage_features(model_path, spec, train_pixels, taps, threads=threads))
    val_in = branch_inputs(spec, val_pixels, val_feats,
                           stage_features(model_path, spec, val_pixels, taps, threads=threads))
    branches, keys, val_terms = fit_branches(spec, feat_name, train_in, train_labels, val_in, rank, taps,
                                             features_branch)
    kernels = {grid: pool_kernel(spec, grid) for grid in THUMB_GRIDS}
    add_domain_graph(model_path, branches, out, kernels)
    (val_scores,) = run_outputs(out, spec, val_pixels, [DOMAIN_OUTPUT], threads=threads)
    k = min(16, len(train_pixels))
    probs_after, train_scores = run_outputs(out, spec, train_pixels[:k], [spec.prob_output, DOMAIN_OUTPUT],
                                            threads=threads)
    ref = reference_scores(branches, [train_in[key][:k] for key in keys])
    graph_vs_numpy = float(np.max(np.abs(train_scores - ref) / np.maximum(np.abs(ref), 1.0))) if len(ref) else 0.0
    if not np.array_equal(probs_after, probs_before[:k]):
        raise RuntimeError(f"{out}: adding the domain graph changed the probabilities (a bug)")
    if graph_vs_numpy > 0.05:
        raise RuntimeError(f"{out}: the graph's domain score differs from the numpy reference by {graph_vs_numpy:.3g} "
                           "(a bug)")
    threshold = calibrate(val_scores, flag_rate)
    deciding = {br.name: float(np.mean((np.argmax(val_terms, 0) == j) & (val_scores > threshold)))
                for j, br in enumerate(branches)}
    block = {
        "method": METHOD,
        "score": "max over branches of (value - centre) / scale; a branch's value is sqrt(min over classes of the "
                 "squared Mahalanobis distance), or for orientation log(d2 upright) - log(d2 rotated 180 degrees)",
        "stage_tensors": taps,
        "threshold": threshold,
        "target_flag_rate": flag_rate,
        "flag_rate_validation": float(np.mean(val_scores > threshold)),
        "flagged_validation_by_branch": deciding,
        "features_output": feat_name,
        "branches": [br.describe(spec.input_name) for br in branches],
        "rank": int(branches[0].stats.vectors.shape[1]),
        "shrinkage": branches[0].stats.shrinkage,
        "fit": {"images": int(len(train_pixels)), "part": "train part of the split, class-balanced",
                "source": source},
        "calibration": {"images": int(len(val_pixels)), "part": "val part of the split",
                        "val_score_median": float(np.median(val_scores))},
        "graph_vs_numpy_max_diff": graph_vs_numpy,
        "probabilities_unchanged": True,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    new = spec.copy()
    new.raw["outputs"] = dict(new.raw["outputs"], domain_score=DOMAIN_OUTPUT, domain_terms=TERMS_OUTPUT)
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
    p.add_argument("--taps", default=None, metavar="T1,T2|none",
                   help="graph tensors that get a stage branch (channel means and standard deviations), comma-"
                        "separated; 'none' for no stage branches (default: by the spec's backbone, see STAGE_TAPS)")
    p.add_argument("--no-features-branch", dest="features_branch", action="store_false",
                   help="leave out the branch on the pooled features (the one INT8 rounding moves most; "
                        "see add_domain_stats)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    taps = None if args.taps is None else [t for t in args.taps.split(",") if t and args.taps != "none"]
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
                                 source=str(args.data), taps=taps, features_branch=args.features_branch)
        print(f"{args.out or path}: domain threshold {block['threshold']:.4g} (val flag rate "
              f"{block['flag_rate_validation']:.3f}), {block['fit']['images']} train images, rank {block['rank']}, "
              f"shrinkage {block['shrinkage']:.3f}, {len(block['branches'])} branches, {block['seconds']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
