"""``cxr-bench latency``: its arguments, run and summary (the measuring is :mod:`cxr_bench.latency`)."""
from __future__ import annotations

import argparse

from ..util import fmt_ms
from .base import Command, Report, Summary, add_threads, batch_list, complain, device_list, device_names, positive

EPILOG = """\
Configurations are interleaved and repeated --repeats times; process-to-process medians can move
by up to 30% on a shared machine, so use --repeats 3 or more for figures you publish.

examples:
  cxr-bench latency --model m_fp32.onnx m_int8.onnx --batch 1,8,32 --threads 2
  cxr-bench latency --model m_int8.onnx --checkpoint runs/resnet50 --batch 1 --threads 2 --repeats 5
      ONNX Runtime against PyTorch eager (fp32) on the same backbone (pip install 'cxr[bench,train]')
  cxr-bench latency --model m_fp16.onnx --device cuda --batch 1,32
      on the GPU (needs onnxruntime-gpu)
  cxr-bench latency --model m_int8.onnx --checkpoint runs/resnet50 --device cpu,openvino --batch 1
      the CPU provider against OpenVINO (pip install 'cxr[openvino]') and PyTorch, one run
  cxr-bench latency --model tiny.onnx --batch 1 --repeats 1 --iterations 5 --out lat
      a smoke test

writes latency.json and latency.md (machine, settings, results, speed-ups) into --out.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", action="extend", default=[], metavar="FILE.onnx", help="cxr model file(s)")
    p.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                   help="cxr-train run folder(s) for a PyTorch eager baseline (needs torch)")
    p.add_argument("--device", type=device_list, default=["cpu"], metavar="D,D,...",
                   help=f"where to run the model files: {', '.join(device_names())}, or several, e.g. cpu,openvino "
                        "(default cpu; each file on each, compared in one run; a device not available here is "
                        "reported, not measured)")
    p.add_argument("--batch", type=batch_list, default=[1, 8, 32], metavar="B,B,...",
                   help="batch sizes (default 1,8,32)")
    add_threads(p, "intra-op threads, fixed for every engine")
    p.add_argument("--repeats", type=positive, default=3, metavar="R",
                   help="fresh processes per configuration, interleaved (default 3)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="warm-up calls per process (default 3)")
    p.add_argument("--iterations", type=positive, default=20, metavar="N", help="timed calls per process (default 20)")
    p.add_argument("--max-seconds", type=float, default=10.0, metavar="S",
                   help="stop timing a process after S seconds, keeping at least 3 calls (default 10)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="kill a process after S seconds")
    p.add_argument("--heatmap", choices=("off", "on", "both"), default="off",
                   help="for models with a Grad-CAM graph: time a copy without it (off, default), the file as "
                        "it is fetching the map too (on), or both, to see what the graph costs")
    p.add_argument("--domain-check", choices=("off", "on", "both"), default="off",
                   help="for models with domain statistics: time a copy without the domain graph (off, default: "
                        "the probabilities alone, what PyTorch computes), the file as it is fetching domain_score "
                        "too (on: what Classifier runs), or both, to see what the check costs. 'Off' removes the "
                        "graph: onnxruntime runs every node of a file, whatever outputs are fetched")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..latency import run_latency

    rep = run_latency(args.model, args.checkpoint, batches=args.batch, threads=args.threads, device=args.device,
                      repeats=args.repeats, warmup=max(args.warmup, 1), iterations=args.iterations,
                      max_seconds=args.max_seconds, timeout=args.timeout, out=args.out, name=args.name,
                      quiet=args.quiet, domain_check=args.domain_check, heatmap=args.heatmap)
    results = rep["results"]
    complain([f"{r['name']} batch {r['batch']}: not measured: {r['error']}" for r in results if r.get("unavailable")])
    failed = [r for r in results if not r.get("unavailable") and (r.get("error") or r.get("processes_failed"))]
    return rep, complain([f"{r['name']} batch {r['batch']}: "
                          f"{r.get('error') or str(r['processes_failed']) + ' process(es) failed'}" for r in failed])


def _name(r: dict) -> str:
    return r.get("name") or f"{r.get('backbone', '?')} {r.get('precision', '?')} ({r.get('engine', '?')})"


def summary(report: Report) -> Summary:
    rows = [r for r in report.get("results", []) if r.get("median_ms")]
    first = min((r.get("batch", 1) for r in rows), default=None)
    each = [f"{_name(r)} {fmt_ms(r['median_ms'])} ms" for r in rows if r.get("batch", 1) == first]
    failed = sum(1 for r in report.get("results", []) if not r.get("median_ms"))
    line = (f"median at batch {first}: " + ", ".join(each) if each else "nothing measured") + (
        f"; {failed} configuration(s) not measured" if failed else "")
    markdown = "\n".join(f"- {_name(r)} batch {r.get('batch', 1)}: {fmt_ms(r['median_ms'])} ms median, "
                         f"{r.get('threads', '?')} thread(s) on {r.get('device', 'cpu')}" for r in rows)
    return Summary(line, markdown)


COMMAND = Command(
    name="latency", kind="cxr-bench/latency", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="per-call latency in fresh processes (ONNX Runtime, optional PyTorch eager baseline)",
    description="Median, p90 and p99 ms per call, images/s, load time, peak memory and file size, each "
                "configuration in its own fresh process.",
    example="cxr-bench latency --model m_int8.onnx --checkpoint runs/resnet50 --batch 1,8 --threads 2")
