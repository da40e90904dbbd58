"""``cxr-bench summary``: every report of a folder in brief. ``summary.json`` is a list of rows, one
per model file, with exactly these keys (metrics at the model's threshold on a labelled folder, never
on a validation split; latencies CPU medians at batch 1, ``null`` where missing; ``precision_score`` is
the positive predictive value)::

    backbone, precision, accuracy, auc, loss, precision_score, recall, f1, tp, fp, tn, fn,
    latency_ms_b1, torch_latency_ms_b1

``summary.md`` shows the rows, then every report as its command's ``summary`` puts it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .commands import Command, command_for_kind
from .util import BenchError, fmt_ms, fmt_num, fmt_pct, md_table, now_iso, say, write_json, write_text

_PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
_NONE = (None, None, None)  # (report label, entry, created) where no report has the figure


@dataclass(frozen=True)
class Found:
    """One report found in a results folder: how the summary names it, its path, its JSON and its command."""

    label: str
    path: Path
    report: Dict[str, Any]
    command: Command


def _folders(results: str | Path | Sequence[str | Path]) -> List[Path]:
    return [Path(results)] if isinstance(results, (str, Path)) else [Path(r) for r in results]


def find_reports(results: str | Path | Sequence[str | Path]) -> List[Found]:
    """Every cxr-bench report (JSON with a ``kind`` a command writes) directly in the folder(s) ``results``,
    in folder and name order. A report is named by its file name, or ``FOLDER/FILE`` for several folders."""
    folders = _folders(results)
    found: List[Found] = []
    for root in folders:
        if not root.is_dir():
            raise BenchError(f"--results {root}: no such folder (run a cxr-bench command with --out {root} first)")
        for p in sorted(root.glob("*.json")):
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            command = command_for_kind(d.get("kind")) if isinstance(d, dict) else None
            if command is not None:
                label = p.name if len(folders) == 1 else (Path(root.name) / p.name).as_posix()
                found.append(Found(label, p, d, command))
    return found


def _identity(entry: Dict[str, Any]) -> str:
    """Which model file an entry measured: its SHA-256 when known, else its resolved path."""
    return entry.get("sha256") or str(Path(entry["path"]).resolve())


def _newest(table: Dict[str, Tuple[str, Dict, str]], key: str, label: str, entry: Dict, created: str) -> None:
    if key not in table or created >= table[key][2]:
        table[key] = (label, entry, created)


def build_summary(found: Sequence[Found], threads: Optional[int] = None, device: str = "cpu"
                  ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The summary rows of the reports ``found`` and a ``sources`` dict saying which report gave what;
    accuracy and ONNX latency are joined per model file (SHA-256), PyTorch latency by backbone."""
    acc_reports = [(f.label, f.report) for f in found if f.command.name == "accuracy"
                   and f.report.get("data", {}).get("split") != "validation"]  # rows hold held-out figures
    lat_reports = [(f.label, f.report) for f in found if f.command.name == "latency"]
    acc: Dict[str, Tuple[str, Dict, str]] = {}
    for label, rep in acc_reports:
        for m in rep.get("models", []):
            _newest(acc, _identity(m), label, m, rep["created"])
    lat_rows = [(label, rep["created"], r) for label, rep in lat_reports for r in rep.get("results", [])
                if r.get("batch") == 1 and r.get("device", "cpu") == device and r.get("median_ms")]
    measured_threads = sorted({r["threads"] for _, _, r in lat_rows})
    use_threads = threads if threads is not None else (max(measured_threads) if measured_threads else None)
    ort: Dict[str, Tuple[str, Dict, str]] = {}
    torch: Dict[str, Tuple[str, Dict, str]] = {}
    for name, created, r in lat_rows:
        if r["threads"] != use_threads:
            continue
        if r["engine"] == "onnx":
            if not r.get("domain_check") and not r.get("heatmap"):  # the classification call alone, as PyTorch
                _newest(ort, _identity(r), name, r, created)
        elif r["engine"] == "torch":
            _newest(torch, r["backbone"], name, r, created)

    def sort_key(ident: str) -> Tuple:
        e = (acc.get(ident) or ort.get(ident))[1]
        return e["backbone"], _PRECISION_ORDER.get(e["precision"], 9), e["precision"], e["path"]

    rows: List[Dict[str, Any]] = []
    sources: Dict[str, Any] = {"device": device, "threads": use_threads, "threads_measured": measured_threads,
                               "rows": [], "warnings": []}
    for ident in sorted(set(acc) | set(ort), key=sort_key):
        (acc_label, m, _), (lat_label, lo, _) = acc.get(ident, _NONE), ort.get(ident, _NONE)
        e = m or lo
        b, prec = e["backbone"], e["precision"]
        t = m["at_threshold"] if m else {}
        torch_label, tt, _ = torch.get(b, _NONE)
        rows.append({"backbone": b, "precision": prec, "accuracy": t.get("accuracy"), "auc": t.get("auc"),
                     "loss": t.get("loss"), "precision_score": t.get("precision"), "recall": t.get("recall"),
                     "f1": t.get("f1"), "tp": t.get("tp"), "fp": t.get("fp"), "tn": t.get("tn"), "fn": t.get("fn"),
                     "latency_ms_b1": lo["median_ms"] if lo else None,
                     "torch_latency_ms_b1": tt["median_ms"] if tt else None})
        sources["rows"].append({"backbone": b, "precision": prec, "model": e["path"], "sha256": e.get("sha256"),
                                "threshold": m["threshold"] if m else None, "n_images": t.get("n"),
                                "accuracy_report": acc_label, "latency_report": lat_label, "torch_report": torch_label})
    seen: Dict[Tuple[str, str], List[str]] = {}
    for s in sources["rows"]:
        seen.setdefault((s["backbone"], s["precision"]), []).append(
            f"{s['model']} (sha256 {s['sha256'][:8]})" if s.get("sha256") else f"{s['model']} (no sha256)")
    for (b, prec), paths in seen.items():
        if len(paths) > 1:
            sources["warnings"].append(f"{len(paths)} different model files are {b} {prec} ({', '.join(paths)}): "
                                       "accuracy and latency were measured on different files, or a report is "
                                       "stale; rerun both on the same file or remove the old report")
    for label, rep in acc_reports:
        sources.setdefault("data", {})[label] = rep["data"]["root"]
    more = [w for _, rep in acc_reports + lat_reports for w in rep.get("warnings", [])]
    sources["warnings"] = list(dict.fromkeys(sources["warnings"] + more))
    sources["machines"] = {label: rep["machine"].get("cpu_model") for label, rep in lat_reports}
    return rows, sources


def _table(rows: List[Dict[str, Any]], sources: Dict[str, Any]) -> List[str]:
    """The accuracy and latency rows as a table, with where each figure came from."""
    if not rows:
        return ["No accuracy or latency reports: `summary.json` is an empty list.", ""]
    table = []
    for r, src in zip(rows, sources["rows"]):
        speed = (r["torch_latency_ms_b1"] / r["latency_ms_b1"]
                 if r["latency_ms_b1"] and r["torch_latency_ms_b1"] else None)
        counts = "/".join(str(r[k]) for k in ("tp", "fp", "tn", "fn")) if r["tp"] is not None else "n/a"
        table.append([r["backbone"], r["precision"], fmt_pct(r["accuracy"]), fmt_num(r["auc"]), fmt_num(r["loss"]),
                      fmt_pct(r["precision_score"]), fmt_pct(r["recall"]), fmt_pct(r["f1"]), counts,
                      fmt_ms(r["latency_ms_b1"]), fmt_ms(r["torch_latency_ms_b1"]),
                      f"{speed:.1f}x" if speed else "n/a", f"`{src['model']}`"])
    L = ["Metrics at each model's own decision threshold (`summary.json` holds the same rows); latency: median "
         f"ms per call at batch 1 on {sources['device']}, {sources['threads']} thread(s), each in fresh processes.",
         "", md_table(["Backbone", "Precision", "Accuracy", "AUC", "Loss", "Precision (PPV)", "Recall", "F1",
                       "TP/FP/TN/FN", "ORT ms (b1)", "PyTorch ms (b1)", "ORT speed-up", "File"], table,
                      "llrrrrrrrrrrl"),
         ""] + [f"**Warning:** {w}." for w in sources.get("warnings", [])] + (
        [""] if sources.get("warnings") else []) + ["## Sources", ""]
    for s in sources["rows"]:
        L.append(f"- {s['backbone']} {s['precision']}: model `{s['model']}`"
                 + (f", threshold {s['threshold']:.4g}" if s["threshold"] is not None else "")
                 + f"; accuracy from `{s['accuracy_report'] or '-'}`, latency from `{s['latency_report'] or '-'}`, "
                 f"PyTorch from `{s['torch_report'] or '-'}`")
    L += [f"- data of `{name}`: `{root}`" for name, root in (sources.get("data") or {}).items()]
    L += [f"- machine of `{name}`: {cpu} (details in that report)" for name, cpu in sources.get("machines", {}).items()]
    return L + [""]


def render_markdown(rows: List[Dict[str, Any]], sources: Dict[str, Any], found: Sequence[Found] = (),
                    where: str = "this folder") -> str:
    """``summary.md``: the rows as a table with their sources, then every report of ``found`` in brief."""
    L = ["# cxr-bench summary", "", f"Generated {now_iso()} from the reports in {where}.", ""] + _table(rows, sources)
    if found:
        L += ["## Reports", ""]
    for f in found:
        try:
            brief = f.command.summary(f.report)
            text = brief.markdown or brief.line
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a report missing what its command writes
            text = f"(not summarised: the report lacks {exc})"
        L += [f"### `{f.label}`: cxr-bench {f.command.name}", "",
              f"Created {f.report.get('created', '?')}: `{f.report.get('command', '?')}`.", "", text, ""]
    return "\n".join(L)


def write_summary(results: str | Path | Sequence[str | Path], out: Optional[str | Path] = None,
                  threads: Optional[int] = None, device: str = "cpu", quiet: bool = False) -> List[Dict[str, Any]]:
    """Summarise every report in the folder(s) ``results``: ``summary.json`` (the rows) and ``summary.md``
    (the rows, then each report in brief) in ``out`` (default: the one ``results`` folder)."""
    folders = _folders(results)
    if out is None:
        if len(folders) != 1:
            raise BenchError("several results folders: say where the summary goes (--out DIR)")
        out = folders[0]
    out = Path(out)
    found = find_reports(folders)
    if not found:
        shown = ", ".join(str(f) for f in folders) or "(no folder)"
        raise BenchError(f"{shown}: no cxr-bench reports (*.json) to summarise; run e.g. "
                         f"`cxr-bench accuracy ... --out {folders[0] if folders else 'DIR'}` first")
    rows, sources = build_summary(found, threads, device)
    for w in sources["warnings"]:
        say(f"warning: {w}", quiet)
    where = f"`{folders[0]}`" if len(folders) == 1 else ", ".join(f"`{f}`" for f in folders)
    write_json(out / "summary.json", rows)
    write_text(out / "summary.md", render_markdown(rows, sources, found, where))
    say(f"wrote {out / 'summary.json'} ({len(rows)} rows) and summary.md ({len(found)} reports)", quiet)
    return rows
