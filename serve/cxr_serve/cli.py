"""``cxr-serve``: cxr as an HTTP service (FastAPI under uvicorn), or as a Ray Serve deployment.

Exit status: 0 stopped by a signal (Ctrl-C, SIGTERM), 2 usage, model, device or port error (one
line). Heavy imports (FastAPI, uvicorn, onnxruntime, Ray) happen after the arguments are parsed.

Examples:
    $ cxr-serve --port 8000 --token-file /run/secrets/cxr-token
    $ cxr-serve --ray 127.0.0.1:6379 --replicas 2 --port 8000
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from typing import Any, Optional, Sequence

from cxr_infer import cliargs

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

EPILOG = """\
endpoints:
  POST /v1/classify                 the body is the image file (JPEG, PNG, TIFF, DICOM); the answer
                                    is the record cxr-infer --format jsonl writes for it (?heatmap=true
                                    adds "overlay_png", the overlay as base64 PNG)
  GET  /v2/health/live, /v2/health/ready        Open Inference Protocol v2 (KServe v2, Triton)
  GET  /v2/models/NAME              the model's metadata (NAME: --name, default cxr)
  POST /v2/models/NAME/infer        a BYTES input "image" of encoded images (JSON base64, or
                                    binary data as tritonclient sends it); outputs probabilities,
                                    label, in_domain, domain_score, domain_reasons
  GET  /metrics                     Prometheus: requests, errors, latency, batch sizes, queue depth

examples:
  cxr-serve
      the embedded default model on http://127.0.0.1:8000
  curl --data-binary @chest.jpeg http://127.0.0.1:8000/v1/classify
  cxr-serve --host 0.0.0.0 --port 8000 --token-file /run/secrets/cxr-token --model m.onnx
      reachable from other machines (put TLS in front: docs/serving.md); every request but the
      health probes needs "Authorization: Bearer TOKEN"
  ray start --head --port 6379 && cxr-serve --ray 127.0.0.1:6379 --replicas 2
      the same app as a Ray Serve deployment: 2 replicas, each with its own model, batched
      with serve.batch (pip install 'cxr[ray]')

limits:
  --max-body-mb (413 above it), --max-concurrency (503 with Retry-After above it); a batch
  holds at most --max-batch images and waits at most --max-wait-ms for them, and only while
  more requests are on their way.

exit status:
  0 stopped (Ctrl-C, SIGTERM), 2 usage, model, device or port error
"""


class UsageError(Exception):
    """A command-line or start-up problem: one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cxr-serve``."""
    p = argparse.ArgumentParser(
        prog="cxr-serve", description="Serve a cxr model over HTTP: /v1/classify, the Open Inference Protocol v2 "
                                      "and Prometheus metrics, with dynamic batching.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed at start)")
    cliargs.add_model_arguments(p)
    p.add_argument("--name", default="cxr", metavar="NAME",
                   help="the model's name in the Open Inference Protocol paths (default cxr)")
    p.add_argument("--token-file", metavar="FILE",
                   help="require 'Authorization: Bearer TOKEN' on every request but the health probes; TOKEN is "
                        "the file's first line")
    p.add_argument("--max-batch", type=cliargs.positive, default=16, metavar="N",
                   help="most images in one model run (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="longest a request waits for others to share its model run (default 5)")
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                   help="largest request body; larger ones get 413 (default 32)")
    p.add_argument("--max-concurrency", type=cliargs.positive, default=64, metavar="N",
                   help="scoring requests answered at once (per replica with --ray); more get 503 with Retry-After "
                        "(default 64)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run as a Ray Serve deployment on the running Ray cluster at ADDRESS (host:port, or auto)")
    p.add_argument("--replicas", type=cliargs.positive, default=1, metavar="N",
                   help="with --ray: replicas, each with its own model (default 1)")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                   help="with --ray: CPUs Ray reserves for each replica (default 1)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="info (default) logs one line per request: method, route, status, time; never its content")
    return p


def _say(message: str) -> None:
    sys.stderr.write(f"cxr-serve: {message}\n")
    sys.stderr.flush()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def config_from(args: argparse.Namespace) -> Any:
    """The :class:`~cxr_serve.service.ServeConfig` the options describe."""
    from .service import ServeConfig, read_token

    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise UsageError("--max-wait-ms must not be negative and --max-body-mb must be positive")
    if args.replicas != 1 and not args.ray:
        raise UsageError("--replicas goes with --ray (one process serves one model; run more behind a proxy)")
    try:
        token = read_token(args.token_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return ServeConfig(model=args.model, device=args.device, threads=args.threads, threshold=args.threshold,
                       domain_threshold=args.domain_threshold, domain_flag_rate=args.domain_flag_rate,
                       max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_concurrency=args.max_concurrency,
                       token=token, model_name=args.name)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    return sock


def serve_standalone(args: argparse.Namespace, config: Any) -> int:
    """Load the model, then serve the app under uvicorn until a signal stops it."""
    import uvicorn

    from .app import build_app
    from .batching import Batcher
    from .service import Service

    service = Service(config)
    batcher = Batcher(service.run_batch, config.max_batch, config.max_wait_s, pending=service.images_in_flight)
    service.score = lambda image, heatmap: batcher.submit((image, heatmap))
    app = build_app(service)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    info = service.describe()
    _say(f"{info['model']} ({info['backbone']} {info['precision']}, {info['device']}, {info['threads']} threads) "
         f"on http://{host}:{port} as {config.model_name!r}; batches of up to {config.max_batch} images, "
         f"{'a bearer token required' if config.token else 'no token'}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: let that be a no-op
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
    _say("stopped")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cxr-serve``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="cxr-serve: %(message)s", stream=sys.stderr)
    try:
        config = config_from(args)
        if not _is_loopback(args.host) and config.token is None:
            _say(f"warning: listening on {args.host} without --token-file: anyone who reaches this port can use it")
        if args.ray:
            from .ray_serve import serve_on_ray

            return serve_on_ray(args, config)
        return serve_standalone(args, config)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _say(str(exc))
        return 2
    except KeyboardInterrupt:
        _say("stopped")
        return 0
    except ImportError as exc:
        extra = "ray" if args.ray else "serve"
        _say(f"{exc.name or exc} is not installed: pip install 'cxr[{extra}]'")
        return 2
    except Exception as exc:  # model, device, Ray: one line, no traceback
        from cxr_infer.errors import one_line

        _say(one_line(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
