"""Bad inputs and bad model files: one clear line each, never a traceback, the rest go on."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from conftest import build_model, run_cli

from cxr_infer import Classifier, InputError, ModelError, Prediction, load_image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG declaring width x height gray pixels (10 billion by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, xray) -> dict:
    d = tmp_path_factory.mktemp("bad")
    jpeg = xray.read_bytes()
    files = {
        "missing": d / "missing.jpeg",
        "directory": d / "folder.jpeg",
        "empty": d / "empty.jpeg",
        "truncated": d / "truncated.jpeg",
        "corrupt": d / "corrupt.jpeg",
        "text": d / "notes.jpeg",
        "html": d / "page.jpeg",
        "bomb": d / "bomb.png",
        "binary": d / "random.png",
    }
    files["directory"].mkdir()
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(jpeg[: len(jpeg) // 3])
    files["corrupt"].write_bytes(jpeg[:20] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    files["text"].write_text("patient notes, not an image\n")
    files["html"].write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    files["bomb"].write_bytes(png_bomb())
    files["binary"].write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    return files


EXPECT = {
    "missing": "no such file",
    "directory": "is a directory",
    "empty": "empty file",
    "truncated": "truncated",
    "corrupt": "corrupt",
    "text": "not a supported image (text",
    "html": "not a supported image (HTML",
    "bomb": "decompression bomb",
    "binary": "not a supported image",
}


@pytest.mark.parametrize("kind", sorted(EXPECT))
def test_bad_file_gives_one_line_naming_it(bad_files, kind):
    path = bad_files[kind]
    with pytest.raises(InputError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert EXPECT[kind] in message, message
    assert "\n" not in message


def test_bomb_is_refused_before_decoding(bad_files):
    assert len(png_bomb()) < 100
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(png_bomb())
    # above cxr's own limit (100 M pixels) but below Pillow's (179 M): cxr's check names the size
    with pytest.raises(InputError, match="declares 11000x11000 = 121,000,000 pixels"):
        load_image(png_bomb(11_000, 11_000))


def test_pillow_own_bomb_limit_also_one_line():
    from PIL import Image
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(InputError, match="decompression bomb"):
            load_image(png_bomb(2000, 2000))
    finally:
        Image.MAX_IMAGE_PIXELS = old


@pytest.mark.parametrize("value,expect", [
    (b"", "<bytes>: empty input"), (np.zeros((5, 5, 7), np.uint8), "<ndarray>: array of shape"),
    (np.zeros((0, 5), np.uint8), "<ndarray>: array of shape"), (12345, "<int>: unsupported input type"),
    (np.array(["a", "b"]), "<ndarray>:"),
])
def test_bad_in_memory_inputs(value, expect):
    with pytest.raises(InputError) as info:
        load_image(value)
    assert str(info.value).startswith(expect)


def test_batch_goes_on_past_bad_inputs(classifier, bad_files, xrays224):
    items = [xrays224[0]] + [bad_files[k] for k in sorted(EXPECT)] + [xrays224[1]]
    results = classifier.predict_many(items, batch_size=4)
    assert len(results) == len(items)
    assert isinstance(results[0], Prediction) and isinstance(results[-1], Prediction)
    assert all(isinstance(r, InputError) for r in results[1:-1])
    with pytest.raises(InputError):
        classifier.predict(items)
    returned = classifier.predict(items, errors="return")
    assert [type(r) for r in returned] == [type(r) for r in results]
    assert [str(r) for r in returned[1:-1]] == [str(r) for r in results[1:-1]]


def test_cli_reports_each_bad_input_and_classifies_the_rest(tiny_model, bad_files, xrays224):
    items = [str(xrays224[0])] + [str(bad_files[k]) for k in sorted(EXPECT)] + [str(xrays224[1])]
    r = run_cli("--model", str(tiny_model), "--format", "jsonl", *items)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "Traceback" not in err
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [o["path"] for o in lines] == items
    assert "label" in lines[0] and "label" in lines[-1]
    for obj, kind in zip(lines[1:-1], sorted(EXPECT)):
        assert (EXPECT[kind] if kind != "directory" else "folder holds no image files") in obj["error"], obj
        assert f"cxr-infer: {obj['path']}: {obj['error']}" in err
    assert f"{len(items) - len(EXPECT)} of {len(items)} inputs classified" in err


# ---- model files
@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("badmodels")
    good = build_model(spec="default")
    raw = json.loads(__import__("onnx").load_from_string(good).metadata_props[0].value)
    v2 = dict(raw, format_version="2.0")
    lacks = {k: v for k, v in raw.items() if k != "labels"}
    cases = {
        "text.onnx": b"this is not a model",
        "random.onnx": bytes(np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8)),
        "empty.onnx": b"",
        "nospec.onnx": build_model(spec=None),
        "badjson.onnx": build_model(spec="{not json"),
        "v2.onnx": build_model(spec=v2),
        "lacks.onnx": build_model(spec=lacks),
        "inputname.onnx": build_model(graph_input_name="pixels"),
        "gray.onnx": build_model(graph_input_shape=["N", 1, 224, 224]),
        "size.onnx": build_model(graph_input_shape=["N", 3, 256, 256]),
        "rank.onnx": build_model(graph_input_shape=["N", 3, 224]),
        "output.onnx": build_model(graph_prob_output="scores"),
        "labels.onnx": build_model(graph_labels=3),
    }
    onnx = __import__("onnx")
    extra = onnx.load_from_string(good)
    extra.graph.input.append(onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, [1]))
    cases["extra.onnx"] = extra.SerializeToString()
    raw16 = dict(raw, input=dict(raw["input"], dtype="float32"))
    cases["dtype.onnx"] = build_model(dtype="float16", spec=raw16)
    paths = {}
    for name, data in cases.items():
        paths[name] = d / name
        paths[name].write_bytes(data)
    return paths


MODEL_EXPECT = {
    "text.onnx": "not a loadable ONNX model",
    "random.onnx": "not a loadable ONNX model",
    "empty.onnx": "not a loadable ONNX model",
    "nospec.onnx": "has no cxr.spec metadata",
    "badjson.onnx": "cxr.spec is not valid JSON",
    "v2.onnx": "format_version 2.0 is not supported",
    "lacks.onnx": "lacks required field(s): labels",
    "inputname.onnx": "no input 'input'",
    "gray.onnx": "expected [N, 3, 224, 224]",
    "size.onnx": "expected [N, 3, 224, 224]",
    "rank.onnx": "expected [N, 3, 224, 224]",
    "dtype.onnx": "spec says float32",
    "output.onnx": "no probabilities output 'probabilities'",
    "labels.onnx": "expected [N, 2]",
    "extra.onnx": "unexpected extra inputs ['mask']",
}


@pytest.mark.parametrize("name", sorted(MODEL_EXPECT))
def test_bad_model_is_a_clear_model_error(bad_models, name):
    path = bad_models[name]
    with pytest.raises(ModelError) as info:
        Classifier(path, threads=1)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert MODEL_EXPECT[name] in message, message
    assert "\n" not in message


def test_missing_model_and_folder(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        Classifier(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is not a file"):
        Classifier(tmp_path)


@pytest.mark.parametrize("name", ["text.onnx", "nospec.onnx", "gray.onnx"])
def test_cli_bad_model_exit_2_one_line(bad_models, xrays224, name):
    r = run_cli("--model", str(bad_models[name]), str(xrays224[0]))
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert err.count("\n") == 0 and MODEL_EXPECT[name] in err and "Traceback" not in err
    assert r.stdout == b""


def test_unknown_device_and_bad_threshold(tiny_model):
    from cxr_infer import DeviceError
    with pytest.raises(DeviceError, match="unknown device"):
        Classifier(tiny_model, device="tpu")
    with pytest.raises(ValueError):
        Classifier(tiny_model, threshold=1.5)


def test_an_error_quoting_a_multi_line_reason_is_one_line():
    """A library's reason quoted in an error can run over several lines (pydicom lists each decoder
    it tried, one per line): every cxr error joins them, so a bad input stays one line on stderr and
    in a CSV or JSON Lines row; one-line messages are kept as they are."""
    from cxr_infer.errors import DeviceError

    reason = "Unable to decode as exceptions were raised by all available plugins:\n  gdcm: no\n\tpillow: no"
    for cls in (InputError, ModelError, DeviceError):
        assert str(cls(f"x.dcm: cannot decode ({reason})")) == \
            "x.dcm: cannot decode (Unable to decode as exceptions were raised by all available plugins: gdcm: no " \
            "pillow: no)"
    assert str(InputError("kept  as  it is")) == "kept  as  it is"
    assert InputError("a", "b").args == ("a", "b")
