"""``cxr-bench graphcost``: its arguments, run and summary (the measuring is :mod:`cxr_bench.graphcost`)."""
from __future__ import annotations

import argparse

from ..util import fmt_ms
from .base import Command, Report, Summary, add_device, add_threads, positive

EPILOG = """\
examples:
  cxr-bench graphcost --model runtime/cxr_infer/models/default.onnx models/vgg16_int8.onnx \\
      --threads 2
      what the out-of-domain check adds to each classifier at batch 1 (3 processes x 20 blocks)
  cxr-bench graphcost --model models/vgg16_int8.onnx --graph heatmap --processes 5
      the Grad-CAM graph instead

writes graphcost.json and graphcost.md into --out. Every node of a file runs on every call, whatever
outputs are fetched, so this is what every prediction pays.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    p.add_argument("--graph", choices=("domain", "heatmap"), default="domain",
                   help="the added graph to measure (default domain); the other is removed from both copies")
    p.add_argument("--batch", type=positive, default=1, metavar="N", help="batch size (default 1)")
    add_threads(p)
    add_device(p)
    p.add_argument("--processes", type=positive, default=3, metavar="P", help="worker processes per file (default 3)")
    p.add_argument("--blocks", type=positive, default=20, metavar="B",
                   help="alternating blocks per process (default 20)")
    p.add_argument("--warmup", type=positive, default=5, metavar="W",
                   help="untimed calls after each switch (default 5)")
    p.add_argument("--calls", type=positive, default=10, metavar="C", help="timed calls per block (default 10)")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..graphcost import run_graphcost

    return run_graphcost(args.model, args.out, graph=args.graph, batch=args.batch, threads=args.threads,
                         device=args.device, processes=args.processes, blocks=args.blocks, warmup=args.warmup,
                         calls=args.calls, name=args.name, quiet=args.quiet), 0


def summary(report: Report) -> Summary:
    each = [f"{r['name']} {100 * r['cost']:+.1f}% ({fmt_ms(r['off_ms'])} -> {fmt_ms(r['on_ms'])} ms)"
            for r in report.get("rows", [])]
    line = f"what the {report.get('graph')} graph costs at batch {report.get('batch')}: " + ", ".join(each)
    return Summary(line, f"- {line} on {report.get('device')}, {report.get('threads')} thread(s)")


COMMAND = Command(
    name="graphcost", kind="graphcost", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="what the domain check or Grad-CAM graph adds to a file, paired in one process",
    description="Each model file against a copy without its out-of-domain (or Grad-CAM) graph, timed in "
                "alternating blocks inside one process, several processes per file: a few per cent is "
                "measurable, which separate processes (latency --domain-check both) blur.",
    example="cxr-bench graphcost --model models/vgg16_int8.onnx --threads 2")
