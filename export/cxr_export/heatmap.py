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

from .backprop import Rules, gradient
from .domain.stages import resolve_tap
from .onnxgraph import (
    NodeWriter,
    constant_value,
    consumers,
    inferred_values,
    int_attribute,
    keep_only,
    producers,
    strip_prefixed,
)

HEATMAP_OUTPUT = "heatmap"
#: the boolean graph input that turns the Grad-CAM graph on (its nodes run only when it is true)
SWITCH_INPUT = "heatmap_enabled"
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


def _inferred(model: Any) -> Tuple[Dict[str, int], Dict[str, List[int]]]:
    """Every tensor's element type and static dimensions (0 where unknown), by one shape inference."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for value in inferred_values(model):
        types[value.name] = value.type.tensor_type.elem_type
        dims[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    return types, dims


def strip_heatmap_graph(model: Any) -> None:
    """Remove what :func:`add_heatmap_graph` added (in place): its nodes, output and switch input."""
    strip_prefixed(model, PREFIX, (HEATMAP_OUTPUT,))
    keep_only(model.graph.input, lambda i: i.name != SWITCH_INPUT)


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


def _margin_gradient(model: Any, rules: Rules, head: Dict[str, Any], positive_index: int, classes: int) -> str:
    """d(z_positive - mean of the other logits)/d(pooled features), [N, C]: the head is Linear -> ReLU ->
    Linear, so this gradient is a forward expression of its weights and its ReLU mask; the last layer's
    part, a constant, is computed here."""
    w = rules.w
    weight = constant_value(model, head["w2"])  # [K, H] (or [H, K]): the seed is a constant of the file
    if weight is None:
        raise HeadNotFound(f"the head's last weight {head['w2']!r} is not a constant")
    weight = weight.astype(np.float32) if head["w2_transposed"] else weight.astype(np.float32).T
    others = [k for k in range(classes) if k != positive_index]
    seed = weight[positive_index] - weight[others].mean(axis=0)                  # [H]
    row = w.const("seed_row", seed.reshape(1, -1).astype(np.float32))            # [1, H]
    active = rules.mask(row, rules.local(head["activation"]), w.const("zero", np.array(0.0, np.float32)))
    quantized = _int8_rows(model, head["w1"]) if head["w1_transposed"] else None
    if quantized is None:
        w1 = rules.local(head["w1"])                                              # [H, C] (or [C, H])
        return w.node("MatMul", [active, w1 if head["w1_transposed"] else
                                 w.node("Transpose", [w1], "w1_t", perm=[1, 0])], "gradient")
    # W1 = scale[h] * Q[h, c]: the scales go into the gated vector, quantized to 8 bits on the fly, and Q
    # multiplies it as integers, so the [H, C] weight is never dequantized
    from onnx import TensorProto

    q_weight, q_scale = quantized
    dyn = [PREFIX + "gated_q", PREFIX + "gated_q_scale", PREFIX + "gated_q_zero"]
    w.node("DynamicQuantizeLinear", [w.node("Mul", [active, q_scale], "gated_scaled")], "gated_q", outputs=dyn)
    product = w.node("MatMulInteger", [dyn[0], q_weight, dyn[2]], "gradient_int")  # [N, C] int32
    return w.node("Mul", [w.node("Cast", [product], "gradient_f", to=TensorProto.FLOAT), dyn[1]], "gradient")


def add_heatmap_graph(model: Any, features: str, positive_index: int, layer: Optional[str] = None,
                      classes: int = 2) -> Dict[str, Any]:
    """Append the Grad-CAM graph, its ``heatmap`` output and its switch input to ``model`` in place;
    returns its spec block. ``layer``: the tensor (as exported) whose map is wanted, by default the last
    feature map; the gradient is carried back to it through the graph (:mod:`cxr_export.backprop`)."""
    from onnx import TensorProto, helper, numpy_helper

    from .additions import ADDITIONS

    strip_heatmap_graph(model)
    head = find_head(model, features)
    types, dims = _inferred(model)
    skip = tuple(addition.prefix for addition in ADDITIONS.values())
    feature_map = head["feature_map"]                                             # [N, C, h, w]
    target = resolve_tap(model, layer) if layer else feature_map
    rules = Rules(model, NodeWriter(model, PREFIX), dims, types, skip)
    w = rules.w
    height, width = dims[feature_map][2:]
    alpha = w.node("Div", [_margin_gradient(model, rules, head, positive_index, classes),
                           w.const("area", np.array(float(height * width), np.float32))], "alpha")  # [N, C]
    alpha4 = w.along("Unsqueeze", alpha, "axes23", "alpha4", values=[2, 3])                    # [N, C, 1, 1]
    if target == feature_map:
        weights = alpha4
    else:  # the gradient at the last feature map (alpha4 everywhere), carried back to the target layer
        spread = w.node("Add", [w.node("Mul", [rules.local(feature_map), w.const("nil", np.array(0.0, np.float32))],
                                       "zeros"), alpha4], "grad_map")
        at_target = gradient(model, rules, target, feature_map, spread, skip)
        weights = w.along("ReduceMean", at_target, "axes23", "weights", values=[2, 3], keepdims=1)
    cam = w.along("ReduceSum", w.node("Mul", [rules.local(target), weights], "weighted"), "axis1", "cam",
                  values=[1], keepdims=0)
    grid = dims[target][2:]
    # the branch holds its own constants: read from the outer graph, an engine may not see them as constant
    # (OpenVINO then gives a reduction over axes it does not know a result of unknown rank)
    inits = [numpy_helper.from_array(value, key) for key, value in w.inits.items()]
    w.inits = {}
    then_graph = helper.make_graph(w.nodes + [helper.make_node("Identity", [cam], [PREFIX + "map"],
                                                               name=PREFIX + "map")], "heatmap_on", [],
                                   [helper.make_tensor_value_info(PREFIX + "map", TensorProto.FLOAT, ["batch", *grid])],
                                   inits)
    # off: one zero map (an empty tensor would do, but OpenVINO reads an empty constant as a scalar)
    off = numpy_helper.from_array(np.zeros((1, *grid), np.float32), PREFIX + "off_value")
    else_graph = helper.make_graph([helper.make_node("Constant", [], [PREFIX + "off"], name=PREFIX + "off",
                                                     value=off)], "heatmap_off", [],
                                   [helper.make_tensor_value_info(PREFIX + "off", TensorProto.FLOAT, [1, *grid])])
    w.nodes = [helper.make_node("If", [SWITCH_INPUT], [HEATMAP_OUTPUT], name=PREFIX + "if",
                                then_branch=then_graph, else_branch=else_graph)]
    w.write()
    model.graph.input.append(helper.make_tensor_value_info(SWITCH_INPUT, TensorProto.BOOL, []))
    model.graph.output.append(helper.make_tensor_value_info(HEATMAP_OUTPUT, TensorProto.FLOAT, ["batch", *grid]))
    return {
        "method": "Grad-CAM of the logit margin (positive label minus the others) at the layer named, computed in "
                  "the graph: the head's gradient is a forward expression of its weights, carried back through "
                  "the layers after it; map = sum_k mean_ij(dz/dT_k) T_k, signed",
        "output": HEATMAP_OUTPUT, "grid": [int(g) for g in grid], "layer": target, "feature_map": feature_map,
        "positive_index": int(positive_index), "signed": True, "switch": SWITCH_INPUT, "normalised": False,
        "use": "positive values: evidence for the positive label, negative: for the other; model attention, not a "
               "localisation; computed only when the switch input is true",
    }


def default_layer(backbone: str) -> Optional[str]:
    """The layer whose map a backbone's files carry (its registry entry's ``heatmap_layer``), or None:
    the last feature map."""
    from cxr_train.backbones import BACKBONES

    entry = BACKBONES.get(backbone)
    return entry.heatmap_layer if entry is not None and entry.heatmap_layer else None


def add_heatmap(model_path: str | Path, out_path: Optional[str | Path] = None, threads: int = 0,
                layer: Optional[str] = "backbone") -> Dict[str, Any]:
    """Add the ``heatmap`` output (probabilities checked unchanged) to a file; returns its spec block.
    ``layer``: the tensor whose map is wanted; "backbone" (default) takes the backbone entry's, None the
    last feature map."""
    import onnx

    from .modelio import open_model, probability_change, read_spec, staged, write_spec

    model_path = Path(model_path)
    out = Path(out_path or model_path)
    spec = read_spec(model_path)
    if not spec.features_output:
        raise ValueError(f"{model_path}: its spec names no features output, so the head cannot be found")
    model = onnx.load(str(model_path), load_external_data=True)
    layer = default_layer(spec.backbone) if layer == "backbone" else layer
    block = add_heatmap_graph(model, spec.features_output, spec.positive_index, layer, len(spec.labels))
    new = spec.updated({"heatmap": block}, outputs={"heatmap": HEATMAP_OUTPUT})
    width, height = spec.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (4, height, width, 3), np.uint8)
    before = open_model(model_path, threads, spec).run(pixels, [spec.prob_output])[0]
    with staged(out) as path:
        onnx.save(model, str(path))
        opened = open_model(path, threads, new)
        after, maps = opened.run(pixels, [spec.prob_output, HEATMAP_OUTPUT])
        change = probability_change(before, after, spec, out, "heatmap", FP16_TOLERANCE)
        if maps.shape != (len(pixels), *block["grid"]) or not np.all(np.isfinite(maps)):
            raise RuntimeError(f"{out}: the heatmap output is not a finite [N, h, w] map (a bug)")
        if opened.run(pixels, [spec.prob_output])[0].tobytes() != after.tobytes():
            raise RuntimeError(f"{out}: asking for the heatmap changed the probabilities (a bug)")
        block["probabilities_unchanged"] = "bit for bit" if change == 0.0 else f"within {change:.2g} (FP16 on CPU)"
        write_spec(path, spec.updated({"heatmap": block}, outputs={"heatmap": HEATMAP_OUTPUT}))
    return block


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m cxr_export.heatmap``; returns the exit status (2: a file failed)."""
    from cxr_infer.errors import CXRError

    parser = argparse.ArgumentParser(prog="python -m cxr_export.heatmap",
                                     description="Add (or refresh) the Grad-CAM heatmap output in cxr model files.",
                                     epilog="example: python -m cxr_export.heatmap models/vgg16_int8.onnx")
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
            print(f"{args.out or path}: heatmap {block['grid'][0]}x{block['grid'][1]} at {block['layer']}",
                  file=sys.stderr)
        except (CXRError, HeadNotFound, ValueError) as exc:
            print(f"python -m cxr_export.heatmap: {path}: {exc}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
