"""Where a model file runs: the device registry, read by every caller that offers a device.

One :class:`Device` entry per device: its engine (onnxruntime or OpenVINO), a one-line
description, whether it can run here (or the one line saying what to install) and how it opens a
session. Every command's ``--device``, the Classifier, ModelFile and ``cxr-bench`` read
:data:`DEVICES`. ``auto`` is a rule, not a device (:func:`resolve_device`).

Examples:
    >>> sorted(DEVICES)
    ['cpu', 'cuda', 'openvino', 'tensorrt']
    >>> resolve_device("auto", available=["CPUExecutionProvider"], images=1)
    'cpu'
    >>> DEVICES["cuda"].missing(available=["CPUExecutionProvider"]).startswith("device 'cuda'")
    True
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import DeviceError, ModelError

#: onnxruntime session config entries set by default: worker threads that spin while idle burn cores
#: the host application needs (and on a shared 2-core CPU made an INT8 ResNet50 slower, 95 vs 55 ms).
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
#: Where OpenVINO keeps compiled models (another session of the same file skips most of the
#: compilation); ``$CXR_OPENVINO_CACHE`` overrides it, and an empty value or ``0`` turns it off.
OPENVINO_CACHE = Path.home() / ".cache" / "cxr" / "openvino"
#: ``auto`` on a CPU takes OpenVINO, where installed, for an embedded Classifier and for runs of at
#: least this many images: it starts slower and runs faster (break-even 85-135 images measured on a
#: 2-core AMD EPYC; docs/engines.md).
AUTO_OPENVINO_MIN_IMAGES = 128
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_INSTALL = "pip uninstall onnxruntime && pip install 'cxr[gpu]'"

Session = Any  # an onnxruntime.InferenceSession or an OpenVINOSession: the same surface


@dataclass(frozen=True)
class SessionRequest:
    """What opening a session needs: the model (path or bytes), how errors name it, threads,
    extra onnxruntime config entries, and optional TensorRT profile hints (input name, ``(width,
    height)``, largest batch, precision) for the ``tensorrt`` device."""

    source: Any
    name: str
    threads: int
    session_config: Mapping[str, str] = field(default_factory=dict)
    input_name: Optional[str] = None
    image_size: Optional[Tuple[int, int]] = None
    max_batch: Optional[int] = None
    precision: Optional[str] = None


@dataclass(frozen=True)
class Device:
    """One place a model file can run.

    Attributes:
        name: what ``--device`` and ``Classifier(device=...)`` take.
        engine: ``onnxruntime`` or ``openvino``.
        description: one line for ``--help`` and the docs.
        check: ``check(available)`` -> None when the device can run here, else the one line that
            says why not and what to install (``available``: onnxruntime's providers).
        providers: ``providers(request, available)`` -> onnxruntime's execution providers, in
            order (onnxruntime devices only).
        open: ``open(device, request, available)`` -> a session; defaults to onnxruntime's.
        started: the providers a session of this device must report, one of them at least (a GPU
            device whose libraries fail to load falls back to the CPU silently otherwise).
    """

    name: str
    engine: str
    description: str
    check: Callable[[Sequence[str]], Optional[str]]
    providers: Callable[[SessionRequest, Sequence[str]], List[Any]] = lambda request, available: [CPU_PROVIDER]
    open: Optional[Callable[["Device", SessionRequest, Sequence[str]], Session]] = None
    started: Tuple[str, ...] = ()

    def missing(self, available: Optional[Sequence[str]] = None) -> Optional[str]:
        """None when this device can run here, else why not, in one line."""
        return self.check(onnxruntime_providers() if available is None else available)

    def open_session(self, request: SessionRequest, available: Optional[Sequence[str]] = None) -> Session:
        """A session of ``request`` on this device (:class:`DeviceError` where it cannot run here)."""
        available = onnxruntime_providers() if available is None else available
        reason = self.check(available)
        if reason:
            raise DeviceError(reason)
        session = (self.open or _open_onnxruntime)(self, request, available)
        if self.started and not any(p in self.started for p in session.get_providers()):
            raise DeviceError(f"device {self.name!r} requested but onnxruntime could not start its provider "
                              "(check the CUDA and cuDNN libraries match onnxruntime-gpu)")
        return session


def onnxruntime_providers() -> List[str]:
    """The execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def available_threads() -> int:
    """CPU cores this process may run on (container CPU sets included; ``os.cpu_count`` ignores them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def openvino_cache_dir() -> Optional[Path]:
    """OpenVINO's model cache folder (see :data:`OPENVINO_CACHE`), or None when turned off."""
    value = os.environ.get("CXR_OPENVINO_CACHE")
    if value is None:
        return OPENVINO_CACHE
    return None if value.strip() in ("", "0") else Path(value).expanduser()


def tensorrt_cache_dir() -> Path:
    """TensorRT's engine cache folder: ``$CXR_TRT_CACHE``, default ``~/.cache/cxr/tensorrt``."""
    return Path(os.environ.get("CXR_TRT_CACHE", Path.home() / ".cache" / "cxr" / "tensorrt"))


def session_options(threads: int, config: Optional[Mapping[str, str]] = None) -> Any:
    """Session options of every cxr onnxruntime session: ``threads`` intra-op, one inter-op,
    sequential, all graph optimisations, quiet logs, :data:`SESSION_CONFIG` updated by ``config``."""
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


def open_onnxruntime(request: SessionRequest, providers: Sequence[Any]) -> Session:
    """An onnxruntime session of ``request`` with these execution providers (:class:`ModelError`
    naming the model when onnxruntime cannot load it)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(request.source, sess_options=session_options(request.threads,
                                                                                  request.session_config),
                                    providers=list(providers))
    except Exception as exc:  # onnxruntime raises several unrelated types here
        raise ModelError(f"{request.name}: not a loadable ONNX model ({ort_message(exc, request.name)})") from None


def _open_onnxruntime(device: Device, request: SessionRequest, available: Sequence[str]) -> Session:
    return open_onnxruntime(request, device.providers(request, available))


@contextlib.contextmanager
def cache_lock(cache: Optional[str]) -> Iterator[bool]:
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


def _open_openvino(device: Device, request: SessionRequest, available: Sequence[str]) -> Session:
    from .ov_session import OpenVINOSession

    cache = openvino_cache_dir()
    with cache_lock(str(cache) if cache else None) as usable:
        return OpenVINOSession(request.source, request.threads, str(cache) if usable else None, request.name)


def _openvino_missing(available: Sequence[str]) -> Optional[str]:
    from .ov_session import openvino_runtime

    try:
        openvino_runtime()
    except DeviceError as exc:
        return str(exc)
    return None


def _provider_missing(device: str, provider: str, install: str) -> Callable[[Sequence[str]], Optional[str]]:
    def check(available: Sequence[str]) -> Optional[str]:
        if provider in available:
            return None
        return (f"device {device!r} requested but this onnxruntime has no {provider} "
                f"(available: {', '.join(available) or 'none'}); {install}")
    return check


def tensorrt_options(request: SessionRequest) -> Dict[str, Any]:
    """TensorRT provider options: the engine cache, and with profile hints, FP16/INT8 kernels by the
    file's precision and an optimisation profile from batch 1 to ``max_batch``."""
    cache = tensorrt_cache_dir()
    options: Dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    if request.precision is not None:
        cache.mkdir(parents=True, exist_ok=True)
        options.update(trt_fp16_enable=request.precision in ("fp16", "int8"),
                       trt_int8_enable=request.precision == "int8")
    if request.input_name and request.image_size and request.max_batch:
        w, h = request.image_size
        for key, n in (("min", 1), ("opt", request.max_batch), ("max", request.max_batch)):
            options[f"trt_profile_{key}_shapes"] = f"{request.input_name}:{n}x3x{h}x{w}"
    return options


def _cuda_providers(request: SessionRequest, available: Sequence[str]) -> List[Any]:
    providers: List[Any] = []
    if TENSORRT_PROVIDER in available and os.environ.get("CXR_TENSORRT", "1") != "0":
        providers.append((TENSORRT_PROVIDER, tensorrt_options(request)))
    return providers + [CUDA_PROVIDER, CPU_PROVIDER]


DEVICES: Dict[str, Device] = {d.name: d for d in (
    Device("cpu", "onnxruntime", "the onnxruntime CPU provider (the default)", check=lambda available: None),
    Device("cuda", "onnxruntime", "an NVIDIA GPU: TensorRT first where present (CXR_TENSORRT=0 skips it), then CUDA",
           check=_provider_missing("cuda", CUDA_PROVIDER, f"install the GPU build: {GPU_INSTALL}"),
           providers=_cuda_providers, started=(CUDA_PROVIDER, TENSORRT_PROVIDER)),
    Device("tensorrt", "onnxruntime", "an NVIDIA GPU through TensorRT alone (then CUDA for ops it lacks)",
           check=_provider_missing("tensorrt", TENSORRT_PROVIDER,
                                   f"onnxruntime-gpu with the TensorRT libraries provides it: {GPU_INSTALL}"),
           providers=lambda request, available: [(TENSORRT_PROVIDER, tensorrt_options(request)), CUDA_PROVIDER,
                                                 CPU_PROVIDER],
           started=(TENSORRT_PROVIDER,)),
    Device("openvino", "openvino", "the OpenVINO runtime on the CPU, Intel or AMD: pip install 'cxr[openvino]'",
           check=_openvino_missing, open=_open_openvino),
)}

#: What ``--device`` accepts: every registered device, and the ``auto`` rule.
AUTO = "auto"


def device_choices() -> Tuple[str, ...]:
    """Every registered device name, then ``auto``."""
    return (*DEVICES, AUTO)


def device_help() -> str:
    """One line per device for ``--help``."""
    rules = (f"{AUTO}: cuda where present, else openvino for {AUTO_OPENVINO_MIN_IMAGES} or more images where it is "
             "installed, else cpu")
    return "; ".join([f"{d.name}: {d.description}" for d in DEVICES.values()] + [rules])


def get_device(name: str) -> Device:
    """The registry entry of ``name`` (:class:`DeviceError` naming the choices when there is none)."""
    try:
        return DEVICES[name]
    except KeyError:
        raise DeviceError(f"unknown device {name!r} (expected one of {', '.join(device_choices())})") from None


def resolve_device(name: str, available: Optional[Sequence[str]] = None, images: Optional[int] = None) -> str:
    """The device ``name`` stands for: itself, or for ``auto`` ``cuda`` where a CUDA provider
    exists, else ``openvino`` where the OpenVINO runtime is installed and the run is long
    (``images`` is None: an embedded classifier; or at least :data:`AUTO_OPENVINO_MIN_IMAGES`),
    else ``cpu``.

    Examples:
        >>> resolve_device("auto", available=["CPUExecutionProvider"], images=1)
        'cpu'
    """
    if name != AUTO:
        return get_device(name).name
    available = onnxruntime_providers() if available is None else available
    if DEVICES["cuda"].missing(available) is None:
        return "cuda"
    if (images is None or images >= AUTO_OPENVINO_MIN_IMAGES) and DEVICES["openvino"].missing(available) is None:
        return "openvino"
    return "cpu"


def device_of(providers: Sequence[str]) -> str:
    """The device a session with these (reported) providers runs on: the first registered device
    whose required providers include the first one; ``cpu`` otherwise."""
    first = providers[0] if providers else CPU_PROVIDER
    from .ov_session import OPENVINO_ENGINE

    if first == OPENVINO_ENGINE:
        return "openvino"
    return next((d.name for d in DEVICES.values() if first in d.started), "cpu")
