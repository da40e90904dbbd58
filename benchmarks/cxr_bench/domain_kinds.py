"""The out-of-domain kinds ``cxr-bench domain`` builds, deterministically, ``count`` each: sample
photos, rendered documents, noise, transformed test-split X-rays and other medical images
(:data:`KINDS`; ``cxr-bench domain --help`` describes each). matplotlib's samples suffice;
scikit-image's are used where installed, and each kind names its ``sources``.

Examples:
    >>> import random
    >>> px, sources = make_noise(3, (32, 32), random.Random(0))
    >>> px.shape, sources[0]
    ((3, 32, 32, 3), 'uniform colour')
"""
from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.preprocess import load_image

from .util import BenchError

KINDS = ("photos", "documents", "noise", "inverted", "upside_down", "rotated_90", "cropped", "medical_other",
         "flipped_vertical", "mirrored")
CONTROLS = ("mirrored",)  # transformed X-rays that are still in the domain: reported, no target
MEDICAL = ("retina", "microaneurysms", "immunohistochemistry", "cell", "shepp_logan_phantom")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "hubble_deep_field", "brick",
          "grass", "gravel", "clock")
WORDS = ("patient report the of and radiology chest findings impression lungs clear no acute history date "
         "signed page insurance claim total amount invoice hospital department examination result normal "
         "follow up recommended technique comparison dear sincerely meeting agenda minutes").split()
NO_SAMPLES = "no sample images found: install the bench extra (pip install 'cxr[bench]'), which brings matplotlib's"


def _skimage_images(names: Sequence[str]) -> List[Tuple[str, Any]]:
    """scikit-image's sample images ``names`` that this installation has (none without it)."""
    from PIL import Image

    out: List[Tuple[str, Any]] = []
    try:
        import skimage.data as skd
    except ImportError:
        return out
    for name in names:
        try:
            a = np.asarray(getattr(skd, name)())
            if a.dtype != np.uint8:  # the phantom is float in [0, 1]
                a = (np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
            out.append((f"skimage:{name}", Image.fromarray(a)))
        except Exception:  # a sample missing from this scikit-image (or needing a download)
            pass
    return out


def _matplotlib_sample(name: str) -> Optional[Path]:
    """The path of one of matplotlib's sample data files, or None (no matplotlib, or no such file)."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    return path if path.is_file() else None


def _photo_sources() -> List[Tuple[str, Any]]:
    from PIL import Image

    out = _skimage_images(PHOTOS)
    path = _matplotlib_sample("grace_hopper.jpg")
    if path is not None:
        out.append(("matplotlib:grace_hopper.jpg", Image.open(path).convert("RGB")))
    return out


def _medical_sources() -> List[Tuple[str, Any]]:
    """scikit-image's medical and scientific samples; without them, matplotlib's MRI slice of a
    head (256 x 256, 16-bit big-endian, scaled to 8 bits by its maximum)."""
    from PIL import Image

    out = _skimage_images(MEDICAL)
    path = _matplotlib_sample("s1045.ima.gz")
    if not out and path is not None:
        a = np.frombuffer(gzip.decompress(path.read_bytes()), ">u2").reshape(256, 256).astype(np.float64)
        out.append(("matplotlib:s1045.ima (MRI)", Image.fromarray((255.0 * a / max(a.max(), 1.0)).astype(np.uint8))))
    return out


def make_photos(count: int, size: Tuple[int, int], rng: random.Random,
                srcs: Optional[List[Tuple[str, Any]]] = None) -> Tuple[np.ndarray, List[str]]:
    """``count`` crops of the sample images ``srcs`` (default: the photos), each image once whole first."""
    srcs = _photo_sources() if srcs is None else srcs
    if not srcs:
        raise BenchError(f"{NO_SAMPLES} sample images")
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
    """``count`` rendered text pages: words, headings and rules on a scanner's gray, noisy, tilted page."""
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
    """``count`` noise images, the three sorts in turn: uniform colour, Gaussian gray, blurred gray."""
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
        "medical_other": lambda: make_photos(count, size, rng, _medical_sources()),
        "flipped_vertical": lambda: (_xray_kind(xr, lambda x, i: x[::-1].copy(), size),
                                     ["test-split X-rays, top to bottom"]),
        "mirrored": lambda: (_xray_kind(xr, lambda x, i: x[:, ::-1].copy(), size),
                             ["test-split X-rays, left to right (control: still a chest X-ray)"]),
    }
    unknown = [k for k in kinds if k not in makers]
    if unknown:
        raise BenchError(f"unknown kind(s) {unknown}: choose from {', '.join(KINDS)}")
    return {k: makers[k]() for k in kinds}
