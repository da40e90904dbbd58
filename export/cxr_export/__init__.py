"""cxr_export: checkpoint -> ONNX (FP32, calibrated INT8, FP16), each checked before it is written."""
