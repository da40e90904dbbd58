"""Exceptions of the runtime: each carries a message meant for a person, in one line."""
from __future__ import annotations

import os


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


def one_line(exc: BaseException) -> str:
    """The line a cxr command prints for ``exc`` before it exits 2: a :class:`CXRError`'s own
    message, anything else named as unexpected. With ``CXR_DEBUG`` set, an unexpected error is
    raised again, for its traceback.

    Examples:
        >>> one_line(ModelError("m.onnx: not an ONNX file"))
        'm.onnx: not an ONNX file'
        >>> one_line(KeyError("x"))  # doctest: +SKIP
        "unexpected error: KeyError: 'x' (set CXR_DEBUG=1 for the traceback)"
    """
    if isinstance(exc, CXRError):
        return str(exc)
    if os.environ.get("CXR_DEBUG"):
        raise exc
    return f"unexpected error: {type(exc).__name__}: {exc} (set CXR_DEBUG=1 for the traceback)"
