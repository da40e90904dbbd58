"""``cxr-bench summary``: its arguments, run and summary (the merging is :mod:`cxr_bench.summary`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from .base import Command, Report, Summary, device_names, new_out_folder, positive

EPILOG = """\
summary.json is a list of rows (backbone, precision, accuracy, auc, loss, precision_score, recall,
f1, tp, fp, tn, fn, latency_ms_b1, torch_latency_ms_b1; the newest report wins for a model file).

examples:
  cxr-bench summary
      every report in the current folder and in its cxr-bench-* folders (what the other commands
      write by default) -> a new folder ./cxr-bench-summary-YYYYmmdd-HHMMSS
  cxr-bench summary --results bench --threads 2
      bench/*.json -> bench/summary.json and bench/summary.md
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", metavar="DIR",
                   help="report folder(s) (default: the current folder and every ./cxr-bench-* folder in it)")
    p.add_argument("--out", metavar="DIR",
                   help="where to write summary.json and summary.md (default: the --results folder when one is "
                        "named, else a new folder ./cxr-bench-summary-YYYYmmdd-HHMMSS)")
    p.add_argument("--threads", type=positive, metavar="N",
                   help="which measured thread count to summarise (default: the highest measured)")
    p.add_argument("--device", choices=device_names(), default="cpu", help="which device's latency (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def default_results() -> List[Path]:
    """The current folder and every ``cxr-bench-*`` folder in it but the summaries' own."""
    here = Path(".")
    return [here] + sorted(p for p in here.glob("cxr-bench-*") if p.is_dir() and not p.name.startswith(
        "cxr-bench-summary-"))


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..summary import write_summary

    results = [Path(r) for r in args.results] if args.results else default_results()
    if args.out is None:
        args.out = str(results[0] if args.results and len(results) == 1 else new_out_folder("summary"))
    rows = write_summary(results, args.out, threads=args.threads, device=args.device, quiet=args.quiet)
    return {"rows": rows, "results": [str(r) for r in results],
            "files": {"json": "summary.json", "markdown": "summary.md"}}, 0


def summary(report: Report) -> Summary:
    return Summary(f"{len(report['rows'])} row(s) from {len(report['results'])} folder(s)")


COMMAND = Command(
    name="summary", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="every report of a folder in brief: summary.json (accuracy + latency rows) and summary.md",
    description="Merge the accuracy and latency reports of one or more folders into the summary contract "
                "(summary.json), and list every report in brief (summary.md).",
    example="cxr-bench summary --results bench")
