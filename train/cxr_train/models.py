"""Backbones with the reference head, and every way of getting their starting weights.

``build_model`` gives a :class:`CXRNet` (a base giving pooled features, then ``Linear(C, 1024) ->
ReLU -> Dropout -> Linear(1024, 2)``) from ImageNet, a local state dict or random init; the
backbones are entries of :data:`cxr_train.backbones.BACKBONES`. See ``docs/training.md``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .backbones import BACKBONES, Backbone, get_backbone  # noqa: F401  (the registry; re-exported here)


class WeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but neither cached nor downloadable."""


class VGGBase(nn.Module):
    """Convolutional ``features`` (VGG16's) followed by global average pooling."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


class TinyBase(VGGBase):
    """A four-layer CNN for tests and smoke runs (seconds on a CPU)."""

    def __init__(self, width: int = 32):
        layers, c = [], 3
        for out in (8, 16, width, width):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            c = out
        super().__init__(nn.Sequential(*layers))


class CXRNet(nn.Module):
    """Base (image -> pooled features) plus the reference 2-way head (features -> logits)."""

    def __init__(self, backbone: str, base: nn.Module, feature_dim: int, hidden: int = 1024,
                 dropout: float = 0.3, num_classes: int = 2):
        super().__init__()
        self.backbone = backbone
        self.base = base
        self.head = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _imagenet_enum(backbone: str):
    """torchvision's weights enum of ``backbone`` (``ValueError`` for a backbone without one)."""
    import torchvision

    if not get_backbone(backbone).imagenet:
        raise ValueError(f"{backbone} has no ImageNet weights; use --weights none or --weights FILE")
    return torchvision.models.get_model_weights(backbone)


def cached_imagenet_file(backbone: str) -> Optional[Path]:
    """The torch hub cache file of any ImageNet weights of ``backbone``, if one exists."""
    spec = BACKBONES.get(backbone)
    if spec is None or not spec.imagenet:
        return None
    enum = _imagenet_enum(backbone)
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    for w in [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]:
        if (ckpt_dir / os.path.basename(w.url)).is_file():
            return ckpt_dir / os.path.basename(w.url)
    return None


def imagenet_state_dict(backbone: str, download: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """ImageNet weights for ``backbone`` from the hub cache, else downloaded (:class:`WeightsUnavailable`)."""
    cached = cached_imagenet_file(backbone)
    if cached is not None:
        return torch.load(cached, map_location="cpu", weights_only=True), f"imagenet (cache: {cached})"
    enum = _imagenet_enum(backbone)
    hint = (
        f"ImageNet weights for {backbone} are not in the torch hub cache ({Path(torch.hub.get_dir()) / 'checkpoints'})"
        " and could not be downloaded. Use one of: --weights imagenet on a machine with internet"
        f" (or copy {os.path.basename(enum.DEFAULT.url)} into that cache), --weights FILE for a local state dict,"
        " or --weights none to start from random init."
    )
    if not download or os.environ.get("CXR_OFFLINE") == "1":
        raise WeightsUnavailable(hint)
    try:
        return enum.DEFAULT.get_state_dict(progress=True, check_hash=True), f"imagenet ({enum.DEFAULT})"
    except Exception as exc:  # URLError, socket errors, proxy failures: all mean offline
        raise WeightsUnavailable(f"{hint} (download failed: {exc.__class__.__name__}: {exc})") from None


def load_base_weights(base: nn.Module, state: Dict[str, torch.Tensor], min_fraction: float = 0.95) -> int:
    """Load the tensors of ``state`` that fit ``base``; ``ValueError`` when under ``min_fraction`` of it fit."""
    own = base.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(matched) < min_fraction * len(own):
        raise ValueError(
            f"weights match only {len(matched)} of the base's {len(own)} tensors; "
            "is this a state dict of the same backbone?"
        )
    base.load_state_dict(matched, strict=False)
    return len(matched)


def build_model(backbone: str, weights: str = "none", dropout: float = 0.3, init: bool = True) -> Tuple[CXRNet, str]:
    """The model and a one-line description of where its starting weights came from.

    Examples:
        >>> model, origin = build_model("tiny")
        >>> origin
        'random init'
    """
    spec = get_backbone(backbone)
    w = (weights or "none").strip()
    state, origin = None, "random init"
    if w.lower() == "auto" and cached_imagenet_file(backbone) is not None:
        w = "imagenet"
    elif w.lower() == "auto":
        w, origin = "none", "random init (no cached ImageNet weights)"
    if w.lower() == "imagenet":
        state, origin = imagenet_state_dict(backbone)
    elif w.lower() != "none":
        path = Path(w)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {w}: no such file (use imagenet, none, auto or a state dict file)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                    state = state["state_dict"]
        except Exception as exc:  # UnpicklingError (code or objects in the pickle), a truncated file, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ValueError(f"--weights {w}: not a state dict of tensors that loads with weights_only=True"
                             f" ({exc.__class__.__name__}: {first})") from None
        if not isinstance(state, dict):
            raise ValueError(f"--weights {w}: holds a {type(state).__name__}, not a state dict of tensors")
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        origin = f"file {path}"
    pretrained = state is not None
    base = spec.build(pretrained, init)  # init=False: weights are loaded next (inception: skips ~6 s)
    model = CXRNet(backbone, base, spec.feature_dim, dropout=dropout)
    if state is not None:
        if any(k.startswith("base.") for k in state):  # a whole cxr model: load everything
            model.load_state_dict(state)
            origin += " (full cxr model)"
        else:
            n = load_base_weights(model.base, state)
            origin += f" ({n} tensors)"
    return model, origin
