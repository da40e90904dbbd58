"""``cxr-infer``: classify chest X-ray images with a cxr ONNX model.

Exit status: 0 every input classified (a folder scan's DICOM objects without an image, such as
reports and presentation states, are skipped), 1 some inputs failed (each named on stderr) or
none was an image, 2 usage, model or device error. Heavy imports (numpy, Pillow, onnxruntime)
happen only after the arguments are parsed, so ``--help`` is instant.

Example:
    $ cxr-infer --model resnet50_int8.onnx scans/ --format jsonl --output results.jsonl
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import IMAGE_SUFFIXES

T_START = time.perf_counter()

# numpy's OpenBLAS would start a spinning thread per core at import; nothing here uses BLAS
# (onnxruntime has its own threads), so a cold cxr-infer saves ~100 ms of CPU without them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

PROGRESS_MIN_ITEMS = 16

EPILOG = """\
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
      print the model's spec (backbone, input, labels, threshold, provenance)
  cxr-infer --model m.onnx --reject-out-of-domain scans/
      images outside the model's intended use (by DICOM header or by the image itself)
      are not classified (reported as failed, with the reasons)
  cat image.dcm | cxr-infer --model m.onnx -

output:
  table   path, label, probability of the positive label, threshold, domain
  jsonl   {"path", "label", "probability", "threshold", "probabilities", "in_domain",
          "domain_score", "domain_reasons": [...]} or {"path", "error"}
  csv     path,label,probability,threshold,in_domain,domain_score,domain_reasons,error
          (reasons joined with "; ")
  dicom-sr  one DICOM Comprehensive SR per DICOM input, into the folder --output DIR (needs
          pip install 'cxr[dicom]'); stdout lists input<TAB>SR file. Non-DICOM inputs fail.
  fhir    one FHIR R4 Bundle (JSON): a Device for the model, an Observation per result,
          an OperationOutcome per failed input
  Bad inputs are also reported on stderr, one line each; the rest are still classified.

intended use and the out-of-domain check:
  A model's intended use (for the shipped models: chest radiographs, PA/AP, of children aged
  1-5 years) is checked against each DICOM header before inference: an adult, a lateral view,
  a CT or a localizer is outside, with the reason in words ("patient age 67Y is outside the
  intended 1-5 years"); a missing tag is never a reason. Models with domain statistics also
  score how far each image lies from the X-rays they were trained on. domain "ok": inside;
  "OUTSIDE (!): reasons": outside, so its label must not be trusted; "n/a": no check was
  possible (the model file has no domain statistics; --info says which checks it has).

exit status:
  0 all inputs classified, 1 some inputs failed, 2 usage, model or device error

environment:
  CXR_TIMING=1    print the time spent in each phase to stderr (same as --timing)
  CXR_PREFETCH=0  decode each batch only when it runs (default: the next batch is decoded in a
                  second thread while one runs; 9-16% faster on full-size images on 2 cores)
"""


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _domain_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _flag_rate(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.10 or 10%)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1) (e.g. 0.10 or 10%)")
    return value


def _positive(text: str) -> int:
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
    ``domain_threshold`` (cxr-infer and cxr-pacs)."""
    strict = p.add_mutually_exclusive_group()
    strict.add_argument("--domain-flag-rate", type=_flag_rate, metavar="R",
                        help="how strict the image check is: flag this share of in-population images (the "
                             "model's validation X-rays), e.g. 0.10 or 10%%. Higher catches more images outside "
                             "the intended use (adults, other views) and flags more children's X-rays too "
                             "(default: the model's own, about 0.05). Needs a model file with operating points "
                             "(cxr-infer --info lists them)")
    strict.add_argument("--domain-threshold", type=_domain_threshold, metavar="S",
                        help="the same as a raw domain-score threshold: scores above S are out of domain "
                             "(default: the model's own; cxr-bench domain --validation gives S for each flag "
                             "rate of files without operating points)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-infer",
        description="Classify chest X-ray images (NORMAL / PNEUMONIA) with a self-describing cxr ONNX model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, glob patterns, or -")
    p.add_argument("-m", "--model", metavar="FILE",
                   help="cxr .onnx model (default: the model embedded in the package, if installed)")
    p.add_argument("--device", choices=("cpu", "cuda", "openvino", "auto"), default="cpu",
                   help="where to run: cpu (default: the onnxruntime CPU provider), cuda (TensorRT/CUDA), "
                        "openvino (the OpenVINO runtime on the CPU, Intel or AMD: pip install 'cxr[openvino]'), "
                        "auto (cuda when available, else openvino for 128 or more images where it is installed, "
                        "else cpu)")
    p.add_argument("--threshold", type=_threshold, metavar="T",
                   help="decision threshold for the positive label, in [0, 1] (default: the model's own)")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="N",
                   help="images per inference batch (default 8)")
    p.add_argument("--threads", type=_positive, metavar="N",
                   help="CPU threads for inference (default: the cores this process may use)")
    p.add_argument("--format", choices=("table", "jsonl", "csv", "dicom-sr", "fhir"), default="table",
                   help="output format (default table)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write results to FILE instead of stdout (for dicom-sr: the folder DIR to write SRs into)")
    p.add_argument("--info", action="store_true", help="print the model's spec and graph as JSON, then exit")
    p.add_argument("--reject-out-of-domain", action="store_true",
                   help="do not classify images outside the model's intended use (DICOM header or image "
                        "check): report them as failed inputs with the reasons (exit 1)")
    add_domain_strictness(p)
    p.add_argument("--heatmap", metavar="DIR",
                   help="also write one PNG per input into DIR: the image with the model's Grad-CAM attention over "
                        "it, the label, probability and intended-use status (model attention, not a localisation)")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    p.add_argument("--timing", action="store_true", help="print import/session/preprocess/inference times to stderr")
    p.add_argument("--version", action="version", version=f"cxr-infer {_version()}")
    return p


def _version() -> str:
    from . import __version__
    return __version__


# ---- inputs
def _looks_like_extensionless_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    from .dicom import looks_like_dicom

    return looks_like_dicom(head)


def _walk(folder: str) -> List[str]:
    """The image files under ``folder``, in sorted order. Linked folders are followed (a PACS
    export or a mounted share often links them), each real folder once, so a link that points
    back up ends the descent instead of looping."""
    found = []
    visited = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f.upper() == "DICOMDIR":  # a DICOM medium's index, never an image
                continue
            path = os.path.join(root, f)
            suffix = os.path.splitext(f)[1].lower()
            if suffix in IMAGE_SUFFIXES or (not suffix and _looks_like_extensionless_dicom(path)):
                found.append(path)
    return found


def expand_inputs(args: Sequence[str], scanned: Optional[set] = None) -> List[Tuple[str, Optional[str]]]:
    """``(path, None)`` per file to classify and ``(arg, problem)`` per arg that gives none, in order.

    Folders are searched recursively and globs expanded (``**`` included); duplicates are dropped,
    a file reached twice (through a link, or named and found) included: the first path is kept.
    A path that does not exist is kept: the classifier names its problem like any other. The
    paths a folder or a glob gave (not named as such) are added to ``scanned``, if given.
    """
    entries: List[Tuple[str, Optional[str]]] = []
    seen = set()

    def add(path: str, by_scan: bool = True) -> None:
        key = os.path.realpath(path) if path != "-" and os.path.exists(path) else path
        if key not in seen:
            seen.add(key)
            entries.append((path, None))
            if by_scan and scanned is not None:
                scanned.add(path)

    for arg in args:
        if arg == "-" or os.path.isfile(arg):
            add(arg, by_scan=False)
        elif os.path.isdir(arg):
            found = _walk(arg)
            if not found:
                entries.append((arg, "folder holds no image files"))
            for f in found:
                add(f)
        elif glob.has_magic(arg):
            hits = []
            for m in sorted(glob.glob(arg, recursive=True)):
                hits.extend(_walk(m) if os.path.isdir(m) else [m])
            if not hits:
                entries.append((arg, "no files match this pattern"))
            for f in hits:
                add(f)
        else:
            add(arg, by_scan=False)
    return entries


# ---- output
class Writer:
    """Streams results as a table, JSON lines or CSV; DICOM SR and FHIR are views of their own
    (:class:`cxr_infer.sr.SRFolderWriter`, :class:`cxr_infer.fhir.FhirBundleWriter`)."""

    def __init__(self, fmt: str, out: IO[str], width: int, classifier: Any = None, folder: Optional[str] = None) -> None:
        self.fmt, self.out, self.width = fmt, out, max(4, min(width, 100))
        self._view: Any = None
        if fmt == "dicom-sr":
            from .sr import SRFolderWriter
            self._view = SRFolderWriter(folder or ".", classifier, out)
        elif fmt == "fhir":
            from .fhir import FhirBundleWriter
            self._view = FhirBundleWriter(classifier, out)
        elif fmt == "csv":
            import csv
            self._csv = csv.writer(out, lineterminator="\n")
            self._csv.writerow(["path", "label", "probability", "threshold", "in_domain", "domain_score",
                                "domain_reasons", "error"])
        elif fmt == "table":
            out.write(f"{'path':<{self.width}}  {'label':<12} {'probability':>11}  {'threshold':>9}  domain\n")

    def result(self, path: str, pred: Any) -> None:
        if self._view is not None:
            return self._view.result(path, pred)
        p = round(pred.probability, 6)
        score = None if pred.domain_score is None else round(pred.domain_score, 4)
        if self.fmt == "jsonl":
            obj = {"path": path, "label": pred.label, "probability": p, "threshold": pred.threshold,
                   "probabilities": {k: round(v, 6) for k, v in pred.probabilities.items()},
                   "in_domain": pred.in_domain, "domain_score": score, "domain_reasons": list(pred.domain_reasons)}
            self.out.write(json.dumps(obj) + "\n")
        elif self.fmt == "csv":
            in_domain = "" if pred.in_domain is None else str(pred.in_domain).lower()
            self._csv.writerow([path, pred.label, f"{p:.6f}", pred.threshold, in_domain,
                                "" if score is None else score, "; ".join(pred.domain_reasons), ""])
        else:
            marker = "n/a" if pred.in_domain is None else ("ok" if pred.in_domain else "OUTSIDE (!)")
            if pred.domain_reasons:
                marker += ": " + "; ".join(pred.domain_reasons)
            self.out.write(f"{path:<{self.width}}  {pred.label:<12} {p:>11.4f}  {pred.threshold:>9.4g}  {marker}\n")

    def rejected(self, path: str, pred: Any, message: str) -> None:
        """An input left unclassified because it is outside the intended use."""
        if self._view is not None:
            return self._view.rejected(path, pred, message)
        self.error(path, message)

    def close(self) -> None:
        if self._view is not None:
            self._view.close()

    def error(self, path: str, message: str) -> None:
        if self._view is not None:
            return self._view.error(path, message)
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"path": path, "error": message}) + "\n")
        elif self.fmt == "csv":
            self._csv.writerow([path, "", "", "", "", "", "", message])


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


def _run(args: argparse.Namespace, timing: Dict[str, float]) -> int:
    if not args.inputs and not args.info:
        raise UsageError("no inputs given (try: cxr-infer --model MODEL.onnx IMAGE...; see --help)")
    t0, c0 = time.perf_counter(), time.process_time()
    import numpy  # noqa: F401  (already imported; named for the timing split)
    import onnxruntime  # noqa: F401

    from .classifier import Classifier
    from .errors import InputError, NotAnImage
    timing["import"] = time.perf_counter() - t0
    timing["cpu_import"] = time.process_time() - c0

    scanned: set = set()  # found by a folder scan or a glob: a DICOM object without an image there is skipped
    entries = expand_inputs(args.inputs, scanned)
    if args.format == "dicom-sr" and not args.info:
        from .sr import available, input_problem
        if not args.output:
            raise UsageError("--format dicom-sr writes one SR file per DICOM input: give the folder with --output DIR")
        if available():
            raise UsageError(f"--format dicom-sr: {available()}")
        entries = [(path, problem or input_problem(path)) for path, problem in entries]
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

    try:
        if args.format == "dicom-sr" and args.output:
            os.makedirs(args.output, exist_ok=True)
        out: IO[str] = open(args.output, "w", encoding="utf-8", newline="") \
            if args.output and args.format != "dicom-sr" else sys.stdout
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    try:
        if args.info:
            out.write(json.dumps(clf.info(), indent=2) + "\n")
            return 0
        overlays = _overlay_writer(args.heatmap, clf) if args.heatmap else None  # its errors before any output
        writer = Writer(args.format, out, max((len(path) for path, _ in entries), default=4), clf, args.output)
        failed = outside = skipped = 0
        progress = Progress(len(files), enabled=not args.no_progress and len(files) >= PROGRESS_MIN_ITEMS
                            and sys.stderr.isatty())
        results = clf.iter_predict(_sources(files), timing=timing, heatmap=overlays is not None)
        for path, problem in entries:
            result = next(results) if problem is None else InputError(problem)
            if isinstance(result, NotAnImage) and path in scanned:  # an SR or a presentation state in a study
                skipped += 1
                progress.clear()
                _say(f"{path}: skipped: {_unprefixed(str(result), path)}")
            elif isinstance(result, InputError):
                failed += 1
                message = _unprefixed(str(result), path)
                progress.clear()
                _say(f"{path}: {message}")
                writer.error(path, message)
            elif result.in_domain is False and args.reject_out_of_domain:
                failed += 1
                message = "not classified: outside the model's intended use: " + "; ".join(result.domain_reasons)
                progress.clear()
                _say(f"{path}: {message}")
                try:
                    writer.rejected(path, result, message)
                except InputError as exc:  # its "not classified" SR cannot be written
                    _say(f"{path}: {exc}")
            else:
                outside += result.in_domain is False
                try:
                    writer.result(path, result)
                    if overlays is not None:
                        overlays(path, result)
                except InputError as exc:  # e.g. its SR cannot be written: this input failed, the rest go on
                    failed += 1
                    progress.clear()
                    _say(f"{path}: {exc}")
            if problem is None:
                progress.step()
        progress.close()
        writer.close()
        timing["cpu_classify"] = time.process_time() - c0
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
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cxr-infer``; returns the exit status."""
    parser = build_parser()
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
        from .errors import CXRError
        if os.environ.get("CXR_DEBUG") and not isinstance(exc, CXRError):
            raise
        if isinstance(exc, CXRError):
            _say(str(exc))
        else:
            _say(f"unexpected error: {type(exc).__name__}: {exc} (set CXR_DEBUG=1 for the traceback)")
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
