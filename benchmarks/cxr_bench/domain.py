"""``cxr-bench domain``: the flag rate of each model's out-of-domain check on in-domain images and on
each out-of-domain kind (:mod:`cxr_bench.domain_kinds`, ``--foreign`` folders), with the AUROC
between them, and the ``--originals`` and ``--validation`` sections (see docs/benchmarks.md).
The Markdown is :mod:`cxr_bench.domain_report`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.metrics import roc_auc
from cxr_infer.preprocess import load_image

from .dataset import IMAGE_EXTS, PixelCache, image_files, list_dataset, validation_files
from .domain_kinds import KINDS, build_kinds
from .domain_report import render_markdown
from .models import OnnxModel, open_model
from .upstream import ADD_DOMAIN_HINT, domain_operating_points
from .util import BenchError, fmt_pct, new_report, say, write_report

KIND = "cxr-bench/domain"


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """The ROC AUC of ``pos`` against ``neg``: P(a ``pos`` score > a ``neg`` score), ties counted half."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    return roc_auc(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])


def load_foreign(root: str | Path, size: Tuple[int, int], method: str = "bicubic"
                 ) -> Tuple[Dict[str, Tuple[np.ndarray, List[str]]], Dict[str, Dict[str, str]]]:
    """Pixels and file names (relative to ``root``) per sub-folder, and ``root/files.csv``'s rows by file."""
    import csv

    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"{root}: --foreign needs a folder whose sub-folders are kinds of image")
    kinds: Dict[str, Tuple[np.ndarray, List[str]]] = {}
    for sub in sorted(d for d in root.iterdir() if d.is_dir()):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if files:
            px = np.stack([load_image(f, size, method=method) for f in files])
            kinds[sub.name] = (px, [str(f.relative_to(root)) for f in files])
    if not kinds:
        raise BenchError(f"{root}: no sub-folder with images")
    rows: Dict[str, Dict[str, str]] = {}
    if (root / "files.csv").is_file():
        with open(root / "files.csv", newline="") as fh:
            rows = {r["file"]: r for r in csv.DictReader(fh) if r.get("file")}
    return kinds, rows


def load_originals(root: str | Path, size: Tuple[int, int], method: str = "bicubic"
                   ) -> Tuple[np.ndarray, List[str]]:
    """Pixels of every image under ``root``, read as the runtime reads a user's file, and their names."""
    root = Path(root)
    files = image_files(root, "--originals needs a folder of in-domain images at their original size")
    return np.stack([load_image(f, size, method=method) for f in files]), [str(f.relative_to(root)) for f in files]


def finding_label(row: Dict[str, str]) -> Optional[int]:
    """1 (a finding), 0 (no finding) or None (unknown, not a frontal X-ray) for a row of files.csv."""
    view = (row.get("view") or "").strip().upper()
    if (row.get("modality") or "X-ray").strip().lower() not in ("x-ray", "xray", "cr", "dx") or not (
            view.startswith("PA") or view.startswith("AP")):
        return None
    finding = (row.get("finding") or "").strip().lower()
    if finding in ("", "inconclusive", "unknown"):
        return None
    return 0 if finding in ("no finding", "normal") else 1


def _deciding(model, pixels: np.ndarray, batch: int, thr: float) -> Dict[str, int]:
    """How many of ``pixels`` are flagged with each branch deciding (from ``domain_terms``)."""
    spec = model.spec
    names = [b.name for b in spec.domain.branches] if spec.domain is not None else []
    if not spec.domain_terms_output or not len(pixels) or not names:
        return {}
    score, terms = model.model.run(pixels, [spec.domain_output, spec.domain_terms_output], batch)
    flagged = np.asarray(score).reshape(-1) > thr
    top = np.argmax(np.asarray(terms), axis=1)
    return {n: int(np.sum(flagged & (top == j))) for j, n in enumerate(names) if np.any(flagged & (top == j))}


def classifier_on_foreign(model, kinds: Dict[str, Tuple[np.ndarray, List[str]]], rows: Dict[str, Dict[str, str]],
                          scores: Dict[str, np.ndarray], thr: float, batch: int) -> Optional[Dict[str, Any]]:
    """The classifier's AUC and confusion counts on the frontal X-rays of ``rows`` with a known finding."""
    px, y, flagged = [], [], []
    for kind, (pixels, files) in kinds.items():
        for i, f in enumerate(files):
            lab = finding_label(rows.get(f, {})) if f in rows else None
            if lab is not None:
                px.append(pixels[i])
                y.append(lab)
                flagged.append(bool(scores[kind][i] > thr))
    if not px:
        return None
    y_arr, fl = np.array(y), np.array(flagged)
    p = model.model.positive_probability(np.stack(px), batch)
    pred = (p >= float(model.spec.threshold)).astype(int)

    def counts(mask: np.ndarray) -> Dict[str, Any]:
        yy, pp, prob = y_arr[mask], pred[mask], p[mask]
        both = 0 < yy.sum() < len(yy)
        return {"images": int(mask.sum()), "positives": int(yy.sum()), "tp": int(((pp == 1) & (yy == 1)).sum()),
                "fp": int(((pp == 1) & (yy == 0)).sum()), "tn": int(((pp == 0) & (yy == 0)).sum()),
                "fn": int(((pp == 0) & (yy == 1)).sum()), "auc": roc_auc(yy, prob) if both else None,
                "called_positive": float(np.mean(pp)) if len(pp) else None}

    return {"rule": "frontal (PA/AP) X-rays with a known finding: 'No finding' is NORMAL, any other finding "
                    "(COVID-19, SARS, ARDS, bacterial, fungal ...) PNEUMONIA; 'inconclusive' left out",
            "caveat": "a pediatric (age 1-5) model outside its population: adults, other hospitals, other diseases",
            "threshold": float(model.spec.threshold), "all": counts(np.ones(len(y_arr), bool)),
            "not_flagged": counts(~fl)}


def flag_rate_by_source(files: List[str], scores: np.ndarray, thr: float, rows: Dict[str, Dict[str, str]]
                        ) -> Dict[str, Dict[str, Any]]:
    """Flag rate per ``source`` (files.csv) of one kind's images, when they come from more than one."""
    groups: Dict[str, List[float]] = {}
    for f, v in zip(files, scores):
        groups.setdefault((rows.get(f, {}).get("source") or "").strip() or "(no source)", []).append(float(v))
    if len(groups) < 2:
        return {}
    return {src: {"images": len(v), "flag_rate": float(np.mean(np.asarray(v) > thr))}
            for src, v in sorted(groups.items())}


def operating_table(spec: Any, val_scores: Optional[np.ndarray], scores: Dict[str, np.ndarray]
                    ) -> Optional[Dict[str, Any]]:
    """Flag rates of each set of ``scores`` at the file's ``domain.operating_points``, else at thresholds
    set on ``val_scores`` as cxr-export sets them; None when neither is available."""
    points = list(spec.domain_operating_points)
    source = "the file's domain.operating_points"
    if not points:
        if val_scores is None or not len(val_scores):
            return None
        points = domain_operating_points(val_scores)
        source = f"quantiles of the domain scores of the file's {len(val_scores)} validation images"
    rows = []
    for rate, thr in points:
        row: Dict[str, Any] = {"flag_rate": rate, "threshold": thr,
                               "flagged": {k: float(np.mean(v > thr)) for k, v in scores.items() if len(v)}}
        if val_scores is not None and len(val_scores):
            row["validation"] = float(np.mean(val_scores > thr))
        rows.append(row)
    return {"source": source, "points": rows}


def _scores(model: OnnxModel, pixels: np.ndarray, batch: int) -> np.ndarray:
    if not len(pixels):
        return np.zeros(0)
    (scores,) = model.model.run(pixels, [model.spec.domain_output], batch)
    return np.asarray(scores, np.float64).reshape(-1)


def _flagged(s_in: np.ndarray, s: np.ndarray, thr: float) -> Dict[str, Any]:
    """Images, flag rate, AUROC against the in-domain scores ``s_in`` and median score of a set."""
    return {"images": int(len(s)), "flag_rate": float(np.mean(s > thr)), "auroc": auroc(s_in, s),
            "score_median": float(np.median(s))}


@dataclass
class ImageSets:
    """Every image set a run measures, each decoded once per input size and shared by the models."""

    data: str | Path
    count: int
    kinds: Sequence[str]
    foreign: Optional[str | Path] = None
    originals: Optional[str | Path] = None
    validation: Optional[str | Path] = None
    quiet: bool = False
    _cache: Dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ds = list_dataset(self.data)
        self.pixels = PixelCache(self.ds.files, quiet=self.quiet)

    def _once(self, key: Any, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def in_domain(self, spec: Any) -> Tuple[np.ndarray, np.ndarray]:
        """The readable in-domain images at the model's input, and their folder labels."""
        keep = np.ones(len(self.ds.files), bool)
        test_px = self.pixels.pixels(spec.image_size, spec.resize_method)
        keep[list(self.pixels.failed)] = False
        return test_px[keep], np.array([lab for lab, k in zip(self.ds.folder_labels, keep) if k])

    def built(self, spec: Any, test_px: np.ndarray) -> Dict[str, Tuple[np.ndarray, List[str]]]:
        size = spec.image_size
        return self._once(("built", size), lambda: build_kinds(test_px, self.count, size, self.kinds))

    def foreign_kinds(self, spec: Any) -> Any:
        key = ("foreign", spec.image_size[0], spec.image_size[1], spec.resize_method)
        return self._once(key, lambda: load_foreign(self.foreign, spec.image_size, spec.resize_method))

    def original_images(self, spec: Any) -> Any:
        key = ("originals", spec.image_size[0], spec.image_size[1], spec.resize_method)
        return self._once(key, lambda: load_originals(self.originals, spec.image_size, spec.resize_method))

    def validation_images(self, spec: Any) -> np.ndarray:
        files = validation_files(self.validation, spec)
        key = ("validation", str(self.validation), spec.image_size, spec.resize_method)
        return self._once(key, lambda: PixelCache(files, quiet=self.quiet).pixels(spec.image_size, spec.resize_method))


def _measure_foreign(model: OnnxModel, sets: ImageSets, s_in: np.ndarray, thr: float, batch: int,
                     measured: Dict[str, np.ndarray], entry: Dict[str, Any]) -> None:
    fkinds, rows = sets.foreign_kinds(model.spec)
    entry["foreign"], fscores = {}, {}
    for kind, (px, files) in fkinds.items():
        s = fscores[kind] = measured[kind] = _scores(model, px, batch)
        entry["foreign"][kind] = {**_flagged(s_in, s, thr), "flagged_by_branch": _deciding(model, px, batch, thr),
                                  "by_source": flag_rate_by_source(files, s, thr, rows)}
    entry["foreign_classifier"] = classifier_on_foreign(model, fkinds, rows, fscores, thr, batch)
    say(f"{model.name}: foreign " + ", ".join(f"{k} {fmt_pct(v['flag_rate'], 1)} (AUROC {v['auroc']:.3f})"
                                              for k, v in entry["foreign"].items()), sets.quiet)


def _measure_originals(model: OnnxModel, sets: ImageSets, s_in: np.ndarray, thr: float, batch: int,
                       measured: Dict[str, np.ndarray], entry: Dict[str, Any]) -> None:
    px, files = sets.original_images(model.spec)
    s = measured["originals"] = _scores(model, px, batch)
    entry["originals"] = {**_flagged(s_in, s, thr), "flagged_by_branch": _deciding(model, px, batch, thr),
                          "flagged": [f for f, v in zip(files, s) if v > thr]}
    say(f"{model.name}: full-size originals {fmt_pct(entry['originals']['flag_rate'], 1)} flagged "
        f"(test split {fmt_pct(entry['in_domain']['flag_rate'], 1)})", sets.quiet)


def measure_model(model: OnnxModel, sets: ImageSets, batch: int) -> Dict[str, Any]:
    """One model's report entry: flag rates and AUROCs on every set of ``sets``, and its operating points."""
    spec = model.spec
    test_px, labels = sets.in_domain(spec)
    built = sets.built(spec, test_px)
    t0 = time.perf_counter()
    thr = float(spec.domain_threshold)
    s_in = _scores(model, test_px, batch)
    measured: Dict[str, np.ndarray] = {"test split": s_in}
    per_label = {lab: float(np.mean(s_in[labels == lab] > thr)) for lab in sorted(set(labels))}
    entry: Dict[str, Any] = {**model.describe(), "domain": spec.to_dict().get("domain"),
                             "in_domain": {"images": int(len(s_in)), "flag_rate": float(np.mean(s_in > thr)),
                                           "flag_rate_per_label": per_label,
                                           "score_median": float(np.median(s_in))},
                             "kinds": {}}
    for kind, (px, sources) in built.items():
        s = measured[kind] = _scores(model, px, batch)
        entry["kinds"][kind] = {**_flagged(s_in, s, thr), "sources": sources}
    if sets.foreign is not None:
        _measure_foreign(model, sets, s_in, thr, batch, measured, entry)
    if sets.originals is not None:
        _measure_originals(model, sets, s_in, thr, batch, measured, entry)
    val_scores = None
    if sets.validation is not None and not spec.domain_operating_points:
        val_scores = _scores(model, sets.validation_images(spec), batch)
    entry["operating_points"] = operating_table(spec, val_scores, measured)
    entry["seconds"] = time.perf_counter() - t0
    say(f"{model.name}: test flag rate {fmt_pct(entry['in_domain']['flag_rate'])}; " + ", ".join(
        f"{k} {fmt_pct(v['flag_rate'], 1)} (AUROC {v['auroc']:.3f})" for k, v in entry["kinds"].items()), sets.quiet)
    return entry


def run_domain(models: Sequence[str | Path], data: str | Path, out: str | Path, count: int = 150,
               kinds: Sequence[str] = KINDS, batch: int = 16, threads: int = 1, name: Optional[str] = None,
               quiet: bool = False, foreign: Optional[str | Path] = None,
               originals: Optional[str | Path] = None, validation: Optional[str | Path] = None) -> Dict[str, Any]:
    """Measure each model's out-of-domain check; write domain.json / domain.md into ``out``."""
    sets = ImageSets(data, count, kinds, foreign=foreign, originals=originals, validation=validation, quiet=quiet)
    results: List[Dict[str, Any]] = []
    for path in models:
        model = open_model(path, threads=threads)
        if not model.spec.domain_output:
            say(f"{model.name}: no domain statistics (add them: {ADD_DOMAIN_HINT})", quiet)
            results.append({**model.describe(), "domain": None})
            continue
        results.append(measure_model(model, sets, batch))
    ds = sets.ds
    report = new_report(KIND, data={"root": str(ds.root), "n_images": len(ds.files), "counts": ds.counts()},
                        count_per_kind=count, seed=0, models=results,
                        foreign=str(foreign) if foreign is not None else None,
                        originals=str(originals) if originals is not None else None,
                        validation=str(validation) if validation is not None else None)
    write_report(Path(out), "domain", name, report, render_markdown, quiet)
    return report
