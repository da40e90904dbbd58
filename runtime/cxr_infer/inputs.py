"""What a command's INPUT arguments stand for: files, folders searched recursively, glob patterns and
``-`` (stdin), expanded once, in order, each file once.

A folder scan finds every file whose ending is in :data:`cxr_infer.IMAGE_SUFFIXES` and every
extension-less DICOM file (a DICOM CD's images), skips hidden files and a medium's ``DICOMDIR``
index, and follows linked folders, each real folder once.

Examples:
    >>> expand_inputs(["missing.jpeg"])
    [('missing.jpeg', None)]
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence, Tuple

from . import IMAGE_SUFFIXES


def _looks_like_extensionless_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    from .dicom import looks_like_dicom

    return looks_like_dicom(head)


def _walk(folder: str) -> List[str]:
    """The image files under ``folder``, in sorted order. Linked folders are followed (a PACS
    export or a mounted share often links them), each real folder once, so a link that points
    back up ends the descent instead of looping."""
    found = []
    visited = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f.upper() == "DICOMDIR":  # a DICOM medium's index, never an image
                continue
            path = os.path.join(root, f)
            suffix = os.path.splitext(f)[1].lower()
            if suffix in IMAGE_SUFFIXES or (not suffix and _looks_like_extensionless_dicom(path)):
                found.append(path)
    return found


def expand_inputs(args: Sequence[str], scanned: Optional[set] = None) -> List[Tuple[str, Optional[str]]]:
    """``(path, None)`` per file to classify and ``(arg, problem)`` per arg that gives none, in order.

    Folders are searched recursively and globs expanded (``**`` included); duplicates are dropped,
    a file reached twice (through a link, or named and found) included: the first path is kept.
    A path that does not exist is kept: the classifier names its problem like any other. The
    paths a folder or a glob gave (not named as such) are added to ``scanned``, if given.
    """
    entries: List[Tuple[str, Optional[str]]] = []
    seen = set()

    def add(path: str, by_scan: bool = True) -> None:
        key = os.path.realpath(path) if path != "-" and os.path.exists(path) else path
        if key not in seen:
            seen.add(key)
            entries.append((path, None))
            if by_scan and scanned is not None:
                scanned.add(path)

    for arg in args:
        if arg == "-" or os.path.isfile(arg):
            add(arg, by_scan=False)
        elif os.path.isdir(arg):
            found = _walk(arg)
            if not found:
                entries.append((arg, "folder holds no image files"))
            for f in found:
                add(f)
        elif glob.has_magic(arg):
            hits = []
            for m in sorted(glob.glob(arg, recursive=True)):
                hits.extend(_walk(m) if os.path.isdir(m) else [m])
            if not hits:
                entries.append((arg, "no files match this pattern"))
            for f in hits:
                add(f)
        else:
            add(arg, by_scan=False)
    return entries
