"""``cxr-serve --ray ADDRESS --replicas N``: the same app as a Ray Serve deployment.

Each replica builds the app of :mod:`cxr_serve.app` around its own
:class:`~cxr_infer.classifier.Classifier`; a decoded image reaches the model through Ray Serve's
``serve.batch`` (the replica's batches of at most ``--max-batch`` images, waiting at most
``--max-wait-ms``). Ray Serve's HTTP proxy on the head node listens on ``--host``/``--port`` and
spreads requests over the replicas; a replica that dies is replaced by Serve's controller while
the others answer. The model file (``--model``) must be readable at the same path on every node.

Examples:
    $ ray start --head --port 6379
    $ cxr-serve --ray 127.0.0.1:6379 --replicas 2 --port 8000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from dataclasses import replace
from typing import Any, Callable, List, Sequence

from . import rayutil
from .service import Item, ServeConfig

APP_NAME = "cxr"


def app_builder(config: ServeConfig) -> Callable[[], Any]:
    """A function that builds a replica's app (Ray Serve calls it in the replica)."""

    def build() -> Any:
        serve = rayutil.import_serve()
        from .app import build_app
        from .service import Service

        service = Service(config)

        @serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.max_wait_s)
        async def score_batch(items: Sequence[Item]) -> List[Any]:
            return await asyncio.get_running_loop().run_in_executor(None, service.run_batch, list(items))

        service.score = lambda image, heatmap: score_batch((image, heatmap))
        return build_app(service)

    return build


def deploy(config: ServeConfig, replicas: int, replica_cpus: float, host: str, port: int) -> None:
    """Start Ray Serve's proxy (head node only) on ``host``:``port`` and deploy the app; returns when ready."""
    serve = rayutil.import_serve()
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    deployment = serve.deployment(serve.ingress(app_builder(config))(), name="Classifier",
                                  num_replicas=replicas, max_ongoing_requests=config.max_concurrency,
                                  ray_actor_options={"num_cpus": replica_cpus}, health_check_period_s=2,
                                  health_check_timeout_s=30)
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/", blocking=False)


def undeploy() -> None:
    """Delete the app; stop Ray Serve when no other app is left on the cluster."""
    serve = rayutil.import_serve()
    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception:  # the cluster went away first: nothing is left to stop
        pass


def serve_on_ray(args: argparse.Namespace, config: ServeConfig) -> int:
    """``cxr-serve --ray``: deploy, say where, and wait for Ctrl-C or SIGTERM, then undeploy."""
    from .cli import _say

    if config.model is not None:
        config = replace(config, model=os.path.abspath(config.model))
    rayutil.connect(args.ray, "cxr-serve --ray")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(config, args.replicas, args.replica_cpus, args.host, args.port)
        _say(f"Ray Serve on http://{args.host}:{args.port}: {args.replicas} replica(s) of "
             f"{config.model or 'the default model'} as {config.model_name!r}, batches of up to {config.max_batch} "
             f"images, {'a bearer token required' if config.token else 'no token'}")
        stop.wait()
    finally:
        undeploy()
    _say("stopped")
    return 0
