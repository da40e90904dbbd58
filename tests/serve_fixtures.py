"""A real ``cxr-serve`` process for tests: started on 127.0.0.1 with a free port, stopped after.

The server prints ``on http://HOST:PORT`` once it listens; :func:`start_server` waits for that
line and for ``/v2/health/ready``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from cxr_bench.util import stop_process

REPO = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("runtime", "train", "export", "benchmarks", "hospital", "serve"))
SAMPLE = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"


def env() -> Dict[str, str]:
    """The environment of a cxr process started by a test."""
    out = dict(os.environ, PYTHONPATH=PYTHONPATH, PYTHONIOENCODING="utf-8")
    out.pop("CXR_TIMING", None)
    return out


@dataclass
class Server:
    """A running ``cxr-serve``: its process, base URL and the stderr file."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait; the exit status."""
        return stop_process(self.process, timeout=timeout)


def start_server(args: Sequence[str], log: Path, timeout: float = 60) -> Server:
    """``python -m cxr_serve --port 0 ARGS``, ready to answer."""
    fh = open(log, "wb")
    process = subprocess.Popen([sys.executable, "-m", "cxr_serve", "--port", "0", *args], stdout=fh,
                               stderr=subprocess.STDOUT, env=env(), cwd=str(REPO))
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cxr-serve exited with {process.returncode}: {log.read_text()}")
        found = re.search(r" on (http://[0-9.]+:\d+)", log.read_text())
        if found:
            url = found.group(1)
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=5).read()
                return Server(process, url, log)
            except OSError:
                pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"cxr-serve did not answer within {timeout} s at {url}: {log.read_text()}")


def request(url: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
            timeout: float = 60) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one HTTP request (POST when there is a body),
    errors included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def post_json(url: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict]:
    """(status, the JSON answer) of a POST."""
    status, _, data = request(url, body, headers)
    return status, json.loads(data)
