"""``cxr-infer --ray ADDRESS``: score files on a Ray cluster with Ray Data, with the rows of a local run.

Reading and decoding run as Ray tasks (:func:`decode_batch`, with the driver's
:class:`~cxr_infer.classifier.ImageLoader`, so each image is decoded exactly as ``cxr-infer``
decodes it), classification in an actor pool (:class:`Scorer`, one
:class:`~cxr_infer.classifier.Classifier` per actor), and results come back to the driver in
input order, where ``cxr-infer`` writes them through its own format writers.

Every input is written exactly once: Ray Data retries the work of a worker that dies, the driver
drops any result it has already taken, and inputs a run did not return are scored again before
the run ends. With ``--output FILE`` each finished input is recorded in ``FILE.journal.jsonl``
(:mod:`cxr_serve.journal`); ``--resume`` skips those whose path and SHA-256 still match.

Examples:
    $ ray start --head --port 6379 --num-cpus 2
    $ cxr-infer --ray 127.0.0.1:6379 archive/ --format jsonl --output archive.jsonl
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from cxr_infer.classifier import Classifier, ImageLoader, LoadedImage
from cxr_infer.errors import InputError
from cxr_infer.runners import Runner, RunRequest

from . import rayutil
from .journal import Journal, Outcome, outcome_of, sha256_of

#: Inputs per Ray Data block and per batch of the decode tasks.
BLOCK = 64
#: Passes over inputs a run did not return before it gives up.
PASSES = 3


def _settings() -> Dict[str, float]:
    """The pool's shape: actors (0: one per CPU of the cluster) and CPUs reserved per actor and per
    decode task; ``CXR_RAY_ACTORS``, ``CXR_RAY_ACTOR_CPUS`` and ``CXR_RAY_DECODE_CPUS`` change them."""
    return {"actors": float(os.environ.get("CXR_RAY_ACTORS", "0")),
            "actor_cpus": float(os.environ.get("CXR_RAY_ACTOR_CPUS", "0.5")),
            "decode_cpus": float(os.environ.get("CXR_RAY_DECODE_CPUS", "0.25"))}


def decode_batch(batch: Dict[str, np.ndarray], loader: ImageLoader) -> Dict[str, np.ndarray]:
    """A Ray task: read and decode each file of ``batch`` (columns ``i``, ``path``, ``read``) and hash it."""
    w, h = loader.size
    n = len(batch["i"])
    pixels = np.zeros((n, h, w, 3), np.uint8)
    reasons, errors, kinds, hashes = [""] * n, [""] * n, [""] * n, [""] * n
    for k in range(n):
        path, read = str(batch["path"][k]), str(batch["read"][k])
        try:
            image = loader.load(read)
        except InputError as exc:
            text = str(exc)
            errors[k] = path + text[len(read):] if text.startswith(read + ":") else f"{path}: {text}"
            kinds[k] = type(exc).__name__
        else:
            pixels[k] = image.pixels
            reasons[k] = json.dumps(list(image.header_reasons))
        hashes[k] = sha256_of(read) or ""
    return {"i": batch["i"], "path": batch["path"], "sha256": np.array(hashes, dtype=object), "pixels": pixels,
            "reasons": np.array(reasons, dtype=object), "error": np.array(errors, dtype=object),
            "kind": np.array(kinds, dtype=object)}


class Scorer:
    """An actor of the pool: one :class:`Classifier`, scoring decoded batches in runs of the
    ``batch_size`` a local ``cxr-infer`` uses."""

    def __init__(self, model: Optional[str], options: Dict[str, Any]) -> None:
        self.classifier = Classifier(model, warmup=False, **options)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        n = len(batch["i"])
        good = [k for k in range(n) if not batch["error"][k]]
        records = [""] * n
        size = self.classifier.batch_size
        for start in range(0, len(good), size):
            chunk = good[start:start + size]
            images = [LoadedImage(batch["pixels"][k], tuple(json.loads(batch["reasons"][k]))) for k in chunk]
            for k, prediction in zip(chunk, self.classifier.predict_loaded(images)):
                records[k] = json.dumps(prediction.to_dict())
        return {"i": batch["i"], "path": batch["path"], "sha256": batch["sha256"],
                "record": np.array(records, dtype=object), "error": batch["error"], "kind": batch["kind"]}


def _outcome(row: Dict[str, Any]) -> Outcome:
    if row["error"]:
        return outcome_of({"error": row["error"], "kind": row["kind"]})
    return outcome_of({"path": row["path"], "record": json.loads(row["record"])})


def _pool_shape(ray: Any, options: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    """How many actors, and the options of their classifiers (one thread each unless --threads)."""
    settings = _settings()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = int(settings["actors"]) or max(1, cpus)
    options = dict(options)
    options["threads"] = options.get("threads") or 1
    return actors, options


def _dataset(request: RunRequest, todo: List[Tuple[int, str]]) -> Any:
    """The Ray Data pipeline over ``todo`` (index, path): decode tasks, then the actor pool."""
    ray = rayutil.import_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    settings = _settings()
    actors, options = _pool_shape(ray, dict(request.classifier_options))
    model = request.classifier.model_path
    items = [{"i": i, "path": path, "read": os.path.abspath(path)} for i, path in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / BLOCK)))
    ds = ds.map_batches(decode_batch, fn_kwargs={"loader": request.classifier.loader}, batch_size=BLOCK,
                        batch_format="numpy", num_cpus=settings["decode_cpus"], max_retries=5)
    return ds.map_batches(Scorer, fn_constructor_kwargs={"model": os.path.abspath(model) if model else None,
                                                         "options": options},
                          batch_size=BLOCK, batch_format="numpy", concurrency=actors,
                          num_cpus=settings["actor_cpus"], max_restarts=-1, max_task_retries=-1)


def _score(request: RunRequest, todo: List[Tuple[int, str]]) -> Iterator[Tuple[int, str, Outcome]]:
    """(index, SHA-256, outcome) of each input of ``todo``, once each, in order; inputs a pass did
    not return are scored again."""
    left = list(todo)
    for attempt in range(PASSES):
        if not left:
            return
        if attempt:
            request.say(f"--ray: {len(left)} inputs came back from no worker; scoring them again")
        seen = set()
        for batch in _dataset(request, left).iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(batch["i"])):
                i = int(batch["i"][k])
                if i in seen:
                    continue  # a retried block returned it again
                seen.add(i)
                row = {name: batch[name][k] for name in ("path", "sha256", "record", "error", "kind")}
                yield i, str(row["sha256"]), _outcome(row)
        left = [(i, p) for i, p in left if i not in seen]
    if left:
        raise rayutil.RayError(f"--ray: {len(left)} inputs were not scored after {PASSES} passes "
                               f"(first: {left[0][1]}); rerun with --resume")


def _still_valid(files: List[str], journal: Journal) -> Dict[int, Dict[str, Any]]:
    """The journal's entries (by input index) whose file still has the SHA-256 recorded."""
    entries = journal.load()
    candidates = [(i, f) for i, f in enumerate(files) if f in entries and entries[f].get("sha256")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(lambda item: sha256_of(item[1]), candidates))
    return {i: entries[f] for (i, f), h in zip(candidates, hashes) if h == entries[f]["sha256"]}


def results(request: RunRequest) -> Iterator[Outcome]:
    """The :class:`~cxr_infer.runners.Runner` entry: one outcome per file of ``request``, in order.
    It connects to the cluster at once (a cluster it cannot reach is one line before any output)."""
    ray = rayutil.connect(request.address, "--ray")
    return _ordered(request, ray)


def _ordered(request: RunRequest, ray: Any) -> Iterator[Outcome]:
    files = request.files
    journal = Journal(request.journal) if request.journal else None
    kept = _still_valid(files, journal) if journal is not None and request.resume else {}
    if journal is not None:
        journal.start({files[i]: entry for i, entry in kept.items()})
    todo = [(i, f) for i, f in enumerate(files) if i not in kept]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    request.say(f"--ray: {len(todo)} inputs to score on {len(nodes)} node(s) at {request.address}"
                + (f"; {len(kept)} already scored (--resume)" if request.resume else ""))
    scored = _score(request, todo) if todo else iter(())
    waiting: Dict[int, Outcome] = {}
    try:
        for i, path in enumerate(files):
            if i in kept:
                yield outcome_of(kept[i])
                continue
            while i not in waiting:
                try:
                    j, sha, outcome = next(scored)
                except StopIteration:
                    raise rayutil.RayError(f"--ray: no result came back for {path}; rerun with --resume") from None
                if journal is not None:
                    journal.add(files[j], sha or None, outcome)
                waiting[j] = outcome
            yield waiting.pop(i)
    finally:
        if journal is not None:
            journal.close()


RAY_RUNNER = Runner(
    name="ray", results=results, missing=rayutil.missing,
    description="score on a Ray cluster with Ray Data: decoding in tasks, the model in an actor pool")

__all__ = ["RAY_RUNNER", "Scorer", "decode_batch", "results"]
