"""``cxr-bench latency``: per-call latency of model files (and PyTorch eager), each configuration
(model x batch) in fresh worker processes (:mod:`cxr_bench.worker`), interleaved in rotated rounds so
that a slow spell on a shared machine hits all alike (see docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .machine import describe_machine, load_average, machine_markdown, package_version
from .models import inspect_model
from .util import BenchError, fmt_ms, fmt_num, mb, md_table, new_report, say, write_report
from .worker import MARKER

KIND = "cxr-bench/latency"


def child_env(threads: int) -> Dict[str, str]:
    """The parent's environment, thread variables pinned, and cxr packages importable."""
    import cxr_bench
    import cxr_infer

    from .upstream import source_roots

    env = dict(os.environ)
    roots = [str(Path(cxr_bench.__file__).resolve().parents[1]), str(Path(cxr_infer.__file__).resolve().parents[1])]
    roots += source_roots()
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + ([old] if old else [])))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def checkpoint_info(folder: str | Path) -> Dict[str, Any]:
    """Backbone, weights file and size of a cxr-train run folder (read without importing torch)."""
    from .upstream import checkpoint_summary

    try:
        summary = checkpoint_summary(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchError(f"--checkpoint {folder}: {exc} (pass a cxr-train run folder, e.g. runs/resnet50)"
                         ) from None
    if package_version("torch") is None:
        raise BenchError("--checkpoint needs PyTorch for the eager baseline: pip install '.[bench,train]' "
                         "(or leave --checkpoint out)")
    return {"engine": "torch", "path": summary["folder"], "name": f"{summary['backbone']} (PyTorch eager fp32)",
            "backbone": summary["backbone"], "precision": "fp32", "file_bytes": summary["file_bytes"],
            "weights_file": summary["weights_name"],
            "weights_note": "weights stored as fp16, run as fp32" if summary["stored_fp16"] else ""}


def model_info(path: str | Path) -> Dict[str, Any]:
    """Backbone, precision and size of an ONNX model file (spec checked before any timing)."""
    from cxr_infer.info import file_sha256 as sha256_file

    p = Path(path)
    spec, facts, warnings = inspect_model(p)
    return {"engine": "onnx", "path": str(p), "name": p.stem, "backbone": spec.backbone, "precision": spec.precision,
            "domain_output": spec.domain_output, "heatmap_output": spec.heatmap_output,
            "heatmap_switched": bool(spec.heatmap_output and spec.switches),
            "file_bytes": p.stat().st_size, "sha256": sha256_file(p), "graph": facts, "warnings": warnings}


def run_worker(cfg: Dict[str, Any], env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Run one measurement process and return its result (``{"error": ...}`` on failure)."""
    cmd = [sys.executable, "-m", "cxr_bench.worker", json.dumps(cfg)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (raise --timeout or lower --iterations)"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        return {"error": f"worker failed: {tail[0][:300]}"}
    return json.loads(lines[-1][len(MARKER):])


def aggregate(processes: List[Dict[str, Any]], batch: int) -> Dict[str, Any]:
    """Headline figures of one configuration from its per-process results."""
    ok = [p for p in processes if "times_ms" in p and p["times_ms"]]
    if not ok:
        return {"error": processes[0].get("error", "no result") if processes else "not run"}
    medians = [float(np.median(p["times_ms"])) for p in ok]
    pooled = np.concatenate([p["times_ms"] for p in ok])
    med = float(np.median(medians))

    def median_of(key: str) -> Optional[float]:  # over the processes that report it
        values = [p[key] for p in ok if p.get(key) is not None]
        return float(np.median(values)) if values else None

    return {"median_ms": med, "p90_ms": float(np.percentile(pooled, 90)), "p99_ms": float(np.percentile(pooled, 99)),
            "mean_ms": float(pooled.mean()), "min_ms": float(pooled.min()),
            "images_per_s": batch * 1000.0 / med if med > 0 else None, "ms_per_image": med / batch,
            "process_medians_ms": medians,
            "process_spread": (max(medians) / min(medians) - 1.0) if min(medians) > 0 else None,
            "timed_calls": int(pooled.size), "processes_ok": len(ok), "processes_failed": len(processes) - len(ok),
            "load_s": median_of("load_s"), "first_run_ms": median_of("first_run_ms"), "import_s": median_of("import_s"),
            "peak_rss_bytes": int(max(p["peak_rss_bytes"] for p in ok)),
            "rss_before_load_bytes": int(median_of("rss_before_load_bytes")),
            "cpu_per_wall": median_of("cpu_per_wall"), "load_average_1min": median_of("load_average_end")}


ONOFF = {"off": [False], "on": [True], "both": [False, True]}
#: how each engine is set up, as the report states it
SESSION_NOTE = ("cxr_infer.devices.session_options: ORT_ENABLE_ALL, sequential, intra_op_num_threads = threads, "
                "inter_op_num_threads = 1, no spinning workers (as the Classifier)")
OPENVINO_NOTE = ("; OpenVINO: the OpenVINO runtime on the CPU (cxr_infer.ov_session), INFERENCE_NUM_THREADS = "
                 "threads, PERFORMANCE_HINT LATENCY, one stream, model cache as cxr_infer.devices.openvino_cache_dir "
                 "(Load s with a warm cache after the first process)")
INPUT_NOTE = ("ONNX: the graph input (cxr_infer.model.graph_input) of seeded random uint8 pixels, built once; "
              "PyTorch: a seeded standard-normal tensor of the input shape")
TORCH_NOTE = "fp32 eager, torch.inference_mode, set_num_threads(threads), interop threads 1"


def missing_devices(devices: Sequence[str]) -> Dict[str, str]:
    """Why each of ``devices`` cannot run here (the registry's line), for those that cannot; a
    :class:`~cxr_infer.errors.DeviceError` when the only device asked for cannot."""
    from cxr_infer.devices import get_device
    from cxr_infer.errors import DeviceError

    missing = {d: reason for d in devices if (reason := get_device(d).missing())}
    if missing and len(devices) == 1:
        raise DeviceError(missing[devices[0]])
    return missing


def plan_configs(subjects: List[Dict[str, Any]], devices: Sequence[str], batches: Sequence[int], domain_check: str,
                 heatmap: str, torch_device: str) -> List[Dict[str, Any]]:
    """Every configuration to measure: each model file on each device, each way of its added graphs
    (``domain_check``, ``heatmap``: off, on or both), each batch; a checkpoint on ``torch_device``."""
    configs: List[Dict[str, Any]] = []
    multi = len(devices) > 1
    for s in subjects:
        onnx = s["engine"] == "onnx"
        modes = ONOFF[domain_check] if onnx and s.get("domain_output") else [False]
        maps = ONOFF[heatmap] if onnx and s.get("heatmap_output") else [False]
        for dev in (devices if onnx else [torch_device]):
            for dc in modes:
                for hm in maps:
                    subject = {**s, "domain_check": dc, "heatmap": hm, "device": dev,
                               "name": s["name"] + (f" [{dev}]" if multi and onnx else "")
                               + (" +domain check" if dc else "") + (" +heatmap" if hm else "")}
                    configs += [{**subject, "batch": int(b)} for b in batches]
    return configs


def strip_unasked_graphs(configs: List[Dict[str, Any]], folder: Path) -> None:
    """Point each ONNX configuration that leaves an added graph off at a copy of its file without
    that graph (``run_path``, ``run_file_bytes``, ``removed``), one copy per file and choice. A heatmap
    behind a switch input runs only when fetched, so leaving it off needs no copy."""
    from .upstream import write_without

    made: Dict[Tuple[str, bool, bool], str] = {}
    for c in configs:
        if c["engine"] != "onnx":
            continue
        strip_domain = bool(c.get("domain_output")) and not c.get("domain_check")
        strip_map = bool(c.get("heatmap_output")) and not c.get("heatmap") and not c.get("heatmap_switched")
        if strip_domain or strip_map:
            key = (c["path"], strip_domain, strip_map)
            if key not in made:
                names = [g for g, strip in (("domain", strip_domain), ("heatmap", strip_map)) if strip]
                made[key] = str(write_without(c["path"], folder / f"v{len(made)}.onnx", names))
            c["run_path"] = made[key]
            c["run_file_bytes"] = Path(made[key]).stat().st_size
            c["removed"] = [g for g, on in (("domain graph", strip_domain), ("heatmap graph", strip_map)) if on]


def measure_rounds(configs: List[Dict[str, Any]], settings: Dict[str, Any], env: Dict[str, str], timeout: float,
                   quiet: bool = False) -> Tuple[List[List[Dict[str, Any]]], List[List[int]]]:
    """Each configuration once per round in a fresh worker process, ``settings["repeats"]`` rounds, the
    order rotated every round; the per-process results of each configuration, and the orders."""
    repeats = settings["repeats"]
    raw: List[List[Dict[str, Any]]] = [[] for _ in configs]
    order_log: List[List[int]] = []
    for r in range(repeats):
        order = [(i + r) % len(configs) for i in range(len(configs))]
        order_log.append(order)
        for k, i in enumerate(order):
            c = configs[i]
            cfg = {"engine": c["engine"], "path": c.get("run_path", c["path"]), "device": c["device"],
                   "batch": c["batch"], "domain_check": c.get("domain_check", False),
                   "heatmap": c.get("heatmap", False),
                   **{key: settings[key] for key in ("threads", "warmup", "iterations", "max_seconds", "seed")}}
            res = run_worker(cfg, env, timeout)
            res["round"] = r + 1
            raw[i].append(res)
            what = f"{res['error']}" if "error" in res else (
                f"median {np.median(res['times_ms']):.2f} ms over {len(res['times_ms'])} calls, "
                f"load {res['load_s']:.2f} s")
            say(f"round {r + 1}/{repeats} [{k + 1}/{len(configs)}] {c['name']} batch {c['batch']}: {what}", quiet)
    return raw, order_log


def run_latency(models: Sequence[str | Path] = (), checkpoints: Sequence[str | Path] = (),
                batches: Sequence[int] = (1,), threads: int = 1, device: str | Sequence[str] = "cpu",
                repeats: int = 3, warmup: int = 3, iterations: int = 20, max_seconds: float = 10.0,
                timeout: float = 600.0, out: Optional[str | Path] = None, name: Optional[str] = None, seed: int = 0,
                quiet: bool = False, domain_check: str = "off", heatmap: str = "off") -> Dict[str, Any]:
    """Measure every (model or checkpoint) x batch x device, ``repeats`` fresh processes each, interleaved;
    ``domain_check`` and ``heatmap`` as ``cxr-bench latency --help`` says."""
    for option, value in (("--domain-check", domain_check), ("--heatmap", heatmap)):
        if value not in ONOFF:
            raise BenchError(f"{option} {value!r}: choose off, on or both")
    if not models and not checkpoints:
        raise BenchError("nothing to measure: pass --model FILE.onnx and/or --checkpoint RUN_FOLDER")
    if repeats < 1 or iterations < 1 or threads < 1 or any(b < 1 for b in batches):
        raise BenchError("--repeats, --iterations, --threads and every --batch must be at least 1")
    devices = [device] if isinstance(device, str) else list(dict.fromkeys(device))
    missing = missing_devices(devices)  # fail (or note) before any process starts if a device is missing
    torch_device = "cuda" if "cuda" in devices else "cpu"
    subjects = [model_info(m) for m in models] + [checkpoint_info(c) for c in checkpoints]
    warnings = [w for s in subjects for w in s.pop("warnings", [])]
    for w in warnings:
        say(f"warning: {w}", quiet)
    configs = plan_configs(subjects, devices, batches, domain_check, heatmap, torch_device)
    unavailable = [c for c in configs if c["engine"] == "onnx" and c["device"] in missing]
    configs = [c for c in configs if not (c["engine"] == "onnx" and c["device"] in missing)]
    for d, why in missing.items():
        warnings.append(f"device {d} not measured: {why}")
        say(f"warning: device {d} not measured: {why}", quiet)
    settings: Dict[str, Any] = {
        "device": ",".join(devices), "devices": devices, "torch_device": torch_device, "threads": threads,
        "batches": list(batches), "repeats": repeats, "domain_check": domain_check, "heatmap": heatmap,
        "warmup": warmup, "iterations": iterations, "max_seconds": max_seconds, "seed": seed}
    machine = describe_machine(torch_used=bool(checkpoints))
    with tempfile.TemporaryDirectory(prefix="cxr-latency-") as variants:
        strip_unasked_graphs(configs, Path(variants))
        raw, settings["order"] = measure_rounds(configs, settings, child_env(threads), timeout, quiet)
    if (end := load_average()) is not None:
        machine["load_average_end_1_5_15"] = end
    results = [{**c, "threads": threads, **aggregate(procs, c["batch"]), "processes": procs}
               for c, procs in zip(configs, raw)]
    results += [{**c, "threads": threads, "error": missing[c["device"]], "unavailable": True, "processes": []}
                for c in unavailable]
    settings.update(input=INPUT_NOTE, onnxruntime_session=SESSION_NOTE + (OPENVINO_NOTE if "openvino" in devices
                                                                          else ""), torch=TORCH_NOTE)
    report: Dict[str, Any] = {**new_report(KIND), "machine": machine, "settings": settings, "results": results,
                              "warnings": warnings, "comparisons": comparisons(results)}
    if out is not None:
        write_report(Path(out), "latency", name, report, render_markdown, quiet)
    return report


def _same_file_kind(r: Dict[str, Any], base: Dict[str, Any]) -> Optional[str]:
    """How ``r`` compares with ``base``, a row of the same file: another device, or an added graph on."""
    same_dc, same_hm = r.get("domain_check") == base.get("domain_check"), r.get("heatmap") == base.get("heatmap")
    if base.get("device", "cpu") != r.get("device", "cpu"):
        return "vs onnxruntime CPU provider" if base.get("device", "cpu") == "cpu" and same_dc and same_hm else None
    if r.get("heatmap") and not base.get("heatmap") and same_dc:
        return "heatmap on vs off"
    if r.get("domain_check") and not base.get("domain_check") and same_hm:
        return "domain check on vs off"
    return None


def comparisons(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Speed-ups: ONNX vs PyTorch eager (same backbone, batch) and INT8/FP16 vs FP32 ONNX."""
    ok = [r for r in results if r.get("median_ms")]
    plain = {r["path"] for r in ok if r["engine"] == "onnx" and not r.get("domain_check")}
    unmapped = {r["path"] for r in ok if r["engine"] == "onnx" and not r.get("heatmap")}
    out = []
    for r in [x for x in ok if x["engine"] == "onnx"]:
        for base in ok:
            if base["backbone"] != r["backbone"] or base["batch"] != r["batch"] or base is r:
                continue
            if base["engine"] == "onnx" and base["path"] == r["path"]:
                kind = _same_file_kind(r, base)
            elif any(x.get("domain_check") and x["path"] in plain for x in (r, base)):
                continue  # like with like: the check-off row of that file stands for it
            elif any(x.get("heatmap") and x["path"] in unmapped for x in (r, base)):
                continue  # and the heatmap-off row
            elif base["engine"] == "torch":
                kind = "vs PyTorch eager fp32"
            else:
                kind = "vs ONNX fp32" if base["precision"] == "fp32" and r["precision"] != "fp32" else None
            if kind is not None:
                out.append({"backbone": r["backbone"], "batch": r["batch"], "model": r["name"],
                            "baseline": base["name"], "kind": kind, "speedup": base["median_ms"] / r["median_ms"]})
                if kind == "vs onnxruntime CPU provider":
                    out[-1]["load_s_extra"] = r["load_s"] - base["load_s"]
    return out


OUTPUTS_NOTE = {
    "domain_check": {"off": "the probabilities alone, from a copy of each file without its domain graph "
                            "(domain check off, as PyTorch computes them)",
                     "on": "probabilities and domain_score for models that have it (the file as it is, as "
                           "Classifier runs it; rows marked +domain check)",
                     "both": "models with domain statistics measured as they are, with the domain_score "
                             "output (rows marked +domain check), and from a copy without the domain graph"},
    "heatmap": {"off": "; the Grad-CAM graph removed from the copy too (a map behind a switch input is "
                       "left in the file: it runs only when fetched)",
                "on": "; plus the heatmap output (rows marked +heatmap)",
                "both": "; models with a heatmap output measured with it (rows marked +heatmap) and without it: "
                        "the file as it is where the map sits behind a switch input (it runs only when fetched), "
                        "else a copy without the Grad-CAM graph"}}


def render_markdown(report: Dict[str, Any]) -> str:
    """The Markdown latency report: machine, settings, results table, speed-ups, method."""
    L = ["# cxr-bench latency report", "", f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}.",
         ""] + [f"**Warning:** {w}." for w in report.get("warnings", [])] + ([""] if report.get("warnings") else []) + [
         "## Machine", "", machine_markdown(report["machine"]), "", "## Settings", ""]
    L += _settings_lines(report["settings"])
    L += ["", "## Results", "",
          "Median: median of the per-process medians. p90/p99: over all timed calls of all processes. "
          "Load: session/model load time (median). Peak RSS: largest peak resident memory of any process "
          "(interpreter and libraries included). CPU/wall: CPU seconds the process used per second of timing "
          "(about the thread count when it had its cores; lower means other work on the machine took them, "
          "and its times are pessimistic).", "", _results_table(report["results"]), ""]
    failures = [(r, p) for r in report["results"] for p in r.get("processes", []) if p.get("error")]
    if failures:
        L += ["## Failed processes", "", "Left out of the figures above:", ""] + [
            f"- {r['name']} batch {r['batch']}, round {p.get('round', '?')}: {p['error']}" for r, p in failures] + [""]
    if report["comparisons"]:
        L += _speedups(report)
    r = next((r for r in report["results"] if r.get("weights_note")), None)
    if r is not None:
        L += [f"- {r['name']}: file size is `{r['weights_file']}` ({r['weights_note']}).", ""]
    L += ["Reproduce:", "", "```", report["command"], "```", ""]
    return "\n".join(L)


def _settings_lines(s: Dict[str, Any]) -> List[str]:
    torch_on = f" (PyTorch on {s['torch_device']})" if s.get("devices") and len(s["devices"]) > 1 else ""
    return [f"- Device {s['device']}{torch_on}, {s['threads']} thread(s) fixed; batch sizes "
            f"{', '.join(map(str, s['batches']))}.",
            f"- Each configuration measured in {s['repeats']} fresh process(es), interleaved in rotated order; "
            f"per process {s['warmup']} warm-up call(s), then up to {s['iterations']} timed calls "
            f"(fewer, at least 3, once {s['max_seconds']:g} s of timing is spent).",
            f"- ONNX Runtime: {s['onnxruntime_session']}. PyTorch: {s['torch']}.",
            f"- Input: {s['input']}.",
            "- Outputs: " + OUTPUTS_NOTE["domain_check"][s.get("domain_check", "off")]
            + OUTPUTS_NOTE["heatmap"][s.get("heatmap", "off")]
            + ". A graph in the file costs time even when its output is not asked for (onnxruntime runs every "
              "node), so 'off' means removed, not merely not fetched, except behind a switch input."]


def _engine(r: Dict[str, Any]) -> str:
    """How the results table names what ran a row: PyTorch, onnxruntime (on a device), OpenVINO."""
    from cxr_infer.devices import DEVICES

    if r["engine"] != "onnx":
        return "PyTorch eager"
    device = r.get("device", "cpu")
    if device == "cpu":
        return "onnxruntime"
    entry = DEVICES.get(device)
    return "OpenVINO" if entry is not None and entry.engine == "openvino" else f"onnxruntime ({device})"


def _results_table(results: List[Dict[str, Any]]) -> str:
    rows = []
    for r in results:
        engine = _engine(r)
        if r.get("unavailable") or not r.get("median_ms"):
            status = "not available here" if r.get("unavailable") else "failed: " + str(r.get("error"))
            rows.append([r["name"], engine, r["precision"], r["batch"], status] + [""] * 7 + [mb(r["file_bytes"])])
            continue
        pm = r["process_medians_ms"]
        rows.append([r["name"], engine, r["precision"], r["batch"], fmt_ms(r["median_ms"]), fmt_ms(r["p90_ms"]),
                     fmt_ms(r["p99_ms"]), fmt_num(r["images_per_s"], 1),
                     f"{fmt_ms(min(pm))} – {fmt_ms(max(pm))} ({len(pm)} × {r['timed_calls'] // max(len(pm), 1)})",
                     fmt_num(r.get("cpu_per_wall"), 2), fmt_num(r["load_s"], 2), mb(r["peak_rss_bytes"]),
                     mb(r["file_bytes"])])
    return md_table(["Model", "Engine", "Precision", "Batch", "Median ms", "p90 ms", "p99 ms", "Images/s",
                     "Process medians ms (processes × calls)", "CPU/wall", "Load s", "Peak RSS MiB", "File MiB"], rows,
                    "lllrrrrrrrrrr")


def _compared_with(c: Dict[str, Any]) -> str:
    if "PyTorch" in c["baseline"]:
        return c["baseline"]
    what = c["kind"][3:] if c["kind"].startswith("vs ") else c["kind"].split(" on vs ")[0] + " off"
    return f"{c['baseline']} ({what})"


def _speedups(report: Dict[str, Any]) -> List[str]:
    comps = report["comparisons"]
    L = ["## Speed-ups (ratio of medians)", "",
         md_table(["Backbone", "Batch", "Model", "Compared with", "Speed-up"],
                  [[c["backbone"], c["batch"], c["model"], _compared_with(c), f"{c['speedup']:.2f}x"] for c in comps],
                  "lrllr"), ""]
    loads = [c for c in comps if "load_s_extra" in c]
    if loads:
        L += ["Session cost against per-image gain (provider vs the CPU provider, same file): the extra session load "
              "time divided by the gain per call is the number of calls from which the faster provider wins.", "",
              md_table(["Model", "Batch", "Extra load s", "Gain ms/call", "Crossover (calls)"],
                       [[c["model"], c["batch"], f"{c['load_s_extra']:.3f}", *_session_cost(report, c)] for c in loads],
                       "lrrrr"), ""]
    return L + ["Speed-up = baseline median / model median (above 1: the model is faster; for the domain "
                "check, below 1 is its cost).", ""]


def _session_cost(report: Dict[str, Any], c: Dict[str, Any]) -> List[str]:
    """The gain per call of comparison ``c``, and the calls from which it pays its extra load time."""
    by_name = {r["name"]: r for r in report["results"] if r.get("median_ms")}
    gain = by_name[c["baseline"]]["median_ms"] - by_name[c["model"]]["median_ms"]
    if c["load_s_extra"] <= 0:
        return [fmt_ms(gain), "from the first" if gain > 0 else "n/a"]
    return [fmt_ms(gain), "never" if gain <= 0 else f"{c['load_s_extra'] * 1000.0 / gain:.0f}"]

