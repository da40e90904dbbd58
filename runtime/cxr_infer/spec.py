"""The model spec: a JSON document in the ONNX file's ``metadata_props`` under ``cxr.spec``.

A ``.onnx`` file is the whole model: the runtime reads everything it needs (input,
resize rule, normalisation, labels, threshold) from this spec, validates it, and refuses
a file whose spec it does not understand. JSON only: nothing is evaluated or unpickled.

Example:
    >>> spec = ModelSpec.new(backbone="tiny", precision="fp32", threshold=0.5)
    >>> ModelSpec.from_json(spec.to_json()).threshold
    0.5
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ModelError

SPEC_KEY = "cxr.spec"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1
PRECISIONS = ("fp32", "int8", "fp16")

REQUIRED = ("format_version", "backbone", "precision", "input", "outputs", "resize", "normalization", "labels",
            "positive_label", "threshold", "provenance")


def spec_from_metadata(metadata: Mapping[str, str], source: str = "model") -> "ModelSpec":
    """The validated spec in a model file's metadata (``{key: value}`` of its ``metadata_props``).

    Example:
        >>> spec_from_metadata({SPEC_KEY: ModelSpec.new(backbone="tiny").to_json()}).backbone
        'tiny'
    """
    if SPEC_KEY not in metadata:
        raise ModelError(f"{source}: has no {SPEC_KEY} metadata, so it is not a cxr model (make one with cxr-export)")
    return ModelSpec.from_json(metadata[SPEC_KEY], source=source)


def operating_points(value: Any, source: str = "cxr.spec") -> List[Tuple[float, float]]:
    """A spec's ``domain.operating_points`` as ``(flag rate, threshold)`` pairs, validated.

    Each entry ``{"flag_rate": r, "threshold": t}`` says: a threshold of ``t`` flags a share ``r`` of
    the file's validation images (in-population images it was not fitted on), so a hospital can
    trade flagged in-population images for caught out-of-population ones. Rates must lie in (0, 1)
    and increase, thresholds must be finite and not increase with them.

    Example:
        >>> operating_points([{"flag_rate": 0.05, "threshold": 1.5}, {"flag_rate": 0.1, "threshold": 1.2}])
        [(0.05, 1.5), (0.1, 1.2)]
    """
    bad = f"{source}: domain.operating_points must be a list of {{flag_rate, threshold}} with flag rates " \
          "in (0, 1) increasing and finite thresholds not increasing"
    if not isinstance(value, list):
        raise ModelError(bad)
    out: List[Tuple[float, float]] = []
    for entry in value:
        if not isinstance(entry, dict):
            raise ModelError(bad)
        rate, thr = entry.get("flag_rate"), entry.get("threshold")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (rate, thr)):
            raise ModelError(bad)
        if not 0.0 < rate < 1.0 or (out and (rate <= out[-1][0] or thr > out[-1][1])):
            raise ModelError(bad)
        out.append((float(rate), float(thr)))
    return out


def threshold_at(points: Sequence[Tuple[float, float]], rate: float) -> float:
    """The domain threshold that flags a share ``rate`` of the validation images, by linear
    interpolation between the two nearest ``points`` (from :func:`operating_points`).

    Raises:
        ValueError: ``rate`` lies outside the points' range (the message gives the range).

    Example:
        >>> round(threshold_at([(0.05, 1.5), (0.1, 1.2)], 0.075), 6)
        1.35
    """
    if not points:
        raise ValueError("no operating points")
    rates = [r for r, _ in points]
    if not (isinstance(rate, (int, float)) and rates[0] - 1e-12 <= rate <= rates[-1] + 1e-12):
        raise ValueError(f"flag rate {rate!r} is outside the file's operating points "
                         f"({rates[0]:g} to {rates[-1]:g})")
    for (r0, t0), (r1, t1) in zip(points, points[1:]):
        if rate <= r1:
            return t0 + (t1 - t0) * (min(max(rate, r0), r1) - r0) / (r1 - r0)
    return points[-1][1]


@dataclass
class ModelSpec:
    """The parsed, validated ``cxr.spec`` of a model file; ``raw`` keeps every field."""

    raw: Dict[str, Any] = field(default_factory=dict)

    # ---- construction
    @classmethod
    def new(cls, backbone: str, precision: str = "fp32", threshold: float = 0.5, image_size: int = 224,
            labels: Optional[List[str]] = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            input_name: str = "input", prob_output: str = "probabilities", features_output: Optional[str] = None,
            provenance: Optional[Dict[str, Any]] = None, **extra: Any) -> "ModelSpec":
        """A complete spec with cxr's conventions; ``extra`` keys are added at top level."""
        labels = list(labels or ["NORMAL", "PNEUMONIA"])
        raw: Dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "backbone": backbone,
            "precision": precision,
            "input": {"name": input_name, "shape": [None, 3, image_size, image_size], "dtype": "float32",
                      "layout": "NCHW", "color": "RGB"},
            "outputs": {"probabilities": prob_output, "features": features_output},
            "resize": {"size": [image_size, image_size], "method": "bicubic", "keep_aspect": False,
                       "convert": "RGB", "library": "Pillow"},
            "normalization": {"in_graph": False, "scale": 1.0 / 255.0, "mean": list(mean), "std": list(std),
                              "formula": "(pixel / 255 - mean) / std, per RGB channel"},
            "labels": labels,
            "positive_label": labels[-1],
            "threshold": float(threshold),
            "provenance": dict(provenance or {}),
        }
        raw.update(extra)
        spec = cls(raw)
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelSpec":
        """Parse and validate; :class:`ModelError` (one line) on anything not understood."""
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: cxr.spec is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{source}: cxr.spec must be a JSON object")
        spec = cls(raw)
        spec.validate(source)
        return spec

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=None, sort_keys=True, separators=(",", ":"))

    def copy(self) -> "ModelSpec":
        return ModelSpec(copy.deepcopy(self.raw))

    # ---- validation
    def validate(self, source: str = "model") -> None:
        r = self.raw
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ModelError(f"{source}: cxr.spec lacks required field(s): {', '.join(missing)}")
        version = str(r["format_version"])
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise ModelError(f"{source}: cxr.spec format_version {version!r} is not a version number") from None
        if major != SUPPORTED_MAJOR:
            raise ModelError(f"{source}: cxr.spec format_version {version} is not supported by this runtime"
                             f" (understands {SUPPORTED_MAJOR}.x); upgrade cxr")
        if r["precision"] not in PRECISIONS:
            raise ModelError(f"{source}: unknown precision {r['precision']!r} (expected one of {', '.join(PRECISIONS)})")
        inp = r["input"]
        if not isinstance(inp, dict) or not {"name", "shape", "dtype", "layout"} <= set(inp):
            raise ModelError(f"{source}: cxr.spec input needs name, shape, dtype and layout")
        if inp["layout"] != "NCHW" or len(inp["shape"]) != 4 or inp["shape"][1] != 3:
            raise ModelError(f"{source}: only NCHW 3-channel inputs are supported (got {inp['layout']} {inp['shape']})")
        if inp["dtype"] not in ("float32", "float16"):
            raise ModelError(f"{source}: input dtype {inp['dtype']!r} is not supported")
        rs = r["resize"]
        if not isinstance(rs, dict) or rs.get("method") not in ("bicubic", "bilinear", "lanczos", "nearest") \
                or len(rs.get("size", [])) != 2:
            raise ModelError(f"{source}: cxr.spec resize needs size [w, h] and a method (bicubic, bilinear, ...)")
        norm = r["normalization"]
        if not isinstance(norm, dict) or ("in_graph" not in norm):
            raise ModelError(f"{source}: cxr.spec normalization must say in_graph true/false")
        if not norm["in_graph"] and not (len(norm.get("mean", [])) == 3 and len(norm.get("std", [])) == 3):
            raise ModelError(f"{source}: cxr.spec normalization needs 3 means and 3 stds")
        labels = r["labels"]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ModelError(f"{source}: cxr.spec labels must be a list of at least two names")
        if r["positive_label"] not in labels:
            raise ModelError(f"{source}: positive_label {r['positive_label']!r} is not one of the labels {labels}")
        t = r["threshold"]
        if not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ModelError(f"{source}: threshold {t!r} must be a number in [0, 1]")
        outs = r["outputs"]
        if not isinstance(outs, dict) or not outs.get("probabilities"):
            raise ModelError(f"{source}: cxr.spec outputs must name the probabilities output")
        if not isinstance(r["provenance"], dict):
            raise ModelError(f"{source}: cxr.spec provenance must be an object")
        if "intended_use" in r:
            from .intended_use import IntendedUse

            IntendedUse.from_spec(r["intended_use"], source)
        if outs.get("domain_score"):
            dom = r.get("domain")
            if not isinstance(dom, dict) or not isinstance(dom.get("threshold"), (int, float)) \
                    or isinstance(dom.get("threshold"), bool):
                raise ModelError(f"{source}: cxr.spec names a domain_score output but no numeric domain.threshold")
            if "operating_points" in dom:
                operating_points(dom["operating_points"], source)

    # ---- convenient views
    @property
    def backbone(self) -> str:
        return self.raw["backbone"]

    @property
    def precision(self) -> str:
        return self.raw["precision"]

    @property
    def threshold(self) -> float:
        return float(self.raw["threshold"])

    @property
    def labels(self) -> List[str]:
        return list(self.raw["labels"])

    @property
    def positive_label(self) -> str:
        return self.raw["positive_label"]

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def input_name(self) -> str:
        return self.raw["input"]["name"]

    @property
    def input_dtype(self) -> str:
        return self.raw["input"]["dtype"]

    @property
    def image_size(self) -> tuple:
        w, h = self.raw["resize"]["size"]
        return int(w), int(h)

    @property
    def resize_method(self) -> str:
        """The Pillow resampling filter the model was trained with (``bicubic`` for every cxr model so far)."""
        return str(self.raw["resize"].get("method", "bicubic"))

    @property
    def mean(self) -> List[float]:
        return list(self.raw["normalization"].get("mean", [0.0, 0.0, 0.0]))

    @property
    def std(self) -> List[float]:
        return list(self.raw["normalization"].get("std", [1.0, 1.0, 1.0]))

    @property
    def normalization_in_graph(self) -> bool:
        return bool(self.raw["normalization"]["in_graph"])

    @property
    def prob_output(self) -> str:
        return self.raw["outputs"]["probabilities"]

    @property
    def features_output(self) -> Optional[str]:
        return self.raw["outputs"].get("features")

    @property
    def domain_output(self) -> Optional[str]:
        """The graph output with the out-of-domain score ([N]); None when the file has no domain statistics."""
        return self.raw["outputs"].get("domain_score") or None

    @property
    def heatmap_output(self) -> Optional[str]:
        """The graph output with the Grad-CAM map ([N, h, w], see ``cxr_export.heatmap``); None when absent."""
        return self.raw["outputs"].get("heatmap") or None

    @property
    def domain_terms_output(self) -> Optional[str]:
        """The graph output with each domain branch's term ([N, branches], named by ``domain.branches``);
        None in files made before it existed."""
        return self.raw["outputs"].get("domain_terms") or None

    @property
    def domain_threshold(self) -> Optional[float]:
        """Scores above this are outside the model's domain; None when the check is unavailable."""
        if not self.domain_output:
            return None
        return float(self.raw["domain"]["threshold"])

    @property
    def domain_operating_points(self) -> List[Tuple[float, float]]:
        """``(flag rate, threshold)`` pairs from the file's validation images, rates increasing (see
        :func:`operating_points`); empty when the check is unavailable or the file predates them."""
        if not self.domain_output:
            return []
        return operating_points(self.raw["domain"].get("operating_points", []), "cxr.spec")
