"""Deterministic image sets for parity, calibration and the INT8 gate, from a run's split.

The run's ``split.json`` says which images were training (calibration) and which validation (the
gate and parity); the test split is never read.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from cxr_infer.preprocess import load_image


def pick(entries: List[list], count: Optional[int], seed: int = 0) -> List[list]:
    """``count`` entries ([relpath, label]), class-balanced; all when None."""
    if count is None or count >= len(entries):
        return list(entries)
    rng = random.Random(seed)
    by: dict = {}
    for e in sorted(entries):
        by.setdefault(e[1], []).append(e)
    out: List[list] = []
    per = count // len(by)
    for label in sorted(by):
        rng.shuffle(by[label])
        out += by[label][:per]
    return sorted(out)


def image_set(ckpt_dir: str | Path, data_dir: str | Path, part: str, count: Optional[int],
              size: Tuple[int, int], seed: int = 0) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Pixels (uint8 NHWC), labels and paths of ``count`` images of the split's ``part`` (without a
    ``split.json``: of every image under ``data_dir/<label>/``)."""
    data_dir, split_file = Path(data_dir), Path(ckpt_dir) / "split.json"
    if split_file.is_file():
        split = json.loads(split_file.read_text())
        entries, labels = split[part], split["labels"]
    else:
        labels = ["NORMAL", "PNEUMONIA"]
        entries = [[str(p.relative_to(data_dir)), i] for i, lab in enumerate(labels)
                   for p in sorted((data_dir / lab).glob("*")) if p.is_file()]
    chosen = pick(entries, count, seed)
    missing = [e[0] for e in chosen if not (data_dir / e[0]).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir}: {len(missing)} images of the split are missing (first: {missing[0]});"
                                " pass the training folder the checkpoint was trained on")
    pixels = np.stack([load_image(data_dir / e[0], size) for e in chosen]) if chosen else \
        np.zeros((0, size[1], size[0], 3), np.uint8)
    return pixels, np.array([e[1] for e in chosen]), [e[0] for e in chosen]
