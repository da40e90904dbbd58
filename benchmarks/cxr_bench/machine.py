"""Describe the machine a benchmark ran on, from what it reports about itself (never assumed)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

#: Instruction-set flags that decide which onnxruntime / PyTorch kernels run (FP32, INT8, FP16).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def _processors() -> List[Dict[str, str]]:
    """The blocks of /proc/cpuinfo, one per logical CPU (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [{k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
            for block in text.split("\n\n") if block.strip()]


def _physical_cores() -> Optional[int]:
    return len({(p.get("physical id"), p["core id"]) for p in _processors() if "core id" in p}) or None


def _mem_total_bytes() -> Optional[int]:
    try:
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
        return int(line.split()[1]) * 1024
    except (OSError, ValueError, StopIteration):
        return None


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, None where the OS does not say."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def package_version(name: str) -> Optional[str]:
    """Installed version of ``name`` without importing it (``None`` when absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> List[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def describe_machine(torch_used: bool = False) -> Dict[str, Any]:
    """CPU model and flags, cores, memory, load, OS and the versions that matter for speed."""
    import onnxruntime as ort

    info = {k: v for block in reversed(_processors()) for k, v in block.items()}  # the first CPU's values first
    flags = info.get("flags", info.get("Features", "")).split()
    isa = {f: (f in flags) for f in ISA_FLAGS}
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    d: Dict[str, Any] = {
        "cpu_model": info.get("model name") or platform.processor() or "unknown", "cpu_mhz": info.get("cpu MHz"),
        "cpu_isa": isa,
        "cpu_isa_summary": " ".join(f for f in ISA_FLAGS if isa[f]) or "none of " + ", ".join(ISA_FLAGS[:3]),
        "cpu_flags": flags, "logical_cpus": os.cpu_count(), "physical_cores": _physical_cores(),
        "usable_cpus": affinity, "memory_bytes": _mem_total_bytes(), "load_average_1_5_15": load_average(),
        "os": platform.platform(), "python": sys.version.split()[0], "numpy": package_version("numpy"),
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(), "gpus": _gpus(),
    }
    if torch_used:
        d["torch"] = package_version("torch")
    return d


def machine_markdown(m: Dict[str, Any]) -> str:
    """The machine as a short Markdown bullet list."""
    isa = m["cpu_isa"]
    missing = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if not isa.get(f)]
    lines = [
        f"- CPU: {m['cpu_model']}; {m['logical_cpus']} logical CPUs ({m.get('physical_cores') or '?'} physical cores), "
        f"{m['usable_cpus']} usable by this process; memory {m['memory_bytes'] / 2**30:.1f} GiB"
        if m.get("memory_bytes") else f"- CPU: {m['cpu_model']}; {m['logical_cpus']} logical CPUs",
        f"- Vector ISA present: {m['cpu_isa_summary']}"
        + (f"; absent: {', '.join(missing)}" if missing else ""),
        "- Load average (1/5/15 min) at start: "
        + (" / ".join(f"{x:.2f}" for x in m["load_average_1_5_15"]) if m.get("load_average_1_5_15") else "n/a")
        + (f"; at end: {' / '.join(f'{x:.2f}' for x in m['load_average_end_1_5_15'])}"
           if m.get("load_average_end_1_5_15") else "")
        + (f" (more than the {m['usable_cpus']} usable CPUs: other work competed, timings are pessimistic)"
           if max((m.get("load_average_1_5_15") or [0])[0], (m.get("load_average_end_1_5_15") or [0])[0])
           > (m.get("usable_cpus") or 1) else ""),
        f"- OS: {m['os']}; Python {m['python']}; numpy {m['numpy']}",
        f"- onnxruntime {m['onnxruntime']} (providers: {', '.join(m['onnxruntime_providers'])})",
    ]
    if m.get("torch"):
        lines.append(f"- PyTorch {m['torch']}")
    if m.get("gpus"):
        lines.append(f"- GPU: {'; '.join(m['gpus'])}")
    return "\n".join(lines)
