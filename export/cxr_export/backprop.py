"""Gradients through part of an ONNX graph, as nodes: reverse mode for the ops a CNN's stages use.

:func:`gradient` writes the nodes that carry a gradient from one tensor of the graph back to an
earlier one, reading the graph's own tensors (activations, weights as the graph uses them). Grad-CAM
at a layer before the last feature map needs it (``cxr_export.heatmap``). Covered: Conv (through
ConvTranspose), Relu, Add, Concat, MaxPool (through its indices), AveragePool, reshapes and casts,
and an INT8 file's QuantizeLinear / DequantizeLinear pairs (straight through; a quantizer whose zero
point is its type's minimum clamps below zero, which is the ReLU quantization removed, so it masks).

Examples:
    >>> rules = Rules(model, NodeWriter(model, "cxr_x/"), dims, types)                   # doctest: +SKIP
    >>> gradient(model, rules, target="/layer3/out", start="/layer4/out", seed="cxr_x/g4")  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Set

import numpy as np

from .onnxgraph import NodeWriter, consumers, int_attribute, producers

#: ops a gradient passes unchanged (the input has the output's shape)
_SAME = {"Identity", "Dropout", "Cast"}
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}


class NotDifferentiable(ValueError):
    """The path between the two tensors holds an op this module cannot take the gradient of."""


def _ints(node: Any, name: str, default: Sequence[int]) -> List[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), list(default))


def _downstream(graph: Any, target: str, skip: Sequence[str]) -> Set[str]:
    """``target`` and every tensor computed from it by the graph's own nodes."""
    read_by = consumers(graph)
    found: Set[str] = set()
    todo = [target]
    while todo:
        tensor = todo.pop()
        if tensor not in found:
            found.add(tensor)
            todo.extend(out for node in read_by.get(tensor, []) if not node.name.startswith(tuple(skip))
                        for out in node.output)
    return found


def on_path(graph: Any, target: str, start: str, skip: Sequence[str] = ()) -> List[Any]:
    """The nodes through which ``start`` depends on ``target``, in graph order (nodes whose names start
    with one of ``skip`` are not the graph's own)."""
    written_by = {k: v for k, v in producers(graph).items() if not v.name.startswith(tuple(skip))}
    upstream: Set[str] = set()
    todo = [start]
    while todo:  # start and every tensor it is computed from, back to target
        tensor = todo.pop()
        if tensor not in upstream:
            upstream.add(tensor)
            node = written_by.get(tensor)
            if node is not None and tensor != target:
                todo.extend(node.input)
    if target not in upstream:
        raise NotDifferentiable(f"{start!r} does not depend on {target!r}")
    tensors = upstream & _downstream(graph, target, skip)
    return [n for n in graph.node if not n.name.startswith(tuple(skip))
            and any(o in tensors for o in n.output) and any(i in tensors for i in n.input)]


class Rules:
    """The gradient of an op's input from its output's gradient ``g``, one method per op (named after it).

    Every tensor of the graph the nodes read goes through :meth:`local`: a dequantized weight is
    dequantized again inside the new nodes from its int8 constant (a new reader of the graph's own
    dequantized weight would make an engine dequantize it on every call) and an FP16 tensor is cast.
    """

    def __init__(self, model: Any, w: NodeWriter, dims: Dict[str, List[int]], types: Dict[str, int],
                 skip: Sequence[str] = ()) -> None:
        from onnx import numpy_helper

        self.w, self.dims, self.types, self.count = w, dims, types, 0
        self.written_by = {k: v for k, v in producers(model.graph).items() if not v.name.startswith(tuple(skip))}
        self.zero_points = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                            if t.name.endswith("zero_point")}
        self.constants = {t.name for t in model.graph.initializer}
        self.read_by = consumers(model.graph)
        self._local: Dict[str, str] = {}

    def name(self, what: str) -> str:
        self.count += 1
        return f"g{self.count}/{what}"

    def local(self, tensor: str) -> str:
        """``tensor`` as FP32: a dequantized weight dequantized again here (so the graph's own weight
        stays a constant its fused nodes read), an FP16 tensor cast; activations as they are."""
        from onnx import TensorProto

        if tensor not in self._local:
            node = self.written_by.get(tensor)
            if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in self.constants:
                attrs = {a.name: a.i for a in node.attribute if a.name == "axis"}
                self._local[tensor] = self.w.node("DequantizeLinear", list(node.input), self.name("dq"), **attrs)
            elif self.types.get(tensor, TensorProto.FLOAT) != TensorProto.FLOAT:
                self._local[tensor] = self.w.node("Cast", [tensor], self.name("fp32"), to=TensorProto.FLOAT)
            else:
                self._local[tensor] = tensor
        return self._local[tensor]

    def mask(self, g: str, positive: str, zero: str) -> str:
        """``g`` where ``positive`` > ``zero``, else 0 (the ReLU derivative)."""
        from onnx import TensorProto

        w = self.w
        active = w.node("Cast", [w.node("Greater", [positive, zero], self.name("active"))], self.name("mask"),
                        to=TensorProto.FLOAT)
        return w.node("Mul", [g, active], self.name("masked"))

    def Relu(self, node: Any, i: int, g: str) -> str:  # named after the ONNX op
        return self.mask(g, self.local(node.output[0]), self.w.const(self.name("zero"), np.array(0.0, np.float32)))

    def QuantizeLinear(self, node: Any, i: int, g: str) -> str:
        zero = self.zero_points.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or int(zero.reshape(-1)[0]) != np.iinfo(zero.dtype).min:
            return g  # straight through
        # a clamp at zero: the ReLU the quantizer absorbed, read where the next layer reads the activation
        dequantized = next((n.output[0] for n in self.read_by.get(node.output[0], [])
                            if n.op_type == "DequantizeLinear"), None)
        if dequantized is None:
            raise NotDifferentiable(f"{node.name}: a quantized tensor that nothing dequantizes")
        return self.mask(g, dequantized, self.w.const(self.name("zero"), np.array(0.0, np.float32)))

    def DequantizeLinear(self, node: Any, i: int, g: str) -> str:
        return g

    def Add(self, node: Any, i: int, g: str) -> str:
        if self.dims.get(node.input[i]) != self.dims.get(node.output[0]):
            raise NotDifferentiable(f"{node.name}: an Add that broadcasts {node.input[i]!r}")
        return g

    def Concat(self, node: Any, i: int, g: str) -> str:
        axis = int_attribute(node, "axis", 0)
        sizes = [self.dims[x][axis] for x in node.input]
        start = sum(sizes[:i])
        w = self.w
        bounds = [w.const(self.name(k), np.array([v], np.int64)) for k, v in
                  (("start", start), ("end", start + sizes[i]), ("axis", axis))]
        return w.node("Slice", [g, *bounds], self.name("slice"))

    def _transposed(self, node: Any, g: str, weight: str, kernel: Sequence[int], group: int) -> str:
        """ConvTranspose of ``g`` with ``weight``: the input gradient of a convolution or an average pool."""
        n = len(kernel)
        strides, pads = _ints(node, "strides", [1] * n), _ints(node, "pads", [0] * 2 * n)
        dilations = _ints(node, "dilations", [1] * n)
        x, y = self.dims[node.input[0]][2:], self.dims[node.output[0]][2:]
        extra = [xs - (s * (ys - 1) + (k - 1) * d + 1 - pads[a] - pads[a + n])
                 for a, (xs, ys, s, k, d) in enumerate(zip(x, y, strides, kernel, dilations))]
        return self.w.node("ConvTranspose", [g, weight], self.name("transposed"), strides=strides, pads=pads,
                           dilations=dilations, group=group, output_padding=extra)

    def Conv(self, node: Any, i: int, g: str) -> str:
        if i != 0:
            raise NotDifferentiable(f"{node.name}: a gradient into a convolution's weights")
        kernel = _ints(node, "kernel_shape", self.dims.get(node.input[1], [0, 0])[2:])
        if not kernel or not all(kernel):
            raise NotDifferentiable(f"{node.name}: the kernel shape of {node.input[1]!r} is unknown")
        return self._transposed(node, g, self.local(node.input[1]), kernel, int_attribute(node, "group", 1))

    def AveragePool(self, node: Any, i: int, g: str) -> str:
        if int_attribute(node, "count_include_pad", 0) != 1 and any(_ints(node, "pads", [])):
            raise NotDifferentiable(f"{node.name}: an AveragePool that leaves its padding out of the count")
        kernel = _ints(node, "kernel_shape", [])
        channels = self.dims[node.input[0]][1]
        ones = np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), np.float32)
        return self._transposed(node, g, self.w.const(self.name("ones"), ones), kernel, channels)

    def MaxPool(self, node: Any, i: int, g: str) -> str:
        """Each output's gradient to the input element its maximum came from (recomputed with indices,
        which ONNX counts over the whole flattened tensor)."""
        w = self.w
        attrs = {a.name: (list(a.ints) if a.ints else a.i) for a in node.attribute}
        x = self.local(node.input[0])
        indices = w.prefix + self.name("indices")
        w.node("MaxPool", [x], self.name("again"), outputs=[w.prefix + self.name("pooled"), indices], **attrs)
        flat = w.const(self.name("flat"), np.array([-1], np.int64))
        zeros = w.node("Mul", [x, w.const(self.name("z"), np.array(0.0, np.float32))], self.name("zeros"))
        scattered = w.node("ScatterElements", [w.node("Reshape", [zeros, flat], self.name("zeros_flat")),
                                               w.node("Reshape", [indices, flat], self.name("indices_flat")),
                                               w.node("Reshape", [g, flat], self.name("g_flat"))],
                           self.name("scattered"), axis=0, reduction="add")
        return self.reshape_back(node, i, scattered)

    def reshape_back(self, node: Any, i: int, g: str) -> str:
        shape = np.array([-1, *self.dims[node.input[0]][1:]], np.int64)
        return self.w.node("Reshape", [g, self.w.const(self.name("shape"), shape)], self.name("reshaped"))

    def rule(self, op: str) -> Callable[[Any, int, str], str]:
        """The method for ``op`` (:class:`NotDifferentiable` for an op it does not know)."""
        if op in _SAME:
            return lambda node, i, g: g
        if op in _RESHAPES:
            return self.reshape_back
        if not op[:1].isupper() or not hasattr(self, op):
            raise NotDifferentiable(f"cannot take the gradient through a {op} node")
        return getattr(self, op)


def gradient(model: Any, rules: Rules, target: str, start: str, seed: str, skip: Sequence[str] = ()) -> str:
    """Write into ``rules.w`` the nodes of d(seed . start)/d(target): the gradient at ``target`` given the
    gradient ``seed`` (the shape of ``start``) at ``start``; returns its tensor name. ``skip``: name
    prefixes of nodes that are not the graph's own (graphs added after export)."""
    w = rules.w
    depends = _downstream(model.graph, target, skip)
    grads: Dict[str, str] = {start: seed}
    for node in reversed(on_path(model.graph, target, start, skip)):
        g = grads.get(node.output[0])
        if g is None:
            continue
        for i, tensor in enumerate(node.input):
            if tensor not in depends or tensor in node.input[:i]:
                continue
            part = rules.rule(node.op_type)(node, i, g)
            grads[tensor] = w.node("Add", [grads[tensor], part], rules.name("sum")) if tensor in grads else part
    if target not in grads:
        raise NotDifferentiable(f"no gradient reached {target!r} from {start!r}")
    return grads[target]
