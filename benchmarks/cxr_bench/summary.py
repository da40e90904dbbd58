"""``cxr-bench summary``: merge accuracy and latency reports into ``summary.json`` + ``summary.md``.

The contract (read by the README and by the shipping issue): ``summary.json`` is a list of
rows, one per (backbone, precision) model file, each with exactly these keys::

    backbone, precision, accuracy, auc, loss, precision_score, recall, f1, tp, fp, tn, fn,
    latency_ms_b1, torch_latency_ms_b1

``precision`` is the numeric format (fp32, int8, fp16); ``precision_score`` is the positive
predictive value. Metrics are at the model's own decision threshold. ``latency_ms_b1`` is the
ONNX Runtime median at batch 1 on the CPU; ``torch_latency_ms_b1`` the PyTorch eager median
of the same backbone at batch 1 with the same thread count. Missing figures are ``null``.
Accuracy and latency are joined per model file (its SHA-256); where several reports hold the
same file, the newest (by ``created``) wins. Two files claiming the same backbone and precision
give two rows and a warning.

Example:
    >>> rows = build_summary("benchmarks/results")     # doctest: +SKIP
    >>> rows[0]["backbone"], rows[0]["latency_ms_b1"]  # doctest: +SKIP
    ('inception_v3', 31.2)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .accuracy import KIND as ACCURACY_KIND
from .latency import KIND as LATENCY_KIND
from .util import BenchError, fmt_ms, fmt_num, fmt_pct, md_table, now_iso, say, write_json, write_text

ROW_KEYS = ("backbone", "precision", "accuracy", "auc", "loss", "precision_score", "recall", "f1",
            "tp", "fp", "tn", "fn", "latency_ms_b1", "torch_latency_ms_b1")
_PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


def load_reports(results: str | Path) -> Tuple[List[Tuple[Path, Dict]], List[Tuple[Path, Dict]]]:
    """The accuracy and latency reports (JSON, by their ``kind``) found directly in ``results``."""
    root = Path(results)
    if not root.is_dir():
        raise BenchError(f"--results {root}: no such folder (run cxr-bench accuracy/latency with --out {root} first)")
    acc, lat = [], []
    for p in sorted(root.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("kind") == ACCURACY_KIND:
            acc.append((p, d))
        elif isinstance(d, dict) and d.get("kind") == LATENCY_KIND:
            lat.append((p, d))
    return acc, lat


def _identity(entry: Dict[str, Any]) -> str:
    """Which model file an entry measured: its SHA-256 when known, else its resolved path."""
    return entry.get("sha256") or str(Path(entry["path"]).resolve())


def build_summary(results: str | Path, threads: Optional[int] = None, device: str = "cpu"
                  ) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Rows of the summary contract and a ``sources`` dict saying which report gave what.

    Accuracy and ONNX latency are joined per model file (same SHA-256), so figures of two
    different files are never merged into one row; PyTorch latency is joined by backbone.
    """
    acc_reports, lat_reports = load_reports(results)
    if not acc_reports and not lat_reports:
        raise BenchError(f"{results}: no accuracy or latency reports (*.json) to summarise; run "
                         f"`cxr-bench accuracy ... --out {results}` and `cxr-bench latency ... --out {results}` first")
    acc: Dict[str, Tuple[str, Dict, str]] = {}
    for path, rep in acc_reports:
        for m in rep.get("models", []):
            key = _identity(m)
            if key not in acc or rep["created"] >= acc[key][2]:
                acc[key] = (path.name, m, rep["created"])
    lat_rows = [(path.name, rep["created"], r) for path, rep in lat_reports for r in rep.get("results", [])
                if r.get("batch") == 1 and r.get("device", "cpu") == device and r.get("median_ms")]
    measured_threads = sorted({r["threads"] for _, _, r in lat_rows})
    use_threads = threads if threads is not None else (max(measured_threads) if measured_threads else None)
    ort: Dict[str, Tuple[str, Dict, str]] = {}
    torch: Dict[str, Tuple[str, Dict, str]] = {}
    for name, created, r in lat_rows:
        if r["threads"] != use_threads:
            continue
        if r["engine"] == "onnx":
            if r.get("domain_check"):
                continue  # the summary compares the classification call alone (as PyTorch computes it)
            key = _identity(r)
            if key not in ort or created >= ort[key][2]:
                ort[key] = (name, r, created)
        elif r["engine"] == "torch":
            if r["backbone"] not in torch or created >= torch[r["backbone"]][2]:
                torch[r["backbone"]] = (name, r, created)

    def sort_key(ident: str) -> Tuple:
        e = (acc.get(ident) or ort.get(ident))[1]
        return e["backbone"], _PRECISION_ORDER.get(e["precision"], 9), e["precision"], e["path"]

    rows: List[Dict[str, Any]] = []
    sources: Dict[str, Any] = {"device": device, "threads": use_threads, "threads_measured": measured_threads,
                               "rows": [], "warnings": []}
    for ident in sorted(set(acc) | set(ort), key=sort_key):
        m = acc.get(ident, (None, None, None))[1]
        lo = ort.get(ident, (None, None, None))[1]
        e = m or lo
        b, prec = e["backbone"], e["precision"]
        t = m["at_threshold"] if m else {}
        tt = torch.get(b, (None, None, None))[1]
        rows.append({
            "backbone": b, "precision": prec,
            "accuracy": t.get("accuracy"), "auc": t.get("auc"), "loss": t.get("loss"),
            "precision_score": t.get("precision"), "recall": t.get("recall"), "f1": t.get("f1"),
            "tp": t.get("tp"), "fp": t.get("fp"), "tn": t.get("tn"), "fn": t.get("fn"),
            "latency_ms_b1": lo["median_ms"] if lo else None,
            "torch_latency_ms_b1": tt["median_ms"] if tt else None,
        })
        sources["rows"].append({"backbone": b, "precision": prec, "model": e["path"], "sha256": e.get("sha256"),
                                "threshold": m["threshold"] if m else None, "n_images": t.get("n"),
                                "accuracy_report": acc.get(ident, (None,))[0],
                                "latency_report": ort.get(ident, (None,))[0],
                                "torch_report": torch.get(b, (None,))[0]})
    seen: Dict[Tuple[str, str], List[str]] = {}
    for s in sources["rows"]:
        seen.setdefault((s["backbone"], s["precision"]), []).append(
            f"{s['model']} (sha256 {s['sha256'][:8]})" if s.get("sha256") else f"{s['model']} (no sha256)")
    for (b, prec), paths in seen.items():
        if len(paths) > 1:
            sources["warnings"].append(f"{len(paths)} different model files are {b} {prec} ({', '.join(paths)}): "
                                       "accuracy and latency were measured on different files, or a report is "
                                       "stale; rerun both on the same file or remove the old report")
    for path, rep in acc_reports:
        sources.setdefault("data", {})[path.name] = rep["data"]["root"]
        sources["warnings"] += rep.get("warnings", [])
    for _path, rep in lat_reports:
        sources["warnings"] += rep.get("warnings", [])
    sources["warnings"] = list(dict.fromkeys(sources["warnings"]))
    sources["machines"] = {path.name: rep["machine"].get("cpu_model") for path, rep in lat_reports}
    return rows, sources


def render_markdown(rows: List[Dict[str, Any]], sources: Dict[str, Any]) -> str:
    """``summary.md``: the rows as a table, plus where each figure came from."""
    table = []
    for r in rows:
        speed = (r["torch_latency_ms_b1"] / r["latency_ms_b1"]
                 if r["latency_ms_b1"] and r["torch_latency_ms_b1"] else None)
        counts = "/".join(str(r[k]) for k in ("tp", "fp", "tn", "fn")) if r["tp"] is not None else "n/a"
        table.append([r["backbone"], r["precision"], fmt_pct(r["accuracy"]), fmt_num(r["auc"]), fmt_num(r["loss"]),
                      fmt_pct(r["precision_score"]), fmt_pct(r["recall"]), fmt_pct(r["f1"]), counts,
                      fmt_ms(r["latency_ms_b1"]), fmt_ms(r["torch_latency_ms_b1"]),
                      f"{speed:.1f}x" if speed else "n/a"])
    L = ["# cxr-bench summary", "", f"Generated {now_iso()} from the reports in this folder (`summary.json` holds "
         "the same rows). Metrics at each model's own decision threshold; latency: median ms per call at batch 1 "
         f"on {sources['device']}, {sources['threads']} thread(s), each in fresh processes.", "",
         md_table(["Backbone", "Precision", "Accuracy", "AUC", "Loss", "Precision (PPV)", "Recall", "F1",
                   "TP/FP/TN/FN", "ORT ms (b1)", "PyTorch ms (b1)", "ORT speed-up"], table, "llrrrrrrrrrr"),
         ""] + [f"**Warning:** {w}." for w in sources.get("warnings", [])] + (
        [""] if sources.get("warnings") else []) + ["## Sources", ""]
    for s in sources["rows"]:
        L.append(f"- {s['backbone']} {s['precision']}: model `{s['model']}`"
                 + (f", threshold {s['threshold']:.4g}" if s["threshold"] is not None else "")
                 + f"; accuracy from `{s['accuracy_report'] or '-'}`, latency from `{s['latency_report'] or '-'}`, "
                 f"PyTorch from `{s['torch_report'] or '-'}`")
    for name, root in (sources.get("data") or {}).items():
        L.append(f"- data of `{name}`: `{root}`")
    for name, cpu in sources.get("machines", {}).items():
        L.append(f"- machine of `{name}`: {cpu} (details in that report)")
    return "\n".join(L) + "\n"


def write_summary(results: str | Path, out: Optional[str | Path] = None, threads: Optional[int] = None,
                  device: str = "cpu", quiet: bool = False) -> List[Dict[str, Any]]:
    """Build the summary from ``results`` and write ``summary.json`` and ``summary.md`` to ``out``."""
    out = Path(out) if out is not None else Path(results)
    rows, sources = build_summary(results, threads=threads, device=device)
    for w in sources["warnings"]:
        say(f"warning: {w}", quiet)
    write_json(out / "summary.json", rows)
    write_text(out / "summary.md", render_markdown(rows, sources))
    say(f"wrote {out / 'summary.json'} ({len(rows)} rows) and summary.md", quiet)
    return rows
