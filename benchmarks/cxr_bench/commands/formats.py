"""``cxr-bench formats``: its arguments, run and summary (the measuring is :mod:`cxr_bench.formats`)."""
from __future__ import annotations

import argparse
from collections import Counter

from ..util import fmt_pct
from .base import Command, Report, Summary, add_threads, complain, device_names, positive

EPILOG = """\
examples:
  cxr-bench formats --model export/resnet50.onnx export/resnet50_int8.onnx export/resnet50_fp16.onnx \\
      --data chest_xray/test
      CPU FP32 and INT8, CUDA FP32, FP16 and INT8, TensorRT FP16 and INT8 (GPU rows: onnxruntime-gpu)
  cxr-bench formats --model runtime/cxr_infer/models/default.onnx models/*_int8.onnx \\
      --data chest_xray/test --providers cpu --limit 50 --iterations 20 --out quick
      a quick look at the shipped files on this CPU

A row that cannot run says why in its status (skipped: no such provider here; failed: the
error); exit status 1 when a row failed, not when one was skipped. TensorRT engines are cached
in $CXR_TRT_CACHE (default ~/.cache/cxr/tensorrt); the first call's time includes the build.
writes formats.json and formats.md into --out, again after every row ("complete": false until
the last), so a run stopped from outside keeps what it measured.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx",
                   help="cxr model files: for each backbone its FP32, INT8 and FP16 files (the spec says which)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled folder, e.g. chest_xray/test")
    p.add_argument("--providers", default="cpu,cuda,tensorrt", metavar="P1,P2",
                   help=f"comma-separated devices, from {', '.join(device_names())} (default cpu,cuda,tensorrt)")
    p.add_argument("--rows", choices=("default", "all"), default="default",
                   help="default: CPU FP32/INT8, CUDA FP32/FP16/INT8, TensorRT FP16/INT8, OpenVINO FP32/INT8; "
                        "all: every file on every provider")
    p.add_argument("--domain-data", nargs="+", action="extend", default=[], metavar="DIR",
                   help="folders of unlabelled images (any depth) whose in-domain decisions are compared with "
                        "the CPU row's too, e.g. adult or lateral X-rays, full-size originals")
    p.add_argument("--limit", type=positive, metavar="N", help="only the first N images (by name) of each label")
    p.add_argument("--iterations", type=positive, default=50, metavar="N", help="timed calls at batch 1 (default 50)")
    p.add_argument("--throughput-batch", type=positive, default=64, metavar="N",
                   help="batch of the images/s column (default 64)")
    add_threads(p, "onnxruntime CPU threads")
    p.add_argument("--time-limit", type=positive, metavar="S",
                   help="start no row after S seconds (rows left say 'skipped: time limit')")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..formats import run_formats

    providers = [p for p in args.providers.replace(" ", "").split(",") if p]
    rep = run_formats(args.model, args.data, args.out, providers=providers, rows=args.rows, count=args.limit,
                      iterations=args.iterations, batch=args.throughput_batch, threads=args.threads,
                      name=args.name, quiet=args.quiet, domain_data=args.domain_data, time_limit=args.time_limit)
    return rep, complain([f"{r['backbone']} {r['precision']} on {r['provider']}: {r['status']}"
                          for r in rep["rows"] if r["status"].startswith("failed")])


def summary(report: Report) -> Summary:
    rows = report.get("rows", [])
    status = Counter(r["status"].split(":")[0] for r in rows)
    line = f"{len(rows)} row(s): " + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
    markdown = "\n".join(f"- {r['backbone']} {r['precision']} on {r['provider']}: "
                         + (f"accuracy {fmt_pct(r['accuracy'])}, {r['ms_b1']:.2f} ms at batch 1, "
                            f"{r['images_per_s_b64']:.0f} images/s at batch {report.get('throughput_batch')}"
                            if r["status"] == "ok" else r["status"]) for r in rows)
    return Summary(line, markdown)


COMMAND = Command(
    name="formats", kind="cxr-bench/formats", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="one table of every device x precision: status, size, accuracy, AUC, ms at batch 1, images/s",
    description="Run each model file on each device of the row plan and report status, file size, accuracy, AUC, "
                "confusion counts, ms at batch 1, images/s at batch 64 and agreement with CPU FP32, one row each; "
                "a row that cannot run says why.",
    example="cxr-bench formats --model m.onnx m_int8.onnx m_fp16.onnx --data chest_xray/test")
