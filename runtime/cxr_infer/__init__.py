"""cxr_infer: the lean chest X-ray classifier runtime (onnxruntime + numpy + Pillow; never torch).

Examples:
    >>> from cxr_infer import Classifier                      # doctest: +SKIP
    >>> Classifier("model.onnx").predict("chest.jpeg").label  # doctest: +SKIP
    'PNEUMONIA'

Names are imported on first use, so ``import cxr_infer`` (and ``cxr-infer --help``) stays fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: File name endings read as images everywhere (cxr-infer folders, cxr-train, cxr-bench data);
#: extension-less DICOM files are recognised by content where a tool says so.
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})

__all__ = ["Classifier", "Prediction", "ModelSpec", "load_image", "to_input", "CXRError", "InputError",
           "NotAnImage", "ModelError", "DeviceError", "DEFAULT_MODEL", "IMAGE_SUFFIXES", "__version__"]

_WHERE = {
    "Classifier": "classifier", "Prediction": "prediction", "DEFAULT_MODEL": "classifier",
    "ModelSpec": "spec", "load_image": "preprocess", "to_input": "preprocess",
    "CXRError": "errors", "InputError": "errors", "NotAnImage": "errors", "ModelError": "errors",
    "DeviceError": "errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from .classifier import DEFAULT_MODEL, Classifier
    from .errors import CXRError, DeviceError, InputError, ModelError, NotAnImage
    from .prediction import Prediction
    from .preprocess import load_image, to_input
    from .spec import ModelSpec


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
