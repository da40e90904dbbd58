"""The one way to open and run a cxr model file (torch-free): :class:`ModelFile`.

Everything that runs a ``.onnx`` file goes through here: the :class:`~cxr_infer.Classifier`,
the export checks (PyTorch parity, the INT8 gate, domain statistics, FP16 parity) and every
``cxr-bench`` command. It opens the file (session options, threads, execution providers with
clear device errors), reads and validates the spec, checks the graph against it, builds the
graph input from ``uint8`` pixels (:func:`graph_input`: FP32 or FP16, normalisation in the
graph or not) and runs the named outputs a caller asks for, and only those.

Example:
    >>> m = ModelFile("resnet50_int8.onnx", threads=2)                    # doctest: +SKIP
    >>> probs, score = m.run(pixels, [m.spec.prob_output, "domain_score"])  # doctest: +SKIP
    >>> m.positive_probability(pixels)[:2]                               # doctest: +SKIP
    array([0.973, 0.041])
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import DeviceError, ModelError
from .ov_session import OPENVINO_ENGINE, OpenVINOSession, openvino_runtime
from .preprocess import to_input
from .spec import ModelSpec, spec_from_metadata

DEVICES = ("cpu", "cuda", "openvino", "auto")
#: onnxruntime session config entries set by default. Worker threads that spin while idle burn
#: cores the host application needs; on a shared 2-core CPU, turning spinning off made an INT8
#: ResNet50 run faster (about 55 vs 95 ms) as well. ``session_config`` overrides these.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_ORT_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}

ModelSource = Union[str, "os.PathLike[str]", bytes]


def available_threads() -> int:
    """CPU cores this process may run on (container CPU sets included; ``os.cpu_count`` ignores them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: What ``ModelFile.providers`` lists for a session the OpenVINO runtime runs (``device="openvino"``).
OPENVINO_PROVIDER = OPENVINO_ENGINE
#: Where OpenVINO keeps compiled models (a second session of the same file skips most of the
#: compilation); ``$CXR_OPENVINO_CACHE`` overrides it, and an empty value or ``0`` turns it off.
OPENVINO_CACHE = Path.home() / ".cache" / "cxr" / "openvino"
#: ``auto`` on a CPU takes OpenVINO (where ``pip install 'cxr[openvino]'`` put it) for an embedded
#: :class:`~cxr_infer.Classifier` (one session, many images) and for a run of at least this many
#: images; fewer take the onnxruntime CPU provider. OpenVINO costs more once per process (``import
#: openvino`` about 0.14 s, compiling 0.05-0.2 s from a warm cache) and saves 1.4-2.7 ms per image:
#: whole ``cxr-infer`` runs break even at about 85 (VGG16), 135 (ResNet50) and 100 (InceptionV3)
#: images on a 2-core AMD EPYC (README, "The fastest CPU path": measured, paired runs).
AUTO_OPENVINO_MIN_IMAGES = 128


def openvino_cache_dir() -> Optional[Path]:
    """OpenVINO's model cache folder (see :data:`OPENVINO_CACHE`), or None when turned off."""
    value = os.environ.get("CXR_OPENVINO_CACHE")
    if value is None:
        return OPENVINO_CACHE
    return None if value.strip() in ("", "0") else Path(value).expanduser()


def tensorrt_cache_dir() -> Path:
    """TensorRT's engine cache folder: ``$CXR_TRT_CACHE``, default ``~/.cache/cxr/tensorrt``."""
    return Path(os.environ.get("CXR_TRT_CACHE", Path.home() / ".cache" / "cxr" / "tensorrt"))


def openvino_available() -> bool:
    """True when ``device="openvino"`` can run here (the ``openvino`` package is installed and
    offers the CPU)."""
    try:
        openvino_runtime()
    except DeviceError:
        return False
    return True


def resolve_device(device: str, available: Sequence[str], images: Optional[int] = None) -> str:
    """The device ``device`` stands for: ``auto`` becomes ``cuda`` where a CUDA provider exists,
    else ``openvino`` where the OpenVINO runtime is installed and the run is long (``images`` is None: an
    embedded classifier; or at least :data:`AUTO_OPENVINO_MIN_IMAGES`), else ``cpu``.

    Example:
        >>> resolve_device("auto", ["CPUExecutionProvider"], images=1)
        'cpu'
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if device != "auto":
        return device
    if "CUDAExecutionProvider" in available:
        return "cuda"
    if (images is None or images >= AUTO_OPENVINO_MIN_IMAGES) and openvino_available():
        return "openvino"
    return "cpu"


def providers_for(device: str, available: Sequence[str], images: Optional[int] = None) -> List[Any]:
    """The onnxruntime execution providers for ``device`` (``cpu``, ``cuda``, ``openvino`` or ``auto``).

    ``cuda`` takes TensorRT first when present (engine cache in ``$CXR_TRT_CACHE``, default
    ``~/.cache/cxr/tensorrt``; ``CXR_TENSORRT=0`` skips it), then CUDA, then CPU for any op
    they lack; ``openvino`` is the OpenVINO runtime on the CPU (:data:`OPENVINO_PROVIDER`, not
    an onnxruntime provider: :class:`ModelFile` compiles the file with OpenVINO itself, with its
    threads and model cache :func:`openvino_cache_dir`); ``auto``: see :func:`resolve_device`.

    Example:
        >>> providers_for("auto", ["CPUExecutionProvider"], images=1)
        ['CPUExecutionProvider']
    """
    device = resolve_device(device, available, images)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "openvino":
        openvino_runtime()  # one clear error where the runtime is missing
        return [OPENVINO_PROVIDER]
    if "CUDAExecutionProvider" not in available:
        raise DeviceError("device 'cuda' requested but this onnxruntime has no CUDA provider "
                          f"(available: {', '.join(available) or 'none'}); install the GPU build: "
                          "pip uninstall onnxruntime && pip install 'cxr[gpu]'")
    providers: List[Any] = []
    if "TensorrtExecutionProvider" in available and os.environ.get("CXR_TENSORRT", "1") != "0":
        cache = tensorrt_cache_dir()
        providers.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache)}))
    return providers + ["CUDAExecutionProvider", "CPUExecutionProvider"]


@contextlib.contextmanager
def _cache_lock(cache: Optional[str]) -> Iterator[bool]:
    """Hold an exclusive lock on ``cache/.lock`` while a session compiles into the cache folder, so
    two processes sharing it never read each other's half-written blobs (the second one then finds
    the first one's blob complete). Yields whether the folder is usable: False where it cannot be
    made (the session then compiles without a cache) or where there is none."""
    if not cache:
        yield False
        return
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError:
        yield False
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: OpenVINO's own cache handling alone
        yield True
        return
    try:
        fd = os.open(str(Path(cache) / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield True
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def session_options(threads: int, config: Optional[Mapping[str, str]] = None) -> Any:
    """Session options of every cxr session: ``threads`` intra-op, one inter-op, sequential,
    all graph optimisations, quiet logs, :data:`SESSION_CONFIG` updated by ``config``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for key, value in dict(SESSION_CONFIG, **(config or {})).items():
        opts.add_session_config_entry(key, str(value))
    return opts


def ort_message(exc: BaseException, name: str) -> str:
    """onnxruntime's message in one short line, without its status-code prefix."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = text.replace(f"Load model from {name} failed:", "").strip()
    return text[:300] or type(exc).__name__


def graph_input(spec: ModelSpec, pixels: np.ndarray) -> np.ndarray:
    """The graph input for ``uint8`` pixels ``(N, H, W, 3)`` (or one ``(H, W, 3)``): NCHW in the
    spec's input dtype, normalised with the spec's mean and std unless the graph normalises.

    Example:
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
    """An opened cxr model file: validated spec, onnxruntime session, graph input, named outputs.

    Args:
        model: path of a ``.onnx`` file with a ``cxr.spec`` (or its bytes).
        device: ``"cpu"``, ``"cuda"`` (TensorRT, then CUDA when present), ``"openvino"`` (the
            OpenVINO runtime on the CPU: ``pip install 'cxr[openvino]'``) or ``"auto"``.
        threads: intra-op threads; ``None`` or 0: the cores this process may use.
        providers: onnxruntime execution providers, overriding ``device`` (advanced).
        session_config: extra onnxruntime session config entries (advanced).
        spec: use this spec instead of the file's own (export checks a graph before it has
            written the spec into it); it is validated against the graph all the same.
        images: how many images this session will run, when known: ``auto`` takes the CPU
            provider below :data:`AUTO_OPENVINO_MIN_IMAGES` (see :func:`resolve_device`).

    Raises:
        ModelError: the file is missing, not ONNX, or has no valid spec or the wrong graph.
        DeviceError: the device's execution provider is not available.

    Example:
        >>> m = ModelFile("model.onnx", threads=1)                            # doctest: +SKIP
        >>> (m.spec.backbone, m.providers, m.static_batch)                     # doctest: +SKIP
        ('vgg16', ['CPUExecutionProvider'], None)
    """

    def __init__(self, model: ModelSource, device: str = "cpu", threads: Optional[int] = None,
                 providers: Optional[Sequence[Any]] = None, session_config: Optional[Mapping[str, str]] = None,
                 spec: Optional[ModelSpec] = None, images: Optional[int] = None) -> None:
        import onnxruntime as ort

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
        available = ort.get_available_providers()
        requested = device
        if providers is None:
            requested = resolve_device(device, available, images)
            providers = providers_for(requested, available)
        started = time.perf_counter()
        self.session: Any
        if OPENVINO_PROVIDER in [p if isinstance(p, str) else p[0] for p in providers]:
            cache = openvino_cache_dir()
            with _cache_lock(str(cache) if cache else None) as usable:
                self.session = OpenVINOSession(load_from, self.threads, str(cache) if usable else None, self.name)
        else:
            try:
                self.session = ort.InferenceSession(load_from, sess_options=session_options(self.threads,
                                                                                            session_config),
                                                    providers=providers)
            except Exception as exc:  # onnxruntime raises several unrelated types here
                raise ModelError(f"{self.name}: not a loadable ONNX model ({ort_message(exc, self.name)})") from None
        #: seconds onnxruntime took to build the session
        self.load_s = time.perf_counter() - started
        self.providers: List[str] = list(self.session.get_providers())
        if requested == "cuda" and not any(p in self.providers for p in GPU_PROVIDERS):
            raise DeviceError("device 'cuda' requested but onnxruntime could not start its CUDA provider "
                              "(check the CUDA and cuDNN libraries match onnxruntime-gpu)")
        #: where the session runs: "cpu", "cuda" or "openvino" (what "auto" became)
        self.device = {"CPUExecutionProvider": "cpu", OPENVINO_PROVIDER: "openvino"}.get(self.providers[0], "cuda")
        if spec is None:
            spec = spec_from_metadata(self.session.get_modelmeta().custom_metadata_map, self.name)
        else:
            spec.validate(self.name)
        self.spec: ModelSpec = spec
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
        extra = [n for n in inputs if n != spec.input_name]
        if extra:
            raise ModelError(f"{name}: the graph has unexpected extra inputs {extra}; "
                             "a cxr model takes one image batch")
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
        for role, out_name in (("probabilities", spec.prob_output), ("features", spec.features_output),
                               ("domain score", spec.domain_output)):
            if out_name and out_name not in outputs:
                raise ModelError(f"{name}: the graph has no {role} output {out_name!r} named by its spec "
                                 f"(outputs: {', '.join(outputs)})")
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
        try:
            results = [self.session.run(list(outputs), {self.spec.input_name: chunk}) for chunk in chunks]
        except Exception as exc:  # onnxruntime's own error types
            raise ModelError(f"{self.name}: inference failed ({ort_message(exc, self.name)})") from None
        if len(results) == 1:
            return [np.asarray(v)[:n] for v in results[0]]
        return [np.concatenate([np.asarray(r[j]) for r in results])[:n] for j in range(len(outputs))]

    def run(self, pixels: np.ndarray, outputs: Sequence[str], batch_size: Optional[int] = None) -> List[np.ndarray]:
        """The named ``outputs`` for ``uint8`` pixels ``(N, H, W, 3)``, ``batch_size`` images per call.

        Example:
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
