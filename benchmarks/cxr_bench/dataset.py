"""A labelled image folder (``DIR/NORMAL/*.jpeg``, ``DIR/PNEUMONIA/*.jpeg``) and a decode-once pixel cache."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer import IMAGE_SUFFIXES
from cxr_infer.errors import InputError
from cxr_infer.preprocess import load_image

from .upstream import validation_split
from .util import BenchError, Progress


@dataclass
class Dataset:
    """Image files with their folder label, sorted by (label, name) for reproducibility."""

    root: Path
    files: List[Path]
    folder_labels: List[str]

    def counts(self) -> Dict[str, int]:
        return dict(Counter(self.folder_labels))

    def targets(self, positive_label: str, labels: Sequence[str]) -> np.ndarray:
        """0/1 targets for a model (1 = ``positive_label``); every folder must be one of ``labels``."""
        unknown = sorted(set(self.folder_labels) - set(labels))
        if unknown:
            raise BenchError(f"{self.root}: folder(s) {unknown} are not labels of the model ({list(labels)}); "
                             f"--data must hold one sub-folder per label, named like the model's labels")
        if len(labels) != 2:
            raise BenchError(f"the model has {len(labels)} labels; cxr-bench measures binary models only")
        return np.array([lab == positive_label for lab in self.folder_labels], dtype=np.int64)


def list_dataset(root: str | Path, limit: Optional[int] = None) -> Dataset:
    """The images under ``root/<label>/``; ``limit`` keeps the first N (by name) of each label."""
    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"--data {root}: no such folder (expected DIR/NORMAL/*.jpeg and DIR/PNEUMONIA/*.jpeg)")
    files: List[Path] = []
    labels: List[str] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in subdirs:
        imgs = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        files += imgs
        labels += [sub.name] * len(imgs)
    if not files:
        found = ", ".join(p.name for p in subdirs) or "no sub-folders"
        raise BenchError(f"--data {root}: no images found ({found}); expected one sub-folder per label "
                         f"holding .jpeg/.png files, e.g. {root}/NORMAL and {root}/PNEUMONIA")
    return Dataset(root=root, files=files, folder_labels=labels)


@dataclass
class PixelCache:
    """Decoded pixels per input size, each image decoded once per size; ``failed``: index -> reason."""

    files: List[Path]
    quiet: bool = False
    _pixels: Dict[Tuple[int, int, str], np.ndarray] = field(default_factory=dict)
    failed: Dict[int, str] = field(default_factory=dict)
    decodes: int = 0

    def pixels(self, size: Tuple[int, int], method: str = "bicubic") -> np.ndarray:
        """``uint8`` array ``(N, H, W, 3)`` for every file (zeros where decoding failed)."""
        size = (int(size[0]), int(size[1]))
        key = (size[0], size[1], method)
        if key not in self._pixels:
            w, h = size
            out = np.zeros((len(self.files), h, w, 3), dtype=np.uint8)
            prog = Progress(f"decoding {len(self.files)} images at {w}x{h}", len(self.files), enabled=not self.quiet)
            for i, f in enumerate(self.files):
                try:
                    out[i] = load_image(f, size, method=method)
                    self.decodes += 1
                except InputError as exc:
                    self.failed[i] = str(exc)
                prog.step()
            prog.done(f"({len(self.failed)} unreadable)" if self.failed else "")
            self._pixels[key] = out
        return self._pixels[key]


def stored_sizes(files: Sequence[Path]) -> List[str]:
    """Each file's stored size as ``WIDTHxHEIGHT`` from its header (Pillow), ``""`` where Pillow cannot tell."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for f in files:
        try:
            with Image.open(f) as image:
                sizes.append(f"{image.width}x{image.height}")
        except (OSError, UnidentifiedImageError):
            sizes.append("")
    return sizes


def validation_files(train_dir: str | Path, spec: Any) -> List[Path]:
    """The validation images of the file's training split, rebuilt as ``cxr-train`` made it (from the
    file's ``provenance.split``) and checked against its split hash; :class:`BenchError` when they differ."""
    how = spec.provenance.split
    seed, val_fraction, max_images = how.get("seed", 0), how.get("val_fraction", 0.1), how.get("max_images")
    want = str(spec.provenance.split_hash or "")
    if not want:
        raise BenchError("--validation: the model file records no split_hash, so its validation images cannot be "
                         "told from its training ones")
    root = Path(train_dir)
    if not root.is_dir():
        raise BenchError(f"--validation {train_dir}: no such folder (give the training folder the models were "
                         "trained on, e.g. chest_xray/train)")
    val, got = validation_split(root, seed, val_fraction, max_images)
    if got != want:
        raise BenchError(f"--validation {train_dir}: the split rebuilt from it (seed {seed}, validation fraction "
                         f"{val_fraction}, {max_images or 'all'} images) is {got[:8]}, not the model's {want[:8]}: "
                         "was the model trained on another folder?")
    return val


def validation_dataset(train_dir: str | Path, specs: Sequence[Any], limit: Optional[int] = None
                       ) -> Tuple[Dataset, List[Tuple[set, str]]]:
    """Every image of the validation splits of the files ``specs`` describe (:func:`validation_files`),
    labelled by their class folder, and for each spec its own images and split hash; ``limit`` keeps
    the first N (by name) of each label. Files recording the same split hash share one rebuild."""
    by_hash: Dict[str, set] = {}
    splits = []
    for spec in specs:
        digest = str(spec.provenance.split_hash or "")
        if digest not in by_hash or not digest:
            by_hash[digest] = set(validation_files(train_dir, spec))
        splits.append((by_hash[digest], digest))
    root = Path(train_dir)

    def label(f: Path) -> str:  # the class folder right under the training folder
        return f.relative_to(root).parts[0] if f.is_relative_to(root) else f.parent.name

    union = sorted(set().union(*(files for files, _ in splits)), key=lambda f: (label(f), f.name))
    files: List[Path] = []
    for name in sorted({label(f) for f in union}):
        files += [f for f in union if label(f) == name][:limit]
    return Dataset(root=root, files=files, folder_labels=[label(f) for f in files]), splits


#: What a folder of unlabelled images (``--foreign``, ``--originals``, ``--domain-data``) is searched for.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def image_files(root: Path, needs: str) -> List[Path]:
    """Every image under the folder ``root`` (recursively, sorted); :class:`BenchError` saying what it
    ``needs`` when it is not a folder, or when it holds no image."""
    if not root.is_dir():
        raise BenchError(f"{root}: {needs}")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise BenchError(f"{root}: no images under it (looked for {', '.join(IMAGE_EXTS)})")
    return files
