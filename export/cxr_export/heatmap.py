"""Grad-CAM computed by the model file itself: a ``heatmap`` output beside the probabilities.

The head is ``Linear -> ReLU -> Linear`` on the pooled last feature map, so Grad-CAM's gradient is
a forward expression of the head's own weights: FP32 nodes appended to the graph compute the map
([N, h, w], not normalised) from the graph's own tensors, the probabilities checked unchanged.
``python -m cxr_export.heatmap MODEL.onnx`` adds it to an existing file. Derivation and cost:
``docs/heatmaps.md``.

Examples:
    >>> add_heatmap("m.onnx")["grid"]   # doctest: +SKIP
    [7, 7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .onnxgraph import NodeWriter, consumers, inferred_values, int_attribute, producers, strip_prefixed

HEATMAP_OUTPUT = "heatmap"
#: the largest change of an FP16 file's probabilities accepted when the nodes are added (on a CPU)
FP16_TOLERANCE = 1e-4
#: the name prefix of every node and initializer the heatmap adds
PREFIX = "cxr_heatmap/"
#: nodes walked through between the named tensors (quantization, reshapes, casts, dropout)
_PASS_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Flatten", "Reshape", "Squeeze", "Identity", "Cast",
                 "Dropout"}
_POOLS = {"GlobalAveragePool", "ReduceMean"}
_LINEAR = {"Gemm", "MatMul", "FusedGemm"}


class HeadNotFound(ValueError):
    """The graph does not have the pooled-features -> Linear -> ReLU -> Linear head Grad-CAM needs."""


def find_head(model, features: str) -> Dict[str, Any]:
    """The feature map and the head's tensors Grad-CAM needs; :class:`HeadNotFound` names what is missing."""
    from .additions import ADDITIONS

    graph = model.graph
    written_by, read_by = producers(graph), consumers(graph)
    added = tuple(addition.prefix for addition in ADDITIONS.values())  # nodes cxr added are not the head's
    node = written_by.get(features)  # back from the features to the global pooling of the last feature map
    while node is not None and node.op_type in _PASS_THROUGH:
        node = written_by.get(node.input[0])
    if node is None or node.op_type not in _POOLS:
        raise HeadNotFound(f"no global average pooling before the {features!r} output")

    def next_linear(tensor: str) -> Any:
        queue, seen = [tensor], set()
        while queue:
            for user in read_by.get(queue.pop(0), []):
                if id(user) in seen or user.name.startswith(added):
                    continue
                seen.add(id(user))
                if user.op_type in _LINEAR:
                    return user
                if user.op_type in _PASS_THROUGH | {"Relu"}:
                    queue.extend(user.output)
        return None

    # forward from the pooling, not from the features output (an FP16 file casts that output)
    first = next_linear(node.output[0])
    if first is None:
        raise HeadNotFound(f"no linear layer after the {features!r} output")
    second = next_linear(first.output[0])
    if second is None:
        raise HeadNotFound("no second linear layer in the head")
    # the ReLU mask is read where the second layer reads its input: a new reader of the first layer's own
    # output would stop onnxruntime fusing Gemm + ReLU and change the FP16 probabilities' rounding
    return {"feature_map": node.input[0], "activation": second.input[0], "w1": first.input[1],
            "w1_transposed": first.op_type != "MatMul" and int_attribute(first, "transB", 0) == 1,
            "w2": second.input[1],
            "w2_transposed": second.op_type != "MatMul" and int_attribute(second, "transB", 0) == 1}


def _inferred(model, feature_map: str) -> Tuple[Dict[str, int], Tuple[Optional[int], Optional[int]]]:
    """The element type of every tensor, and the feature map's grid ``(h, w)``, by one shape inference."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    grid: Tuple[Optional[int], Optional[int]] = (None, None)
    for value in inferred_values(model):
        types[value.name] = value.type.tensor_type.elem_type
        dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
        if value.name == feature_map and len(dims) == 4:
            grid = (dims[2], dims[3])
    return types, grid


def strip_heatmap_graph(model: Any) -> None:
    """Remove what :func:`add_heatmap_graph` added (in place)."""
    strip_prefixed(model, PREFIX, (HEATMAP_OUTPUT,))


def _int8_rows(model, weight: str) -> Optional[Tuple[str, str]]:
    """(quantized weight, scales) when ``weight`` is a DequantizeLinear of a constant int8 [H, C] matrix
    with one scale per row (axis 0) and zero offsets, as an INT8 file's first head layer is; else None."""
    from onnx import TensorProto, numpy_helper

    producer = producers(model.graph).get(weight)
    inits = {t.name: t for t in model.graph.initializer}
    if producer is None or producer.op_type != "DequantizeLinear" or len(producer.input) < 3 or \
            not all(name in inits for name in producer.input[:3]):
        return None
    q, scale, zero = (inits[name] for name in producer.input[:3])
    if q.data_type != TensorProto.INT8 or len(q.dims) != 2 or int_attribute(producer, "axis", 1) != 0 or \
            list(scale.dims) != [q.dims[0]] or np.any(numpy_helper.to_array(zero) != 0):
        return None
    return producer.input[0], producer.input[1]


def add_heatmap_graph(model, features: str, positive_index: int) -> Dict[str, Any]:
    """Append the Grad-CAM nodes and the ``heatmap`` output to ``model`` in place; returns its spec block."""
    from onnx import TensorProto, helper

    strip_heatmap_graph(model)
    head = find_head(model, features)
    types, (height, width) = _inferred(model, head["feature_map"])
    w = NodeWriter(model, PREFIX, **{"zero": np.array(0.0, np.float32), "class": np.array([positive_index], np.int64),
                                     "axes23": np.array([2, 3], np.int64), "axis1": np.array([1], np.int64)})

    def as_float(tensor: str, name: str) -> str:
        return tensor if types.get(tensor, TensorProto.FLOAT) == TensorProto.FLOAT else \
            w.node("Cast", [tensor], name, to=TensorProto.FLOAT)

    feature_map = as_float(head["feature_map"], "feature_map")                    # [N, C, h, w]
    activation = as_float(head["activation"], "activation")                       # [N, H], after the ReLU
    w1 = as_float(head["w1"], "w1")                                               # [H, C] (or [C, H])
    w2 = as_float(head["w2"], "w2")                                               # [K, H] (or [H, K])
    mask = w.node("Cast", [w.node("Greater", [activation, PREFIX + "zero"], "active")], "mask", to=TensorProto.FLOAT)
    w2_row = w.node("Gather", [w2, PREFIX + "class"], "w2_class", axis=0 if head["w2_transposed"] else 1)
    w2_row = w.node("Flatten", [w2_row], "w2_row", axis=0) if head["w2_transposed"] else \
        w.node("Transpose", [w2_row], "w2_row", perm=[1, 0])                      # [1, H]
    gated = w.node("Mul", [mask, w2_row], "gated")                                # [N, H]
    quantized = _int8_rows(model, head["w1"]) if head["w1_transposed"] else None
    if quantized is not None:
        # W1 = scale[h] * Q[h, c]: the scales go into the gated vector, quantized to 8 bits on the fly, and
        # Q multiplies it as integers, so the [H, C] weight is never dequantized per call
        q_weight, q_scale = quantized
        scaled = w.node("Mul", [gated, q_scale], "gated_scaled")                  # [N, H]
        dyn = [PREFIX + "gated_q", PREFIX + "gated_q_scale", PREFIX + "gated_q_zero"]
        w.node("DynamicQuantizeLinear", [scaled], "gated_q", outputs=dyn)
        product = w.node("MatMulInteger", [dyn[0], q_weight, dyn[2]], "gradient_int")  # [N, C] int32
        gradient = w.node("Mul", [w.node("Cast", [product], "gradient_f", to=TensorProto.FLOAT), dyn[1]], "gradient")
    else:
        gradient = w.node("MatMul", [gated, w1 if head["w1_transposed"] else
                                     w.node("Transpose", [w1], "w1_t", perm=[1, 0])], "gradient")  # [N, C] = dz / dp
    # the area h w as a constant: computed from the tensor's shape it stops OpenVINO's CPU plugin (SIGFPE),
    # so that form serves only a grid shape inference cannot tell
    if height and width:
        area = w.const("area_f", np.array(float(height * width), np.float32))
    else:
        start, end = w.const("start2", np.array([2], np.int64)), w.const("end4", np.array([4], np.int64))
        size = w.node("ReduceProd", [w.node("Slice", [w.node("Shape", [feature_map], "shape"), start, end], "hw")],
                      "area", keepdims=1)
        area = w.node("Cast", [size], "area_f", to=TensorProto.FLOAT)
    alpha4 = w.along("Unsqueeze", w.node("Div", [gradient, area], "alpha"), "axes23", "alpha4")  # [N, C, 1, 1]
    summed = w.along("ReduceSum", w.node("Mul", [feature_map, alpha4], "weighted"), "axis1", "summed", keepdims=0)
    w.node("Relu", [summed], HEATMAP_OUTPUT, outputs=[HEATMAP_OUTPUT])
    w.write()
    model.graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT,
                                                            ["batch", height, width]))
    return {
        "method": "Grad-CAM of the positive-class logit at the last feature map, computed in the graph without "
                  "autograd: alpha = ((W2[c] * 1[W1 p + b1 > 0]) @ W1) / (h w), map = ReLU(sum_k alpha_k A_k)",
        "output": HEATMAP_OUTPUT, "grid": [height, width], "feature_map": head["feature_map"],
        "positive_index": int(positive_index), "normalised": False,
        "use": "model attention, not a localisation; the runtime scales each map to 0..1",
    }


def add_heatmap(model_path: str | Path, out_path: Optional[str | Path] = None, threads: int = 0) -> Dict[str, Any]:
    """Add the ``heatmap`` output (probabilities checked unchanged) to a file; returns its spec block."""
    import onnx

    from .modelio import open_model, probability_change, read_spec, staged, write_spec

    model_path = Path(model_path)
    out = Path(out_path or model_path)
    spec = read_spec(model_path)
    if not spec.features_output:
        raise ValueError(f"{model_path}: its spec names no features output, so the head cannot be found")
    model = onnx.load(str(model_path), load_external_data=True)
    block = add_heatmap_graph(model, spec.features_output, spec.positive_index)
    width, height = spec.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (4, height, width, 3), np.uint8)
    before = open_model(model_path, threads, spec).run(pixels, [spec.prob_output])[0]
    with staged(out) as path:
        onnx.save(model, str(path))
        after, maps = open_model(path, threads, spec).run(pixels, [spec.prob_output, HEATMAP_OUTPUT])
        change = probability_change(before, after, spec, out, "heatmap", FP16_TOLERANCE)
        if maps.ndim != 3 or not np.all(np.isfinite(maps)) or np.any(maps < 0):
            raise RuntimeError(f"{out}: the heatmap output is not a finite non-negative [N, h, w] map (a bug)")
        block["grid"] = [int(maps.shape[1]), int(maps.shape[2])]
        block["probabilities_unchanged"] = "bit for bit" if change == 0.0 else f"within {change:.2g} (FP16 on CPU)"
        write_spec(path, spec.updated({"heatmap": block}, outputs={"heatmap": HEATMAP_OUTPUT}))
    return block


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m cxr_export.heatmap``; returns the exit status (2: a file failed)."""
    from cxr_infer.errors import CXRError

    parser = argparse.ArgumentParser(prog="python -m cxr_export.heatmap",
                                     description="Add (or refresh) the Grad-CAM heatmap output in cxr model files.",
                                     epilog="example: python -m cxr_export.heatmap models/resnet50_int8.onnx")
    parser.add_argument("models", nargs="+", help="model file(s), updated in place unless --out")
    parser.add_argument("--out", help="write here instead of in place (one model only)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out and len(args.models) > 1:
        parser.error("--out takes one model")
    status = 0
    for path in args.models:
        try:
            block = add_heatmap(path, args.out, args.threads)
            print(f"{args.out or path}: heatmap {block['grid'][0]}x{block['grid'][1]} from {block['feature_map']}",
                  file=sys.stderr)
        except (CXRError, HeadNotFound, ValueError) as exc:
            print(f"python -m cxr_export.heatmap: {path}: {exc}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
