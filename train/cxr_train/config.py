"""What a training run is asked to do: :class:`TrainConfig`, its recipes (``docs/training.md``), and
the bf16 decision.

Examples:
    >>> cfg = TrainConfig("tiny", "data/train", "runs/tiny").resolved(pretrained=False)
    >>> cfg.epochs, cfg.lr, cfg.augment
    (30, 0.002, 'medium')
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .augment import PRESETS

RECIPES = ("finetune", "reference")
BALANCE = ("loss", "sampler", "none")
THRESHOLD_RULES = {
    # A class-balanced model's balanced-error point is 0.5; Youden's J on a small, in-distribution
    # validation split can pick extreme thresholds that do not carry over to shifted data.
    "balanced": "0.5: the balanced decision point of a class-balanced model (Youden's J on validation recorded too)",
    "youden": "Youden's J (sensitivity + specificity - 1) on validation",
}
#: Values of the ``CXR_TRAIN_AMP`` environment variable, read when a run leaves ``amp`` unset.
AMP_ENV = "CXR_TRAIN_AMP"
AMP_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Every knob of a run; stored in ``checkpoint.json`` as ``args``."""

    backbone: str
    data: str
    out: str
    recipe: str = "finetune"
    weights: str = "none"
    epochs: Optional[int] = None
    batch_size: int = 32
    lr: Optional[float] = None
    weight_decay: float = 0.05
    label_smoothing: Optional[float] = None
    balance: str = "loss"
    augment: Optional[str] = None
    mixup: float = 0.0   # Beta(a, a) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(a, a) of CutMix; 0 = off; with both on, each batch takes one at even odds
    dropout: float = 0.3
    ema: Optional[float] = None
    warmup_epochs: float = 1.0
    unfreeze_epochs: int = 1
    base_lr_mult: float = 0.1
    patience: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    max_images: Optional[int] = None
    image_size: int = 224
    amp: Optional[bool] = None
    channels_last: bool = True
    save_dtype: str = "fp32"
    time_limit: Optional[float] = None
    time_budget: Optional[float] = None
    epochs_per_run: Optional[int] = None  # stop after this many epochs of this call; --resume goes on
    resume: bool = False
    save_last: bool = True
    threshold_rule: str = "balanced"
    workers: int = 0
    progress: bool = True
    eval_batch_size: int = 128

    def resolved(self, pretrained: bool) -> "TrainConfig":
        """A copy with the recipe's defaults filled in for every knob left as ``None``.

        Examples:
            >>> TrainConfig("tiny", "d", "o", recipe="reference").resolved(pretrained=True).lr
            0.0001
        """
        cfg = copy.copy(self)
        if cfg.recipe == "reference":
            cfg.epochs = cfg.epochs or 10
            cfg.lr = cfg.lr or 1e-4
            cfg.label_smoothing = 0.0 if cfg.label_smoothing is None else cfg.label_smoothing
            cfg.augment = cfg.augment or "light"
            cfg.ema = 0.0 if cfg.ema is None else cfg.ema
        elif cfg.recipe == "finetune":
            cfg.epochs = cfg.epochs or 30
            cfg.lr = cfg.lr or (3e-4 if pretrained else 2e-3)
            cfg.label_smoothing = 0.1 if cfg.label_smoothing is None else cfg.label_smoothing
            cfg.augment = cfg.augment or "medium"
            cfg.ema = 0.998 if cfg.ema is None else cfg.ema
        else:
            raise ValueError(f"unknown recipe {cfg.recipe!r}; choose one of {', '.join(RECIPES)}")
        if cfg.augment not in PRESETS:
            raise ValueError(f"unknown augmentation {cfg.augment!r}; choose one of {', '.join(PRESETS)}")
        if cfg.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}")
        if cfg.balance not in BALANCE:
            raise ValueError(f"balance must be one of {', '.join(BALANCE)}")
        return cfg


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); without them bf16
    autocast is emulated, about 10x slower than fp32 for ResNet50 training on an AVX2-only CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: Optional[bool], device_type: str) -> bool:
    """Whether a run uses bf16 autocast: ``amp`` when set; else ``CXR_TRAIN_AMP`` (``on``/``off``)
    when set; else on for CUDA and for CPUs with native bf16.

    Examples:
        >>> resolve_amp(False, "cuda"), resolve_amp(True, "cpu")
        (False, True)
    """
    if amp is not None:
        return bool(amp)
    choice = os.environ.get(AMP_ENV, "").strip().lower() or "auto"
    if choice not in AMP_CHOICES:
        raise ValueError(f"{AMP_ENV}={os.environ[AMP_ENV]!r}: use one of {', '.join(AMP_CHOICES)}")
    if choice != "auto":
        return choice == "on"
    return device_type == "cuda" or cpu_has_fast_bf16()
