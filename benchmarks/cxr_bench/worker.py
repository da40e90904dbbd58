"""One latency measurement in a fresh process, started by :mod:`cxr_bench.latency`; the last stdout
line is ``CXR_BENCH_RESULT {json}``.

Examples:
    $ python -m cxr_bench.worker '{"engine": "onnx", "path": "m.onnx", "batch": 1, "threads": 1}'
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

MARKER = "CXR_BENCH_RESULT "


def _rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process, 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _onnx_runner(cfg: Dict[str, Any]) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    t0 = time.perf_counter()
    import numpy as np
    import onnxruntime as ort

    from cxr_infer.model import ModelFile

    info: Dict[str, Any] = {"import_s": time.perf_counter() - t0, "onnxruntime": ort.__version__,
                            "rss_before_load_bytes": _rss_bytes()}
    model = ModelFile(cfg["path"], device=cfg.get("device", "cpu"), threads=cfg["threads"])
    info.update(load_s=model.load_s, providers=model.providers)
    spec = model.spec
    width, height = spec.image_size
    pixels = np.random.default_rng(cfg.get("seed", 0)).integers(0, 256, (cfg["batch"], height, width, 3), np.uint8)
    x = model.graph_input(pixels)  # built once: the timed call is the model alone
    outs = [spec.prob_output]
    if cfg.get("domain_check"):
        if not spec.domain_output:
            raise RuntimeError(f"{cfg['path']}: no domain statistics, so no domain check to time")
        outs.append(spec.domain_output)  # what Classifier runs by default
    if cfg.get("heatmap"):
        if not spec.heatmap_output:
            raise RuntimeError(f"{cfg['path']}: no heatmap output to time")
        outs.append(spec.heatmap_output)  # what predict(..., heatmap=True) adds
    info["outputs"] = outs
    return (lambda: model.run_input(x, outs)), info


def _torch_runner(cfg: Dict[str, Any]) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from .upstream import load_checkpoint

    info: Dict[str, Any] = {"import_s": time.perf_counter() - t0, "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "rss_before_load_bytes": _rss_bytes()}
    device = "cuda" if cfg.get("device") == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this PyTorch has no CUDA device; use --device cpu")
    t1 = time.perf_counter()
    model, meta = load_checkpoint(cfg["path"], map_location=device)
    info["load_s"] = time.perf_counter() - t1
    size = int(meta.get("image_size", 224))
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    x = torch.randn((cfg["batch"], 3, size, size), generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> Any:
        with torch.inference_mode():
            y = model(x)
        sync()
        return y

    return run, info


def measure(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Load, warm up, then time single calls until ``iterations`` or ``max_seconds`` is reached."""
    runner = _torch_runner if cfg.get("engine") == "torch" else _onnx_runner
    run, info = runner(cfg)
    t0 = time.perf_counter()
    run()
    info["first_run_ms"] = (time.perf_counter() - t0) * 1000.0
    for _ in range(max(int(cfg.get("warmup", 3)) - 1, 0)):
        run()
    times: List[float] = []
    budget = float(cfg.get("max_seconds", 10.0))
    iterations, min_iterations = int(cfg.get("iterations", 20)), int(cfg.get("min_iterations", 3))
    cpu0 = _cpu_seconds()
    start = time.perf_counter()
    while len(times) < iterations:
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000.0)
        if len(times) >= min_iterations and time.perf_counter() - start > budget:
            break
    wall = time.perf_counter() - start
    # CPU seconds used per wall second while timing: about `threads` when the process had its cores,
    # well below when other work on the machine took them (then the timings are pessimistic).
    info.update(times_ms=times, peak_rss_bytes=_peak_rss_bytes(), pid=os.getpid(),
                cpu_per_wall=(_cpu_seconds() - cpu0) / wall if wall > 0 else None, load_average_end=_load())
    return info


def measure_paired(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Two files (``path_off``, ``path_on``) in this process, timed in ``blocks`` alternating blocks of
    ``warmup`` untimed and ``calls`` timed calls: both see the same machine state."""
    runs = {side: _onnx_runner({**cfg, "path": cfg["path_" + side], **cfg.get("flags_" + side, {})})[0]
            for side in ("off", "on")}
    times: Dict[str, List[float]] = {"off": [], "on": []}
    for block in range(int(cfg.get("blocks", 20))):
        for side in (("off", "on") if block % 2 == 0 else ("on", "off")):
            for _ in range(int(cfg.get("warmup", 5))):
                runs[side]()
            for _ in range(int(cfg.get("calls", 10))):
                t = time.perf_counter()
                runs[side]()
                times[side].append((time.perf_counter() - t) * 1000.0)
    return {"times_ms": times, "pid": os.getpid(), "load_average_end": _load()}


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    try:
        result = measure_paired(cfg) if cfg.get("mode") == "paired" else measure(cfg)
    except Exception as exc:  # reported to the parent as one line, not a traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(MARKER + json.dumps({"error": f"{exc.__class__.__name__}: {first}"}))
        return 1
    print(MARKER + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
