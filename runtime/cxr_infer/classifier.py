"""The embeddable API: ``Classifier`` loads a self-describing cxr ONNX model and classifies images.

One ``Classifier`` holds one onnxruntime session, shared by every thread that calls it
(``InferenceSession.run`` is thread-safe and nothing else here changes after loading).

Example:
    >>> from cxr_infer import Classifier
    >>> clf = Classifier("resnet50_int8.onnx")                     # doctest: +SKIP
    >>> p = clf.predict("chest.jpeg")                              # doctest: +SKIP
    >>> p.label, round(p.probability, 3), p.threshold              # doctest: +SKIP
    ('PNEUMONIA', 0.973, 0.42)
    >>> [r.label for r in clf.predict(["a.jpeg", "b.png"])]        # doctest: +SKIP
    ['NORMAL', 'PNEUMONIA']
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, MutableMapping, Optional, Sequence, Union,
                    overload)

import numpy as np

from .errors import DeviceError, InputError, ModelError
from .preprocess import ImageSource, describe, load_image, to_input
from .spec import SPEC_KEY, ModelSpec

#: Where the embedded default model lives (package data; see setup.cfg).
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default.onnx"
DEVICES = ("cpu", "cuda", "auto")
DEFAULT_BATCH_SIZE = 8
#: onnxruntime session config entries set by default. Worker threads that spin while idle burn
#: cores the host application needs; on a shared 2-core CPU, turning spinning off made an INT8
#: ResNet50 run faster (about 55 vs 95 ms) as well. ``session_config`` overrides these.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}

ModelSource = Union[str, "os.PathLike[str]", bytes]


@dataclass(frozen=True)
class Prediction:
    """The result for one image.

    ``probability`` is the model's probability of ``positive_label``; ``label`` is the positive
    label when ``probability >= threshold``, otherwise the most probable other label.

    ``in_domain`` says whether the image lies inside the model's training domain: ``False``
    when its ``domain_score`` (how far the image lies from the training images, see
    ``cxr_export.domain``) exceeds the model's calibrated domain threshold, in which case the
    label should not be trusted; ``None`` (and ``domain_score`` ``None``) when the model file
    carries no domain statistics, i.e. the check is unavailable.
    """

    label: str
    probability: float
    threshold: float
    probabilities: Mapping[str, float] = field(default_factory=dict)
    source: Optional[str] = None
    in_domain: Optional[bool] = None
    domain_score: Optional[float] = None

    @property
    def positive(self) -> bool:
        """True when ``probability >= threshold``."""
        return self.probability >= self.threshold

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict: ``path``, ``label``, ``probability``, ``threshold``, ``probabilities``,
        ``in_domain``, ``domain_score``."""
        return {"path": self.source, "label": self.label, "probability": self.probability,
                "threshold": self.threshold, "probabilities": dict(self.probabilities),
                "in_domain": self.in_domain, "domain_score": self.domain_score}


def available_threads() -> int:
    """CPU cores this process may run on (container CPU sets included; ``os.cpu_count`` ignores them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _providers_for(device: str, available: Sequence[str]) -> List[Any]:
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    gpu = "CUDAExecutionProvider" in available
    if device == "cpu" or (device == "auto" and not gpu):
        return ["CPUExecutionProvider"]
    if not gpu:
        raise DeviceError("device 'cuda' requested but this onnxruntime has no CUDA provider "
                          f"(available: {', '.join(available) or 'none'}); install the GPU build: "
                          "pip uninstall onnxruntime && pip install 'cxr[gpu]'")
    providers: List[Any] = []
    if "TensorrtExecutionProvider" in available and os.environ.get("CXR_TENSORRT", "1") != "0":
        cache = Path(os.environ.get("CXR_TRT_CACHE", Path.home() / ".cache" / "cxr" / "tensorrt"))
        providers.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache)}))
    return providers + ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _shape(value: Any) -> List[Any]:
    return list(value.shape) if getattr(value, "shape", None) is not None else []


def _ort_message(exc: BaseException, name: str) -> str:
    """onnxruntime's message in one short line, without its status-code prefix."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = text.replace(f"Load model from {name} failed:", "").strip()
    return text[:300] or type(exc).__name__


_ORT_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


class Classifier:
    """A cxr model ready to classify chest X-rays.

    Args:
        model: path to a ``.onnx`` file with a ``cxr.spec`` (or its bytes); ``None`` loads the
            embedded default model.
        device: ``"cpu"``, ``"cuda"`` (TensorRT, then CUDA when present) or ``"auto"``.
        threads: intra-op threads; default: the cores this process may use.
        threshold: overrides the spec's decision threshold.
        warmup: run one dummy batch on load so the first real call is not slow.
        batch_size: the default number of images per inference batch for lists.
        providers: onnxruntime execution providers, overriding ``device`` (advanced).
        session_config: extra onnxruntime session config entries (advanced), e.g.
            ``{"session.intra_op.allow_spinning": "1"}`` on a machine dedicated to inference.
        domain_check: compute the out-of-domain score when the model has domain statistics
            (default); ``False`` skips it and leaves ``in_domain`` ``None``.

    Raises:
        ModelError: the file is missing, not ONNX, or has no valid spec or the wrong graph.
        DeviceError: the device's execution provider is not available.

    Example:
        >>> clf = Classifier("model.onnx", threads=2)              # doctest: +SKIP
        >>> clf.predict(np.zeros((512, 512), np.uint8)).label      # doctest: +SKIP
        'NORMAL'
    """

    def __init__(self, model: Optional[ModelSource] = None, device: str = "cpu", threads: Optional[int] = None,
                 threshold: Optional[float] = None, warmup: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 providers: Optional[Sequence[Any]] = None, session_config: Optional[Mapping[str, str]] = None,
                 domain_check: bool = True) -> None:
        import onnxruntime as ort

        self.model_path: Optional[str] = None
        if model is None:
            if not DEFAULT_MODEL.is_file():
                raise ModelError(f"no default model is installed yet (expected at {DEFAULT_MODEL}); pass a "
                                 "model file: cxr-infer --model MODEL.onnx IMAGE, or Classifier('MODEL.onnx')")
            model = DEFAULT_MODEL
        if isinstance(model, (bytes, bytearray)):
            name, load_from = "<model bytes>", bytes(model)
        else:
            path = Path(model)
            name = str(path)
            if not path.exists():
                raise ModelError(f"{name}: no such model file")
            if not path.is_file():
                raise ModelError(f"{name}: is not a file")
            self.model_path = name
            load_from = name
        self.name = name
        self.threads = int(threads) if threads else available_threads()
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = int(batch_size)

        if providers is None:
            providers = _providers_for(device, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        config = dict(SESSION_CONFIG, **(session_config or {}))
        for key, value in config.items():
            opts.add_session_config_entry(key, str(value))
        try:
            self._session = ort.InferenceSession(load_from, sess_options=opts, providers=list(providers))
        except Exception as exc:  # onnxruntime raises several unrelated types here
            raise ModelError(f"{name}: not a loadable ONNX model ({_ort_message(exc, name)})") from None
        self.providers: List[str] = list(self._session.get_providers())
        if device == "cuda" and not any(p in self.providers for p in
                                        ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
            raise DeviceError("device 'cuda' requested but onnxruntime could not start its CUDA provider "
                              "(check the CUDA and cuDNN libraries match onnxruntime-gpu)")
        self.device = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"

        meta = self._session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in meta:
            raise ModelError(f"{name}: has no {SPEC_KEY} metadata, so it is not a cxr model "
                             "(make one with cxr-export)")
        self.spec: ModelSpec = ModelSpec.from_json(meta[SPEC_KEY], source=name)
        self._static_batch = self._check_graph()
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
            raise ValueError(f"threshold {threshold!r} must be a number in [0, 1]")
        self.threshold: float = float(threshold) if threshold is not None else self.spec.threshold
        self._labels = self.spec.labels
        self._pos = self.spec.positive_index
        self._np_dtype = np.float16 if self.spec.input_dtype == "float16" else np.float32
        self._mean = np.asarray(self.spec.mean, dtype=np.float32)
        self._std = np.asarray(self.spec.std, dtype=np.float32)
        self._method = str(self.spec.raw["resize"].get("method", "bicubic"))
        #: the calibrated domain threshold; None when the check is unavailable (or turned off)
        self.domain_threshold: Optional[float] = self.spec.domain_threshold if domain_check else None
        self._outputs = [self.spec.prob_output] + ([self.spec.domain_output] if self.domain_threshold is not None
                                                   else [])
        if warmup:
            w, h = self.spec.image_size
            self._run(np.zeros((self._static_batch or 1, h, w, 3), np.uint8))

    # ---- loading checks
    def _check_graph(self) -> Optional[int]:
        """Check the graph against the spec; return the static batch size, if the graph has one."""
        spec, name = self.spec, self.name
        inputs = {i.name: i for i in self._session.get_inputs()}
        if spec.input_name not in inputs:
            raise ModelError(f"{name}: the graph has no input {spec.input_name!r} named by its spec "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        extra = [n for n in inputs if n != spec.input_name]
        if extra:
            raise ModelError(f"{name}: the graph has unexpected extra inputs {extra}; "
                             "a cxr model takes one image batch")
        inp = inputs[spec.input_name]
        shape = _shape(inp)
        w, h = spec.image_size
        expected = [None, 3, h, w]
        ok = len(shape) == 4 and all(not isinstance(d, int) or e is None or d == e for d, e in zip(shape, expected))
        if not ok:
            raise ModelError(f"{name}: input {inp.name!r} has shape {shape}, "
                             f"expected [N, 3, {h}, {w}] as its spec says")
        if inp.type != _ORT_DTYPES[spec.input_dtype]:
            raise ModelError(f"{name}: input {inp.name!r} is {inp.type}, but its spec says {spec.input_dtype}")
        outputs = {o.name: o for o in self._session.get_outputs()}
        for role, out_name in (("probabilities", spec.prob_output), ("features", spec.features_output),
                               ("domain score", spec.domain_output)):
            if out_name and out_name not in outputs:
                raise ModelError(f"{name}: the graph has no {role} output {out_name!r} named by its spec "
                                 f"(outputs: {', '.join(outputs)})")
        oshape = _shape(outputs[spec.prob_output])
        n = len(spec.labels)
        if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != n):
            raise ModelError(f"{name}: output {spec.prob_output!r} has shape {oshape}, expected [N, {n}] for "
                             f"labels {spec.labels}")
        return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    @property
    def domain_available(self) -> bool:
        """True when predictions carry an out-of-domain check (the model has domain statistics)."""
        return self.domain_threshold is not None

    # ---- inference
    def _run(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, len(labels))`` for ``uint8`` pixels ``(N, H, W, 3)``."""
        return self._run_all(pixels)[0]

    def _run_all(self, pixels: np.ndarray) -> tuple:
        """``(probabilities (N, L), domain scores (N,) or None)`` for ``uint8`` pixels ``(N, H, W, 3)``."""
        if self.spec.normalization_in_graph:
            x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=self._np_dtype)
        else:
            x = to_input(pixels, self._mean, self._std)
            if self._np_dtype is not np.float32:
                x = x.astype(self._np_dtype)
        n = x.shape[0]
        if self._static_batch is None:
            chunks = [x]
        else:  # a graph exported with a fixed batch: run in chunks of it, padding the last
            b = self._static_batch
            chunks = []
            for i in range(0, n, b):
                c = x[i:i + b]
                if c.shape[0] < b:
                    c = np.concatenate([c, np.zeros((b - c.shape[0],) + c.shape[1:], c.dtype)])
                chunks.append(c)
        name = self.spec.prob_output
        try:
            outs = [self._session.run(self._outputs, {self.spec.input_name: c}) for c in chunks]
        except Exception as exc:  # onnxruntime's own error types
            raise ModelError(f"{self.name}: inference failed ({_ort_message(exc, self.name)})") from None
        probs = np.concatenate([o[0] for o in outs])[:n].astype(np.float64)
        if probs.shape != (n, len(self._labels)):
            raise ModelError(f"{self.name}: output {name!r} returned shape {probs.shape}, "
                             f"expected ({n}, {len(self._labels)})")
        scores = None
        if len(self._outputs) > 1:
            scores = np.concatenate([np.asarray(o[1]).reshape(-1) for o in outs])[:n].astype(np.float64)
            if scores.shape != (n,):
                raise ModelError(f"{self.name}: output {self._outputs[1]!r} returned {scores.shape}, expected ({n},)")
        return probs, scores

    def _prediction(self, probs: np.ndarray, source: Optional[str], score: Optional[float] = None) -> Prediction:
        p = float(probs[self._pos])
        if p >= self.threshold:
            label = self._labels[self._pos]
        else:
            others = [i for i in range(len(self._labels)) if i != self._pos]
            label = self._labels[max(others, key=lambda i: probs[i])]
        return Prediction(label=label, probability=p, threshold=self.threshold,
                          probabilities=MappingProxyType({k: float(v) for k, v in zip(self._labels, probs)}),
                          source=source, in_domain=None if score is None or self.domain_threshold is None
                          else bool(score <= self.domain_threshold), domain_score=score)

    def preprocess(self, item: ImageSource) -> np.ndarray:
        """The ``uint8`` ``(H, W, 3)`` pixels this model sees for ``item``."""
        return load_image(item, self.spec.image_size, method=self._method)

    def iter_predict(self, items: Iterable[ImageSource], batch_size: Optional[int] = None,
                     timing: Optional[MutableMapping[str, float]] = None
                     ) -> Iterator[Union[Prediction, InputError]]:
        """Yield a :class:`Prediction` or an :class:`InputError` per item, in order, batch by batch.

        ``timing``, when given, accumulates seconds under ``"preprocess"`` and ``"inference"``.
        """
        size = int(batch_size or self.batch_size)
        if size < 1:
            raise ValueError("batch_size must be at least 1")
        batch: List[Any] = []
        for item in items:
            batch.append(item)
            if len(batch) >= size:
                yield from self._predict_batch(batch, timing)
                batch = []
        if batch:
            yield from self._predict_batch(batch, timing)

    def _predict_batch(self, items: List[ImageSource], timing: Optional[MutableMapping[str, float]]
                       ) -> List[Union[Prediction, InputError]]:
        t0 = time.perf_counter()
        results: List[Any] = [None] * len(items)
        good: List[int] = []
        pixels: List[np.ndarray] = []
        for i, item in enumerate(items):
            try:
                pixels.append(self.preprocess(item))
                good.append(i)
            except InputError as exc:
                results[i] = exc
        t1 = time.perf_counter()
        if pixels:
            probs, scores = self._run_all(np.stack(pixels))
            for k, (row, i) in enumerate(zip(probs, good)):
                src = items[i]
                results[i] = self._prediction(row, describe(src) if isinstance(src, (str, os.PathLike)) else None,
                                              None if scores is None else float(scores[k]))
        if timing is not None:
            timing["preprocess"] = timing.get("preprocess", 0.0) + (t1 - t0)
            timing["inference"] = timing.get("inference", 0.0) + (time.perf_counter() - t1)
        return results

    def predict_many(self, items: Iterable[ImageSource], batch_size: Optional[int] = None
                     ) -> List[Union[Prediction, InputError]]:
        """Classify every item; a bad item gives its :class:`InputError` in its place, the rest go on.

        Example:
            >>> [type(r).__name__ for r in clf.predict_many(["ok.jpeg", "missing.jpeg"])]  # doctest: +SKIP
            ['Prediction', 'InputError']
        """
        return list(self.iter_predict(items, batch_size))

    @overload
    def predict(self, x: Union[List[ImageSource], tuple], batch_size: Optional[int] = ...,
                errors: str = ...) -> List[Any]: ...

    @overload
    def predict(self, x: ImageSource, batch_size: Optional[int] = ..., errors: str = ...) -> Prediction: ...

    def predict(self, x: Any, batch_size: Optional[int] = None, errors: str = "raise") -> Any:
        """Classify one image (path, bytes, PIL image, numpy array) or a list of them.

        A list gives a list in the same order, batched by ``batch_size``. With
        ``errors="raise"`` the first bad input raises :class:`InputError`; with
        ``errors="return"`` it takes that input's place in the list.

        Example:
            >>> clf.predict("chest.jpeg").label                       # doctest: +SKIP
            'PNEUMONIA'
        """
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        if isinstance(x, (list, tuple)):
            results = self.predict_many(x, batch_size)
            if errors == "raise":
                for r in results:
                    if isinstance(r, InputError):
                        raise r
            return results
        result = self._predict_batch([x], None)[0]
        if isinstance(result, InputError):
            if errors == "raise":
                raise result
        return result

    # ---- description
    def info(self) -> Dict[str, Any]:
        """What this classifier runs: the model file, its spec, graph inputs/outputs, providers, threads."""
        return {
            "model": self.model_path or self.name,
            "providers": self.providers,
            "threads": self.threads,
            "threshold": self.threshold,
            "domain_check": ({"available": True, "threshold": self.domain_threshold, "output": self.spec.domain_output,
                              "flags_of_in_domain_validation": (self.spec.raw.get("domain") or {}).get(
                                  "flag_rate_validation"),
                              "branches": [b.get("name") for b in (self.spec.raw.get("domain") or {}).get(
                                  "branches", []) if isinstance(b, dict)]}
                             if self.domain_available else
                             {"available": False, "reason": "the model file has no domain statistics (add them with "
                              "python -m cxr_export.domain)" if self.spec.domain_threshold is None else
                              "turned off (domain_check=False)"}),
            "inputs": [{"name": i.name, "shape": _shape(i), "type": i.type} for i in self._session.get_inputs()],
            "outputs": [{"name": o.name, "shape": _shape(o), "type": o.type} for o in self._session.get_outputs()],
            "spec": self.spec.raw,
        }

    def __repr__(self) -> str:
        return (f"Classifier(model={self.name!r}, backbone={self.spec.backbone!r}, precision={self.spec.precision!r}, "
                f"device={self.device!r}, threads={self.threads})")
