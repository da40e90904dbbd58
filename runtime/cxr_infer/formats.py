"""Output formats of ``cxr-infer``: one writer per format, one table of formats.

The runtime brings ``table``, ``jsonl`` and ``csv``; other packages add theirs through the
``cxr.formats`` entry point group (``cxr_hospital``: ``dicom-sr``, ``fhir``), so the runtime never
imports them; embedding code may :func:`register_format` its own.

Examples:
    >>> sorted(BUILTIN_FORMATS)
    ['csv', 'jsonl', 'table']
    >>> import io
    >>> out = io.StringIO()
    >>> w = BUILTIN_FORMATS["jsonl"].writer(FormatContext(out=out))
    >>> w.error("missing.jpeg", "no such file"); out.getvalue()
    '{"path": "missing.jpeg", "error": "no such file"}\\n'
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Optional

#: The entry point group through which installed packages add formats (value: an OutputFormat).
ENTRY_POINT_GROUP = "cxr.formats"


@dataclass(frozen=True)
class FormatContext:
    """What a writer may use: the stream (stdout or ``--output FILE``), the folder of a folder
    format, the longest input name (for the table) and the classifier that made the results."""

    out: IO[str]
    folder: Optional[str] = None
    width: int = 4
    classifier: Any = None


class ResultWriter:
    """Receives every input's outcome, in input order, then :meth:`close`; by default a failure
    writes nothing and an input left unclassified (outside the intended use) is a failure."""

    def __init__(self, context: FormatContext) -> None:
        self.context = context
        self.out = context.out

    def result(self, path: str, prediction: Any) -> None:
        """A classified input (raise :class:`~cxr_infer.errors.InputError` when it cannot be written)."""
        raise NotImplementedError

    def rejected(self, path: str, prediction: Any, message: str) -> None:
        """An input outside the intended use, not classified, and why."""
        self.error(path, message)

    def error(self, path: str, message: str) -> None:
        """An input that failed, and why (it is also reported on stderr)."""

    def close(self) -> None:
        """Every input has been seen."""


@dataclass(frozen=True)
class OutputFormat:
    """One output format: its ``--format`` name, one line for ``--help``, ``writer(context)``
    giving the run's :class:`ResultWriter`, ``target`` ``"stream"`` (stdout or ``--output FILE``) or
    ``"folder"`` (``--output DIR`` required), ``missing()`` (None, or what to install) and
    ``input_problem(path)`` (why it can never take an input, asked before classifying)."""

    name: str
    description: str
    writer: Callable[[FormatContext], ResultWriter]
    target: str = "stream"
    missing: Callable[[], Optional[str]] = lambda: None
    input_problem: Optional[Callable[[str], Optional[str]]] = None


def _in_domain_word(value: Optional[bool]) -> str:
    return "" if value is None else str(value).lower()


class TableWriter(ResultWriter):
    """A table for people: path, label, probability, threshold, domain status with reasons."""

    def __init__(self, context: FormatContext) -> None:
        super().__init__(context)
        self.width = max(4, min(context.width, 100))
        self.out.write(f"{'path':<{self.width}}  {'label':<12} {'probability':>11}  {'threshold':>9}  domain\n")

    def result(self, path: str, prediction: Any) -> None:
        marker = "n/a" if prediction.in_domain is None else ("ok" if prediction.in_domain else "OUTSIDE (!)")
        if prediction.domain_reasons:
            marker += ": " + "; ".join(prediction.domain_reasons)
        p = round(prediction.probability, 6)
        self.out.write(f"{path:<{self.width}}  {prediction.label:<12} {p:>11.4f}  {prediction.threshold:>9.4g}  "
                       f"{marker}\n")


class JsonLinesWriter(ResultWriter):
    """One JSON object per input: the prediction record (:meth:`Prediction.to_dict`), or
    ``{"path", "error"}``."""

    def result(self, path: str, prediction: Any) -> None:
        row = prediction.to_dict(rounded=True)
        row["path"] = path
        self.out.write(json.dumps(row) + "\n")

    def error(self, path: str, message: str) -> None:
        self.out.write(json.dumps({"path": path, "error": message}) + "\n")


class CsvWriter(ResultWriter):
    """A CSV row per input (reasons joined with ``; ``), errors in their own column."""

    COLUMNS = ["path", "label", "probability", "threshold", "in_domain", "domain_score", "domain_reasons", "error"]

    def __init__(self, context: FormatContext) -> None:
        super().__init__(context)
        self._csv = csv.writer(self.out, lineterminator="\n")
        self._csv.writerow(self.COLUMNS)

    def result(self, path: str, prediction: Any) -> None:
        row = prediction.to_dict(rounded=True)
        score = row["domain_score"]
        self._csv.writerow([path, row["label"], f"{row['probability']:.6f}", row["threshold"],
                            _in_domain_word(row["in_domain"]), "" if score is None else score,
                            "; ".join(row["domain_reasons"]), ""])

    def error(self, path: str, message: str) -> None:
        self._csv.writerow([path, "", "", "", "", "", "", message])


BUILTIN_FORMATS: Dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("table", "path, label, probability of the positive label, threshold, domain status", TableWriter),
    OutputFormat("jsonl", '{"path", "label", "probability", "threshold", "probabilities", "in_domain", '
                          '"domain_score", "domain_reasons": [...]} or {"path", "error"}', JsonLinesWriter),
    OutputFormat("csv", "path,label,probability,threshold,in_domain,domain_score,domain_reasons,error "
                        "(reasons joined with '; ')", CsvWriter),
)}

_REGISTERED: Dict[str, OutputFormat] = {}
_PLUGINS: Dict[str, Any] = {}


def register_format(fmt: OutputFormat) -> None:
    """Add (or replace) a format for this process: ``cxr-infer --format NAME`` in-process and
    :func:`output_formats` see it."""
    _REGISTERED[fmt.name] = fmt


def _plugins() -> Dict[str, Any]:
    """The installed packages' formats (``cxr.formats`` entry points), loaded once: an
    :class:`OutputFormat`, or the one line saying why it could not be loaded."""
    if not _PLUGINS:
        from importlib.metadata import entry_points

        _PLUGINS[""] = None  # loaded, even when there are none
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                value = entry.load()
            except Exception as exc:  # a broken plugin must not stop the built-in formats
                value = f"cannot be loaded from {entry.value} ({type(exc).__name__}: {exc})"
            _PLUGINS[entry.name] = value if isinstance(value, (OutputFormat, str)) else \
                f"{entry.value} is not an OutputFormat"
    return {k: v for k, v in _PLUGINS.items() if k}


def output_formats(plugins: bool = True) -> Dict[str, OutputFormat]:
    """Every format by name: the built-ins, then the installed packages' (``plugins``), then those
    registered in this process."""
    found = dict(BUILTIN_FORMATS)
    if plugins:
        found.update({k: v for k, v in _plugins().items() if isinstance(v, OutputFormat)})
    found.update(_REGISTERED)
    return found


def get_format(name: str) -> OutputFormat:
    """The format ``name`` (installed packages are asked only for a name that is not built in).

    Raises:
        KeyError: no such format; the message lists the ones there are.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN_FORMATS:
        return BUILTIN_FORMATS[name]
    plugin = _plugins().get(name)
    if isinstance(plugin, OutputFormat):
        return plugin
    if isinstance(plugin, str):
        raise KeyError(f"format {name!r} {plugin}")
    raise KeyError(f"unknown format {name!r} (choose one of {', '.join(output_formats())})")
