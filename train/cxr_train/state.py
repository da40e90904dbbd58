"""A run's state: the decoded split, the model with its optimiser and EMA, and ``last.pt``.

:func:`prepare_data` and :func:`build_state` make what :func:`cxr_train.loop.train` trains;
:func:`save_last` and :func:`restore` carry it across an interruption (``--resume``). The decoded
images stay on the training device as uint8, so no loader process is ever the bottleneck.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import data as D
from .checkpoint import atomic_write_text
from .config import TrainConfig
from .distributed import Cluster
from .models import CXRNet, build_model

Log = Callable[..., None]


class EMA:
    """Exponential moving average of a model's floating weights and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (a lower decay for the first updates)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        mine = self.model.state_dict()
        floating = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in floating], [source[k].detach() for k in floating], 1 - decay)
        for key, value in mine.items():
            if not value.is_floating_point():
                value.copy_(source[key])


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup_steps``, then a cosine to 0 at ``total_steps``.

    Examples:
        >>> warmup_cosine(0, 100, 10), warmup_cosine(10, 100, 10), warmup_cosine(100, 100, 10)
        (0.1, 1.0, 0.0)
    """
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class SplitData:
    """The patient-wise split, decoded: uint8 NHWC pixels (training pixels on the training device)."""

    train_pixels: torch.Tensor
    train_labels: torch.Tensor
    val_pixels: torch.Tensor
    val_labels: np.ndarray
    manifest: Dict
    data_hash: str

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class, as float64 ``[normal, pneumonia]``."""
        return np.bincount(self.train_labels.cpu().numpy(), minlength=2).astype(np.float64)


def prepare_data(cfg: TrainConfig, cluster: Cluster, out: Path, say: Log = print) -> SplitData:
    """Split ``cfg.data`` by patient, write ``split.json`` (rank 0), decode both parts with the runtime."""
    train_set, val_set = D.make_split(cfg.data, cfg.seed, cfg.val_fraction, cfg.max_images)
    if not train_set or not val_set:
        raise ValueError(f"split gave {len(train_set)} training and {len(val_set)} validation images;"
                         " use more images")
    manifest = D.manifest(train_set, val_set, cfg.data, cfg.seed, cfg.val_fraction)
    if cluster.is_main:
        atomic_write_text(out / "split.json", json.dumps(manifest, indent=1))
    data_hash = D.files_hash([s.path for s in train_set + val_set])
    started = time.perf_counter()
    progress = cfg.progress and cluster.is_main
    train_pixels = torch.from_numpy(D.decode_all(train_set, cfg.image_size, cfg.workers, progress=progress))
    val_pixels = torch.from_numpy(D.decode_all(val_set, cfg.image_size, cfg.workers, progress=progress))
    train_labels = torch.tensor([s.label for s in train_set], dtype=torch.long)
    if cluster.device.type == "cuda":
        train_pixels, train_labels = train_pixels.to(cluster.device), train_labels.to(cluster.device)
    say(f"data: {len(train_set)} train / {len(val_set)} val images ({manifest['counts']}), decoded in"
        f" {time.perf_counter() - started:.1f}s; split {manifest['hash'][:12]}, data {data_hash[:12]}")
    return SplitData(train_pixels, train_labels, val_pixels, np.array([s.label for s in val_set]), manifest, data_hash)


@dataclass
class RunState:
    """The model being trained and everything that changes while it trains (saved in ``last.pt``).

    ``cfg`` is resolved; ``trained`` takes the optimiser steps (``model`` or its DDP wrapper);
    ``best`` is the best epoch's record with its threshold and validation metrics.
    """

    cfg: TrainConfig
    model: CXRNet
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    origin: str
    steps_per_epoch: int
    trained: Optional[nn.Module] = None
    ema: Optional[EMA] = None
    epochs_done: int = 0
    step: int = 0
    history: List[Dict] = field(default_factory=list)
    best: Optional[Dict] = None
    stalled: int = 0
    train_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = self.model

    @property
    def pretrained(self) -> bool:
        return not self.origin.startswith("random")

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when there is one."""
        return self.ema.model if self.ema else self.model

    @property
    def frozen_base(self) -> bool:
        """The reference recipe trains the head alone."""
        return self.cfg.recipe == "reference"

    @property
    def warmup_steps(self) -> int:
        return int(self.cfg.warmup_epochs * self.steps_per_epoch) if self.cfg.recipe == "finetune" else 0

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step``: warmup + cosine (finetune), constant (reference)."""
        if self.cfg.recipe != "finetune":
            return 1.0
        return warmup_cosine(step, self.steps_per_epoch * self.cfg.epochs, self.warmup_steps)


def build_state(cfg: TrainConfig, cluster: Cluster, data: SplitData, say: Log = print) -> RunState:
    """The model, the resolved recipe, the optimiser (head and base groups), the loss, DDP and the EMA."""
    device, world = cluster.device, cluster.world
    model, origin = build_model(cfg.backbone, cfg.weights, cfg.dropout)
    pretrained = not origin.startswith("random")
    cfg = cfg.resolved(pretrained)
    say(f"model: {cfg.backbone}, weights: {origin}; recipe {cfg.recipe}: epochs {cfg.epochs}, lr {cfg.lr},"
        f" batch {cfg.batch_size} x {world}, augment {cfg.augment}"
        + (f", mixup {cfg.mixup:g}" if cfg.mixup else "") + (f", cutmix {cfg.cutmix:g}" if cfg.cutmix else "")
        + f", balance {cfg.balance}, ema {cfg.ema}, device {device}, bf16 {cfg.amp}")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.recipe == "reference":
        model.base.requires_grad_(False)
    base_params = [p for p in model.base.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()), "lr_mult": 1.0}]
    if base_params:
        groups.append({"params": base_params, "lr_mult": cfg.base_lr_mult if pretrained else 1.0})
    if cfg.recipe == "reference":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(data.train_labels) // world // cfg.batch_size)
    counts = data.class_counts
    class_weights = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights if cfg.balance == "loss" else None,
                                  label_smoothing=cfg.label_smoothing)
    trained: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = EMA(model, cfg.ema) if cfg.ema else None  # after DDP: every rank averages rank 0's start
    return RunState(cfg, model, optimizer, loss_fn, origin, steps_per_epoch, trained=trained, ema=ema)


def restore(state: RunState, last_path: Path, split_hash: str, device: torch.device) -> None:
    """Continue ``state`` from ``last.pt`` (weights, optimiser, EMA, counters, history, RNG) as if the
    run was never interrupted; ``ValueError`` when ``last.pt`` was trained on another split."""
    saved = torch.load(last_path, map_location=device, weights_only=True)
    if saved.get("split_hash", split_hash) != split_hash:
        raise ValueError(f"--resume: {last_path} was trained on another split (different --data, --max-images,"
                         " --seed or --val-fraction); resume with the same arguments or use a new --out")
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["opt"])
    if state.ema and saved.get("ema") is not None:
        state.ema.model.load_state_dict(saved["ema"])
        state.ema.updates = saved["ema_updates"]
    state.epochs_done, state.step = saved["epoch"] + 1, saved["step"]
    state.history = json.loads(saved["history"])
    state.best = json.loads(saved["best"]) if saved["best"] else None
    if saved.get("rng") is not None:
        torch.set_rng_state(saved["rng"].cpu())
    if saved.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
    if state.cfg.time_budget and saved.get("epochs") and state.epochs_done >= 2:
        state.cfg.epochs = int(saved["epochs"])  # the epochs planned before the interruption
    state.train_seconds = float(sum(record["epoch_s"] for record in state.history))
    state.stalled = state.history[-1]["epoch"] - state.best["epoch"] if state.history and state.best else 0


def save_last(state: RunState, split_hash: str, path: Path, device: torch.device) -> None:
    """Write ``last.pt`` (what :func:`restore` reads) atomically, after ``state.epochs_done`` epochs."""
    ema = state.ema
    saved = {"model": state.model.state_dict(), "opt": state.optimizer.state_dict(),
             "ema": ema.model.state_dict() if ema else None, "ema_updates": ema.updates if ema else 0,
             "epoch": state.epochs_done - 1, "step": state.step, "epochs": state.cfg.epochs,
             "history": json.dumps(state.history), "best": json.dumps(state.best), "split_hash": split_hash,
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
