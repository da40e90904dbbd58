"""Train VGG16, ResNet50 and InceptionV3 on a lent GPU machine and pack the results for $OUT.

Run from the repository root on the GPU machine (see train/gpu_run.sh):

    python3 train/gpu_run.py --data .data/train --out "$OUT"          # train + pack part 1
    python3 train/gpu_run.py --fetch 4 --out "$OUT"                   # next call: parts 4..

The machine's $OUT brings back at most 8 files of 16 MiB and 64 MiB per call, so all run
folders (fp16 weights, checkpoint.json, metrics) go into one tar cut into parts; the first
call returns the logs and the first parts (metadata and ResNet50 first), a second call the
rest. Here: ``cat cxr_runs.tar.part* | tar -x -C runs/gpu``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("runtime", "train", "export", "benchmarks"):
    sys.path.insert(0, str(ROOT / sub))

PACK_DIR = Path(os.environ.get("CXR_PACK_DIR", "/tmp/cxr_pack"))
PART_BYTES = 16_600_000          # < 16 MiB per returned file
CALL_BYTES = 4 * PART_BYTES      # < 64 MiB per call, logs included
WEIGHT_FILES = ("model_fp16.safetensors", "model.safetensors")

# Per backbone: training-time budget (s), batch size and peak LR for a random start.
# Measured on an H200: ResNet50 ~3,100 img/s, InceptionV3 ~2,100, VGG16 ~3,200 at
# batch 128 (bf16, channels_last); the first epoch pays ~5 s of autotuning. Budgets of
# 140 / 125 / 90 s gave 78 / 68 / 54 epochs and a 400 s run (406 s wall, plus ~45 s machine
# start); these add ~30 s. Keep the run under ~480 s so that it and a fetch call fit in the
# 15 minutes of device time a session is lent.
PLAN = {
    "resnet50": dict(time_budget=150, batch_size=128, lr=2e-3, augment="strong"),
    "inception_v3": dict(time_budget=135, batch_size=128, lr=2e-3, augment="strong"),
    "vgg16": dict(time_budget=110, batch_size=128, lr=2e-4, augment="medium"),
}


def find_cached_weights(log) -> dict:
    """Look through the torch hub and Hugging Face caches for ImageNet weights."""
    import torch

    found = {}
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    log(f"torch hub cache {hub}: " + (", ".join(sorted(p.name for p in hub.glob("*"))) if hub.is_dir() else "absent"))
    hf_roots = {Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub",
                Path.home() / ".cache" / "huggingface" / "hub"}
    for root in hf_roots:
        if not root.is_dir():
            log(f"hugging face cache {root}: absent")
            continue
        names = sorted(p.name for p in root.glob("models--*"))
        log(f"hugging face cache {root}: {len(names)} models: {', '.join(names[:50])}")
        for backbone, keys in (("resnet50", ("resnet50",)), ("inception_v3", ("inception_v3",)),
                               ("vgg16", ("vgg16",))):
            for n in names:
                if n.startswith("models--timm--") and any(n[len("models--timm--"):].startswith(k) for k in keys):
                    files = sorted((root / n).rglob("*.safetensors")) + sorted((root / n).rglob("*.bin"))
                    if files and backbone not in found:
                        found[backbone] = str(files[0])
    for extra in ("/root/.cache", "/models", "/data", "/opt/models"):
        p = Path(extra)
        if p.is_dir():
            hits = [str(q) for q in p.rglob("*") if q.suffix in (".pth", ".pt", ".safetensors")
                    and any(k in q.name.lower() for k in ("resnet", "vgg", "inception"))][:20]
            if hits:
                log(f"weight-like files under {extra}: {hits}")
    return found


def pack(runs: Path, out: Path) -> list:
    """Tar every run folder (no last.pt) and cut it into parts; return the part paths."""
    PACK_DIR.mkdir(parents=True, exist_ok=True)
    tar_path = PACK_DIR / "cxr_runs.tar"
    small, big = [], []
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        for f in sorted(run.iterdir()):
            if f.name in WEIGHT_FILES:
                big.append(f)
            elif f.suffix in (".json", ".jsonl", ".log", ".txt"):
                small.append(f)
    order = {"resnet50": 0, "inception_v3": 1, "vgg16": 2}
    big.sort(key=lambda f: order.get(f.parent.name, 9))
    with tarfile.open(tar_path, "w") as tar:
        for f in small + big:
            tar.add(f, arcname=f"{f.parent.name}/{f.name}")
    data = tar_path.read_bytes()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        p = PACK_DIR / f"cxr_runs.tar.part{i // PART_BYTES:02d}"
        p.write_bytes(data[i:i + PART_BYTES])
        parts.append(p)
    return parts


def copy_parts(first: int, out: Path, log) -> None:
    parts = sorted(PACK_DIR.glob("cxr_runs.tar.part*"))
    budget = CALL_BYTES
    sent = []
    for p in parts[first:]:
        if p.stat().st_size > budget:
            break
        shutil.copy(p, out / p.name)
        budget -= p.stat().st_size
        sent.append(p.name)
    rest = [p.name for p in parts if p.name not in sent and parts.index(p) >= first]
    log(f"returned {sent}; still on the machine: {rest or 'nothing'}"
        + (f" (next: python3 train/gpu_run.py --fetch {first + len(sent)} --out $OUT)" if rest else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/train")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_out"))
    ap.add_argument("--runs", default="/tmp/cxr_runs")
    ap.add_argument("--backbones", default="resnet50,inception_v3,vgg16")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every time budget (tiny test runs: 0.01)")
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mixup", type=float, default=0.0, help="cxr-train --mixup for every backbone (0 = off)")
    ap.add_argument("--cutmix", type=float, default=0.0, help="cxr-train --cutmix for every backbone (0 = off)")
    ap.add_argument("--fetch", type=int, help="only copy tar parts FETCH.. into --out (a later call)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "gpu_run.log", "a")

    def log(*a):
        msg = " ".join(str(x) for x in a)
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if args.fetch is not None:
        copy_parts(args.fetch, out, log)
        return 0
    import torch

    from cxr_train.loop import TrainConfig, train

    log(f"torch {torch.__version__}, cuda {torch.version.cuda}, device "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    cached = find_cached_weights(log)
    runs = Path(args.runs)
    summary = {}
    t_all = time.perf_counter()
    for b in args.backbones.split(","):
        plan = PLAN.get(b, dict(time_budget=60, batch_size=64, lr=2e-3, augment="medium"))
        weights = cached.get(b, "auto")
        cfg = TrainConfig(backbone=b, data=args.data, out=str(runs / b), weights=weights,
                          batch_size=plan["batch_size"], lr=plan["lr"], augment=plan["augment"], ema=0.995,
                          mixup=args.mixup, cutmix=args.cutmix,
                          time_budget=plan["time_budget"] * args.scale, epochs=200, device=args.device,
                          save_dtype="fp16", progress=False, save_last=False, max_images=args.max_images)
        t0 = time.perf_counter()
        try:
            if weights != "auto":
                cfg.lr = None  # the recipe's pretrained default
            meta = train(cfg, log=log)
            summary[b] = {k: meta[k] for k in ("weights_origin", "best_epoch", "threshold", "val_metrics",
                                               "images_per_s")}
            summary[b]["epochs_run"] = len(meta["history"])
        except Exception as exc:  # one backbone failing must not lose the others
            log(f"{b}: FAILED: {exc}")
            log(traceback.format_exc())
            summary[b] = {"error": str(exc)}
        summary[b]["wall_s"] = time.perf_counter() - t0
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log(f"all runs: {time.perf_counter() - t_all:.0f}s")
    keep = Path(os.environ.get("CXR_KEEP_DATA", "/tmp/cxr_train_data"))
    if not keep.exists():  # for train/gpu_verify.sh's exports on the same warm machine
        shutil.copytree(args.data, keep)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    parts = pack(runs, out)
    log(f"packed {len(parts)} parts of at most {PART_BYTES} bytes: "
        f"{sum(p.stat().st_size for p in parts) / 2**20:.1f} MiB")
    copy_parts(0, out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
