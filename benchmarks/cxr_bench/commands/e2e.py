"""``cxr-bench e2e``: its arguments, run and summary (the measuring is :mod:`cxr_bench.e2e`)."""
from __future__ import annotations

import argparse

from ..util import fmt_ms
from .base import Command, Report, Summary, add_device, add_threads, complain, positive

EPILOG = """\
examples:
  cxr-bench e2e --model m_int8.onnx --images scans/
      8 full-size images from scans/ (searched recursively): cold cxr-infer processes on 1 and on
      8 images, and the time of each stage per image
  cxr-bench e2e --model m_int8.onnx --images scans/ --count 16 --repeats 5 --threads 2

writes e2e.json and e2e.md into --out.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE.onnx", help="cxr model file")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="full-size images as users hand them over: a folder (searched recursively) or one file")
    p.add_argument("--count", type=positive, default=8, metavar="N", help="images used (default 8)")
    p.add_argument("--repeats", type=positive, default=3, metavar="R", help="cold processes per case (default 3)")
    add_threads(p, "inference threads")
    add_device(p, "where to run the model")
    p.add_argument("--infer-arg", action="append", metavar="ARG",
                   help="argument passed to cxr-infer instead of the default '--threads N' (repeatable)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-process part")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..e2e import run_e2e

    rep = run_e2e(args.model, args.images, count=args.count, repeats=args.repeats, threads=args.threads,
                  device=args.device, infer_args=args.infer_arg, cold=not args.no_cold, out=args.out,
                  name=args.name, quiet=args.quiet)
    return rep, complain([f"{k}: {msg}" for k, msg in (rep.get("cold") or {}).get("errors", {}).items()])


def summary(report: Report) -> Summary:
    med = report["per_image"]["median_ms"]
    line = (f"per image: decode + preprocess {fmt_ms(med['decode_preprocess'])} ms, inference "
            f"{fmt_ms(med['inference'])} ms")
    cold = (report.get("cold") or {}).get("median_s", {}).get("cxr_infer_1_image")
    if cold is not None:
        line += f"; a cold cxr-infer on one image {cold:.2f} s"
    return Summary(line, f"- `{report['model']}`, {report['settings']['count']} image(s): {line}")


COMMAND = Command(
    name="e2e", kind="cxr-bench/e2e", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="a cold cxr-infer process on full-size images; decode+preprocess vs inference",
    description="End to end: a cold cxr-infer process on full-size images, and decode + preprocess against "
                "inference time per image.",
    example="cxr-bench e2e --model m_int8.onnx --images scans/")
