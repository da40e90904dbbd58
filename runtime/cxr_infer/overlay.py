"""Heatmap overlays people can read: the image, its Grad-CAM map in a perceptual colormap, a
colour bar, the answer and what the map is not (Pillow and numpy only, like the rest of the runtime).

Examples:
    >>> p = clf.predict("chest.jpeg", heatmap=True)                      # doctest: +SKIP
    >>> render_overlay(open_image("chest.jpeg"), p).save("chest_map.png")  # doctest: +SKIP
"""
from __future__ import annotations

import textwrap
from typing import Any, List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: The longest side of an overlay, in pixels: larger originals are shown scaled down, smaller ones up.
MAX_SIDE, MIN_SIDE = 1024, 512
CAPTION = "Grad-CAM: model attention, not a localisation"
#: viridis (matplotlib's perceptually uniform colormap) as a degree-8 polynomial per channel,
#: fitted here to matplotlib's 256-entry table: within 2.5 of 255 gray levels everywhere.
_VIRIDIS = np.array([
    [0.262736, 0.002958, 0.333353], [0.689506, 1.580649, 1.156816], [-6.346676, -2.632162, 6.59489],
    [13.805849, 12.659721, -81.721399], [18.490099, -46.952177, 336.507], [-164.475208, 99.085098, -727.361819],
    [335.76583, -112.583279, 878.045154], [-285.086196, 64.072256, -563.311351], [87.89644, -14.327338, 149.904559],
])


def viridis(values: np.ndarray) -> np.ndarray:
    """``values`` in 0..1 (any shape) to RGB ``uint8`` (shape + (3,)).

    Examples:
        >>> viridis(np.array([0.0, 1.0])).tolist()
        [[67, 1, 85], [255, 231, 38]]
    """
    t = np.clip(np.asarray(values, np.float64), 0.0, 1.0)[..., None]
    rgb = np.zeros(t.shape[:-1] + (3,))
    for coefficient in _VIRIDIS[::-1]:  # Horner's rule
        rgb = rgb * t + coefficient
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _status_lines(prediction: Any, width_chars: int) -> List[str]:
    head = (f"{prediction.label}   probability {prediction.probability:.3f} (threshold {prediction.threshold:.3g})")
    if prediction.in_domain is False:
        status = "OUTSIDE THE INTENDED USE, do not trust this label: " + "; ".join(prediction.domain_reasons)
    elif prediction.in_domain:
        status = "inside the intended use"
    else:
        status = "intended use not checked (the model file has no domain statistics)"
    return [head] + textwrap.wrap(status, width_chars) + [_evidence_line(prediction), CAPTION]


def _explained(prediction: Any) -> str:
    return prediction.heatmap_label or prediction.label


def render_overlay(image: Image.Image, prediction: Any, alpha: float = 0.55) -> Image.Image:
    """The image (as displayed for classification) with ``prediction.heatmap`` over it, a colour bar
    with its scale, and a caption: label, probability, in-domain status with reasons, which label's
    evidence the map shows, "model attention, not a localisation". A map with no evidence says so in
    the picture. Out-of-domain images get the same overlay, their caption marked in red."""
    if prediction.heatmap is None:
        raise ValueError("the prediction has no heatmap: predict(..., heatmap=True)")
    base = image.convert("RGB")
    scale = min(MAX_SIDE, max(MIN_SIDE, max(base.size))) / max(base.size)
    if scale != 1.0:
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))),
                           Image.Resampling.BICUBIC)
    heat = prediction.heatmap_at(base.size)
    weight = (alpha * heat)[..., None]  # linear: the colour covers the anatomy as much as the map says
    pixels = np.asarray(base, np.float32)
    blended = (1.0 - weight) * pixels + weight * viridis(heat).astype(np.float32)
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")

    font_size = max(12, base.width // 48)
    font = _font(font_size)
    bar_width, margin = max(14, base.width // 40), max(6, font_size // 2)
    lines = _status_lines(prediction, max(30, int(base.width / (font_size * 0.55))))
    caption_height = (font_size + 4) * len(lines) + 2 * margin
    label_width = int(font_size * 3.2)
    canvas = Image.new("RGB", (base.width + bar_width + label_width + 2 * margin, base.height + caption_height),
                       (20, 20, 20))
    canvas.paste(picture, (0, caption_height))
    draw = ImageDraw.Draw(canvas)
    colour = (255, 110, 110) if prediction.in_domain is False else (235, 235, 235)
    for i, line in enumerate(lines):
        fill = (200, 200, 200) if line in (CAPTION, _evidence_line(prediction)) else colour
        draw.text((margin, margin + i * (font_size + 4)), line, fill=fill, font=font)
    if not np.any(prediction.heatmap > 0):  # nothing to draw: say so where the map would be
        note = f"no region raised the {_explained(prediction)} score"
        draw.rectangle((margin, caption_height + margin, base.width - margin, caption_height + margin + 2 * font_size),
                       fill=(20, 20, 20))
        draw.text((2 * margin, caption_height + margin + font_size // 2), note, fill=(255, 220, 120), font=font)
    # the colour bar: the share of the map's strongest region, 1 at the top
    bar_x = base.width + margin
    ramp = viridis(np.linspace(1.0, 0.0, base.height))[:, None, :].repeat(bar_width, axis=1)
    canvas.paste(Image.fromarray(ramp, "RGB"), (bar_x, caption_height))
    for value in (1.0, 0.75, 0.5, 0.25, 0.0):
        y = caption_height + round((1.0 - value) * (base.height - font_size - 2))
        draw.text((bar_x + bar_width + 4, y), f"{value:.2f}", fill=(235, 235, 235), font=font)
    return canvas


def _evidence_line(prediction: Any) -> str:
    return f"map: where the model saw evidence for {_explained(prediction)} (1 = its strongest region)"


def overlay_name(source: str, taken: set, suffix: str = ".png") -> str:
    """A file name for ``source``'s overlay that no other input of the run has taken.

    Examples:
        >>> taken = set(); overlay_name("a/x.jpeg", taken), overlay_name("b/x.jpeg", taken)
        ('x.png', 'x-2.png')
    """
    import os

    stem = "stdin" if source == "-" else os.path.splitext(os.path.basename(source.rstrip("/")))[0] or "image"
    name, count = stem + suffix, 1
    while name in taken:
        count += 1
        name = f"{stem}-{count}{suffix}"
    taken.add(name)
    return name


def open_display(source: Any) -> Optional[Image.Image]:
    """The image as the classification pipeline displays it (DICOM: its VOI/modality chain), or None."""
    from .errors import InputError
    from .preprocess import open_image

    try:
        return open_image(source)
    except InputError:
        return None
