"""``cxr-bench accuracy``: its arguments, run and summary (the measuring is :mod:`cxr_bench.accuracy`)."""
from __future__ import annotations

import argparse

from ..util import fmt_num, fmt_pct, images_used
from .base import Command, Report, Summary, add_device, add_threads, positive

EPILOG = """\
--data holds one sub-folder per label, named like the model's labels:
  DIR/NORMAL/*.jpeg  DIR/PNEUMONIA/*.jpeg
--validation TRAIN_DIR instead measures each model on its own validation split: the training folder
split again as the model's spec records (seed, fraction, split hash; refused when the hash differs).

examples:
  cxr-bench accuracy --model m_fp32.onnx m_int8.onnx --data chest_xray/test
      both models on a labelled test folder; each image decoded once, shared by both
  cxr-bench accuracy --model m.onnx --data chest_xray/test --limit 20 --bootstrap 200 --out quick
      a quick look: the first 20 images per label
  cxr-bench accuracy --model models/*.onnx --data chest_xray/test --name test --out bench --summary
      accuracy-test.json/.md, roc-test.png, ... in bench/, then refresh bench/summary.json
  cxr-bench accuracy --model models/*.onnx --validation chest_xray/train --name validation --out bench
      each model on the validation images it was selected on: ECE and reliability diagram there

writes (in --out; -NAME appended with --name): accuracy.json, accuracy.md, predictions.csv,
roc.png, calibration.png. Metrics are given at the model's own threshold (from its spec) and at 0.5.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    images = p.add_mutually_exclusive_group(required=True)
    images.add_argument("--data", metavar="DIR", help="labelled image folder, e.g. chest_xray/test")
    images.add_argument("--validation", metavar="TRAIN_DIR",
                        help="instead of --data: the models' training folder; each model is measured on its own "
                             "validation split, rebuilt from its spec and checked against its split hash")
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
                        plots=not args.no_plots, quiet=args.quiet, validation=args.validation), 0


def summary(report: Report) -> Summary:
    models = report.get("models", [])
    each = [f"{m['name']} accuracy {fmt_pct(m['at_threshold']['accuracy'])}, AUC {fmt_num(m['at_threshold']['auc'])}"
            for m in models]
    where = images_used(report["data"])
    markdown = "\n".join(f"- {m['name']} ({m['backbone']} {m['precision']}): accuracy "
                         f"{fmt_pct(m['at_threshold']['accuracy'])}, AUC {fmt_num(m['at_threshold']['auc'])}, ECE "
                         f"{fmt_num(m['calibration']['ece'], 3)} on {m['n_evaluated']} images of {where}"
                         for m in models)
    return Summary("; ".join(each) or "no model", markdown)


COMMAND = Command(
    name="accuracy", kind="cxr-bench/accuracy", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="metrics with 95% bootstrap intervals, ROC and calibration plots, per-image CSV",
    description="Accuracy, loss, precision, recall, specificity, F1, ROC AUC and TP/FP/TN/FN with 95% bootstrap "
                "intervals, ECE and a reliability diagram, for one or more model files on a labelled folder or "
                "on each file's own validation split.",
    example="cxr-bench accuracy --model m_fp32.onnx m_int8.onnx --data chest_xray/test --out bench")
