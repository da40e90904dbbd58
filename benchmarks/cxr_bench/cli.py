"""``cxr-bench``: accuracy, latency and end-to-end reports for cxr model files.

Run ``cxr-bench --help`` or ``cxr-bench COMMAND --help`` for examples. Heavy imports
(onnxruntime, matplotlib, torch) happen inside the commands, so ``--help`` is instant.

Example:
    $ cxr-bench accuracy --model runs/export/resnet50_int8.onnx --data ../shared/data/chest_xray_224/test
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__

DEFAULT_OUT = "benchmarks/results"
TEST_SPLIT = "../shared/data/chest_xray_224/test"
FULLRES = "../shared/data/kermany_fullres/train"

MAIN_EPILOG = f"""\
commands:
  accuracy   metrics with 95% bootstrap intervals, ROC and calibration plots, per-image CSV
  latency    per-call latency in fresh processes (ONNX Runtime, optional PyTorch eager baseline)
  graphcost  what the domain check or Grad-CAM graph adds to a file, paired in one process
  e2e        a cold cxr-infer process on full-size images; decode+preprocess vs inference
  summary    merge the accuracy and latency reports of a folder into summary.json / summary.md
  domain     out-of-domain check: flag rate on the test split and on photos, documents, noise,
             inverted / rotated / cropped X-rays, with AUROCs
  heatmaps   Grad-CAM overlay grids and INT8 map agreement
  formats    one table of every provider x precision (CPU, CUDA, TensorRT, OpenVINO): status,
             size, accuracy, AUC, ms at batch 1, images/s at batch 64

examples:
  cxr-bench accuracy --model runs/export/resnet50_fp32.onnx runs/export/resnet50_int8.onnx \\
      --data {TEST_SPLIT} --out /tmp/bench
  cxr-bench latency --model runs/export/resnet50_int8.onnx --checkpoint runs/gpu2/resnet50 \\
      --batch 1,8 --threads 2 --repeats 3 --out /tmp/bench
  cxr-bench e2e --model runs/export/resnet50_int8.onnx --images {FULLRES} --out /tmp/bench
  cxr-bench summary --results /tmp/bench

Every command writes NAME.json (all figures) and NAME.md (for people) into --out
(default {DEFAULT_OUT}); progress goes to stderr. Exit status: 0 done, 1 some
measurement failed (see the report), 2 usage, model or data error.
"""

ACCURACY_EPILOG = f"""\
--data holds one sub-folder per label, named like the model's labels:
  DIR/NORMAL/*.jpeg  DIR/PNEUMONIA/*.jpeg

examples:
  cxr-bench accuracy --model m_fp32.onnx m_int8.onnx --data {TEST_SPLIT}
      both models on the 624-image test split; each image decoded once, shared by both
  cxr-bench accuracy --model m.onnx --data {TEST_SPLIT} --limit 20 --bootstrap 200 --out /tmp/quick
      a quick look: the first 20 images per label
  cxr-bench accuracy --model runs/export/*.onnx --data {TEST_SPLIT} --name test --summary
      accuracy-test.json/.md, roc-test.png, ... then refresh summary.json in --out

writes (in --out; -NAME appended with --name): accuracy.json, accuracy.md, predictions.csv,
roc.png, calibration.png (plots need matplotlib: pip install '.[bench]').
Metrics are given at the model's own threshold (from its spec) and at 0.5.
"""

LATENCY_EPILOG = """\
Each configuration (model x batch) runs in its own fresh Python process; configurations are
interleaved and the whole set repeated --repeats times (process-to-process medians can move by
up to 30% on a shared machine, so use --repeats 3 or more for figures you publish).

examples:
  cxr-bench latency --model m_fp32.onnx m_int8.onnx --batch 1,8,32 --threads 2
  cxr-bench latency --model m_int8.onnx --checkpoint runs/gpu2/resnet50 --batch 1 --threads 2 --repeats 5
      ONNX Runtime against PyTorch eager (fp32) on the same backbone (needs torch)
  cxr-bench latency --model m_fp16.onnx --device cuda --batch 1,32
      on the GPU (needs onnxruntime-gpu)
  cxr-bench latency --model m_int8.onnx --checkpoint runs/gpu2/resnet50 --device cpu,openvino --batch 1
      the CPU provider against OpenVINO (pip install 'cxr[openvino]', Intel CPUs) and PyTorch, one run
  cxr-bench latency --model tiny.onnx --batch 1 --repeats 1 --iterations 5 --out /tmp/lat
      a smoke test

writes latency.json and latency.md (machine, settings, results, speed-ups) into --out.
"""

E2E_EPILOG = f"""\
examples:
  cxr-bench e2e --model m_int8.onnx --images {FULLRES}
      8 full-size JPEGs: cold `python -m cxr_infer.cli` processes (1 image and 8 images) and
      per-image decode / resize / normalise / inference times
  cxr-bench e2e --model m_int8.onnx --images scans/ --count 16 --repeats 5 --threads 2

writes e2e.json and e2e.md into --out.
"""

FORMATS_EPILOG = f"""\
examples:
  cxr-bench formats --model runs/export/resnet50.onnx runs/export/resnet50_int8.onnx \\
      runs/export/resnet50_fp16.onnx --data {TEST_SPLIT}
      CPU FP32 and INT8, CUDA FP32, FP16 and INT8, TensorRT FP16 and INT8 (GPU rows: onnxruntime-gpu)
  cxr-bench formats --model runtime/cxr_infer/models/default.onnx models/*_int8.onnx \\
      --data {TEST_SPLIT} --providers cpu --limit 50 --iterations 20 --out /tmp/b
      a quick look at the shipped files on this CPU

A row that cannot run says why in its status (skipped: no such provider here; failed: the
error). TensorRT engines are cached in $CXR_TRT_CACHE (default ~/.cache/cxr/tensorrt); the first
call's time includes the build. writes formats.json and formats.md into --out, again after
every row ("complete": false until the last), so a run stopped from outside keeps what it
measured; --time-limit S starts no row after S seconds. Exit status 1 when a row failed (a
skipped row is not a failure).
"""

DOMAIN_EPILOG = f"""\
examples:
  cxr-bench domain --model runtime/cxr_infer/models/default.onnx models/*_int8.onnx --data {TEST_SPLIT}
      flag rates and AUROCs of each model's out-of-domain check (models need domain statistics:
      cxr-export adds them, or python -m cxr_export.domain RUN_DIR MODEL.onnx --data TRAIN_DIR)
  cxr-bench domain --model m.onnx --data {TEST_SPLIT} --count 30 --kinds photos,noise --out /tmp/b
      a quick look
  cxr-bench domain --model m.onnx --data {TEST_SPLIT} --foreign ../shared/data/foreign_cxr \
      --originals ../shared/data/kermany_fullres
      also real adult, lateral and CT images (evaluation only), and the in-domain control: full-size
      Kermany originals read the way the runtime reads a user's file
  cxr-bench domain --model m.onnx --data {TEST_SPLIT} --validation ../shared/data/chest_xray_224/train
      also the operating points: flag rates at stricter and looser thresholds, each set to flag 1 to
      30% of the model's validation images (for cxr-infer --domain-threshold S)

kinds: photos (scikit-image / matplotlib sample photographs; pip install scikit-image),
documents (text rendered with Pillow), noise, inverted, upside_down, rotated_90, cropped
(the last four from test-split X-rays). writes domain.json and domain.md into --out.
"""

GRAPHCOST_EPILOG = """\
examples:
  cxr-bench graphcost --model runtime/cxr_infer/models/default.onnx models/resnet50_int8.onnx --threads 2
      what the out-of-domain check adds to each classifier at batch 1 (3 processes x 20 blocks)
  cxr-bench graphcost --model models/resnet50_int8.onnx --graph heatmap --processes 5
      the Grad-CAM graph instead

Writes graphcost.json and graphcost.md into --out. Every node of a file runs on every call, whatever
outputs are fetched, so this is what every prediction pays.
"""

HEATMAPS_EPILOG = f"""\
example:
  cxr-bench heatmaps --model runtime/cxr_infer/models/default.onnx --data {TEST_SPLIT} --per-kind 4

Writes heatmaps.json, heatmaps.md and one grid JPEG per model into --out: rows of true positives,
false positives, false negatives and true negatives, the first of each by file name (never picked
by eye). The map is model attention, not a localisation.
"""

SUMMARY_EPILOG = f"""\
Reads every accuracy*.json and latency*.json in --results and writes summary.json (a list of
rows: backbone, precision, accuracy, auc, loss, precision_score, recall, f1, tp, fp, tn, fn,
latency_ms_b1, torch_latency_ms_b1) and summary.md. The newest report wins for a model.

examples:
  cxr-bench summary
      {DEFAULT_OUT}/*.json -> {DEFAULT_OUT}/summary.json and summary.md
  cxr-bench summary --results /tmp/bench --threads 2
"""


def _device_list(text: str) -> List[str]:
    vals = [x for x in text.replace(" ", "").split(",") if x]
    bad = [v for v in vals if v not in ("cpu", "cuda", "openvino")]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda, openvino or several, e.g. cpu,openvino")
    return list(dict.fromkeys(vals))


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers, e.g. 1,8,32") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be at least 1, e.g. 1,8,32")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return v


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="cxr-bench", formatter_class=fmt, epilog=MAIN_EPILOG,
                                description="Accuracy and latency reports for cxr model files (.onnx with a cxr.spec).")
    p.add_argument("--version", action="version", version=f"cxr-bench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, summary: bool = True) -> None:
        sp.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT})")
        sp.add_argument("--name", metavar="NAME", help="append -NAME to the report file names (keeps several runs apart)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
        if summary:
            sp.add_argument("--summary", action="store_true", help="then refresh summary.json/summary.md in --out")

    a = sub.add_parser("accuracy", formatter_class=fmt, epilog=ACCURACY_EPILOG,
                       help="metrics, intervals and plots on a labelled folder",
                       description="Accuracy, loss, precision, recall, specificity, F1, ROC AUC and TP/FP/TN/FN "
                                   "with 95% bootstrap intervals, for one or more model files.")
    a.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    a.add_argument("--data", required=True, metavar="DIR", help=f"labelled image folder, e.g. {TEST_SPLIT}")
    a.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap rounds (default 1000; 0: none)")
    a.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    a.add_argument("--batch", type=_positive, default=32, metavar="N", help="inference batch size (default 32)")
    a.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N",
                   help="onnxruntime threads (default: the CPUs this process may use)")
    a.add_argument("--device", choices=("cpu", "cuda", "openvino"), default="cpu",
                   help="execution provider (default cpu; openvino: pip install 'cxr[openvino]', Intel CPUs)")
    a.add_argument("--limit", type=_positive, metavar="N", help="only the first N images (by name) of each label")
    a.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    common(a)

    lt = sub.add_parser("latency", formatter_class=fmt, epilog=LATENCY_EPILOG,
                        help="latency in fresh processes, optional PyTorch eager baseline",
                        description="Median, p90 and p99 ms per call, images/s, load time, peak memory and file "
                                    "size, each configuration in its own fresh process.")
    lt.add_argument("--model", nargs="+", action="extend", default=[], metavar="FILE.onnx", help="cxr model file(s)")
    lt.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                    help="cxr-train run folder(s) for a PyTorch eager baseline (needs torch)")
    lt.add_argument("--device", type=_device_list, default=["cpu"], metavar="D,D,...",
                    help="where to run the model files: cpu (default), cuda, openvino, or several, e.g. cpu,openvino "
                         "(each file on each, compared in one run; a device not available here is reported, "
                         "not measured)")
    lt.add_argument("--batch", type=_int_list, default=[1, 8, 32], metavar="B,B,...",
                    help="batch sizes (default 1,8,32)")
    lt.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N",
                    help="intra-op threads, fixed for every engine (default: the CPUs this process may use)")
    lt.add_argument("--repeats", type=_positive, default=3, metavar="R",
                    help="fresh processes per configuration, interleaved (default 3)")
    lt.add_argument("--warmup", type=int, default=3, metavar="N", help="warm-up calls per process (default 3)")
    lt.add_argument("--iterations", type=_positive, default=20, metavar="N", help="timed calls per process (default 20)")
    lt.add_argument("--max-seconds", type=float, default=10.0, metavar="S",
                    help="stop timing a process after S seconds, keeping at least 3 calls (default 10)")
    lt.add_argument("--timeout", type=float, default=600.0, metavar="S", help="kill a process after S seconds")
    lt.add_argument("--heatmap", choices=("off", "on", "both"), default="off",
                    help="for models with a Grad-CAM graph: time a copy without it (off, default), the file as "
                         "it is fetching the map too (on), or both, to see what the graph costs")
    lt.add_argument("--domain-check", choices=("off", "on", "both"), default="off",
                    help="for models with domain statistics: time a copy without the domain graph (off, default: "
                         "the probabilities alone, what PyTorch computes), the file as it is fetching domain_score "
                         "too (on: what Classifier runs), or both, to see what the check costs. 'Off' removes the "
                         "graph: onnxruntime runs every node of a file, whatever outputs are fetched")
    common(lt)

    e = sub.add_parser("e2e", formatter_class=fmt, epilog=E2E_EPILOG,
                       help="cold cxr-infer process and per-image stage times on full-size images",
                       description="End to end: a cold cxr-infer process on full-size images, and decode + "
                                   "preprocess against inference time per image.")
    e.add_argument("--model", required=True, metavar="FILE.onnx", help="cxr model file")
    e.add_argument("--images", default=FULLRES, metavar="DIR", help=f"full-size images (default {FULLRES})")
    e.add_argument("--count", type=_positive, default=8, metavar="N", help="images used (default 8)")
    e.add_argument("--repeats", type=_positive, default=3, metavar="R", help="cold processes per case (default 3)")
    e.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N", help="inference threads")
    e.add_argument("--device", choices=("cpu", "cuda", "openvino"), default="cpu")
    e.add_argument("--infer-arg", action="append", metavar="ARG",
                   help="argument passed to cxr-infer instead of the default '--threads N' (repeatable)")
    e.add_argument("--no-cold", action="store_true", help="skip the cold-process part")
    common(e, summary=False)

    d = sub.add_parser("domain", formatter_class=fmt, epilog=DOMAIN_EPILOG,
                       help="out-of-domain check: flag rates and AUROCs",
                       description="Flag rate of each model's out-of-domain check on a labelled folder (in-domain) "
                                   "and on out-of-domain kinds built here, with the AUROC between them.")
    d.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    d.add_argument("--data", required=True, metavar="DIR", help=f"in-domain labelled folder, e.g. {TEST_SPLIT}")
    d.add_argument("--count", type=_positive, default=150, metavar="N", help="images per out-of-domain kind (default 150)")
    d.add_argument("--kinds", default=None, metavar="K,K,...", help="comma-separated kinds (default: all)")
    d.add_argument("--foreign", metavar="DIR",
                   help="real out-of-domain images, each sub-folder a kind (e.g. ../shared/data/foreign_cxr; "
                        "files.csv with a finding column adds the classifier's AUC on them); evaluation only")
    d.add_argument("--originals", metavar="DIR",
                   help="in-domain images at their original size, read the way the runtime reads a user's file "
                        "(e.g. ../shared/data/kermany_fullres): a check that reacts to the offline-resized test "
                        "split's pipeline instead of the image flags them")
    d.add_argument("--validation", metavar="TRAIN_DIR",
                   help="the models' training folder (e.g. ../shared/data/chest_xray_224/train): its validation "
                        "part, rebuilt and checked against each file's split hash, sets the thresholds of the "
                        "operating-point table (flag rates at stricter or looser checks) for files that carry no "
                        "operating points of their own")
    d.add_argument("--batch", type=_positive, default=16, metavar="N", help="inference batch size (default 16)")
    d.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N", help="onnxruntime threads")
    common(d, summary=False)

    gc = sub.add_parser("graphcost", formatter_class=fmt, epilog=GRAPHCOST_EPILOG,
                        help="what the domain check or Grad-CAM graph costs, paired in one process",
                        description="Each model file against a copy without its out-of-domain (or Grad-CAM) graph, "
                                    "timed in alternating blocks inside one process, several processes per file: "
                                    "a few per cent is measurable, which separate processes (latency "
                                    "--domain-check both) blur.")
    gc.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    gc.add_argument("--graph", choices=("domain", "heatmap"), default="domain",
                    help="the added graph to measure (default domain); the other is removed from both copies")
    gc.add_argument("--batch", type=_positive, default=1, metavar="N", help="batch size (default 1)")
    gc.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N", help="onnxruntime threads")
    gc.add_argument("--device", default="cpu", help="cpu (default), openvino or cuda")
    gc.add_argument("--processes", type=_positive, default=3, metavar="P", help="worker processes per file (default 3)")
    gc.add_argument("--blocks", type=_positive, default=20, metavar="B", help="alternating blocks per process (default 20)")
    gc.add_argument("--warmup", type=_positive, default=5, metavar="W",
                    help="untimed calls after each switch (default 5)")
    gc.add_argument("--calls", type=_positive, default=10, metavar="C", help="timed calls per block (default 10)")
    common(gc, summary=False)

    h = sub.add_parser("heatmaps", formatter_class=fmt, epilog=HEATMAPS_EPILOG,
                       help="Grad-CAM overlay grids (TP/FP/FN/TN by a fixed rule) and INT8 map agreement",
                       description="Grad-CAM overlays of a labelled folder: for each kind at the model's threshold, "
                                   "the first images by file name; and the INT8 maps' rank correlation with the "
                                   "same graph's FP32 activations.")
    h.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx", help="cxr model file(s)")
    h.add_argument("--data", required=True, metavar="DIR", help=f"labelled folder, e.g. {TEST_SPLIT}")
    h.add_argument("--per-kind", type=_positive, default=4, metavar="N", help="images of each kind (default 4)")
    h.add_argument("--batch", type=_positive, default=16, metavar="N", help="inference batch size (default 16)")
    h.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N", help="onnxruntime threads")
    common(h, summary=False)

    fo = sub.add_parser("formats", formatter_class=fmt, epilog=FORMATS_EPILOG,
                        help="every provider x precision in one table (status, size, accuracy, AUC, speed)",
                        description="Run each model file on each execution provider of the row plan and report "
                                    "status, file size, accuracy, AUC, confusion counts, ms at batch 1, images/s at "
                                    "batch 64 and agreement with CPU FP32, one row each; a row that cannot run says "
                                    "why.")
    fo.add_argument("--model", nargs="+", action="extend", required=True, metavar="FILE.onnx",
                    help="cxr model files: for each backbone its FP32, INT8 and FP16 files (the spec says which)")
    fo.add_argument("--data", required=True, metavar="DIR", help=f"labelled folder, e.g. {TEST_SPLIT}")
    fo.add_argument("--providers", default="cpu,cuda,tensorrt", metavar="P1,P2",
                    help="comma-separated, from cpu, cuda, tensorrt, openvino (default cpu,cuda,tensorrt)")
    fo.add_argument("--rows", choices=("default", "all"), default="default",
                    help="default: CPU FP32/INT8, CUDA FP32/FP16/INT8, TensorRT FP16/INT8, OpenVINO FP32/INT8; "
                         "all: every file on every provider")
    fo.add_argument("--domain-data", nargs="+", action="extend", default=[], metavar="DIR",
                    help="folders of unlabelled images (any depth) whose in-domain decisions are compared with "
                         "the CPU row's too, e.g. ../shared/data/foreign_cxr ../shared/data/kermany_fullres")
    fo.add_argument("--limit", type=_positive, metavar="N", help="only the first N images (by name) of each label")
    fo.add_argument("--iterations", type=_positive, default=50, metavar="N", help="timed calls at batch 1 (default 50)")
    fo.add_argument("--throughput-batch", type=_positive, default=64, metavar="N",
                    help="batch of the images/s column (default 64)")
    fo.add_argument("--threads", type=_positive, default=_default_threads(), metavar="N",
                    help="onnxruntime CPU threads (default: the CPUs this process may use)")
    fo.add_argument("--time-limit", type=_positive, metavar="S",
                    help="start no row after S seconds (rows left say 'skipped: time limit'); the report is "
                         "rewritten after every row anyway, so a run that is killed keeps what it measured")
    common(fo, summary=False)

    s = sub.add_parser("summary", formatter_class=fmt, epilog=SUMMARY_EPILOG,
                       help="merge accuracy + latency reports into summary.json / summary.md",
                       description="Merge the accuracy and latency reports of a folder into the summary contract.")
    s.add_argument("--results", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT})")
    s.add_argument("--out", metavar="DIR", help="where to write summary.json/.md (default: --results)")
    s.add_argument("--threads", type=_positive, metavar="N",
                   help="which measured thread count to summarise (default: the highest measured)")
    s.add_argument("--device", choices=("cpu", "cuda", "openvino"), default="cpu",
                   help="which device's latency (default cpu)")
    s.add_argument("-q", "--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "accuracy":
        from .accuracy import run_accuracy

        run_accuracy(args.model, args.data, args.out, bootstrap=max(args.bootstrap, 0), seed=args.seed,
                     batch=args.batch, threads=args.threads, device=args.device, limit=args.limit, name=args.name,
                     plots=not args.no_plots, quiet=args.quiet)
        status = 0
    elif args.command == "latency":
        from .latency import run_latency

        rep = run_latency(args.model, args.checkpoint, batches=args.batch, threads=args.threads, device=args.device,
                          repeats=args.repeats, warmup=max(args.warmup, 1), iterations=args.iterations,
                          max_seconds=args.max_seconds, timeout=args.timeout, out=args.out, name=args.name,
                          quiet=args.quiet, domain_check=args.domain_check, heatmap=args.heatmap)
        for r in rep["results"]:
            if r.get("unavailable"):
                print(f"cxr-bench: {r['name']} batch {r['batch']}: not measured: {r['error']}", file=sys.stderr)
        failed = [r for r in rep["results"] if not r.get("unavailable") and (r.get("error") or r.get("processes_failed"))]
        for r in failed:
            print(f"cxr-bench: {r['name']} batch {r['batch']}: "
                  f"{r.get('error') or str(r['processes_failed']) + ' process(es) failed'}", file=sys.stderr)
        status = 1 if failed else 0
    elif args.command == "e2e":
        from .e2e import run_e2e

        rep = run_e2e(args.model, args.images, count=args.count, repeats=args.repeats, threads=args.threads,
                      device=args.device, infer_args=args.infer_arg, cold=not args.no_cold, out=args.out,
                      name=args.name, quiet=args.quiet)
        errs = (rep.get("cold") or {}).get("errors", {})
        for k, msg in errs.items():
            print(f"cxr-bench: {k}: {msg}", file=sys.stderr)
        return 1 if errs else 0
    elif args.command == "domain":
        from .domain import KINDS, run_domain

        kinds = [k for k in (args.kinds or ",".join(KINDS)).split(",") if k]
        rep = run_domain(args.model, args.data, args.out, count=args.count, kinds=kinds, batch=args.batch,
                         threads=args.threads, name=args.name, quiet=args.quiet, foreign=args.foreign,
                         originals=args.originals, validation=args.validation)
        return 0 if all(m.get("domain") for m in rep["models"]) else 1
    elif args.command == "graphcost":
        from .graphcost import run_graphcost

        run_graphcost(args.model, graph=args.graph, batch=args.batch, threads=args.threads, device=args.device,
                      processes=args.processes, blocks=args.blocks, warmup=args.warmup, calls=args.calls,
                      out=args.out, name=args.name, quiet=args.quiet)
        return 0
    elif args.command == "heatmaps":
        from .heatmaps import run_heatmaps

        run_heatmaps(args.model, args.data, args.out, per_kind=args.per_kind, threads=args.threads, batch=args.batch,
                     name=args.name, quiet=args.quiet)
        return 0
    elif args.command == "formats":
        from .formats import run_formats

        rep = run_formats(args.model, args.data, args.out, providers=[p for p in args.providers.split(",") if p],
                          rows=args.rows, count=args.limit, iterations=args.iterations, batch=args.throughput_batch,
                          threads=args.threads, name=args.name, quiet=args.quiet, domain_data=args.domain_data,
                          time_limit=args.time_limit)
        failed = [r for r in rep["rows"] if r["status"].startswith("failed")]
        for r in failed:
            print(f"cxr-bench: {r['backbone']} {r['precision']} on {r['provider']}: {r['status']}", file=sys.stderr)
        return 1 if failed else 0
    else:  # summary
        from .summary import write_summary

        write_summary(args.results, args.out, threads=args.threads, device=args.device, quiet=args.quiet)
        return 0
    if getattr(args, "summary", False):
        from .summary import write_summary

        write_summary(args.out, quiet=args.quiet)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``cxr-bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    from cxr_infer.errors import CXRError

    try:
        return _run(args)
    except CXRError as exc:
        print(f"cxr-bench: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a base install without the bench extra
        extra = "bench,train" if exc.name in ("torch", "torchvision", "safetensors") else "bench"
        print(f"cxr-bench: error: this command needs the Python package {exc.name!r}, which is not installed: "
              f"pip install 'cxr[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxr-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
