"""Small helpers for editing ONNX graphs, shared by the graphs cxr appends after export.

Looking tensors up (who writes and reads them, their type and shape), appending nodes under a
name prefix (:class:`NodeWriter`) and removing them again (:func:`strip_prefixed`). ``onnx`` is
imported only where needed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np


def opset(model: Any) -> int:
    """The default-domain opset version the model imports (13 when it names none)."""
    return max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [13])


def producers(graph: Any) -> Dict[str, Any]:
    """``{tensor name: the node that writes it}``."""
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: Any) -> Dict[str, List[Any]]:
    """``{tensor name: the nodes that read it}``, in graph order."""
    found: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def int_attribute(node: Any, name: str, default: int) -> int:
    """The integer attribute ``name`` of ``node``, or ``default`` when it has none."""
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def inferred_values(model: Any) -> List[Any]:
    """The value infos ONNX shape inference gives (value_info, inputs and outputs); raises when it fails."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    return list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)


def inferred_type(model: Any, tensor: str) -> Any:
    """``tensor``'s ``TypeProto.Tensor`` by shape inference; None when unknown or inference fails."""
    try:
        values = inferred_values(model)
    except Exception:  # onnx raises several types for a graph it cannot infer
        return None
    return next((v.type.tensor_type for v in values if v.name == tensor and v.type.tensor_type.elem_type), None)


def tensor_elem_type(model: Any, tensor: str) -> int:
    """The ONNX element type of ``tensor`` (declared, or by shape inference; FLOAT when unknown)."""
    from onnx import TensorProto

    g = model.graph
    for v in list(g.value_info) + list(g.output) + list(g.input):
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    inferred = inferred_type(model, tensor)
    return inferred.elem_type if inferred is not None else TensorProto.FLOAT


def tensor_dims(model: Any, tensor: str) -> List[int]:
    """``tensor``'s dimensions by shape inference (0 for an unknown one; [] when the shape is unknown)."""
    inferred = inferred_type(model, tensor)
    return [d.dim_value for d in inferred.shape.dim] if inferred is not None else []


def constant_value(model: Any, tensor: str) -> Optional[np.ndarray]:
    """The value of ``tensor`` when it is a constant: an initializer, or a DequantizeLinear of initializers
    (float32); None otherwise."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    if tensor in inits:
        return numpy_helper.to_array(inits[tensor])
    node = producers(model.graph).get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
        return None
    q, scale = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[:2])
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] \
        else np.zeros_like(scale)
    if scale.size > 1:  # per channel, along ``axis``
        shape = [1] * q.ndim
        shape[int_attribute(node, "axis", 1)] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def keep_only(field: Any, keep: Callable[[Any], bool]) -> None:
    """Drop the items of a repeated protobuf ``field`` (nodes, outputs, ...) for which ``keep`` is false."""
    kept = [item for item in field if keep(item)]
    del field[:]
    field.extend(kept)


def strip_prefixed(model: Any, prefix: str, outputs: Sequence[str]) -> None:
    """Remove the nodes and initializers named ``prefix...`` and the graph ``outputs`` (in place)."""
    graph = model.graph
    keep_only(graph.node, lambda n: not n.name.startswith(prefix))
    keep_only(graph.initializer, lambda t: not t.name.startswith(prefix))
    keep_only(graph.output, lambda o: o.name not in outputs)


class NodeWriter:
    """Nodes and initializers to append to ``model``, each named ``prefix + name``.

    Examples:
        >>> w = NodeWriter(model, "cxr_x/", one=np.array(1.0, np.float32))   # doctest: +SKIP
        >>> w.node("Mul", ["t", "cxr_x/one"], "t1")                            # doctest: +SKIP
        'cxr_x/t1'
    """

    def __init__(self, model: Any, prefix: str, **constants: np.ndarray) -> None:
        self.model, self.prefix, self.opset = model, prefix, opset(model)
        self.nodes: List[Any] = []
        self.inits: Dict[str, np.ndarray] = {prefix + key: value for key, value in constants.items()}

    def node(self, op: str, inputs: List[str], name: str, outputs: Optional[List[str]] = None, **attrs: Any) -> str:
        """Append a node writing ``prefix + name`` (or ``outputs``); returns its first output."""
        from onnx import helper

        outputs = outputs or [self.prefix + name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.prefix + name, **attrs))
        return outputs[0]

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer ``prefix + name``; returns its name."""
        self.inits[self.prefix + name] = value
        return self.prefix + name

    def along(self, op: str, x: str, axes: str, name: str, values: Sequence[int] = (), **attrs: Any) -> str:
        """``op`` over the axes in initializer ``axes`` (made from ``values``), as an input or an attribute."""
        key = self.prefix + axes
        values = self.inits[key].tolist() if key in self.inits else list(values)
        if self.opset < (13 if op in ("ReduceSum", "Unsqueeze") else 18):
            return self.node(op, [x], name, axes=values, **attrs)
        if key not in self.inits:
            self.const(axes, np.array(values, np.int64))
        return self.node(op, [x, key], name, **attrs)

    def write_inits(self) -> None:
        """Append the initializers to the graph (once)."""
        from onnx import numpy_helper

        self.model.graph.initializer.extend(numpy_helper.from_array(value, key) for key, value in self.inits.items())
        self.inits = {}

    def write(self) -> None:
        """Append the initializers and the nodes to the graph (once)."""
        self.write_inits()
        self.model.graph.node.extend(self.nodes)
        self.nodes = []
