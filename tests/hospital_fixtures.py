"""Helpers of the hospital-integration tests (DICOM SR, FHIR, cxr-pacs): study DICOMs, a tiny
model with an intended-use block, an SR content flattener, and a throw-away Orthanc server."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from conftest import PYTHONPATH, REPO, build_model

from cxr_bench.util import stop_process

DX = "1.2.840.10008.5.1.4.1.1.1.1"
BRIGHT, DARK = 200, 30  # the tiny model: bright -> PNEUMONIA, dark -> NORMAL


def intended_use_model(path: Path) -> Path:
    """The tiny model (conftest.build_model) with the Kermany intended-use block (1-5 years, PA/AP, CR/DX/DR)."""
    from cxr_infer.intended_use import KERMANY
    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="tiny", precision="fp32", threshold=0.5, provenance={"note": "tests"}).to_dict()
    spec["intended_use"] = dict(KERMANY)
    path.write_bytes(build_model(spec=spec))
    return path


def study(patient_id: str = "CHILD1", age: str = "003Y", name: str = "Test^Child") -> Dict[str, str]:
    """Patient and study attributes of one new study."""
    from pydicom.uid import generate_uid

    return {"PatientID": patient_id, "PatientName": name, "PatientAge": age, "PatientSex": "F",
            "PatientBirthDate": "", "StudyInstanceUID": generate_uid(), "StudyDate": "20240115",
            "StudyTime": "101500", "AccessionNumber": f"ACC-{patient_id}", "StudyID": "1",
            "ReferringPhysicianName": "", "SeriesInstanceUID": generate_uid(), "SeriesNumber": "1"}


def xray_dicom(attrs: Dict[str, str], level: int = BRIGHT, number: int = 1, size: int = 64, **more: Any) -> bytes:
    """An 8-bit DX image of one gray ``level`` (tiny model: bright -> PNEUMONIA) in the study ``attrs``."""
    from test_dicom import make_dicom

    pixels = np.full((size, size), level, np.uint8)
    pixels[::7, ::5] = 255 - level  # not flat
    fields = dict(attrs, InstanceNumber=str(number), ViewPosition="PA", BodyPartExamined="CHEST", **more)
    return make_dicom(pixels, **fields)


def corrupt_dicom(attrs: Dict[str, str]) -> bytes:
    """A DX instance whose header is fine but whose pixel data is cut short (cannot be decoded)."""
    import io

    from pydicom import dcmread

    ds = dcmread(io.BytesIO(xray_dicom(attrs, number=9)))
    ds.PixelData = ds.PixelData[:100]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def text_sr_dicom(attrs: Dict[str, str]) -> bytes:
    """A non-image instance (an SR of someone else) in its own series of the study."""
    from pydicom.uid import generate_uid
    from test_dicom import make_dicom

    return make_dicom(np.zeros((1, 1), np.uint8), sop="1.2.840.10008.5.1.4.1.1.88.11", with_pixels=False,
                      **dict(attrs, SeriesInstanceUID=generate_uid(), SeriesNumber="50"))


def flatten(ds: Any) -> List[Tuple[str, str, Any]]:
    """An SR's content tree as ``(value type, concept meaning, value)`` rows, depth first.

    CODE values are ``(code, scheme, meaning)``, NUM values floats, IMAGE values the
    referenced SOP Instance UID, TEXT/UIDREF strings, CONTAINER ``None``.
    """
    rows: List[Tuple[str, str, Any]] = []

    def walk(item: Any) -> None:
        kind = item.ValueType
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if kind == "CODE":
            c = item.ConceptCodeSequence[0]
            value: Any = (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
        elif kind == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        elif kind == "TEXT":
            value = item.TextValue
        elif kind == "UIDREF":
            value = item.UID
        else:
            value = None
        rows.append((kind, name, value))
        for child in item.get("ContentSequence", []):
            walk(child)

    walk(ds)
    return rows


def values(ds: Any, meaning: str) -> List[Any]:
    """The values of every content item of ``ds`` whose concept is ``meaning``."""
    return [v for _, name, v in flatten(ds) if name == meaning]


# ---------------------------------------------------------------- Orthanc


def orthanc_binary() -> Optional[str]:
    """The Orthanc executable (Debian package ``orthanc``), or None."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian package orthanc-dicomweb


class OrthancServer:
    """A throw-away Orthanc on 127.0.0.1: free port, its own storage folder, basic auth, StableAge 1 s.

    ``dicom=True`` also starts its DICOM server (AE title ORTHANC, a free port, any caller may
    store); ``dicomweb=True`` loads the DICOMweb plugin (``self.dicomweb`` is its root URL).
    ``settings`` are more configuration options (such as ``DicomTlsEnabled``).
    """

    user, password = "cxr", "pw-not-to-be-echoed-7f3a"
    aet = "ORTHANC"

    def __init__(self, root: Path, dicom: bool = False, dicomweb: bool = False,
                 settings: Optional[Dict[str, Any]] = None) -> None:
        self.root = root
        self.port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        (root / "db").mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "cxr-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.port, "DicomPort": self.dicom_port, "DicomServerEnabled": dicom, "DicomAet": self.aet,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomThreadsCount": 4,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password}, "StableAge": 1, "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "StorageCompression": False, **(settings or {})}))
        self.password_file = root / "password.txt"
        self.password_file.write_text(self.password + "\n")
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> None:
        binary = orthanc_binary()
        assert binary, "no Orthanc binary"
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=str(self.root))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=20)
        self.process = None

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> bytes:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def upload(self, data: bytes) -> Dict[str, Any]:
        return json.loads(self.request("POST", "/instances", data))

    def study_id(self, study_instance_uid: str) -> str:
        (found,) = [m["ID"] for m in json.loads(self.request("POST", "/tools/lookup", study_instance_uid.encode()))
                    if m["Type"] == "Study"]
        return found

    def srs(self, study_instance_uid: str) -> List[Any]:
        """Every SR instance of a study, read back as pydicom datasets."""
        import io

        from pydicom import dcmread

        out = []
        for series in self.get(f"/studies/{self.study_id(study_instance_uid)}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                for inst in series["Instances"]:
                    ds = dcmread(io.BytesIO(self.request("GET", f"/instances/{inst}/file")))
                    if ds.get("Manufacturer") == "cxr":
                        out.append(ds)
        return out


def pacs_cmd(*args: str) -> List[str]:
    """``python -m cxr_hospital.pacs ARGS`` in a fresh process."""
    return [sys.executable, "-m", "cxr_hospital.pacs", *args]


def pacs_env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, PYTHONIOENCODING="utf-8")
    for key in ("CXR_PACS_URL", "CXR_PACS_USERNAME", "CXR_PACS_PASSWORD"):
        env.pop(key, None)
    return env


def run_pacs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(pacs_cmd(*args), capture_output=True, text=True, env=pacs_env(), timeout=timeout,
                          cwd=str(REPO))
