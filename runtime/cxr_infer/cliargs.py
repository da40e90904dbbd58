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
from typing import Any, Callable

from .devices import device_choices, device_help


def _typed(text: str, convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str,
           problem: str) -> Any:
    """``convert(text)``, or argparse's one-line error: not ``expected``, or ``problem`` when invalid."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return value


def threshold(text: str) -> float:
    """A decision threshold in [0, 1]."""
    return _typed(text, float, lambda v: 0.0 <= v <= 1.0, "a number", "is not in [0, 1]")


def domain_threshold(text: str) -> float:
    """A domain-score threshold: any finite number."""
    return _typed(text, float, math.isfinite, "a number", "is not a finite number")


def flag_rate(text: str) -> float:
    """A share in (0, 1), written ``0.10`` or ``10%``."""
    return _typed(text, lambda t: float(t.rstrip("%")) / (100.0 if t.endswith("%") else 1.0),
                  lambda v: 0.0 < v < 1.0, "a number (e.g. 0.10 or 10%)", "is not a share in (0, 1) (e.g. 0.10 or 10%)")


def positive(text: str) -> int:
    """A whole number of at least 1."""
    return _typed(text, int, lambda v: v >= 1, "a whole number", "must be at least 1")


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
