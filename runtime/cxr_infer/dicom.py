"""DICOM reading (optional extra ``dicom``): placeholder, refined by the runtime issue."""
from __future__ import annotations

from PIL import Image

from .errors import InputError


def looks_like_dicom(data: bytes) -> bool:
    """True when ``data`` carries the DICOM preamble magic ``DICM`` at byte 128."""
    return len(data) > 132 and data[128:132] == b"DICM"


def read_dicom(data: bytes, name: str) -> Image.Image:
    raise InputError(f"{name}: DICOM support is not implemented yet")
