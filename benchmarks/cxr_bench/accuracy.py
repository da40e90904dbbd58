"""``cxr-bench accuracy``: every metric of one or more model files on a labelled folder, with
seeded bootstrap intervals, ROC and calibration data and a per-image CSV (see docs/benchmarks.md).
"""
from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.metrics import binary_metrics, roc_curve

from .dataset import Dataset, PixelCache, list_dataset, stored_sizes, validation_dataset
from .models import OnnxModel, inspect_model, open_model
from .stats import bootstrap_metrics, calibration_bins
from .util import (
    BenchError,
    Progress,
    fmt_ci,
    fmt_num,
    fmt_pct,
    images_used,
    mb,
    md_table,
    new_report,
    say,
    write_report,
)

KIND = "cxr-bench/accuracy"


def _unique_names(paths: Sequence[Path]) -> List[str]:
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def predict_all(model: OnnxModel, pixels: np.ndarray, keep: np.ndarray, batch: int = 32,
                quiet: bool = False) -> np.ndarray:
    """Positive probabilities for ``pixels[keep]`` in batches (NaN for the others)."""
    probs = np.full(len(pixels), np.nan)
    idx = np.flatnonzero(keep)
    prog = Progress(f"{model.name}: inference", len(idx), enabled=not quiet)
    for i in range(0, len(idx), batch):
        part = idx[i:i + batch]
        probs[part] = model.predict_pixels(pixels[part])
        prog.step(len(part))
    prog.done()
    return probs


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float, rounds: int, seed: int) -> Dict[str, Any]:
    """Point metrics (:func:`binary_metrics`) plus a ``ci`` dict of bootstrap intervals."""
    return {**binary_metrics(y, p, threshold),
            "ci": bootstrap_metrics(y, p, threshold, rounds=rounds, seed=seed) if rounds else {}}


def _image_set(specs: Sequence[Any], data: Optional[str | Path], validation: Optional[str | Path],
               limit: Optional[int]) -> Tuple[Dataset, Optional[List[Tuple[set, str]]], Dict[str, Any]]:
    """The images a run reads: the folder ``data``, or the union of each file's validation split rebuilt
    from the training folder ``validation`` (with each file's own images and split hash)."""
    if (data is None) == (validation is None):
        raise BenchError("name the images: --data DIR (a labelled folder, e.g. chest_xray/test) or --validation "
                         "TRAIN_DIR (each model's own validation split, rebuilt from its spec), not both")
    if validation is None:
        return list_dataset(data, limit=limit), None, {"split": "folder"}
    ds, splits = validation_dataset(validation, specs, limit=limit)
    return ds, splits, {"split": "validation", "split_hashes": sorted({h for _, h in splits}),
                        "rule": "each model on its own validation split, rebuilt from the training folder as its "
                                "spec's provenance says and checked against its split hash"}


def run_accuracy(models: Sequence[str | Path], data: Optional[str | Path], out: str | Path, bootstrap: int = 1000,
                 seed: int = 0, batch: int = 32, threads: int = 1, device: str = "cpu",
                 limit: Optional[int] = None, name: Optional[str] = None, plots: bool = True,
                 calibration_bins_n: int = 10, quiet: bool = False, validation: Optional[str | Path] = None
                 ) -> Dict[str, Any]:
    """Evaluate ``models`` on the folder ``data`` or, with ``validation`` (a training folder) instead, each
    on its own validation split; write the report files to ``out`` and return the report."""
    out = Path(out)
    paths = [Path(m) for m in models]
    if not paths:
        raise BenchError("no model given: pass --model FILE.onnx [FILE.onnx ...]")
    inspected = {p: inspect_model(p) for p in paths}  # every file checked before any image is decoded
    warnings = [w for _, _, warn in inspected.values() for w in warn]
    for w in warnings:
        say(f"warning: {w}", quiet)
    ds, splits, data_block = _image_set([inspected[p][0] for p in paths], data, validation, limit)
    say(f"data: {ds.root}{' (validation splits)' if splits else ''} ({len(ds.files)} images: "
        + ", ".join(f"{v} {k}" for k, v in ds.counts().items()) + ")", quiet)
    cache = PixelCache(ds.files, quiet=quiet)
    results: List[Dict[str, Any]] = []
    prob_columns: Dict[str, np.ndarray] = {}
    targets: Optional[np.ndarray] = None
    for i, (path, label) in enumerate(zip(paths, _unique_names(paths))):
        model = open_model(path, device=device, threads=threads)
        say(f"{label}: {model.label}, threshold {model.spec.threshold:.4g}, input {model.spec.image_size}", quiet)
        y_all = ds.targets(model.spec.positive_label, model.spec.labels)
        targets = y_all if targets is None else targets
        pixels = cache.pixels(model.spec.image_size, model.spec.resize_method)
        keep = np.ones(len(ds.files), dtype=bool)
        keep[list(cache.failed)] = False
        if splits is not None:
            keep &= np.array([f in splits[i][0] for f in ds.files], dtype=bool)
        t0 = time.perf_counter()
        p_all = predict_all(model, pixels, keep, batch=batch, quiet=quiet)
        entry = _measure(model, label, inspected[path][1], y_all[keep], p_all[keep], bootstrap, seed,
                         calibration_bins_n)
        entry["eval_s"] = time.perf_counter() - t0
        if splits is not None:
            entry["split"] = {"name": "validation", "hash": splits[i][1], "images": int(keep.sum())}
        results.append(entry)
        prob_columns[label] = p_all
        at_t = entry["at_threshold"]
        say(f"{label}: accuracy {fmt_pct(at_t['accuracy'])}, AUC {fmt_num(at_t['auc'])}, "
            f"TP {at_t['tp']} FP {at_t['fp']} TN {at_t['tn']} FN {at_t['fn']}", quiet)
    sizes = stored_sizes(ds.files)
    report: Dict[str, Any] = {
        **new_report(KIND),
        "data": {"root": str(ds.root), **data_block, "n_images": len(ds.files), "counts": ds.counts(),
                 "stored_sizes": dict(sorted(Counter(sizes).items())),
                 "limit_per_label": limit, "decoded_images": cache.decodes,
                 "unreadable": [{"file": str(ds.files[i]), "reason": r} for i, r in sorted(cache.failed.items())]},
        "bootstrap": {"rounds": bootstrap, "seed": seed, "level": 0.95,
                      "method": "percentile bootstrap, images resampled with replacement; same draws for every "
                                "model and threshold"},
        "models": results,
        "warnings": warnings,
    }
    write_reports(report, ds, prob_columns, targets, out, name=name, plots=plots, quiet=quiet, sizes=sizes)
    return report


def _measure(model: OnnxModel, label: str, graph: Dict[str, Any], y: np.ndarray, p: np.ndarray, bootstrap: int,
             seed: int, bins: int) -> Dict[str, Any]:
    """One model's report entry from its targets ``y`` and probabilities ``p``."""
    fpr, tpr, thr = roc_curve(y, p)
    at_t = evaluate(y, p, model.spec.threshold, bootstrap, seed)
    point = [at_t["fp"] / max(at_t["fp"] + at_t["tn"], 1), at_t["tp"] / max(at_t["tp"] + at_t["fn"], 1)]
    return {**model.describe(), "name": label, "graph": graph, "n_evaluated": int(len(y)),
            "at_threshold": at_t, "at_0_5": evaluate(y, p, 0.5, bootstrap, seed),
            "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thr, "point": point},
            "calibration": calibration_bins(y, p, bins=bins)}


def write_reports(report: Dict[str, Any], ds, prob_columns: Dict[str, np.ndarray], targets, out: Path,
                  name: Optional[str] = None, plots: bool = True, quiet: bool = False,
                  sizes: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Write predictions CSV (a row per image: file, label, target, stored size, each model's probability),
    plots, JSON and Markdown; record their names in ``report["files"]``."""
    from .plots import calibration_png, have_matplotlib, roc_png

    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{name}" if name else ""
    files = {"predictions": f"predictions{suffix}.csv"}
    with open(out / files["predictions"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "target", "size"] + [f"p_positive:{k}" for k in prob_columns])
        for i, (fp, lab) in enumerate(zip(ds.files, ds.folder_labels)):
            w.writerow([str(fp.relative_to(ds.root)), lab, int(targets[i]) if targets is not None else "",
                        sizes[i] if sizes is not None else ""]
                       + ["" if np.isnan(v[i]) else f"{v[i]:.6f}" for v in prob_columns.values()])
    if plots and have_matplotlib():
        rocs = [{"name": m["name"], "fpr": m["roc"]["fpr"], "tpr": m["roc"]["tpr"], "auc": m["at_threshold"]["auc"],
                 "point": m["roc"]["point"]} for m in report["models"]]
        files["roc_png"] = roc_png(rocs, out / f"roc{suffix}.png").name
        cals = [{"name": m["name"], **m["calibration"]} for m in report["models"]]
        files["calibration_png"] = calibration_png(cals, out / f"calibration{suffix}.png").name
    elif plots:
        report["plots_skipped"] = "matplotlib is not installed (pip install '.[bench]')"
    report["files"] = files
    return write_report(out, "accuracy", name, report, render_markdown, quiet)


# ---- Markdown
_ROWS = [("Accuracy", "accuracy", fmt_pct), ("Loss (cross-entropy)", "loss", fmt_num),
         ("Precision", "precision", fmt_pct), ("Recall (sensitivity)", "recall", fmt_pct),
         ("Specificity", "specificity", fmt_pct), ("F1", "f1", fmt_pct), ("ROC AUC", "auc", fmt_num)]


def _reference_table(models: List[Dict[str, Any]], key: str) -> str:
    return md_table(["Model", "Accuracy", "Loss", "Precision", "Recall", "F1"],
                    [[f"{m['name']} ({m['backbone']} {m['precision']})", fmt_pct(m[key]["accuracy"]),
                      fmt_num(m[key]["loss"]), fmt_pct(m[key]["precision"]), fmt_pct(m[key]["recall"]),
                      fmt_pct(m[key]["f1"])] for m in models], "lrrrrr")


def _detail_table(m: Dict[str, Any]) -> str:
    t, h = m["at_threshold"], m["at_0_5"]
    rows = [[title, f(t[k]), fmt_ci(t["ci"].get(k), f), f(h[k]), fmt_ci(h["ci"].get(k), f)] for title, k, f in _ROWS]
    rows.append(["TP / FP / TN / FN", f"{t['tp']} / {t['fp']} / {t['tn']} / {t['fn']}", "",
                 f"{h['tp']} / {h['fp']} / {h['tn']} / {h['fn']}", ""])
    head = ["Metric", f"at threshold {t['threshold']:.4g}", "95% CI", "at 0.5", "95% CI"]
    return md_table(head, rows, "lrrrr")


def _confusion(m: Dict[str, Any]) -> str:
    t = m["at_threshold"]
    neg = [lab for lab in m["labels"] if lab != m["positive_label"]][0]
    pos = m["positive_label"]
    return md_table([f"threshold {t['threshold']:.4g}", f"predicted {neg}", f"predicted {pos}"],
                    [[f"true {neg}", f"{t['tn']} (TN)", f"{t['fp']} (FP)"],
                     [f"true {pos}", f"{t['fn']} (FN)", f"{t['tp']} (TP)"]], "lrr")


def render_markdown(report: Dict[str, Any]) -> str:
    """The Markdown report of an accuracy run."""
    d, b, models = report["data"], report["bootstrap"], report["models"]
    counts = ", ".join(f"{v} {k}" for k, v in d["counts"].items())
    L: List[str] = ["# cxr-bench accuracy report", "",
                    f"Data: {images_used(d)}: {d['n_images']} images ({counts})"
                    + (f", first {d['limit_per_label']} per label" if d.get("limit_per_label") else "") + ". "
                    f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}.", ""]
    if d["unreadable"]:
        L += [f"**{len(d['unreadable'])} image(s) could not be read and are left out** (listed at the end).", ""]
    for w in report.get("warnings", []):
        L += [f"**Warning:** {w}.", ""]
    L += ["## Results at each model's decision threshold", "",
          "Laid out like the reference table. Precision, recall and F1 are for the positive label "
          f"({models[0]['positive_label'] if models else 'PNEUMONIA'}); loss is the mean binary cross-entropy.", "",
          _reference_table(models, "at_threshold"), "", "## Results at threshold 0.5", "",
          _reference_table(models, "at_0_5"), ""]
    L += ["## Summary", "",
          md_table(["Model", "Backbone", "Precision", "File MiB", "Threshold", "Images", "AUC", "AUC 95% CI",
                    "Accuracy 95% CI", "ECE", "Brier"],
                   [[m["name"], m["backbone"], m["precision"], mb(m["file_bytes"]), f"{m['threshold']:.4g}",
                     m["n_evaluated"], fmt_num(m["at_threshold"]["auc"]),
                     fmt_ci(m["at_threshold"]["ci"].get("auc"), fmt_num),
                     fmt_ci(m["at_threshold"]["ci"].get("accuracy")),
                     fmt_num(m["calibration"]["ece"], 3), fmt_num(m["calibration"]["brier"], 3)] for m in models],
                   "lllrrrrrrrr"), ""]
    files = report.get("files", {})
    if files.get("roc_png"):
        L += ["## Plots", "", f"![ROC curves]({files['roc_png']})",
              f"![Reliability diagram]({files['calibration_png']})", ""]
    elif report.get("plots_skipped"):
        L += [f"Plots skipped: {report['plots_skipped']}.", ""]
    L += ["## Per model", ""]
    for m in models:
        rule = f" ({m['threshold_rule']})" if m.get("threshold_rule") else ""
        L += [f"### {m['name']}", "",
              f"`{m['path']}`: {m['backbone']} {m['precision']}, input {m['image_size'][0]}x{m['image_size'][1]} "
              f"{m['input_dtype']}, {mb(m['file_bytes'])} MiB, sha256 `{m['sha256'][:16]}…`; "
              f"decision threshold {m['threshold']:.6g}{rule}; {m['n_evaluated']} images evaluated"
              + (f" (its validation split {m['split']['hash'][:8]})" if m.get("split") else "") + ".", "",
              _detail_table(m), "", _confusion(m), "",
              "Calibration (10 equal-width bins of the predicted probability): "
              f"ECE {fmt_num(m['calibration']['ece'], 4)}, max gap {fmt_num(m['calibration']['mce'], 4)}, "
              f"Brier score {fmt_num(m['calibration']['brier'], 4)}.", ""]
    L += ["## Method", "",
          "- Pixels: the runtime's `cxr_infer.preprocess.load_image` (RGB, resize to the model's input by the "
          "spec's method) and the graph input built by `cxr_infer.model` (normalisation and dtype from the "
          "model's spec), as `cxr_infer.Classifier` does; each image decoded once per input size.",
          "- Inference: onnxruntime through `cxr_infer.model.ModelFile`, one session per model, probabilities "
          "read from the model's output.",
          f"- Confidence intervals: {b['method']}; {b['rounds']} rounds, seed {b['seed']}, "
          "2.5th-97.5th percentiles." if b["rounds"] else "- Confidence intervals: not computed (--bootstrap 0).",
          "- A prediction is positive when P(positive) >= threshold. Loss: mean of -log p(true label), "
          "probabilities clipped to [1e-7, 1 - 1e-7]. ECE: count-weighted mean |observed - predicted| over bins.",
          f"- Per-image probabilities: `{files.get('predictions', 'predictions.csv')}`.", "",
          "Reproduce:", "", "```", report["command"], "```", ""]
    if d["unreadable"]:
        L += ["## Unreadable inputs", ""] + [f"- `{u['file']}`: {u['reason']}" for u in d["unreadable"]] + [""]
    return "\n".join(L)

