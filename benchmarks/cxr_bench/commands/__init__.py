"""The ``cxr-bench`` commands: one :class:`Command` entry each, in :data:`COMMANDS`, from which
``cxr-bench`` builds its parser; ``cxr-bench summary`` finds reports by their entry's ``kind``.
A new command is a module here, one entry below and its tests (see docs/benchmarks.md).

Examples:
    >>> list(COMMANDS)[:3]
    ['accuracy', 'latency', 'e2e']
    >>> command_for_kind("cxr-bench/accuracy").name
    'accuracy'
"""
from __future__ import annotations

from typing import Dict, Optional

from . import accuracy, card, domain, e2e, formats, graphcost, heatmaps, latency, node, serve, summary
from .base import Command, Summary

COMMANDS: Dict[str, Command] = {c.name: c for c in (
    accuracy.COMMAND, latency.COMMAND, e2e.COMMAND, graphcost.COMMAND, domain.COMMAND, heatmaps.COMMAND,
    formats.COMMAND, card.COMMAND, node.COMMAND, serve.COMMAND, summary.COMMAND)}

__all__ = ["COMMANDS", "Command", "Summary", "command_for_kind"]


def command_for_kind(kind: object) -> Optional[Command]:
    """The command whose reports have this ``kind`` (None for anything else)."""
    return next((c for c in COMMANDS.values() if c.kind is not None and c.kind == kind), None)
