"""Preprocessing: parity with how the training set was made, and twin files for every mode."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import fullres_pairs
from PIL import Image

from cxr_infer.preprocess import load_image, open_image, to_input


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _parity(draft: bool):
    means, peaks = [], []
    for original, small in fullres_pairs():
        ref = np.asarray(Image.open(small).convert("RGB"))
        px = load_image(original, draft=draft)
        assert px.shape == (224, 224, 3) and px.dtype == np.uint8
        diff = np.abs(px.astype(np.int16) - ref.astype(np.int16))
        means.append(float(diff.mean()))
        peaks.append(int(diff.max()))
    return np.array(means), np.array(peaks)


@pytest.mark.parametrize("draft", [True, False], ids=["draft", "full-decode"])
def test_parity_with_training_images(draft, record_property):
    """The 160 originals, preprocessed, match their chest_xray_224 counterparts within JPEG noise.

    The dataset README measures 2.5 gray levels for Pillow bicubic (2.0 after re-encoding);
    measured here: mean 2.46 (both modes), worst image 3.14 full / 3.17 draft.
    """
    means, peaks = _parity(draft)
    assert len(means) == 160
    record_property("mean_abs_diff", float(means.mean()))
    record_property("worst_image_mean_abs_diff", float(means.max()))
    record_property("max_pixel_abs_diff", int(peaks.max()))
    print(f"\nparity draft={draft}: mean {means.mean():.3f}, worst image {means.max():.3f}, "
          f"max pixel {peaks.max()} gray levels")
    assert means.mean() < 2.7
    assert means.max() < 4.0
    # A wrong pipeline (e.g. another filter, gray weights, keep-aspect) is far off:
    # nearest neighbour, the closest alternative, measures 3.8 in the README.


def test_draft_decoding_is_close_to_full_decoding():
    pairs = fullres_pairs()[::8]
    diffs = [_mean_abs(load_image(f, draft=True), load_image(f, draft=False)) for f, _ in pairs]
    assert max(diffs) < 1.5 and np.mean(diffs) < 0.5


# ---- twins: the same picture in every mode and container gives the same pixels
@pytest.fixture(scope="module")
def base(xray) -> Image.Image:
    """A real X-ray, reduced to 400 x 320 gray so each twin is quick to make."""
    return Image.open(xray).convert("L").resize((400, 320))


@pytest.fixture(scope="module")
def ref(base) -> np.ndarray:
    return load_image(base)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_gray_matches_its_rgb_twin_exactly(base, ref):
    assert np.array_equal(load_image(base.convert("RGB")), ref)
    assert (ref[..., 0] == ref[..., 1]).all() and (ref[..., 1] == ref[..., 2]).all()


@pytest.mark.parametrize("mode,fmt", [
    ("L", "PNG"), ("L", "BMP"), ("L", "TIFF"), ("RGB", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF"),
    ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "TIFF"),
])
def test_lossless_twins_are_identical(base, ref, mode, fmt):
    img = base.convert(mode)
    if "A" in mode:
        img.putalpha(255)
    data = _encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert np.array_equal(load_image(data), ref)


def test_palette_twin(base, ref):
    data = _encode(base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert _mean_abs(load_image(data), ref) < 1.0


def test_palette_with_transparency_is_composited(base):
    img = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    img.info["transparency"] = 0
    px = load_image(_encode(img, "PNG"))
    assert px.shape == (224, 224, 3)


def test_transparent_pixels_go_black(base):
    img = base.convert("RGBA")
    img.putalpha(0)
    assert load_image(_encode(img, "PNG")).max() == 0


def test_cmyk_jpeg_twin(base, ref):
    data = _encode(base.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert _mean_abs(load_image(data), ref) < 1.5


def test_jpeg_twin_within_jpeg_noise(base, ref):
    assert _mean_abs(load_image(_encode(base, "JPEG", quality=95)), ref) < 1.0


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_twin_full_range(base, ref, fmt):
    wide = np.asarray(base).astype(np.uint16) * 257
    data = _encode(Image.fromarray(wide), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert np.array_equal(load_image(data), ref)


def test_16bit_big_endian_and_mode_i(base, ref):
    wide = np.asarray(base).astype(np.uint16) * 257
    assert np.array_equal(load_image(Image.fromarray(wide.astype(">u2"))), ref)
    assert np.array_equal(load_image(Image.fromarray(wide.astype(np.int32))), ref)


def test_12bit_detector_data_in_16bit_png(base, ref):
    twelve = np.rint(np.asarray(base).astype(np.float64) * 4095 / 255).astype(np.uint16)
    assert np.abs(load_image(_encode(Image.fromarray(twelve), "PNG")).astype(int) - ref).max() <= 1


def test_8bit_values_in_16bit_container(base, ref):
    assert np.array_equal(load_image(_encode(Image.fromarray(np.asarray(base).astype(np.uint16)), "PNG")), ref)


def test_float_mode(base, ref):
    img = Image.fromarray(np.asarray(base).astype(np.float32) / 255.0, "F")
    assert img.mode == "F"
    assert np.abs(load_image(img).astype(int) - ref).max() <= 1


@pytest.mark.parametrize("orientation,transpose", [
    (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_rotated_twin(base, ref, orientation, transpose):
    """A file stored sideways with an EXIF Orientation tag gives the upright pixels."""
    stored = base.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = _encode(stored, "PNG", exif=exif.tobytes())
    assert np.array_equal(load_image(png), ref)
    jpeg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert _mean_abs(load_image(jpeg), ref) < 1.0
    if orientation != 2:
        assert _mean_abs(load_image(_encode(stored, "PNG")), ref) > 5  # ignoring the tag would be wrong


def test_orientation_of_an_in_memory_pil_image(base, ref):
    img = base.transpose(Image.Transpose.ROTATE_90)
    img.getexif()[0x0112] = 6
    assert np.array_equal(load_image(img), ref)


def test_broken_exif_does_not_lose_the_image(base, ref):
    data = _encode(base, "PNG", exif=b"Exif\x00\x00garbage")
    assert np.array_equal(load_image(data), ref)


@pytest.mark.parametrize("make", [
    lambda a: a, lambda a: np.stack([a] * 3, -1), lambda a: np.stack([a] * 3, 0), lambda a: a[..., None],
    lambda a: a.astype(np.uint16) * 257, lambda a: a.astype(np.float32) / 255.0,
    lambda a: np.concatenate([np.stack([a] * 3, -1), np.full(a.shape + (1,), 255, np.uint8)], -1),
], ids=["HW", "HWC", "CHW", "HW1", "uint16", "float01", "HWC4"])
def test_numpy_twins(base, ref, make):
    arr = make(np.asarray(base))
    assert np.abs(load_image(arr).astype(int) - ref).max() <= 1


def test_pil_paths_bytes_are_the_same(xray):
    by_path = load_image(xray)
    assert np.array_equal(load_image(str(xray)), by_path)
    assert np.array_equal(load_image(xray.read_bytes()), by_path)
    assert np.array_equal(load_image(bytearray(xray.read_bytes())), by_path)


def test_size_is_width_by_height_and_method_matters(base):
    assert load_image(base, (200, 100)).shape == (100, 200, 3)
    assert not np.array_equal(load_image(base, method="nearest"), load_image(base))


def test_open_image_upright_size(base):
    exif = Image.Exif()
    exif[0x0112] = 6
    assert open_image(_encode(base.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())).size == base.size


def test_to_input_normalises_per_channel():
    px = np.zeros((1, 2, 2, 3), np.uint8)
    px[..., 0] = 255
    x = to_input(px)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    assert np.allclose(x[0, 0], (1 - 0.485) / 0.229) and np.allclose(x[0, 1], -0.456 / 0.224)
    assert to_input(px[0]).shape == (1, 3, 2, 2)
