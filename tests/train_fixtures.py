"""Helpers shared by the cxr-train tests (kept out of conftest.py, which the runtime tests own).

The shared data lives beside the repository (``../shared/data/chest_xray_224``), as in CI's
fresh clone; every test that needs it skips with the path when it is absent.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "train"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("runtime", "train", "export", "benchmarks"))

for _sub in ("runtime", "train"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

needs_data = pytest.mark.skipif(
    not (TRAIN_DATA / "NORMAL").is_dir() or not (TRAIN_DATA / "PNEUMONIA").is_dir(),
    reason=f"shared training images not found at {TRAIN_DATA} (CI clones the repo beside shared/)",
)

#: Fields of a metrics.jsonl record that measure time, not training.
TIMING = ("images_per_s", "epoch_s")


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment for a child python: this checkout's packages first, two threads at most."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timing(records: List[dict]) -> List[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]
