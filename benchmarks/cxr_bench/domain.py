"""``cxr-bench domain``: how well each model's out-of-domain check separates X-rays from the rest.

In-domain: every image of ``--data`` (the 624-image test split; never used for fitting or
calibration). Out-of-domain kinds, built here deterministically (seed 0), ``--count`` each:

    photos        crops of natural photographs (scikit-image's sample images, matplotlib's
                  grace_hopper.jpg)
    documents     text pages rendered with Pillow (lines of words, headings, rules; a scanner's
                  gray background, noise and slight rotation)
    noise         uniform colour noise, gray Gaussian noise, smooth (blurred) noise
    inverted      test-split X-rays with inverted gray levels
    upside_down   test-split X-rays rotated 180 degrees
    rotated_90    test-split X-rays rotated 90 degrees
    cropped       test-split X-rays cropped to a random 30% x 30% window (9% of the area)
    medical_other other medical and scientific images (scikit-image's retina fundus photo,
                  microaneurysms, immunohistochemistry and cell micrographs, Shepp-Logan CT phantom)
    flipped_vertical  test-split X-rays flipped top to bottom (not rotated)
    mirrored      test-split X-rays flipped left to right: a *control*, not an out-of-domain kind
                  (the anatomy is mirrored but it is still a readable chest X-ray); its flag rate
                  shows whether the check flags any transformation or only implausible ones

The last three were added after the current method was chosen on the first seven, as a check
that it generalises beyond the kinds it was tuned on.

Per model and kind: the flag rate at the model's own domain threshold, and the AUROC of the
domain score between the in-domain images and that kind (1.0: every image of the kind scores
above every test X-ray). Every kind goes through the runtime's one preprocessing.

``--foreign DIR`` adds real images from other sources (e.g. ``../shared/data/foreign_cxr``):
every sub-folder of ``DIR`` is a kind (adult_frontal, lateral, ct), measured like the built
kinds, with the branch that decided for each flagged image (``domain_terms``). When ``DIR``
has a ``files.csv`` (columns ``file``, ``finding``, ``view``, ``modality``), the classifier
itself is also scored on its frontal X-rays whose finding is known ("No finding" is NORMAL,
"inconclusive" or empty is left out, any other finding is PNEUMONIA): AUC and confusion
counts at the model's threshold. That is a pediatric model outside its population (adults,
other hospitals, other diseases), reported to show what an unflagged adult image would get,
not as an accuracy claim. These images are for measuring only: nothing here is fitted on them.

``--originals DIR`` is the opposite control: in-domain images at their *original* size (e.g.
``../shared/data/kermany_fullres``, full-size Kermany train X-rays), read through the runtime's
own decoding and resize as any user's file is. The test split was resized offline and saved
again as 224 x 224 JPEGs, so a test that reacts to that pipeline (JPEG noise, the finest scale)
looks excellent on foreign images, which take the runtime's path, while flagging real Kermany
X-rays handed over at full size. Their flag rate should be close to the test split's.

Example:
    >>> rep = run_domain(["m_int8.onnx"], "../shared/data/chest_xray_224/test", "/tmp/b")  # doctest: +SKIP
    >>> rep["models"][0]["in_domain"]["flag_rate"]                                        # doctest: +SKIP
    0.0433
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.metrics import roc_auc
from cxr_infer.preprocess import load_image

from .dataset import PixelCache, list_dataset
from .models import open_model
from .util import BenchError, fmt_num, fmt_pct, md_table, new_report, say, write_report

KIND = "cxr-bench/domain"
KINDS = ("photos", "documents", "noise", "inverted", "upside_down", "rotated_90", "cropped", "medical_other",
         "flipped_vertical", "mirrored")
CONTROLS = ("mirrored",)  # transformed X-rays that are still in the domain: reported, no target
MEDICAL = ("retina", "microaneurysms", "immunohistochemistry", "cell", "shepp_logan_phantom")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field", "brick",
          "grass", "gravel", "clock")
WORDS = ("patient report the of and radiology chest findings impression lungs clear no acute history date "
         "signed page insurance claim total amount invoice hospital department examination result normal "
         "follow up recommended technique comparison dear sincerely meeting agenda minutes").split()


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a ``pos`` item > score of a ``neg`` item), ties counted half: the ROC AUC of
    ``pos`` against ``neg`` (:func:`cxr_infer.metrics.roc_auc`)."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    return roc_auc(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])


def _skimage_images(names: Sequence[str]) -> List[Tuple[str, Any]]:
    from PIL import Image

    out: List[Tuple[str, Any]] = []
    try:
        import skimage.data as skd

        for name in names:
            try:
                a = np.asarray(getattr(skd, name)())
                if a.dtype != np.uint8:  # the phantom is float in [0, 1]
                    a = (np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
                out.append((f"skimage:{name}", Image.fromarray(a)))
            except Exception:  # a sample missing from this scikit-image (or needing a download)
                pass
    except ImportError:
        pass
    return out


def _photo_sources() -> List[Tuple[str, Any]]:
    from PIL import Image

    out = _skimage_images(PHOTOS)
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.is_file():
            out.append(("matplotlib:grace_hopper.jpg", Image.open(p).convert("RGB")))
    except ImportError:
        pass
    return out


def make_photos(count: int, size: Tuple[int, int], rng: random.Random,
                srcs: Optional[List[Tuple[str, Any]]] = None) -> Tuple[np.ndarray, List[str]]:
    srcs = _photo_sources() if srcs is None else srcs
    if not srcs:
        raise BenchError("no sample images found: pip install scikit-image (or matplotlib)")
    imgs, names = [], []
    for i in range(count):
        name, im = srcs[i % len(srcs)]
        w, h = im.size
        if i < len(srcs):
            box = (0, 0, w, h)  # each photo once whole
        else:
            f = rng.uniform(0.5, 0.9)
            cw, ch = int(w * f), int(h * f)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
        imgs.append(load_image(im.crop(box), size))
        names.append(name)
    return np.stack(imgs), sorted(set(names))


def make_documents(count: int, size: Tuple[int, int], rng: random.Random) -> Tuple[np.ndarray, List[str]]:
    from PIL import Image, ImageDraw, ImageFont

    imgs = []
    for _ in range(count):
        w, h = 850, 1100
        bg = rng.randint(215, 255)
        page = Image.new("L", (w, h), bg)
        d = ImageDraw.Draw(page)
        y = rng.randint(40, 120)
        while y < h - 60:
            big = rng.random() < 0.12
            fs = rng.randint(30, 44) if big else rng.randint(14, 26)
            try:
                font = ImageFont.load_default(size=fs)
            except TypeError:  # Pillow < 10.1
                font = ImageFont.load_default()
            if rng.random() < 0.08:
                d.line([(60, y), (w - 60, y)], fill=rng.randint(0, 80), width=rng.randint(1, 3))
                y += 20
                continue
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
            d.text((60 + (0 if not big else rng.randint(0, 200)), y), words.title() if big else words,
                   fill=rng.randint(0, 70), font=font)
            y += int(fs * rng.uniform(1.3, 2.0))
        arr = np.asarray(page, np.float32) + np.random.default_rng(rng.randint(0, 1 << 30)).normal(0, 4, (h, w))
        page = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).rotate(rng.uniform(-2, 2), fillcolor=bg)
        imgs.append(load_image(page, size))
    return np.stack(imgs), ["Pillow-rendered text pages"]


def make_noise(count: int, size: Tuple[int, int], rng: random.Random) -> Tuple[np.ndarray, List[str]]:
    from PIL import Image, ImageFilter

    g = np.random.default_rng(rng.randint(0, 1 << 30))
    w, h = size
    imgs = []
    for i in range(count):
        k = i % 3
        if k == 0:
            a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif k == 1:
            a = np.repeat(np.clip(g.normal(g.uniform(60, 190), g.uniform(20, 70), (h, w, 1)), 0, 255), 3, axis=2)
        else:
            a = g.integers(0, 256, (h, w), dtype=np.uint8)
            a = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(g.uniform(2, 8))))
            a = (a - a.min()) * (255.0 / max(float(np.ptp(a)), 1.0))
            a = np.repeat(a[..., None], 3, axis=2)
        imgs.append(load_image(a.astype(np.uint8), size))
    return np.stack(imgs), ["uniform colour", "Gaussian gray", "blurred gray"]


def _xray_kind(xrays: np.ndarray, fn: Callable[[np.ndarray, int], np.ndarray], size) -> np.ndarray:
    return np.stack([load_image(fn(x, i), size) for i, x in enumerate(xrays)])


def build_kinds(test_pixels: np.ndarray, count: int, size: Tuple[int, int], kinds: Sequence[str] = KINDS,
                seed: int = 0) -> Dict[str, Tuple[np.ndarray, List[str]]]:
    """Pixels (uint8 NHWC) and a description of the sources, per out-of-domain kind."""
    rng = random.Random(seed)
    idx = sorted(random.Random(seed).sample(range(len(test_pixels)), min(count, len(test_pixels))))
    xr = test_pixels[idx]
    crop_rng = random.Random(seed + 1)
    w, h = size

    def crop(x: np.ndarray, _i: int) -> np.ndarray:
        cw, ch = int(0.3 * w), int(0.3 * h)
        x0, y0 = crop_rng.randint(0, w - cw), crop_rng.randint(0, h - ch)
        return x[y0:y0 + ch, x0:x0 + cw]

    makers: Dict[str, Callable[[], Tuple[np.ndarray, List[str]]]] = {
        "photos": lambda: make_photos(count, size, rng),
        "documents": lambda: make_documents(count, size, rng),
        "noise": lambda: make_noise(count, size, rng),
        "inverted": lambda: (_xray_kind(xr, lambda x, i: 255 - x, size), ["test-split X-rays, 255 - pixel"]),
        "upside_down": lambda: (_xray_kind(xr, lambda x, i: x[::-1, ::-1], size), ["test-split X-rays, 180 deg"]),
        "rotated_90": lambda: (_xray_kind(xr, lambda x, i: np.rot90(x).copy(), size), ["test-split X-rays, 90 deg"]),
        "cropped": lambda: (_xray_kind(xr, crop, size), ["test-split X-rays, random 30% x 30% window"]),
        "medical_other": lambda: make_photos(count, size, rng, _skimage_images(MEDICAL)),
        "flipped_vertical": lambda: (_xray_kind(xr, lambda x, i: x[::-1].copy(), size),
                                     ["test-split X-rays, top to bottom"]),
        "mirrored": lambda: (_xray_kind(xr, lambda x, i: x[:, ::-1].copy(), size),
                             ["test-split X-rays, left to right (control: still a chest X-ray)"]),
    }
    unknown = [k for k in kinds if k not in makers]
    if unknown:
        raise BenchError(f"unknown kind(s) {unknown}: choose from {', '.join(KINDS)}")
    return {k: makers[k]() for k in kinds}


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def image_files(root: Path, needs: str) -> List[Path]:
    """Every image under the folder ``root`` (recursively, sorted); :class:`BenchError` naming what
    the folder is for (``needs``, e.g. "--originals needs a folder of ...") when it is not a folder
    or holds no image."""
    if not root.is_dir():
        raise BenchError(f"{root}: {needs}")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise BenchError(f"{root}: no images under it (looked for {', '.join(IMAGE_EXTS)})")
    return files


def load_foreign(root: str | Path, size: Tuple[int, int], method: str = "bicubic"
                 ) -> Tuple[Dict[str, Tuple[np.ndarray, List[str]]], Dict[str, Dict[str, str]]]:
    """Pixels and file names (relative to ``root``) per sub-folder of ``root``, and the rows of
    ``root/files.csv`` by file name (empty without one)."""
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
    """Pixels of every image under ``root`` (recursively, sorted), read as the runtime reads a
    user's file (its decoding, JPEG draft scaling and resize), and their names relative to ``root``."""
    root = Path(root)
    files = image_files(root, "--originals needs a folder of in-domain images at their original size")
    return np.stack([load_image(f, size, method=method) for f in files]), [str(f.relative_to(root)) for f in files]


def finding_label(row: Dict[str, str]) -> Optional[int]:
    """1 (PNEUMONIA-like), 0 (no finding) or None (unknown) for a frontal X-ray row of files.csv;
    None for lateral views and other modalities."""
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
    """Flag rate per ``source`` (files.csv) of one kind's images, when they come from more than one:
    a check that generalises flags each source alike, one that learned a source does not."""
    groups: Dict[str, List[float]] = {}
    for f, v in zip(files, scores):
        groups.setdefault((rows.get(f, {}).get("source") or "").strip() or "(no source)", []).append(float(v))
    if len(groups) < 2:
        return {}
    return {src: {"images": len(v), "flag_rate": float(np.mean(np.asarray(v) > thr))} for src, v in sorted(groups.items())}


def validation_files(train_dir: str | Path, spec: Any) -> List[Path]:
    """The validation images of the file's training split, rebuilt from its training folder the way
    ``cxr-train`` made it (patient-wise; the seed, validation fraction and image cap the file's
    ``provenance.split`` records, or cxr-train's defaults for files made before it did) and checked
    against the split hash the file records: in-population images the domain check was calibrated on
    and never fitted on.

    Raises:
        BenchError: the file records no split hash, or the rebuilt split is not the file's.
    """
    from cxr_train import data as D  # torch-free

    how = spec.provenance.split
    seed, val_fraction, max_images = how.get("seed", 0), how.get("val_fraction", 0.1), how.get("max_images")
    want = str(spec.provenance.split_hash or "")
    if not want:
        raise BenchError("--validation: the model file records no split_hash, so its validation images cannot be "
                         "told from its training ones")
    root = Path(train_dir)
    if not root.is_dir():
        raise BenchError(f"--validation {train_dir}: no such folder (give the training folder the models were "
                         "trained on, e.g. ../shared/data/chest_xray_224/train)")
    train, val = D.make_split(root, seed, val_fraction, max_images)
    got = D.manifest(train, val, root, seed, val_fraction)["hash"]
    if got != want:
        raise BenchError(f"--validation {train_dir}: the split rebuilt from it (seed {seed}, validation fraction "
                         f"{val_fraction}, {max_images or 'all'} images) is {got[:8]}, not the model's {want[:8]}: "
                         "was the model trained on another folder?")
    return [Path(v.path) for v in val]


def operating_table(spec: Any, val_scores: Optional[np.ndarray], scores: Dict[str, np.ndarray]
                    ) -> Optional[Dict[str, Any]]:
    """Flag rates at other thresholds than the file's own: its ``domain.operating_points`` where it has
    them, else thresholds set on ``val_scores`` (the validation images, :func:`validation_files`) at the
    same rates cxr-export writes. ``scores``: name -> the domain scores of each measured set. None when
    neither is available."""
    from cxr_export.domain import OPERATING_RATES, calibrate

    points = list(spec.domain_operating_points)
    source = "the file's domain.operating_points"
    if not points:
        if val_scores is None or not len(val_scores):
            return None
        points = [(r, calibrate(val_scores, r)) for r in OPERATING_RATES]
        source = f"quantiles of the domain scores of the file's {len(val_scores)} validation images"
    rows = []
    for rate, thr in points:
        row: Dict[str, Any] = {"flag_rate": rate, "threshold": thr,
                               "flagged": {k: float(np.mean(v > thr)) for k, v in scores.items() if len(v)}}
        if val_scores is not None and len(val_scores):
            row["validation"] = float(np.mean(val_scores > thr))
        rows.append(row)
    return {"source": source, "points": rows}


def _scores(model, pixels: np.ndarray, batch: int) -> np.ndarray:
    if not len(pixels):
        return np.zeros(0)
    (scores,) = model.model.run(pixels, [model.spec.domain_output], batch)
    return np.asarray(scores, np.float64).reshape(-1)


def run_domain(models: Sequence[str | Path], data: str | Path, out: str | Path, count: int = 150,
               kinds: Sequence[str] = KINDS, batch: int = 16, threads: int = 1, name: Optional[str] = None,
               quiet: bool = False, foreign: Optional[str | Path] = None,
               originals: Optional[str | Path] = None, validation: Optional[str | Path] = None) -> Dict[str, Any]:
    """Measure each model's out-of-domain check; write domain.json / domain.md into ``out``.

    ``foreign``: a folder whose sub-folders are real out-of-domain kinds; ``originals``: a folder
    of in-domain images at their original size (see the module docstring); ``validation``: the
    models' training folder, whose validation part (:func:`validation_files`) sets the thresholds
    of the operating-point table for files that carry none (:func:`operating_table`)."""
    out = Path(out)
    ds = list_dataset(data)
    cache = PixelCache(ds.files, quiet=quiet)
    results: List[Dict[str, Any]] = []
    built: Dict[Tuple[int, int], Dict[str, Tuple[np.ndarray, List[str]]]] = {}
    real: Dict[Tuple[int, int, str], Any] = {}
    full: Dict[Tuple[int, int, str], Any] = {}
    val_cache: Dict[Any, np.ndarray] = {}
    for path in models:
        model = open_model(path, threads=threads)
        spec = model.spec
        if not spec.domain_output:
            say(f"{model.name}: no domain statistics (add them: python -m cxr_export.domain RUN MODEL --data TRAIN)",
                quiet)
            results.append({**model.describe(), "domain": None})
            continue
        size = spec.image_size
        test_px = cache.pixels(size, spec.resize_method)
        keep = np.ones(len(ds.files), bool)
        keep[list(cache.failed)] = False
        test_px = test_px[keep]
        if size not in built:
            built[size] = build_kinds(test_px, count, size, kinds)
        t0 = time.perf_counter()
        thr = float(spec.domain_threshold)
        s_in = _scores(model, test_px, batch)
        measured: Dict[str, np.ndarray] = {"test split": s_in}
        labels = np.array([lab for lab, k in zip(ds.folder_labels, keep) if k])
        per_label = {lab: float(np.mean(s_in[labels == lab] > thr)) for lab in sorted(set(labels))}
        entry: Dict[str, Any] = {**model.describe(), "domain": spec.to_dict().get("domain"),
                                 "in_domain": {"images": int(len(s_in)), "flag_rate": float(np.mean(s_in > thr)),
                                               "flag_rate_per_label": per_label,
                                               "score_median": float(np.median(s_in))},
                                 "kinds": {}}
        for kind, (px, sources) in built[size].items():
            s = measured[kind] = _scores(model, px, batch)
            entry["kinds"][kind] = {"images": int(len(s)), "flag_rate": float(np.mean(s > thr)),
                                    "auroc": auroc(s_in, s), "score_median": float(np.median(s)),
                                    "sources": sources}
        if foreign is not None:
            key = (size[0], size[1], spec.resize_method)
            if key not in real:
                real[key] = load_foreign(foreign, size, spec.resize_method)
            fkinds, rows = real[key]
            entry["foreign"], fscores = {}, {}
            for kind, (px, files) in fkinds.items():
                s = fscores[kind] = measured[kind] = _scores(model, px, batch)
                entry["foreign"][kind] = {"images": int(len(s)), "flag_rate": float(np.mean(s > thr)),
                                          "auroc": auroc(s_in, s), "score_median": float(np.median(s)),
                                          "flagged_by_branch": _deciding(model, px, batch, thr),
                                          "by_source": flag_rate_by_source(files, s, thr, rows)}
            entry["foreign_classifier"] = classifier_on_foreign(model, fkinds, rows, fscores, thr, batch)
            say(f"{model.name}: foreign " + ", ".join(f"{k} {fmt_pct(v['flag_rate'], 1)} (AUROC {v['auroc']:.3f})"
                                                      for k, v in entry["foreign"].items()), quiet)
        if originals is not None:
            key = (size[0], size[1], spec.resize_method)
            if key not in full:
                full[key] = load_originals(originals, size, spec.resize_method)
            px, files = full[key]
            s = measured["originals"] = _scores(model, px, batch)
            entry["originals"] = {"images": int(len(s)), "flag_rate": float(np.mean(s > thr)),
                                  "auroc": auroc(s_in, s), "score_median": float(np.median(s)),
                                  "flagged_by_branch": _deciding(model, px, batch, thr),
                                  "flagged": [f for f, v in zip(files, s) if v > thr]}
            say(f"{model.name}: full-size originals {fmt_pct(entry['originals']['flag_rate'], 1)} flagged "
                f"(test split {fmt_pct(entry['in_domain']['flag_rate'], 1)})", quiet)
        val_scores = None
        if validation is not None and not spec.domain_operating_points:
            files_v = validation_files(validation, spec)
            key_v = (str(validation), size, spec.resize_method)
            if key_v not in val_cache:
                val_cache[key_v] = PixelCache(files_v, quiet=quiet).pixels(size, spec.resize_method)
            val_scores = _scores(model, val_cache[key_v], batch)
        entry["operating_points"] = operating_table(spec, val_scores, measured)
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        say(f"{model.name}: test flag rate {fmt_pct(entry['in_domain']['flag_rate'])}; " + ", ".join(
            f"{k} {fmt_pct(v['flag_rate'], 1)} (AUROC {v['auroc']:.3f})" for k, v in entry["kinds"].items()), quiet)
    report = new_report(KIND, data={"root": str(ds.root), "n_images": len(ds.files), "counts": ds.counts()},
                        count_per_kind=count, seed=0, models=results,
                        foreign=str(foreign) if foreign is not None else None,
                        originals=str(originals) if originals is not None else None,
                        validation=str(validation) if validation is not None else None)
    write_report(out, "domain", name, report, render_markdown, quiet)
    return report


def render_markdown(report: Dict[str, Any]) -> str:
    """The report for people: one table of flag rates and one of AUROCs, models as rows."""
    models = [m for m in report["models"] if m.get("domain")]
    kinds = list(models[0]["kinds"]) if models else []
    lines = ["# Out-of-domain check", "",
             f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}: `{report['command']}`", "",
             f"In-domain: the {report['data']['n_images']} images of `{report['data']['root']}` (never used to fit or "
             f"calibrate). Out-of-domain: {report['count_per_kind']} images per kind, built deterministically "
             "(see `cxr_bench/domain.py`). Flag rate: share of images whose domain score exceeds the model's "
             "threshold (calibrated to flag 5% of the validation part of the training split). AUROC: test X-rays "
             "against that kind.", ""]
    if not models:
        return "\n".join(lines + ["No model had domain statistics.", ""])
    heads = [k + (" (control)" if k in CONTROLS else "") for k in kinds]
    lines += ["## Flag rate", "",
              md_table(["Model", "test split (lower is better)"] + heads,
                       [[m["name"], fmt_pct(m["in_domain"]["flag_rate"], 1)] +
                        [fmt_pct(m["kinds"][k]["flag_rate"], 1) for k in kinds] for m in models]), "",
              "## AUROC (test X-rays vs kind)", "",
              md_table(["Model"] + heads, [[m["name"]] + [fmt_num(m["kinds"][k]["auroc"], 3) for k in kinds]
                                          for m in models]), "",
              "## Settings", "",
              md_table(["Model", "threshold", "val flag rate", "fit images", "val images", "rank", "shrinkage",
                        "test flag rate per label"],
                       [[m["name"], fmt_num(m["domain"]["threshold"]), fmt_pct(m["domain"]["flag_rate_validation"], 1),
                         m["domain"]["fit"]["images"], m["domain"]["calibration"]["images"], m["domain"]["rank"],
                         fmt_num(m["domain"]["shrinkage"], 3),
                         ", ".join(f"{k} {fmt_pct(v, 1)}" for k, v in m["in_domain"]["flag_rate_per_label"].items())]
                        for m in models]), ""]
    withf = [m for m in models if m.get("foreign")]
    if withf:
        fk = list(withf[0]["foreign"])
        lines += [f"## Real images from other sources (`{report.get('foreign')}`, evaluation only)", "",
                  "Each sub-folder is a kind. Flag rate at the model's threshold; AUROC: test X-rays against "
                  "that kind; the branch deciding for the flagged images (count).", "",
                  md_table(["Model"] + [f"{k} ({withf[0]['foreign'][k]['images']})" for k in fk],
                           [[m["name"]] + [f"{fmt_pct(m['foreign'][k]['flag_rate'], 1)} (AUROC "
                                           f"{fmt_num(m['foreign'][k]['auroc'], 3)})" for k in fk] for m in withf]), "",
                  md_table(["Model"] + fk, [[m["name"]] + [", ".join(f"{b} {n}" for b, n in sorted(
                      m["foreign"][k]["flagged_by_branch"].items(), key=lambda t: -t[1])) or "-" for k in fk]
                      for m in withf]), ""]
        split = [(k, src) for k in fk for src in withf[0]["foreign"][k].get("by_source", {})]
        if split:
            lines += ["Flag rate by source (`files.csv`), for kinds drawn from several: a check that "
                      "generalises flags each source alike, one that learned a source does not.", "",
                      md_table(["Model"] + [f"{k}: {src} ({withf[0]['foreign'][k]['by_source'][src]['images']})"
                                            for k, src in split],
                               [[m["name"]] + [fmt_pct(m["foreign"][k].get("by_source", {}).get(src, {}).get(
                                   "flag_rate"), 1) for k, src in split] for m in withf]), ""]
        clf = [m for m in withf if m.get("foreign_classifier")]
        if clf:
            c0 = clf[0]["foreign_classifier"]
            rows_md = []
            for m in clf:
                for part in ("all", "not_flagged"):
                    c = m["foreign_classifier"][part]
                    rows_md.append([m["name"], "all" if part == "all" else "not flagged by the domain check",
                                    c["images"], c["positives"], fmt_num(c["auc"], 3) if c["auc"] is not None else "-",
                                    c["tp"], c["fp"], c["tn"], c["fn"]])
            lines += ["### The classifier on adult frontal X-rays (outside its population)", "",
                      f"{c0['caveat'].capitalize()}: these figures say what an adult image that slipped through "
                      f"would get, not how well the model reads adults. Labels: {c0['rule']}.", "",
                      md_table(["Model", "subset", "n", "positive", "AUC", "TP", "FP", "TN", "FN"], rows_md), ""]
    witho = [m for m in models if m.get("originals")]
    if witho:
        lines += [f"## In-domain originals through the runtime (`{report.get('originals')}`)", "",
                  "Kermany X-rays at their original size, decoded and resized by the runtime as a user's file is "
                  "(the test split was resized offline and saved again as JPEG). A check that reacts to that "
                  "pipeline rather than to the image flags these; their rate should be close to the test "
                  "split's.", "",
                  md_table(["Model", "images", "flagged", "test split", "AUROC vs test", "deciding branch"],
                           [[m["name"], m["originals"]["images"], fmt_pct(m["originals"]["flag_rate"], 1),
                             fmt_pct(m["in_domain"]["flag_rate"], 1), fmt_num(m["originals"]["auroc"], 3),
                             ", ".join(f"{b} {n}" for b, n in sorted(m["originals"]["flagged_by_branch"].items(),
                                                                      key=lambda t: -t[1])) or "-"]
                            for m in witho]), ""]
    with_op = [m for m in models if m.get("operating_points")]
    if with_op:
        lines += ["## Operating points: a stricter or looser check", "",
                  "The same scores at other thresholds, each set to flag a share of the model's validation "
                  "images (in-population X-rays it was calibrated on, never fitted on): a hospital that receives "
                  "adults or other views can flag more of them in exchange for flagging more children's X-rays. "
                  "`cxr-infer --domain-flag-rate R` picks a row in files that carry these points, "
                  "`--domain-threshold S` in any file. The rows are set on validation images only; the other "
                  "columns are measured.", ""]
        for m in with_op:
            op = m["operating_points"]
            built = [k for k in m["kinds"] if k not in CONTROLS]
            cols = [k for k in op["points"][0]["flagged"] if k not in built and k not in CONTROLS]

            def lowest(p: Dict[str, Any], built: List[str] = built) -> str:
                k = min(built, key=lambda b: p["flagged"][b])
                return f"{fmt_pct(p['flagged'][k], 1)} ({k})" if p["flagged"][k] < 1.0 else "100%"

            lines += [f"**{m['name']}** (thresholds: {op['source']})", "",
                      md_table(["validation flagged", "threshold S"] + cols + (["built kinds (lowest)"] if built else []),
                               [[fmt_pct(p.get("validation", p["flag_rate"]), 1), fmt_num(p["threshold"], 4)]
                                + [fmt_pct(p["flagged"][k], 1) for k in cols] + ([lowest(p)] if built else [])
                                for p in op["points"]]), ""]
    branched = [m for m in models if m["domain"].get("flagged_validation_by_branch")]
    if branched:
        names = [b["name"] for b in branched[0]["domain"]["branches"]]
        lines += ["## Branches", "",
                  "Each branch's value is mapped to (value - centre) / scale (centre: its validation median; "
                  "centre + scale: its validation 95th percentile); the score is the largest. Cells: centre / "
                  "scale, and the share of validation images flagged with that branch deciding.", "",
                  md_table(["Model"] + names,
                           [[m["name"]] + [f"{fmt_num(b['centre'], 3)} / {fmt_num(b['scale'], 3)}, "
                                           f"{fmt_pct(m['domain']['flagged_validation_by_branch'][b['name']], 1)}"
                                           for b in m["domain"]["branches"]] for m in branched]), ""]
    return "\n".join(lines)
