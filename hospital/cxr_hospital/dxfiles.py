"""``python -m cxr_hospital.dxfiles``: image files as DX DICOM instances, to send to ``cxr-node``.

Each image (JPEG, PNG) becomes an 8-bit MONOCHROME2 DX instance (explicit VR little endian) in a
study of its own, with a made-up patient ID (``CXRTEST-0001`` ...), view PA and body part CHEST.
``--count N`` repeats the images as needed (new UIDs each time) to make N instances. For tests
and benchmarks of the DICOM path; nothing clinical.

Examples:
    $ python -m cxr_hospital.dxfiles ../shared/data/chest_xray_224/test dx/
    dxfiles: wrote 624 DX instances into dx/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

SUFFIXES = (".jpeg", ".jpg", ".png")
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def images_in(source: Path) -> List[Path]:
    """The image files under ``source`` (recursively, sorted), or ``source`` itself."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.suffix.lower() in SUFFIXES)


def dx_bytes(image: Path, number: int) -> bytes:
    """One image as a DX instance (Part 10 bytes) of study number ``number``."""
    import io

    import numpy as np
    from PIL import Image

    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    except ImportError:
        raise ValueError("writing DICOM needs pydicom: pip install 'cxr[dicom]'") from None

    pixels = np.asarray(Image.open(image).convert("L"))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "DX", f"CXRTEST-{number:04d}", f"Test^{number:04d}"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", "1", "1", f"T{number:06d}"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = \
        "20240101", "120000", "", "", "O"
    ds.ViewPosition, ds.BodyPartExamined, ds.ImageComments = "PA", "CHEST", image.name
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dx(source: Path, out: Path, count: Optional[int] = None) -> int:
    """Write DX instances of the images under ``source`` into ``out``; how many were written."""
    images = images_in(source)
    if not images:
        raise ValueError(f"{source}: no JPEG or PNG images there")
    out.mkdir(parents=True, exist_ok=True)
    total = count or len(images)
    for k in range(total):
        (out / f"{k + 1:05d}.dcm").write_bytes(dx_bytes(images[k % len(images)], k + 1))
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cxr_hospital.dxfiles``; the exit status."""
    p = argparse.ArgumentParser(prog="python -m cxr_hospital.dxfiles", description=__doc__.split("\n\n")[0],
                                epilog="example: python -m cxr_hospital.dxfiles ../shared/data/chest_xray_224/test "
                                       "dx/ --count 1000")
    p.add_argument("source", type=Path, help="an image file or a folder of them (searched recursively)")
    p.add_argument("out", type=Path, help="folder for the DX instances (made if missing)")
    p.add_argument("--count", type=int, metavar="N", help="instances to write (default: one per image)")
    args = p.parse_args(argv)
    try:
        n = write_dx(args.source, args.out, args.count)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"dxfiles: {exc}\n")
        return 2
    sys.stderr.write(f"dxfiles: wrote {n} DX instances into {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
