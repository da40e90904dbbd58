"""The ``cxr-bench`` commands: one :class:`Command` entry each, in :data:`COMMANDS`.

``cxr-bench`` builds its parser from this table and runs what it names; ``cxr-bench summary``
and ``--summary`` find reports by the ``kind`` of the entry that wrote them and put them in
brief as its ``summary`` says. A new command is a module here (its arguments, ``run`` and
``summary``; the measuring in a module of :mod:`cxr_bench`) and one entry below, plus its tests.

Examples:
    >>> list(COMMANDS)[:3]
    ['accuracy', 'latency', 'e2e']
    >>> command_for_kind("cxr-bench/accuracy").name
    'accuracy'
"""
from __future__ import annotations

from typing import Dict, Optional

from . import accuracy, domain, e2e, formats, graphcost, heatmaps, latency, summary
from .base import Command, Summary

COMMANDS: Dict[str, Command] = {c.name: c for c in (
    accuracy.COMMAND, latency.COMMAND, e2e.COMMAND, graphcost.COMMAND, domain.COMMAND, heatmaps.COMMAND,
    formats.COMMAND, summary.COMMAND)}

__all__ = ["COMMANDS", "Command", "Summary", "command_for_kind"]


def command_for_kind(kind: object) -> Optional[Command]:
    """The command whose reports have this ``kind`` (None for anything else)."""
    return next((c for c in COMMANDS.values() if c.kind is not None and c.kind == kind), None)
