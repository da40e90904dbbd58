"""``cxr-bench card``: a model card per model file, written from the file's spec and the cxr-bench
reports that measured its bytes (matched by SHA-256), so a card cannot drift from them. The sections
follow Mitchell et al. 2019 (see :mod:`cxr_bench.card_md`); a figure no report holds is replaced by
the command that makes it. Output is deterministic: the same file and reports give the same bytes.

Examples:
    >>> card_name(ModelSpec.new(backbone="inception_v3", precision="int8"))
    'inception-v3-int8'
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cxr_infer.spec import ModelSpec

from .util import BenchError, say, write_text

#: the repository this package sits in (an editable install), and the folder of its committed reports
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
#: where the cards of the shipped models live (the documentation site serves them)
CARDS = REPO / "docs" / "model-cards"
#: validation AUCs this close to the highest tie: the tolerance of the training's own epoch selection
AUC_TIE = 1e-4
RULE = ("highest validation AUC (from each file's spec), and on a tie (AUCs within 1e-4) the lowest median "
        "latency at batch 1 on the CPU provider")


@dataclass(frozen=True)
class Measured:
    """One report's entry on a model file: the report's file name, the report, and the entry (a model of
    ``models`` or a row of ``results``)."""

    label: str
    report: Dict[str, Any]
    entry: Dict[str, Any]


@dataclass
class CardFile:
    """A model file and what the reports measured on its bytes (None where no report did)."""

    path: Path
    shown: str
    sha256: str
    file_bytes: int
    spec: ModelSpec
    default: bool
    test: Optional[Measured] = None
    validation: Optional[Measured] = None
    domain: Optional[Measured] = None
    heatmaps: Optional[Measured] = None
    latency: Optional[Measured] = None
    notes: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return card_name(self.spec)


def card_name(spec: ModelSpec) -> str:
    """A card's file stem from its spec: backbone and precision, e.g. ``resnet50-int8``."""
    return f"{spec.backbone}-{spec.precision}".replace("_", "-").lower()


def shown_path(path: Path) -> str:
    """A path as a card shows it: relative to the repository when inside it, else its name (never the
    machine's own folders, so cards do not depend on where they were made)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return Path(path).name


def calibration_block(spec: ModelSpec) -> Optional[Dict[str, Any]]:
    """The spec's calibration (:attr:`ModelSpec.calibration`: temperature, applied, ECE and threshold before
    and after, images) as a dict; None when the file has none."""
    view = spec.calibration
    return None if view is None else dataclasses.asdict(view)


# ---- matching reports to files
def _same_file(recorded: Any, path: Path) -> bool:
    """Whether a report's recorded ``path`` names ``path`` (read from the repository or the current folder)."""
    if not recorded:
        return False
    target = path.resolve()
    recorded = Path(str(recorded))
    candidates = [recorded] if recorded.is_absolute() else [REPO / recorded, Path.cwd() / recorded]
    return any(os.path.normpath(c) == str(target) or (c.exists() and c.resolve() == target) for c in candidates)


def _entries(found: Any) -> List[Dict[str, Any]]:
    report = found.report
    rows = report.get("results") if found.command.name == "latency" else report.get("models")
    return [e for e in rows or [] if isinstance(e, dict)]


def _whole_file_b1(row: Dict[str, Any]) -> bool:
    """A latency row of the file as it is (no graph removed), batch 1, on the CPU provider, with a median."""
    return (row.get("engine") == "onnx" and row.get("batch") == 1 and row.get("device", "cpu") == "cpu"
            and not row.get("removed") and bool(row.get("median_ms")))


def _pick(items: List[Measured], key: Callable[[Measured], Tuple]) -> Optional[Measured]:
    return max(items, key=lambda m: (*key(m), m.report.get("created", ""), m.label)) if items else None


def _choose(card: CardFile, matched: Dict[str, List[Measured]]) -> None:
    """Of several reports on the same bytes, the one that measured most (then the newest) for each part."""
    accuracy = matched.get("accuracy", [])

    def by_images(m: Measured) -> Tuple:
        return (m.entry.get("n_evaluated") or 0,)

    card.test = _pick([m for m in accuracy if m.report.get("data", {}).get("split") != "validation"], by_images)
    card.validation = _pick([m for m in accuracy if m.report.get("data", {}).get("split") == "validation"],
                            by_images)
    card.domain = _pick([m for m in matched.get("domain", []) if m.entry.get("domain")],
                        lambda m: (bool(m.entry.get("operating_points")), "originals" in m.entry,
                                   "foreign" in m.entry))
    card.heatmaps = _pick(matched.get("heatmaps", []), lambda m: ("border_mass" in m.entry,))


def _latency(cards: Sequence[CardFile], matched: Dict[str, Dict[str, List[Measured]]]) -> None:
    """Each file's batch-1 CPU latency, from one report for all files where one covers them (latency is
    compared within one run), else from the file's own best report; most timed calls first."""
    rows = {c.sha256: [m for m in matched[c.sha256].get("latency", []) if _whole_file_b1(m.entry)] for c in cards}
    labels = {m.label for ms in rows.values() for m in ms}

    def coverage(label: str) -> Tuple:
        covered = [max(m.entry.get("timed_calls") or 0 for m in ms if m.label == label)
                   for ms in rows.values() if any(m.label == label for m in ms)]
        created = next(m.report.get("created", "") for ms in rows.values() for m in ms if m.label == label)
        return len(covered), min(covered), created, label

    ranked = sorted(labels, key=coverage, reverse=True)
    for card in cards:
        mine = rows[card.sha256]
        for label in ranked:
            here = [m for m in mine if m.label == label]
            if here:
                card.latency = max(here, key=lambda m: (m.entry.get("timed_calls") or 0, m.entry.get("threads") or 0))
                break


def collect(models: Sequence[str | Path], reports: str | Path) -> List[CardFile]:
    """Each model file with what the reports in ``reports`` measured on its bytes. A report entry naming a
    file's path with another SHA-256 is refused (:class:`BenchError`, one line): it measured other bytes."""
    from cxr_infer.classifier import DEFAULT_MODEL
    from cxr_infer.info import file_sha256

    from .summary import find_reports
    from .upstream import read_spec

    found = [f for f in find_reports(reports) if f.command.name in ("accuracy", "domain", "heatmaps", "latency")]
    cards: List[CardFile] = []
    matched: Dict[str, Dict[str, List[Measured]]] = {}
    for model in map(Path, models):
        if not model.is_file():
            raise BenchError(f"{model}: no such model file")
        card = CardFile(path=model, shown=shown_path(model), sha256=file_sha256(model),
                        file_bytes=model.stat().st_size, spec=read_spec(model),
                        default=model.resolve() == Path(DEFAULT_MODEL).resolve())
        mine = matched.setdefault(card.sha256, {})
        for f in found:
            for entry in _entries(f):
                if entry.get("sha256") == card.sha256:
                    mine.setdefault(f.command.name, []).append(Measured(f.path.name, f.report, entry))
                elif _same_file(entry.get("path"), model):
                    if entry.get("sha256"):
                        raise BenchError(
                            f"{f.path}: measured {entry['path']} on other bytes (sha256 {entry['sha256'][:12]}, the "
                            f"file is {card.sha256[:12]}): re-run cxr-bench {f.command.name} on it, or remove the "
                            "report")
                    note = (f"`{f.path.name}` names this file's path but records no SHA-256, so it is not used "
                            f"(re-run `cxr-bench {f.command.name}`)")
                    card.notes += [] if note in card.notes else [note]
        _choose(card, mine)
        cards.append(card)
    names = [c.name for c in cards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BenchError(f"two model files would share the card {twice[0]}.md (same backbone and precision): "
                         "make the cards of one of them at a time, into different --out folders")
    _latency(cards, matched)
    return cards


# ---- writing
def image_link(reports: Path, out: Path, name: str) -> str:
    """How a card links a figure of a report: ``../results/NAME`` for the committed reports (the site
    serves ``benchmarks/results`` images under ``results/``), else the path from ``out`` to the file."""
    if Path(reports).resolve() == RESULTS.resolve():
        return f"../results/{name}"
    return Path(os.path.relpath(Path(reports).resolve() / name, Path(out).resolve())).as_posix()


def write_cards(models: Sequence[str | Path], reports: str | Path = RESULTS, out: str | Path = CARDS,
                quiet: bool = False) -> Dict[str, Any]:
    """Write ``out/<backbone>-<precision>.md`` for each model file and refresh ``out/index.md`` (every card
    of the folder); returns what was written."""
    from .card_md import read_card_facts, render_card, render_index

    reports, out = Path(reports), Path(out)
    cards = collect(models, reports)
    written = []
    for card in cards:
        text = render_card(card, cards, reports, out)
        write_text(out / f"{card.name}.md", text)
        written.append(f"{card.name}.md")
        missing = text.count("Not measured")
        say(f"wrote {out / (card.name + '.md')} ({card.shown}, sha256 {card.sha256[:12]}; "
            f"{missing} part(s) not measured)", quiet)
    facts = [read_card_facts(p) for p in sorted(out.glob("*.md")) if p.name != "index.md"]
    write_text(out / "index.md", render_index([f for f in facts if f is not None]))
    return {"cards": written, "out": str(out), "reports": str(reports),
            "files": {"markdown": "index.md"}, "models": [c.shown for c in cards]}
