"""``cxr-bench serve``: its arguments, run and summary (the measuring is :mod:`cxr_bench.serveload`)."""
from __future__ import annotations

import argparse

from .base import Command, Report, Summary, add_threads, batch_list, positive

EPILOG = """\
examples:
  cxr-bench serve --images ../shared/data/chest_xray_224/test --out benchmarks/results --name shipped
      the embedded default model: cxr-serve and an in-process Classifier at concurrency 1, 8
      and 32 (96 requests each), then cxr-infer --ray on the folder on one and on two local
      Ray nodes (needs pip install 'cxr[ray]'; --ray-cpus 0 skips it)
  cxr-bench serve --model m_int8.onnx --images scans/ --concurrency 1,4 --requests 40 --ray-cpus 0

writes serve.json and serve.md into --out. Needs pip install 'cxr[serve]' (and 'cxr[ray]' for the Ray part).
"""


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="FILE.onnx", help="cxr model file (default: the embedded default model)")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of images (searched recursively)")
    p.add_argument("--count", type=positive, default=64, metavar="N",
                   help="images the online part sends, spread over the folder (default 64)")
    p.add_argument("--concurrency", type=batch_list, default=[1, 8, 32], metavar="LIST",
                   help="client threads, comma-separated (default 1,8,32)")
    p.add_argument("--requests", type=positive, default=96, metavar="N",
                   help="requests per concurrency level (default 96)")
    add_threads(p, "inference threads of the server and of the in-process classifier")
    p.add_argument("--max-batch", type=positive, default=16, metavar="N", help="cxr-serve --max-batch (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="cxr-serve --max-wait-ms (default 5)")
    p.add_argument("--ray-cpus", type=int, default=2, metavar="C",
                   help="CPUs of each local Ray node for the cxr-infer --ray part, scoring the whole --images "
                        "folder (default 2; 0 skips it)")


def run(args: argparse.Namespace) -> tuple[Report, int]:
    from ..serveload import run_serve

    rep = run_serve(args.model, args.images, args.count, args.concurrency, args.requests, args.threads,
                    args.max_batch, args.max_wait_ms, args.ray_cpus or None, args.out, args.name, args.quiet)
    failed = sum(r["errors"] for part in ("in_process", "http") for r in rep[part].values())
    return rep, 1 if failed else 0


def summary(report: Report) -> Summary:
    parts = []
    for c in report["settings"]["concurrency"]:
        h, i = report["http"][str(c)], report["in_process"][str(c)]
        parts.append(f"c={c}: {h['throughput_per_s']:.1f}/s p99 {h['p99_ms']:.0f} ms "
                     f"(in process {i['throughput_per_s']:.1f}/s)")
    line = "cxr-serve " + "; ".join(parts)
    ray = report.get("ray")
    if ray:
        line += f"; cxr-infer --ray {ray['1_node']['images_per_s']:.1f}/s on 1 node, " \
                f"{ray['2_node']['images_per_s']:.1f}/s on 2"
    return Summary(line, f"- `{report['model']}`: {line}")


COMMAND = Command(
    name="serve", kind="cxr-bench/serve", arguments=arguments, run=run, summary=summary, epilog=EPILOG,
    help="cxr-serve under load at concurrency 1, 8, 32 vs in-process; cxr-infer --ray on 1 and 2 nodes",
    description="A bounded load on cxr-serve over loopback against an in-process Classifier on the same images "
                "(throughput, p50/p95/p99, batch sizes reached), and cxr-infer --ray batch scoring on one and on "
                "two local Ray nodes.",
    example="cxr-bench serve --images ../shared/data/chest_xray_224/test")
