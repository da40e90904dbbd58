"""``cxr-bench heatmaps``: its arguments, run and summary (the measuring is :mod:`cxr_bench.heatmaps`)."""
from __future__ import annotations

import argparse

from ..util import fmt_num
from .base import Command, Report, Summary, add_threads, positive

EPILOG = """\
example:
  cxr-bench heatmaps --model runtime/cxr_infer/models/default.onnx --data chest_xray/test --per-kind 4

writes heatmaps.json, heatmaps.md and one grid JPEG per model into --out, a row per kind (never
picked by eye), and each model's border mass over every image of --data: the share of a map's mass
(as the runtime gives it, at the image's size) in a frame 10% of the width and height wide on each
side, mean and median, by true and by predicted label; maps without mass are counted apart. The
map is model attention, not a localisation.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled folder, e.g. chest_xray/test")
    p.add_argument("--per-kind", type=positive, default=4, metavar="N", help="images of each kind (default 4)")
    p.add_argument("--batch", type=positive, default=16, metavar="N", help="inference batch size (default 16)")
    add_threads(p)


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..heatmaps import run_heatmaps

    return run_heatmaps(args.model, args.data, args.out, per_kind=args.per_kind, threads=args.threads,
                        batch=args.batch, name=args.name, quiet=args.quiet), 0


def summary(report: Report) -> Summary:
    each = []
    for m in report.get("models", []):
        agree = m.get("int8_vs_fp32_activations")
        border = m.get("border_mass")
        each.append(f"{m['name']} grid `{m.get('grid_image', '-')}`" + (
            f", border mass mean {fmt_num(border['mean'], 3)}" if border else "") + (
            f", INT8 vs FP32 activations rank correlation {fmt_num(agree['median'], 3)}" if agree else ""))
    return Summary("; ".join(each) or "no model", "\n".join(f"- {e}" for e in each))


COMMAND = Command(
    name="heatmaps", kind="cxr-bench/heatmaps", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="Grad-CAM overlay grids (TP/FP/FN/TN by a fixed rule), INT8 map agreement and border mass",
    description="Grad-CAM overlays of a labelled folder: for each kind at the model's threshold, the first images "
                "by file name; the INT8 maps' rank correlation with the same graph's FP32 activations; and the "
                "share of each map's mass in the image's outer 10% (border mass).",
    example="cxr-bench heatmaps --model runtime/cxr_infer/models/default.onnx --data chest_xray/test")
