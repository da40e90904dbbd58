"""Stage branches: the nodes that read a tensor inside the backbone for the image check.

A stage branch reads the channel means and standard deviations (``[N, 2 C]``) of an activation
named by the backbone's ``domain_taps``; in an INT8 file, the quantized tensor through a Cast, its
scale and zero point folded into the branch. Why: ``docs/design/domain-check.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.spec import ModelSpec
from cxr_train.backbones import BACKBONES

from ..onnxgraph import NodeWriter, producers, tensor_dims, tensor_elem_type

#: a stage tensor taller than this many rows is read on every second row (see the design page)
DEFAULT_STAGE_TALL_ROWS = 32


class _BackboneTaps(Mapping[str, Tuple[str, ...]]):
    """Backbone name -> its registry entry's ``domain_taps`` (backbones with taps only), read when asked."""

    def __getitem__(self, name: str) -> Tuple[str, ...]:
        if not getattr(BACKBONES.get(name), "domain_taps", None):
            raise KeyError(name)
        return tuple(BACKBONES[name].domain_taps)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, backbone in BACKBONES.items() if backbone.domain_taps])

    def __len__(self) -> int:
        return len(list(iter(self)))


#: the activations each backbone's stage branches read (torch-export tensor names), from the backbone registry
STAGE_TAPS: Mapping[str, Tuple[str, ...]] = _BackboneTaps()


def default_taps(spec: ModelSpec, model_path: str | Path) -> List[str]:
    """The stage tensors of the file's backbone (:data:`STAGE_TAPS`) that its graph has."""
    import onnx

    wanted = STAGE_TAPS.get(spec.backbone, ())
    if not wanted:
        return []
    known = producers(onnx.load(str(model_path), load_external_data=False).graph)
    return [t for t in wanted if t in known]


def per_tap(row_step: int | Sequence[int], count: int) -> List[int]:
    """One row step per stage tensor: ``row_step`` for each of ``count``, or the sequence as given."""
    return [row_step] * count if isinstance(row_step, int) else list(row_step)


def stage_row_steps(model_path: str | Path, tensors: Sequence[str], tall_rows: int) -> List[int]:
    """Every how many rows each stage tensor is read: 2 if taller than ``tall_rows`` (not 0), else 1."""
    if tall_rows <= 0 or not tensors:
        return [1] * len(tensors)
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [2 if len(dims) == 4 and dims[2] > tall_rows else 1 for dims in (tensor_dims(model, t) for t in tensors)]


def resolve_tap(model: Any, tensor: str) -> str:
    """What a stage branch reads for ``tensor``: in a QDQ graph its DequantizeLinear's output, else ``tensor``."""
    g = model.graph
    if tensor not in producers(g) and tensor not in {i.name for i in g.input}:
        raise ValueError(f"the graph has no tensor {tensor!r} for a stage branch")
    for q in g.node:
        if q.op_type == "QuantizeLinear" and q.input[0] == tensor:
            for d in g.node:
                if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]:
                    return d.output[0]
    return tensor


def per_tensor_affine(model: Any, dq: Any) -> Optional[Tuple[float, float]]:
    """``(scale, zero point)`` of ``dq`` where both are one constant (an INT8 file's activation), else None."""
    if dq is None:
        return None
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    has_zero = len(dq.input) > 2 and dq.input[2]
    if dq.input[1] not in inits or (has_zero and dq.input[2] not in inits):
        return None
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = numpy_helper.to_array(inits[dq.input[2]]) if has_zero else np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1:
        return None
    return float(scale.reshape(())), float(zero.reshape(()))


def stage_feature_nodes(model: Any, tensor: str, key: str, row_step: int = 1) -> Tuple[List[Any], str]:
    """Nodes computing the channel means and standard deviations (``[N, 2 C]``, FP32) of ``tensor`` on
    every ``row_step``-th row, and their output; their initializers are added to ``model``."""
    nodes, feat, affine = stage_nodes(model, tensor, key, row_step)
    if affine is not None:  # integer units -> the dequantized tensor's: s ([mean_q, sd_q] - [z, 0])
        w = NodeWriter(model, key, scale=np.array(affine[0], np.float32), offset=affine[1].astype(np.float32))
        feat = w.node("Mul", [w.node("Sub", [feat, key + "offset"], "feat_z"), key + "scale"], "feat_x")
        w.write_inits()
        nodes += w.nodes
    return nodes, feat


def stage_nodes(model: Any, tensor: str, key: str, row_step: int = 1
                ) -> Tuple[List[Any], str, Optional[Tuple[float, np.ndarray]]]:
    """:func:`stage_feature_nodes`, but ``feat`` in integer units where ``affine = (s, offset)`` is not
    None: the dequantized tensor's statistics are ``s (feat - offset)``."""
    from onnx import TensorProto

    x = resolve_tap(model, tensor)
    w = NodeWriter(model, key)
    fp16 = tensor_elem_type(model, x) == TensorProto.FLOAT16
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == x), None) \
        if x != tensor else None
    affine = per_tensor_affine(model, dq)
    if affine is not None:  # read the quantized integers instead
        x = dq.input[0]
    if row_step > 1:  # every row_step-th row, all columns: a Slice of whole rows
        bounds = [w.const(name, np.array([value], np.int64)) for name, value in
                  (("rows_start", 0), ("rows_end", np.iinfo(np.int64).max), ("rows_axis", 2), ("rows_step", row_step))]
        x = w.node("Slice", [x] + bounds, "rows")
    if affine is not None:
        x = w.node("Cast", [x], "q32", to=TensorProto.FLOAT)
    elif fp16:
        x = w.node("Cast", [x], "x32", to=TensorProto.FLOAT)
    mean = w.along("ReduceMean", x, "axes", "mean", [2, 3], keepdims=0)
    msq = w.along("ReduceMean", w.node("Mul", [x, x], "x2"), "axes", "msq", [2, 3], keepdims=0)
    var = w.node("Relu", [w.node("Sub", [msq, w.node("Mul", [mean, mean], "mean2")], "var0")], "var")
    feat = w.node("Concat", [mean, w.node("Sqrt", [var], "sd")], "feat", axis=1)
    w.write_inits()
    if affine is None:
        return w.nodes, feat, None
    dims = tensor_dims(model, tensor)
    if len(dims) != 4 or dims[1] <= 0:
        raise ValueError(f"the channel count of stage tensor {tensor!r} is not known (shape inference failed)")
    return w.nodes, feat, (affine[0], np.concatenate([np.full(dims[1], affine[1]), np.zeros(dims[1])]))
