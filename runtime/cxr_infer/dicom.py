"""DICOM input (optional extra ``dicom``: pydicom): one X-ray frame to 8-bit display pixels.

The pipeline follows the DICOM grayscale standard display chain:

1. stored values -> Modality LUT (``ModalityLUTSequence``) or ``RescaleSlope/Intercept``;
2. -> VOI LUT (``VOILUTSequence``) or ``WindowCenter/Width`` (LINEAR, LINEAR_EXACT, SIGMOID);
   without either, the range the values can take (``BitsStored``, signed or not) is used,
   or their min..max when a rescale makes that range unknown;
3. -> 0..255, the range of the training images; ``MONOCHROME1`` (white = low) is inverted.

RGB (and, with pydicom 3, YBR) 8-bit images are passed through. Multi-frame objects and
objects without pixel data (reports, presentation states, ...) are refused with one clear line.

Examples:
    >>> looks_like_dicom(b"\\0" * 128 + b"DICM" + b"\\2\\0\\0\\0UL")
    True
    >>> looks_like_dicom(b"\\xff\\xd8\\xff\\xe0 a JPEG")
    False
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from typing import Any, Dict, Tuple, Union

import numpy as np
from PIL import Image

from .errors import InputError, NotAnImage

_VRS = frozenset(v.encode() for v in (
    "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV").split())
INSTALL_HINT = "install the DICOM extra: pip install 'cxr[dicom]'"


def looks_like_dicom(data: bytes) -> bool:
    """True for DICOM data: ``DICM`` at byte 128, or a preamble-less dataset (cheap sniff).

    A dataset without preamble starts with a group 0002 (file meta) or 0008 (identifying)
    element in little-endian explicit or implicit VR; no JPEG, PNG, BMP or TIFF starts so.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group, element = struct.unpack_from("<HH", data, 0)
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if data[4:6] in _VRS:  # explicit VR
        return True
    (length,) = struct.unpack_from("<I", data, 4)  # implicit VR: a plausible, non-empty first value
    return 0 < length < min(len(data), 1 << 16)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise InputError(f"is a DICOM file; reading DICOM needs pydicom: {INSTALL_HINT}") from None
    return pydicom


def _have_gdcm() -> bool:
    try:
        import gdcm  # noqa: F401  (pydicom's decoder for JPEG Lossless, JPEG-LS, JPEG 2000)
    except ImportError:
        return False
    return True


def _decode_error(ds: Any, exc: Exception) -> str:
    """One line for pixel data that pydicom could not decode: the transfer syntax, pydicom's reason
    (its several lines joined: each decoder it tried and why) and, for compressed pixel data where
    GDCM is missing, how to install it."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
    reason = " ".join(str(exc).split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    msg = f"cannot decode the DICOM pixel data ({name}: {reason})"
    if getattr(syntax, "is_compressed", False) and not _have_gdcm():
        # JPEG Lossless, the usual compression of CR and DX images in a PACS, needs GDCM
        return f"{msg}; GDCM decodes JPEG Lossless, JPEG-LS and JPEG 2000: {INSTALL_HINT}"
    return msg


def _modality(arr: np.ndarray, ds: Any) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        try:
            from pydicom.pixels import apply_modality_lut
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float64) * slope + intercept


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _voi_lut(values: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1): values outside its range take its end entries."""
    item = ds.VOILUTSequence[0]
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first > 32767:
        first -= 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        lut = np.frombuffer(data, np.uint8 if bits <= 8 and len(data) == n else "<u2")
    else:
        lut = np.asarray(data if isinstance(data, (list, tuple)) or hasattr(data, "__len__") else [data])
    lut = lut.astype(np.float64)[:n]
    index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)
    return lut[index] / float((1 << bits) - 1)


def _to_unit(raw: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> display values in 0..1 (before MONOCHROME1 inversion)."""
    values = _modality(raw, ds)
    if "VOILUTSequence" in ds and "LUTData" in ds.VOILUTSequence[0]:
        return _voi_lut(values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        width = _first(ds.WindowWidth)
        if width <= 0:
            raise InputError(f"invalid WindowWidth {width}")
        return _window(values, _first(ds.WindowCenter), width, function)
    rescaled = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1 \
        or float(ds.get("RescaleIntercept", 0) or 0) != 0
    if rescaled:
        lo, hi = float(values.min()), float(values.max())
    else:
        bits = int(ds.get("BitsStored", raw.dtype.itemsize * 8) or 8)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        lo = -(1 << (bits - 1)) if signed else 0.0
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _ensure_transfer_syntax(ds: Any) -> None:
    """A dataset written without file meta: record the encoding it was read with, so it decodes."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    encoding = getattr(ds, "original_encoding", None)  # pydicom 3: (implicit_vr, little_endian)
    implicit, little = encoding if encoding and None not in encoding else (ds.is_implicit_VR, ds.is_little_endian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (
        ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _with_header(img: Image.Image, ds: Any) -> Tuple[Image.Image, Dict[str, Any]]:
    try:
        return img, header_of(ds)
    except Exception:  # a malformed header element: the checks then see no header, never a traceback
        return img, {}


#: The SOP class of a DICOMDIR, the index of a DICOM medium (PS3.10)
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def _sop_class(ds: Any) -> Any:
    """The object's SOP class; a DICOMDIR names its own only in the file meta information."""
    sop = ds.get("SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    return sop if sop else (meta.get("MediaStorageSOPClassUID") if meta is not None else None)


def _describe_object(ds: Any) -> str:
    sop = _sop_class(ds)
    sop_name = getattr(sop, "name", None) or (str(sop) if sop else "unknown SOP class")
    modality = ds.get("Modality", "")
    return f"{sop_name}{', modality ' + str(modality) if modality else ''}"


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def header_of(ds: Any) -> Dict[str, Any]:
    """The header fields the intended-use checks read (:data:`cxr_infer.intended_use.HEADER_FIELDS`),
    as plain strings and lists; absent or empty tags are left out."""
    header: Dict[str, Any] = {}
    for key in ("PatientAge", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ViewPosition",
                "Modality", "BodyPartExamined"):
        value = _text(ds.get(key))
        if value:
            header[key] = value
    image_type = ds.get("ImageType")
    if image_type:
        values = [image_type] if isinstance(image_type, (str, bytes)) else list(image_type)
        header["ImageType"] = [_text(v) for v in values if _text(v)]
    meanings = []
    for item in ds.get("ViewCodeSequence") or []:
        meaning = _text(item.get("CodeMeaning")) if hasattr(item, "get") else ""
        if meaning:
            meanings.append(meaning)
    if meanings:
        header["ViewCodeMeanings"] = meanings
    return header


def read_dicom(data: bytes, name: str) -> Tuple[Image.Image, Dict[str, Any]]:
    """Decode one DICOM frame into an 8-bit PIL image (``L``, or ``RGB`` for colour objects) and
    the header fields of the intended-use checks (:func:`header_of`).

    Raises :class:`InputError` (one line naming ``name``) for objects without an image,
    multi-frame objects, undecodable pixel data, or a missing pydicom.
    """
    try:
        pydicom = _pydicom()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
            except Exception as exc:
                raise InputError(f"corrupt DICOM file ({exc})") from None
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                if str(_sop_class(ds) or "") == MEDIA_DIRECTORY:
                    raise NotAnImage("a DICOMDIR, the index of a DICOM medium, holds no image: pass the folder "
                                     "it is in (its images are found there; the DICOMDIR is skipped)")
                raise NotAnImage(f"DICOM object without an image ({_describe_object(ds)})")
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames > 1:
                raise InputError(f"multi-frame DICOM ({frames} frames) is not supported; "
                                 "save the frame to classify as its own file")
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
            _ensure_transfer_syntax(ds)
            try:
                raw = np.asarray(ds.pixel_array)
            except Exception as exc:
                raise InputError(_decode_error(ds, exc)) from None
            if photometric in ("MONOCHROME1", "MONOCHROME2"):
                if raw.ndim != 2:
                    raise InputError(f"DICOM pixel data of shape {raw.shape} is not a single gray frame")
                unit = _to_unit(raw, ds)
                if photometric == "MONOCHROME1":
                    unit = 1.0 - unit
                gray = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
                return _with_header(Image.fromarray(gray, "L"), ds)
            if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and raw.ndim == 3 and raw.shape[-1] == 3 \
                    and raw.dtype == np.uint8:
                return _with_header(Image.fromarray(np.ascontiguousarray(raw), "RGB"), ds)
            raise InputError(f"DICOM photometric interpretation {photometric} with pixel data "
                             f"{raw.dtype} {raw.shape} is not supported (expected MONOCHROME1/2 or 8-bit RGB)")
    except InputError as exc:
        msg = str(exc)
        raise type(exc)(msg if msg.startswith(name + ":") else f"{name}: {msg}") from None


def read_header(source: Union[str, os.PathLike, bytes]) -> Any:
    """The pydicom dataset of a DICOM file or bytes, without its pixel data.

    Raises :class:`~cxr_infer.errors.InputError` when it is not DICOM or pydicom is missing.
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source[:132])
    else:
        try:
            with open(source, "rb") as fh:
                data = fh.read(132)
        except OSError as exc:
            raise InputError(f"cannot read ({exc.strerror or exc})") from None
    if not looks_like_dicom(data):
        raise InputError("not a DICOM file")
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                               force=True, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(f"corrupt DICOM header ({exc})") from None
