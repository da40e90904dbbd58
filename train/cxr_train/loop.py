"""The fine-tuning loop: one code path for CPU, one GPU and ``torchrun`` (DDP).

The decoded dataset lives in memory on the training device as uint8 (on a GPU the
5,216 training images take about 0.8 GB); augmentation runs there too, so no loader
process is ever the bottleneck.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_infer import __version__ as cxr_version
from cxr_infer.metrics import binary_metrics, youden_threshold
from cxr_infer.preprocess import IMAGENET_MEAN, IMAGENET_STD

from . import data as D
from .augment import PRESETS, augment, normalise, to_float
from .checkpoint import atomic_write_text, save_weights
from .models import build_model

RECIPES = ("finetune", "reference")
THRESHOLD_RULES = {
    # With a class-weighted loss (or a balanced sampler) the model is trained for balanced classes,
    # so 0.5 is its balanced-error decision point. Youden's J on a small, in-distribution validation
    # split picks extreme thresholds (0.07 on the first GPU runs) that did not carry over to shifted data.
    "balanced": "0.5: the balanced decision point of a class-balanced model (Youden's J on validation recorded too)",
    "youden": "Youden's J (sensitivity + specificity - 1) on validation",
}


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
    resume: bool = False
    save_last: bool = True
    threshold_rule: str = "balanced"
    workers: int = 0
    progress: bool = True
    eval_batch_size: int = 128

    def resolved(self, pretrained: bool) -> "TrainConfig":
        """Fill the recipe's defaults for every knob left as ``None``."""
        c = copy.copy(self)
        if c.recipe == "reference":
            c.epochs = c.epochs or 10
            c.lr = c.lr or 1e-4
            c.label_smoothing = 0.0 if c.label_smoothing is None else c.label_smoothing
            c.augment = c.augment or "light"
            c.ema = 0.0 if c.ema is None else c.ema
        elif c.recipe == "finetune":
            c.epochs = c.epochs or 30
            c.lr = c.lr or (3e-4 if pretrained else 2e-3)
            c.label_smoothing = 0.1 if c.label_smoothing is None else c.label_smoothing
            c.augment = c.augment or "medium"
            c.ema = 0.998 if c.ema is None else c.ema
        else:
            raise ValueError(f"unknown recipe {c.recipe!r}; choose one of {', '.join(RECIPES)}")
        if c.augment not in PRESETS:
            raise ValueError(f"unknown augmentation {c.augment!r}; choose one of {', '.join(PRESETS)}")
        if c.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}")
        if c.balance not in ("loss", "sampler", "none"):
            raise ValueError("balance must be one of loss, sampler, none")
        return c


class EMA:
    """Exponential moving average of a model's floating weights and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        mine = self.model.state_dict()
        fl = [k for k, v in mine.items() if v.is_floating_point()]
        torch._foreach_lerp_([mine[k] for k in fl], [src[k].detach() for k in fl], 1 - d)
        for k, v in mine.items():
            if not v.is_floating_point():
                v.copy_(src[k])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast is emulated and, measured on an AVX2-only EPYC here,
    about 10x slower than fp32 for ResNet50 training.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


@torch.no_grad()
def predict_proba(model: nn.Module, pixels: torch.Tensor, device: torch.device, batch_size: int = 128,
                  amp: bool = True, channels_last: bool = True) -> np.ndarray:
    """Positive-class probabilities of uint8 NHWC ``pixels`` (eval mode, no augmentation)."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = normalise(to_float(pixels[i:i + batch_size].to(device, non_blocking=True)))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _param_digest(*models: nn.Module) -> str:
    """SHA-256 over the weights and buffers of ``models`` (the trained model and its EMA)."""
    h = hashlib.sha256()
    for model in models:
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _from_rank0(values: List[float], device: torch.device) -> List[float]:
    """Rank 0's numbers on every rank (DDP): decisions that depend on timing or on evaluation
    must agree, or one rank leaves the loop while the others wait in an all-reduce forever."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return t.tolist()


def _buffers_from_rank0(*models: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank (DDP).

    DDP keeps the parameters identical, but each rank updates its BatchNorm statistics with
    its own shard during a step (DDP re-broadcasts them only at the next forward), and an
    EMA averages those local statistics: without this the replicas drift apart.
    """
    import torch.distributed as dist

    for model in models:
        for b in model.buffers():
            dist.broadcast(b, 0)


def train(cfg: TrainConfig, log=print) -> Dict:
    """Run one training; returns the final ``checkpoint.json`` content.

    Example:
        >>> train(TrainConfig("tiny", "data/train", "runs/tiny", epochs=1, max_images=32))  # doctest: +SKIP
    """
    world, rank, local_rank = _dist_info()
    is_main = rank == 0
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.amp is None:
        cfg = copy.copy(cfg)
        cfg.amp = device.type == "cuda" or cpu_has_fast_bf16()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = log if is_main else (lambda *a, **k: None)

    # ---- data: split by patient, decode through the runtime's preprocessing
    samples = D.subsample(D.scan_folder(cfg.data), cfg.max_images, cfg.seed)
    tr, va = D.split_by_patient(samples, cfg.val_fraction, cfg.seed)
    if not tr or not va:
        raise ValueError(f"split gave {len(tr)} training and {len(va)} validation images; use more images")
    man = D.manifest(tr, va, cfg.data, cfg.seed, cfg.val_fraction)
    if is_main:
        atomic_write_text(out / "split.json", json.dumps(man, indent=1))
    data_hash = D.files_hash([s.path for s in tr + va])
    t0 = time.perf_counter()
    x_tr = torch.from_numpy(D.decode_all(tr, cfg.image_size, cfg.workers, progress=cfg.progress and is_main))
    x_va = torch.from_numpy(D.decode_all(va, cfg.image_size, cfg.workers, progress=cfg.progress and is_main))
    y_tr = torch.tensor([s.label for s in tr], dtype=torch.long)
    y_va = np.array([s.label for s in va])
    if device.type == "cuda":
        x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    say(f"data: {len(tr)} train / {len(va)} val images ({man['counts']}), decoded in {time.perf_counter() - t0:.1f}s;"
        f" split {man['hash'][:12]}, data {data_hash[:12]}")

    # ---- model, optimiser, schedule
    model, origin = build_model(cfg.backbone, cfg.weights, cfg.dropout)
    pretrained = not origin.startswith("random")
    c = cfg.resolved(pretrained)
    say(f"model: {c.backbone}, weights: {origin}; recipe {c.recipe}: epochs {c.epochs}, lr {c.lr}, batch {c.batch_size}"
        f" x {world}, augment {c.augment}, balance {c.balance}, ema {c.ema}, device {device}, bf16 {c.amp}")
    model.to(device)
    if c.channels_last:
        model.to(memory_format=torch.channels_last)
    frozen_base = c.recipe == "reference"
    if frozen_base:
        for p in model.base.parameters():
            p.requires_grad_(False)
    base_params = [p for p in model.base.parameters() if p.requires_grad]
    head_params = list(model.head.parameters())
    groups = [{"params": head_params, "lr_mult": 1.0}]
    if base_params:
        groups.append({"params": base_params, "lr_mult": c.base_lr_mult if pretrained else 1.0})
    if c.recipe == "reference":
        opt = torch.optim.Adam(groups, lr=c.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
    per_rank = len(tr) // world
    steps_per_epoch = max(1, per_rank // c.batch_size)
    total_steps = steps_per_epoch * c.epochs
    warmup = int(c.warmup_epochs * steps_per_epoch) if c.recipe == "finetune" else 0
    schedule = _lr_lambda(total_steps, warmup) if c.recipe == "finetune" else (lambda s: 1.0)
    counts = np.bincount([s.label for s in tr], minlength=2).astype(np.float64)
    class_w = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=class_w if c.balance == "loss" else None, label_smoothing=c.label_smoothing)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = EMA(model, c.ema) if c.ema else None

    start_epoch, step, best, history = 0, 0, None, []
    meta: Dict = {}
    t_train = 0.0
    stalled = 0
    last_path = out / "last.pt"
    if c.resume and last_path.is_file():
        st = torch.load(last_path, map_location=device, weights_only=True)
        if st.get("split_hash", man["hash"]) != man["hash"]:
            raise ValueError(f"--resume: {last_path} was trained on another split (different --data, --max-images,"
                             " --seed or --val-fraction); resume with the same arguments or use a new --out")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if ema and st.get("ema") is not None:
            ema.model.load_state_dict(st["ema"])
            ema.updates = st["ema_updates"]
        start_epoch, step, history = st["epoch"] + 1, st["step"], json.loads(st["history"])
        best = json.loads(st["best"]) if st["best"] else None
        if st.get("rng") is not None:  # dropout masks continue as if never interrupted
            torch.set_rng_state(st["rng"].cpu())
        if st.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"].cpu(), device)
        if c.time_budget and st.get("epochs") and start_epoch >= 2:  # the epochs planned before the interruption
            c.epochs = int(st["epochs"])
            total_steps = steps_per_epoch * c.epochs
            schedule = _lr_lambda(total_steps, warmup)
        t_train = float(sum(h["epoch_s"] for h in history))
        stalled = history[-1]["epoch"] - best["epoch"] if history and best else 0
        if (out / "checkpoint.json").is_file():
            meta = json.loads((out / "checkpoint.json").read_text())
        say(f"resumed from {last_path} after epoch {start_epoch}")
    elif c.resume:
        say(f"--resume: no {last_path} yet; starting from epoch 1")
    if is_main:  # a fresh run starts a fresh log; a resumed one keeps exactly the epochs in last.pt
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    t_before = t_train
    t_loop = time.perf_counter()
    for epoch in itertools.count(start_epoch):
        if epoch >= c.epochs:
            break
        ddp_model.train()
        if frozen_base:
            model.base.eval()
        unfreeze = not (pretrained and c.recipe == "finetune" and epoch < c.unfreeze_epochs)
        gen = torch.Generator(device=device).manual_seed(c.seed * 1000 + epoch)
        cpu_gen = torch.Generator().manual_seed(c.seed * 1000 + epoch)
        if c.balance == "sampler":
            w = (1.0 / counts)[y_tr.cpu().numpy()]
            order = torch.multinomial(torch.tensor(w), len(tr), replacement=True, generator=cpu_gen)
        else:
            order = torch.randperm(len(tr), generator=cpu_gen)
        order = order[rank::world][:min(per_rank, steps_per_epoch * c.batch_size)]
        t_ep = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = None
        if c.progress and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", leave=False)
        for b in range(steps_per_epoch):
            idx = order[b * c.batch_size:(b + 1) * c.batch_size]
            idx_dev = idx.to(x_tr.device)
            x = to_float(x_tr[idx_dev].to(device, non_blocking=True))
            x = normalise(augment(x, PRESETS[c.augment], gen))
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_tr[idx_dev].to(device)
            mult = schedule(step)
            for gi, g in enumerate(opt.param_groups):  # group 0 is the head; the base waits while frozen
                g["lr"] = 0.0 if (gi > 0 and not unfreeze) else c.lr * mult * g["lr_mult"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.amp):
                logits = ddp_model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema:
                ema.update(model)
            step += 1
            loss_sum = loss_sum + loss.detach() * len(idx)  # stays on the device: no sync per step
            seen += len(idx)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t_ep
        t_train += dt
        train_loss = float(loss_sum) / max(seen, 1)
        if world > 1:
            import torch.distributed as dist

            _buffers_from_rank0(model, *([ema.model] if ema else []))
            tot = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64, device=device)
            dist.all_reduce(tot)  # the loss over every rank's shard, not rank 0's alone
            train_loss = float(tot[0]) / max(float(tot[1]), 1.0)
        if bar:
            bar.close()
        eval_model = ema.model if ema else model
        probs = predict_proba(eval_model, x_va, device, c.eval_batch_size, c.amp, c.channels_last)
        m05 = binary_metrics(y_va, probs, 0.5)
        rec = {
            "epoch": epoch + 1, "train_loss": train_loss, "val_loss": m05["loss"], "val_auc": m05["auc"],
            "val_accuracy": m05["accuracy"], "val_sensitivity": m05["sensitivity"], "val_specificity": m05["specificity"],
            "val_f1": m05["f1"], "lr": c.lr * schedule(max(step - 1, 0)), "images_per_s": seen * world / dt,
            "epoch_s": dt,
        }
        history.append(rec)
        improved = best is None or rec["val_auc"] > best["val_auc"] + 1e-4 or (
            abs(rec["val_auc"] - best["val_auc"]) <= 1e-4 and rec["val_loss"] < best["val_loss"])
        if world > 1:  # every rank follows rank 0's selection and clock
            flag, t_train = _from_rank0([float(improved), t_train], device)
            improved = bool(flag)
        say(f"epoch {epoch + 1}/{c.epochs}: train loss {rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f},"
            f" AUC {rec['val_auc']:.4f}, acc {rec['val_accuracy']:.4f}, {rec['images_per_s']:.0f} img/s"
            f" ({dt:.1f}s){' *' if improved else ''}")
        if is_main:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if improved:
            stalled = 0
            youden = youden_threshold(y_va, probs)
            thr = youden if c.threshold_rule == "youden" else 0.5
            best = dict(rec, threshold=thr, youden_threshold=youden,
                        val_at_threshold=binary_metrics(y_va, probs, thr), val_at_05=m05)
            if is_main:
                dtype = torch.float16 if c.save_dtype == "fp16" else torch.float32
                name, other = (("model_fp16.safetensors", "model.safetensors") if c.save_dtype == "fp16"
                               else ("model.safetensors", "model_fp16.safetensors"))
                save_weights(eval_model, out / name, dtype)
                # load_checkpoint prefers model.safetensors: never leave an older run's weights beside these
                (out / other).unlink(missing_ok=True)
        else:
            stalled += 1
        meta = {
            "format": "cxr-checkpoint/1", "backbone": c.backbone, "recipe": c.recipe, "args": asdict(c),
            "weights_origin": origin, "pretrained": pretrained,
            "transform_input": bool(getattr(model.base, "transform_input", False)),
            "image_size": c.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "labels": list(D.LABELS), "positive_label": D.LABELS[1],
            "threshold": best["threshold"], "threshold_rule": THRESHOLD_RULES[c.threshold_rule],
            "youden_threshold": best.get("youden_threshold"),
            "best_epoch": best["epoch"], "val_metrics": best["val_at_threshold"], "val_metrics_at_0.5": best["val_at_05"],
            "selection": "highest validation AUC (ties within 1e-4: lowest validation loss), EMA weights" if ema else
                         "highest validation AUC (ties within 1e-4: lowest validation loss)",
            "split_hash": man["hash"], "split_counts": man["counts"], "data_hash": data_hash, "history": history,
            "train_seconds": t_train, "images_per_s": float(np.median([h["images_per_s"] for h in history])),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world, "torch": torch.__version__, "cxr_version": cxr_version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if is_main:
            atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=1))
        if is_main and c.save_last:
            st = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.model.state_dict() if ema else None,
                  "ema_updates": ema.updates if ema else 0, "epoch": epoch, "step": step, "epochs": c.epochs,
                  "history": json.dumps(history), "best": json.dumps(best), "split_hash": man["hash"],
                  "rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            torch.save(st, out / "last.pt.tmp")
            os.replace(out / "last.pt.tmp", last_path)
        if c.time_budget and epoch == 1 and start_epoch <= 1:
            # The first epoch pays for autotuning and warm-up: plan from the second.
            per_epoch = time.perf_counter() - t_ep  # training + validation of one epoch
            spent = time.perf_counter() - t_loop + t_before
            c.epochs = max(2, 2 + int((c.time_budget - spent) / per_epoch))
            if world > 1:
                c.epochs = int(_from_rank0([float(c.epochs)], device)[0])
            total_steps = steps_per_epoch * c.epochs
            schedule = _lr_lambda(total_steps, warmup)
            say(f"time budget {c.time_budget:.0f}s at {per_epoch:.1f}s per epoch: {c.epochs} epochs planned")
        if c.patience and stalled >= c.patience:
            say(f"early stop: validation AUC did not improve for {c.patience} epochs")
            break
        if c.time_limit and t_train >= c.time_limit:
            say(f"stop: time limit of {c.time_limit:.0f}s reached after epoch {epoch + 1}")
            break
    if world > 1:
        import torch.distributed as dist

        digest = _param_digest(model, *([ema.model] if ema else []))
        gathered: List[Optional[str]] = [None] * world
        dist.all_gather_object(gathered, digest)
        meta["replica_digests"] = gathered
        meta["replicas_identical"] = len(set(gathered)) == 1
        if is_main:
            atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=1))
        dist.barrier()
        dist.destroy_process_group()
    say(f"best epoch {meta.get('best_epoch')}: val AUC {best['val_auc']:.4f}, threshold {best['threshold']:.3f}"
        f" -> {out}")
    return meta
