"""``device="openvino"``: a model file compiled by the OpenVINO runtime for the CPU.

:class:`OpenVINOSession` offers the part of ``onnxruntime.InferenceSession`` that
:class:`~cxr_infer.model.ModelFile` uses (inputs, outputs, the file's metadata, ``run``), so
everything above it (the spec checks, batching, the Classifier, the CLI and the benches) is the
same on both engines. OpenVINO reads the ``.onnx`` file itself (its ONNX front end keeps the
``cxr.spec`` metadata) and compiles every node of it for this CPU, Intel or AMD (the
onnxruntime-ep-openvino plugin offers no device on AMD CPUs). Needs ``pip install 'cxr[openvino]'``;
the device registry (:mod:`cxr_infer.devices`) opens it with its model cache and lock.

Examples:
    >>> s = OpenVINOSession("models/vgg16_int8.onnx", threads=2)    # doctest: +SKIP
    >>> [o.name for o in s.get_outputs()][:2]                           # doctest: +SKIP
    ['probabilities', 'features']
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import DeviceError, ModelError

#: what ``ModelFile.providers`` lists for a session the OpenVINO runtime runs
OPENVINO_ENGINE = "OpenVINO"
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)",
          "u8": "tensor(uint8)", "i8": "tensor(int8)", "boolean": "tensor(bool)", "f64": "tensor(double)"}
_RUNTIME: Dict[str, Any] = {}


def openvino_runtime() -> Any:
    """The ``openvino`` module, imported once per process, with the CPU among its devices.

    Raises:
        DeviceError: the package is not installed, or it sees no CPU device it can run on.
    """
    if "module" in _RUNTIME:
        return _RUNTIME["module"]
    if "error" in _RUNTIME:
        raise DeviceError(_RUNTIME["error"])
    try:
        try:
            import openvino as ov
        except ImportError:
            raise DeviceError("device 'openvino' needs the OpenVINO runtime: pip install 'cxr[openvino]' "
                              "(or use --device cpu)") from None
        try:
            devices = ov.Core().available_devices
        except Exception as exc:  # a broken install
            raise DeviceError(f"device 'openvino': the OpenVINO runtime does not start ({_reason(exc)}); "
                              "reinstall it: pip install -U 'cxr[openvino]'") from None
        if "CPU" not in devices:
            raise DeviceError(f"device 'openvino': OpenVINO offers no CPU device here (devices: "
                              f"{', '.join(devices) or 'none'}; its CPU plugin needs an x86-64 or ARM64 CPU); "
                              "use --device cpu")
    except DeviceError as exc:
        _RUNTIME["error"] = str(exc)
        raise
    _RUNTIME["module"] = ov
    return ov


def openvino_config(threads: int) -> Dict[str, Any]:
    """The CPU plugin properties of a cxr session: ``threads`` inference threads, latency hint,
    one stream (one image after another, as the onnxruntime CPU provider runs them), and FP32 for
    everything not INT8. OpenVINO's default on a CPU with AVX-512 bf16 or AMX is bf16 inference:
    measured on a 2-core AMD EPYC with AVX-512 bf16, it moved the shipped files' domain scores by up
    to four times their threshold on 64 real test images and turned ResNet50's orientation term into NaN."""
    return {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32"}


def _reason(exc: BaseException) -> str:
    """OpenVINO's reason in one line: its messages start with where the check failed in its own
    sources ("Check '...' failed at src/...", "FrontEnd API failed with ...:"); the reason is last."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return ((lines or [type(exc).__name__])[-1])[:300]


class _Port:
    """An input or output as ``onnxruntime.NodeArg`` describes it: name, shape (None where
    dynamic) and ONNX type string."""

    def __init__(self, port: Any) -> None:
        self.name: str = port.get_any_name()
        self.shape: List[Optional[int]] = [d.get_length() if d.is_static else None
                                           for d in port.get_partial_shape()]
        element = port.get_element_type().get_type_name()
        self.type: str = _TYPES.get(element, f"tensor({element})")


class _Meta:
    def __init__(self, custom: Dict[str, str]) -> None:
        self.custom_metadata_map = custom


class OpenVINOSession:
    """A model file compiled by OpenVINO for the CPU, run like an onnxruntime session.

    Args:
        model: the ``.onnx`` file's path (or its bytes).
        threads: inference threads.
        cache: OpenVINO's model cache folder, or None for none.
        name: how errors name the model.

    Raises:
        ModelError: OpenVINO cannot read the file as ONNX.
        DeviceError: the runtime is missing, or it cannot compile this graph for the CPU.
    """

    def __init__(self, model: Any, threads: int, cache: Optional[str] = None, name: str = "") -> None:
        ov = openvino_runtime()
        name = name or ("<model bytes>" if isinstance(model, (bytes, bytearray)) else str(model))
        core = ov.Core()
        if cache:
            core.set_property({"CACHE_DIR": str(cache)})
        # The ONNX front end by name: read_model would try every front end it has in turn, and the
        # TensorFlow one writes its own parse errors to stderr for a file that is not ONNX.
        from openvino.frontend import FrontEndManager

        front = FrontEndManager().load_by_framework("onnx")
        try:
            loaded = front.load(io.BytesIO(bytes(model)) if isinstance(model, (bytes, bytearray)) else str(Path(model)))
        except Exception as exc:  # OpenVINO raises its own error types for every kind of unreadable file
            raise ModelError(f"{name}: not a loadable ONNX model ({_reason(exc)})") from None
        try:
            graph = front.convert(loaded)
        except Exception as exc:  # valid ONNX, but an operator or form OpenVINO does not take
            raise DeviceError(f"{name}: OpenVINO cannot convert this model ({_reason(exc)}); "
                              "use --device cpu") from None
        info = graph.get_rt_info()
        framework = info["framework"] if "framework" in info else {}
        self._metadata = {key: graph.get_rt_info(["framework", key]).astype(str) for key in framework}
        try:
            self._compiled = core.compile_model(graph, "CPU", openvino_config(threads))
        except Exception as exc:
            raise DeviceError(f"{name}: OpenVINO could not compile this model for the CPU ({_reason(exc)}); "
                              "use --device cpu") from None
        self._inputs = [_Port(p) for p in self._compiled.inputs]
        self._outputs = [_Port(p) for p in self._compiled.outputs]
        self._output_index = {p.name: i for i, p in enumerate(self._outputs)}
        self._local = threading.local()  # an infer request is not thread-safe: one per thread

    # ---- onnxruntime.InferenceSession's surface
    def get_inputs(self) -> List[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> List[_Port]:
        return list(self._outputs)

    def get_providers(self) -> List[str]:
        return [OPENVINO_ENGINE]

    def get_modelmeta(self) -> _Meta:
        return _Meta(dict(self._metadata))

    def run(self, output_names: Optional[Sequence[str]], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """The named outputs (all of them for None) for ``feeds`` ({input name: array}), copied."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        names = list(output_names) if output_names else [p.name for p in self._outputs]
        results = request.infer({name: np.asarray(value, order="C") for name, value in feeds.items()})  # 0-d kept 0-d
        ports = self._compiled.outputs
        return [np.array(results[ports[self._output_index[n]]], copy=True) for n in names]
