"""The embeddable API: ``Classifier`` loads a self-describing cxr ONNX model and classifies images.

One ``Classifier`` holds one onnxruntime session, shared by every thread that calls it
(``InferenceSession.run`` is thread-safe and nothing else here changes after loading).

Examples:
    >>> from cxr_infer import Classifier
    >>> clf = Classifier("resnet50_int8.onnx")                     # doctest: +SKIP
    >>> p = clf.predict("chest.jpeg")                              # doctest: +SKIP
    >>> p.label, round(p.probability, 3), p.threshold              # doctest: +SKIP
    ('PNEUMONIA', 0.973, 0.42)
    >>> [r.label for r in clf.predict(["a.jpeg", "b.png"])]        # doctest: +SKIP
    ['NORMAL', 'PNEUMONIA']
"""
from __future__ import annotations

import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

import numpy as np

from .errors import InputError, ModelError
from .intended_use import IntendedUse
from .model import ModelFile, ModelSource
from .prediction import Prediction
from .preprocess import ImageSource, describe, load_image, load_image_and_header
from .spec import ModelSpec, threshold_at

#: Where the embedded default model lives (package data; see setup.cfg).
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default.onnx"
DEFAULT_BATCH_SIZE = 8


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chunks(items: Iterable[Any], size: int) -> Iterator[List[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _unit_map(raw: np.ndarray) -> np.ndarray:
    """The non-negative part of a map divided by its maximum (0..1, float32); an all-zero map stays zero."""
    positive = np.maximum(np.asarray(raw, np.float32), 0.0)
    peak = float(positive.max()) if positive.size else 0.0
    return (positive / peak if peak > 0 else positive).astype(np.float32)


@dataclass(frozen=True)
class LoadedImage:
    """One input decoded for a model (:meth:`ImageLoader.load`): its ``uint8`` pixels ``(H, W, 3)``,
    why its DICOM header puts it outside the intended use, and its name (paths only)."""

    pixels: np.ndarray
    header_reasons: Tuple[str, ...] = ()
    source: Optional[str] = None


@dataclass(frozen=True)
class ImageLoader:
    """Turns an input into a :class:`LoadedImage` as one model needs it: its input size ``(width,
    height)``, resize rule and intended use. Small and picklable, so a decoding worker in another
    process decodes exactly as the :class:`Classifier` does (:attr:`Classifier.loader`).

    Examples:
        >>> loader = ImageLoader((224, 224), "bicubic")
        >>> loader.load(np.zeros((300, 200), np.uint8)).pixels.shape
        (224, 224, 3)
    """

    size: Tuple[int, int]
    method: str = "bicubic"
    intended_use: Optional[IntendedUse] = None

    def load(self, item: ImageSource) -> LoadedImage:
        """Decode ``item`` and check its DICOM header; raises :class:`InputError` naming the problem."""
        pixels, header = load_image_and_header(item, self.size, method=self.method)
        reasons = self.intended_use.header_reasons(header) if self.intended_use is not None else []
        return LoadedImage(pixels, tuple(reasons), describe(item) if isinstance(item, (str, os.PathLike)) else None)


class Classifier:
    """A cxr model ready to classify chest X-rays.

    Args:
        model: path to a ``.onnx`` file with a ``cxr.spec`` (or its bytes); ``None`` loads the
            embedded default model.
        device: a device of :data:`cxr_infer.devices.DEVICES` (``cpu``, ``cuda``, ``tensorrt``,
            ``openvino``) or ``auto``: CUDA where present, else OpenVINO where installed, else the CPU.
        threads: intra-op threads; default: the cores this process may use.
        threshold: overrides the spec's decision threshold.
        warmup: run one dummy batch on load so the first real call is not slow.
        batch_size: the default number of images per inference batch for lists.
        providers: onnxruntime execution providers, overriding ``device`` (advanced).
        session_config: extra onnxruntime session config entries (advanced), e.g.
            ``{"session.intra_op.allow_spinning": "1"}`` on a machine dedicated to inference.
        domain_check: compute the out-of-domain score when the model has domain statistics
            (default); ``False`` skips it.
        domain_threshold: overrides the file's domain threshold (scores above it are out of domain).
        domain_flag_rate: the domain threshold that flags this share of the file's validation
            images (e.g. ``0.10``), from its operating points. Not both this and ``domain_threshold``.
        header_check: check DICOM headers against the model's ``intended_use`` (default).
        images: how many images this classifier will see, when known: ``auto`` takes the CPU
            provider for fewer than :data:`cxr_infer.devices.AUTO_OPENVINO_MIN_IMAGES`.
        prefetch: for lists and folders, decode the next batch in a worker thread while one runs
            (default; ``CXR_PREFETCH=0`` turns it off process-wide); results keep the input order.

    Raises:
        ModelError: the file is missing, not ONNX, or has no valid spec or the wrong graph.
        DeviceError: the device's execution provider is not available.

    Examples:
        >>> clf = Classifier("model.onnx", threads=2)              # doctest: +SKIP
        >>> clf.predict(np.zeros((512, 512), np.uint8)).label      # doctest: +SKIP
        'NORMAL'
    """

    def __init__(self, model: Optional[ModelSource] = None, device: str = "cpu", threads: Optional[int] = None,
                 threshold: Optional[float] = None, warmup: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 providers: Optional[Sequence[Any]] = None, session_config: Optional[Mapping[str, str]] = None,
                 domain_check: bool = True, header_check: bool = True, images: Optional[int] = None,
                 prefetch: bool = True, domain_threshold: Optional[float] = None,
                 domain_flag_rate: Optional[float] = None) -> None:
        if model is None:
            if not DEFAULT_MODEL.is_file():
                raise ModelError(f"no default model is installed yet (expected at {DEFAULT_MODEL}); pass a "
                                 "model file: cxr-infer --model MODEL.onnx IMAGE, or Classifier('MODEL.onnx')")
            model = DEFAULT_MODEL
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if threshold is not None and not (_number(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold {threshold!r} must be a number in [0, 1]")
        if domain_threshold is not None and domain_flag_rate is not None:
            raise ValueError("give a domain threshold or a domain flag rate, not both")
        if domain_threshold is not None and not _number(domain_threshold):
            raise ValueError(f"domain threshold {domain_threshold!r} must be a finite number")
        if domain_flag_rate is not None and not (_number(domain_flag_rate) and 0.0 < domain_flag_rate < 1.0):
            raise ValueError(f"domain flag rate {domain_flag_rate!r} must be a number in (0, 1), e.g. 0.10")
        #: the opened model file (session, spec, graph input): see :class:`cxr_infer.model.ModelFile`
        self.model = ModelFile(model, device=device, threads=threads, providers=providers,
                               session_config=session_config, images=images)
        self.name = self.model.name
        self.model_path: Optional[str] = str(self.model.path) if self.model.path else None
        self.threads = self.model.threads
        self.providers: List[str] = self.model.providers
        self.device = self.model.device
        self.spec: ModelSpec = self.model.spec
        self.batch_size = int(batch_size)
        #: decode the next batch in a worker thread while one runs (lists and folders)
        self.prefetch = bool(prefetch) and os.environ.get("CXR_PREFETCH", "1") != "0"
        self.threshold: float = float(threshold) if threshold is not None else self.spec.threshold
        self._labels = self.spec.labels
        self._pos = self.spec.positive_index
        #: the domain threshold in use (the file's own unless overridden); None when the check is
        #: unavailable or turned off; :attr:`domain_threshold_source` says where it comes from
        self.domain_threshold, self.domain_threshold_source = self._domain_threshold(
            domain_check, domain_threshold, domain_flag_rate)
        self._outputs = [self.spec.prob_output]
        if self.domain_threshold is not None:
            self._outputs += [self.spec.domain_output] + ([self.spec.domain_terms_output]
                                                          if self.spec.domain_terms_output else [])
        #: the model's intended use (None: the file has none, or header checks are off)
        self.intended_use: Optional[IntendedUse] = self.spec.intended_use if header_check else None
        #: decodes inputs for this model (picklable: decoding may run in other processes)
        self.loader = ImageLoader(tuple(self.spec.image_size), self.spec.resize_method, self.intended_use)
        domain = self.spec.domain
        self._branch_words = [b.words for b in domain.branches] if domain is not None else []
        self._signed_maps = self.spec.heatmap is not None and self.spec.heatmap.signed
        if warmup:
            w, h = self.spec.image_size
            self._run_all(np.zeros((self.model.static_batch or 1, h, w, 3), np.uint8))

    def _domain_threshold(self, check: bool, threshold: Optional[float], rate: Optional[float]
                          ) -> Tuple[Optional[float], Optional[str]]:
        """The image check's threshold and where it comes from, in words."""
        own = self.spec.domain_threshold if check else None
        if threshold is None and rate is None:
            return own, "the model file's" if own is not None else None
        what = "a domain threshold" if threshold is not None else "a domain flag rate"
        if not check:
            raise ValueError(f"{what} needs the image check (domain_check=True)")
        if own is None:
            raise ModelError(f"{self.name}: has no domain statistics, so {what} cannot apply (add them "
                             "with python -m cxr_export.domain)")
        if threshold is not None:
            return float(threshold), "set by the caller"
        points = self.spec.domain_operating_points
        if not points:
            raise ModelError(f"{self.name}: has no domain operating points (exported before they were written); "
                             "pass a domain threshold instead (--domain-threshold S, domain_threshold=S: "
                             "cxr-bench domain --validation gives S for any file)")
        try:
            value = threshold_at(points, float(rate))
        except ValueError as e:
            raise ModelError(f"{self.name}: {e}") from None
        return value, f"flags {float(rate):.1%} of the file's validation images (its operating points)"

    @property
    def domain_threshold_overridden(self) -> bool:
        """True when the image check runs with another threshold than the model file's own (the run's
        results then name it: SR parameters and UIDs, FHIR Device)."""
        return self.domain_threshold is not None and self.domain_threshold != self.spec.domain_threshold

    @property
    def domain_available(self) -> bool:
        """True when predictions carry an out-of-domain check (the model has domain statistics)."""
        return self.domain_threshold is not None

    # ---- inference
    def _run_all(self, pixels: np.ndarray, heatmap: bool = False
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """``(probabilities (N, L), domain scores (N,) or None, domain terms (N, branches) or None,
        heatmaps (N, h, w) as the graph gives them, or None)`` for ``uint8`` pixels ``(N, H, W, 3)``."""
        n = len(pixels)
        outs = self.model.run(pixels, self._outputs + ([self._heatmap_output()] if heatmap else []))
        maps = np.asarray(outs.pop(), np.float32) if heatmap else None
        probs = np.asarray(outs[0], np.float64)
        if probs.shape != (n, len(self._labels)):
            raise ModelError(f"{self.name}: output {self.spec.prob_output!r} returned shape {probs.shape}, "
                             f"expected ({n}, {len(self._labels)})")
        scores = None
        if len(outs) > 1:
            scores = np.asarray(outs[1], np.float64).reshape(-1)
            if scores.shape != (n,):
                raise ModelError(f"{self.name}: output {self._outputs[1]!r} returned {scores.shape}, expected ({n},)")
        terms = np.asarray(outs[2], np.float64).reshape(n, -1) if len(outs) > 2 else None
        return probs, scores, terms, maps

    def _heatmap_output(self) -> str:
        name = self.spec.heatmap_output
        if not name:
            raise ModelError(f"{self.name}: has no heatmap output (add it: python -m cxr_export.heatmap MODEL.onnx)")
        return name

    @property
    def heatmap_available(self) -> bool:
        """True when the model file can explain its answers with a Grad-CAM heatmap."""
        return bool(self.spec.heatmap_output)

    def _image_reason(self, score: float, terms: Optional[np.ndarray]) -> str:
        """Why the image check flagged an image, naming the test that fired (the largest term)."""
        reason = f"image unlike the training X-rays (domain score {score:.3g} > {self.domain_threshold:.3g}"
        if terms is not None and len(terms) == len(self._branch_words) and len(terms):
            reason += f"; test that fired: {self._branch_words[int(np.argmax(terms))]}"
        return reason + ")"

    def _prediction(self, probs: np.ndarray, source: Optional[str], score: Optional[float] = None,
                    terms: Optional[np.ndarray] = None, header_reasons: Sequence[str] = (),
                    heatmap: Optional[np.ndarray] = None) -> Prediction:
        p = float(probs[self._pos])
        if p >= self.threshold:
            label = self._labels[self._pos]
        else:
            others = [i for i in range(len(self._labels)) if i != self._pos]
            label = self._labels[max(others, key=lambda i: probs[i])]
        reasons = list(header_reasons)
        image_checked = score is not None and self.domain_threshold is not None
        if image_checked and score > self.domain_threshold:
            reasons.append(self._image_reason(score, terms))
        in_domain = False if reasons else (True if image_checked else None)
        explained = None
        if heatmap is not None:  # a signed map: > 0 where the positive label's evidence lies, < 0 the other's
            signed = self._signed_maps and label != self._labels[self._pos]
            heatmap, explained = _unit_map(-heatmap if signed else heatmap), label if self._signed_maps \
                else self._labels[self._pos]
        return Prediction(label=label, probability=p, threshold=self.threshold,
                          probabilities=MappingProxyType({k: float(v) for k, v in zip(self._labels, probs)}),
                          source=source, in_domain=in_domain, domain_score=score, domain_reasons=tuple(reasons),
                          heatmap=heatmap, heatmap_label=explained)

    def preprocess(self, item: ImageSource) -> np.ndarray:
        """The ``uint8`` ``(H, W, 3)`` pixels this model sees for ``item``."""
        return load_image(item, self.spec.image_size, method=self.spec.resize_method)

    def header_reasons(self, header: Optional[Mapping[str, Any]]) -> List[str]:
        """Why a DICOM header puts its image outside the model's intended use ([] when it does not,
        or when the model has no ``intended_use``)."""
        return self.intended_use.header_reasons(header) if self.intended_use is not None else []

    def iter_predict(self, items: Iterable[ImageSource], batch_size: Optional[int] = None,
                     timing: Optional[MutableMapping[str, float]] = None, heatmap: bool = False
                     ) -> Iterator[Union[Prediction, InputError]]:
        """Yield a :class:`Prediction` or an :class:`InputError` per item, in order, batch by batch.

        ``timing``, when given, accumulates seconds under ``"preprocess"`` and ``"inference"``;
        ``heatmap=True`` fetches the Grad-CAM map too (:attr:`Prediction.heatmap`).
        """
        if heatmap:
            self._heatmap_output()  # a model without one: one clear error before any image is read
        size = int(batch_size or self.batch_size)
        if size < 1:
            raise ValueError("batch_size must be at least 1")
        batches = _chunks(items, size)
        if not self.prefetch:
            for batch in batches:
                yield from self._infer_batch(batch, self._load_batch(batch, timing), timing, heatmap)
            return
        # Decode batch k+1 in one worker thread while batch k runs (Pillow's decoders and the
        # inference engines release the GIL): see Classifier's ``prefetch``.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-decode") as pool:
            pending: Optional[Tuple[List[Any], Any]] = None
            for batch in batches:
                future = pool.submit(self._load_batch, batch, timing)
                if pending is not None:
                    yield from self._infer_batch(pending[0], pending[1].result(), timing, heatmap)
                pending = (batch, future)
            if pending is not None:
                yield from self._infer_batch(pending[0], pending[1].result(), timing, heatmap)

    def _load_batch(self, items: List[ImageSource], timing: Optional[MutableMapping[str, float]]
                    ) -> Tuple[List[Any], List[int], List[LoadedImage]]:
        """Decode ``items``: the results so far (an :class:`InputError` where one failed), the
        indices decoded and their :class:`LoadedImage`."""
        t0 = time.perf_counter()
        results: List[Any] = [None] * len(items)
        good: List[int] = []
        loaded: List[LoadedImage] = []
        for i, item in enumerate(items):
            try:
                loaded.append(self.loader.load(item))  # header checked before inference
            except InputError as exc:
                results[i] = exc
                continue
            good.append(i)
        if timing is not None:
            timing["preprocess"] = timing.get("preprocess", 0.0) + (time.perf_counter() - t0)
        return results, good, loaded

    def _infer_batch(self, items: List[ImageSource], loaded: Tuple[List[Any], List[int], List[LoadedImage]],
                     timing: Optional[MutableMapping[str, float]], heatmap: bool = False
                     ) -> List[Union[Prediction, InputError]]:
        results, good, images = loaded
        t1 = time.perf_counter()
        for i, prediction in zip(good, self.predict_loaded(images, heatmap)):
            results[i] = prediction
        if timing is not None:
            timing["inference"] = timing.get("inference", 0.0) + (time.perf_counter() - t1)
        return results

    def load(self, item: ImageSource) -> LoadedImage:
        """Decode one input for this model (:attr:`loader`); raises :class:`InputError`."""
        return self.loader.load(item)

    def predict_loaded(self, images: Sequence[LoadedImage], heatmap: bool = False) -> List[Prediction]:
        """Classify decoded images (:meth:`load`) in one model run; the same predictions as
        :meth:`predict` on their inputs. A service decodes each request as it arrives and runs
        the requests that wait together as one batch.

        Examples:
            >>> images = [clf.load(b) for b in bodies]                    # doctest: +SKIP
            >>> [p.label for p in clf.predict_loaded(images)]             # doctest: +SKIP
            ['NORMAL', 'PNEUMONIA']
        """
        if not images:
            return []
        if heatmap:
            self._heatmap_output()
        h, w = self.spec.image_size[1], self.spec.image_size[0]
        for image in images:
            if image.pixels.shape != (h, w, 3) or image.pixels.dtype != np.uint8:
                raise ValueError(f"pixels of shape {image.pixels.shape} ({image.pixels.dtype}): this model takes "
                                 f"uint8 ({h}, {w}, 3); decode with Classifier.load")
        probs, scores, terms, maps = self._run_all(np.stack([image.pixels for image in images]), heatmap)
        return [self._prediction(row, image.source, None if scores is None else float(scores[k]),
                                 None if terms is None else terms[k], image.header_reasons,
                                 None if maps is None else maps[k])
                for k, (row, image) in enumerate(zip(probs, images))]

    def predict_many(self, items: Iterable[ImageSource], batch_size: Optional[int] = None, heatmap: bool = False
                     ) -> List[Union[Prediction, InputError]]:
        """Classify every item; a bad item gives its :class:`InputError` in its place, the rest go on.

        Examples:
            >>> [type(r).__name__ for r in clf.predict_many(["ok.jpeg", "missing.jpeg"])]  # doctest: +SKIP
            ['Prediction', 'InputError']
        """
        return list(self.iter_predict(items, batch_size, heatmap=heatmap))

    @overload
    def predict(self, x: Union[List[ImageSource], tuple], batch_size: Optional[int] = ...,
                errors: str = ..., heatmap: bool = ...) -> List[Any]: ...

    @overload
    def predict(self, x: ImageSource, batch_size: Optional[int] = ..., errors: str = ...,
                heatmap: bool = ...) -> Prediction: ...

    def predict(self, x: Any, batch_size: Optional[int] = None, errors: str = "raise", heatmap: bool = False) -> Any:
        """Classify one image (path, bytes, PIL image, numpy array) or a list of them.

        A list gives a list in the same order, batched by ``batch_size``. With
        ``errors="raise"`` the first bad input raises :class:`InputError`; with
        ``errors="return"`` it takes that input's place in the list. ``heatmap=True`` adds the
        Grad-CAM map (:attr:`Prediction.heatmap`); without it the map is not fetched (onnxruntime
        still runs the graph's Grad-CAM nodes: it runs every node, whatever outputs are asked for).

        Examples:
            >>> clf.predict("chest.jpeg").label                       # doctest: +SKIP
            'PNEUMONIA'
        """
        if errors not in ("raise", "return"):
            raise ValueError("errors must be 'raise' or 'return'")
        if isinstance(x, (list, tuple)):
            results = self.predict_many(x, batch_size, heatmap=heatmap)
            if errors == "raise":
                for r in results:
                    if isinstance(r, InputError):
                        raise r
            return results
        if heatmap:
            self._heatmap_output()
        result = self._infer_batch([x], self._load_batch([x], None), None, heatmap)[0]
        if isinstance(result, InputError):
            if errors == "raise":
                raise result
        return result

    # ---- description
    def info(self) -> Dict[str, Any]:
        """What this classifier runs: the model file, its checks, graph inputs/outputs, providers,
        threads and the whole spec (``cxr-infer --info --json``; :func:`cxr_infer.info.summary` for people)."""
        spec, use, heatmap, domain = self.spec, self.intended_use, self.spec.heatmap, self.spec.domain
        if use is not None:
            header = {"header_checks": True, "summary": use.describe(), **spec.to_dict()["intended_use"]}
        else:
            header = {"header_checks": False, "reason": "turned off (header_check=False)" if spec.intended_use else
                      "the model file has no intended_use block, so DICOM header checks are off "
                      "(cxr-export writes one)"}
        if heatmap is not None:
            maps = {"available": True, "output": heatmap.output, "grid": list(heatmap.grid) if heatmap.grid else None,
                    "method": heatmap.method, "layer": heatmap.layer, "signed": heatmap.signed,
                    "computed": "only when asked for" if heatmap.switch else "on every call",
                    "use": "predict(..., heatmap=True) or cxr-infer --heatmap DIR; model attention, not a localisation"}
        else:
            maps = {"available": False, "reason": "the model file has no heatmap output (add it with python -m "
                                                  "cxr_export.heatmap MODEL.onnx)"}
        if self.domain_available and domain is not None:
            check = {"available": True, "threshold": self.domain_threshold,
                     "threshold_source": self.domain_threshold_source, "output": spec.domain_output,
                     "flags_of_in_domain_validation": domain.flag_rate_validation,
                     "operating_points": [{"flag_rate": r, "threshold": t} for r, t in domain.operating_points],
                     "branches": [b.name for b in domain.branches]}
        else:
            check = {"available": False, "reason": "turned off (domain_check=False)" if domain is not None else
                     "the model file has no domain statistics (add them with python -m cxr_export.domain)"}
        return {"model": self.model_path or self.name, "providers": self.providers, "threads": self.threads,
                "threshold": self.threshold, "intended_use": header, "heatmap": maps, "domain_check": check,
                **self.model.describe_io(), "spec": spec.to_dict()}

    def __repr__(self) -> str:
        return (f"Classifier(model={self.name!r}, backbone={self.spec.backbone!r}, precision={self.spec.precision!r}, "
                f"device={self.device!r}, threads={self.threads})")
