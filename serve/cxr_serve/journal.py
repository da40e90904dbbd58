"""The journal of a ``cxr-infer --ray --output FILE`` run: ``FILE.journal.jsonl``, one line per
finished input, written as each is scored, so an interrupted run loses nothing and ``--resume``
scores only what is missing or changed.

A line holds the input's path as given, the SHA-256 of its bytes and its outcome: the full
prediction record (unrounded, so a resumed run writes the very rows a fresh one would) or the
error. The last line of a path wins; a line cut short by a crash is ignored.

Examples:
    >>> from cxr_infer.prediction import Prediction
    >>> p = Prediction("NORMAL", 0.25, 0.5, {"NORMAL": 0.75, "PNEUMONIA": 0.25}, in_domain=True)
    >>> outcome_of(entry_of("a.jpeg", "ab12", p)) == p
    True
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any, Dict, Optional, Union

from cxr_infer.errors import InputError, NotAnImage
from cxr_infer.prediction import Prediction

Outcome = Union[Prediction, InputError]
ERRORS = {"InputError": InputError, "NotAnImage": NotAnImage}


def sha256_of(path: str) -> Optional[str]:
    """The SHA-256 of the file's bytes (None when it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def entry_of(path: str, sha256: Optional[str], outcome: Outcome) -> Dict[str, Any]:
    """The journal line of one finished input."""
    if isinstance(outcome, InputError):
        return {"path": path, "sha256": sha256, "error": str(outcome), "kind": type(outcome).__name__}
    return {"path": path, "sha256": sha256, "record": outcome.to_dict()}


def outcome_of(entry: Dict[str, Any]) -> Outcome:
    """The prediction or error a journal line holds (with the input's path as its source)."""
    if "error" in entry:
        return ERRORS.get(entry.get("kind"), InputError)(entry["error"])
    r = entry["record"]
    return Prediction(label=r["label"], probability=r["probability"], threshold=r["threshold"],
                      probabilities=dict(r["probabilities"]), source=entry["path"], in_domain=r["in_domain"],
                      domain_score=r["domain_score"], domain_reasons=tuple(r["domain_reasons"]))


class Journal:
    """``FILE.journal.jsonl``: :meth:`load` what an earlier run finished, :meth:`start` a run
    (keeping the entries still valid), :meth:`add` each finished input, :meth:`close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: Optional[IO[str]] = None

    def load(self) -> Dict[str, Dict[str, Any]]:
        """The entries by path (empty when there is no journal)."""
        entries: Dict[str, Dict[str, Any]] = {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line a crash cut short
                    if isinstance(entry, dict) and "path" in entry and ("record" in entry or "error" in entry):
                        entries[entry["path"]] = entry
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(f"cannot read the journal {self.path} ({exc.strerror or exc})") from None
        return entries

    def start(self, kept: Dict[str, Dict[str, Any]]) -> None:
        """Rewrite the journal with only ``kept`` (atomically), then append from here on."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for entry in kept.values():
                fh.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def add(self, path: str, sha256: Optional[str], outcome: Outcome) -> None:
        """Record one finished input (flushed: it survives the driver's crash)."""
        assert self._fh is not None, "start() the journal first"
        self._fh.write(json.dumps(entry_of(path, sha256, outcome)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
