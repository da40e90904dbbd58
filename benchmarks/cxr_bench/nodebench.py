"""``cxr-bench node``: ``cxr-node`` between real peers, timed: instances per second, receipt-to-SR
latency (p50, p95) with 1 and with several concurrent senders, and the node's memory over a long run.

dcmtk's ``storescu`` processes play the modalities, dcmtk's ``storescp`` the PACS that takes the
SRs; the DX instances are made from the images by ``python -m cxr_hospital.dxfiles``. Everything
runs as separate processes on 127.0.0.1 (free ports), so this module imports neither pynetdicom
nor pydicom; it needs ``pip install '.[bench,node]'`` and dcmtk (``apt-get install dcmtk``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .latency import child_env
from .machine import describe_machine, machine_markdown
from .util import BenchError, md_table, new_report, say, stop_process, write_report

KIND = "cxr-bench/node"


def dcmtk(tool: str) -> str:
    """A dcmtk binary (never pynetdicom's command of the same name)."""
    for path in (f"/usr/bin/{tool}", shutil.which(tool)):
        if path and os.access(path, os.X_OK):
            r = subprocess.run([path, "--version"], capture_output=True, text=True)
            if "dcmtk" in (r.stdout + r.stderr).lower():
                return path
    raise BenchError(f"cxr-bench node needs dcmtk's {tool}: apt-get install dcmtk")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(threads: int) -> Dict[str, str]:
    env = child_env(threads)
    hospital = Path(__file__).resolve().parents[2] / "hospital"
    if (hospital / "cxr_hospital").is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(hospital), env.get("PYTHONPATH", "")])
    return env


def _rss_mib(pid: int, key: str = "VmRSS") -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"cxr-bench node: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def run_case(files: List[Path], senders: int, dest_port: int, model: Optional[str], threads: int, work: Path,
             timeout: float, quiet: bool) -> Dict[str, Any]:
    """One cxr-node run: ``senders`` storescu processes share ``files``; times, latency and memory."""
    state, log_path = work / f"state-{senders}-{len(files)}", work / f"node-{senders}-{len(files)}.log"
    port, env = _free_port(), _env(threads)
    cmd = [sys.executable, "-m", "cxr_hospital.node", "--listen", f"127.0.0.1:{port}", "--ae-title", "CXR",
           "--send-to", f"DEST@127.0.0.1:{dest_port}", "--state", str(state), "--threads", str(threads)]
    cmd += ["--model", model] if model else []
    log = open(log_path, "wb")
    node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    text = lambda: log_path.read_text(errors="replace")  # noqa: E731
    samples: List[Dict[str, float]] = []
    try:
        _wait_for(lambda: "listening on" in text() or node.poll() is not None, 120, "cxr-node start")
        if node.poll() is not None:
            raise BenchError(f"cxr-node exited at start: {text()[-500:]}")
        groups = [files[k::senders] for k in range(senders)]
        t0 = time.monotonic()
        procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"MOD{k}", "-aec", "CXR", "127.0.0.1", str(port),
                                   *map(str, g)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for k, g in enumerate(groups)]
        done = lambda: text().count(" stored\n")  # noqa: E731
        last = -1
        while done() < len(files):
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"cxr-bench node: {done()} of {len(files)} SRs stored after {timeout:.0f} s")
            n = done()
            samples.append({"t_s": time.monotonic() - t0, "stored": n, "rss_mib": _rss_mib(node.pid) or 0.0})
            if not quiet and n // 100 != last // 100:
                say(f"node, {senders} sender(s): {n}/{len(files)} SRs stored")
            last = n
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        failed = [p.communicate()[1].decode(errors="replace")[-300:] for p in procs if p.wait() != 0]
        peak = _rss_mib(node.pid, "VmHWM")
        status = json.loads(subprocess.run([sys.executable, "-m", "cxr_hospital.node", "--status", str(state),
                                            "--json"], capture_output=True, text=True, env=env).stdout)
    finally:
        stop_process(node)
        log.close()
    return {"senders": senders, "instances": len(files), "seconds": elapsed,
            "instances_per_s": len(files) / elapsed, "latency_p50_s": status["latency_p50_s"],
            "latency_p95_s": status["latency_p95_s"], "counts": status["counts"], "peak_rss_mib": peak,
            "rss_by_stored": _rss_profile(samples, len(files)), "sender_errors": failed}


def _rss_profile(samples: List[Dict[str, float]], total: int) -> List[Dict[str, float]]:
    """The node's resident memory when 10%, 20% ... 100% of the SRs were stored."""
    out = []
    for tenth in range(1, 11):
        goal = total * tenth / 10
        hit = next((s for s in samples if s["stored"] >= goal), samples[-1] if samples else None)
        if hit:
            out.append({"stored": int(goal), "rss_mib": hit["rss_mib"]})
    return out


def run_node_bench(images: str, model: Optional[str] = None, counts: Sequence[int] = (200, 1000),
                   senders: Sequence[int] = (1, 4), threads: int = 2, timeout: float = 1800.0,
                   out: Optional[str] = None, name: Optional[str] = None, quiet: bool = False) -> Dict[str, Any]:
    """Each ``(senders[i], counts[i])`` case against one storescp; write ``node[-NAME].json/.md``."""
    from cxr_infer.classifier import DEFAULT_MODEL

    model_file = Path(model) if model else DEFAULT_MODEL
    if not model_file.is_file():
        raise BenchError(f"--model {model_file}: no such model file")
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-node-"))
    dest_port = _free_port()
    dest = None
    try:
        dx = work / "dx"
        r = subprocess.run([sys.executable, "-m", "cxr_hospital.dxfiles", images, str(dx), "--count",
                            str(max(counts))], capture_output=True, text=True, env=_env(threads))
        if r.returncode != 0:
            raise BenchError(f"cannot make DX instances: {r.stderr.strip()[-300:]}")
        files = sorted(dx.glob("*.dcm"))
        (work / "srs").mkdir()
        dest = subprocess.Popen([dcmtk("storescp"), "-aet", "DEST", "-od", str(work / "srs"), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        cases = [run_case(files[:n], k, dest_port, model, threads, work, timeout, quiet)
                 for k, n in zip(senders, counts)]
    finally:
        if dest is not None:
            dest.terminate()
            dest.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    report: Dict[str, Any] = {
        **new_report(KIND), "machine": describe_machine(), "model": str(model_file),
        "model_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(), "images": images,
        "settings": {"threads": threads, "counts": list(counts), "senders": list(senders)}, "cases": cases}
    if out is not None:
        write_report(Path(out), "node", name, report, render_markdown, quiet)
    return report


def render_markdown(report: Dict[str, Any]) -> str:
    """The Markdown report."""
    s = report["settings"]
    rows = [[c["senders"], c["instances"], f"{c['instances_per_s']:.2f}", f"{c['latency_p50_s']:.2f}",
             f"{c['latency_p95_s']:.2f}", f"{c['peak_rss_mib']:.0f}"] for c in report["cases"]]
    L = ["# cxr-bench node report", "",
         f"`cxr-node` with model `{Path(report['model']).name}` (SHA-256 `{report['model_sha256'][:16]}...`), "
         f"{s['threads']} inference thread(s); DX instances made from `{report['images']}`; dcmtk `storescu` "
         f"senders, dcmtk `storescp` as the PACS, all on 127.0.0.1. Created {report['created']}.", "",
         "## Machine", "", machine_markdown(report["machine"]), "", "## Throughput and latency", "",
         md_table(["Senders", "Instances", "Instances/s", "Receipt to SR stored p50 s", "p95 s", "Peak RSS MiB"],
                  rows, "rrrrrr"), "",
         "Instances/s: instances over the time from the first sender's start to the last SR stored. Latency: "
         "from the instance's receipt (on disk and in the job table) to the destination's confirmation of its "
         "SR, from `cxr-node --status`; with several senders the queue grows, so latency grows with it.", ""]
    longest = max(report["cases"], key=lambda c: c["instances"])
    prof = longest["rss_by_stored"]
    L += [f"## Memory over {longest['instances']} instances", "",
          md_table(["SRs stored", "Node RSS MiB"], [[p["stored"], f"{p['rss_mib']:.0f}"] for p in prof], "rr"), ""]
    if prof:
        L += [f"From {prof[0]['rss_mib']:.0f} MiB at {prof[0]['stored']} SRs to {prof[-1]['rss_mib']:.0f} MiB at "
              f"{prof[-1]['stored']} (peak {longest['peak_rss_mib']:.0f} MiB).", ""]
    errors = [e for c in report["cases"] for e in c["sender_errors"]]
    L += [f"- a sender failed: `{e}`" for e in errors] + ([""] if errors else [])
    L += ["Reproduce:", "", "```", report["command"], "```", ""]
    return "\n".join(L)
