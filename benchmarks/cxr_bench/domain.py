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


def _scores(model, pixels: np.ndarray, batch: int) -> np.ndarray:
    if not len(pixels):
        return np.zeros(0)
    (scores,) = model.model.run(pixels, [model.spec.domain_output], batch)
    return np.asarray(scores, np.float64).reshape(-1)


def run_domain(models: Sequence[str | Path], data: str | Path, out: str | Path, count: int = 150,
               kinds: Sequence[str] = KINDS, batch: int = 16, threads: int = 1, name: Optional[str] = None,
               quiet: bool = False) -> Dict[str, Any]:
    """Measure each model's out-of-domain check; write domain.json / domain.md into ``out``."""
    out = Path(out)
    ds = list_dataset(data)
    cache = PixelCache(ds.files, quiet=quiet)
    results: List[Dict[str, Any]] = []
    built: Dict[Tuple[int, int], Dict[str, Tuple[np.ndarray, List[str]]]] = {}
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
        labels = np.array([lab for lab, k in zip(ds.folder_labels, keep) if k])
        per_label = {lab: float(np.mean(s_in[labels == lab] > thr)) for lab in sorted(set(labels))}
        entry: Dict[str, Any] = {**model.describe(), "domain": spec.raw.get("domain"),
                                 "in_domain": {"images": int(len(s_in)), "flag_rate": float(np.mean(s_in > thr)),
                                               "flag_rate_per_label": per_label,
                                               "score_median": float(np.median(s_in))},
                                 "kinds": {}}
        for kind, (px, sources) in built[size].items():
            s = _scores(model, px, batch)
            entry["kinds"][kind] = {"images": int(len(s)), "flag_rate": float(np.mean(s > thr)),
                                    "auroc": auroc(s_in, s), "score_median": float(np.median(s)),
                                    "sources": sources}
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        say(f"{model.name}: test flag rate {fmt_pct(entry['in_domain']['flag_rate'])}; " + ", ".join(
            f"{k} {fmt_pct(v['flag_rate'], 1)} (AUROC {v['auroc']:.3f})" for k, v in entry["kinds"].items()), quiet)
    report = new_report(KIND, data={"root": str(ds.root), "n_images": len(ds.files), "counts": ds.counts()},
                        count_per_kind=count, seed=0, models=results)
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
