"""What a ``cxr-bench`` command is (:class:`Command`), and the argument types and helpers they share.

Only the standard library and the runtime's device registry are imported here, so that ``--help``
starts at once; a command's ``run`` imports its measuring module when it runs.

Examples:
    >>> batch_list("1,8")
    [1, 8]
    >>> new_out_folder("accuracy", stamp="20300101-120000").name
    'cxr-bench-accuracy-20300101-120000'
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cxr_infer.cliargs import positive
from cxr_infer.devices import DEVICES, available_threads

Report = Dict[str, Any]


@dataclass(frozen=True)
class Summary:
    """A report in brief: ``line``, printed when its command ends, and ``markdown``, its part of ``summary.md``."""

    line: str
    markdown: str = ""


@dataclass(frozen=True)
class Command:
    """One ``cxr-bench NAME`` command. ``arguments`` adds its own to its sub-parser (a command with a
    ``kind``, the kind of its reports, also gets :func:`add_report_arguments`); ``run(args)`` writes the
    report into ``args.out`` and returns it with the exit status; ``summary(report)`` puts it in brief;
    ``help``, ``description``, ``epilog`` and ``example`` are its help texts."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Tuple[Report, int]]
    summary: Callable[[Report], Summary]
    epilog: str = ""
    example: str = ""
    kind: Optional[str] = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; option help wrapped at spaces only, so a name such as
    ``./cxr-bench-accuracy-YYYYmmdd-HHMMSS`` or ``--domain-check`` is never split at a hyphen."""

    def _split_lines(self, text: str, width: int) -> List[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def batch_list(text: str) -> List[int]:
    """Comma-separated batch sizes, each at least 1 (argparse type)."""
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 1,8,32") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be at least 1, e.g. 1,8,32")
    return vals


def device_names() -> Tuple[str, ...]:
    """Every device of the runtime's registry (:data:`cxr_infer.devices.DEVICES`), read when a parser is built."""
    return tuple(DEVICES)


def device_list(text: str) -> List[str]:
    """Comma-separated registered devices, duplicates dropped (argparse type)."""
    vals = [x for x in text.replace(" ", "").split(",") if x]
    bad = [v for v in vals if v not in DEVICES]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {', '.join(DEVICES)} or several, e.g. cpu,openvino")
    return list(dict.fromkeys(vals))


def add_device(parser: argparse.ArgumentParser, what: str = "where to run the model files") -> None:
    """``--device``, one of the registered devices (default cpu)."""
    parser.add_argument("--device", choices=device_names(), default="cpu",
                        help=f"{what}: {', '.join(device_names())} (default cpu; a device that cannot run here "
                             "says what to install)")


def add_threads(parser: argparse.ArgumentParser, what: str = "onnxruntime threads") -> None:
    """``--threads N``, by default the CPUs this process may use."""
    parser.add_argument("--threads", type=positive, default=available_threads(), metavar="N",
                        help=f"{what} (default: the CPUs this process may use)")


def add_report_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out``, ``--name``, ``--quiet`` and ``--summary``: every command that writes a report has them."""
    parser.add_argument("--out", metavar="DIR", help=f"report folder (default: a new folder "
                        f"./cxr-bench-{name}-YYYYmmdd-HHMMSS, made when the report is written)")
    parser.add_argument("--name", metavar="NAME",
                        help="append -NAME to the report file names (keeps several runs apart)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--summary", action="store_true",
                        help="then refresh summary.json and summary.md in --out from every report there")


def new_out_folder(name: str, stamp: Optional[str] = None, parent: Optional[Path] = None) -> Path:
    """``./cxr-bench-NAME-YYYYmmdd-HHMMSS`` (``-2``, ``-3`` ... appended where it exists), not made yet."""
    parent = Path.cwd() if parent is None else parent
    base = parent / f"cxr-bench-{name}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def complain(messages: Sequence[str]) -> int:
    """Each message as a ``cxr-bench: MESSAGE`` line on stderr; the exit status, 1 when there was any."""
    for message in messages:
        print(f"cxr-bench: {message}", file=sys.stderr)
    return 1 if messages else 0
