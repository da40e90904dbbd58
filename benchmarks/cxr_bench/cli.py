"""``cxr-bench``: the parser is built from :data:`cxr_bench.commands.COMMANDS` and each run goes to
its entry; heavy imports happen inside the commands, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .commands import COMMANDS, Command
from .commands.base import HelpFormatter, add_report_arguments, new_out_folder

MAIN_EPILOG = """\
examples:
{examples}

Every command but summary writes NAME.json (all figures) and NAME.md (for people) into --out, by
default a new folder ./cxr-bench-COMMAND-YYYYmmdd-HHMMSS in the current directory; progress goes
to stderr and a one-line result to stdout. Exit status: 0 done, 1 some measurement failed (see
the report), 2 usage, model or data error.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr-bench`` parser: one sub-parser per entry of :data:`COMMANDS`."""
    fmt = HelpFormatter
    examples = "\n".join(f"  {c.example}" for c in COMMANDS.values() if c.example)
    p = argparse.ArgumentParser(prog="cxr-bench", formatter_class=fmt, epilog=MAIN_EPILOG.format(examples=examples),
                                description="Accuracy and latency reports for cxr model files (.onnx with a cxr.spec).")
    p.add_argument("--version", action="version", version=f"cxr-bench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS.values():
        sp = sub.add_parser(c.name, formatter_class=fmt, help=c.help.replace("%", "%%"), description=c.description,
                            epilog=c.epilog)
        c.arguments(sp)
        if c.kind is not None:
            add_report_arguments(sp, c.name)
    return p


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Run ``command`` with parsed ``args``: its report into ``args.out`` (a new folder when not named),
    then ``--summary``, then its one-line result on stdout; returns the exit status."""
    if command.kind is not None and args.out is None:
        args.out = str(new_out_folder(command.name))
    report, status = command.run(args)
    if getattr(args, "summary", False):
        from .summary import write_summary

        write_summary(args.out, quiet=args.quiet)
    files = report.get("files") or {}
    where = Path(args.out) / files["markdown"] if files.get("markdown") else Path(args.out)
    print(f"cxr-bench {command.name}: {command.summary(report).line} ({where})", flush=True)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``cxr-bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    from cxr_infer.errors import CXRError

    try:
        return run_command(COMMANDS[args.command], args)
    except CXRError as exc:
        print(f"cxr-bench: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a base install without the bench extra
        extra = "bench,train" if exc.name in ("torch", "torchvision", "safetensors") else "bench"
        print(f"cxr-bench: error: this command needs the Python package {exc.name!r}, which is not installed: "
              f"pip install 'cxr[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
