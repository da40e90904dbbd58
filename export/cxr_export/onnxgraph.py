"""Small helpers for editing ONNX graphs, shared by the graphs cxr adds after export.

The domain check and the Grad-CAM heatmap both append nodes to an exported graph: they look up
who produces and who reads a tensor, which opset the graph uses, a tensor's element type and
shape, and they remove what they added before adding it again (:func:`strip_prefixed`). Every
function takes an ``onnx.ModelProto`` (or its graph) and imports ``onnx`` only when it must.

Examples:
    >>> import onnx                                                           # doctest: +SKIP
    >>> model = onnx.load("m.onnx")                                           # doctest: +SKIP
    >>> producers(model.graph)["features"].op_type, opset(model)              # doctest: +SKIP
    ('Flatten', 18)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set


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


def node_outputs(graph: Any) -> Set[str]:
    """The names of every tensor a node of ``graph`` writes."""
    return {o for n in graph.node for o in n.output}


def int_attribute(node: Any, name: str, default: int) -> int:
    """The integer attribute ``name`` of ``node``, or ``default`` when it has none."""
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def inferred_values(model: Any) -> List[Any]:
    """The value infos ONNX shape inference gives (value_info, inputs and outputs); raises when the
    graph cannot be inferred."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    return list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)


def inferred_type(model: Any, tensor: str) -> Any:
    """``tensor``'s type (an ONNX ``TypeProto.Tensor``) by shape inference; None when unknown or when
    the graph cannot be inferred."""
    try:
        values = inferred_values(model)
    except Exception:  # onnx raises several types for a graph it cannot infer
        return None
    for v in values:
        if v.name == tensor and v.type.tensor_type.elem_type:
            return v.type.tensor_type
    return None


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


def channels(model: Any, tensor: str) -> Optional[int]:
    """The channel count (dimension 1) of 4-D ``tensor``, by shape inference; None when unknown."""
    dims = tensor_dims(model, tensor)
    return dims[1] if len(dims) == 4 and dims[1] > 0 else None


def strip_prefixed(model: Any, prefix: str, outputs: Sequence[str]) -> None:
    """Remove the nodes and initializers whose names start with ``prefix`` and the graph ``outputs``
    (in place): how a graph added after export is taken out again, or replaced."""
    graph = model.graph
    keep = [n for n in graph.node if not n.name.startswith(prefix)]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if not t.name.startswith(prefix)]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    kept_outputs = [o for o in graph.output if o.name not in outputs]
    del graph.output[:]
    graph.output.extend(kept_outputs)
