"""PyTorch checkpoint -> FP32 ONNX with a full ``cxr.spec``, checked against PyTorch.

The graph takes the normalised NCHW input (normalisation lives in the spec) and returns
``probabilities`` ([N, 2]) and ``features`` (the pooled features, [N, C]); BatchNorm is folded first.
"""
from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from cxr_infer import __version__ as cxr_version
from cxr_infer.spec import ModelSpec

from .modelio import open_model, write_spec
from .onnxgraph import keep_only


def _wrapper(model):
    import torch

    class Exportable(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            f = self.m.base(x)
            return torch.softmax(self.m.head(f), dim=1), f

    return Exportable(model).eval()


def fold_batchnorm(module) -> Tuple[object, bool]:
    """``(module with Conv+BN fused by torch.fx, True)`` in eval mode, or ``(module, False)``
    unchanged when it cannot be traced (ONNX Runtime then folds BatchNorm at load time)."""
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(module), True
    except Exception:  # fx raises many types for code it cannot trace
        return module, False


def spec_from_checkpoint(meta: Dict, precision: str = "fp32", features: bool = True,
                         intended_use: Optional[Dict] = None) -> ModelSpec:
    """The model spec of a trained checkpoint's metadata (``checkpoint.json``), with the
    ``intended_use`` block when one is given (see :mod:`cxr_export.intended`)."""
    # "split" says how to rebuild the split from the training folder (cxr-bench domain --validation)
    same = ("split_hash", "split_counts", "split", "recipe", "weights_origin", "best_epoch", "selection", "torch")
    provenance = {key: meta.get(key) for key in same}
    provenance.update({
        "training_data_hash": meta.get("data_hash"), "epochs_run": len(meta.get("history", [])),
        "metrics": {"validation": meta.get("val_metrics"), "validation_at_0.5": meta.get("val_metrics_at_0.5")},
        "trained_on": meta.get("device"), "trained": meta.get("created"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": f"cxr {cxr_version}",
    })
    return ModelSpec.new(
        backbone=meta["backbone"], precision=precision, threshold=float(meta.get("threshold", 0.5)),
        image_size=int(meta.get("image_size", 224)), labels=meta.get("labels"),
        mean=meta.get("mean", (0.485, 0.456, 0.406)),
        std=meta.get("std", (0.229, 0.224, 0.225)), features_output="features" if features else None,
        provenance=provenance, threshold_rule=meta.get("threshold_rule", "0.5 (no rule recorded)"),
        **({"intended_use": dict(intended_use)} if intended_use else {}),
    )


def torch_probs(model, pixels: np.ndarray, spec: ModelSpec, batch_size: int = 16) -> np.ndarray:
    """Positive-class probabilities from the PyTorch model (fp32, eval) on uint8 NHWC pixels,
    fed the same input as the exported graph (:func:`cxr_infer.model.graph_input`)."""
    import torch

    from cxr_infer.model import graph_input

    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(graph_input(spec, pixels[start:start + batch_size]))
            out.append(torch.softmax(model(x), dim=1)[:, spec.positive_index].double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def export_fp32(model, meta: Dict, out: str | Path, parity_pixels: Optional[np.ndarray] = None, opset: int = 18,
                features: bool = True, intended_use: Optional[Dict] = None) -> Tuple[Path, ModelSpec]:
    """Export ``model`` to ``out`` with its spec (parity with PyTorch on ``parity_pixels``); returns both."""
    import onnx
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    wrapped, folded = fold_batchnorm(_wrapper(model))
    size = int(meta.get("image_size", 224))
    x = torch.zeros(2, 3, size, size)
    settings = dict(input_names=["input"], output_names=["probabilities", "features"], opset_version=opset,
                    dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}, "features": {0: "batch"}},
                    do_constant_folding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapped, (x,), str(out), dynamo=False, **settings)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(wrapped, (x,), str(out), **settings)
    spec = spec_from_checkpoint(meta, "fp32", features=True, intended_use=intended_use)
    if not features:
        m = onnx.load(str(out))
        keep_only(m.graph.output, lambda o: o.name != "features")
        onnx.save(m, str(out))
        spec = spec.updated(outputs={"features": None})
    record = {"opset": opset, "batchnorm_folded": folded, "torch": torch.__version__}
    if parity_pixels is not None and len(parity_pixels):
        ref = torch_probs(model, parity_pixels, spec)
        got = open_model(out, spec=spec).positive_probability(parity_pixels)
        record["parity"] = {"images": int(len(parity_pixels)), "max_abs_diff_probability":
                            float(np.max(np.abs(ref - got))), "against": "PyTorch fp32 eager"}
    spec = spec.updated({"export": record})
    write_spec(out, spec)
    return out, spec

