"""The ``intended_use`` block of a model's spec: the ``--intended-*`` options that set it (default:
the Kermany training data, :mod:`cxr_infer.intended_use`), and ``python -m cxr_export.intended
MODEL.onnx ...``, which writes it into existing files.

Examples:
    >>> parser = argparse.ArgumentParser(); add_arguments(parser)
    >>> block_from_args(parser.parse_args(["--intended-ages", "18", "90"]))["age_years"]
    [18.0, 90.0]
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from cxr_infer.intended_use import KERMANY, IntendedUse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--intended-*`` options (defaults: the Kermany training data)."""
    group = parser.add_argument_group("intended use (written into the spec; DICOM headers are checked against it)")
    group.add_argument("--intended-ages", nargs=2, type=float, metavar=("MIN", "MAX"),
                       help="patient ages in completed years (default: 1 5, the Kermany children)")
    group.add_argument("--intended-age-margin", type=float, metavar="YEARS",
                       help="years accepted beyond each end of the range (default 0.5)")
    group.add_argument("--intended-views", nargs="+", metavar="VIEW", help="DICOM ViewPosition values (default: PA AP)")
    group.add_argument("--intended-modalities", nargs="+", metavar="MODALITY",
                       help="DICOM Modality values (default: CR DX DR)")
    group.add_argument("--intended-body-parts", nargs="+", metavar="PART",
                       help="DICOM BodyPartExamined values (default: CHEST)")
    group.add_argument("--no-intended-use", action="store_true",
                       help="write no intended_use block (DICOM header checks are then off)")


def block_from_args(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The block the options describe (validated), or None with ``--no-intended-use``."""
    if args.no_intended_use:
        return None
    block = dict(KERMANY)
    changed = False
    for option, key in (("intended_ages", "age_years"), ("intended_age_margin", "age_margin_years"),
                        ("intended_views", "views"), ("intended_modalities", "modalities"),
                        ("intended_body_parts", "body_parts")):
        value = getattr(args, option, None)
        if value is not None:
            block[key] = list(value) if isinstance(value, (list, tuple)) else value
            changed = True
    if changed:
        block["source"] = "set at export with the --intended-* options"
    IntendedUse.from_spec(block, "--intended-*")  # one clear error for a bad range or list
    return block


def main(argv: Optional[List[str]] = None) -> int:
    from cxr_infer.errors import CXRError

    from .modelio import read_spec, write_spec

    parser = argparse.ArgumentParser(
        prog="python -m cxr_export.intended",
        description="Write (or replace) the intended_use block in existing cxr model files, in place. "
                    "Only the spec changes: the graph and its outputs stay byte for byte the same.",
        epilog="example: python -m cxr_export.intended models/vgg16_int8.onnx   (the Kermany defaults)")
    parser.add_argument("models", nargs="+", help="cxr model file(s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        block = block_from_args(args)
        for path in args.models:
            write_spec(path, read_spec(path).updated({"intended_use": block}))
            print(f"{path}: intended use "
                  + (IntendedUse.from_spec(block).describe() if block else "removed (header checks off)"),
                  file=sys.stderr)
    except CXRError as exc:
        print(f"python -m cxr_export.intended: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
