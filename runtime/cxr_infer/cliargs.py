"""Command-line arguments shared by the commands that run a model (``cxr-infer``, ``cxr-pacs``, and
every integration built on the runtime): their types, checks and help, written once.

Examples:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_model_arguments(p)
    >>> args = p.parse_args(["--threshold", "0.3", "--domain-flag-rate", "10%"])
    >>> args.threshold, args.domain_flag_rate, args.device
    (0.3, 0.1, 'cpu')
"""
from __future__ import annotations

import argparse
import math

from .devices import device_choices, device_help


def threshold(text: str) -> float:
    """A decision threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def domain_threshold(text: str) -> float:
    """A domain-score threshold: any finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def flag_rate(text: str) -> float:
    """A share in (0, 1), written ``0.10`` or ``10%``."""
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.10 or 10%)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1) (e.g. 0.10 or 10%)")
    return value


def positive(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def add_domain_strictness(p: argparse.ArgumentParser) -> None:
    """``--domain-flag-rate R`` / ``--domain-threshold S`` (one or the other): how strict the image
    check is, for :class:`~cxr_infer.classifier.Classifier`'s ``domain_flag_rate`` and
    ``domain_threshold``."""
    strict = p.add_mutually_exclusive_group()
    strict.add_argument("--domain-flag-rate", type=flag_rate, metavar="R",
                        help="how strict the image check is: flag this share of in-population images (the "
                             "model's validation X-rays), e.g. 0.10 or 10%%. Higher catches more images outside "
                             "the intended use (adults, other views) and flags more children's X-rays too "
                             "(default: the model's own, about 0.05). Needs a model file with operating points "
                             "(cxr-infer --info lists them)")
    strict.add_argument("--domain-threshold", type=domain_threshold, metavar="S",
                        help="the same as a raw domain-score threshold: scores above S are out of domain "
                             "(default: the model's own; cxr-bench domain --validation gives S for each flag "
                             "rate of files without operating points)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--threads``, ``--threshold`` and the image check's strictness:
    what every command that loads a :class:`~cxr_infer.classifier.Classifier` takes."""
    p.add_argument("-m", "--model", metavar="FILE",
                   help="cxr .onnx model (default: the model embedded in the package)")
    p.add_argument("--device", choices=device_choices(), default="cpu", help=f"where to run: {device_help()}")
    p.add_argument("--threads", type=positive, metavar="N",
                   help="CPU threads for inference (default: the cores this process may use)")
    p.add_argument("--threshold", type=threshold, metavar="T",
                   help="decision threshold for the positive label, in [0, 1] (default: the model's own)")
    add_domain_strictness(p)
