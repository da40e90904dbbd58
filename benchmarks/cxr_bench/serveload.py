"""``cxr-bench serve``: ``cxr-serve`` under a bounded load on loopback against an in-process
``Classifier`` on the same images, and ``cxr-infer --ray`` batch scoring on one and two local
Ray nodes (see docs/serving.md).

Each concurrency level sends a fixed number of requests from that many client threads, each
with its own keep-alive connection, and reports throughput and p50/p95/p99 latency; the
server's ``/metrics`` give the images per model run that its dynamic batching reached. The
in-process baseline runs ``Classifier.predict`` on the same bytes from as many threads.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .dataset import IMAGE_SUFFIXES
from .latency import child_env
from .machine import describe_machine, machine_markdown
from .util import BenchError, md_table, new_report, say, write_report

KIND = "cxr-bench/serve"


def pick_files(folder: str, count: Optional[int]) -> List[Path]:
    """The images of ``folder`` (searched recursively, sorted), the first ``count`` spread evenly."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BenchError(f"--images {folder}: no images found")
    if count is None or count >= len(files):
        return files
    return [files[i] for i in np.unique(np.linspace(0, len(files) - 1, count).round().astype(int))]


def _stats(latencies: Sequence[float], wall: float, errors: int) -> Dict[str, Any]:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies) + errors, "errors": errors, "wall_s": wall,
            "throughput_per_s": len(latencies) / wall if wall > 0 else None,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def load(call: Callable[[int, Any], bool], setup: Callable[[], Any], concurrency: int, requests: int
         ) -> Dict[str, Any]:
    """``requests`` calls of ``call(i, state) -> ok`` from ``concurrency`` threads, each with its ``setup()`` state."""
    latencies: List[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        state = setup()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            ok = call(i, state)
            took = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(took)
                else:
                    errors[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return _stats(latencies, time.perf_counter() - t0, errors[0])


def in_process(model: Optional[str], bodies: List[bytes], threads: int, levels: Sequence[int], requests: int,
               quiet: bool) -> Dict[str, Any]:
    """``Classifier.predict(bytes)`` from 1, 8, 32 threads: the baseline a service competes with."""
    from cxr_infer import Classifier

    clf = Classifier(model, threads=threads)
    out = {}
    for c in levels:
        out[str(c)] = load(lambda i, _: clf.predict(bodies[i % len(bodies)]) is not None, lambda: None, c, requests)
        say(f"in-process, concurrency {c}: {out[str(c)]['throughput_per_s']:.1f} images/s", quiet)
    return out


class Server:
    """``python -m cxr_serve`` on a free loopback port, stopped by :meth:`stop`."""

    def __init__(self, model: Optional[str], threads: int, max_batch: int, max_wait_ms: float) -> None:
        args = [sys.executable, "-m", "cxr_serve", "--port", "0", "--threads", str(threads), "--max-batch",
                str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
        self.log = tempfile.NamedTemporaryFile(prefix="cxr-bench-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(args + (["--model", model] if model else []), stdout=self.log,
                                        stderr=subprocess.STDOUT, env=child_env(threads))
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r" on http://127\.0\.0\.1:(\d+)", Path(self.log.name).read_text())
            if found:
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"cxr-serve did not start: {Path(self.log.name).read_text()[-500:]}")
            time.sleep(0.1)

    def batches(self) -> Dict[str, float]:
        """The ``cxr_batch_size`` histogram: count, sum and cumulative bucket counts."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        out = {}
        for m in re.finditer(r'^cxr_batch_size_(count|sum|bucket\{le="([^"]+)"\}) (\S+)$', text, re.M):
            out[m.group(2) or m.group(1)] = float(m.group(3))
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        Path(self.log.name).unlink(missing_ok=True)


def _batching(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, Any]:
    runs = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    bounds = sorted((float(k), after[k] - before.get(k, 0.0)) for k in after if k not in ("count", "sum", "+Inf"))
    reached = next((b for b, n in bounds if n >= runs), None)
    return {"model_runs": runs, "images": images, "mean_batch": images / runs if runs else None,
            "max_batch_at_most": reached}


def over_http(server: Server, bodies: List[bytes], levels: Sequence[int], requests: int, quiet: bool
              ) -> Dict[str, Any]:
    """``POST /v1/classify`` at each concurrency, each client thread on its own keep-alive connection."""
    def call(i: int, conn: http.client.HTTPConnection) -> bool:
        conn.request("POST", "/v1/classify", body=bodies[i % len(bodies)])
        r = conn.getresponse()
        r.read()
        return r.status == 200

    out = {}
    for c in levels:
        before = server.batches()
        res = load(call, lambda: http.client.HTTPConnection("127.0.0.1", server.port, timeout=120), c, requests)
        res["batching"] = _batching(before, server.batches())
        out[str(c)] = res
        say(f"cxr-serve, concurrency {c}: {res['throughput_per_s']:.1f} images/s, mean batch "
            f"{res['batching']['mean_batch']:.1f}", quiet)
    return out


def ray_batch(model: Optional[str], folder: str, cpus: int, quiet: bool) -> Dict[str, Any]:
    """``cxr-infer --ray`` on ``folder``, on one local node and then on two (``cpus`` CPUs each)."""
    from .raycluster import LocalCluster

    env = child_env(1)
    out: Dict[str, Any] = {"cpus_per_node": cpus}
    cluster = LocalCluster(nodes=1, cpus=cpus, env=env)
    try:
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node()
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "cxr_infer.cli", "--ray", cluster.address, folder, "--format", "jsonl",
                       "--output", str(Path(tmp) / "out.jsonl"), "--no-progress"]
                cmd += ["--model", model] if model else []
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
                wall = time.perf_counter() - t0
                rows = (Path(tmp) / "out.jsonl").read_text().splitlines() if r.returncode in (0, 1) else []
            if not rows:
                raise BenchError(f"cxr-infer --ray failed: {r.stderr.strip()[-500:]}")
            out[f"{nodes}_node"] = {"images": len(rows), "wall_s": wall, "images_per_s": len(rows) / wall,
                                    "errors": sum(1 for row in rows if "error" in json.loads(row))}
            say(f"cxr-infer --ray on {nodes} node(s): {len(rows) / wall:.1f} images/s (whole command)", quiet)
    finally:
        cluster.stop()
    return out


def run_serve(model: Optional[str], images: str, count: int, levels: Sequence[int], requests: int, threads: int,
              max_batch: int, max_wait_ms: float, ray_cpus: Optional[int], out: Optional[str], name: Optional[str],
              quiet: bool) -> Dict[str, Any]:
    """The whole measurement; writes ``serve[-NAME].json/.md`` into ``out``."""
    from cxr_infer import Classifier

    files = pick_files(images, count)
    bodies = [f.read_bytes() for f in files]
    clf = Classifier(model, threads=1)
    report: Dict[str, Any] = {
        **new_report(KIND), "machine": describe_machine(), "model": clf.model_path or clf.name,
        "backbone": clf.spec.backbone, "precision": clf.spec.precision,
        "settings": {"images": len(files), "image_folder": images, "concurrency": list(levels),
                     "requests_per_level": requests, "threads": threads, "max_batch": max_batch,
                     "max_wait_ms": max_wait_ms}}
    del clf
    report["in_process"] = in_process(model, bodies, threads, levels, requests, quiet)
    server = Server(model, threads, max_batch, max_wait_ms)
    try:
        over_http(server, bodies[:8], [1], 8, True)  # warm-up: connections, first runs
        report["http"] = over_http(server, bodies, levels, requests, quiet)
    finally:
        server.stop()
    if ray_cpus:
        report["ray"] = ray_batch(model, images, ray_cpus, quiet)
    if out is not None:
        write_report(Path(out), "serve", name, report, render_markdown, quiet)
    return report


def _rows(report: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for c in report["settings"]["concurrency"]:
        for what, part in (("in-process Classifier", report["in_process"]), ("cxr-serve over HTTP", report["http"])):
            r = part[str(c)]
            b = r.get("batching")
            batch = f"{b['mean_batch']:.1f} (at most {b['max_batch_at_most']:g})" if b else "-"
            rows.append([str(c), what, f"{r['throughput_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}",
                         f"{r['p99_ms']:.0f}", str(r["errors"]), batch])
    return rows


def _per_core(report: Dict[str, Any]) -> Tuple[Optional[float], str]:
    best = max(r["throughput_per_s"] for r in report["in_process"].values())
    cores = report["machine"].get("usable_cpus") or 1
    return best / cores, f"{best:.1f} images/s on {cores} CPU(s)"


def render_markdown(report: Dict[str, Any]) -> str:
    """The Markdown report."""
    s = report["settings"]
    L = ["# cxr-bench serve report", "",
         f"Model `{report['model']}` ({report['backbone']} {report['precision']}); {s['images']} images from "
         f"`{s['image_folder']}`, {s['requests_per_level']} requests per concurrency level, {s['threads']} "
         f"inference thread(s), batches of at most {s['max_batch']} waiting at most {s['max_wait_ms']:g} ms. "
         f"Created {report['created']}.", "", "## Machine", "", machine_markdown(report["machine"]), "",
         "## Online: cxr-serve against an in-process Classifier", "",
         md_table(["Concurrency", "Path", "Images/s", "p50 ms", "p95 ms", "p99 ms", "Errors",
                   "Images per model run: mean (largest bucket)"], _rows(report), "llrrrrrl"), "",
         "Latency is from the client's send to its answer; over HTTP it includes decoding the image in the "
         "server, the wait for a batch and the JSON answer. The in-process rows call `Classifier.predict(bytes)` "
         "from as many threads, on the same session.", ""]
    per_core, basis = _per_core(report)
    L += [f"Measured per-core rate: {per_core:.1f} images/s per CPU ({basis}, the best in-process level).", ""]
    ray = report.get("ray")
    if ray:
        L += ["## Batch scoring: cxr-infer --ray", "",
              md_table(["Nodes", "CPUs per node", "Images", "Seconds", "Images/s"],
                       [[str(n), str(ray["cpus_per_node"]), str(ray[f"{n}_node"]["images"]),
                         f"{ray[f'{n}_node']['wall_s']:.1f}", f"{ray[f'{n}_node']['images_per_s']:.1f}"]
                        for n in (1, 2)], "rrrrr"), "",
              "The whole `cxr-infer --ray` command: connecting, Ray Data's start, decoding tasks, the Scorer "
              "actor pool and the ordered writing. Both nodes are processes on this one machine, so two nodes "
              "share its CPUs: the second row shows the cost of spreading the work, not a second machine's gain.",
              ""]
    L += ["Reproduce:", "", "```", report["command"], "```", ""]
    return "\n".join(L)
