"""``python -m cxr_export.domain``: add (or refresh) the image check in existing model files, fitted
and calibrated on the run's split through each file (:func:`cxr_export.domain.fit.add_domain_stats`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Tuple

from .fit import DEFAULT_FIT_COUNT, DEFAULT_FLAG_RATE, DEFAULT_STAGE_RANK, add_domain_stats, load_sets
from .stages import DEFAULT_STAGE_TALL_ROWS
from .stats import DEFAULT_RANK


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(prog="python -m cxr_export.domain",
                                description="Add (or refresh) out-of-domain statistics in existing cxr model files.",
                                epilog="example: python -m cxr_export.domain runs/vgg16 "
                                       "models/vgg16_int8.onnx --data chest_xray/train")
    p.add_argument("checkpoint", help="the cxr-train run folder of the model (its split.json says train / val)")
    p.add_argument("models", nargs="+", help="model file(s) of that run, updated in place unless --out")
    p.add_argument("--data", required=True, help="the training folder the checkpoint was trained on")
    p.add_argument("--out", help="write here instead of in place (one model only)")
    p.add_argument("--fit-count", type=int, default=DEFAULT_FIT_COUNT,
                   help="train images, class-balanced (default 1500)")
    p.add_argument("--val-count", type=int, default=0, help="val images for the threshold (default 0 = all)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help="eigenvectors kept exactly (default 256)")
    p.add_argument("--stage-rank", type=int, default=DEFAULT_STAGE_RANK,
                   help=f"the same for the stage branches (default {DEFAULT_STAGE_RANK})")
    p.add_argument("--flag-rate", type=float, default=DEFAULT_FLAG_RATE,
                   help="share of in-domain (val) images flagged (default 0.05)")
    p.add_argument("--taps", default=None, metavar="T1,T2|none",
                   help="graph tensors that get a stage branch, comma-separated; 'none' for no stage branches "
                        "(default: the domain_taps of the spec's backbone in cxr_train.backbones)")
    p.add_argument("--features-branch", action=argparse.BooleanOptionalAction, default=None,
                   help="a branch on the pooled features too (default: only when the file gets no stage branches)")
    p.add_argument("--stage-tall-rows", type=int, default=DEFAULT_STAGE_TALL_ROWS, metavar="R",
                   help="read a stage tensor taller than R rows on every second row "
                        f"(default {DEFAULT_STAGE_TALL_ROWS}; 0 = every row of every tensor)")
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit status."""
    from ..modelio import read_spec

    p = build_parser()
    args = p.parse_args(argv)
    if args.stage_tall_rows < 0:
        p.error("--stage-tall-rows must be 0 (every row) or a positive row count")
    taps = None if args.taps is None else [t for t in args.taps.split(",") if t and args.taps != "none"]
    if args.out and len(args.models) > 1:
        p.error("--out takes one model")
    sets: Dict[Tuple[int, int], Any] = {}
    for path in args.models:
        size = read_spec(path).image_size
        if size not in sets:
            sets[size] = load_sets(args.checkpoint, args.data, size, args.fit_count, args.val_count or None)
        tr_px, tr_y, va_px = sets[size]
        block = add_domain_stats(path, tr_px, tr_y, va_px, args.out, args.rank, args.flag_rate, args.threads,
                                 source=str(args.data), taps=taps, features_branch=args.features_branch,
                                 stage_rank=args.stage_rank, stage_tall_rows=args.stage_tall_rows)
        print(f"{args.out or path}: domain threshold {block['threshold']:.4g} (val flag rate "
              f"{block['flag_rate_validation']:.3f}), {block['fit']['images']} train images, rank {block['rank']}, "
              f"shrinkage {block['shrinkage']:.3f}, {len(block['branches'])} branches, {block['seconds']}s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
