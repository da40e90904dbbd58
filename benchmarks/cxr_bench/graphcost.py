"""``cxr-bench graphcost``: what a graph added to a model file costs, the file against a copy without it
(the other added graph removed from both), timed in alternating blocks inside one worker process
(:func:`cxr_bench.worker.measure_paired`), several processes per file (see docs/benchmarks.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .latency import child_env, run_worker
from .machine import describe_machine, machine_markdown
from .util import BenchError, fmt_ms, md_table, new_report, say, write_report

KIND = "graphcost"
GRAPHS = ("domain", "heatmap")


def _node_count(path: str | Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def run_graphcost(models: Sequence[str | Path], out: str | Path, graph: str = "domain", batch: int = 1,
                  threads: int = 1, device: str = "cpu", processes: int = 3, blocks: int = 20, warmup: int = 5,
                  calls: int = 10, timeout: float = 600.0, name: Optional[str] = None,
                  quiet: bool = False) -> Dict[str, Any]:
    """Time each file with and without ``graph`` in ``processes`` worker processes; write the report
    into ``out``. A file's graph nodes: those the copy without ``graph`` lacks."""
    from .upstream import read_spec, write_without

    if graph not in GRAPHS:
        raise BenchError(f"--graph {graph!r}: choose {' or '.join(GRAPHS)}")
    if processes < 1 or blocks < 1 or calls < 1:
        raise BenchError("--processes, --blocks and --calls must be at least 1")
    variants = tempfile.TemporaryDirectory(prefix="cxr-graphcost-")
    subjects = []
    for i, path in enumerate(models):
        spec = read_spec(path)
        has = {"domain": bool(spec.domain_output), "heatmap": bool(spec.heatmap_output)}
        if not has[graph]:
            raise BenchError(f"{path}: has no {graph} graph to measure")
        other = "heatmap" if graph == "domain" else "domain"
        on = write_without(path, Path(variants.name) / f"on{i}.onnx", [other]) if has[other] else Path(path)
        off = write_without(path, Path(variants.name) / f"off{i}.onnx", [g for g in GRAPHS if has[g]])
        subjects.append({"name": Path(path).stem, "path": str(path), "on": str(on), "off": str(off),
                         "nodes": _node_count(on) - _node_count(off), "processes": []})
    env = child_env(threads)
    flag = "domain_check" if graph == "domain" else "heatmap"
    for r in range(processes):
        for s in subjects:
            cfg = {"mode": "paired", "engine": "onnx", "path_on": s["on"], "path_off": s["off"], "device": device,
                   "batch": batch, "threads": threads, "blocks": blocks, "warmup": warmup, "calls": calls,
                   "flags_on": {flag: True}, "flags_off": {}}
            res = run_worker(cfg, env, timeout)
            if "error" in res:
                raise BenchError(f"{s['path']}: {res['error']}")
            on_ms, off_ms = float(np.median(res["times_ms"]["on"])), float(np.median(res["times_ms"]["off"]))
            s["processes"].append({"on_ms": on_ms, "off_ms": off_ms, "cost": on_ms / off_ms - 1.0,
                                   "load_average_end": res.get("load_average_end")})
            say(f"{s['name']}: process {r + 1}/{processes}: {off_ms:.2f} -> {on_ms:.2f} ms "
                f"({100 * (on_ms / off_ms - 1):+.1f}%)", quiet)
    rows = []
    for s in subjects:
        costs = [p["cost"] for p in s["processes"]]
        rows.append({"name": s["name"], "path": s["path"], "graph_nodes": s["nodes"],
                     "off_ms": float(np.median([p["off_ms"] for p in s["processes"]])),
                     "on_ms": float(np.median([p["on_ms"] for p in s["processes"]])),
                     "cost": float(np.median(costs)), "cost_min": float(min(costs)), "cost_max": float(max(costs)),
                     "processes": s["processes"]})
    variants.cleanup()
    report = new_report(KIND, graph=graph, batch=batch, threads=threads, device=device,
                        processes=processes, blocks=blocks, warmup=warmup, calls=calls, rows=rows,
                        machine=describe_machine())
    write_report(Path(out), "graphcost", name, report, render_markdown, quiet)
    return report


def render_markdown(report: Dict[str, Any]) -> str:
    what = {"domain": "out-of-domain check", "heatmap": "Grad-CAM graph"}[report["graph"]]
    lines = [f"# What the {what} costs", "",
             f"Created {report['created']} by cxr-bench {report['cxr_bench_version']}: `{report['command']}`", "",
             f"Each file, its {report['graph']} output fetched, against a copy without its {report['graph']} "
             f"graph (the other added graph removed from both), batch {report['batch']}, {report['threads']} "
             f"thread(s), on {report['device']}. One worker "
             f"process holds both and alternates them in {report['blocks']} blocks of {report['warmup']} warm-up "
             f"and {report['calls']} timed calls; {report['processes']} such processes per file, interleaved "
             "across files. Cost: the median over processes of (median on / median off - 1); the range is "
             "over processes.", "",
             md_table(["Model", "graph nodes", "without (ms)", "with (ms)", "cost", "range over processes"],
                      [[r["name"], r["graph_nodes"], fmt_ms(r["off_ms"]), fmt_ms(r["on_ms"]),
                        f"{100 * r['cost']:+.1f}%", f"{100 * r['cost_min']:+.1f} to {100 * r['cost_max']:+.1f}%"]
                       for r in report["rows"]]), "",
             "## Machine", "", machine_markdown(report["machine"]), ""]
    return "\n".join(lines)
