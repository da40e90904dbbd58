"""What a model file is, for people: ``cxr-infer --info`` (``--info --json`` prints the whole spec).

Examples:
    >>> from cxr_infer import Classifier
    >>> print(summary(Classifier()))                         # doctest: +SKIP
    model         .../default.onnx (17.1 MiB)
    sha256        9b574f7cd0a6b919...
    backbone      vgg16, int8
    ...
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Mapping, Tuple, Union

_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, "os.PathLike[str]"]) -> str:
    """The hex SHA-256 of a file (cached per path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _metrics_line(m: Mapping[str, Any]) -> str:
    counts = "/".join(str(m.get(k, "?")) for k in ("tp", "fp", "tn", "fn"))
    figures = ", ".join(f"{label} {m[key]:.4f}" for key, label in (("accuracy", "accuracy"), ("auc", "AUC"),
                                                                   ("sensitivity", "sensitivity"),
                                                                   ("specificity", "specificity"))
                        if isinstance(m.get(key), (int, float)))
    at = f" at threshold {m['threshold']:.4g}" if isinstance(m.get("threshold"), (int, float)) else ""
    return f"{m.get('n', '?')} images{at}: {figures}; TP/FP/TN/FN {counts}"


def summary(classifier: Any) -> str:
    """A few lines naming what the classifier runs: the file and its SHA-256, backbone and
    precision, input, labels and threshold, intended use, the image check and its operating points,
    the heatmap, validation and test metrics, provenance and where it runs."""
    spec = classifier.spec
    rows: List[Tuple[str, str]] = []
    if classifier.model_path:
        size = os.path.getsize(classifier.model_path) / 2**20
        rows += [("model", f"{classifier.model_path} ({size:.1f} MiB)"),
                 ("sha256", file_sha256(classifier.model_path))]
    else:
        rows.append(("model", classifier.name))
    rows.append(("backbone", f"{spec.backbone}, {spec.precision}"))
    w, h = spec.image_size
    where = " in the graph" if spec.normalization_in_graph else ""
    rows.append(("input", f"{w} x {h} RGB, {spec.resize_method} resize (aspect not kept), "
                          f"mean {spec.mean} std {spec.std}{where}"))
    rows.append(("labels", f"{', '.join(spec.labels)} (positive: {spec.positive_label})"))
    rule = spec.provenance.threshold_rule
    rows.append(("threshold", f"{classifier.threshold:g}" + ("" if classifier.threshold == spec.threshold else
                                                           f" (set by the caller; the file's: {spec.threshold:g})")
                 + (f"; the file's rule: {rule}" if rule else "")))
    use = spec.intended_use
    rows.append(("intended use", "none recorded: DICOM header checks are off" if use is None else
                 f"{use.describe()}" + ("" if classifier.intended_use is not None else " (header checks turned off)")))
    domain = spec.domain
    if domain is None:
        rows.append(("image check", "none: the file has no domain statistics"))
    else:
        state = f"threshold {classifier.domain_threshold:.4g} ({classifier.domain_threshold_source})" \
            if classifier.domain_available else "turned off"
        share = f", flags {domain.flag_rate_validation:.1%} of validation images at the file's own" \
            if domain.flag_rate_validation is not None else ""
        rows.append(("image check", f"{len(domain.branches)} tests; {state}{share}"))
        points = ", ".join(f"{r:.1%}: {t:.4g}" for r, t in domain.operating_points)
        rows.append(("operating pts", f"flag rate: threshold {points}" if points else
                     "none in this file (--domain-flag-rate needs them; --domain-threshold S works)"))
    heatmap = spec.heatmap
    if heatmap is None:
        rows.append(("heatmap", "none"))
    else:
        grid = "x".join(map(str, heatmap.grid or ("?", "?")))
        when = "computed only when asked for" if heatmap.switch else "computed on every call"
        rows.append(("heatmap", f"Grad-CAM {grid}, {when} "
                                f"(cxr-infer --heatmap DIR)"))
    metrics = spec.provenance.metrics
    for name in ("validation", "test"):
        # the figures at the threshold in use where the file records them (e.g. validation_at_0.5)
        kept = [k for k in metrics if (k == name or k.startswith(name + "_at_")) and isinstance(metrics[k], Mapping)]
        at = [k for k in kept if isinstance(metrics[k].get("threshold"), (int, float))
              and abs(metrics[k]["threshold"] - classifier.threshold) < 1e-9]
        key = (at or kept or [None])[0]
        rows.append((name, _metrics_line(metrics[key]) if key else "not recorded in the file"
                     + (" (cxr-bench accuracy measures it)" if name == "test" else "")))
    fields = spec.provenance.fields
    trained = ", ".join(str(v) for v in (fields.get("trained"), fields.get("trained_on"), fields.get("recipe"),
                                         fields.get("weights_origin")) if v)
    if trained:
        rows.append(("trained", trained))
    rows.append(("runs on", f"{classifier.device} ({', '.join(classifier.providers)}), {classifier.threads} threads"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)
