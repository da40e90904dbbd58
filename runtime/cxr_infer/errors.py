"""Exceptions of the runtime: each carries a message meant for a person, in one line."""
from __future__ import annotations


class CXRError(Exception):
    """Base class of every error cxr raises on purpose.

    A message that arrives in several lines (a library's reason quoted in it) is joined into one,
    so that each bad input stays one line on stderr and in a CSV or JSON Lines row.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and ("\n" in args[0] or "\r" in args[0]):
            args = (" ".join(args[0].split()),)
        super().__init__(*args)


class InputError(CXRError):
    """An input image cannot be read or is not a usable X-ray image."""


class NotAnImage(InputError):
    """A valid DICOM object that holds no image (a structured report, a presentation state, a
    DICOMDIR): an input error when it was named, skipped when a folder scan found it."""


class ModelError(CXRError):
    """A model file is missing, is not ONNX, or lacks a valid ``cxr.spec``."""


class DeviceError(CXRError):
    """The requested device (execution provider) is not available."""
