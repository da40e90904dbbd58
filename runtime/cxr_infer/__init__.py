"""cxr_infer: the lean chest X-ray classifier runtime (onnxruntime + numpy + Pillow)."""
__version__ = "0.1.0"
