"""``cxr-bench node``: its arguments, run and summary (the measuring is :mod:`cxr_bench.nodebench`)."""
from __future__ import annotations

import argparse

from .base import Command, Report, Summary, add_threads, batch_list, complain, positive

EPILOG = """\
examples:
  cxr-bench node --images ../shared/data/chest_xray_224/test
      the shipped default model: 200 instances from 1 sender, then 1,000 from 4 senders
  cxr-bench node --images scans/ --model m.onnx --senders 1,2,4 --counts 100,100,100 --threads 2

needs cxr-node (pip install '.[bench,node]') and dcmtk (apt-get install dcmtk): storescu
processes send DX instances made from --images, storescp takes the SRs, all on 127.0.0.1.
writes node.json and node.md into --out.
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="images to send as DX instances (recursively)")
    p.add_argument("--model", metavar="FILE.onnx", help="cxr model file (default: the shipped default model)")
    p.add_argument("--senders", type=batch_list, default=[1, 4], metavar="K,K",
                   help="concurrent storescu processes of each case (default 1,4)")
    p.add_argument("--counts", type=batch_list, default=[200, 1000], metavar="N,N",
                   help="instances of each case (default 200,1000; the longest also gives the memory profile)")
    p.add_argument("--timeout", type=positive, default=1800, metavar="S", help="seconds a case may take (1800)")
    add_threads(p, "cxr-node's inference threads")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..nodebench import run_node_bench
    from ..util import BenchError

    if len(args.senders) != len(args.counts):
        raise BenchError("--senders and --counts need as many entries each (one case per pair)")
    rep = run_node_bench(args.images, args.model, args.counts, args.senders, args.threads, float(args.timeout),
                         args.out, args.name, args.quiet)
    return rep, complain([e for c in rep["cases"] for e in c["sender_errors"]])


def summary(report: Report) -> Summary:
    parts = [f"{c['senders']} sender(s): {c['instances_per_s']:.1f} instances/s, p50 {c['latency_p50_s']:.2f} s, "
             f"p95 {c['latency_p95_s']:.2f} s" for c in report["cases"]]
    peak = max(c["peak_rss_mib"] for c in report["cases"])
    line = "; ".join(parts) + f"; peak RSS {peak:.0f} MiB"
    return Summary(line, f"- cxr-node, `{report['model'].split('/')[-1]}`: {line}")


COMMAND = Command(
    name="node", kind="cxr-bench/node", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="cxr-node between dcmtk peers: instances/s, receipt-to-SR latency, memory",
    description="cxr-node between real DICOM peers (dcmtk storescu senders, storescp as the PACS): instances per "
                "second and receipt-to-SR latency (p50, p95) with 1 and several senders, and the node's memory.",
    example="cxr-bench node --images ../shared/data/chest_xray_224/test")
