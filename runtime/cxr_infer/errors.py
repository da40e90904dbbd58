"""Exceptions of the runtime: each carries a message meant for a person, in one line."""
from __future__ import annotations


class CXRError(Exception):
    """Base class of every error cxr raises on purpose."""


class InputError(CXRError):
    """An input image cannot be read or is not a usable X-ray image."""


class ModelError(CXRError):
    """A model file is missing, is not ONNX, or lacks a valid ``cxr.spec``."""


class DeviceError(CXRError):
    """The requested device (execution provider) is not available."""
