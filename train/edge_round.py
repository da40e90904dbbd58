#!/usr/bin/env python3
"""The edge round on a CPU: train each candidate recipe of an edge backbone one epoch per call,
each call under the shared heavy-job lock, resumed from its ``last.pt``; then pick the winner by
the rule fixed in ``train/EDGE_ROUND.md`` (best validation AUC, ties to the fastest).

Run folders and logs live outside the repository (default ``/tmp/cxr-edge``). Each call of
``step`` trains one epoch of every unfinished candidate, so other jobs get the machine between
epochs; ``loop`` repeats it until every candidate is done (safe to stop and start again).

Examples:
    python3 train/edge_round.py loop                  # the whole round, resumable (hours on 2 cores)
    python3 train/edge_round.py step --only current   # one epoch of one candidate
    python3 train/edge_round.py select                # the table and the rule's pick
    python3 train/edge_round.py smoke                 # 96 images, 2 one-epoch calls each (a minute)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
LOCK = "/tmp/cxr-heavy.lock"
#: the candidates: backbone and the cxr-train options that differ from the finetune recipe's defaults
CANDIDATES: Dict[str, Dict] = {
    # the current recipe: finetune from random init (AdamW 2e-3, warm-up + cosine, label smoothing 0.1,
    # class-weighted loss, EMA 0.998, medium augmentation)
    "current": {"backbone": "mobilenet_v3_large", "args": []},
    # aimed at the site shift: stronger geometry and intensity augmentation (rotation 15, zoom
    # 0.85-1.25, shear 8, brightness 0.25, contrast 0.3, gamma 0.3, random erasing) and mixup 0.2
    "shift": {"backbone": "mobilenet_v3_large", "args": ["--augment", "strong", "--mixup", "0.2"]},
}
#: validation AUCs closer than this are a tie, which goes to the faster candidate
AUC_TIE = 0.001


def cxr_train(name: str, root: Path, data: str, epochs: int, extra: List[str]) -> int:
    """One call of ``cxr-train`` for candidate ``name`` under the lock: one epoch, resumed."""
    spec = CANDIDATES[name]
    cmd = ["flock", LOCK, sys.executable, "-m", "cxr_train.cli", "--backbone", spec["backbone"], "--data", data,
           "--out", str(root / name), "--epochs", str(epochs), "--epochs-per-run", "1", "--resume",
           "--no-progress", *spec["args"], *extra]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def epochs_done(root: Path, name: str) -> int:
    meta = root / name / "checkpoint.json"
    return len(json.loads(meta.read_text())["history"]) if meta.is_file() else 0


def step(root: Path, data: str, epochs: int, only: List[str], extra: List[str]) -> bool:
    """One epoch of every unfinished candidate; True when all are finished afterwards."""
    for name in only:
        done = epochs_done(root, name)
        if done >= epochs:
            continue
        print(f"edge_round: {name}: epoch {done + 1}/{epochs} (log {root / name}.log)", flush=True)
        rc = cxr_train(name, root, data, epochs, extra)
        if rc != 0:
            raise SystemExit(f"edge_round: error: {name}: cxr-train exited with {rc}; see {root / name}.log")
    return all(epochs_done(root, name) >= epochs for name in only)


def summary(root: Path, name: str, train_images: Optional[int] = None) -> Optional[Dict]:
    """A candidate's best epoch, its validation figures and its times (None before its first epoch)."""
    path = root / name / "checkpoint.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    history, best = meta["history"], meta["best_epoch"]
    record = history[best - 1]
    per_image = statistics.median(1.0 / h["images_per_s"] for h in history)
    images = train_images or meta["split_counts"]["train"][0] + meta["split_counts"]["train"][1]
    return {"candidate": name, "backbone": meta["backbone"], "epochs": len(history), "best_epoch": best,
            "val_auc": record["val_auc"], "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"],
            "seconds_to_best": sum(h["epoch_s"] for h in history[:best]),
            "epoch_minutes": per_image * images / 60.0, "device": meta.get("device")}


def pick(rows: List[Dict]) -> Optional[Dict]:
    """The rule: the highest validation AUC; within :data:`AUC_TIE` of it, the fewest seconds to the best epoch.

    Examples:
        >>> pick([{"val_auc": 0.990, "seconds_to_best": 900}, {"val_auc": 0.9995 - 0.0009, "seconds_to_best": 600},
        ...       {"val_auc": 0.9995, "seconds_to_best": 800}])["seconds_to_best"]
        600
    """
    if not rows:
        return None
    top = max(r["val_auc"] for r in rows)
    return min((r for r in rows if r["val_auc"] >= top - AUC_TIE), key=lambda r: r["seconds_to_best"])


def select(root: Path, names: List[str], train_images: Optional[int] = None) -> Optional[Dict]:
    rows = [r for r in (summary(root, n, train_images) for n in names) if r]
    print("| candidate | backbone | epochs | best epoch | val AUC | val loss | val acc | s to best | min/epoch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['candidate']} | {r['backbone']} | {r['epochs']} | {r['best_epoch']} | {r['val_auc']:.4f} "
              f"| {r['val_loss']:.4f} | {r['val_accuracy']:.4f} | {r['seconds_to_best']:.0f} "
              f"| {r['epoch_minutes']:.1f} |")
    chosen = pick(rows)
    print(f"\npick (best validation AUC, ties within {AUC_TIE} to the fastest): "
          + (f"{chosen['candidate']} -> {root / chosen['candidate']}" if chosen else "none yet"))
    return chosen


def write_report(root: Path, names: List[str], chosen: Optional[Dict], out: Path) -> None:
    """``out`` (.md) and its .json: every candidate's recipe, best epoch, each epoch's validation
    figures and time, the machine and the rule's pick, for the round's record."""
    from cxr_bench.machine import describe_machine

    machine = describe_machine()
    cpu = machine["cpu_model"]
    isa = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16") if machine["cpu_isa"].get(f)]
    runs = {n: json.loads((root / n / "checkpoint.json").read_text()) for n in names
            if (root / n / "checkpoint.json").is_file()}
    first = next(iter(runs.values()), {})
    val_images = sum(first.get("split_counts", {}).get("val", []))
    autocast = "bf16 autocast" if first.get("args", {}).get("amp") else "fp32"
    rows = [summary(root, n) for n in runs]
    record = {"rule": f"best validation AUC; within {AUC_TIE}, the fewest training seconds to the best epoch",
              "pick": chosen and chosen["candidate"], "cpu": cpu, "isa": isa, "candidates": rows,
              "options": {n: CANDIDATES[n]["args"] for n in runs},
              "history": {n: meta["history"] for n, meta in runs.items()}}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    md = ["# The edge round", "", f"Rule (fixed in train/EDGE_ROUND.md before the round): {record['rule']}. "
          f"Pick: **{record['pick']}**. Trained on {cpu} ({', '.join(isa) or 'no AVX-512 VNNI/bf16'}), "
          f"{machine['usable_cpus']} cores, {autocast}; validation: the shipped models' split by patient "
          f"({val_images} images), EMA weights, {first.get('eval_precision', 'fp32')}.", "",
          "| candidate | options | epochs | best epoch | val AUC | val loss | val acc | s to best | min/epoch |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['candidate']} | `{' '.join(record['options'][r['candidate']]) or '(the finetune recipe)'}` "
           f"| {r['epochs']} | {r['best_epoch']} | {r['val_auc']:.4f} | {r['val_loss']:.4f} | {r['val_accuracy']:.4f} "
           f"| {r['seconds_to_best']:.0f} | {r['epoch_minutes']:.1f} |" for r in rows]
    md += ["", "Each epoch (validation AUC / loss / accuracy at 0.5, seconds):", "",
           "| epoch | " + " | ".join(runs) + " |", "| ---: |" + " --- |" * len(runs)]
    for k in range(max((len(m["history"]) for m in runs.values()), default=0)):
        cells = [(lambda h: f"{h['val_auc']:.4f} / {h['val_loss']:.3f} / {h['val_accuracy']:.3f}, {h['epoch_s']:.0f}")
                 (m["history"][k]) if k < len(m["history"]) else "" for m in runs.values()]
        md.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    md += ["", f"Made by `python3 train/edge_round.py select --root {root} --report {out}`.", ""]
    out.write_text("\n".join(md))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge_round.py", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("Examples:\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["step", "loop", "select", "smoke"])
    p.add_argument("--root", default="/tmp/cxr-edge", help="run folders and logs (default /tmp/cxr-edge)")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/chest_xray_224/train"),
                   help="the training folder (default ../shared/data/chest_xray_224/train)")
    p.add_argument("--epochs", type=int, default=24, help="epochs of each candidate (default 24)")
    p.add_argument("--report", metavar="FILE.md", help="with select: also write the round's record (and FILE.json)")
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
                   help="candidates to run (default: all)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.root)
    if args.action == "smoke":  # 96 images, two one-epoch calls of each: resume, the lock and the rule
        root, extra = root / "smoke", ["--max-images", "96"]
        for _ in range(2):
            step(root, args.data, 2, args.only, extra)
        from cxr_train.data import make_split

        select(root, args.only, train_images=len(make_split(args.data, 0, 0.1)[0]))  # the full split's
        return 0
    if args.action == "step":
        step(root, args.data, args.epochs, args.only, [])
    elif args.action == "loop":
        while not step(root, args.data, args.epochs, args.only, []):
            pass
    chosen = select(root, args.only)
    if args.report:
        write_report(root, args.only, chosen, Path(args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
