"""Checkpoints: ``model.safetensors`` (weights) beside ``checkpoint.json`` (everything else).

Reading what a checkpoint is needs no torch and importing this module does not import it, so tools
that only describe run folders start fast; saving and loading weights import torch inside.

Examples:
    >>> model, meta = load_checkpoint("runs/resnet50")   # doctest: +SKIP
    >>> meta["backbone"], meta["threshold"]              # doctest: +SKIP
    ('resnet50', 0.5)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Weights file names, in the order :func:`find_weights` prefers them.
WEIGHTS_FILES = ("model.safetensors", "model_fp16.safetensors")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _folder_of(ckpt: str | Path) -> Path:
    p = Path(ckpt)
    return p if p.is_dir() else p.parent


def read_meta(ckpt: str | Path) -> Dict[str, Any]:
    """The ``checkpoint.json`` of a run folder (or of the folder holding a weights file)."""
    folder = _folder_of(ckpt)
    meta_path = folder / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint.json (is this a cxr-train output folder?)")
    return json.loads(meta_path.read_text())


def find_weights(ckpt: str | Path) -> Path:
    """``ckpt`` when it is a ``.safetensors`` file, else the first of :data:`WEIGHTS_FILES` in its folder."""
    p = Path(ckpt)
    if p.is_file() and p.suffix == ".safetensors":
        return p
    folder = _folder_of(p)
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no model weights ({' or '.join(WEIGHTS_FILES)})")


def safetensors_dtypes(path: str | Path) -> List[str]:
    """The tensor dtypes (``"F32"``, ``"F16"``, ``"I64"``, ...) named in a safetensors file's header."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return sorted({entry["dtype"] for key, entry in header.items() if key != "__metadata__"})


def checkpoint_summary(ckpt: str | Path) -> Dict[str, Any]:
    """What a run folder holds, read without torch: backbone, weights file, its size and dtypes.

    Examples:
        >>> s = checkpoint_summary("runs/resnet50")             # doctest: +SKIP
        >>> s["backbone"], s["weights_name"], s["stored_fp16"]  # doctest: +SKIP
        ('resnet50', 'model_fp16.safetensors', True)
    """
    meta = read_meta(ckpt)
    folder = _folder_of(ckpt)
    if not isinstance(meta.get("backbone"), str):
        raise ValueError(f"{folder}/checkpoint.json names no backbone")
    weights = find_weights(ckpt)
    dtypes = safetensors_dtypes(weights)
    floating = [d for d in dtypes if d in _FLOAT_DTYPES]
    return {
        "folder": str(folder), "backbone": meta["backbone"], "weights_file": str(weights),
        "weights_name": weights.name, "file_bytes": weights.stat().st_size, "dtypes": dtypes,
        "stored_fp16": bool(floating) and set(floating) == {"F16"},
        "image_size": meta.get("image_size"), "eval_precision": meta.get("eval_precision"),
    }


def save_weights(model: "torch.nn.Module", path: Path, dtype: "torch.dtype | None" = None) -> None:
    """Save a state dict as safetensors (floating tensors cast to ``dtype``, default fp32), atomically."""
    import torch
    from safetensors.torch import save_file

    dtype = torch.float32 if dtype is None else dtype
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        state[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_checkpoint(ckpt: str | Path, map_location: str = "cpu") -> Tuple["torch.nn.Module", Dict[str, Any]]:
    """Rebuild the trained model (fp32, eval mode) and its metadata from a run folder or weights file."""
    from safetensors.torch import load_file

    from .backbones import get_backbone
    from .models import build_model

    meta = read_meta(ckpt)
    weights = find_weights(ckpt)
    model, _ = build_model(meta["backbone"], weights="none", dropout=meta.get("args", {}).get("dropout", 0.3),
                           init=False)
    if get_backbone(meta["backbone"]).transform_input:
        model.base.transform_input = bool(meta.get("transform_input", False))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    model.eval()
    return model.to(map_location), meta
