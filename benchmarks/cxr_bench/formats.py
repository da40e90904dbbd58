"""``cxr-bench formats``: one table of every device x precision, in the spirit of ``yolo benchmark``:
each file (FP32, INT8, FP16) on each device of the row plan (:data:`DEFAULT_ROWS`), with status,
size, accuracy, timings and agreement with the backbone's CPU row (see docs/benchmarks.md).
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_infer.devices import CPU_PROVIDER, DEVICES, SessionRequest, tensorrt_cache_dir
from cxr_infer.errors import CXRError
from cxr_infer.metrics import binary_metrics
from cxr_infer.model import ModelFile
from cxr_infer.ov_session import OPENVINO_ENGINE

from .dataset import PixelCache, image_files, list_dataset
from .machine import describe_machine, machine_markdown
from .models import inspect_model
from .util import BenchError, fmt_num, fmt_pct, md_table, new_report, say, write_report

KIND = "cxr-bench/formats"
#: the rows of the default plan: (device, precision); a device of the registry not named here runs every file
DEFAULT_ROWS: Tuple[Tuple[str, str], ...] = (("cpu", "fp32"), ("cpu", "int8"), ("cuda", "fp32"), ("cuda", "fp16"),
                                             ("cuda", "int8"), ("tensorrt", "fp16"), ("tensorrt", "int8"),
                                             ("openvino", "fp32"), ("openvino", "int8"))
PRECISION_ORDER = ("fp32", "fp16", "int8")
#: the GPU goals the report checks
GOAL_IMAGES_PER_S = 5000.0   # ResNet50 FP16 at batch 64 on an H100/H200 class GPU
GOAL_ACCURACY_POINTS = 0.5   # every GPU row within this of CPU FP32 accuracy


def engines_of(device: str) -> Tuple[str, ...]:
    """What a session of ``device`` must report it runs on (one of them at least), from the registry."""
    entry = DEVICES[device]
    if entry.engine == "openvino":
        return (OPENVINO_ENGINE,)
    return entry.started or (CPU_PROVIDER,)


def in_plan(device: str, precision: str, rows: str) -> bool:
    """Whether the row plan ``rows`` (``default`` or ``all``) runs a file of ``precision`` on ``device``."""
    named = {d for d, _ in DEFAULT_ROWS}
    return rows == "all" or (device, precision) in DEFAULT_ROWS or device not in named


class Unavailable(Exception):
    """This row cannot run here (the reason becomes its ``skipped:`` status)."""


def provider_list(provider: str, precision: str, input_name: str, size: Tuple[int, int], max_batch: int,
                  available: Sequence[str]) -> Optional[List[Any]]:
    """onnxruntime providers for one row (None: the device opens its own engine), or :class:`Unavailable`."""
    device = DEVICES[provider]
    reason = device.missing(available)
    if reason:
        raise Unavailable(reason)
    if device.engine != "onnxruntime":
        return None
    request = SessionRequest(b"", "", 1, input_name=input_name, image_size=size, max_batch=max_batch,
                             precision=precision)
    return device.providers(request, available)


def _median_ms(fn: Callable[[], Any], calls: int, warmup: int = 0) -> float:
    """The median ms of ``calls`` timed calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def measure_row(path: Path, spec: Any, provider: str, pixels: np.ndarray, y: np.ndarray, threads: int,
                iterations: int, batch: int, available: Sequence[str],
                domain_pixels: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Open ``path`` on ``provider`` and measure it: accuracy, AUC, counts, timings, and the domain scores
    of ``pixels`` then ``domain_pixels``; a row that cannot run says why in its ``status``."""
    row: Dict[str, Any] = {"provider": provider, "file": str(path), "size_mb": path.stat().st_size / 1e6}
    try:
        providers = provider_list(provider, spec.precision, spec.input_name, spec.image_size, batch, available)
    except Unavailable as exc:
        return dict(row, status=f"skipped: {exc}")
    try:
        model = ModelFile(path, threads=threads, providers=providers, device=provider)
        row["providers"] = model.providers
        row["session_s"] = model.load_s
        wanted = engines_of(provider)
        if not set(wanted) & set(model.providers):
            return dict(row, status=f"failed: onnxruntime did not start {' or '.join(wanted)} for this file "
                                    f"(it runs on {', '.join(model.providers)})")
        out = [model.spec.prob_output]
        x1 = model.graph_input(pixels[:1])
        reps = -(-batch // len(pixels))
        xb = model.graph_input(np.concatenate([pixels] * reps)[:batch])
        t0 = time.perf_counter()
        model.run_input(x1, out)
        row["first_call_s"] = time.perf_counter() - t0
        row["ms_b1"] = _median_ms(lambda: model.run_input(x1, out), iterations, warmup=3)
        ms_b = _median_ms(lambda: model.run_input(xb, out), max(3, iterations // 5), warmup=2)
        row["images_per_s_b64"] = batch / (ms_b / 1000.0)
        probs = model.positive_probability(pixels, batch)
        if model.spec.domain_output and model.spec.domain_threshold is not None:
            both = pixels if domain_pixels is None or not len(domain_pixels) else \
                np.concatenate([pixels, domain_pixels])
            (scores,) = model.run(both, [model.spec.domain_output], batch)
            row["domain_scores"] = np.asarray(scores, np.float64).reshape(-1)
            row["domain_threshold"] = float(model.spec.domain_threshold)
    except (CXRError, RuntimeError, OSError, ValueError) as exc:
        return dict(row, status=f"failed: {str(exc).splitlines()[0][:300]}")
    m = binary_metrics(y, probs, float(model.spec.threshold))
    row.update(status="ok", accuracy=m["accuracy"], auc=m["auc"], tp=m["tp"], fp=m["fp"], tn=m["tn"], fn=m["fn"],
               threshold=float(model.spec.threshold), probabilities=probs)
    return row


def _trained(spec: Any) -> Optional[str]:
    """When the file's weights were trained (its spec's provenance), or None."""
    return None if spec.provenance.trained is None else str(spec.provenance.trained)


def _reference(rows: List[Dict[str, Any]], row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The CPU row ``row`` is compared with: the same backbone and training run, FP32 where there is one."""
    ok = [r for r in rows if r["backbone"] == row["backbone"] and r.get("trained") == row.get("trained")
          and r["provider"] == "cpu" and r["status"] == "ok"]
    ok.sort(key=lambda r: PRECISION_ORDER.index(r["precision"]) if r["precision"] in PRECISION_ORDER else 9)
    return ok[0] if ok else None


def run_formats(models: Sequence[str | Path], data: str | Path, out: str | Path,
                providers: Sequence[str] = ("cpu", "cuda", "tensorrt"), rows: str = "default",
                count: Optional[int] = None, iterations: int = 50, batch: int = 64, threads: int = 1,
                name: Optional[str] = None, quiet: bool = False,
                domain_data: Sequence[str | Path] = (), time_limit: Optional[float] = None) -> Dict[str, Any]:
    """Measure every (file, provider) of the row plan; write formats.json / formats.md into ``out``, again
    after every row (``"complete": false`` until the last). ``domain_data``: folders of unlabelled images
    whose in-domain decisions are compared too; ``time_limit``: seconds after which no row is started."""
    import onnxruntime as ort

    started = time.monotonic()
    if time_limit is not None and not time_limit > 0:
        raise BenchError(f"time limit {time_limit}: expected a number of seconds above 0")
    unknown = [p for p in providers if p not in DEVICES]
    if unknown:
        raise BenchError(f"unknown provider(s) {unknown}: choose from {', '.join(DEVICES)}")
    if rows not in ("default", "all"):
        raise BenchError(f"--rows {rows!r}: expected default or all")
    paths = [Path(m) for m in models]
    if not paths:
        raise BenchError("no model given: pass --model FILE.onnx [FILE.onnx ...]")
    files: List[Tuple[Path, str, str]] = []
    specs = {}
    for p in paths:
        specs[p], _, warnings = inspect_model(p)
        for w in warnings:
            say(f"warning: {w}", quiet)
        files.append((p, str(specs[p].backbone), str(specs[p].precision)))
    ds = list_dataset(data, limit=count)
    cache = PixelCache(ds.files, quiet=quiet)
    need = "--domain-data needs a folder of images"
    extra_files = [f for folder in domain_data for f in image_files(Path(folder), need)]
    extra = PixelCache(extra_files, quiet=quiet)
    available = ort.get_available_providers()
    plan = [(p, b, prec, prov) for prov in providers for p, b, prec in files if in_plan(prov, prec, rows)]
    plan.sort(key=lambda t: ([f[1] for f in files].index(t[1]), list(DEVICES).index(t[3]),
                             PRECISION_ORDER.index(t[2]) if t[2] in PRECISION_ORDER else 9))
    results: List[Dict[str, Any]] = []
    envelope = dict(data={"root": str(ds.root), "n_images": int(len(ds.files)), "counts": ds.counts(),
                          "limit_per_label": count},
                    domain_data={"folders": [str(f) for f in domain_data], "n_images": len(extra_files)},
                    providers_asked=list(providers), rows_plan=rows, rows_planned=len(plan), time_limit_s=time_limit,
                    iterations_b1=iterations, throughput_batch=batch, threads=threads,
                    tensorrt_cache=str(tensorrt_cache_dir()), machine=describe_machine())
    for path, backbone, precision, provider in plan:
        spec = specs[path]
        if time_limit is not None and time.monotonic() - started > time_limit:
            results.append(dict(provider=provider, file=str(path), size_mb=path.stat().st_size / 1e6,
                                backbone=backbone, precision=precision, trained=_trained(spec),
                                status=f"skipped: time limit of {time_limit:g} s reached before this row started"))
            continue
        pixels = cache.pixels(spec.image_size, spec.resize_method)
        keep = np.ones(len(ds.files), bool)
        keep[list(cache.failed)] = False
        y = ds.targets(spec.positive_label, spec.labels)[keep]
        if not keep.any():
            raise BenchError(f"{ds.root}: none of its {len(keep)} images could be read")
        say(f"{backbone} {precision} on {provider}: measuring {path.name}", quiet)
        extra_px = np.delete(extra.pixels(spec.image_size, spec.resize_method), list(extra.failed), axis=0) \
            if extra_files else None
        row = measure_row(path, spec, provider, pixels[keep], y, threads, iterations, batch, available, extra_px)
        row.update(backbone=backbone, precision=precision, trained=_trained(spec))
        say(f"{backbone} {precision} on {provider}: {row['status']}"
            + (f", accuracy {fmt_pct(row['accuracy'])}, {row['ms_b1']:.2f} ms at b1, "
               f"{row['images_per_s_b64']:.0f} images/s at b{batch}" if row["status"] == "ok" else ""), quiet)
        results.append(row)
        if len(results) < len(plan):  # what is measured so far, in case the run does not finish
            partial = _report(results, envelope, False, len(extra.failed))
            write_report(Path(out), "formats", name, partial, render_markdown, quiet=True)
    report = _report(results, envelope, True, len(extra.failed))
    write_report(Path(out), "formats", name, report, render_markdown, quiet)
    return report


def _compared(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Copies of ``results`` with their agreement with the backbone's CPU reference row, and
    without the per-image arrays (``results`` keeps them, for the rows still to come)."""
    rows = [dict(r) for r in results]
    for row in rows:
        ref = _reference(rows, row)
        if row["status"] != "ok" or ref is None:
            continue
        p, q = row["probabilities"], ref["probabilities"]
        row["reference"] = f"cpu {ref['precision']}"
        row["is_reference"] = row is ref
        row["label_agreement"] = float(np.mean((p >= row["threshold"]) == (q >= ref["threshold"])))
        row["max_abs_dp"] = float(np.max(np.abs(p - q))) if len(p) else 0.0
        row["accuracy_vs_reference_points"] = 100.0 * (row["accuracy"] - ref["accuracy"])
        if "domain_scores" in row and "domain_scores" in ref:
            a, b = row["domain_scores"], ref["domain_scores"]
            differ = (a > row["domain_threshold"]) != (b > ref["domain_threshold"])
            row["domain_images"] = int(len(a))
            row["domain_decisions_differ"] = int(differ.sum())
            row["domain_max_abs_dscore_rel"] = float(np.max(np.abs(a - b)) / abs(ref["domain_threshold"])) \
                if len(a) else 0.0
    return [{k: v for k, v in row.items() if k not in ("probabilities", "domain_scores")} for row in rows]


def _report(results: List[Dict[str, Any]], envelope: Dict[str, Any], complete: bool,
            unreadable: int) -> Dict[str, Any]:
    rows = _compared(results)
    domain_data = dict(envelope["domain_data"], unreadable=unreadable)  # known once they were decoded
    return new_report(KIND, **dict(envelope, domain_data=domain_data), complete=complete, rows=rows,
                      goals=_goals(rows))


def _goals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The GPU goals, as measured: ResNet50 FP16 throughput and GPU accuracy vs CPU FP32."""
    gpu = [r for r in rows if r["provider"] in ("cuda", "tensorrt") and r["status"] == "ok"]
    fast = [r for r in gpu if r["backbone"] == "resnet50" and r["precision"] == "fp16"]
    best = max((r["images_per_s_b64"] for r in fast), default=None)
    worst = min((r.get("accuracy_vs_reference_points") for r in gpu
                 if r.get("reference") == "cpu fp32"), default=None)
    return {"resnet50_fp16_images_per_s": best, "resnet50_fp16_goal": GOAL_IMAGES_PER_S,
            "resnet50_fp16_met": None if best is None else best >= GOAL_IMAGES_PER_S,
            "gpu_worst_accuracy_vs_cpu_fp32_points": worst, "gpu_accuracy_goal_points": GOAL_ACCURACY_POINTS,
            "gpu_accuracy_met": None if worst is None else worst >= -GOAL_ACCURACY_POINTS}


def _short(status: str) -> str:
    """A status for the table: up to its first ' (' or ';' (the whole text goes below the table)."""
    cut = [i for i in (status.find(" ("), status.find(";")) if i > 0]
    return status[:min(cut)] if cut else status


def _cells(r: Dict[str, Any]) -> List[str]:
    """A row's measured cells ("-" for a row that did not run), then its agreement with the CPU row."""
    measured = [fmt_pct(r.get("accuracy")), fmt_num(r.get("auc"), 4), f"{r['tp']} / {r['fp']} / {r['tn']} / {r['fn']}",
                f"{r['ms_b1']:.2f}", f"{r['images_per_s_b64']:.0f}", f"{r['session_s']:.2f} + {r['first_call_s']:.2f}"
                ] if r["status"] == "ok" else ["-"] * 6
    labels = "reference" if r.get("is_reference") else (
        f"{fmt_pct(r['label_agreement'], 1)}, {r['max_abs_dp']:.4f} ({r['reference']})" if r.get("reference") else "-")
    domain = "-" if "domain_images" not in r else "reference" if r.get("is_reference") else (
        f"{r['domain_decisions_differ']} of {r['domain_images']}, {r['domain_max_abs_dscore_rel']:.3f} x threshold")
    return measured + [labels, domain]


def render_markdown(report: Dict[str, Any]) -> str:
    """The table for people: one row per backbone x provider x precision."""
    m = report["machine"]
    rows = report["rows"]
    b = report["throughput_batch"]
    shared = Counter((r["backbone"], r["provider"], r["precision"]) for r in rows)

    def backbone(r: Dict[str, Any]) -> str:  # two files of one backbone and precision: name the file
        twice = shared[(r["backbone"], r["provider"], r["precision"])] > 1
        return f"{r['backbone']} (`{Path(r['file']).name}`)" if twice and r.get("file") else r["backbone"]

    lines = ["# Formats: every provider x precision", "",
             f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}: `{report['command']}`", "",
             f"Data: the {report['data']['n_images']} images of `{report['data']['root']}`; accuracy and AUC at each "
             f"file's own threshold. Timing on a ready input (probabilities only): median of "
             f"{report['iterations_b1']} calls at batch 1, and images/s at batch {b}; GPU figures include the "
             f"input's copy from host memory. onnxruntime {m.get('onnxruntime')} "
             f"({', '.join(m.get('onnxruntime_providers') or [])}); GPU: {'; '.join(m.get('gpus') or []) or 'none'}; "
             f"TensorRT engine cache `{report['tensorrt_cache']}`."
             + (f" In-domain decisions are compared on those images and on the {report['domain_data']['n_images']}"
                f" unlabelled images under {', '.join(f'`{f}`' for f in report['domain_data']['folders'])}"
                f" ({report['domain_data']['unreadable']} unreadable)." if report.get("domain_data", {}).get("folders")
                else ""), "",
             md_table(["Backbone", "Provider", "Precision", "Status", "Size (MB)", "Accuracy", "AUC",
                       "TP / FP / TN / FN", "ms (b1)", f"images/s (b{b})", "session + first call (s)",
                       "vs CPU: labels agree, max abs Δp", "vs CPU: in-domain decisions differ, max abs Δscore"],
                      [[backbone(r), r["provider"], r["precision"], _short(r["status"]), f"{r['size_mb']:.1f}"]
                       + _cells(r) for r in rows]), ""]
    if not report.get("complete", True):
        lines += [f"**Partial:** {len(rows)} of the {report.get('rows_planned', '?')} planned rows; the run had not "
                  "finished when this was written (it is rewritten after every row).", ""]
    long = [r for r in rows if r["status"] != _short(r["status"])]
    if long:
        lines += ["Status in full:", ""] + [f"- {r['backbone']} {r['provider']} {r['precision']}: {r['status']}"
                                            for r in long] + [""]
    g = report["goals"]
    lines += ["## Goals", "",
              f"- ResNet50 FP16 above {g['resnet50_fp16_goal']:.0f} images/s at batch {b} on an H100/H200 class GPU: "
              + ("not measured (no ResNet50 FP16 row ran on a GPU)" if g["resnet50_fp16_met"] is None else
                 f"{g['resnet50_fp16_images_per_s']:.0f} images/s, {'met' if g['resnet50_fp16_met'] else 'missed'}"),
              f"- every GPU row within {g['gpu_accuracy_goal_points']} point of CPU FP32 accuracy: "
              + ("not measured (no GPU row with a CPU FP32 reference)" if g["gpu_accuracy_met"] is None else
                 f"worst {g['gpu_worst_accuracy_vs_cpu_fp32_points']:+.2f} points, "
                 f"{'met' if g['gpu_accuracy_met'] else 'missed'}"), "",
              "## Machine", "", machine_markdown(m), ""]
    return "\n".join(lines)
