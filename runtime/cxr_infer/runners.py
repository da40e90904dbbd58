"""Where ``cxr-infer`` runs its inputs: in this process (the default), or on an engine another
package brings, such as a Ray cluster (``cxr-infer --ray ADDRESS``, from ``cxr_serve``).

An engine is a :class:`Runner`, found through the ``cxr.runners`` entry point group, so the
runtime never imports the package (nor Ray) that provides it. A runner gets the inputs, the
run's :class:`~cxr_infer.classifier.Classifier` and the options its workers build their own
from, and yields one result per input, in input order: the command then writes them through
the same format writers as a local run, so the rows are the same.

Examples:
    >>> get_runner("no-such-engine")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    KeyError: 'no-such-engine: not installed ...'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

#: The entry point group through which installed packages add runners (value: a Runner).
ENTRY_POINT_GROUP = "cxr.runners"

#: What to install for the runners cxr knows of, for the message when one is missing.
INSTALL_HINTS = {"ray": "pip install 'cxr[ray]'"}


@dataclass(frozen=True)
class RunRequest:
    """One run for a runner: the engine's ``address``, the input ``files`` in order, the driver's
    ``classifier`` (its spec and loader), the keyword arguments a worker gives its own
    :class:`~cxr_infer.classifier.Classifier` (``classifier_options``, the model file's bytes
    included), a ``journal`` file that records each finished input (None: none is kept), whether
    to ``resume`` from it, and ``say`` for progress lines."""

    address: str
    files: List[str]
    classifier: Any
    classifier_options: Mapping[str, Any] = field(default_factory=dict)
    journal: Optional[str] = None
    resume: bool = False
    say: Callable[[str], None] = print


@dataclass(frozen=True)
class Runner:
    """An engine: its ``name`` (``cxr-infer --NAME ADDRESS``), one line of help,
    ``results(request)``, which yields a :class:`~cxr_infer.prediction.Prediction` or an
    :class:`~cxr_infer.errors.InputError` per input file, in the order given, and ``missing()``:
    None, or the one line that says what to install."""

    name: str
    description: str
    results: Callable[[RunRequest], Iterator[Any]]
    missing: Callable[[], Optional[str]] = lambda: None


_REGISTERED: Dict[str, Runner] = {}


def register_runner(runner: Runner) -> None:
    """Add (or replace) a runner for this process (tests, embedding code)."""
    _REGISTERED[runner.name] = runner


def get_runner(name: str) -> Runner:
    """The runner ``name``: one registered in this process, else an installed package's.

    Raises:
        KeyError: it is not installed (the message says what to install) or cannot be loaded.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    from importlib.metadata import distributions

    # every installed copy's metadata, not only the first one found: a stale cxr.egg-info in the
    # working directory would otherwise hide the installed entry points
    found = (e for d in distributions() for e in d.entry_points if e.group == ENTRY_POINT_GROUP and e.name == name)
    for entry in found:
        try:
            value = entry.load()
        except ImportError as exc:
            raise KeyError(f"{name}: cannot be loaded ({exc}); {INSTALL_HINTS.get(name, 'reinstall cxr')}") from None
        if not isinstance(value, Runner):
            raise KeyError(f"{name}: {entry.value} is not a Runner")
        return value
    raise KeyError(f"{name}: not installed ({INSTALL_HINTS.get(name, 'no package provides it')})")
