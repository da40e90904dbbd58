"""The durable job queue of ``cxr-node``: received instances and their SRs in one folder.

Every instance is written to ``DIR/incoming/`` (a temporary name, flushed to disk, then renamed)
and a row added to the SQLite table ``DIR/jobs.sqlite`` before the C-STORE response goes back,
so an acknowledged image is never lost. A job moves ``received`` -> ``classified`` (its SR
written to ``DIR/sr/``) -> ``stored`` (the destination confirmed it; both files are then
deleted), or ends ``failed`` (unreadable header: one line in the log, no SR) or ``ignored``
(neither CR nor DX). A job is keyed by its SOP Instance UID, so the same instance received twice
is one job. After a crash the worker resumes from the table: a ``received`` job is classified
again, a ``classified`` one sent again under the same SR UID (a PACS keeps one copy).

Examples:
    >>> q = JobQueue("/var/lib/cxr-node")                                    # doctest: +SKIP
    >>> q.counts()                                                           # doctest: +SKIP
    {'received': 0, 'classified': 2, 'stored': 1204, 'failed': 1, 'ignored': 3}
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

STATES = ("received", "classified", "stored", "failed", "ignored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    sop_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    received REAL NOT NULL,
    classified REAL,
    stored REAL,
    sr_uid TEXT NOT NULL DEFAULT '',
    answer TEXT NOT NULL DEFAULT '',
    tries INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_try);
"""


@dataclass(frozen=True)
class Job:
    """One row of the job table (no patient data: UIDs, times and the answer's words)."""

    sop_instance_uid: str
    state: str
    received: float
    sr_uid: str = ""
    tries: int = 0


def _safe(uid: str) -> str:
    """A file name for a UID (UIDs are digits and dots; anything else is replaced)."""
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:128] or "_"


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JobQueue:
    """The job table and its files in one state folder (safe to use from several threads)."""

    def __init__(self, folder: Union[str, Path], create: bool = True) -> None:
        self.folder = Path(folder)
        db = self.folder / "jobs.sqlite"
        if not create and not db.is_file():
            raise FileNotFoundError(f"{self.folder} holds no cxr-node job table (jobs.sqlite)")
        for sub in ("incoming", "sr"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the table."""
        with self._lock:
            self._db.close()

    def image_path(self, uid: str) -> Path:
        """Where a received instance is kept until its SR is stored."""
        return self.folder / "incoming" / f"{_safe(uid)}.dcm"

    def sr_path(self, uid: str) -> Path:
        """Where the SR of a received instance is kept until the destination has it."""
        return self.folder / "sr" / f"{_safe(uid)}.dcm"

    def receive(self, uid: str, data: bytes, modality: str, calling_ae: str) -> bool:
        """Keep one instance (on disk, then in the table) before it is acknowledged; False when
        the table already had it (a second copy is one job)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM jobs WHERE sop_instance_uid=?", (uid,)).fetchone():
                return False
        _write_durably(self.image_path(uid), data)
        with self._lock:
            cur = self._db.execute("INSERT OR IGNORE INTO jobs (sop_instance_uid, state, modality, calling_ae, "
                                   "received) VALUES (?, 'received', ?, ?, ?)",
                                   (uid, modality, calling_ae, time.time()))
            return cur.rowcount == 1

    def note(self, uid: str, state: str, modality: str, calling_ae: str, note: str) -> None:
        """Record an instance that is not queued (``ignored`` or ``failed`` at receipt)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO jobs (sop_instance_uid, state, modality, calling_ae, received, "
                             "note) VALUES (?, ?, ?, ?, ?, ?)", (uid, state, modality, calling_ae, time.time(), note))

    def next_job(self) -> Optional[Job]:
        """The next job to work on: an SR due to be sent first, else the oldest received image."""
        now = time.time()
        with self._lock:
            row = self._db.execute(
                "SELECT sop_instance_uid, state, received, sr_uid, tries FROM jobs WHERE state='classified' "
                "AND next_try<=? ORDER BY next_try, received LIMIT 1", (now,)).fetchone()
            if row is None:
                row = self._db.execute(
                    "SELECT sop_instance_uid, state, received, sr_uid, tries FROM jobs WHERE state='received' "
                    "ORDER BY received LIMIT 1").fetchone()
        return Job(*row) if row else None

    def classified(self, uid: str, sr: bytes, sr_uid: str, answer: str) -> None:
        """The SR of a job is written: keep it, then mark the job ``classified``."""
        _write_durably(self.sr_path(uid), sr)
        with self._lock:
            self._db.execute("UPDATE jobs SET state='classified', classified=?, sr_uid=?, answer=? "
                             "WHERE sop_instance_uid=?", (time.time(), sr_uid, answer, uid))

    def failed(self, uid: str, note: str) -> None:
        """A job that cannot give an SR (its instance cannot be read)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state='failed', note=? WHERE sop_instance_uid=?", (note, uid))
        self.image_path(uid).unlink(missing_ok=True)

    def retry_later(self, uid: str, wait: float, note: str) -> None:
        """The destination did not take the SR: try again after ``wait`` seconds."""
        with self._lock:
            self._db.execute("UPDATE jobs SET tries=tries+1, next_try=?, note=? WHERE sop_instance_uid=?",
                             (time.time() + wait, note, uid))

    def stored(self, uid: str) -> None:
        """The destination has the SR: mark the job ``stored`` and delete its files."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state='stored', stored=?, note='' WHERE sop_instance_uid=?",
                             (time.time(), uid))
        self.image_path(uid).unlink(missing_ok=True)
        self.sr_path(uid).unlink(missing_ok=True)

    def pending(self) -> int:
        """Jobs not yet done (received or classified)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('received', 'classified')")
                       .fetchone()[0])

    def next_due(self) -> Optional[float]:
        """When the earliest waiting SR is due to be sent again (None when none waits)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(next_try) FROM jobs WHERE state='classified'").fetchone()
        return row[0] if row and row[0] is not None else None

    def counts(self) -> Dict[str, int]:
        """How many jobs are in each state."""
        with self._lock:
            rows = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: int(rows.get(s, 0)) for s in STATES}

    def latencies(self) -> List[float]:
        """Receipt-to-stored seconds of every stored job."""
        with self._lock:
            return [float(r[0]) for r in self._db.execute(
                "SELECT stored - received FROM jobs WHERE state='stored' ORDER BY stored")]


def percentile(values: List[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (0-100, linear between ranks) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
