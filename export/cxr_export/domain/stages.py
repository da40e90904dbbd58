"""Stage branches: the nodes that read a tensor inside the backbone for the image check.

A stage branch's input is the channel means and standard deviations (``[N, 2 C]``) of one
activation inside the network. Which activations, per backbone, is a fact of the backbone's
registry entry (:attr:`cxr_train.backbones.Backbone.domain_taps`). In an INT8 file the nodes
read the *quantized* tensor through a Cast and fold its scale and zero point into the
branch's weights, so the classifier's own nodes are untouched and no second
DequantizeLinear runs beside the fused convolution that reads the same tensor. Why these
taps and this read: ``docs/design/domain-check.md``.

Examples:
    >>> nodes, feat = stage_feature_nodes(model, "/features.4/MaxPool_output_0", "cxr_domain/stage1/")  # doctest: +SKIP
    >>> feat                                                                                           # doctest: +SKIP
    'cxr_domain/stage1/feat'
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.spec import ModelSpec
from cxr_train.backbones import BACKBONES

from ..onnxgraph import channels, node_outputs, opset, tensor_dims, tensor_elem_type

#: a stage tensor taller than this many rows is read on every second row, every column (:func:`stage_nodes`):
#: the early, high-resolution ones, whose neighbouring rows say much the same
DEFAULT_STAGE_TALL_ROWS = 32



class _BackboneTaps(Mapping[str, Tuple[str, ...]]):
    """A read-only view of the backbone registry: backbone name -> its ``domain_taps`` (backbones with
    taps only), read when asked, so a backbone registered later is seen too."""

    def __getitem__(self, name: str) -> Tuple[str, ...]:
        backbone = BACKBONES.get(name)
        if backbone is None or not backbone.domain_taps:
            raise KeyError(name)
        return tuple(backbone.domain_taps)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, backbone in BACKBONES.items() if backbone.domain_taps])

    def __len__(self) -> int:
        return len(list(iter(self)))


#: the activations each backbone's stage branches read (torch-export tensor names): the backbone
#: registry's ``domain_taps``
STAGE_TAPS: Mapping[str, Tuple[str, ...]] = _BackboneTaps()


def default_taps(spec: ModelSpec, model_path: str | Path) -> List[str]:
    """The stage tensors of the file's backbone (its registry entry's ``domain_taps``) that its
    graph has; none for a backbone without taps (it gets the thumbnail and features branches only)."""
    import onnx

    wanted = STAGE_TAPS.get(spec.backbone, ())
    if not wanted:
        return []
    known = node_outputs(onnx.load(str(model_path), load_external_data=False).graph)
    return [t for t in wanted if t in known]


def per_tap(row_step: int | Sequence[int], count: int) -> List[int]:
    """One row step per stage tensor: ``row_step`` for each of ``count``, or the sequence as given."""
    return [row_step] * count if isinstance(row_step, int) else list(row_step)


def stage_row_steps(model_path: str | Path, tensors: Sequence[str], tall_rows: int) -> List[int]:
    """Every how many rows each stage tensor is read: 2 for one taller than ``tall_rows`` rows, else 1 (and
    where its height is unknown; all 1 when ``tall_rows`` is 0)."""
    if tall_rows <= 0 or not tensors:
        return [1] * len(tensors)
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [2 if len(dims) == 4 and dims[2] > tall_rows else 1 for dims in (tensor_dims(model, t) for t in tensors)]


def resolve_tap(model: Any, tensor: str) -> str:
    """The tensor a stage branch reads for ``tensor``: in a QDQ graph the output of the
    DequantizeLinear that follows its QuantizeLinear (what the next layer reads, so the classifier's
    own nodes keep their single consumer); otherwise ``tensor`` itself."""
    g = model.graph
    known = node_outputs(g) | {i.name for i in g.input}
    if tensor not in known:
        raise ValueError(f"the graph has no tensor {tensor!r} for a stage branch")
    for q in g.node:
        if q.op_type == "QuantizeLinear" and q.input[0] == tensor:
            for d in g.node:
                if d.op_type == "DequantizeLinear" and d.input[0] == q.output[0]:
                    return d.output[0]
    return tensor


def per_tensor_affine(model: Any, dq: Any) -> Optional[Tuple[float, float]]:
    """``(scale, zero point)`` of a per-tensor DequantizeLinear ``dq`` whose scale and zero point are
    initializers (an INT8 file's activations); None otherwise (no ``dq``, per-channel or computed)."""
    if dq is None:
        return None
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if dq.input[1] not in inits or (len(dq.input) > 2 and dq.input[2] and dq.input[2] not in inits):
        return None
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1:
        return None
    return float(scale.reshape(())), float(zero.reshape(()))


def stage_feature_nodes(model: Any, tensor: str, key: str, row_step: int = 1) -> Tuple[List[Any], str]:
    """FP32 nodes computing ``[N, 2 C]``: the channel means and standard deviations of ``tensor``
    (an FP16 file's tensor is cast to FP32 first, so the statistics and the distances stay FP32).

    In an INT8 QDQ file whose DequantizeLinear has one scale and zero point (an activation), the
    nodes read the *quantized* tensor ``q`` through a Cast and map its statistics exactly to those of
    ``s (q - z)``: mean ``s (mean_q - z)``, standard deviation ``s sd_q`` (equal to the dequantized
    tensor's up to float rounding). A Cast is far cheaper in onnxruntime than a DequantizeLinear of the
    check's own beside the fused classifier node that also reads the tensor (on a uint8 tensor the size
    of VGG16's first stage end, 64 x 112 x 112: 0.44 ms against 0.76 ms for the read and both means).

    ``row_step`` > 1 reads every ``row_step``-th row of the tensor, every column (a Slice of whole
    rows, of the *quantized* tensor in an INT8 file; see :func:`stage_nodes`): the statistics are then
    those of those rows, fitted and calibrated the same way. Initializers the nodes need are appended
    to ``model`` (all named with ``key``).
    """
    from onnx import helper, numpy_helper

    nodes, feat, affine = stage_nodes(model, tensor, key, row_step)
    if affine is not None:  # integer units -> the dequantized tensor's: s ([mean_q, sd_q] - [z, 0])
        scale, offset = affine
        model.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), key + "scale"))
        model.graph.initializer.append(numpy_helper.from_array(offset.astype(np.float32), key + "offset"))
        nodes.append(helper.make_node("Sub", [feat, key + "offset"], [key + "feat_z"], name=key + "feat_z"))
        nodes.append(helper.make_node("Mul", [key + "feat_z", key + "scale"], [key + "feat_x"], name=key + "feat_x"))
        feat = key + "feat_x"
    return nodes, feat


def stage_nodes(model: Any, tensor: str, key: str, row_step: int = 1
                ) -> Tuple[List[Any], str, Optional[Tuple[float, np.ndarray]]]:
    """:func:`stage_feature_nodes` before its last step: ``(nodes, feat, affine)``. ``affine`` is None
    when ``feat`` is in the tensor's units; otherwise ``feat`` holds the means and standard deviations
    of the quantized integers ``q`` and ``affine = (s, offset)``, with ``s (feat - offset)`` those of
    the dequantized tensor (``offset``: the zero point for each mean, 0 for each standard deviation),
    an affine map :func:`cxr_export.domain.graph.add_domain_graph` folds into its centres and weights."""
    from onnx import TensorProto, helper, numpy_helper

    x = resolve_tap(model, tensor)
    nodes: List[Any] = []

    def node(op: str, ins: List[str], out: str, **kw: Any) -> str:
        nodes.append(helper.make_node(op, ins, [key + out], name=key + out, **kw))
        return key + out

    def constant(name: str, value: List[int]) -> str:
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), key + name))
        return key + name

    fp16 = tensor_elem_type(model, x) == TensorProto.FLOAT16
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == x), None) \
        if x != tensor else None
    affine = per_tensor_affine(model, dq)  # (scale, zero point) where the quantized tensor can be read instead
    if affine is not None:
        x = dq.input[0]
    if row_step > 1:
        # every row_step-th row, all columns: a Slice copying whole rows (of the integers in an INT8 file),
        # which onnxruntime runs far faster than a strided MaxPool (uint8 [1, 64, 54, 54] read through a
        # Cast, both moments, no thread spinning: 50 us with every 2nd row, 72 us for every row, 127 us
        # with every 2nd row and column by MaxPool, 63 us by a Slice on both axes)
        x = node("Slice", [x, constant("rows_start", [0]), constant("rows_end", [np.iinfo(np.int64).max]),
                           constant("rows_axis", [2]), constant("rows_step", [row_step])], "rows")
    if affine is not None:
        # the quantized integers q through a Cast; the statistics are those of q - z, and s times them
        # are the dequantized tensor's
        x = node("Cast", [x], "q32", to=TensorProto.FLOAT)
    elif fp16:
        x = node("Cast", [x], "x32", to=TensorProto.FLOAT)
    # ReduceMean over the positions (one node, [N, C]): cheaper in onnxruntime than GlobalAveragePool
    # and a Flatten (uint8 [1, 64, 54, 54] through a Cast, both moments: 71 against 90 us without
    # thread spinning, 44 against 53 us with it)
    if opset(model) >= 18:
        axes = constant("axes", [2, 3])
        mean = node("ReduceMean", [x, axes], "mean", keepdims=0)
        msq = node("ReduceMean", [node("Mul", [x, x], "x2"), axes], "msq", keepdims=0)
    else:
        mean = node("ReduceMean", [x], "mean", axes=[2, 3], keepdims=0)
        msq = node("ReduceMean", [node("Mul", [x, x], "x2")], "msq", axes=[2, 3], keepdims=0)
    var = node("Relu", [node("Sub", [msq, node("Mul", [mean, mean], "mean2")], "var0")], "var")
    feat = node("Concat", [mean, node("Sqrt", [var], "sd")], "feat", axis=1)
    if affine is None:
        return nodes, feat, None
    scale, zero = affine
    count = channels(model, tensor)
    if count is None:
        raise ValueError(f"the channel count of stage tensor {tensor!r} is not known (shape inference failed)")
    return nodes, feat, (scale, np.concatenate([np.full(count, zero), np.zeros(count)]))
