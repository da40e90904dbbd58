"""The Open Inference Protocol v2 (KServe v2, as Triton, KServe and MLServer speak it) for cxr:
model metadata, inference requests in, responses out, with the binary tensor data extension
that ``tritonclient``'s HTTP client uses by default.

The model takes one ``BYTES`` input, ``image``: each element is one encoded image (JPEG, PNG,
TIFF, DICOM). Sent as JSON, an element is the image's bytes in base64; sent as binary data, it is
a 4-byte little-endian length and the bytes, as Triton serialises ``BYTES``. The outputs, one row
per image: ``probabilities`` (FP32, ``[N, labels]`` in the model's label order), ``label``
(BYTES), ``in_domain`` (BOOL), ``domain_score`` (FP32) and ``domain_reasons`` (BYTES, the reasons
joined with ``"; "``, empty when in domain); ``in_domain`` and ``domain_score`` only for models
with an image check.

Examples:
    >>> parse_request(b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",'
    ...               b' "data": ["aGVsbG8="]}]}', None).images
    [b'hello']
    >>> serialize_bytes([b"ab", b"c"])
    b'\\x02\\x00\\x00\\x00ab\\x01\\x00\\x00\\x00c'
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: The header that gives the JSON part's length when binary tensor data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
VERSION = "1"


class ProtocolError(ValueError):
    """A request that does not follow the protocol: answered 400 with this one line."""


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: its id, the images, and the outputs asked for (name -> binary?)."""

    id: Optional[str]
    images: List[bytes]
    outputs: Dict[str, bool]


def output_specs(labels: Sequence[str], domain_check: bool) -> List[Dict[str, Any]]:
    """The outputs a model has, as the metadata endpoint lists them."""
    specs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]},
             {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    if domain_check:
        specs += [{"name": "in_domain", "datatype": "BOOL", "shape": [-1]},
                  {"name": "domain_score", "datatype": "FP32", "shape": [-1]}]
    return specs + [{"name": "domain_reasons", "datatype": "BYTES", "shape": [-1]}]


def model_metadata(name: str, labels: Sequence[str], domain_check: bool, platform: str = "onnxruntime_onnx"
                   ) -> Dict[str, Any]:
    """``GET /v2/models/{name}``: the name, versions, platform, inputs and outputs."""
    return {"name": name, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": output_specs(labels, domain_check)}


def _json_part(body: bytes, header_length: Optional[str]) -> Tuple[Dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request is not JSON ({exc})") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with \"inputs\"")
    return request, rest


def deserialize_bytes(data: bytes) -> List[bytes]:
    """Triton's BYTES binary form: elements, each a 4-byte little-endian length and its bytes."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ProtocolError("binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + n > len(data):
            raise ProtocolError("binary BYTES data ends inside an element")
        out.append(data[at:at + n])
        at += n
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """The inverse of :func:`deserialize_bytes`."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _flat(data: Any) -> List[Any]:
    if isinstance(data, list):
        return [y for x in data for y in _flat(x)]
    return [data]


def _images(spec: Mapping[str, Any], binary: bytes) -> List[bytes]:
    if spec.get("datatype") != "BYTES":
        raise ProtocolError(f"input {spec.get('name')!r} must be BYTES (encoded images), not {spec.get('datatype')}")
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise ProtocolError(f"input {spec.get('name')!r}: binary_data_size {size} does not match the body")
        images = deserialize_bytes(binary[:size])
    else:
        images = []
        for element in _flat(spec.get("data", [])):
            if not isinstance(element, str):
                raise ProtocolError("BYTES data sent as JSON must be base64 strings, one per image")
            try:
                images.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise ProtocolError("BYTES data sent as JSON must be base64 strings, one per image") from None
    shape = spec.get("shape")
    if not isinstance(shape, list) or int(np.prod(shape or [0])) != len(images):
        raise ProtocolError(f"input {spec.get('name')!r}: shape {shape} does not hold its {len(images)} image(s)")
    if not images:
        raise ProtocolError(f"input {spec.get('name')!r} holds no image")
    return images


def parse_request(body: bytes, header_length: Optional[str], known: Sequence[str] = ()) -> InferRequest:
    """Read ``POST /v2/models/{name}/infer``'s body (``header_length``: its
    ``Inference-Header-Content-Length``); ``known`` are the output names the model has."""
    request, binary = _json_part(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"expected one input, {INPUT_NAME!r}: a BYTES tensor of encoded images")
    images = _images(inputs[0], binary)
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = request.get("outputs")
    if asked is None:
        outputs = {name: binary_default for name in known}
    else:
        if not isinstance(asked, list) or not all(isinstance(o, dict) and "name" in o for o in asked):
            raise ProtocolError("\"outputs\" must be a list of {\"name\": ...}")
        outputs = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", binary_default)) for o in asked}
    unknown = [name for name in outputs if known and name not in known]
    if unknown:
        raise ProtocolError(f"unknown output {unknown[0]!r} (this model has {', '.join(known)})")
    rid = request.get("id")
    return InferRequest(str(rid) if rid is not None else None, images, outputs)


def _tensor(name: str, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> Tuple[str, List[int], Any]:
    """(datatype, shape, values) of one output for the records."""
    n = len(records)
    if name == "probabilities":
        values = np.array([[r["probabilities"][label] for label in labels] for r in records], np.float32)
        return "FP32", [n, len(labels)], values
    if name == "label":
        return "BYTES", [n], [r["label"].encode() for r in records]
    if name == "in_domain":
        return "BOOL", [n], np.array([bool(r["in_domain"]) for r in records], np.bool_)
    if name == "domain_score":
        return "FP32", [n], np.array([np.nan if r["domain_score"] is None else r["domain_score"] for r in records],
                                     np.float32)
    return "BYTES", [n], ["; ".join(r["domain_reasons"]).encode() for r in records]


def build_response(model: str, request: InferRequest, records: Sequence[Mapping[str, Any]],
                   labels: Sequence[str]) -> Tuple[bytes, Dict[str, str]]:
    """The response body and headers: outputs asked for in binary follow the JSON part."""
    outputs, blobs = [], []
    for name, binary in request.outputs.items():
        datatype, shape, values = _tensor(name, records, labels)
        out: Dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = serialize_bytes(values) if datatype == "BYTES" else np.ascontiguousarray(values).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            out["data"] = [v.decode() for v in values]
        else:
            out["data"] = [None if isinstance(v, float) and v != v else v for v in values.reshape(-1).tolist()]
        outputs.append(out)
    response: Dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
