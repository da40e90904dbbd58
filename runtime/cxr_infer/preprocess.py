"""The one preprocessing of cxr: any supported image in, the training pixels out.

The training set (``chest_xray_224``) was made with ``Image.convert("RGB")`` followed by
``Image.resize((224, 224))`` (Pillow's default filter, bicubic), aspect ratio not kept.
:func:`load_image` reproduces exactly that for every input kind, and :func:`to_input`
turns a batch of such pixels into the model's float input.

Example:
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
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

#: A decompression bomb guard: more pixels than this (about 16k x 16k) is refused.
MAX_PIXELS = 268_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Map the 16-bit and float modes to 8-bit gray, keeping the full range meaningful."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        if img.mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            return Image.fromarray(arr.astype(np.uint8), "L")
        arr = np.clip(arr, 0, 65535)
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
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
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if arr.dtype == np.uint16:
        scaled = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(scaled)
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * 255.0 / hi), 0, 255).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    raise InputError(f"array of dtype {arr.dtype} is not an image")


def open_image(source: ImageSource) -> Image.Image:
    """Open ``source`` (path, bytes, PIL image or array) as a decoded PIL image.

    EXIF orientation is applied. DICOM files are handed to :mod:`cxr_infer.dicom`.
    Raises :class:`InputError` with a one-line reason for anything unreadable.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    name = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("empty input (0 bytes)")
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{name}: no such file")
        if path.is_dir():
            raise InputError(f"{name}: is a directory, not an image")
        data = path.read_bytes()
        if not data:
            raise InputError(f"{name}: empty file (0 bytes)")
    from . import dicom  # local: pydicom is optional

    if dicom.looks_like_dicom(data):
        return dicom.read_dicom(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise InputError(f"{name}: declares {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed (decompression bomb?)")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "text or HTML" if head[:1] in (b"<", b"{") or all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not an image"
        raise InputError(f"{name}: not a supported image ({kind}; expected JPEG, PNG, BMP, TIFF or DICOM)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None
    return ImageOps.exif_transpose(img)


def load_image(source: ImageSource, size: Sequence[int] = (224, 224)) -> np.ndarray:
    """Decode ``source`` into the model's pixels: ``uint8`` array of shape ``(H, W, 3)``.

    Reproduces how the training images were made: ``convert("RGB")`` then a bicubic
    ``resize(size)`` without keeping the aspect ratio. ``size`` is ``(width, height)``.

    Example:
        >>> load_image(b"not an image")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        cxr_infer.errors.InputError: <bytes>: not a supported image (text or HTML; ...)
    """
    img = open_image(source)
    img = _flatten_alpha(_to_8bit(img))
    if img.mode != "RGB":
        # CMYK, P, 1, YCbCr, ...: Pillow's own conversion, as the training set used.
        img = img.convert("L" if img.mode in ("L", "1") else "RGB")
    target = (int(size[0]), int(size[1]))
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        # Gray resized once, then repeated: identical to resizing its RGB twin, 3x cheaper.
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def to_input(pixels: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Turn ``uint8`` pixels ``(N, H, W, 3)`` (or one ``(H, W, 3)``) into float32 NCHW input.

    ``x = (pixels / 255 - mean) / std`` per channel, as every cxr model expects.

    Example:
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
