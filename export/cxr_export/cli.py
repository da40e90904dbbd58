"""``cxr-export``: a cxr-train checkpoint -> ONNX FP32, calibrated INT8 and FP16 model files."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .intended import add_arguments, block_from_args

EXAMPLES = """examples:
  cxr-export runs/resnet50 --out models/resnet50.onnx
  cxr-export runs/resnet50 --out models/resnet50.onnx --int8 --calibration chest_xray/train
  cxr-export runs/resnet50 --out m.onnx --int8 --calibration DATA --calibration-method percentile \\
      --exclude-nodes /m/head/head.3/Gemm --max-drop 0.5
  cxr-export runs/resnet50 --out m.onnx --fp16 --triton triton_repo

Files written: OUT (FP32), OUT's stem + _int8.onnx with --int8, + _fp16.onnx with --fp16. Each carries
its cxr.spec (threshold, training metrics, data hash, parity and gate figures, intended use), the
image check (domain_score; when the training folder is known) and a Grad-CAM heatmap output. When
the training folder is known, each file then gets its operating points and a temperature fitted on
its validation images (moving the threshold so no label changes; --no-temperature leaves it out).
Exit status 3: a file was refused (INT8 past --max-drop, FP16 without probabilities), unless --force.

The same for an existing file:
  python -m cxr_export.domain RUN_DIR MODEL.onnx --data TRAIN_DIR
  python -m cxr_export.heatmap MODEL.onnx
  python -m cxr_export.intended MODEL.onnx [--intended-* ...]
  python -m cxr_export.calibrate MODEL.onnx --data TRAIN_DIR

Details: docs/export.md
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-export", description="Export a trained cxr checkpoint to ONNX.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="cxr-train run folder (checkpoint.json + model weights) or its weights file")
    p.add_argument("--out", required=True, help="FP32 model file to write (e.g. models/resnet50.onnx)")
    from .precisions import PRECISIONS
    from .quantize import ACTIVATIONS, METHODS

    for precision in PRECISIONS.values():  # --int8, --fp16, ...: one flag per registered precision
        p.add_argument(f"--{precision.name}", action="store_true", help=f"also write {precision.description}")
    p.add_argument("--calibration", help="training data folder (NORMAL/, PNEUMONIA/); required by --int8")
    p.add_argument("--calibration-count", type=int, default=300, help="class-balanced calibration images (default 300)")
    p.add_argument("--calibration-method", default="minmax", choices=METHODS)
    p.add_argument("--activations", default="u8", choices=ACTIVATIONS, help="activation type (default u8: fastest)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    p.add_argument("--full-range", action="store_true",
                   help="8-bit weight range instead of 7-bit (off: u8 x s8 products saturate on CPUs without VNNI)")
    p.add_argument("--exclude-nodes", nargs="*", default=[], help="node names kept in FP32")
    p.add_argument("--gate-count", type=int, default=0, help="validation images for the gate (default 0 = all)")
    p.add_argument("--max-drop", type=float, default=1.0, help="max INT8 accuracy drop in points (default 1.0)")
    p.add_argument("--force", action="store_true", help="write a refused file anyway (an INT8 file past --max-drop, "
                   "an FP16 file whose probabilities are inf or NaN)")
    p.add_argument("--parity-count", type=int, default=32, help="validation images for the PyTorch parity check")
    p.add_argument("--threshold", default="checkpoint", help="decision threshold stored in the spec: 'checkpoint' "
                   "(the one chosen on validation at training, default) or a number such as 0.5")
    p.add_argument("--no-features", action="store_true", help="leave out the pooled-features output")
    p.add_argument("--domain-stats", dest="domain_stats", action="store_true", default=None,
                   help="add out-of-domain statistics to every file (default: on when a data folder is known)")
    p.add_argument("--no-domain-stats", dest="domain_stats", action="store_false", help="leave them out")
    p.add_argument("--domain-fit-count", type=int, default=1500, help="train images for the statistics (default 1500)")
    p.add_argument("--domain-flag-rate", type=float, default=0.05,
                   help="share of validation images the threshold flags (default 0.05)")
    p.add_argument("--no-heatmap", dest="heatmap", action="store_false", default=None,
                   help="leave out the Grad-CAM heatmap output (default: every file gets one)")
    p.add_argument("--no-temperature", dest="temperature", action="store_false",
                   help="fit no temperature (operating points are still checked): python -m cxr_export.calibrate")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--triton", help="also write a Triton model repository for each file into this folder")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for checks (default: all)")
    add_arguments(p)
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checkpoint(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], Path]:
    """The trained model, its metadata (with the ``--threshold`` override) and its run folder."""
    from cxr_train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    if args.threshold != "checkpoint":
        value = float(args.threshold)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--threshold {value} must be in [0, 1]")
        meta = dict(meta, threshold=value, threshold_rule=(
            f"{value:g}, set at export (the checkpoint's rule, {meta.get('threshold_rule')}, gave"
            f" {meta.get('threshold', 0.5):.4f})"))
    ckpt_dir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    return model, meta, ckpt_dir


def _write_precisions(args: argparse.Namespace, job: Any) -> Tuple[List[Path], int]:
    """Every precision asked for beside the FP32 file: the files kept, and 3 when one was refused."""
    from .precisions import PRECISIONS, write_precision

    written, status = [], 0
    for name in [n for n in PRECISIONS if getattr(args, n)]:
        t1 = time.perf_counter()
        result = write_precision(name, job)
        _say(f"{name.upper()}: {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB) in "
             f"{time.perf_counter() - t1:.1f}s; {result.line}")
        if result.refusal and not args.force:
            result.path.unlink()
            _say(f"cxr-export: refused: {result.refusal}")
            status = 3
            continue
        if result.refusal:
            _say(f"cxr-export: warning: {result.refusal} (kept: --force)")
        written.append(result.path)
    return written, status


def _calibrate(files: List[Path], data_dir: str, args: argparse.Namespace) -> int:
    """Operating points and temperature of each written file (:mod:`cxr_export.calibrate`); 3 when one was
    refused (it is kept as it was, without them)."""
    from .calibrate import Refused, calibrate_file, summary_line

    status, cache = 0, {}  # type: Tuple[int, Dict[Any, Any]]
    for path in files:
        try:
            result = calibrate_file(path, data_dir, None, args.temperature, args.threads, cache)
            _say(f"calibration: {summary_line(result)}")
        except Refused as exc:
            _say(f"cxr-export: refused: {exc}")
            status = 3
    return status


def _export(args: argparse.Namespace) -> int:
    """FP32, the other precisions, the graph additions and the Triton repositories; the exit status."""
    from . import images
    from .additions import AddContext, add_all
    from .onnx_export import export_fp32
    from .precisions import ExportJob
    from .quantize import Int8Config

    t0 = time.perf_counter()
    model, meta, ckpt_dir = _checkpoint(args)
    size = (int(meta.get("image_size", 224)),) * 2
    data_dir = args.calibration or meta.get("args", {}).get("data")
    parity_px = None
    if data_dir and Path(data_dir).is_dir() and args.parity_count:
        parity_px, _, _ = images.image_set(ckpt_dir, data_dir, "val", args.parity_count, size)
    out, spec = export_fp32(model, meta, args.out, parity_px, args.opset, features=not args.no_features,
                            intended_use=block_from_args(args))
    par = spec.export.get("parity")
    _say(f"FP32: {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s"
         + (f"; parity with PyTorch on {par['images']} images: max |dp| {par['max_abs_diff_probability']:.2e}"
            if par else "; parity not checked (no data folder)"))
    int8 = Int8Config(calibration_method=args.calibration_method, calibration_count=args.calibration_count,
                      per_channel=not args.per_tensor, activations=args.activations,
                      reduce_range=not args.full_range, nodes_excluded=tuple(args.exclude_nodes),
                      max_drop_points=args.max_drop)
    job = ExportJob(fp32=out, spec=spec, ckpt_dir=ckpt_dir, size=size, int8=int8, parity_pixels=parity_px,
                    data_dir=Path(args.calibration) if args.calibration else None,
                    gate_count=args.gate_count or None, threads=args.threads)
    others, status = _write_precisions(args, job)
    written = [out] + others
    context = AddContext(ckpt_dir=ckpt_dir, data_dir=data_dir, size=size, features=not args.no_features,
                         threads=args.threads, options=vars(args))
    add_all(written, context, _say)
    if context.has_data:  # the temperature sits inside the classifier, before its Softmax: not an addition
        status = max(status, _calibrate(written, data_dir, args))
    if args.triton:
        from .triton import write_triton_repo

        for f in written:
            _say(f"Triton: {write_triton_repo(f, args.triton).parent}")
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``cxr-export``; returns the exit status (2: bad arguments or input, 3: a file refused)."""
    args = build_parser().parse_args(argv)
    if args.int8 and not args.calibration:
        _say("cxr-export: error: --int8 needs --calibration DIR (the training folder the checkpoint was trained on)")
        return 2
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("cxr-export: PyTorch is not installed; install the export extra: pip install 'cxr[export]'")
        return 2
    from cxr_infer.errors import CXRError

    try:
        return _export(args)
    except (CXRError, FileNotFoundError, ValueError, KeyError) as exc:
        _say(f"cxr-export: error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
