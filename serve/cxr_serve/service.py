"""What the service does, whatever hosts it (uvicorn here, or a Ray Serve replica): decode a
request's image, score decoded images in batches, and give the result record.

The record is the one ``cxr-infer --format jsonl`` writes: it is written by the runtime's own
JSON Lines writer (:class:`cxr_infer.formats.JsonLinesWriter`), so the two never drift apart.

Examples:
    >>> config = ServeConfig(max_batch=16, max_wait_ms=5)
    >>> config.max_wait_s
    0.005
"""
from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from cxr_infer.classifier import Classifier, LoadedImage
from cxr_infer.errors import InputError
from cxr_infer.formats import FormatContext, JsonLinesWriter
from cxr_infer.prediction import Prediction

from .metrics import Metrics

#: A request's image and whether its heatmap overlay is wanted: what one batch item is.
Item = Tuple[LoadedImage, bool]


@dataclass(frozen=True)
class ServeConfig:
    """The service's settings (``cxr-serve`` options): the model and how to run it, batching,
    limits, access and the name the Open Inference Protocol knows the model by."""

    model: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None
    threshold: Optional[float] = None
    domain_threshold: Optional[float] = None
    domain_flag_rate: Optional[float] = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 32 * 2**20
    max_concurrency: int = 64
    token: Optional[str] = field(default=None, repr=False)
    model_name: str = "cxr"

    @property
    def max_wait_s(self) -> float:
        """The longest a decoded image waits for others to share its model run."""
        return self.max_wait_ms / 1000.0

    def classifier_options(self) -> Dict[str, Any]:
        """The keyword arguments of the :class:`~cxr_infer.classifier.Classifier` this service runs."""
        return {"device": self.device, "threads": self.threads, "threshold": self.threshold,
                "domain_threshold": self.domain_threshold, "domain_flag_rate": self.domain_flag_rate}


def read_token(path: Optional[str]) -> Optional[str]:
    """The bearer token in the file ``path`` (its first line; None without a file).

    Raises:
        ValueError: the file cannot be read or its first line is empty.
    """
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except OSError as exc:
        raise ValueError(f"--token-file {path}: cannot be read ({exc.strerror or exc})") from None
    if not token:
        raise ValueError(f"--token-file {path}: its first line is empty (write the token there)")
    return token


def message_of(exc: InputError) -> str:
    """The one line ``cxr-infer`` prints for a bad input read from stdin, without the input's name."""
    text = str(exc)
    return text[len("<bytes>: "):] if text.startswith("<bytes>: ") else text


def record(prediction: Prediction, path: Optional[str] = None) -> Dict[str, Any]:
    """The JSON Lines record of ``prediction``, written by the runtime's writer and read back."""
    out = io.StringIO()
    JsonLinesWriter(FormatContext(out=out)).result(path, prediction)  # type: ignore[arg-type]
    return json.loads(out.getvalue())


class Service:
    """One classifier served: decoding, batched scoring, records, metrics and the in-flight count.

    ``score(image, heatmap)`` puts one decoded image into a batch and awaits its prediction; the
    host sets it (a :class:`~cxr_serve.batching.Batcher` around :meth:`run_batch`, or Ray Serve's
    ``serve.batch``).
    """

    def __init__(self, config: ServeConfig, classifier: Optional[Classifier] = None) -> None:
        self.config = config
        self.classifier = classifier or Classifier(config.model, warmup=True, **config.classifier_options())
        self.metrics = Metrics()
        self.score: Optional[Callable[[LoadedImage, bool], Awaitable[Prediction]]] = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._submitted = 0
        self._started = 0
        self._images = 0
        self.metrics.track_queue(self.queue_depth)

    # ---- counting
    def try_enter(self) -> bool:
        """Take a slot for a scoring request; False when ``max_concurrency`` are in flight."""
        with self._lock:
            if self._in_flight >= self.config.max_concurrency:
                return False
            self._in_flight += 1
        self.metrics.in_flight.inc()
        return True

    def leave(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._in_flight -= 1
        self.metrics.in_flight.dec()

    def queue_depth(self) -> float:
        """Images submitted for scoring and not yet in a model run."""
        return float(self._submitted - self._started)

    def submitted(self, n: int = 1) -> None:
        """``n`` decoded images were handed to :attr:`score`."""
        with self._lock:
            self._submitted += n

    def images_begin(self, n: int) -> None:
        """``n`` images of a request are on their way to a batch (decoding, then waiting)."""
        with self._lock:
            self._images += n

    def images_end(self, n: int) -> None:
        """``n`` images of a request are answered (or failed)."""
        with self._lock:
            self._images -= n

    def images_in_flight(self) -> int:
        """Images between arrival and answer: a batch waits for them, up to its wait."""
        return self._images

    # ---- work
    def decode(self, body: bytes) -> LoadedImage:
        """The request's image decoded for the model; raises :class:`InputError`."""
        if not body:
            raise InputError("empty request body: send the image file's bytes")
        return self.classifier.load(body)

    def run_batch(self, items: Sequence[Item]) -> List[Prediction]:
        """One model run for ``items`` (two when some want heatmaps and some do not), in order."""
        with self._lock:
            self._started += len(items)
        self.metrics.observe_batch(len(items))
        results: List[Optional[Prediction]] = [None] * len(items)
        for wanted in (False, True):
            index = [i for i, (_, heatmap) in enumerate(items) if heatmap is wanted]
            if index:
                for i, p in zip(index, self.classifier.predict_loaded([items[i][0] for i in index], heatmap=wanted)):
                    results[i] = p
        return results  # type: ignore[return-value]

    def overlay_png(self, body: bytes, prediction: Prediction) -> bytes:
        """The heatmap overlay (what ``cxr-infer --heatmap`` writes) as PNG bytes."""
        from cxr_infer.overlay import open_display, render_overlay

        image = open_display(body)
        if image is None:
            raise InputError("cannot be read again for its heatmap overlay")
        out = io.BytesIO()
        render_overlay(image, prediction).save(out, format="PNG")
        return out.getvalue()

    def describe(self) -> Mapping[str, Any]:
        """What the service runs, for its start-up line and the OIP metadata."""
        clf = self.classifier
        return {"model": clf.model_path or clf.name, "backbone": clf.spec.backbone, "precision": clf.spec.precision,
                "labels": list(clf.spec.labels), "device": clf.device, "threads": clf.threads,
                "pid": os.getpid(), "heatmap": clf.heatmap_available, "domain_check": clf.domain_available}
