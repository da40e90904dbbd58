"""Bring a model file's validation-derived blocks up to date: the image check's operating points and a
temperature for its probabilities, both from the file's own outputs on its validation images.

The validation images are the file's training folder split again as its spec's provenance says
(:func:`cxr_export.images.file_validation_split`). **Operating points**: where the file has the image
check, ``domain.operating_points`` are set from its domain scores (:data:`OPERATING_RATES` and the
file's own target rate) when missing or stale, and each branch gets its ``words``; the graph and the
file's domain threshold stay as they are. **Temperature**: one ``T > 0`` fitted on the logit margin
``m`` (positive minus other logit) by the validation NLL of ``sigmoid(m / T)``; when it lowers the
validation ECE it goes into the graph as a ``Div`` (``cxr_calibration/temperature``) on the logits
before the output Softmax, and the decision threshold ``t`` moves to ``sigmoid(logit(t) / T)``, so
every label stays the same (checked on the validation images before the file is written). A file
that already has a temperature is refitted from the logits before it, never given a second one.
The spec's ``calibration`` block records the outcome. ``cxr-export`` runs the same step on every
file it writes (after its graph additions).

Examples:
    >>> expected_calibration_error(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9]))
    0.2
    >>> round(sigmoid(logit(0.3) / 2.0), 4)
    0.3956
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from cxr_infer.spec import ModelSpec

PREFIX = "cxr_calibration/"
#: the node that divides the logits by the temperature, and the initializer holding it
TEMPERATURE_NODE = PREFIX + "temperature"
TEMPERATURE_VALUE = PREFIX + "T"
SCALED_LOGITS = PREFIX + "scaled_logits"
METHOD = "temperature scaling of the logit margin, fitted on validation (NLL)"
BINS = 10
#: the range searched for the temperature
T_RANGE = (0.01, 100.0)
#: the largest accepted difference between a written file's probability and sigmoid(margin / T)
PROBABILITY_TOLERANCE = 1e-5
#: the same for an FP16 file, whose Softmax rounds to half precision
FP16_PROBABILITY_TOLERANCE = 5e-3
#: operating-point thresholds that differ from the recomputed ones by more than this (relative) are stale
STALE_TOLERANCE = 1e-3
_PASS_THROUGH = ("Cast", "Identity")


# ---- numbers (numpy)
def sigmoid(x: Any) -> Any:
    """The logistic function, stable for large |x| (float64)."""
    x = np.asarray(x, np.float64)
    out = np.exp(-np.logaddexp(0.0, -x))
    return float(out) if out.ndim == 0 else out


def logit(p: float) -> float:
    """``log(p / (1 - p))``; -inf at 0 and +inf at 1."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def moved_threshold(threshold: float, temperature: float) -> float:
    """The threshold on ``sigmoid(m / T)`` that labels every image as ``threshold`` on ``sigmoid(m)`` does."""
    if threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    return float(sigmoid(logit(threshold) / temperature))


def nll(y: np.ndarray, margin: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels ``y`` (1: positive) under ``sigmoid(margin / T)``."""
    z = np.asarray(margin, np.float64) / temperature
    sign = np.where(np.asarray(y).astype(bool), -1.0, 1.0)
    return float(np.mean(np.logaddexp(0.0, sign * z))) if len(z) else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> List[Dict[str, Any]]:
    """Equal-width bins of the positive probability ``p``: lo, hi, count, mean_predicted and observed (the
    share of positives; both None in an empty bin), binned as ``cxr-bench accuracy`` bins them."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        count = int(m.sum())
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "mean_predicted": float(p[m].mean()) if count else None,
                     "observed": float(y[m].mean()) if count else None})
    return rows


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """The count-weighted mean of |observed - mean_predicted| over :func:`reliability`'s bins."""
    n = len(np.asarray(p))
    return float(sum(r["count"] / n * abs(r["observed"] - r["mean_predicted"])
                     for r in reliability(y, p, bins) if r["count"])) if n else float("nan")


def fit_temperature(y: np.ndarray, margin: np.ndarray, bounds: Tuple[float, float] = T_RANGE) -> float:
    """The temperature in ``bounds`` that minimises :func:`nll`: a golden-section search on log(1/T) (the
    NLL is convex in 1/T), returned as a float32 value, the one the graph holds."""
    lo, hi = math.log(1.0 / bounds[1]), math.log(1.0 / bounds[0])
    f = lambda s: nll(y, margin, math.exp(-s))  # noqa: E731
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(200):
        if hi - lo < 1e-10:
            break
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(np.float32(math.exp(-(lo + hi) / 2.0)))


# ---- the graph
@dataclass
class Logits:
    """Where the temperature goes: the output Softmax, the raw logits it reads (before any temperature)
    and the temperature already there (None when there is none)."""

    softmax: Any
    raw: str
    temperature: Optional[float]


def find_logits(model: Any, prob_output: str) -> Logits:
    """The Softmax that writes ``prob_output`` (through Cast or Identity) and its logits; ``ValueError`` if none."""
    from onnx import numpy_helper

    from .onnxgraph import producers

    written_by = producers(model.graph)
    node = written_by.get(prob_output)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = written_by.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        raise ValueError(f"no Softmax writes the {prob_output!r} output, so there is nowhere to put a temperature")
    before = written_by.get(node.input[0])
    if before is None or before.name != TEMPERATURE_NODE:
        return Logits(node, node.input[0], None)
    value = next(t for t in model.graph.initializer if t.name == TEMPERATURE_VALUE)
    return Logits(node, before.input[0], float(numpy_helper.to_array(value)))


def set_temperature(model: Any, prob_output: str, temperature: Optional[float]) -> None:
    """Put ``temperature`` between the logits and the output Softmax (in place), replacing any there;
    None removes it. The division runs in the logits' own type (FP32 after an INT8 file's DequantizeLinear)."""
    from onnx import NodeProto, helper, numpy_helper

    from .onnxgraph import keep_only, tensor_elem_type

    found = find_logits(model, prob_output)
    graph, softmax_out = model.graph, list(found.softmax.output)
    nodes = []
    for node in graph.node:
        if node.name.startswith(PREFIX):
            continue
        copy = NodeProto()
        copy.CopyFrom(node)
        if list(copy.output) == softmax_out:
            if temperature is not None:
                nodes.append(helper.make_node("Div", [found.raw, TEMPERATURE_VALUE], [SCALED_LOGITS],
                                              name=TEMPERATURE_NODE))
            copy.input[0] = found.raw if temperature is None else SCALED_LOGITS
        nodes.append(copy)
    keep_only(graph.initializer, lambda t: not t.name.startswith(PREFIX))
    if temperature is not None:
        dtype = helper.tensor_dtype_to_np_dtype(tensor_elem_type(model, found.raw))
        graph.initializer.append(numpy_helper.from_array(np.array(temperature, dtype), TEMPERATURE_VALUE))
    del graph.node[:]
    graph.node.extend(nodes)


# ---- the validation images and what the file says about them
@dataclass
class Outputs:
    """A file's outputs on its validation images: labels (1: positive), probabilities as it gives them,
    the raw logit margin (before any temperature) and the domain scores (None without the check)."""

    y: np.ndarray
    probability: np.ndarray
    margin: np.ndarray
    domain: Optional[np.ndarray]


def validation_set(spec: ModelSpec, data_dir: str | Path, cache: Optional[Dict[Any, Any]] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """The file's validation pixels (uint8 NHWC) and labels (1: its positive label), kept in ``cache``
    for the next file of the same split and input size."""
    from cxr_train.data import LABELS

    from .images import file_validation_split, load_entries

    cache = {} if cache is None else cache
    key = (str(data_dir), spec.provenance.split_hash)
    if key not in cache:
        cache[key] = file_validation_split(spec, data_dir)
    entries = cache[key]
    if not entries:
        raise ValueError(f"the split of {data_dir} it records has no validation images")
    if key + (spec.image_size,) not in cache:
        cache[key + (spec.image_size,)] = load_entries(entries, data_dir, spec.image_size)
    y = np.array([LABELS[int(label)] == spec.positive_label for _, label in entries], np.int64)
    return cache[key + (spec.image_size,)], y


def file_outputs(model: Any, spec: ModelSpec, pixels: np.ndarray, y: np.ndarray, threads: int = 0) -> Outputs:
    """Run the file (its raw logits an extra output) on the validation ``pixels``."""
    from onnx import helper

    from .domain.fit import run_outputs
    from .onnxgraph import tensor_elem_type

    if len(spec.labels) != 2:
        raise ValueError(f"temperature scaling of the margin needs two labels, not {len(spec.labels)}")
    probe = type(model)()
    probe.CopyFrom(model)
    raw = find_logits(probe, spec.prob_output).raw
    if raw not in {o.name for o in probe.graph.output}:
        probe.graph.output.append(helper.make_tensor_value_info(raw, tensor_elem_type(probe, raw), None))
    names = [spec.prob_output, raw] + ([spec.domain_output] if spec.domain_output else [])
    values = run_outputs(probe.SerializeToString(), spec, pixels, names, threads=threads)
    pos = spec.positive_index
    logits = values[1].reshape(len(pixels), -1)
    return Outputs(y=y, probability=values[0][:, pos], margin=logits[:, pos] - logits[:, 1 - pos],
                   domain=values[2].reshape(-1) if spec.domain_output else None)


# ---- the blocks
def branch_words_of(entry: Dict[str, Any]) -> str:
    """The ``words`` of a ``domain.branches`` entry, by the exporter's table
    (:func:`~cxr_export.domain.stats.branch_words`)."""
    from .domain.stats import Branch, branch_words

    name = str(entry.get("name", ""))
    grid = int(name[len("thumb"):]) if name.startswith("thumb") and name[len("thumb"):].isdigit() else 0
    source = "thumbnail" if grid else ("stage" if name.startswith("stage") else name)
    return branch_words(Branch(name, str(entry.get("kind", "distance")), source, None, grid))  # type: ignore[arg-type]


def _stale(old: Any, new: List[Dict[str, float]]) -> bool:
    if not isinstance(old, list) or len(old) != len(new) or not all(isinstance(p, dict) for p in old):
        return True
    return any(p.get("flag_rate") != q["flag_rate"] or not isinstance(p.get("threshold"), (int, float))
               or abs(p["threshold"] - q["threshold"]) > STALE_TOLERANCE * max(1.0, abs(q["threshold"]))
               for p, q in zip(old, new))


def domain_update(spec: ModelSpec, scores: Optional[np.ndarray]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The ``domain`` block with its operating points (from the validation ``scores``) and branch words
    brought up to date, or None when nothing changes; and what was done, in words."""
    from .domain.fit import OPERATING_RATES, operating_points

    if spec.domain_output is None or scores is None:
        return None, "none (the file has no image check)"
    block = spec.to_dict()["domain"]
    target = block.get("target_flag_rate")
    own = (float(target),) if isinstance(target, (int, float)) and 0.0 < target < 1.0 else ()
    points = operating_points(scores, tuple(OPERATING_RATES) + own)
    old = block.get("operating_points")
    if not old:
        said = f"{len(points)} written (none before)"
    elif _stale(old, points):
        said = f"{len(points)} written (the {len(old)} there were stale)"
    else:
        points, said = old, f"{len(old)} kept (up to date)"
    branches = [dict(b) for b in block.get("branches") or [] if isinstance(b, dict)]
    missing = [b for b in branches if not b.get("words")]
    for b in missing:
        b["words"] = branch_words_of(b)
    if missing:
        said += f"; words for {len(missing)} branches"
    new = {**block, "operating_points": points, **({"branches": branches} if missing else {})}
    return (None if new == block else new), said


@dataclass
class Outcome:
    """What the temperature step decided: the temperature the graph holds afterwards (None: none),
    the spec's threshold afterwards and the ``calibration`` block (``reliability`` still to fill)."""

    graph_temperature: Optional[float]
    threshold: float
    block: Dict[str, Any]


def raw_threshold(spec: ModelSpec, temperature: Optional[float]) -> float:
    """The threshold on the probabilities without ``temperature`` (the file's own when it has none)."""
    if temperature is None:
        return spec.threshold
    derived = moved_threshold(spec.threshold, 1.0 / temperature)
    recorded = spec.to_dict().get("calibration", {}).get("threshold_before")
    return float(recorded) if isinstance(recorded, (int, float)) and abs(recorded - derived) < 1e-9 else derived


def temperature_outcome(spec: ModelSpec, outs: Outputs, present: Optional[float], fit: bool) -> Outcome:
    """Fit (``fit``) or keep (``present``, the temperature in the file) the temperature and fill the block."""
    y, margin = outs.y, outs.margin
    before = raw_threshold(spec, present)
    ece0, nll0 = expected_calibration_error(y, sigmoid(margin)), nll(y, margin)
    temperature = fit_temperature(y, margin) if fit else present
    if temperature is None:
        ece1, nll1 = ece0, nll0
    else:
        ece1, nll1 = expected_calibration_error(y, sigmoid(margin / temperature)), nll(y, margin, temperature)
    applied = temperature is not None and (ece1 < ece0 if fit else True)
    graph = temperature if applied else None
    if graph == present:
        after = spec.threshold
    else:
        after = moved_threshold(before, graph) if graph is not None else before
    block = {"method": METHOD, "temperature": temperature, "applied": applied, "images": int(len(y)),
             "part": "val part of the split", "bins": BINS, "ece_before": ece0, "ece_after": ece1,
             "nll_before": nll0, "nll_after": nll1, "threshold_before": before, "threshold_after": after,
             "reliability": {"bins": []}}
    return Outcome(graph, after, block)


# ---- one file
class Refused(RuntimeError):
    """The file with the temperature failed its check (labels or probabilities); nothing was written."""


def check_written(path: Path, spec: ModelSpec, pixels: np.ndarray, outs: Outputs, temperature: Optional[float],
                  labels_threshold: float, threads: int = 0, name: str = "") -> np.ndarray:
    """The positive probabilities of the file at ``path`` (spec ``spec``); :class:`Refused` unless they equal
    ``sigmoid(margin / T)`` and label every validation image as the file did before (``labels_threshold``)."""
    from .domain.fit import run_outputs

    (probs,) = run_outputs(path, spec, pixels, [spec.prob_output], threads=threads)
    p = probs[:, spec.positive_index]
    expected = sigmoid(outs.margin / (temperature or 1.0))
    tolerance = FP16_PROBABILITY_TOLERANCE if spec.precision == "fp16" else PROBABILITY_TOLERANCE
    diff = float(np.max(np.abs(p - expected))) if len(p) else 0.0
    if diff > tolerance:
        raise Refused(f"{name}: with the temperature its probabilities differ from sigmoid(margin / T) by "
                      f"{diff:.3g} (more than {tolerance:g}); not written")
    flips = int(np.sum((p >= spec.threshold) != (outs.probability >= labels_threshold)))
    if flips:
        raise Refused(f"{name}: the temperature and threshold {spec.threshold:.6g} would change {flips} of "
                      f"{len(p)} validation labels; not written")
    return p


def _load(path: Path) -> Any:
    """The whole ``onnx.ModelProto`` of a model file (one clear ModelError when it is not one)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    from .modelio import load_onnx

    model = load_onnx(path)
    if any(uses_external_data(t) for t in model.graph.initializer):
        load_external_data_for_model(model, str(path.parent))
    return model


def calibrate_file(path: str | Path, data_dir: str | Path, out: Optional[str | Path] = None,
                   temperature: bool = True, threads: int = 0, cache: Optional[Dict[Any, Any]] = None
                   ) -> Dict[str, Any]:
    """Bring the file's operating points and temperature up to date (see the module) and write it to
    ``out`` (default: in place) once its checks pass; returns what was done (:func:`summary_line`).

    ``temperature`` False fits none and keeps a temperature already in the file.

    Examples:
        >>> result = calibrate_file("models/vgg16_int8.onnx", "chest_xray/train", "/tmp/r.onnx")  # doctest: +SKIP
        >>> result["calibration"]["applied"], result["operating_points"]                         # doctest: +SKIP
        (True, '10 written (none before); words for 6 branches')
    """
    import onnx

    from .modelio import spec_of, staged, write_spec

    started = time.perf_counter()
    path = Path(path)
    out = Path(out or path)
    model = _load(path)
    spec = spec_of(model, str(path))
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: no such training folder (pass the folder the model was trained on)")
    pixels, y = validation_set(spec, data_dir, cache)
    present = find_logits(model, spec.prob_output).temperature
    outs = file_outputs(model, spec, pixels, y, threads)
    domain_block, points_said = domain_update(spec, outs.domain)
    outcome = temperature_outcome(spec, outs, present, temperature)
    fields: Dict[str, Any] = {"calibration": outcome.block, "threshold": outcome.threshold}
    if domain_block is not None:
        fields["domain"] = domain_block
    new_spec = spec.updated(fields)
    with staged(out) as tmp:
        if outcome.graph_temperature != present:
            set_temperature(model, spec.prob_output, outcome.graph_temperature)
            onnx.save(model, str(tmp))
            probs = check_written(tmp, new_spec, pixels, outs, outcome.graph_temperature, spec.threshold, threads,
                                  str(out))
        else:
            shutil.copyfile(path, tmp)
            probs = outs.probability
        outcome.block["reliability"] = {"bins": reliability(y, probs)}
        write_spec(tmp, spec.updated(fields))
    return {"path": str(out), "calibration": outcome.block, "operating_points": points_said,
            "seconds": time.perf_counter() - started}


def summary_line(result: Dict[str, Any]) -> str:
    """One line for a :func:`calibrate_file` result: T, ECE and NLL before -> after, threshold, operating points."""
    c = result["calibration"]
    if c["temperature"] is None:
        t = "no temperature"
    else:
        t = f"T {c['temperature']:.4g} " + ("applied" if c["applied"] else "not applied (ECE not lower)")
    return (f"{result['path']}: {t}; validation ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL "
            f"{c['nll_before']:.4f} -> {c['nll_after']:.4f} ({c['images']} images); threshold "
            f"{c['threshold_before']:.6g} -> {c['threshold_after']:.6g}; operating points: "
            f"{result['operating_points']}; {result['seconds']:.1f}s")


# ---- the command
EXAMPLES = """examples:
  python -m cxr_export.calibrate models/vgg16_int8.onnx --data chest_xray/train
  python -m cxr_export.calibrate models/*.onnx --data chest_xray/train --threads 4
  python -m cxr_export.calibrate default.onnx --data chest_xray/train --out /tmp/default_cal.onnx
  python -m cxr_export.calibrate m.onnx --data chest_xray/train --no-temperature   # operating points only

Each file's validation images are its training folder split again as its spec's provenance says
(checked against its split hash). Files are updated in place (atomically) unless --out. A file that
already has a temperature gets it refitted, never a second one; --no-temperature keeps it.
Exit status 2: a file could not be read or calibrated (bad file, wrong folder); 3: a file failed its
check after the temperature (labels or probabilities changed) and was left as it was.
Details: docs/export.md, "Calibration and operating points".
"""


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(prog="python -m cxr_export.calibrate", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Set the image check's operating points and fit a temperature for the "
                                            "probabilities of cxr model files, on their validation images.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="cxr model file(s), updated in place unless --out")
    p.add_argument("--data", required=True, metavar="TRAIN_DIR",
                   help="the training folder the models were trained on (NORMAL/, PNEUMONIA/)")
    p.add_argument("--out", metavar="FILE", help="write here instead of in place (one model only)")
    p.add_argument("--no-temperature", dest="temperature", action="store_false",
                   help="fit no temperature (a temperature already in a file stays): operating points only")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: all cores)")
    return p


def _one_line(path: str, exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg if msg.startswith(str(path)) else f"{path}: {msg}"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status (0, 2: bad input, 3: a file refused)."""
    from cxr_infer.errors import CXRError

    args = build_parser().parse_args(argv)
    prog = "python -m cxr_export.calibrate"
    if args.out and len(args.models) > 1:
        print(f"{prog}: error: --out takes one model, not {len(args.models)}", file=sys.stderr)
        return 2
    status, cache = 0, {}  # type: Tuple[int, Dict[Any, Any]]
    for path in args.models:
        try:
            result = calibrate_file(path, args.data, args.out, args.temperature, args.threads, cache)
        except Refused as exc:
            print(f"{prog}: refused: {_one_line(path, exc)}", file=sys.stderr)
            status = max(status, 3)
            continue
        except (CXRError, ValueError, FileNotFoundError, KeyError, OSError) as exc:
            print(f"{prog}: error: {_one_line(path, exc)}", file=sys.stderr)
            status = max(status, 2)
            continue
        print(summary_line(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
