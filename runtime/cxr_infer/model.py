"""The one way to open and run a cxr model file (torch-free): :class:`ModelFile`.

Everything that runs a ``.onnx`` file goes through here: the :class:`~cxr_infer.Classifier`,
the export checks (PyTorch parity, the INT8 gate, domain statistics, FP16 parity) and every
``cxr-bench`` command. It opens the file (session options, threads, execution providers with
clear device errors), reads and validates the spec, checks the graph against it, builds the
graph input from ``uint8`` pixels (:func:`graph_input`: FP32 or FP16, normalisation in the
graph or not) and runs the named outputs a caller asks for, and only those.

Examples:
    >>> m = ModelFile("resnet50_int8.onnx", threads=2)                    # doctest: +SKIP
    >>> probs, score = m.run(pixels, [m.spec.prob_output, "domain_score"])  # doctest: +SKIP
    >>> m.positive_probability(pixels)[:2]                               # doctest: +SKIP
    array([0.973, 0.041])
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .devices import (
    SessionRequest,
    available_threads,
    device_of,
    get_device,
    ort_message,
    resolve_device,
)
from .devices import open_onnxruntime as _open_with_providers
from .errors import ModelError
from .preprocess import to_input
from .spec import ModelSpec, spec_from_metadata

_ORT_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}

ModelSource = Union[str, "os.PathLike[str]", bytes]


def graph_input(spec: ModelSpec, pixels: np.ndarray) -> np.ndarray:
    """The graph input for ``uint8`` pixels ``(N, H, W, 3)`` (or one ``(H, W, 3)``): NCHW in the
    spec's input dtype, normalised with the spec's mean and std unless the graph normalises.

    Examples:
        >>> spec = ModelSpec.new(backbone="tiny")
        >>> graph_input(spec, np.full((1, 224, 224, 3), 255, np.uint8))[0, :, 0, 0].round(3)
        array([2.249, 2.429, 2.64 ], dtype=float32)
    """
    dtype = _NP_DTYPES[spec.input_dtype]
    px = np.asarray(pixels)
    if px.ndim == 3:
        px = px[None]
    if spec.normalization_in_graph:
        return np.ascontiguousarray(px.transpose(0, 3, 1, 2), dtype=dtype)
    x = to_input(px, spec.mean, spec.std)
    return x if dtype is np.float32 else x.astype(dtype)


def _shape(value: Any) -> List[Any]:
    return list(value.shape) if getattr(value, "shape", None) is not None else []


class ModelFile:
    """An opened cxr model file: validated spec, session, graph input, named outputs.

    Args:
        model: path of a ``.onnx`` file with a ``cxr.spec`` (or its bytes).
        device: a name in :data:`cxr_infer.devices.DEVICES` (``"cpu"``, ``"cuda"``, ``"tensorrt"``,
            ``"openvino"``) or ``"auto"`` (:func:`cxr_infer.devices.resolve_device`).
        threads: intra-op threads; ``None`` or 0: the cores this process may use.
        providers: onnxruntime execution providers, overriding ``device`` (advanced).
        session_config: extra onnxruntime session config entries (advanced).
        spec: use this spec instead of the file's own (export checks a graph before it has
            written the spec into it); it is validated against the graph all the same.
        images: how many images the session will run, when known: ``auto`` takes the CPU
            provider below :data:`cxr_infer.devices.AUTO_OPENVINO_MIN_IMAGES`.

    Raises:
        ModelError: the file is missing, not ONNX, or has no valid spec or the wrong graph.
        DeviceError: the device's execution provider is not available.

    Examples:
        >>> m = ModelFile("model.onnx", threads=1)                            # doctest: +SKIP
        >>> (m.spec.backbone, m.providers, m.static_batch)                     # doctest: +SKIP
        ('vgg16', ['CPUExecutionProvider'], None)
    """

    def __init__(self, model: ModelSource, device: str = "cpu", threads: Optional[int] = None,
                 providers: Optional[Sequence[Any]] = None, session_config: Optional[Mapping[str, str]] = None,
                 spec: Optional[ModelSpec] = None, images: Optional[int] = None) -> None:
        self.path: Optional[Path] = None
        if isinstance(model, (bytes, bytearray)):
            self.name, load_from = "<model bytes>", bytes(model)
        else:
            path = Path(model)
            self.name = str(path)
            if not path.exists():
                raise ModelError(f"{path}: no such model file (pass the path of a .onnx file made by cxr-export)")
            if not path.is_file():
                raise ModelError(f"{path}: is not a file; pass the .onnx file itself")
            self.path, load_from = path, str(path)
        self.threads = int(threads) if threads else available_threads()
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        request = SessionRequest(load_from, self.name, self.threads, dict(session_config or {}))
        started = time.perf_counter()
        self.session: Any
        if providers is not None:
            self.session = _open_with_providers(request, providers)
        else:
            self.session = get_device(resolve_device(device, images=images)).open_session(request)
        #: seconds the engine took to build the session
        self.load_s = time.perf_counter() - started
        #: what runs the graph: onnxruntime's execution providers, or ``["OpenVINO"]``
        self.providers: List[str] = list(self.session.get_providers())
        #: where the session runs: a name in :data:`cxr_infer.devices.DEVICES` (what "auto" became)
        self.device = device_of(self.providers)
        if spec is None:
            spec = spec_from_metadata(self.session.get_modelmeta().custom_metadata_map, self.name)
        else:
            spec.validate(self.name)
        self.spec: ModelSpec = spec
        self._switches = spec.switches  # boolean inputs fed true only when an output they gate is asked for
        #: the graph's fixed batch size, or None when the batch dimension is dynamic
        self.static_batch = self._check_graph()
        self.output_names = [o.name for o in self.session.get_outputs()]

    # ---- loading checks
    def _check_graph(self) -> Optional[int]:
        """Check the graph against the spec; return the static batch size, if the graph has one."""
        spec, name = self.spec, self.name
        inputs = {i.name: i for i in self.session.get_inputs()}
        if spec.input_name not in inputs:
            raise ModelError(f"{name}: the graph has no input {spec.input_name!r} named by its spec "
                             f"(inputs: {', '.join(inputs) or 'none'})")
        extra = [n for n in inputs if n != spec.input_name and n not in spec.switches]
        if extra:
            raise ModelError(f"{name}: the graph has unexpected extra inputs {extra}; "
                             "a cxr model takes one image batch")
        missing = [n for n in spec.switches if n not in inputs]
        if missing:
            raise ModelError(f"{name}: the graph has no input {missing[0]!r} named by its spec as a switch")
        inp = inputs[spec.input_name]
        shape = _shape(inp)
        width, height = spec.image_size
        expected = [None, 3, height, width]
        if not (len(shape) == 4 and all(not isinstance(d, int) or e is None or d == e
                                        for d, e in zip(shape, expected))):
            raise ModelError(f"{name}: input {inp.name!r} has shape {shape}, "
                             f"expected [N, 3, {height}, {width}] as its spec says")
        if inp.type != _ORT_DTYPES[spec.input_dtype]:
            raise ModelError(f"{name}: input {inp.name!r} is {inp.type}, but its spec says {spec.input_dtype}")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for role, out_name in spec.outputs.named.items():
            if out_name not in outputs:
                raise ModelError(f"{name}: the graph has no {role.replace('_', ' ')} output {out_name!r} named by its "
                                 f"spec (outputs: {', '.join(outputs)})")
        prob_shape = _shape(outputs[spec.prob_output])
        n_labels = len(spec.labels)
        if len(prob_shape) != 2 or (isinstance(prob_shape[1], int) and prob_shape[1] != n_labels):
            raise ModelError(f"{name}: output {spec.prob_output!r} has shape {prob_shape}, expected [N, {n_labels}] "
                             f"for labels {spec.labels}")
        return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    # ---- inputs
    @property
    def input_dtype(self) -> Any:
        """The numpy dtype of the graph input (``float32`` or ``float16``)."""
        return _NP_DTYPES[self.spec.input_dtype]

    def graph_input(self, pixels: np.ndarray) -> np.ndarray:
        """This model's graph input for ``uint8`` pixels ``(N, H, W, 3)``: see :func:`graph_input`."""
        return graph_input(self.spec, pixels)

    # ---- running
    def run_input(self, x: np.ndarray, outputs: Sequence[str]) -> List[np.ndarray]:
        """The named ``outputs`` for a ready graph input ``x`` (N first), in that order.

        A graph with a fixed batch runs in chunks of it, the last one padded (and cut off again).
        """
        missing = [o for o in outputs if o not in self.output_names]
        if missing:
            raise ModelError(f"{self.name}: the graph has no output {missing[0]!r} "
                             f"(outputs: {', '.join(self.output_names)})")
        n = x.shape[0]
        chunks = [x]
        if self.static_batch is not None and n != self.static_batch:
            size = self.static_batch
            chunks = []
            for start in range(0, n, size):
                chunk = x[start:start + size]
                if chunk.shape[0] < size:
                    chunk = np.concatenate([chunk, np.zeros((size - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])
                chunks.append(chunk)
        feeds = {switch: np.array(any(o in outputs for o in gated)) for switch, gated in self._switches.items()}
        try:
            results = [self.session.run(list(outputs), {self.spec.input_name: chunk, **feeds}) for chunk in chunks]
        except Exception as exc:  # onnxruntime's own error types
            raise ModelError(f"{self.name}: inference failed ({ort_message(exc, self.name)})") from None
        if len(results) == 1:
            return [np.asarray(v)[:n] for v in results[0]]
        return [np.concatenate([np.asarray(r[j]) for r in results])[:n] for j in range(len(outputs))]

    def run(self, pixels: np.ndarray, outputs: Sequence[str], batch_size: Optional[int] = None) -> List[np.ndarray]:
        """The named ``outputs`` for ``uint8`` pixels ``(N, H, W, 3)``, ``batch_size`` images per call.

        Examples:
            >>> (probs,) = m.run(np.zeros((4, 224, 224, 3), np.uint8), ["probabilities"])  # doctest: +SKIP
            >>> probs.shape                                                                  # doctest: +SKIP
            (4, 2)
        """
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        step = int(batch_size or max(len(pixels), 1))
        parts = [self.run_input(self.graph_input(pixels[i:i + step]), outputs) for i in range(0, len(pixels), step)]
        if not parts:
            return [np.zeros((0,)) for _ in outputs]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]

    def positive_probability(self, pixels: np.ndarray, batch_size: Optional[int] = 32) -> np.ndarray:
        """The probability of the spec's positive label (float64, ``(N,)``) for ``uint8`` pixels."""
        (probs,) = self.run(pixels, [self.spec.prob_output], batch_size)
        if len(probs) == 0:
            return np.zeros(0)
        return np.asarray(probs, np.float64)[:, self.spec.positive_index]

    # ---- description
    def describe_io(self) -> Dict[str, List[Dict[str, Any]]]:
        """The graph's inputs and outputs: name, shape and element type."""
        return {"inputs": [{"name": i.name, "shape": _shape(i), "type": i.type} for i in self.session.get_inputs()],
                "outputs": [{"name": o.name, "shape": _shape(o), "type": o.type} for o in self.session.get_outputs()]}

    def __repr__(self) -> str:
        return (f"ModelFile({self.name!r}, backbone={self.spec.backbone!r}, precision={self.spec.precision!r}, "
                f"providers={self.providers}, threads={self.threads})")
