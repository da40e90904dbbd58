"""``cxr-bench e2e``: what a user waits for, from a cold ``cxr-infer`` process to the answer:
cold processes timed from outside (and whether they import torch), and per image in process,
decode and preprocessing against inference (see docs/benchmarks.md).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .dataset import IMAGE_SUFFIXES
from .latency import child_env
from .machine import describe_machine, machine_markdown
from .util import BenchError, fmt_ms, mb, md_table, new_report, say, write_report

KIND = "cxr-bench/e2e"
STAGES = ("read_decode", "resize", "normalise", "inference")


def pick_images(source: str | Path | Sequence[str | Path], count: int) -> List[Path]:
    """``count`` images spread evenly over a folder (searched recursively, sorted) or a list."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise BenchError(f"--images {root}: no such folder or file (give a folder of full-size images, or one)")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [Path(p) for p in source]
    if not files:
        raise BenchError(f"--images {source}: no .jpeg/.png images found")
    idx = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    return [files[i] for i in idx]


def _timed(cmd: List[str], env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall_s": None, "returncode": None, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    res: Dict[str, Any] = {"wall_s": wall, "returncode": r.returncode}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["(no output)"])[-1]
        res["error"] = tail[:300]
    return res


def imports_torch(cmd: List[str], env: Dict[str, str], timeout: float) -> Optional[bool]:
    """Whether the command imports torch (``python -X importtime``); ``None`` if it failed."""
    try:
        r = subprocess.run([cmd[0], "-X", "importtime"] + cmd[1:], capture_output=True, text=True, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    names = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    if not names:
        return None
    return any(n == "torch" or n.startswith("torch.") for n in names)


def cold_runs(model: Path, images: List[Path], repeats: int, env: Dict[str, str], timeout: float,
              infer_args: Sequence[str] = (), quiet: bool = False) -> Dict[str, Any]:
    """Interleaved fresh-process timings of the interpreter alone, cxr-infer on 1 and on N images."""
    base = [sys.executable, "-m", "cxr_infer.cli", "--model", str(model), *infer_args]
    cmds = {"python_startup": [sys.executable, "-c", "pass"], "cxr_infer_1_image": base + [str(images[0])],
            f"cxr_infer_{len(images)}_images": base + [str(p) for p in images]}
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in cmds}
    for r in range(repeats):
        for k, cmd in cmds.items():
            res = _timed(cmd, env, timeout)
            runs[k].append(res)
            say(f"cold round {r + 1}/{repeats} {k}: "
                + (f"{res['wall_s']:.2f} s" if res.get("wall_s") is not None else "-")
                + (f" (failed: {res['error']})" if res.get("error") else ""), quiet)
    out: Dict[str, Any] = {"commands": {k: " ".join(v) for k, v in cmds.items()}, "runs": runs, "median_s": {}}
    for k, rs in runs.items():
        ok = [x["wall_s"] for x in rs if x.get("wall_s") is not None and not x.get("error")]
        out["median_s"][k] = float(np.median(ok)) if ok else None
        errs = [x["error"] for x in rs if x.get("error")]
        if errs:
            out.setdefault("errors", {})[k] = errs[0]
    one, many = out["median_s"]["cxr_infer_1_image"], out["median_s"][f"cxr_infer_{len(images)}_images"]
    if one is not None and many is not None and len(images) > 1:
        out["marginal_s_per_image"] = (many - one) / (len(images) - 1)
    out["imports_torch"] = imports_torch(base + [str(images[0])], env, timeout)
    return out


def per_image(model: Path, images: List[Path], threads: int, device: str = "cpu",
              quiet: bool = False) -> Dict[str, Any]:
    """In-process stage times for each image (after one warm-up image), and their medians."""
    from PIL import Image

    from cxr_infer.preprocess import load_image, open_image

    from .models import open_model

    m = open_model(model, device=device, threads=threads)
    spec = m.spec
    size, method = spec.image_size, spec.resize_method

    def stages(path: Path) -> Dict[str, Any]:
        # load_image(path) == load_image(open_image(path, draft_size=size)): the same calls, split in two.
        t0 = time.perf_counter()
        img = open_image(path, draft_size=size)
        t1 = time.perf_counter()
        px = load_image(img, size, method=method)
        t2 = time.perf_counter()
        x = m.model.graph_input(px[None])
        t3 = time.perf_counter()
        m.model.run_input(x, [spec.prob_output])
        t4 = time.perf_counter()
        with Image.open(path) as im:
            full = im.size
        return {"read_decode": (t1 - t0) * 1e3, "resize": (t2 - t1) * 1e3, "normalise": (t3 - t2) * 1e3,
                "inference": (t4 - t3) * 1e3, "width": full[0], "height": full[1], "decoded_width": img.size[0],
                "decoded_height": img.size[1], "mode": img.mode, "file_bytes": path.stat().st_size}

    stages(images[0])  # warm-up: the session's first run, Pillow's codec set-up
    rows = [{"file": str(p), **stages(p)} for p in images]
    med = {k: float(np.median([r[k] for r in rows])) for k in STAGES}
    med["decode_preprocess"] = med["read_decode"] + med["resize"] + med["normalise"]
    say(f"per image (median of {len(rows)}): decode+preprocess {med['decode_preprocess']:.1f} ms, "
        f"inference {med['inference']:.1f} ms", quiet)
    return {"model": str(model), "backbone": spec.backbone, "precision": spec.precision, "threads": threads,
            "load_s": m.model.load_s, "images": rows, "median_ms": med}


def run_e2e(model: str | Path, images: str | Path | Sequence[str | Path], count: int = 8, repeats: int = 3,
            threads: int = 1, device: str = "cpu", timeout: float = 300.0, infer_args: Optional[Sequence[str]] = None,
            cold: bool = True, out: Optional[str | Path] = None, name: Optional[str] = None,
            quiet: bool = False) -> Dict[str, Any]:
    """Cold ``cxr-infer`` processes plus the per-image stage split; write ``e2e[-NAME].json/.md``."""
    model = Path(model)
    if not model.is_file():
        raise BenchError(f"--model {model}: no such model file")
    files = pick_images(images, count)
    if infer_args is None:  # same threads and device as the in-process part; cxr-infer's own options
        infer_args = ["--threads", str(threads)] + (["--device", device] if device != "cpu" else [])
    env = child_env(threads)
    report: Dict[str, Any] = {
        **new_report(KIND), "machine": describe_machine(), "model": str(model),
        "model_bytes": model.stat().st_size, "settings": {"count": len(files), "repeats": repeats, "threads": threads,
                                                          "device": device, "infer_args": list(infer_args)},
        "per_image": per_image(model, files, threads, device, quiet),
        "cold": cold_runs(model, files, repeats, env, timeout, infer_args, quiet) if cold else None,
    }
    if out is not None:
        write_report(Path(out), "e2e", name, report, render_markdown, quiet)
    return report


def render_markdown(report: Dict[str, Any]) -> str:
    """The Markdown end-to-end report."""
    pi, cold, s = report["per_image"], report.get("cold"), report["settings"]
    med = pi["median_ms"]
    L = ["# cxr-bench end-to-end report", "",
         f"Model `{report['model']}` ({pi['backbone']} {pi['precision']}, {mb(report['model_bytes'])} MiB), "
         f"{s['count']} full-size image(s), {s['threads']} thread(s), device {s['device']}. "
         f"Created {report['created']}.", "", "## Machine", "", machine_markdown(report["machine"]), ""]
    if cold is not None:
        ms = cold["median_s"]
        rows = [[k.replace("_", " "), f"{v:.2f}" if v is not None else "failed", f"`{cold['commands'][k]}`"]
                for k, v in ms.items()]
        L += ["## Cold process (wall time, median of fresh processes)", "",
              md_table(["Run", "Seconds", "Command"], rows, "lrl"), ""]
        marg = cold.get("marginal_s_per_image")
        if marg is not None:
            L += ["Each further image in the same process (difference of the two medians): "
                  + (f"{1000 * marg:.1f} ms." if marg > 0 else "below the process-to-process noise."), ""]
        it = cold.get("imports_torch")
        L += [f"torch imported by cxr-infer: {'**yes**' if it else 'no' if it is False else 'unknown (run failed)'}"
              " (checked with `python -X importtime`).", ""]
        errors = cold.get("errors", {})
        L += [f"- {k} failed: `{e}`" for k, e in errors.items()] + ([""] if errors else [])
    total = med["decode_preprocess"] + med["inference"]
    stages = [[title, fmt_ms(med[k]), f"{100 * med[k] / total:.0f}%"] for title, k in (
        ("read + decode (open_image)", "read_decode"), ("RGB + bicubic resize", "resize"),
        ("normalise (to_input)", "normalise"), ("decode + preprocess", "decode_preprocess"),
        ("inference (batch 1)", "inference"))]
    stages[3:] = [[f"**{cell}**" for cell in row] for row in stages[3:]]  # the two totals
    L += [f"## Per image, in process (median of {len(pi['images'])} images, after one warm-up image)", "",
          md_table(["Stage", "ms", "Share"], stages, "lrr"), "",
          md_table(["Image", "Size px", "File KiB", "Decode+preprocess ms", "Inference ms"],
                   [[Path(r["file"]).name, f"{r['width']}x{r['height']} {r['mode']} "
                     f"(decoded {r['decoded_width']}x{r['decoded_height']})", f"{r['file_bytes'] / 1024:.0f}",
                     fmt_ms(r["read_decode"] + r["resize"] + r["normalise"]), fmt_ms(r["inference"])]
                    for r in pi["images"]], "lrrrr"), "",
          "Decode is `open_image(path, draft_size)` (JPEGs may be decoded at a reduced scale, never below twice "
          "the model input, as `load_image` does); resize is `load_image` on the decoded image. Reproduce:", "", "```",
          report["command"], "```", ""]
    return "\n".join(L)
