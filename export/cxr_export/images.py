"""Deterministic image sets for parity, calibration and the INT8 gate, from a run's split.

The run's ``split.json`` says which images were training (calibration) and which validation (the
gate and parity); a model file's validation images are rebuilt from its spec's provenance
(:func:`file_validation_split`); the test split is never read.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

from cxr_infer.preprocess import load_image

if TYPE_CHECKING:  # pragma: no cover
    from cxr_infer.spec import ModelSpec

#: how ``cxr-train`` splits a folder when a file's ``provenance.split`` says nothing else
SPLIT_DEFAULTS = {"seed": 0, "val_fraction": 0.1, "max_images": None}


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
    return load_entries(chosen, data_dir, size), np.array([e[1] for e in chosen]), [e[0] for e in chosen]


def load_entries(entries: List[list], data_dir: str | Path, size: Tuple[int, int]) -> np.ndarray:
    """Pixels (uint8 NHWC) of the split ``entries`` (``[path relative to data_dir, label]``), in order."""
    data_dir = Path(data_dir)
    missing = [e[0] for e in entries if not (data_dir / e[0]).is_file()]
    if missing:
        raise FileNotFoundError(f"{data_dir}: {len(missing)} images of the split are missing (first: {missing[0]});"
                                " pass the training folder the checkpoint was trained on")
    return np.stack([load_image(data_dir / e[0], size) for e in entries]) if entries else \
        np.zeros((0, size[1], size[0], 3), np.uint8)


def rebuild_split(train_dir: str | Path, seed: int = 0, val_fraction: float = 0.1,
                  max_images: Optional[int] = None) -> Tuple[List[list], str]:
    """The validation entries (``[path relative to train_dir, label index]``) of a training folder as
    ``cxr-train`` splits it, and the split's hash (the ``split_hash`` a model file records).

    Examples:
        >>> val, digest = rebuild_split("chest_xray/train")      # doctest: +SKIP
        >>> len(val), digest[:8]                                  # doctest: +SKIP
        (523, 'ccae3ee5')
    """
    from cxr_train import data

    root = Path(train_dir)
    train, val = data.make_split(root, seed, val_fraction, max_images)
    body = data.manifest(train, val, root, seed, val_fraction)
    return body["val"], body["hash"]


def file_validation_split(spec: "ModelSpec", train_dir: str | Path) -> List[list]:
    """The validation entries of the model file ``spec`` describes: its training folder split again as
    its ``provenance.split`` says (else :data:`SPLIT_DEFAULTS`) and checked against its ``split_hash``.

    Raises:
        ValueError: the file records no split hash, or the folder splits into other images.
        FileNotFoundError: ``train_dir`` is not a training folder.
    """
    how = {**SPLIT_DEFAULTS, **{k: v for k, v in spec.provenance.split.items() if k in SPLIT_DEFAULTS}}
    want = str(spec.provenance.split_hash or "")
    if not want:
        raise ValueError("its spec records no provenance.split_hash, so its validation images cannot be told "
                         "from its training ones")
    val, got = rebuild_split(train_dir, how["seed"], how["val_fraction"], how["max_images"])
    if got != want:
        raise ValueError(f"the split of {train_dir} (seed {how['seed']}, validation fraction {how['val_fraction']}, "
                         f"{how['max_images'] or 'all'} images) is {got[:8]}, not the file's {want[:8]}: pass the "
                         "training folder the model was trained on")
    return val
