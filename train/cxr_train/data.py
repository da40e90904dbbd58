"""The folder dataset, patient ids, and the patient-wise stratified validation split (torch-free;
see ``docs/training.md``).

Examples:
    >>> patient_id("person1_bacteria_1.jpeg"), patient_id("NORMAL2-IM-0381-0001.jpeg")
    ('person1', 'IM-0381')
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer import IMAGE_SUFFIXES
from cxr_infer.preprocess import load_image

LABELS = ("NORMAL", "PNEUMONIA")

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"IM-(\d+)-", re.IGNORECASE)


def patient_id(filename: str) -> str:
    """The patient a Kermany file name belongs to; any other name is its own patient (its stem).

    ``IM-0115-*`` and ``NORMAL2-IM-0115-*`` are one patient on purpose: it can only make the split stricter.
    """
    name = Path(filename).name
    if m := _PERSON.match(name):
        return m.group(1).lower()
    if m := _IM.search(name):
        return f"IM-{m.group(1)}"
    return Path(name).stem


@dataclass
class Sample:
    path: str
    label: int

    @property
    def patient(self) -> str:
        return patient_id(self.path)


def scan_folder(root: str | Path, labels: Sequence[str] = LABELS) -> List[Sample]:
    """All images under ``root/<label>/`` (sorted, deterministic), one subfolder per class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder (expected {root}/NORMAL and {root}/PNEUMONIA)")
    samples: List[Sample] = []
    for idx, label in enumerate(labels):
        folder = root / label
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing class folder; the data folder needs one subfolder per "
                                    f"class {list(labels)}")
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(p), idx))
    if not samples:
        raise FileNotFoundError(f"{root}: no images found")
    return samples


def subsample(samples: List[Sample], max_images: Optional[int], seed: int) -> List[Sample]:
    """A deterministic, class-balanced subset of at most ``max_images`` (for smoke runs)."""
    if not max_images or max_images >= len(samples):
        return samples
    rng = random.Random(seed)
    by_class: Dict[int, List[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    per = max(1, max_images // len(by_class))
    out: List[Sample] = []
    for label in sorted(by_class):
        items = list(by_class[label])
        rng.shuffle(items)
        out.extend(items[:per])
    return sorted(out, key=lambda s: s.path)


def split_by_patient(samples: List[Sample], val_fraction: float = 0.1,
                     seed: int = 0) -> Tuple[List[Sample], List[Sample]]:
    """Deterministic train/validation split, by patient and stratified by each patient's majority class."""
    patients: Dict[str, List[Sample]] = {}
    for s in samples:
        patients.setdefault(s.patient, []).append(s)
    by_class: Dict[int, List[str]] = {}
    for pid in sorted(patients):
        labels = [s.label for s in patients[pid]]
        majority = max(set(labels), key=lambda lab: (labels.count(lab), lab))
        by_class.setdefault(majority, []).append(pid)
    rng = random.Random(seed)
    val_ids: set = set()
    for label in sorted(by_class):
        pids = by_class[label]
        rng.shuffle(pids)
        target = val_fraction * sum(len(patients[p]) for p in pids)
        taken = 0
        for pid in pids:
            if taken >= target:
                break
            val_ids.add(pid)
            taken += len(patients[pid])
    train = [s for s in samples if s.patient not in val_ids]
    val = [s for s in samples if s.patient in val_ids]
    return train, val


def make_split(root: str | Path, seed: int = 0, val_fraction: float = 0.1, max_images: Optional[int] = None
               ) -> Tuple[List[Sample], List[Sample]]:
    """The ``(train, validation)`` samples of ``root``, scanned, subsampled and split as ``cxr-train`` makes
    them (and ``cxr-bench domain --validation`` rebuilds them)."""
    return split_by_patient(subsample(scan_folder(root), max_images, seed), val_fraction, seed)


def files_hash(paths: Sequence[str]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def manifest(train: List[Sample], val: List[Sample], root: str | Path, seed: int, val_fraction: float) -> dict:
    """A JSON-able record of the split (relative paths and labels) with its own hash."""
    root = Path(root)

    def rel(s: Sample) -> list:
        return [str(Path(s.path).relative_to(root)), s.label]

    body = {
        "labels": list(LABELS),
        "seed": seed,
        "val_fraction": val_fraction,
        "train": [rel(s) for s in train],
        "val": [rel(s) for s in val],
    }
    body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body["counts"] = {
        "train": [sum(1 for s in train if s.label == i) for i in range(len(LABELS))],
        "val": [sum(1 for s in val if s.label == i) for i in range(len(LABELS))],
        "train_patients": len({s.patient for s in train}),
        "val_patients": len({s.patient for s in val}),
    }
    return body


def decode_all(samples: List[Sample], size: int = 224, workers: int = 0, progress: bool = False) -> np.ndarray:
    """Every sample through the runtime's preprocessing: ``uint8`` array ``(N, size, size, 3)``."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = load_image(samples[i].path, (size, size))

    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
        done = pool.map(work, range(len(samples)))
        if progress:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(samples), desc="decode", unit="img", leave=False)
        for _ in done:
            pass
    return out
