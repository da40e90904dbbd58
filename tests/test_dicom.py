"""DICOM input: DICOM files built from a shared JPEG must give its pixels and score like it."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pydicom")

from cxr_infer import InputError, load_image
from cxr_infer.dicom import looks_like_dicom

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


def make_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8, signed: bool = False,
               file_format: bool = True, sop: str = DX, with_pixels: bool = True, **attrs) -> bytes:
    """DICOM bytes holding ``pixels`` (uint8/uint16/int16, HxW or HxWx3), plus any ``attrs``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX" if sop == DX else "SR"
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    if file_format:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(buf, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no file meta, implicit VR little endian
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gray(xray) -> np.ndarray:
    """The shared full-size JPEG's gray levels (mode L, decoded at full scale)."""
    return np.asarray(Image.open(xray).convert("L"))


@pytest.fixture(scope="module")
def ref(gray) -> np.ndarray:
    return load_image(Image.fromarray(gray))


def _variants(g: np.ndarray) -> dict:
    g16 = g.astype(np.uint16)
    lut = np.arange(4096, dtype=np.uint16) // 16
    from pydicom.dataset import Dataset
    voi = Dataset()
    voi.LUTDescriptor = [4096, 0, 8]
    voi.add_new((0x0028, 0x3006), "US", lut.tolist())  # LUTData
    return {
        "mono2-8bit": make_dicom(g),
        "mono1-8bit": make_dicom(255 - g, "MONOCHROME1"),
        "mono2-16bit": make_dicom(g16 * 257, bits_stored=16),
        "mono1-16bit": make_dicom(65535 - g16 * 257, "MONOCHROME1", bits_stored=16),
        "mono2-12bit-window": make_dicom(g16 * 16, bits_stored=12, WindowCenter=2048, WindowWidth=4096),
        "mono1-12bit-window": make_dicom(4095 - g16 * 16, "MONOCHROME1", bits_stored=12, WindowCenter=2048,
                                         WindowWidth=4096),
        "rescale-window": make_dicom(g16 * 4, bits_stored=12, RescaleIntercept=-1024, RescaleSlope=1,
                                     WindowCenter=-513.5, WindowWidth=1021),
        "voi-lut": make_dicom(g16 * 16, bits_stored=12, VOILUTSequence=[voi]),
        "signed-16bit": make_dicom((g.astype(np.int32) * 257 - 32768).astype(np.int16), bits_stored=16,
                                   signed=True),
        "rgb-8bit": make_dicom(np.stack([g] * 3, -1), "RGB"),
    }


@pytest.fixture(scope="module")
def dicoms(gray, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dicom")
    paths = {}
    for name, data in _variants(gray).items():
        paths[name] = d / f"{name}.dcm"
        paths[name].write_bytes(data)
    return paths


EXACT = {"mono2-8bit", "mono1-8bit", "mono2-16bit", "mono1-16bit", "rescale-window", "voi-lut", "signed-16bit",
         "rgb-8bit"}


@pytest.mark.parametrize("name", ["mono2-8bit", "mono1-8bit", "mono2-16bit", "mono1-16bit", "mono2-12bit-window",
                                  "mono1-12bit-window", "rescale-window", "voi-lut", "signed-16bit", "rgb-8bit"])
def test_dicom_gives_the_jpeg_pixels(dicoms, ref, name):
    px = load_image(dicoms[name])
    diff = np.abs(px.astype(int) - ref.astype(int))
    if name in EXACT:
        assert diff.max() == 0, (name, diff.max())
    else:
        assert diff.max() <= 2 and diff.mean() < 0.6, (name, diff.max(), diff.mean())  # 255 * 16 / 4095


@pytest.mark.parametrize("name", ["mono2-8bit", "mono1-8bit", "mono2-16bit", "mono1-12bit-window"])
def test_dicom_scores_like_the_jpeg(classifier, dicoms, xray, name):
    jpeg = classifier.predict(xray)
    dcm = classifier.predict(dicoms[name])
    assert dcm.label == jpeg.label
    assert dcm.probability == pytest.approx(jpeg.probability, abs=0.01)
    assert dcm.source == str(dicoms[name])


def compress(data: bytes, syntax: str, path) -> None:
    """Write ``data`` (an uncompressed DICOM file) to ``path`` in ``syntax``, encoded by GDCM (what a
    PACS or modality commonly writes: JPEG Lossless for CR and DX)."""
    gdcm = pytest.importorskip("gdcm")
    src = path.with_suffix(".raw.dcm")
    src.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


#: GDCM's name of each transfer syntax -> pydicom's UID of it, and whether it is lossless
COMPRESSED = {"JPEGLosslessProcess14_1": ("1.2.840.10008.1.2.4.70", True),
              "JPEGLosslessProcess14": ("1.2.840.10008.1.2.4.57", True),
              "JPEGLSLossless": ("1.2.840.10008.1.2.4.80", True),
              "JPEG2000Lossless": ("1.2.840.10008.1.2.4.90", True),
              "RLELossless": ("1.2.840.10008.1.2.5", True),
              "JPEGBaselineProcess1": ("1.2.840.10008.1.2.4.50", False)}


@pytest.mark.parametrize("syntax,bits", [(syntax, bits) for syntax in COMPRESSED for bits in (8, 12)
                                         if COMPRESSED[syntax][1] or bits == 8])  # baseline: 8-bit only
def test_compressed_dicom_gives_the_uncompressed_pixels(gray, tmp_path, syntax, bits):
    """Compressed pixel data as a PACS holds it (JPEG Lossless above all, for CR and DX) decodes with
    the DICOM extra (GDCM, Pillow, pydicom's RLE) to the pixels of the uncompressed object: exactly
    where lossless, closely for 8-bit JPEG baseline."""
    uid, lossless = COMPRESSED[syntax]
    crop = gray[:256, :256]
    plain = make_dicom(crop, bits_stored=8) if bits == 8 else \
        make_dicom(crop.astype(np.uint16) * 16, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    path = tmp_path / f"{syntax}-{bits}.dcm"
    compress(plain, syntax, path)
    import pydicom

    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid
    want, got = load_image(plain), load_image(path)
    diff = np.abs(got.astype(int) - want.astype(int))
    if lossless:
        assert diff.max() == 0, (syntax, bits, diff.max())
    else:
        assert diff.mean() < 3 and want.shape == got.shape, (syntax, diff.mean())


def test_compressed_dicom_without_gdcm_is_one_line(gray, tmp_path):
    """Without GDCM, JPEG Lossless cannot be decoded: one line naming the file, the transfer syntax
    and the install command, exit 1, the other inputs still classified (pydicom's reason, several
    lines long, is joined into that line)."""
    from conftest import run_cli

    path = tmp_path / "lossless.dcm"
    compress(make_dicom(gray[:128, :128]), "JPEGLosslessProcess14_1", path)
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(make_dicom(gray[:128, :128]))
    r = run_cli(str(path), str(plain), "--format", "csv", prelude="import sys; sys.modules['gdcm'] = None")
    assert r.returncode == 1 and "Traceback" not in r.stderr.decode()
    err = [ln for ln in r.stderr.decode().splitlines() if "lossless.dcm" in ln]
    assert len(err) == 1, r.stderr.decode()
    assert err[0].startswith(f"cxr-infer: {path}: cannot decode the DICOM pixel data (JPEG Lossless")
    assert err[0].endswith("GDCM decodes JPEG Lossless, JPEG-LS and JPEG 2000: install the DICOM extra: "
                           "pip install 'cxr[dicom]'") and "\t" not in err[0]
    (row,) = [row for row in r.stdout.decode().splitlines() if row.startswith(f"{plain},")]
    assert row.split(",")[1] in ("NORMAL", "PNEUMONIA")


def test_without_preamble_and_without_file_meta(gray, ref):
    full = make_dicom(gray)
    no_preamble = full[132:]
    assert no_preamble[:2] == b"\x02\x00" and looks_like_dicom(no_preamble)
    assert np.array_equal(load_image(no_preamble), ref)
    bare = make_dicom(gray, file_format=False)
    assert bare[:2] == b"\x08\x00" and looks_like_dicom(bare)
    assert np.array_equal(load_image(bare), ref)


def test_multiframe_is_refused(gray, tmp_path):
    frames = np.stack([gray[:64, :64], gray[:64, :64]])
    data = make_dicom(frames.reshape(128, 64), NumberOfFrames=2)
    path = tmp_path / "cine.dcm"
    path.write_bytes(data)
    with pytest.raises(InputError, match=r"cine.dcm: multi-frame DICOM \(2 frames\) is not supported"):
        load_image(path)


def test_non_image_object_is_refused(tmp_path):
    path = tmp_path / "report.dcm"
    path.write_bytes(make_dicom(np.zeros(1), sop=SR, with_pixels=False))
    with pytest.raises(InputError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: DICOM object without an image (Basic Text SR")


def test_corrupt_dicom_is_one_line():
    data = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 10
    with pytest.raises(InputError) as info:
        load_image(data)
    assert str(info.value).startswith("<bytes>: ") and "\n" not in str(info.value)


def test_missing_pydicom_says_how_to_install(gray, monkeypatch):
    data = make_dicom(gray[:32, :32])
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InputError, match=r"pip install 'cxr\[dicom\]'"):
        load_image(data)


@pytest.mark.parametrize("head", [
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n\x00\x00", b"BM\x00\x00\x00\x00\x00\x00",
    b"II*\x00\x08\x00\x00\x00", b"MM\x00*\x00\x00\x00\x08", b"hello world, plain text", b"", b"\x08\x00",
])
def test_looks_like_dicom_rejects_other_formats(head):
    assert not looks_like_dicom(head + b"\0" * 200)
    assert not looks_like_dicom(head)


def test_a_dicom_medium_folder_is_read_and_its_dicomdir_skipped(gray, tmp_path):
    """A CD or DVD export (PS3.10: a DICOMDIR index beside extension-less image files) given as a
    folder: every image is classified and the DICOMDIR, which holds none, is not reported as a bad
    input; passed by name it gets one line saying to pass its folder."""
    from conftest import run_cli
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    fs = FileSet()
    for n in (1, 2):
        src = tmp_path / f"src{n}.dcm"
        src.write_bytes(make_dicom(gray[:96, :96], PatientID="P1", PatientName="Doe^Ann", StudyInstanceUID="1.2.3.4",
                                   SeriesInstanceUID="1.2.3.4.5", StudyDate="20240101", StudyTime="120000",
                                   StudyID="1", SeriesNumber="1", InstanceNumber=str(n)))
        fs.add(dcmread(src))
    medium = tmp_path / "medium"
    fs.write(medium)
    images = sorted(p for p in medium.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert (medium / "DICOMDIR").is_file() and len(images) == 2 and all(not p.suffix for p in images)
    r = run_cli(str(medium), "--format", "csv")
    assert r.returncode == 0, r.stderr.decode()
    rows = r.stdout.decode().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == [str(p) for p in images]
    assert "DICOMDIR" not in r.stdout.decode() + r.stderr.decode()
    r = run_cli(str(medium / "DICOMDIR"))
    err = r.stderr.decode().splitlines()
    assert r.returncode == 1 and err[0] == (f"cxr-infer: {medium / 'DICOMDIR'}: a DICOMDIR, the index of a DICOM "
                                            "medium, holds no image: pass the folder it is in (its images are "
                                            "found there; the DICOMDIR is skipped)")


def test_objects_without_an_image_in_a_scanned_folder_are_skipped(gray, tmp_path):
    """A study folder as a PACS exports it holds reports and presentation states beside the images:
    a folder scan classifies the images and skips those objects (one line each, exit 0); named
    on the command line such an object is a failed input (exit 1), and a folder of nothing else
    is exit 1 too."""
    from conftest import run_cli

    from cxr_infer import NotAnImage

    study = tmp_path / "study"
    study.mkdir()
    for n in (1, 2):
        (study / f"IM{n}.dcm").write_bytes(make_dicom(gray[:96, :96]))
    report = study / "report.dcm"
    report.write_bytes(make_dicom(np.zeros(1), sop=SR, with_pixels=False))
    (study / "GSPS0001").write_bytes(make_dicom(np.zeros(1), sop="1.2.840.10008.5.1.4.1.1.11.1", with_pixels=False,
                                                Modality="PR"))
    with pytest.raises(NotAnImage):
        load_image(report)
    r = run_cli(str(study), "--format", "csv")
    err = r.stderr.decode().splitlines()
    assert r.returncode == 0, err
    rows = r.stdout.decode().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == [str(study / "IM1.dcm"), str(study / "IM2.dcm")]
    assert sorted(err[:2]) == [f"cxr-infer: {study / 'GSPS0001'}: skipped: DICOM object without an image "
                               "(Grayscale Softcopy Presentation State Storage, modality PR)",
                               f"cxr-infer: {report}: skipped: DICOM object without an image (Basic Text SR Storage, "
                               "modality SR)"]
    assert err[-1] == "cxr-infer: 2 of 2 inputs classified, 0 failed; 2 DICOM objects without an image skipped"
    r = run_cli(str(report), str(study / "IM1.dcm"))
    assert r.returncode == 1 and f"{report}: DICOM object without an image (Basic Text SR" in r.stderr.decode()
    assert "1 of 2 inputs classified, 1 failed" in r.stderr.decode()
    only = tmp_path / "reports"
    only.mkdir()
    (only / "report.dcm").write_bytes(report.read_bytes())
    r = run_cli(str(only))
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[-1] == "cxr-infer: no image to classify: the 1 DICOM objects found hold none"
