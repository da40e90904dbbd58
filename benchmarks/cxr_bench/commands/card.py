"""``cxr-bench card``: its arguments, run and summary (the cards are :mod:`cxr_bench.card` and
:mod:`cxr_bench.card_md`)."""
from __future__ import annotations

import argparse

from .base import Command, Report, Summary

EPILOG = """\
Each card is written from the file's spec and the reports in --reports that measured its bytes
(matched by SHA-256); a report that names the file's path with another SHA-256 is refused. Where
no report holds a figure, the card names the command that makes it. The output is deterministic:
regenerate a card after its file or a report changes, never edit it. The cards' images link the
reports' figures: as ../results/NAME for benchmarks/results (the site serves them there), else by
their path from --out.

examples:
  cxr-bench card runtime/cxr_infer/models/default.onnx models/vgg16_int8.onnx models/inception_v3_int8.onnx
      docs/model-cards/<backbone>-<precision>.md for each, knowing all three for the choice of the
      default, and docs/model-cards/index.md
  cxr-bench card m_int8.onnx --reports bench --out cards
      one card from the reports in bench/ into cards/

the reports a card reads (each made with --out DIR, then --reports DIR):
  cxr-bench accuracy --data TEST_DIR           metrics, intervals, counts, subgroups, test ECE
  cxr-bench accuracy --validation TRAIN_DIR    validation metrics, ECE and reliability diagram
  cxr-bench domain --foreign DIR --originals DIR   flag rates at the threshold and operating points
  cxr-bench heatmaps --data TEST_DIR           the grid of examples and the border mass
  cxr-bench latency --batch 1                  the speed the choice of the default reads
"""


def arguments(p: argparse.ArgumentParser) -> None:
    from ..card import CARDS, RESULTS, shown_path

    p.add_argument("model", nargs="+", metavar="MODEL.onnx", help="cxr model file(s): one card each")
    p.add_argument("--reports", metavar="DIR", default=str(RESULTS),
                   help=f"folder of cxr-bench reports (default {shown_path(RESULTS)})")
    p.add_argument("--out", metavar="DIR", default=str(CARDS),
                   help=f"where the cards and index.md go (default {shown_path(CARDS)})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..card import write_cards

    return write_cards(args.model, args.reports, args.out, quiet=args.quiet), 0


def summary(report: Report) -> Summary:
    return Summary(f"{len(report['cards'])} card(s): " + ", ".join(report["cards"]))


COMMAND = Command(
    name="card", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="a model card per model file, from its spec and the reports on its bytes",
    description="Model cards (after Mitchell et al. 2019): intended use, training data, how the model was chosen, "
                "metrics with intervals, subgroups, calibration, domain check, heatmap examples, known failure modes, "
                "limitations and SHA-256, each read from the file's spec or a report that measured its bytes.",
    example="cxr-bench card models/vgg16_int8.onnx --reports benchmarks/results")
