"""The image check as graph nodes: ``domain_score`` and ``domain_terms`` appended after the classifier.

Every branch's statistics (:mod:`cxr_export.domain.stats`) become FP32 initializers of one chain
of nodes named under :data:`PREFIX`, so the runtime reads only outputs and a threshold, and the
classifier's nodes and probabilities are untouched. The graph and its cost:
``docs/design/domain-check.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..onnxgraph import NodeWriter, strip_prefixed
from .stages import stage_nodes
from .stats import LOG_EPS, STD_EPS, Branch, DomainStats, rotate180

DOMAIN_OUTPUT = "domain_score"
#: [N, branches]: each branch's standardised term, so the runtime can say which test fired
TERMS_OUTPUT = "domain_terms"
#: the name prefix of every node and initializer the check adds
PREFIX = "cxr_domain/"


def strip_domain_graph(model: Any) -> None:
    """Remove the nodes, initializers and outputs added by :func:`add_domain_graph` (in place)."""
    strip_prefixed(model, PREFIX, (DOMAIN_OUTPUT, TERMS_OUTPUT))


class _Builder(NodeWriter):
    """The nodes being appended, and the inputs already made (each made once)."""

    def __init__(self, model: Any, kernels: Optional[Dict[int, Tuple[int, int]]]) -> None:
        super().__init__(model, PREFIX, axis1=np.array([1], np.int64), axis2=np.array([2], np.int64),
                         axes123=np.array([1, 2, 3], np.int64), std_eps=np.array(STD_EPS, np.float32),
                         log_eps=np.array(LOG_EPS, np.float32))
        self.kernels = kernels or {}
        self.x32: Optional[str] = None  # the graph input as FP32, made once if a thumbnail needs it
        self.pooled: Dict[int, str] = {}  # grid -> raw [N, 3, grid, grid] average
        self.thumbs: Dict[int, str] = {}  # grid -> standardised, flattened [N, 3 grid grid]
        self.stages: Dict[str, str] = {}  # tensor -> its [N, 2C] channel means and standard deviations
        self.units: Dict[str, Tuple[float, np.ndarray]] = {}  # such an input in quantized units -> (scale, offset)
        self.pairs: List[Tuple[str, DomainStats]] = []  # every distinct (input, statistics) a branch needs

    def kernel(self, grid: int) -> Tuple[int, int]:
        return tuple(self.kernels.get(grid, (224 // grid, 224 // grid)))

    def pool(self, grid: int) -> str:
        """The raw [N, 3, grid, grid] block averages of the graph input."""
        from onnx import TensorProto

        if grid in self.pooled:
            return self.pooled[grid]
        fine = next((g for g in sorted(self.pooled) if g > grid and g % grid == 0 and
                     self.kernel(grid) == tuple(k * (g // grid) for k in self.kernel(g))), None)
        name, k = f"thumb{grid}/", list(self.kernel(grid))
        source = self.model.graph.input[0]
        dims = [d.dim_value for d in source.type.tensor_type.shape.dim]
        if fine is not None:  # nested blocks: the coarse thumbnail averages the fine one
            x, k = self.pooled[fine], [fine // grid] * 2
        else:
            if self.x32 is None:
                fp32 = source.type.tensor_type.elem_type == TensorProto.FLOAT
                self.x32 = source.name if fp32 else self.node("Cast", [source.name], "x32", to=TensorProto.FLOAT)
            x = self.x32
        if fine is None and len(dims) == 4 and dims[2] >= k[0] and dims[3] >= k[1]:
            # two MatMuls, rows then columns: [oh, H] x (x [N, C, H, W] x [W, ow])
            rows = np.kron(np.eye(dims[2] // k[0]), np.full((1, k[0]), 1.0 / k[0]))
            cols = np.kron(np.eye(dims[3] // k[1]), np.full((k[1], 1), 1.0 / k[1]))
            rows = self.const(name + "rows", np.pad(rows, ((0, 0), (0, dims[2] - rows.shape[1]))).astype(np.float32))
            cols = self.const(name + "cols", np.pad(cols, ((0, dims[3] - cols.shape[0]), (0, 0))).astype(np.float32))
            self.pooled[grid] = self.node("MatMul", [rows, self.node("MatMul", [x, cols], name + "pooled_w")],
                                          name + "pooled")
        else:
            self.pooled[grid] = self.node("AveragePool", [x], name + "pooled", kernel_shape=k, strides=k)
        return self.pooled[grid]

    def thumbnail(self, grid: int) -> str:
        """The standardised, flattened [N, 3 grid grid] thumbnail of the graph input."""
        if grid not in self.thumbs:
            name = f"thumb{grid}/"
            x = self.pool(grid)
            centred = self.node("Sub", [x, self.along("ReduceMean", x, "axes123", name + "mean", keepdims=1)],
                                name + "centred")
            var = self.along("ReduceMean", self.node("Mul", [centred, centred], name + "sq"), "axes123",
                             name + "var", keepdims=1)
            sd = self.node("Sqrt", [self.node("Add", [var, PREFIX + "std_eps"], name + "var_eps")], name + "sd")
            self.thumbs[grid] = self.node("Flatten", [self.node("Div", [centred, sd], name + "std")], name + "flat",
                                          axis=1)
        return self.thumbs[grid]

    def stage(self, tensor: str, row_step: int) -> str:
        """A stage tensor's channel statistics (:func:`cxr_export.domain.stages.stage_nodes`)."""
        if tensor not in self.stages:
            new_nodes, feat, affine = stage_nodes(self.model, tensor, f"{PREFIX}stage{len(self.stages) + 1}/",
                                                  row_step)
            self.nodes.extend(new_nodes)
            self.stages[tensor] = feat
            if affine is not None:
                self.units[feat] = affine
        return self.stages[tensor]

    def pair(self, x: str, stats: DomainStats) -> int:
        """The index of the (input, statistics) pair, added when new."""
        for j, (y, st) in enumerate(self.pairs):
            if y == x and st is stats:
                return j
        self.pairs.append((x, stats))
        return len(self.pairs) - 1


def _read_branches(b: _Builder, branches: List[Branch], model_path: str | Path) -> List[Tuple[str, List[int]]]:
    """Make every branch's input; per branch, its kind and the (input, statistics) pairs it reads."""
    outputs = [o.name for o in b.model.graph.output]
    for grid in sorted({br.grid for br in branches if br.source == "thumbnail"}, reverse=True):
        b.pool(grid)  # finest first, so coarser ones can average it
    uses: List[Tuple[str, List[int]]] = []
    for index, br in enumerate(branches):
        if br.source == "thumbnail":
            x = b.thumbnail(br.grid)
        elif br.source == "stage":
            x = b.stage(br.tensor, br.row_step)
        elif br.source in outputs:
            x = br.source
        else:
            raise ValueError(f"{model_path}: the graph has no {br.source!r} output to compute a domain score from")
        if br.kind == "distance":
            uses.append((br.kind, [b.pair(x, br.stats)]))
        elif br.kind == "orientation":
            if br.source != "thumbnail":
                raise ValueError("the orientation branch works on a thumbnail")
            perm = rotate180(np.arange(br.stats.means.shape[1], dtype=np.int64)[None], br.grid)[0]
            rot = b.node("Gather", [x, b.const(f"b{index}/rot_index", perm)], f"b{index}/rot", axis=1)
            uses.append((br.kind, [b.pair(x, br.stats), b.pair(rot, br.stats)]))
        else:
            raise ValueError(f"unknown branch kind {br.kind!r}")
    return uses


def _pair_weights(b: _Builder, k_max: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair's Gemm weights and centre (initializers), and the matrices ``iso``, ``quad``, ``pick``
    that sum the terms of every pair's and class's squared distance (see the design page)."""
    dims = [st.means.shape[1] for _, st in b.pairs]
    ranks = [st.vectors.shape[1] for _, st in b.pairs]
    n_cols = len(b.pairs) * k_max
    iso = np.zeros((sum(dims), n_cols), np.float32)
    quad = np.zeros((sum(ranks) + n_cols, n_cols), np.float32)
    pick = np.zeros((sum(ranks) + n_cols, n_cols), np.float32)
    centres = []
    row, col = 0, 0
    for j, (x, st) in enumerate(b.pairs):
        means = st.means.astype(np.float64)
        means = np.concatenate([means, np.repeat(means[:1], k_max - len(means), 0)])  # pad: the min is unchanged
        vec = st.vectors.astype(np.float64)
        inv_tail = 1.0 / st.tail_variance
        w = 1.0 / st.eigenvalues - inv_tail
        centre = means.mean(0)
        delta = means - centre                                        # [K, C]
        q = delta @ vec                                               # [K, r]
        lin = -2.0 * (delta * inv_tail + (q * w) @ vec.T)             # [K, C]
        const = (delta * delta).sum(1) * inv_tail + (q * q) @ w       # [K]
        # an input in quantized units: its statistics are a (input - offset), so u = a (input - offset -
        # centre / a); the offset and 1 / a go into the centre, a into the weights
        a, offset = b.units.get(x, (1.0, 0.0))
        b.const(f"p{j}/W", (a * np.concatenate([vec, lin.T], 1)).astype(np.float32))
        b.const(f"p{j}/b", np.concatenate([np.zeros(ranks[j]), const]).astype(np.float32))
        centres.append(offset + centre / a)
        cols = slice(j * k_max, (j + 1) * k_max)
        iso[row:row + dims[j], cols] = a * a * inv_tail
        quad[col:col + ranks[j], cols] = w[:, None]
        pick[col + ranks[j]:col + ranks[j] + k_max, cols] = np.eye(k_max)
        row, col = row + dims[j], col + ranks[j] + k_max
    b.const("centres", np.concatenate(centres).astype(np.float32))
    return iso, quad, pick


def _centred(b: _Builder) -> Tuple[str, List[str]]:
    """``u = x - m`` for every pair at once (``[N, sum of dims]``), and each pair's part of it."""
    pairs = b.pairs
    inputs = b.node("Concat", [x for x, _ in pairs], "inputs", axis=1) if len(pairs) > 1 else pairs[0][0]
    u_all = b.node("Sub", [inputs, PREFIX + "centres"], "u")
    if len(pairs) == 1:
        return u_all, [u_all]
    dims = [st.means.shape[1] for _, st in pairs]
    split = b.const("split", np.array(dims, np.int64))
    parts = [f"{PREFIX}p{j}/u" for j in range(len(pairs))]
    b.node("Split", [u_all, split] if b.opset >= 13 else [u_all], "split", outputs=parts, axis=1,
           split=None if b.opset >= 13 else dims)
    return u_all, parts


def _projections(b: _Builder, parts: List[str]) -> str:
    """``y = [p, u . a_c + k_c]`` of every pair, one Gemm each (shared by two pairs with the same statistics)."""
    twin: Dict[int, int] = {}
    for j, (x, st) in enumerate(b.pairs):
        first = next(i for i, (_, other) in enumerate(b.pairs) if other is st)
        if first != j and x not in b.units and b.pairs[first][0] not in b.units and first not in twin.values():
            twin[first] = j
    gemm_out = [""] * len(b.pairs)
    for j, u in enumerate(parts):
        key = f"p{j}/"
        weights = [PREFIX + key + "W", PREFIX + key + "b"]
        if j in twin.values():
            continue
        if j in twin:
            k = twin[j]
            both = b.node("Gemm", [b.node("Concat", [u, parts[k]], key + "u_twin", axis=0)] + weights, key + "y_twin")
            halves = [PREFIX + key + "y", f"{PREFIX}p{k}/y"]
            b.node("Split", [both], key + "split_twin", outputs=halves, axis=0,
                   num_outputs=2 if b.opset >= 18 else None)
            gemm_out[j], gemm_out[k] = halves
            for name in ("W", "b"):
                del b.inits[f"{PREFIX}p{k}/{name}"]
        else:
            gemm_out[j] = b.node("Gemm", [u] + weights, key + "y")
    return b.node("Concat", gemm_out, "y", axis=1) if len(gemm_out) > 1 else gemm_out[0]


def _nearest_d2(b: _Builder, u_all: str, y: str, k_max: int, iso: np.ndarray, quad: np.ndarray,
                pick: np.ndarray) -> str:
    """Every pair's squared distance to its nearest class mean, ``[N, pairs]``."""
    node = b.node
    iso, quad, pick = b.const("iso", iso), b.const("quad", quad), b.const("pick", pick)
    d2_all = node("Add", [node("Add", [
        node("MatMul", [node("Mul", [u_all, u_all], "u2"), iso], "d2_iso"),
        node("MatMul", [node("Mul", [y, y], "y2"), quad], "d2_quad")], "d2_sum"),
        node("MatMul", [y, pick], "d2_lin")], "d2_classes")      # [N, pairs * K]
    shape = b.const("shape", np.array([-1, len(b.pairs), k_max], np.int64))
    d2 = b.along("ReduceMin", node("Reshape", [d2_all, shape], "d2_3d"), "axis2", "d2_min", keepdims=0)
    return node("Relu", [d2], "d2")


def _score(b: _Builder, branches: List[Branch], uses: List[Tuple[str, List[int]]], d2: str) -> None:
    """The standardised terms (``domain_terms``) and their largest (``domain_score``)."""
    node = b.node
    root = node("Sqrt", [d2], "distance")
    log = node("Log", [node("Add", [d2, PREFIX + "log_eps"], "d2_eps")], "log_d2")
    to_terms = np.zeros((len(b.pairs), len(branches)), np.float32)
    log_terms = np.zeros((len(b.pairs), len(branches)), np.float32)
    bias = np.zeros(len(branches), np.float32)
    for i, (br, (kind, js)) in enumerate(zip(branches, uses)):
        if kind == "distance":
            to_terms[js[0], i] = 1.0 / br.scale
        else:
            log_terms[js[0], i] += 1.0 / br.scale
            log_terms[js[1], i] -= 1.0 / br.scale
        bias[i] = -br.centre / br.scale
    to_terms, log_terms, bias = b.const("to_terms", to_terms), b.const("log_terms", log_terms), b.const("bias", bias)
    terms = node("Add", [node("MatMul", [root, to_terms], "t_distance"),
                         node("MatMul", [log, log_terms], "t_log")], "t_sum")
    node("Add", [terms, bias], TERMS_OUTPUT, outputs=[TERMS_OUTPUT])
    b.along("ReduceMax", TERMS_OUTPUT, "axis1", DOMAIN_OUTPUT, outputs=[DOMAIN_OUTPUT], keepdims=0)


def add_domain_graph(model_path: str | Path, branches: List[Branch], out_path: Optional[str | Path] = None,
                     kernels: Optional[Dict[int, Tuple[int, int]]] = None) -> Path:
    """Append (or replace) the nodes computing ``domain_score`` and ``domain_terms``; write the file.

    ``kernels``: each thumbnail grid's AveragePool kernel (default 224 / grid).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=True)
    strip_domain_graph(model)
    b = _Builder(model, kernels)
    uses = _read_branches(b, branches, model_path)
    k_max = max(st.means.shape[0] for _, st in b.pairs)
    iso, quad, pick = _pair_weights(b, k_max)
    u_all, parts = _centred(b)
    y = _projections(b, parts)
    _score(b, branches, uses, _nearest_d2(b, u_all, y, k_max, iso, quad, pick))
    b.write()
    dims = model.graph.output[0].type.tensor_type.shape.dim
    batch = (dims[0].dim_param or dims[0].dim_value or None) if len(dims) else None
    model.graph.output.append(helper.make_tensor_value_info(DOMAIN_OUTPUT, TensorProto.FLOAT, [batch]))
    model.graph.output.append(helper.make_tensor_value_info(TERMS_OUTPUT, TensorProto.FLOAT, [batch, len(branches)]))
    out = Path(out_path or model_path)
    onnx.save(model, str(out))
    return out
