"""``cxr-train``: fine-tune a backbone on a folder of chest X-rays (NORMAL/, PNEUMONIA/)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

EXAMPLES = """examples:
  cxr-train --backbone resnet50 --data chest_xray/train --out runs/resnet50
  cxr-train --backbone vgg16 --recipe reference --weights imagenet --data DATA --out runs/vgg16-ref
  cxr-train --backbone tiny --data DATA --out runs/smoke --epochs 1 --max-images 64     # smoke run
  cxr-train --backbone mobilenet_v3_large --data DATA --out /tmp/edge --epochs 24 --epochs-per-run 1 --resume
                                                           # one epoch per call, resumed (train/EDGE_ROUND.md)
  torchrun --nproc_per_node 4 -m cxr_train.cli --backbone resnet50 --data DATA --out runs/ddp

recipes:
  reference  frozen ImageNet base, Adam lr 1e-4, 10 epochs, light augmentation (the published recipe)
  finetune   all layers trained: AdamW + warmup/cosine, label smoothing 0.1, class-weighted loss, EMA
             weights, medium augmentation; with pretrained weights the base waits one epoch
             (gradual unfreezing) and learns at 0.1x the head's rate (discriminative rates)

The run folder gets model.safetensors, checkpoint.json (threshold, metrics, hashes), metrics.jsonl,
split.json (the patient-wise split) and last.pt (for --resume). The test split is never read.
"""


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0.0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: a Beta parameter must be 0 (off) or above")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr-train`` argument parser (building it imports no torch).

    Examples:
        >>> build_parser().parse_args(["--backbone", "tiny", "--data", "d", "--out", "o"]).amp
        'auto'
    """
    from .backbones import BACKBONES

    p = argparse.ArgumentParser(
        prog="cxr-train", description="Fine-tune a chest X-ray pneumonia classifier (PyTorch).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, choices=list(BACKBONES))
    p.add_argument("--data", required=True, help="training folder with NORMAL/ and PNEUMONIA/ subfolders")
    p.add_argument("--out", required=True, help="run folder for checkpoint, logs and split manifest")
    p.add_argument("--recipe", default="finetune", choices=["finetune", "reference"])
    p.add_argument("--weights", default="none",
                   help="imagenet (torchvision enum; torch hub cache, else download), auto (imagenet if cached),"
                        " none (random init) or a state dict FILE (default: none)")
    p.add_argument("--epochs", type=int, help="default: 10 (reference) or 30 (finetune)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak learning rate (default: recipe's)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--balance", default="loss", choices=["loss", "sampler", "none"],
                   help="class imbalance: weighted loss, balanced sampler, or none (default: loss)")
    p.add_argument("--augment", choices=["none", "light", "medium", "strong"])
    p.add_argument("--mixup", type=_alpha, default=0.0, metavar="A",
                   help="mixup: blend each batch with a shuffled copy, lam ~ Beta(A, A), the loss mixed alike "
                        "(0 = off, default; 0.2 to 0.4 are usual)")
    p.add_argument("--cutmix", type=_alpha, default=0.0, metavar="A",
                   help="CutMix: paste a box of a shuffled copy, its area ~ Beta(A, A) (0 = off, default; 1.0 is "
                        "usual); with --mixup too, each batch takes one of the two at even odds")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--ema", type=float, help="EMA decay of the weights (0 turns it off)")
    p.add_argument("--patience", type=int, default=0, help="early stop after N epochs without a better val AUC")
    p.add_argument("--threshold-rule", default="balanced", choices=["balanced", "youden"],
                   help="decision threshold stored with the model: balanced = 0.5 (default; the model is trained"
                        " class-balanced), youden = maximise sensitivity + specificity - 1 on validation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-images", type=int, help="class-balanced subset of N images (smoke runs)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for training and validation: auto = the environment variable"
                        " CXR_TRAIN_AMP (on, off or auto) when set, else on for CUDA and for CPUs with"
                        " AVX512-BF16/AMX, else fp32 (default: auto)")
    p.add_argument("--save-dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--time-limit", type=float, help="stop after the epoch that passes this many training seconds")
    p.add_argument("--time-budget", type=float,
                   help="seconds of training: the first epoch is timed and the epoch count (and the LR schedule)"
                        " planned to fit; overrides --epochs")
    p.add_argument("--epochs-per-run", type=int, metavar="N",
                   help="stop after N epochs of this call (the schedule stays that of --epochs); run again with"
                        " --resume to go on: long CPU runs in steps that leave the machine to others between them")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``cxr-train`` with ``argv``; returns the exit status (0, 2 on a clear error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("cxr-train: PyTorch is not installed; install the train extra: pip install 'cxr[train]'", file=sys.stderr)
        return 2
    from .loop import TrainConfig, train
    from .models import WeightsUnavailable

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"amp"}  # every option named as its field
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields},
                      amp={"auto": None, "on": True, "off": False}[args.amp], progress=not args.no_progress)
    try:
        train(cfg, log=lambda *a: print(*a, flush=True))
    except (WeightsUnavailable, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"cxr-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-train: interrupted; continue with --resume (state in {args.out}/last.pt)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
