"""MkDocs hook: the figures of the committed benchmark reports (``benchmarks/results/*.png``,
``*.jpg``) become files of the site under ``results/``, so pages show them without copies."""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.glob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
