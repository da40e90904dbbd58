"""Batched X-ray augmentation on the training device, on top of the runtime's preprocessing: one
affine warp per image, then gamma, contrast and brightness, optionally random erasing and
(:func:`mix_batch`) mixup or CutMix. No horizontal flip by default: the heart's side is anatomy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from cxr_infer.preprocess import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 10.0
    translate: float = 0.08
    scale: tuple = (0.9, 1.15)
    shear_deg: float = 0.0
    brightness: float = 0.15
    contrast: float = 0.2
    gamma: float = 0.2
    hflip: float = 0.0
    erase: float = 0.0


PRESETS = {
    "none": None,
    "light": AugmentConfig(rotate_deg=7, translate=0.05, scale=(0.95, 1.08), brightness=0.1, contrast=0.1, gamma=0.0),
    "medium": AugmentConfig(),
    "strong": AugmentConfig(rotate_deg=15, translate=0.1, scale=(0.85, 1.25), shear_deg=8, brightness=0.25,
                            contrast=0.3, gamma=0.3, erase=0.25),
}


def normalise(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``x`` in [0, 1], NCHW."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (as held in memory) -> float32 NCHW in [0, 1]."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def augment(x: torch.Tensor, cfg: Optional[AugmentConfig], gen: torch.Generator) -> torch.Tensor:
    """Augment a float NCHW batch in [0, 1]; returns a new batch in [0, 1]."""
    if cfg is None:
        return x
    n, dev = x.shape[0], x.device
    ang = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen, dev) * (math.pi / 180)
    shear = _uniform(n, -cfg.shear_deg, cfg.shear_deg, gen, dev) * (math.pi / 180)
    zoom = torch.exp(_uniform(n, math.log(cfg.scale[0]), math.log(cfg.scale[1]), gen, dev))
    tx = _uniform(n, -cfg.translate, cfg.translate, gen, dev) * 2
    ty = _uniform(n, -cfg.translate, cfg.translate, gen, dev) * 2
    flip = torch.where(torch.rand(n, generator=gen, device=dev) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin + torch.tan(shear) / zoom
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.gamma:
        g = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, gen, dev)).view(n, 1, 1, 1)
        x = x.clamp_min(1e-6).pow(g)
    if cfg.contrast:
        c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
    if cfg.brightness:
        x = x + _uniform(n, -cfg.brightness, cfg.brightness, gen, dev).view(n, 1, 1, 1)
    if cfg.erase:
        h, w = x.shape[2], x.shape[3]
        do = torch.rand(n, generator=gen, device=dev) < cfg.erase
        eh = (_uniform(n, 0.1, 0.3, gen, dev) * h).long()
        ew = (_uniform(n, 0.1, 0.3, gen, dev) * w).long()
        y0 = (torch.rand(n, generator=gen, device=dev) * (h - eh)).long()
        x0 = (torch.rand(n, generator=gen, device=dev) * (w - ew)).long()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        mask = ((rows >= y0.view(n, 1, 1)) & (rows < (y0 + eh).view(n, 1, 1))
                & (cols >= x0.view(n, 1, 1)) & (cols < (x0 + ew).view(n, 1, 1)) & do.view(n, 1, 1))
        x = x.masked_fill(mask.unsqueeze(1), 0.0)
    return x.clamp_(0.0, 1.0)


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float, rng: np.random.Generator, gen: torch.Generator
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Mixup or CutMix (Beta(a, a) parameters, 0: off; both on: one at even odds) of a batch with a
    permutation of itself: ``(mixed, permutation, lam)`` for the loss ``lam * loss(y) + (1 - lam) *
    loss(y[permutation])``. ``rng`` draws on the host, so no step waits on the device.

    Examples:
        >>> x = torch.zeros(4, 1, 8, 8); x[:2] = 1
        >>> mixed, perm, lam = mix_batch(x, 0.0, 1.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
        >>> 0 < lam < 1 and perm.shape == (4,)
        True
    """
    if not (mixup > 0 or cutmix > 0):
        return x, None, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    perm = torch.randperm(x.shape[0], generator=gen, device=gen.device).to(x.device)
    if not use_cutmix:
        return x * lam + x[perm] * (1.0 - lam), perm, lam
    h, w = x.shape[2], x.shape[3]
    cut_h, cut_w = int(round(h * math.sqrt(1.0 - lam))), int(round(w * math.sqrt(1.0 - lam)))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return mixed, perm, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # lam: the share of the image kept
