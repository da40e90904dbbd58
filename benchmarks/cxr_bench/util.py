"""Small helpers shared by the cxr-bench modules: errors, JSON, progress, formatting.

Examples:
    >>> fmt_pct(0.93751)
    '93.75%'
    >>> clean_json({"a": float("nan")})
    {'a': None}
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from cxr_infer.errors import CXRError


class BenchError(CXRError):
    """A benchmark cannot run as asked; the message says what to do instead."""


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` to ``process`` if it still runs, wait up to ``timeout`` s, then kill it if it has
    not ended; its exit status. Servers and nodes that benchmarks and tests start stop this way."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (``YYYY-MM-DDTHH:MM:SSZ``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def clean_json(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` and numpy scalars/arrays by plain Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return clean_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically, creating parent folders; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented, strictly valid JSON (no NaN) atomically; return the path."""
    return write_text(path, json.dumps(clean_json(obj), indent=1, allow_nan=False) + "\n")


def new_report(kind: str, **fields: Any) -> Dict[str, Any]:
    """A report's envelope (kind, format version, time, tool version, the command) and ``fields``."""
    from . import __version__

    return {"kind": kind, "format_version": 1, "created": now_iso(), "cxr_bench_version": __version__,
            "command": command_line(), **fields}


def write_report(out: Path, base: str, name: Optional[str], report: Dict[str, Any],
                 render: Callable[[Dict[str, Any]], str], quiet: bool = False) -> Dict[str, str]:
    """Write ``report`` as ``out/STEM.json`` and ``render(report)`` as ``out/STEM.md``; returns
    ``report["files"]``, where their names are added to any the command recorded (plots, grids)."""
    stem, out = f"{base}-{name}" if name else base, Path(out)
    files = report["files"] = dict(report.get("files") or {}, json=f"{stem}.json", markdown=f"{stem}.md")
    write_json(out / files["json"], report)
    write_text(out / files["markdown"], render(report))
    say(f"wrote {out / files['markdown']} and {files['json']}", quiet)
    return files


class Progress:
    """Progress lines on stderr (``step()`` per item, ``done()``): in place on a terminal, every ~10% otherwise."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.count, self.enabled = label, max(int(total), 0), 0, enabled
        self.tty, self.start = sys.stderr.isatty(), time.perf_counter()
        self._last_decile, self._last_print = -1, self.start

    def step(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled or not self.total:
            return
        if self.tty:
            print(f"\r{self.label}: {self.count}/{self.total}", end="", file=sys.stderr, flush=True)
            return
        decile = (10 * self.count) // self.total
        quiet_for = time.perf_counter() - self._last_print
        if decile != self._last_decile and (quiet_for >= 2.0 or self.count >= self.total):
            self._last_decile, self._last_print = decile, time.perf_counter()
            print(f"{self.label}: {self.count}/{self.total}", file=sys.stderr, flush=True)

    def done(self, note: str = "") -> None:
        if self.enabled:
            took = time.perf_counter() - self.start
            print(("\n" if self.tty else "") + f"{self.label}: done, {self.count} in {took:.1f} s"
                  + (f" {note}" if note else ""), file=sys.stderr, flush=True)


def say(msg: str, quiet: bool = False) -> None:
    """One progress/status line on stderr (stdout stays clean for paths and data)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---- formatting for Markdown
def _bad(x: Optional[float]) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt_pct(x: Optional[float], digits: int = 2) -> str:
    """A fraction as a percentage (``0.5`` -> ``50.00%``); ``n/a`` for missing values."""
    return "n/a" if _bad(x) else f"{100.0 * float(x):.{digits}f}%"


def fmt_num(x: Optional[float], digits: int = 4) -> str:
    """A number with fixed decimals; ``n/a`` for missing values."""
    return "n/a" if _bad(x) else f"{float(x):.{digits}f}"


def fmt_ms(x: Optional[float]) -> str:
    """Milliseconds with about three significant digits (``12.3``, ``0.0456``, ``1234``)."""
    if _bad(x):
        return "n/a"
    x = float(x)
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ci(ci: Optional[Dict[str, Any]], fmt: Callable[[Optional[float]], str] = fmt_pct) -> str:
    """A confidence interval ``{"lo", "hi"}`` as ``lo – hi``, each formatted by ``fmt`` like its point value."""
    lo, hi = (ci or {}).get("lo"), (ci or {}).get("hi")
    return "n/a" if _bad(lo) or _bad(hi) else f"{fmt(lo)} – {fmt(hi)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column (``l``/``r``), default left."""
    sep = ["---:" if a == "r" else "---" for a in (align or "l" * len(header))]
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(sep) + " |"]
                     + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def mb(n_bytes: Optional[float]) -> str:
    """Bytes as MiB with one decimal (``n/a`` when unknown)."""
    return "n/a" if _bad(n_bytes) else f"{float(n_bytes) / 2**20:.1f}"


def images_used(data: Dict[str, Any]) -> str:
    """Which images an accuracy report measured, in words, from its ``data`` block."""
    if data.get("split") == "validation":
        hashes = ", ".join(h[:8] for h in data.get("split_hashes", []))
        return f"each model's own validation split, rebuilt from the training folder `{data['root']}` (split {hashes})"
    return f"`{data['root']}`"


def command_line() -> str:
    """The command that is running, as a person would retype it."""
    import shlex

    prog = Path(sys.argv[0]).name if sys.argv else "cxr-bench"
    if prog in ("__main__.py", "cli.py"):
        prog = "cxr-bench"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])
