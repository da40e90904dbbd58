#!/usr/bin/env python3
"""The base install on ARM64: classify test images in an emulated Debian arm64 root and compare
with x86.

Builds (once) a Debian arm64 root with ``debootstrap --foreign`` and ``qemu-user-static``,
installs this checkout's committed tree there with ``pip install .`` (onnxruntime, numpy and
Pillow as aarch64 wheels), classifies the same test images with every shipped model there and in
an x86 virtual environment holding the same package versions, and writes a Markdown + JSON report
of the agreement: equal labels, the largest probability, domain-score and heatmap differences.
Emulation says nothing about ARM speed, so no time is reported. Needs root, debootstrap,
qemu-user-static and binfmt-support; see ``docs/runtime.md`` (ARM64).

Examples:
    sudo python3 scripts/arm64_check.py --data ../shared/data/chest_xray_224/test
    sudo python3 scripts/arm64_check.py --data TEST --count 10 --work /tmp/cxr-arm64   # quicker
    sudo python3 scripts/arm64_check.py --only-changed   # only the files the report has no row for
    python3 scripts/arm64_check.py classify --model M.onnx --out r.json IMG...  # one side's run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
TOOLS = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}


def shipped_models(tree: Path) -> List[str]:
    """The shipped model files of a source tree, relative to it (its models/shipped.json lists them)."""
    return [m["path"] for m in json.loads((tree / "models" / "shipped.json").read_text())["models"]]


def say(*parts: object) -> None:
    print("arm64_check:", *parts, file=sys.stderr, flush=True)


def run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (output through), raising ``SystemExit`` with one line when it fails."""
    done = subprocess.run(list(cmd), **kw)
    if done.returncode != 0:
        raise SystemExit(f"arm64_check: error: {' '.join(cmd[:6])} ... exited with {done.returncode}")
    return done


# ---------------------------------------------------------------- one side's run (x86 or arm64)

def classify(models: Sequence[str], images: Sequence[str], out: str) -> None:
    """Classify ``images`` with each model through the runtime (heatmaps on); write JSON to ``out``."""
    import numpy
    import onnxruntime
    import PIL

    from cxr_infer import Classifier

    versions = {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "Pillow": PIL.__version__}
    result = {"machine": platform.machine(), "python": platform.python_version(), "versions": versions, "models": {}}
    for model in models:
        started = time.perf_counter()
        clf = Classifier(model, threads=2)
        rows = [{"path": Path(p.source).name, "label": p.label, "probability": float(p.probability),
                 "domain_score": None if p.domain_score is None else float(p.domain_score),
                 "heatmap": None if p.heatmap is None else [float(v) for v in p.heatmap.ravel()]}
                for p in clf.predict(list(images), heatmap=clf.heatmap_available)]
        result["models"][Path(model).name] = rows
        say(f"{platform.machine()}: {Path(model).name}: {len(rows)} images in {time.perf_counter() - started:.0f}s")
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------- the arm64 root

def check_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("arm64_check: error: needs root (debootstrap, chroot, mount)")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"arm64_check: error: missing tools; install them: apt-get install -y {' '.join(missing)}")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(binfmt)])
    if not (binfmt / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in (binfmt / "qemu-aarch64").read_text():
        raise SystemExit("arm64_check: error: binfmt qemu-aarch64 is registered but disabled")


def build_root(root: Path, stage1_only: bool = False) -> None:
    """A minimal Debian arm64 root with Python, built once (``root/.cxr-ready`` marks it done);
    ``stage1_only``: download and unpack only (native, light; the second stage runs emulated)."""
    if (root / ".cxr-ready").is_file():
        say(f"reusing the arm64 root {root}")
        return
    if not (root / ".cxr-stage1").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        say(f"debootstrap --foreign {SUITE} arm64 into {root} (first stage, native)")
        run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={PACKAGES}", SUITE,
             str(root), MIRROR])
        shutil.copy2(shutil.which("qemu-aarch64-static"), root / "usr/bin/qemu-aarch64-static")
        (root / ".cxr-stage1").write_text("downloaded and unpacked\n")
    if stage1_only:
        return
    say("second stage under qemu-aarch64 (several minutes)")
    run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"])
    (root / ".cxr-ready").write_text(f"{SUITE} arm64\n")


class Mounted:
    """/proc and /dev bound into the root while the block runs."""

    def __init__(self, root: Path):
        self.points = [root / "proc", root / "dev"]

    def __enter__(self) -> "Mounted":
        run(["mount", "-t", "proc", "proc", str(self.points[0])])
        run(["mount", "--bind", "/dev", str(self.points[1])])
        return self

    def __exit__(self, *exc) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], check=False)


def in_root(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "PIP_CERT": "/etc/ssl/certs/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180"}
    return run(["chroot", str(root), *cmd], env=env)


def source_tree(dest: Path, commit: str) -> None:
    """The committed tree of ``commit`` (no untracked or uncommitted files) in ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


# ---------------------------------------------------------------- comparison and report

def compare(x86: Dict, arm: Dict) -> List[Dict]:
    """One row per model: images, labels equal, the largest differences."""
    rows = []
    for name, ours in x86["models"].items():
        theirs = {r["path"]: r for r in arm["models"][name]}
        diffs = {"probability": 0.0, "domain_score": 0.0, "heatmap": 0.0}
        differing = []
        for a in ours:
            b = theirs[a["path"]]
            if a["label"] != b["label"]:
                differing.append(a["path"])
            diffs["probability"] = max(diffs["probability"], abs(a["probability"] - b["probability"]))
            if a["domain_score"] is not None:
                diffs["domain_score"] = max(diffs["domain_score"], abs(a["domain_score"] - b["domain_score"]))
            if a["heatmap"] is not None:
                diffs["heatmap"] = max(diffs["heatmap"], max(abs(u - v) for u, v in zip(a["heatmap"], b["heatmap"])))
        rows.append({"model": name, "images": len(ours), "labels_equal": len(ours) - len(differing),
                     "labels_differing": differing, "max_abs_diff": diffs})
    return rows


def kept_rows(previous: Optional[Dict], shas: Dict[str, str], data: str) -> Dict[str, Dict]:
    """The rows of an earlier report (by model path) measured on the same bytes and images."""
    if not previous or previous.get("data") != data:
        return {}
    by_name = {r["model"]: r for r in previous["rows"]}
    return {m: dict(by_name[Path(m).name], commit=by_name[Path(m).name].get("commit", previous["commit"]))
            for m, sha in shas.items()
            if previous["model_sha256"].get(m) == sha and Path(m).name in by_name}


def write_report(out: Path, rows: List[Dict], meta: Dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "arm64.json").write_text(json.dumps({"rows": rows, **meta}, indent=1) + "\n")
    lines = ["# The runtime on ARM64 (emulated)", "",
             f"The base install (`pip install .` of the commit in each row) in a Debian {SUITE} arm64 root "
             "built with `debootstrap --foreign`, run through `qemu-aarch64-static` user-mode emulation, "
             f"classified {meta['images']} test images ({meta['data']}) with every shipped model; an x86 "
             "virtual environment with the same package versions classified the same images. Probabilities "
             "are the positive label's; heatmaps are the runtime's maps scaled to 0..1.", "",
             "**Speed is not measured**: emulation runs ARM code tens of times slower than an ARM CPU would, "
             "so no time here says anything about ARM hardware.", "",
             "| model | images | labels equal | max abs diff probability | max abs diff domain score "
             "| max abs diff heatmap | commit |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        d = r["max_abs_diff"]
        lines.append(f"| {r['model']} | {r['images']} | {r['labels_equal']}/{r['images']} | {d['probability']:.2e} "
                     f"| {d['domain_score']:.2e} | {d['heatmap']:.2e} | `{r.get('commit', meta['commit'])[:12]}` |")
    lines += ["", "| | x86 | arm64 |", "| --- | --- | --- |"]
    for key in ("onnxruntime", "numpy", "Pillow"):
        lines.append(f"| {key} | {meta['x86']['versions'][key]} | {meta['arm64']['versions'][key]} |")
    lines.append(f"| Python | {meta['x86']['python']} | {meta['arm64']['python']} |")
    lines += ["", f"x86 host: {meta['host_cpu']}; emulator: {meta['qemu']}.", "",
              "Made by:", "", "```", meta["command"], "```", ""]
    (out / "arm64.md").write_text("\n".join(lines))


# ---------------------------------------------------------------- the whole check

def pick_images(data: Path, count: int) -> List[Path]:
    """The first ``count`` // 2 images of NORMAL/ and the rest from PNEUMONIA/, sorted by name."""
    picked: List[Path] = []
    for label, n in (("NORMAL", count // 2), ("PNEUMONIA", count - count // 2)):
        folder = data / label
        if not folder.is_dir():
            raise SystemExit(f"arm64_check: error: {folder}: no such folder (--data needs NORMAL/ and PNEUMONIA/)")
        picked += sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
    return picked


def venv_install(python: Sequence[str], venv: str, src: str, pins: Sequence[str], marker: Path, commit: str,
                 root: Optional[Path] = None) -> None:
    """A virtual environment at ``venv`` with ``pip install src`` (once per commit)."""
    if marker.is_file() and marker.read_text() == commit:
        say(f"reusing {venv} (commit {commit[:12]} installed)")
        return
    call = (lambda *c: in_root(root, *c)) if root else (lambda *c: run(c))
    call(*python, "-m", "venv", venv)
    call(f"{venv}/bin/pip", "install", "-q", src, *pins)
    marker.write_text(commit)


def check(args: argparse.Namespace) -> int:
    work, root = Path(args.work).resolve(), Path(args.work).resolve() / "root"
    check_tools()
    if args.download_only:
        build_root(root, stage1_only=True)
        return 0
    images = pick_images(Path(args.data), args.count)
    commit = run(["git", "-C", str(REPO), "rev-parse", args.commit], capture_output=True, text=True).stdout.strip()
    build_root(root)
    source_tree(root / "opt/cxr-src", commit)
    shutil.copy2(__file__, root / "opt/arm64_check.py")
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/host-ca.crt")
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    shutil.rmtree(root / "opt/images", ignore_errors=True)
    (root / "opt/images").mkdir()
    for p in images:
        shutil.copy2(p, root / "opt/images" / p.name)
    inside = [f"/opt/images/{p.name}" for p in images]
    data = f"{Path(args.data).name}/: the first {args.count // 2} NORMAL and {args.count - args.count // 2} " \
        "PNEUMONIA images by name"
    shas = {m: hashlib.sha256((root / "opt/cxr-src" / m).read_bytes()).hexdigest()
            for m in shipped_models(root / "opt/cxr-src")}
    report = Path(args.out) / "arm64.json"
    previous = json.loads(report.read_text()) if args.only_changed and report.is_file() else None
    kept = kept_rows(previous, shas, data)
    shipped = [m for m in shas if m not in kept]
    if not shipped:
        say(f"every shipped model's row in {report} was measured on these bytes: nothing to do")
        return 0
    models = [f"/opt/cxr-src/{m}" for m in shipped]
    with Mounted(root):
        say("pip install . in the arm64 root (aarch64 wheels; a few minutes under emulation)")
        venv_install(["python3"], "/opt/venv", "/opt/cxr-src", [], root / "opt/venv/.cxr-commit", commit, root)
        in_root(root, "/opt/venv/bin/cxr-infer", "--version")
        in_root(root, "/opt/venv/bin/python", "/opt/arm64_check.py", "classify", "--out", "/opt/arm64.json",
                *sum((["--model", m] for m in models), []), *inside)
    arm = json.loads((root / "opt/arm64.json").read_text())
    pins = [f"{k}=={v}" for k, v in arm["versions"].items()]
    x86_src = work / "x86-src"
    source_tree(x86_src, commit)
    venv_install([sys.executable], str(work / "x86-venv"), str(x86_src), pins, work / "x86-venv/.cxr-commit", commit)
    run([str(work / "x86-venv/bin/python"), __file__, "classify", "--out", str(work / "x86.json"),
         *sum((["--model", str(x86_src / m)] for m in shipped), []), *[str(p) for p in images]])
    x86 = json.loads((work / "x86.json").read_text())
    rows = [dict(row, commit=commit) for row in compare(x86, arm)]
    if kept and previous:
        if any(previous[side]["versions"] != now["versions"] for side, now in (("x86", x86), ("arm64", arm))):
            raise SystemExit("arm64_check: error: the package versions differ from the kept rows' "
                             "(run it without --only-changed)")
        new = {r["model"]: r for r in rows}
        rows = [kept[m] if m in kept else new[Path(m).name] for m in shas]
    qemu = run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    from cxr_bench.machine import describe_machine

    cpu = describe_machine()["cpu_model"]
    meta = {"commit": commit, "images": len(images), "data": data, "model_sha256": shas,
            "x86": {k: x86[k] for k in ("machine", "python", "versions")},
            "arm64": {k: arm[k] for k in ("machine", "python", "versions")}, "host_cpu": cpu, "qemu": qemu,
            "speed": "not measured: user-mode emulation", "command": "python3 scripts/arm64_check.py "
            + " ".join(a for a in sys.argv[1:])}
    write_report(Path(args.out), rows, meta)
    for r in rows:
        say(f"{r['model']}: labels equal {r['labels_equal']}/{r['images']}, "
            f"max |dp| {r['max_abs_diff']['probability']:.2e}")
    return 0 if all(r["labels_equal"] == r["images"] for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arm64_check.py", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("Examples:\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/chest_xray_224/test"),
                   help="test folder with NORMAL/ and PNEUMONIA/ (default: ../shared/data/chest_xray_224/test)")
    p.add_argument("--count", type=int, default=50, help="images, half from each class (default 50)")
    p.add_argument("--work", default="/tmp/cxr-arm64", help="the arm64 root and the x86 venv (default /tmp/cxr-arm64)")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"), help="folder for arm64.md and arm64.json")
    p.add_argument("--commit", default="HEAD", help="the committed tree to install (default HEAD)")
    p.add_argument("--only-changed", action="store_true",
                   help="keep the rows of --out's arm64.json measured on the same bytes and images (same package "
                        "versions); classify only the other shipped models")
    p.add_argument("--download-only", action="store_true",
                   help="only debootstrap's first stage (download and unpack, native and light): the rest"
                        " can then run under a lock for CPU-heavy jobs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["classify"]:
        p = argparse.ArgumentParser(prog="arm64_check.py classify")
        p.add_argument("--model", action="append", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("images", nargs="+")
        a = p.parse_args(argv[1:])
        classify(a.model, a.images, a.out)
        return 0
    return check(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
