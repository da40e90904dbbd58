"""``cxr-infer``: classify chest X-ray images with a cxr ONNX model.

Exit status: 0 every input classified (a folder scan's DICOM objects without an image, such as
reports and presentation states, are skipped), 1 some inputs failed (each named on stderr) or
none was an image, 2 usage, model or device error. Heavy imports (numpy, Pillow, onnxruntime)
happen only after the arguments are parsed, so ``--help`` is instant.

Examples:
    $ cxr-infer --model resnet50_int8.onnx scans/ --format jsonl --output results.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence

from . import cliargs
from .inputs import expand_inputs

T_START = time.perf_counter()

# numpy's OpenBLAS would start a spinning thread per core at import; nothing here uses BLAS
# (onnxruntime has its own threads), so a cold cxr-infer saves ~100 ms of CPU without them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

PROGRESS_MIN_ITEMS = 16

EPILOG_TEMPLATE = """\
inputs:
  files, folders (searched recursively for .jpeg .jpg .png .bmp .tif .tiff .dcm
  and extension-less DICOM files, such as a DICOM CD's, whose DICOMDIR index is
  skipped), glob patterns (quote them: 'scans/**/*.png'), or - to read one image
  from stdin. DICOM may be compressed (JPEG Lossless, JPEG-LS, JPEG 2000, RLE).
  DICOM objects without an image that a folder or glob finds (reports, presentation
  states) are skipped, one line each; named on the command line they fail.

examples:
  cxr-infer --model resnet50_int8.onnx chest.jpeg
      one image, a readable table on stdout
  cxr-infer --model m.onnx scans/ 'more/**/*.png' --format jsonl --output out.jsonl
      a folder and a glob; one JSON object per input, errors included
  cxr-infer --model m.onnx --format csv --threshold 0.3 scans/ > screening.csv
      a more sensitive operating point than the model's own threshold
  cxr-infer --model m.onnx --device cuda --batch-size 32 big_folder/
      on the GPU (needs onnxruntime-gpu: pip install 'cxr[gpu]')
  cxr-infer --model m.onnx --info
      what the model is: backbone, input, labels, threshold, intended use, image check and
      its operating points, metrics, SHA-256 (--info --json: the whole spec)
  cxr-infer --model m.onnx --reject-out-of-domain scans/
      images outside the model's intended use (by DICOM header or by the image itself)
      are not classified (reported as failed, with the reasons)
  cat image.dcm | cxr-infer --model m.onnx -
  cxr-infer --files-from studies.txt --format jsonl --output studies.jsonl
      the inputs a manifest lists, one path (or folder, or glob) a line
  cxr-infer --ray 127.0.0.1:6379 archive/ --format parquet --output archive.parquet
      on a running Ray cluster (pip install 'cxr[ray]'): decoding in Ray tasks, the model in
      an actor pool, the same rows as a local run; --resume skips what an earlier run finished

output (--format):
{formats}
  Bad inputs are also reported on stderr, one line each; the rest are still classified.

intended use:
  Images outside the model's intended use (for the shipped models: frontal chest radiographs of
  children aged 1-5), by their DICOM header or by the image itself, are marked "OUTSIDE (!)"
  with the reasons: their labels must not be trusted. "n/a": no check was possible (--info says
  which checks the model has).

exit status:
  0 all inputs classified, 1 some inputs failed, 2 usage, model or device error

environment:
  CXR_TIMING=1    print the time spent in each phase to stderr (same as --timing)
  CXR_PREFETCH=0  decode each batch only when it runs (default: the next batch is decoded in a
                  second thread while one runs; 9-16% faster on full-size images on 2 cores)
"""


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


def _format_lines(plugins: bool) -> str:
    """The epilog's format list (the installed packages' formats only when ``plugins``: asking
    them costs a cold start about 30 ms, so only ``--help`` does)."""
    import textwrap

    from .formats import output_formats

    lines = []
    for fmt in output_formats(plugins).values():
        text = fmt.description + (" (into the folder --output DIR)" if fmt.target == "folder" else "")
        lines += textwrap.wrap(text, 88, initial_indent=f"  {fmt.name:<9} ", subsequent_indent=" " * 12)
    return "\n".join(lines)


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The parser of ``cxr-infer``; ``plugins=False`` leaves the installed packages' formats out of the
    help (``--format`` still takes them)."""
    p = argparse.ArgumentParser(
        prog="cxr-infer",
        description="Classify chest X-ray images (NORMAL / PNEUMONIA) with a self-describing cxr ONNX model.",
        epilog=EPILOG_TEMPLATE.format(formats=_format_lines(plugins)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, glob patterns, or -")
    cliargs.add_model_arguments(p)
    p.add_argument("--batch-size", type=cliargs.positive, default=8, metavar="N",
                   help="images per inference batch (default 8)")
    p.add_argument("--format", default="table", metavar="NAME",
                   help="output format (default table; the list is below)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write results to FILE instead of stdout (a folder format: the folder DIR to write into)")
    p.add_argument("--info", action="store_true",
                   help="say what the model is (with --json: its whole spec and graph as JSON), then exit")
    p.add_argument("--json", action="store_true", help="with --info: JSON instead of the summary")
    p.add_argument("--reject-out-of-domain", action="store_true",
                   help="do not classify images outside the model's intended use (DICOM header or image "
                        "check): report them as failed inputs with the reasons (exit 1)")
    p.add_argument("--heatmap", metavar="DIR",
                   help="also write one PNG per input into DIR: the image with the model's Grad-CAM attention over "
                        "it, the label, probability and intended-use status (model attention, not a localisation)")
    p.add_argument("--files-from", metavar="FILE",
                   help="also take the inputs listed in FILE (a manifest): one file, folder or glob a line, "
                        "blank lines and lines starting with # skipped")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="score the inputs on the Ray cluster at ADDRESS (host:port, or auto): reading and decoding "
                        "in Ray tasks, the model in an actor pool, rows written in input order and equal to a local "
                        "run's; the input paths must be readable on every node (needs pip install 'cxr[ray]')")
    p.add_argument("--resume", action="store_true",
                   help="with --ray and --output FILE: skip the inputs an earlier run already scored into FILE (its "
                        "journal FILE.journal.jsonl, matched by path and SHA-256); the output is then written whole")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    p.add_argument("--timing", action="store_true", help="print import/session/preprocess/inference times to stderr")
    p.add_argument("--version", action="version", version=f"cxr-infer {_version()}")
    return p


def _version() -> str:
    from . import __version__
    return __version__


class Progress:
    """A tiny progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self._last, self._t0 = total, enabled, 0, 0.0, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            frac = self.done / max(self.total, 1)
            rate = self.done / max(now - self._t0, 1e-9)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} {rate:.1f} img/s")
            sys.stderr.flush()

    def clear(self) -> None:
        """Erase the bar (before another line is written to stderr; it is redrawn on the next step)."""
        if self.enabled and self.done:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()
            self._last = 0.0

    def close(self) -> None:
        self.clear()


def _unprefixed(message: str, path: str) -> str:
    """``message`` without the input's name in front (the caller puts it there)."""
    for prefix in (path + ": ", "<bytes>: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _say(message: str) -> None:
    sys.stderr.write(f"cxr-infer: {message}\n")
    sys.stderr.flush()


_STDIN: Dict[str, bytes] = {}


def _sources(files: List[str]) -> Iterator[Any]:
    for f in files:
        if f == "-":
            _STDIN["-"] = sys.stdin.buffer.read()  # kept: a --heatmap overlay shows the image again
            yield _STDIN["-"]
        else:
            yield f


def _overlay_writer(folder: str, clf: Any) -> Any:
    """``write(path, prediction)``: the input's heatmap overlay as DIR/<name>.png (names never reused)."""
    from .errors import InputError

    if not clf.heatmap_available:
        raise UsageError(f"--heatmap: {clf.name} has no heatmap output (add it: python -m cxr_export.heatmap "
                         "MODEL.onnx)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--heatmap {folder}: cannot create the folder ({exc.strerror or exc})") from None
    from .overlay import open_display, overlay_name, render_overlay

    taken: set = set()  # names unique within the run; a rerun into the same folder replaces its files

    def write(path: str, prediction: Any) -> None:
        image = open_display(_STDIN.get(path, path))
        if image is None:
            raise InputError("cannot be read again for its --heatmap overlay")
        target = os.path.join(folder, overlay_name(path, taken))
        try:
            render_overlay(image, prediction).save(target)
        except OSError as exc:
            raise InputError(f"cannot write its overlay {target} ({exc.strerror or exc})") from None

    return write


def _open_output(args: argparse.Namespace, fmt: Any) -> IO[str]:
    """stdout, or the file ``--output`` names (a folder format: the folder is made; stdout lists)."""
    try:
        if fmt is not None and fmt.target == "folder":
            os.makedirs(args.output, exist_ok=True)
            return sys.stdout
        return open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None


def _output_format(args: argparse.Namespace) -> Any:
    """The ``--format`` entry, checked before any model is loaded."""
    from .formats import get_format

    try:
        fmt = get_format(args.format)
    except KeyError as exc:
        raise UsageError(f"--format: {exc.args[0]}") from None
    if fmt.target == "folder" and not args.output:
        raise UsageError(f"--format {fmt.name} writes into a folder: give it with --output DIR")
    problem = fmt.missing()
    if problem:
        raise UsageError(f"--format {fmt.name}: {problem}")
    return fmt


def _classify(args: argparse.Namespace, clf: Any, entries: List[Any], scanned: set, fmt: Any, out: IO[str],
              timing: Dict[str, float], results: Optional[Iterator[Any]] = None) -> int:
    """Classify every input (or take ``results``, one per file in order, from a runner), write each
    outcome through the format's writer; the exit status."""
    from .errors import InputError, NotAnImage
    from .formats import FormatContext

    files = [path for path, problem in entries if problem is None]
    overlays = _overlay_writer(args.heatmap, clf) if args.heatmap else None  # its errors before any output
    width = max((len(path) for path, _ in entries), default=4)
    writer = fmt.writer(FormatContext(out=out, folder=args.output if fmt.target == "folder" else None,
                                      width=width, classifier=clf))
    failed = outside = skipped = 0
    progress = Progress(len(files), enabled=not args.no_progress and len(files) >= PROGRESS_MIN_ITEMS
                        and sys.stderr.isatty())

    def fail(path: str, message: str) -> None:
        progress.clear()
        _say(f"{path}: {message}")

    if results is None:
        results = clf.iter_predict(_sources(files), timing=timing, heatmap=overlays is not None)
    for path, problem in entries:
        result = next(results) if problem is None else InputError(problem)
        if isinstance(result, NotAnImage) and path in scanned:  # an SR or a presentation state in a study
            skipped += 1
            fail(path, f"skipped: {_unprefixed(str(result), path)}")
        elif isinstance(result, InputError):
            failed += 1
            message = _unprefixed(str(result), path)
            fail(path, message)
            writer.error(path, message)
        elif result.in_domain is False and args.reject_out_of_domain:
            failed += 1
            message = "not classified: outside the model's intended use: " + "; ".join(result.domain_reasons)
            fail(path, message)
            try:
                writer.rejected(path, result, message)
            except InputError as exc:  # e.g. its "not classified" SR cannot be written
                fail(path, str(exc))
        else:
            outside += result.in_domain is False
            try:
                writer.result(path, result)
                if overlays is not None:
                    overlays(path, result)
            except InputError as exc:  # e.g. its SR cannot be written: this input failed, the rest go on
                failed += 1
                fail(path, str(exc))
        if problem is None:
            progress.step()
    progress.close()
    writer.close()
    out.flush()
    total = len(entries) - skipped
    if outside:
        _say(f"{outside} of {total} inputs look outside the model's domain (marked OUTSIDE): "
             "their labels are not reliable")
    if skipped and not total:
        _say(f"no image to classify: the {skipped} DICOM objects found hold none")
        return 1
    if failed or skipped:
        _say(f"{total - failed} of {total} inputs classified, {failed} failed"
             + (f"; {skipped} DICOM objects without an image skipped" if skipped else ""))
    return 1 if failed else 0


def _runner(args: argparse.Namespace) -> Any:
    """The ``--ray`` runner (None without it), its usage checked before any model is loaded."""
    if args.resume and not (args.ray and args.output):
        raise UsageError("--resume goes with --ray and --output FILE (the journal of FILE says what is done)")
    if not args.ray:
        return None
    if args.info or args.heatmap or "-" in args.inputs:
        raise UsageError("--ray scores files and folders: not with --info, --heatmap or - (stdin)")
    from .runners import get_runner

    try:
        runner = get_runner("ray")
    except KeyError as exc:
        raise UsageError(f"--ray: {exc.args[0]}") from None
    problem = runner.missing()
    if problem:
        raise UsageError(f"--ray: {problem}")
    return runner


def _run_request(args: argparse.Namespace, clf: Any, files: List[str], fmt: Any) -> Any:
    """What the ``--ray`` runner needs: the files, the driver's classifier and its workers' options."""
    from .runners import RunRequest

    journal = None
    if args.output:
        journal = (os.path.join(args.output, "cxr-journal.jsonl") if fmt.target == "folder"
                   else args.output + ".journal.jsonl")
    options = {"device": args.device, "threads": args.threads, "threshold": args.threshold,
               "batch_size": args.batch_size, "domain_threshold": args.domain_threshold,
               "domain_flag_rate": args.domain_flag_rate}
    return RunRequest(address=args.ray, files=files, classifier=clf, classifier_options=options,
                      journal=journal, resume=args.resume, say=_say)


def _manifest(path: str) -> List[str]:
    """The inputs a ``--files-from`` manifest lists, in order."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--files-from {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return [line for line in lines if line and not line.startswith("#")]


def _run(args: argparse.Namespace, timing: Dict[str, float]) -> int:
    if args.files_from:
        args.inputs = list(args.inputs) + _manifest(args.files_from)
    if not args.inputs and not args.info:
        raise UsageError("no inputs given (try: cxr-infer --model MODEL.onnx IMAGE...; see --help)")
    if args.json and not args.info:
        raise UsageError("--json goes with --info (for results as JSON lines: --format jsonl)")
    runner = _runner(args)
    fmt = None if args.info else _output_format(args)
    t0, c0 = time.perf_counter(), time.process_time()
    import numpy  # noqa: F401  (already imported; named for the timing split)
    import onnxruntime  # noqa: F401

    from .classifier import Classifier
    timing["import"] = time.perf_counter() - t0
    timing["cpu_import"] = time.process_time() - c0

    scanned: set = set()  # found by a folder scan or a glob: a DICOM object without an image there is skipped
    entries = expand_inputs(args.inputs, scanned)
    if fmt is not None and fmt.input_problem is not None:
        entries = [(path, problem or fmt.input_problem(path)) for path, problem in entries]
    files = [path for path, problem in entries if problem is None]

    t0, c0 = time.perf_counter(), time.process_time()
    clf = Classifier(args.model, device=args.device, threads=args.threads, threshold=args.threshold,
                     batch_size=args.batch_size, warmup=False, images=len(files),
                     domain_threshold=args.domain_threshold, domain_flag_rate=args.domain_flag_rate)
    timing["session"] = time.perf_counter() - t0
    timing["cpu_session"] = time.process_time() - c0
    c0 = time.process_time()
    if args.reject_out_of_domain and not args.info and not clf.domain_available and clf.intended_use is None:
        raise UsageError(f"--reject-out-of-domain: {clf.name} has neither domain statistics nor an intended_use "
                         "block, so no check is possible (add statistics: python -m cxr_export.domain RUN_DIR "
                         "MODEL.onnx --data TRAIN_DIR)")
    results = runner.results(_run_request(args, clf, files, fmt)) if runner is not None else None
    out = _open_output(args, fmt)
    try:
        if args.info:
            from .info import summary

            out.write((json.dumps(clf.info(), indent=2) if args.json else summary(clf)) + "\n")
            return 0
        status = _classify(args, clf, entries, scanned, fmt, out, timing, results)
        timing["cpu_classify"] = time.process_time() - c0
        return status
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cxr-infer``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(plugins=any(a in ("-h", "--help") for a in argv))
    args = parser.parse_args(argv)  # exits 2 on usage errors, 0 on --help/--version
    show_timing = args.timing or os.environ.get("CXR_TIMING", "") not in ("", "0")
    timing: Dict[str, float] = {}
    try:
        status = _run(args, timing)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _say(str(exc))
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except BrokenPipeError:  # e.g. piped into head: not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:  # CXRError (model, device) and anything unforeseen: one line, no traceback
        from .errors import one_line

        _say(one_line(exc))
        return 2
    if show_timing:
        timing["total"] = time.perf_counter() - T_START
        timing["cpu_total"] = time.process_time()
        keys = ("import", "session", "preprocess", "inference", "total")
        wall = " ".join(f"{k}={timing[k] * 1000:.1f}ms" for k in keys if k in timing)
        cpu = " ".join(f"{k}={timing['cpu_' + k] * 1000:.1f}ms" for k in ("import", "session", "classify", "total")
                       if "cpu_" + k in timing)
        sys.stderr.write(f"cxr-infer timing: {wall} (total: since the cli module was imported); "
                         f"cpu: {cpu} (all threads; total: whole process)\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
