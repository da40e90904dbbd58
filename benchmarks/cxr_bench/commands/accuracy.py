"""``cxr-bench accuracy``: its arguments, run and summary (the measuring is :mod:`cxr_bench.accuracy`)."""
from __future__ import annotations

import argparse

from ..util import fmt_num, fmt_pct
from .base import Command, Report, Summary, add_device, add_threads, positive

EPILOG = """\
--data holds one sub-folder per label, named like the model's labels:
  DIR/NORMAL/*.jpeg  DIR/PNEUMONIA/*.jpeg

examples:
  cxr-bench accuracy --model m_fp32.onnx m_int8.onnx --data chest_xray/test
      both models on a labelled test folder; each image decoded once, shared by both
  cxr-bench accuracy --model m.onnx --data chest_xray/test --limit 20 --bootstrap 200 --out quick
      a quick look: the first 20 images per label
  cxr-bench accuracy --model models/*.onnx --data chest_xray/test --name test --out bench --summary
      accuracy-test.json/.md, roc-test.png, ... in bench/, then refresh bench/summary.json

writes (in --out; -NAME appended with --name): accuracy.json, accuracy.md, predictions.csv,
roc.png, calibration.png. Metrics are given at the model's own threshold (from its spec) and at 0.5.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled image folder, e.g. chest_xray/test")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap rounds (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--batch", type=positive, default=32, metavar="N", help="inference batch size (default 32)")
    add_threads(p)
    add_device(p)
    p.add_argument("--limit", type=positive, metavar="N", help="only the first N images (by name) of each label")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..accuracy import run_accuracy

    return run_accuracy(args.model, args.data, args.out, bootstrap=max(args.bootstrap, 0), seed=args.seed,
                        batch=args.batch, threads=args.threads, device=args.device, limit=args.limit, name=args.name,
                        plots=not args.no_plots, quiet=args.quiet), 0


def summary(report: Report) -> Summary:
    models = report.get("models", [])
    each = [f"{m['name']} accuracy {fmt_pct(m['at_threshold']['accuracy'])}, AUC {fmt_num(m['at_threshold']['auc'])}"
            for m in models]
    markdown = "\n".join(f"- {m['name']} ({m['backbone']} {m['precision']}): accuracy "
                         f"{fmt_pct(m['at_threshold']['accuracy'])}, AUC {fmt_num(m['at_threshold']['auc'])} on "
                         f"{m['n_evaluated']} images of `{report['data']['root']}`" for m in models)
    return Summary("; ".join(each) or "no model", markdown)


COMMAND = Command(
    name="accuracy", kind="cxr-bench/accuracy", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="metrics with 95% bootstrap intervals, ROC and calibration plots, per-image CSV",
    description="Accuracy, loss, precision, recall, specificity, F1, ROC AUC and TP/FP/TN/FN with 95% bootstrap "
                "intervals, for one or more model files on a labelled folder.",
    example="cxr-bench accuracy --model m_fp32.onnx m_int8.onnx --data chest_xray/test --out bench")
