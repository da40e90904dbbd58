"""``cxr-bench domain``: its arguments, run and summary (the measuring is :mod:`cxr_bench.domain`)."""
from __future__ import annotations

import argparse

from ..upstream import ADD_DOMAIN_HINT
from ..util import fmt_num, fmt_pct
from .base import Command, Report, Summary, add_threads, positive

EPILOG = f"""\
examples:
  cxr-bench domain --model runtime/cxr_infer/models/default.onnx models/*_int8.onnx --data chest_xray/test
      every kind below (a model needs domain statistics: cxr-export adds them, or to an existing
      file: {ADD_DOMAIN_HINT})
  cxr-bench domain --model m.onnx --data chest_xray/test --count 30 --kinds photos,noise --out quick
      a quick look
  cxr-bench domain --model m.onnx --data chest_xray/test --foreign foreign/ --originals fullres/
      also real images from other sources (adults, lateral views, CT) and full-size originals
  cxr-bench domain --model m.onnx --data chest_xray/test --validation chest_xray/train
      also flag rates at stricter and looser thresholds (for cxr-infer --domain-threshold S)

kinds: photos (sample photographs: matplotlib's, and scikit-image's where it is installed),
documents (text rendered with Pillow), noise, inverted, upside_down, rotated_90, cropped,
flipped_vertical, mirrored (a control: still a chest X-ray; these five from --data X-rays),
medical_other (scikit-image's medical samples where it is installed, else matplotlib's MRI
slice; the report names each kind's sources). Every kind runs with pip install 'cxr[bench]'.
writes domain.json and domain.md into --out.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="in-domain labelled folder (one sub-folder per label), e.g. chest_xray/test")
    p.add_argument("--count", type=positive, default=150, metavar="N",
                   help="images per out-of-domain kind (default 150)")
    p.add_argument("--kinds", default=None, metavar="K,K,...",
                   help="comma-separated kinds (default: all, listed below)")
    p.add_argument("--foreign", metavar="DIR",
                   help="real out-of-domain images, each sub-folder a kind (files.csv with a finding column adds "
                        "the classifier's AUC on them); evaluation only")
    p.add_argument("--originals", metavar="DIR",
                   help="in-domain images at their original size, read the way the runtime reads a user's file: "
                        "a check that reacts to how the --data images were resized, instead of to the image, "
                        "flags them")
    p.add_argument("--validation", metavar="TRAIN_DIR",
                   help="the models' training folder: its validation part, rebuilt and checked against each file's "
                        "split hash, sets the thresholds of the operating-point table (flag rates at stricter or "
                        "looser checks) for files that carry no operating points of their own")
    p.add_argument("--batch", type=positive, default=16, metavar="N", help="inference batch size (default 16)")
    add_threads(p)


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..domain import run_domain
    from ..domain_kinds import KINDS

    kinds = [k for k in (args.kinds or ",".join(KINDS)).split(",") if k]
    report = run_domain(args.model, args.data, args.out, count=args.count, kinds=kinds, batch=args.batch,
                        threads=args.threads, name=args.name, quiet=args.quiet, foreign=args.foreign,
                        originals=args.originals, validation=args.validation)
    return report, 0 if all(m.get("domain") for m in report["models"]) else 1


def summary(report: Report) -> Summary:
    from ..domain_kinds import CONTROLS

    each, lines = [], []
    for m in report.get("models", []):
        if not m.get("domain"):
            each.append(f"{m['name']} has no domain check")
            continue
        kinds = m.get("kinds", {})
        targets = [k for k in kinds if k not in CONTROLS and kinds[k]["auroc"] is not None]
        worst = min(targets, key=lambda k: kinds[k]["auroc"], default=None)
        text = f"{m['name']} flags {fmt_pct(m['in_domain']['flag_rate'], 1)} of the in-domain images"
        if worst is not None:
            text += f", lowest AUROC {fmt_num(kinds[worst]['auroc'], 3)} ({worst})"
        each.append(text)
        rates = ", ".join(f"{k} {fmt_pct(v['flag_rate'], 1)}" for k, v in kinds.items())
        lines.append(f"- {text}; flag rates: {rates}")
    return Summary("; ".join(each) or "no model", "\n".join(lines))


COMMAND = Command(
    name="domain", kind="cxr-bench/domain", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="out-of-domain check: flag rates on X-rays and on photos, documents, noise, transformed X-rays, with AUROCs",
    description="Flag rate of each model's out-of-domain check on a labelled folder (in-domain) and on "
                "out-of-domain kinds built here, with the AUROC between them.",
    example="cxr-bench domain --model runtime/cxr_infer/models/default.onnx --data chest_xray/test")
