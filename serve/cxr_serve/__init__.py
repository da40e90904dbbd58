"""cxr_serve: cxr as a service, and archives scored on a Ray cluster, on top of the runtime.

``cxr-serve`` (:mod:`cxr_serve.cli`) answers HTTP: ``POST /v1/classify`` with the result record
``cxr-infer --format jsonl`` writes, the Open Inference Protocol v2 (:mod:`cxr_serve.oip`) that
Triton, KServe and MLServer speak, and Prometheus metrics; requests that arrive together share
one model run (:mod:`cxr_serve.batching`). ``cxr-serve --ray`` runs the same app as a Ray Serve
deployment (:mod:`cxr_serve.ray_serve`); ``cxr-infer --ray`` scores archives with Ray Data
(:mod:`cxr_serve.ray_batch`). It imports the runtime (``cxr_infer``); the runtime never imports
it: ``cxr-infer --ray`` and ``--format parquet`` reach it through entry points.

Examples:
    $ cxr-serve --port 8000 &
    $ curl --data-binary @chest.jpeg http://127.0.0.1:8000/v1/classify
    {"path": null, "label": "PNEUMONIA", "probability": 0.87, ...}
"""
from __future__ import annotations

__version__ = "0.1.0"
