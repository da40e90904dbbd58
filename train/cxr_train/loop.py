"""The fine-tuning loop: one code path for CPU, one GPU and ``torchrun`` (DDP).

:func:`train` runs the phases in order, each usable and testable alone: ``prepare_data`` ->
``build_state`` -> ``restore`` (``--resume``) -> per epoch :func:`run_epoch`, :func:`evaluate`,
:func:`select_and_save`, :func:`checkpoint_meta`, ``save_last``. See ``docs/training.md``.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from cxr_infer import __version__ as cxr_version
from cxr_infer.metrics import binary_metrics, youden_threshold
from cxr_infer.preprocess import IMAGENET_MEAN, IMAGENET_STD

from . import data as D
from .augment import PRESETS, augment, mix_batch, normalise, to_float
from .checkpoint import atomic_write_text, save_weights
from .config import THRESHOLD_RULES, TrainConfig, resolve_amp
from .distributed import Cluster, start_cluster
from .state import Log, RunState, SplitData, build_state, prepare_data, restore, save_last

#: Ties in validation AUC closer than this are broken by the validation loss.
AUC_TIE = 1e-4


@torch.no_grad()
def predict_proba(model: nn.Module, pixels: torch.Tensor, device: torch.device, batch_size: int = 128,
                  amp: bool = True, channels_last: bool = True) -> np.ndarray:
    """Positive-class probabilities of uint8 NHWC ``pixels`` (eval mode, no augmentation).

    Examples:
        >>> from cxr_train.models import build_model
        >>> predict_proba(build_model("tiny")[0], torch.zeros(2, 32, 32, 3, dtype=torch.uint8),
        ...               torch.device("cpu"), amp=False).shape
        (2,)
    """
    model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        x = normalise(to_float(pixels[start:start + batch_size].to(device, non_blocking=True)))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@dataclass
class EpochResult:
    """What one epoch of training measured (``train_loss`` over every rank's shard)."""

    train_loss: float
    images: int
    seconds: float


def epoch_order(state: RunState, data: SplitData, epoch: int, cluster: Cluster) -> torch.Tensor:
    """This rank's shard of the epoch's seeded order of training images (shuffled or class-balanced)."""
    cfg = state.cfg
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    count = len(data.train_labels)
    if cfg.balance == "sampler":
        weights = (1.0 / data.class_counts)[data.train_labels.cpu().numpy()]
        order = torch.multinomial(torch.tensor(weights), count, replacement=True, generator=generator)
    else:
        order = torch.randperm(count, generator=generator)
    per_rank = count // cluster.world
    return order[cluster.rank::cluster.world][:min(per_rank, state.steps_per_epoch * cfg.batch_size)]


def run_epoch(state: RunState, data: SplitData, epoch: int, cluster: Cluster) -> EpochResult:
    """Train one epoch (0-based ``epoch``); under DDP, then share rank 0's BatchNorm statistics."""
    cfg, model, device = state.cfg, state.model, cluster.device
    state.trained.train()
    if state.frozen_base:
        model.base.eval()
    # gradual unfreezing: a pretrained base waits while the new head learns its first epochs
    base_learns = not (state.pretrained and cfg.recipe == "finetune" and epoch < cfg.unfreeze_epochs)
    augment_generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + epoch)
    mix_rng = np.random.default_rng([cfg.seed, epoch, cluster.rank])  # mixup / CutMix draws, on the host
    order = epoch_order(state, data, epoch, cluster)
    started = time.perf_counter()
    loss_sum, images = 0.0, 0
    bar = None
    if cfg.progress and cluster.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=state.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
    for batch in range(state.steps_per_epoch):
        index = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size].to(data.train_pixels.device)
        x = to_float(data.train_pixels[index].to(device, non_blocking=True))
        x = normalise(augment(x, PRESETS[cfg.augment], augment_generator))
        x, partner, lam = mix_batch(x, cfg.mixup, cfg.cutmix, mix_rng, augment_generator)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.train_labels[index].to(device)
        lr_factor = state.lr_factor(state.step)
        for group_index, group in enumerate(state.optimizer.param_groups):  # group 0 is the head
            frozen = group_index > 0 and not base_learns
            group["lr"] = 0.0 if frozen else cfg.lr * lr_factor * group["lr_mult"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = state.trained(x)
        loss = state.loss_fn(logits.float(), y)
        if partner is not None:  # mixup / CutMix: the two images' labels, weighted by their shares
            loss = lam * loss + (1.0 - lam) * state.loss_fn(logits.float(), y[partner])
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        if state.ema:
            state.ema.update(model)
        state.step += 1
        loss_sum = loss_sum + loss.detach() * len(index)  # stays on the device: no sync per step
        images += len(index)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_sum) / images:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    train_loss = float(loss_sum) / max(images, 1)
    if cluster.world > 1:
        cluster.buffers_from_rank0(model, *([state.ema.model] if state.ema else []))
        total_loss, total_images = cluster.sum_over_ranks([float(loss_sum), float(images)])
        train_loss = total_loss / max(total_images, 1.0)  # the loss over every rank's shard
    if bar:
        bar.close()
    return EpochResult(train_loss, images, seconds)


def evaluate(model: nn.Module, pixels: torch.Tensor, labels: np.ndarray, device: torch.device, *,
             amp: bool = False, batch_size: int = 128, channels_last: bool = True) -> Tuple[np.ndarray, Dict]:
    """Validation probabilities of ``model`` and its metrics at threshold 0.5 (``amp`` and
    ``channels_last`` as the run's, recorded as ``eval_precision`` and ``args.channels_last``)."""
    probs = predict_proba(model, pixels, device, batch_size, amp, channels_last)
    return probs, binary_metrics(labels, probs, 0.5)


def epoch_record(epoch: int, result: EpochResult, metrics: Dict, lr: float, world: int = 1) -> Dict:
    """One line of ``metrics.jsonl`` (``epoch`` is 1-based)."""
    return {
        "epoch": epoch, "train_loss": result.train_loss, "val_loss": metrics["loss"], "val_auc": metrics["auc"],
        "val_accuracy": metrics["accuracy"], "val_sensitivity": metrics["sensitivity"],
        "val_specificity": metrics["specificity"], "val_f1": metrics["f1"], "lr": lr,
        "images_per_s": result.images * world / result.seconds, "epoch_s": result.seconds,
    }


def is_better(record: Dict, best: Optional[Dict]) -> bool:
    """The selection rule: a higher validation AUC; within :data:`AUC_TIE`, a lower validation loss.

    Examples:
        >>> is_better({"val_auc": 0.90, "val_loss": 0.3}, {"val_auc": 0.90005, "val_loss": 0.4})
        True
    """
    if best is None:
        return True
    if record["val_auc"] > best["val_auc"] + AUC_TIE:
        return True
    return abs(record["val_auc"] - best["val_auc"]) <= AUC_TIE and record["val_loss"] < best["val_loss"]


def select_and_save(state: RunState, record: Dict, probs: np.ndarray, labels: np.ndarray, out: Path,
                    improved: Optional[bool] = None, write: bool = True) -> bool:
    """Keep ``record`` as ``state.best`` with its threshold and metrics, and save its weights (``write``),
    when it is better (:func:`is_better`, unless ``improved`` says); returns whether it was kept."""
    cfg = state.cfg
    if improved is None:
        improved = is_better(record, state.best)
    if not improved:
        state.stalled += 1
        return False
    state.stalled = 0
    youden = youden_threshold(labels, probs)
    threshold = youden if cfg.threshold_rule == "youden" else 0.5
    state.best = dict(record, threshold=threshold, youden_threshold=youden,
                      val_at_threshold=binary_metrics(labels, probs, threshold),
                      val_at_05=binary_metrics(labels, probs, 0.5))
    if write:
        fp16 = cfg.save_dtype == "fp16"
        name, other = ("model_fp16.safetensors", "model.safetensors") if fp16 else (
            "model.safetensors", "model_fp16.safetensors")
        save_weights(state.eval_model, out / name, torch.float16 if fp16 else torch.float32)
        # load_checkpoint prefers model.safetensors: never leave an older run's weights beside these
        (out / other).unlink(missing_ok=True)
    return True


def checkpoint_meta(state: RunState, data: SplitData, cluster: Cluster) -> Dict:
    """The ``checkpoint.json`` content after the latest epoch (needs a best epoch)."""
    cfg, best, device = state.cfg, state.best, cluster.device
    selection = "highest validation AUC (ties within 1e-4: lowest validation loss)"
    return {
        "format": "cxr-checkpoint/1", "backbone": cfg.backbone, "recipe": cfg.recipe, "args": asdict(cfg),
        "weights_origin": state.origin, "pretrained": state.pretrained,
        "transform_input": bool(getattr(state.model.base, "transform_input", False)),
        "image_size": cfg.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "labels": list(D.LABELS), "positive_label": D.LABELS[1],
        "threshold": best["threshold"], "threshold_rule": THRESHOLD_RULES[cfg.threshold_rule],
        "youden_threshold": best.get("youden_threshold"),
        "best_epoch": best["epoch"], "val_metrics": best["val_at_threshold"], "val_metrics_at_0.5": best["val_at_05"],
        "eval_precision": "bf16" if cfg.amp else "fp32",
        "selection": selection + (", EMA weights" if state.ema else ""),
        "split_hash": data.manifest["hash"], "split_counts": data.manifest["counts"], "data_hash": data.data_hash,
        "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "max_images": cfg.max_images},
        "history": state.history, "train_seconds": state.train_seconds,
        "images_per_s": float(np.median([record["images_per_s"] for record in state.history])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": cluster.world, "torch": torch.__version__, "cxr_version": cxr_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def planned_epochs(time_budget: float, spent: float, per_epoch: float) -> int:
    """Epochs that fit ``time_budget`` seconds after two epochs took ``spent`` (at least 2).

    Examples:
        >>> planned_epochs(100.0, 25.0, 10.0)
        9
    """
    return max(2, 2 + int((time_budget - spent) / per_epoch))


def train(cfg: TrainConfig, log: Log = print) -> Dict:
    """Run one training; returns the final ``checkpoint.json`` content.

    Examples:
        >>> train(TrainConfig("tiny", "data/train", "runs/tiny", epochs=1, max_images=32))  # doctest: +SKIP
    """
    cluster = start_cluster(cfg.device)
    device = cluster.device
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = replace(cfg, amp=resolve_amp(cfg.amp, device.type))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say: Log = log if cluster.is_main else (lambda *a, **k: None)

    data = prepare_data(cfg, cluster, out, say)
    state = build_state(cfg, cluster, data, say)
    split_hash = data.manifest["hash"]
    meta: Dict = {}
    last_path = out / "last.pt"
    if cfg.resume and last_path.is_file():
        restore(state, last_path, split_hash, device)
        if (out / "checkpoint.json").is_file():  # returned as is when no epoch is left to train
            meta = json.loads((out / "checkpoint.json").read_text())
        say(f"resumed from {last_path} after epoch {state.epochs_done}")
    elif cfg.resume:
        say(f"--resume: no {last_path} yet; starting from epoch 1")
    if cluster.is_main:  # a fresh run starts a fresh log; a resumed one keeps exactly the epochs in last.pt
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))

    first_epoch, seconds_before = state.epochs_done, state.train_seconds
    loop_started = time.perf_counter()
    for epoch in itertools.count(first_epoch):
        cfg = state.cfg  # its epoch count may change (time budget)
        if epoch >= cfg.epochs:
            break
        epoch_started = time.perf_counter()
        result = run_epoch(state, data, epoch, cluster)
        state.train_seconds += result.seconds
        probs, metrics = evaluate(state.eval_model, data.val_pixels, data.val_labels, device, amp=cfg.amp,
                                  batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last)
        record = epoch_record(epoch + 1, result, metrics, cfg.lr * state.lr_factor(max(state.step - 1, 0)),
                              cluster.world)
        state.history.append(record)
        improved = is_better(record, state.best)
        if cluster.world > 1:  # every rank follows rank 0's selection and clock
            flag, state.train_seconds = cluster.from_rank0([float(improved), state.train_seconds])
            improved = bool(flag)
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f},"
            f" AUC {record['val_auc']:.4f}, acc {record['val_accuracy']:.4f}, {record['images_per_s']:.0f} img/s"
            f" ({result.seconds:.1f}s){' *' if improved else ''}")
        if cluster.is_main:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        select_and_save(state, record, probs, data.val_labels, out, improved=improved, write=cluster.is_main)
        state.epochs_done = epoch + 1
        meta = checkpoint_meta(state, data, cluster)
        if cluster.is_main:
            atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=1))
            if cfg.save_last:
                save_last(state, split_hash, last_path, device)
        if cfg.time_budget and epoch == 1 and first_epoch <= 1:
            # The first epoch pays for autotuning and warm-up: plan from the second.
            per_epoch = time.perf_counter() - epoch_started  # training + validation of one epoch
            spent = time.perf_counter() - loop_started + seconds_before
            cfg.epochs = planned_epochs(cfg.time_budget, spent, per_epoch)
            if cluster.world > 1:
                cfg.epochs = int(cluster.from_rank0([float(cfg.epochs)])[0])
            say(f"time budget {cfg.time_budget:.0f}s at {per_epoch:.1f}s per epoch: {cfg.epochs} epochs planned")
        if cfg.epochs_per_run and epoch + 1 - first_epoch >= cfg.epochs_per_run and epoch + 1 < cfg.epochs:
            say(f"stop: {cfg.epochs_per_run} epoch(s) in this call; continue with --resume")
            break
        if cfg.patience and state.stalled >= cfg.patience:
            say(f"early stop: validation AUC did not improve for {cfg.patience} epochs")
            break
        if cfg.time_limit and state.train_seconds >= cfg.time_limit:
            say(f"stop: time limit of {cfg.time_limit:.0f}s reached after epoch {epoch + 1}")
            break
    if cluster.world > 1:
        digests = cluster.replica_digests(state.model, *([state.ema.model] if state.ema else []))
        meta["replica_digests"] = digests
        meta["replicas_identical"] = len(set(digests)) == 1
        if cluster.is_main:
            atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=1))
        state.trained = state.model  # the DDP wrapper holds the process group: let it go first
        cluster.stop()
    best = state.best
    say(f"best epoch {meta.get('best_epoch')}: val AUC {best['val_auc']:.4f}, threshold {best['threshold']:.3f}"
        f" -> {out}")
    return meta
