"""The model spec: a JSON document in the ONNX file's ``metadata_props`` under ``cxr.spec``.

The runtime reads everything it needs from this spec, validates it, and refuses a file whose spec
it does not understand; JSON only, nothing is evaluated or unpickled. :class:`ModelSpec` is the one
reader of that JSON: everything else reads its typed views and writes through
:meth:`ModelSpec.updated`. :data:`GRAPH_ADDITIONS` names the graphs ``cxr-export`` adds after the
classifier: the spec block that describes each and the outputs it adds.

Examples:
    >>> spec = ModelSpec.new(backbone="tiny", precision="fp32", threshold=0.5)
    >>> ModelSpec.from_json(spec.to_json()).threshold
    0.5
    >>> spec.updated({"threshold": 0.3}).threshold, spec.domain is None
    (0.3, True)
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from .intended_use import IntendedUse

SPEC_KEY = "cxr.spec"
FORMAT_VERSION = "1.0"
SUPPORTED_MAJOR = 1
PRECISIONS = ("fp32", "int8", "fp16")

REQUIRED = ("format_version", "backbone", "precision", "input", "outputs", "resize", "normalization", "labels",
            "positive_label", "threshold", "provenance")


@dataclass(frozen=True)
class GraphAddition:
    """A graph ``cxr-export`` appends after the classifier: its spec block and the outputs it adds
    (``cxr_export.additions`` holds how it is built and stripped)."""

    name: str
    outputs: Tuple[str, ...]
    description: str


GRAPH_ADDITIONS: Dict[str, GraphAddition] = {a.name: a for a in (
    GraphAddition("domain", ("domain_score", "domain_terms"),
                  "the out-of-domain check: how far an image lies from the training X-rays"),
    GraphAddition("heatmap", ("heatmap",), "Grad-CAM of the positive label at the last feature map"),
)}

#: How a domain-check test (``domain.branches[i].name``) is named in a reason, for files whose branches
#: do not carry their own ``words`` (written by cxr-export since the spec gained them).
LEGACY_BRANCH_WORDS = {"features": "the model's features", "thumb16": "image layout at 16x16",
                       "thumb8": "image layout at 8x8", "thumb4": "the chest's overall shape in the frame (4x4)",
                       "orientation": "orientation (upright versus upside down)",
                       **{f"stage{i}": f"image statistics at the network's stage {i}" for i in range(1, 5)}}


def spec_from_metadata(metadata: Mapping[str, str], source: str = "model") -> "ModelSpec":
    """The validated spec in a model file's metadata (``{key: value}`` of its ``metadata_props``).

    Examples:
        >>> spec_from_metadata({SPEC_KEY: ModelSpec.new(backbone="tiny").to_json()}).backbone
        'tiny'
    """
    if SPEC_KEY not in metadata:
        raise ModelError(f"{source}: has no {SPEC_KEY} metadata, so it is not a cxr model (make one with cxr-export)")
    return ModelSpec.from_json(metadata[SPEC_KEY], source=source)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def operating_points(value: Any, source: str = "cxr.spec") -> List[Tuple[float, float]]:
    """A spec's ``domain.operating_points`` as ``(flag rate, threshold)`` pairs, validated.

    Each entry ``{"flag_rate": r, "threshold": t}`` says: a threshold of ``t`` flags a share ``r`` of
    the file's validation images (in-population images it was not fitted on), so a hospital can
    trade flagged in-population images for caught out-of-population ones. Rates must lie in (0, 1)
    and increase, thresholds must be finite and not increase with them.

    Examples:
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
        if not (_number(rate) and _number(thr)):
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

    Examples:
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


def _frozen(value: Any) -> Any:
    """A read-only deep copy: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class Outputs:
    """The graph output each role is read from (None where the file has no such output)."""

    probabilities: str
    features: Optional[str] = None
    domain_score: Optional[str] = None
    domain_terms: Optional[str] = None
    heatmap: Optional[str] = None
    #: every role the spec names, with its graph output (roles this runtime does not know included)
    named: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class DomainBranch:
    """One test of the image check: its name, and how a reason names it."""

    name: str
    words: str


@dataclass(frozen=True)
class DomainCheck:
    """The ``domain`` block: the image check's threshold, its ``(flag rate, threshold)`` operating
    points (empty in files exported before them), its tests, and the share of validation images
    the file's own threshold flags."""

    threshold: float
    operating_points: Tuple[Tuple[float, float], ...]
    branches: Tuple[DomainBranch, ...]
    flag_rate_validation: Optional[float]

    @classmethod
    def from_block(cls, block: Any, source: str) -> "DomainCheck":
        if not isinstance(block, dict) or not _number(block.get("threshold")):
            raise ModelError(f"{source}: cxr.spec names a domain_score output but no numeric domain.threshold")
        branches = []
        for i, b in enumerate(block.get("branches") or []):
            if isinstance(b, dict):
                name = str(b.get("name", f"branch {i}"))
                branches.append(DomainBranch(name, str(b.get("words") or LEGACY_BRANCH_WORDS.get(name, name))))
        rate = block.get("flag_rate_validation")
        return cls(threshold=float(block["threshold"]),
                   operating_points=tuple(operating_points(block.get("operating_points", []), source)),
                   branches=tuple(branches), flag_rate_validation=float(rate) if _number(rate) else None)


@dataclass(frozen=True)
class Heatmap:
    """The ``heatmap`` block: the Grad-CAM output, its grid ``(h, w)``, method and layer; ``signed``
    maps hold the evidence for the positive label (> 0) and for the other (< 0); ``switch`` names the
    boolean graph input that turns the map's nodes on (None: they run on every call)."""

    output: str
    grid: Optional[Tuple[int, int]]
    method: str
    layer: str = ""
    signed: bool = False
    switch: Optional[str] = None

    @classmethod
    def from_block(cls, block: Any, output: str, source: str) -> "Heatmap":
        block = block if isinstance(block, dict) else {}
        grid = block.get("grid")
        valid = isinstance(grid, (list, tuple)) and len(grid) == 2 and all(isinstance(g, int) for g in grid)
        switch = block.get("switch")
        if switch is not None and not (isinstance(switch, str) and switch):
            raise ModelError(f"{source}: cxr.spec heatmap.switch must name a graph input")
        return cls(output=output, grid=(int(grid[0]), int(grid[1])) if valid else None,
                   method=str(block.get("method", "")), layer=str(block.get("layer") or block.get("feature_map", "")),
                   signed=bool(block.get("signed", False)), switch=switch)


@dataclass(frozen=True)
class Calibration:
    """The ``calibration`` block: the temperature fitted on the file's validation images (``applied``:
    it is in the graph, and the threshold moved with it), the validation ECE and the decision threshold
    before and after, and how many validation images it was measured on."""

    temperature: Optional[float]
    applied: bool
    ece_before: Optional[float]
    ece_after: Optional[float]
    threshold_before: Optional[float]
    threshold_after: Optional[float]
    images: int

    @classmethod
    def from_block(cls, block: Any, source: str) -> "Calibration":
        t = block.get("temperature") if isinstance(block, dict) else None
        if not isinstance(block, dict) or not (t is None or (_number(t) and t > 0)) or \
                not isinstance(block.get("applied"), bool) or (block["applied"] and t is None):
            raise ModelError(f"{source}: cxr.spec calibration needs applied (true or false) and a temperature "
                             "above 0 (or null when none was fitted)")

        def number(key: str) -> Optional[float]:
            return float(block[key]) if _number(block.get(key)) else None

        return cls(temperature=None if t is None else float(t), applied=block["applied"],
                   ece_before=number("ece_before"), ece_after=number("ece_after"),
                   threshold_before=number("threshold_before"), threshold_after=number("threshold_after"),
                   images=int(block["images"]) if _number(block.get("images")) else 0)


@dataclass(frozen=True)
class Provenance:
    """Where the model came from. ``metrics`` maps a split's name (``validation``,
    ``validation_at_0.5``, ``test`` where recorded) to its figures; ``fields`` holds every field."""

    trained: Optional[str]
    split: Mapping[str, Any]
    split_hash: Optional[str]
    training_data_hash: Optional[str]
    metrics: Mapping[str, Mapping[str, Any]]
    threshold_rule: Optional[str]
    fields: Mapping[str, Any]


class ModelSpec:
    """The parsed, validated ``cxr.spec`` of a model file: typed views to read it, :meth:`updated` for
    a changed copy, :meth:`to_dict` and :meth:`to_json` for the whole document."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data: Dict[str, Any] = copy.deepcopy(dict(data))

    # ---- construction
    @classmethod
    def new(cls, backbone: str, precision: str = "fp32", threshold: float = 0.5, image_size: int = 224,
            labels: Optional[List[str]] = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            input_name: str = "input", prob_output: str = "probabilities", features_output: Optional[str] = None,
            provenance: Optional[Dict[str, Any]] = None, **extra: Any) -> "ModelSpec":
        """A complete spec with cxr's conventions; ``extra`` keys are added at top level."""
        labels = list(labels or ["NORMAL", "PNEUMONIA"])
        data: Dict[str, Any] = {
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
        data.update(extra)
        spec = cls(data)
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> "ModelSpec":
        """Parse and validate; :class:`ModelError` (one line) on anything not understood."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: cxr.spec is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{source}: cxr.spec must be a JSON object")
        spec = cls(data)
        spec.validate(source)
        return spec

    def to_json(self) -> str:
        return json.dumps(self._data, indent=None, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> Dict[str, Any]:
        """The whole spec as a new JSON-ready dict (changing it changes nothing here)."""
        return copy.deepcopy(self._data)

    def copy(self) -> "ModelSpec":
        return ModelSpec(self._data)

    def updated(self, fields: Optional[Mapping[str, Any]] = None,
                outputs: Optional[Mapping[str, Optional[str]]] = None) -> "ModelSpec":
        """A validated copy with top-level ``fields`` replaced (a value of None removes the field)
        and the output roles in ``outputs`` set (None removes the role).

        Examples:
            >>> s = ModelSpec.new(backbone="tiny", features_output="features")
            >>> s.updated(outputs={"features": None}).outputs.features is None
            True
        """
        fields, outputs = dict(fields or {}), dict(outputs or {})
        data = {**copy.deepcopy(self._data), **copy.deepcopy(fields)}
        data = {k: v for k, v in data.items() if not (k in fields and v is None)}
        if outputs:
            named = {**data.get("outputs", {}), **outputs}
            data["outputs"] = {r: n for r, n in named.items() if not (r in outputs and n is None)}
        spec = ModelSpec(data)
        spec.validate()
        return spec

    def without_additions(self, names: Sequence[str]) -> "ModelSpec":
        """The spec of the file without the added graphs ``names`` (keys of :data:`GRAPH_ADDITIONS`):
        their outputs and blocks removed."""
        roles = {role: None for name in names for role in GRAPH_ADDITIONS[name].outputs}
        return self.updated({name: None for name in names}, roles)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and other._data == self._data

    def __repr__(self) -> str:
        return f"ModelSpec(backbone={self.backbone!r}, precision={self.precision!r}, threshold={self.threshold})"

    # ---- validation
    def validate(self, source: str = "model") -> None:
        r = self._data
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
            raise ModelError(f"{source}: unknown precision {r['precision']!r} "
                             f"(expected one of {', '.join(PRECISIONS)})")
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
            DomainCheck.from_block(r.get("domain"), source)
        if "calibration" in r:
            Calibration.from_block(r["calibration"], source)
        if outs.get("heatmap"):
            Heatmap.from_block(r.get("heatmap"), outs["heatmap"], source)

    # ---- typed blocks
    @property
    def outputs(self) -> Outputs:
        """The graph outputs by role."""
        named = {k: str(v) for k, v in self._data["outputs"].items() if v}
        return Outputs(probabilities=named["probabilities"], features=named.get("features"),
                       domain_score=named.get("domain_score"), domain_terms=named.get("domain_terms"),
                       heatmap=named.get("heatmap"), named=MappingProxyType(named))

    @property
    def domain(self) -> Optional[DomainCheck]:
        """The image check, or None when the file has no domain statistics."""
        if not self._data["outputs"].get("domain_score"):
            return None
        return DomainCheck.from_block(self._data.get("domain"), "cxr.spec")

    @property
    def heatmap(self) -> Optional[Heatmap]:
        """The Grad-CAM output, or None when the file has none."""
        output = self._data["outputs"].get("heatmap")
        return Heatmap.from_block(self._data.get("heatmap"), output, "cxr.spec") if output else None

    @property
    def switches(self) -> Dict[str, Tuple[str, ...]]:
        """Boolean graph inputs that turn outputs on: ``{input: (outputs it turns on, ...)}``."""
        heatmap = self.heatmap
        return {heatmap.switch: (heatmap.output,)} if heatmap is not None and heatmap.switch else {}

    @property
    def calibration(self) -> Optional[Calibration]:
        """The temperature fitted on validation (:class:`Calibration`); None when the file has no
        ``calibration`` block."""
        block = self._data.get("calibration")
        return None if block is None else Calibration.from_block(block, "cxr.spec")

    @property
    def intended_use(self) -> "Optional[IntendedUse]":
        """Who and what the model is for (:class:`~cxr_infer.intended_use.IntendedUse`); None when the
        file has no ``intended_use`` block (DICOM header checks are then off)."""
        if "intended_use" not in self._data:
            return None
        from .intended_use import IntendedUse

        return IntendedUse.from_spec(self._data["intended_use"])

    @property
    def provenance(self) -> Provenance:
        """Training and split provenance."""
        p = self._data.get("provenance") or {}
        metrics = p.get("metrics") if isinstance(p.get("metrics"), dict) else {}
        return Provenance(trained=p.get("trained"), split=_frozen(p.get("split") or {}), split_hash=p.get("split_hash"),
                          training_data_hash=p.get("training_data_hash"), metrics=_frozen(metrics),
                          threshold_rule=self._data.get("threshold_rule") or p.get("threshold_rule"),
                          fields=_frozen(p))

    @property
    def export(self) -> Mapping[str, Any]:
        """What ``cxr-export`` recorded (opset, PyTorch parity, the INT8 settings and gate, FP16 parity),
        read-only; empty for a file not made by it."""
        return _frozen(self._data.get("export") or {})

    # ---- scalar views
    @property
    def backbone(self) -> str:
        return self._data["backbone"]

    @property
    def precision(self) -> str:
        return self._data["precision"]

    @property
    def threshold(self) -> float:
        return float(self._data["threshold"])

    @property
    def labels(self) -> List[str]:
        return list(self._data["labels"])

    @property
    def positive_label(self) -> str:
        return self._data["positive_label"]

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def input_name(self) -> str:
        return self._data["input"]["name"]

    @property
    def input_dtype(self) -> str:
        return self._data["input"]["dtype"]

    @property
    def image_size(self) -> tuple:
        """``(width, height)`` of the model's input."""
        w, h = self._data["resize"]["size"]
        return int(w), int(h)

    @property
    def resize_method(self) -> str:
        """The Pillow resampling filter the model was trained with."""
        return str(self._data["resize"].get("method", "bicubic"))

    @property
    def mean(self) -> List[float]:
        return list(self._data["normalization"].get("mean", [0.0, 0.0, 0.0]))

    @property
    def std(self) -> List[float]:
        return list(self._data["normalization"].get("std", [1.0, 1.0, 1.0]))

    @property
    def normalization_in_graph(self) -> bool:
        return bool(self._data["normalization"]["in_graph"])

    @property
    def prob_output(self) -> str:
        return self.outputs.probabilities

    @property
    def features_output(self) -> Optional[str]:
        return self.outputs.features

    @property
    def domain_output(self) -> Optional[str]:
        """The graph output with the out-of-domain score ([N]); None when the file has no domain statistics."""
        return self.outputs.domain_score

    @property
    def heatmap_output(self) -> Optional[str]:
        """The graph output with the Grad-CAM map ([N, h, w]); None when absent."""
        return self.outputs.heatmap

    @property
    def domain_terms_output(self) -> Optional[str]:
        """The graph output with each domain test's term ([N, tests]); None in files without it."""
        return self.outputs.domain_terms

    @property
    def domain_threshold(self) -> Optional[float]:
        """Scores above this are outside the model's domain; None when the check is unavailable."""
        domain = self.domain
        return None if domain is None else domain.threshold

    @property
    def domain_operating_points(self) -> List[Tuple[float, float]]:
        """The image check's ``(flag rate, threshold)`` pairs, rates increasing; empty where there are none."""
        domain = self.domain
        return [] if domain is None else list(domain.operating_points)
