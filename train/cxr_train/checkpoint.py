"""Checkpoints: ``model.safetensors`` (weights) beside ``checkpoint.json`` (everything else).

Example:
    >>> from cxr_train.checkpoint import load_checkpoint   # doctest: +SKIP
    >>> model, meta = load_checkpoint("runs/resnet50")     # doctest: +SKIP
    >>> meta["backbone"], meta["threshold"]                # doctest: +SKIP
    ('resnet50', 0.62)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

WEIGHTS_FILES = ("model.safetensors", "model_fp16.safetensors")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Save a state dict as safetensors (floating tensors cast to ``dtype``), atomically."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def read_meta(ckpt: str | Path) -> Dict:
    """The ``checkpoint.json`` of a run folder (or of the folder holding a weights file)."""
    p = Path(ckpt)
    folder = p if p.is_dir() else p.parent
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint.json (is this a cxr-train output folder?)")
    return json.loads(meta_path.read_text())


def load_checkpoint(ckpt: str | Path, map_location: str = "cpu") -> Tuple[torch.nn.Module, Dict]:
    """Rebuild the trained model (fp32, eval mode) and its metadata from a run folder."""
    from safetensors.torch import load_file

    from .models import build_model

    p = Path(ckpt)
    folder = p if p.is_dir() else p.parent
    meta = read_meta(folder)
    weights = p if p.is_file() and p.suffix == ".safetensors" else None
    if weights is None:
        for name in WEIGHTS_FILES:
            if (folder / name).is_file():
                weights = folder / name
                break
    if weights is None:
        raise FileNotFoundError(f"{folder}: no model weights ({' or '.join(WEIGHTS_FILES)})")
    model, _ = build_model(meta["backbone"], weights="none", dropout=meta.get("args", {}).get("dropout", 0.3),
                           init=False)
    if meta["backbone"] == "inception_v3":
        model.base.transform_input = bool(meta.get("transform_input", False))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    model.eval()
    return model.to(map_location), meta
