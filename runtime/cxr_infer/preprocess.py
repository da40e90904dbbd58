"""The one preprocessing of cxr: any supported image in, the training pixels out.

The training set (``chest_xray_224``) was made with ``Image.convert("RGB")`` followed by
``Image.resize((224, 224))`` (Pillow's default filter, bicubic), aspect ratio not kept.
:func:`load_image` reproduces exactly that for every input kind, and :func:`to_input`
turns a batch of such pixels into the model's float input.

Inputs: a path, ``bytes``, a PIL image or a numpy array. Files: JPEG, PNG, BMP, TIFF
(8- and 16-bit; modes L, LA, RGB, RGBA, CMYK, P, I;16, I, F) and DICOM (extra ``dicom``).
EXIF orientation is applied. Anything unreadable raises :class:`InputError` with one line
that names the input and the problem.

Examples:
    >>> import numpy as np
    >>> px = load_image(np.zeros((600, 500), dtype=np.uint8))
    >>> px.shape, px.dtype
    ((224, 224, 3), dtype('uint8'))
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

#: Decompression bomb guard: an image declaring more pixels than this (10k x 10k) is refused
#: before any pixel is decoded. The largest chest X-ray detectors are about 4.3k x 4.3k.
MAX_PIXELS = 100_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: JPEG draft decoding (DCT scaling) keeps at least this many times the target size, so the
#: final bicubic resize still sees enough pixels: parity with the training set is unchanged
#: (measured by tests/test_preprocess.py), decoding is about 1.5x faster.
DRAFT_MARGIN = 2

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}

_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def describe(source: object) -> str:
    """The name an input goes by in messages: its path, or ``<bytes>``, ``<ndarray>``, ..."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """Integer gray levels to 8 bits by their evident bit depth.

    Values up to 255 are 8-bit data in a wider container and are kept; up to 4095 they are
    12-bit detector data (scaled by 255/4095); otherwise the full 16-bit range is used.
    """
    arr = np.clip(arr.astype(np.int64, copy=False), 0, 65535)
    top = int(arr.max(initial=0))
    if top <= 255:
        return arr.astype(np.uint8)
    full = 4095 if top <= 4095 else 65535
    return ((arr * 255 + full // 2) // full).astype(np.uint8)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Map the 16-bit, 32-bit integer and float gray modes to 8-bit ``L``."""
    if img.mode.startswith("I"):
        return Image.fromarray(_scale_16bit(np.asarray(img)), "L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(arr * 255.0 / hi), 0, 255).astype(np.uint8), "L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite images with transparency onto black (opaque pixels are unchanged)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise InputError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.dtype == np.bool_:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        hi = 1.0 if float(arr.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(arr * 255.0 / hi), 0, 255).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):
        return Image.fromarray(_scale_16bit(arr))
    raise InputError(f"array of dtype {arr.dtype} is not an image")


def _read_bytes(source: ImageSource, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("empty input (0 bytes)")
        return data
    path = Path(source)  # type: ignore[arg-type]
    try:
        if path.is_dir():
            raise InputError("is a directory, not an image")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file") from None
    except PermissionError:
        raise InputError("permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise InputError("empty file (0 bytes)")
    return data


def _kind_of(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head[:1] in (b"<", b"{", b"[") or all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown format"


def _decode(data: bytes, draft_size: Optional[Sequence[int]]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own MAX_PIXELS check below decides; Pillow's warning is not an error here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if data[:3] == b"\xff\xd8\xff":
                # JPEG, the common case: open it directly, skipping Image.open's import of five
                # plugins (about 10 ms of a cold cxr-infer process).
                from PIL import JpegImagePlugin

                img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
            else:
                img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise InputError(f"declares {w}x{h} = {w * h:,} pixels, more than the {MAX_PIXELS:,} "
                                 "allowed (decompression bomb?)")
            if draft_size is not None and img.format == "JPEG":
                side = DRAFT_MARGIN * max(int(draft_size[0]), int(draft_size[1]))
                img.draft(img.mode, (side, side))
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(f"not a supported image ({_kind_of(data)}; expected JPEG, PNG, BMP, TIFF or DICOM)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise InputError(f"corrupt or truncated image ({exc})") from None
    return img


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if any (no copy when there is none)."""
    if img.format not in (None, "TIFF") and not any(k in img.info for k in ("exif", "xmp", "XML:com.adobe.xmp",
                                                                  "Raw profile type exif")):
        return img  # nothing that could hold an orientation; skips Pillow's EXIF parser import
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not lose the image
        return img
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def open_image(source: ImageSource, draft_size: Optional[Sequence[int]] = None) -> Image.Image:
    """Open ``source`` (path, bytes, PIL image or array) as a decoded, upright PIL image.

    EXIF orientation is applied. DICOM data is handed to :mod:`cxr_infer.dicom`. With
    ``draft_size`` a JPEG may be decoded at a reduced scale (never below ``DRAFT_MARGIN``
    times that size). Raises :class:`InputError` with a one-line reason naming the input.

    Examples:
        >>> open_image(np.full((4, 6), 9, np.uint8)).size
        (6, 4)
    """
    return open_image_and_header(source, draft_size)[0]


def open_image_and_header(source: ImageSource, draft_size: Optional[Sequence[int]] = None
                          ) -> Tuple[Image.Image, Optional[Dict[str, Any]]]:
    """:func:`open_image`'s image and, for DICOM data, the header fields of the intended-use checks
    (:func:`cxr_infer.dicom.header_of`; None for other inputs)."""
    name = describe(source)
    try:
        if isinstance(source, Image.Image):
            return _orient(source), None
        if isinstance(source, np.ndarray):
            return _from_array(source), None
        if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            raise InputError(f"unsupported input type {type(source).__name__} "
                             "(expected a path, bytes, a PIL image or a numpy array)")
        data = _read_bytes(source, name)
        from . import dicom  # local: pydicom is optional and only needed for DICOM

        if dicom.looks_like_dicom(data):
            return dicom.read_dicom(data, name)
        return _orient(_decode(data, draft_size)), None
    except InputError as exc:
        raise _named(exc, name) from None


def _named(exc: InputError, name: str) -> InputError:
    msg = str(exc)
    return exc if msg.startswith(name + ":") else type(exc)(f"{name}: {msg}")


def load_image(source: ImageSource, size: Sequence[int] = (224, 224), *, method: str = "bicubic",
               draft: bool = True) -> np.ndarray:
    """Decode ``source`` into the model's pixels: ``uint8`` array of shape ``(H, W, 3)``.

    Reproduces how the training images were made: ``convert("RGB")`` then a bicubic
    ``resize(size)`` without keeping the aspect ratio. ``size`` is ``(width, height)``;
    ``method`` is the spec's resize method. ``draft=False`` decodes JPEGs at full scale
    (slower, same parity).

    Examples:
        >>> load_image(b"not an image")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        cxr_infer.errors.InputError: <bytes>: not a supported image (text; ...)
    """
    return load_image_and_header(source, size, method=method, draft=draft)[0]


def load_image_and_header(source: ImageSource, size: Sequence[int] = (224, 224), *, method: str = "bicubic",
                          draft: bool = True) -> Tuple[np.ndarray, Optional[Dict[str, Any]]]:
    """:func:`load_image`'s pixels and, for a DICOM input, the header fields of the intended-use
    checks (:func:`cxr_infer.dicom.header_of`; None for other inputs)."""
    target = (int(size[0]), int(size[1]))
    name = describe(source)
    img, header = open_image_and_header(source, target if draft else None)
    try:
        img = _flatten_alpha(_to_8bit(img))
        if img.mode not in ("RGB", "L"):
            # CMYK, P, 1, YCbCr, ...: Pillow's own conversion, as the training set used.
            img = img.convert("L" if img.mode == "1" else "RGB")
        if img.size != target:
            img = img.resize(target, RESAMPLING.get(method, Image.Resampling.BICUBIC))
        arr = np.asarray(img, dtype=np.uint8)
    except InputError as exc:
        raise _named(exc, name) from None
    except (OSError, ValueError, MemoryError, TypeError) as exc:
        raise InputError(f"{name}: cannot be converted to an RGB image ({exc})") from None
    if arr.ndim == 2:
        # Gray resized once, then repeated: identical to resizing its RGB twin, 3x cheaper.
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr), header


def to_input(pixels: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Turn ``uint8`` pixels ``(N, H, W, 3)`` (or one ``(H, W, 3)``) into float32 NCHW input.

    ``x = (pixels / 255 - mean) / std`` per channel, as every cxr model expects.

    Examples:
        >>> to_input(np.zeros((2, 224, 224, 3), np.uint8)).shape
        (2, 3, 224, 224)
    """
    px = np.asarray(pixels)
    if px.ndim == 3:
        px = px[None]
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32))).reshape(1, 3, 1, 1)
    shift = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)).reshape(1, 3, 1, 1)
    x = px.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray(x * scale - shift, dtype=np.float32)
