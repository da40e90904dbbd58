"""``cxr-node`` between real peers: dcmtk's ``storescu`` plays the modality, Orthanc (Debian packages
``orthanc``, ``orthanc-dicomweb``) is the destination through its DICOM server or its DICOMweb plugin.

Each test starts its own Orthanc and node on 127.0.0.1 (free ports, throw-away folders) with the
tiny model, and stops them after. The large cases (200 instances from 4 concurrent senders, a
SIGKILL mid-stream) are marked slow; ``.ci/run`` runs them in their own step. Skipped where
Orthanc, the DICOMweb plugin, dcmtk or pynetdicom is absent.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")

from hospital_fixtures import (
    DARK,
    DICOMWEB_PLUGIN,
    OrthancServer,
    corrupt_dicom,
    free_port,
    intended_use_model,
    orthanc_binary,
    pacs_cmd,
    pacs_env,
    run_pacs,
    study,
    text_sr_dicom,
    values,
    xray_dicom,
)


def dcmtk(tool: str) -> Optional[str]:
    """A dcmtk binary (Debian package ``dcmtk``), never pynetdicom's command of the same name."""
    for path in (f"/usr/bin/{tool}", shutil.which(tool)):
        if path and os.access(path, os.X_OK):
            r = subprocess.run([path, "--version"], capture_output=True, text=True)
            if "dcmtk" in (r.stdout + r.stderr).lower():
                return path
    return None


pytestmark = [
    pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc not installed (apt-get install orthanc)"),
    pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="no DICOMweb plugin (apt-get install orthanc-dicomweb)"),
    pytest.mark.skipif(dcmtk("storescu") is None, reason="dcmtk not installed (apt-get install dcmtk)"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return intended_use_model(tmp_path_factory.mktemp("nodemodel") / "tiny_use.onnx")


@pytest.fixture
def orthanc(tmp_path):
    server = OrthancServer(tmp_path / "orthanc", dicom=True, dicomweb=True)
    server.start()
    yield server
    server.stop()


class Node:
    """A ``cxr-node`` process (``python -m cxr_hospital.node``) with its log in a file."""

    def __init__(self, tmp: Path, model: Path, *args: str, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.state = tmp / "state"
        self.log = tmp / f"node-{time.monotonic_ns()}.log"
        self.args = ["--listen", f"127.0.0.1:{self.port}", "--ae-title", "CXR", "--state", str(self.state),
                     "--model", str(model), "--threads", "1", "--retry-wait", "0.2", "--max-wait", "1", *args]
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Node":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "cxr_hospital.node", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, env=pacs_env())
        deadline = time.monotonic() + 60
        while "listening on" not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(60)

    def status(self) -> dict:
        import json

        r = subprocess.run([sys.executable, "-m", "cxr_hospital.node", "--status", str(self.state), "--json"],
                           capture_output=True, text=True, env=pacs_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_stored(self, n: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if s["counts"]["stored"] >= n or time.monotonic() > deadline:
                return s
            time.sleep(0.3)


def storescu(port: int, files: List[Path], *more: str, aet: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "CXR", *more, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def write(folder: Path, blobs: List[bytes]) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, data in enumerate(blobs):
        path = folder / f"{k:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def sources_of(orthanc: OrthancServer, study_uid: str) -> List[str]:
    return [values(sr, "Source of Measurement")[0] for sr in orthanc.srs(study_uid)]


def test_storescu_to_node_to_orthanc(orthanc, model, tmp_path):
    """Six DX images (one of them twice, one with cut-short pixel data), a non-image and a caller
    not on the allow-list: one SR per image in Orthanc (the unreadable one says it could not be
    read), the non-image ignored in one line, the stranger rejected, no patient data in the log."""
    child = study("CHILD9", "003Y", "Secret^Name")
    images = [xray_dicom(child, level=200 if n % 2 else DARK, number=n) for n in range(1, 6)]
    files = write(tmp_path / "in", images + [images[0], corrupt_dicom(child), text_sr_dicom(child)])
    node = Node(tmp_path, model, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                "--allow", "MODALITY@127.0.0.1").start()
    try:
        stranger = storescu(node.port, files[:1], aet="STRANGER")
        assert stranger.returncode != 0
        r = storescu(node.port, files)
        assert r.returncode == 0, r.stdout + r.stderr
        s = node.wait_stored(6)
    finally:
        assert node.stop() == 0
    log = node.text()
    assert s["counts"] == {"received": 0, "classified": 0, "stored": 6, "failed": 0, "ignored": 1}, (s, log)
    assert s["latency_p50_s"] is not None and s["latency_p95_s"] >= s["latency_p50_s"]
    assert "rejected an association from STRANGER at 127.0.0.1" in log
    assert "received DX from MODALITY again (one job)" in log
    assert len([ln for ln in log.splitlines() if "ignored, SOP class 1.2.840.10008.5.1.4.1.1.88.11" in ln]) == 1
    assert "Secret" not in log and "CHILD9" not in log and "Traceback" not in log
    srs = orthanc.srs(child["StudyInstanceUID"])
    refs = [values(sr, "Source of Measurement")[0] for sr in srs]
    assert len(refs) == len(set(refs)) == 6
    unread = [sr for sr in srs if values(sr, "Impression")[0].startswith("Not classified: the image could not be read")]
    assert len(unread) == 1 and values(unread[0], "Finding") == []
    findings = sorted(values(sr, "Finding")[0][2] for sr in srs if sr not in unread)
    assert findings == ["Normal", "Normal", "Pneumonia", "Pneumonia", "Pneumonia"]
    assert all(sr.PatientID == "CHILD9" for sr in srs)  # the SR still belongs to the patient's study


def test_an_allowed_title_calling_from_another_host_is_aborted(model, tmp_path):
    """--allow MODALITY@HOST: the same AE title from any other address is aborted in one line and
    nothing of it is queued; a title allowed from everywhere (--allow OTHER) still gets in."""
    node = Node(tmp_path, model, "--send-to", f"ORTHANC@127.0.0.1:{free_port()}", "--allow", "MODALITY@192.0.2.7",
                "--allow", "OTHER").start()
    files = write(tmp_path / "in", [xray_dicom(study("CHILD4", "004Y"), number=1)])
    try:
        assert storescu(node.port, files).returncode != 0
        assert storescu(node.port, files, aet="OTHER").returncode == 0
        s = node.status()
    finally:
        assert node.stop() == 0
    log = node.text()
    assert "rejected an association from MODALITY at 127.0.0.1: not on the allow-list from that address" in log
    assert "received DX from OTHER" in log and "received DX from MODALITY" not in log
    assert sum(s["counts"].values()) == 1, s  # OTHER's image, waiting for the destination
    assert "Traceback" not in log


def test_destination_down_then_back_and_a_restart_resumes(orthanc, model, tmp_path):
    """Orthanc is down while images arrive: the node keeps them and retries; it is stopped with
    SIGTERM, restarted, and once Orthanc is back every SR arrives, each once."""
    child = study("CHILD8", "004Y")
    files = write(tmp_path / "in", [xray_dicom(child, number=n) for n in range(1, 5)])
    orthanc.stop()
    node = Node(tmp_path, model, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}").start()
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 60
    while "retry 2 in" not in node.text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.stop() == 0  # SIGTERM: the current job finishes, the rest waits in the state folder
    assert "no association with ORTHANC" in node.text()
    waiting = node.status()["counts"]
    assert waiting["classified"] + waiting["received"] == 4 and waiting["stored"] == 0
    orthanc.start()
    node = Node(tmp_path, model, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", port=node.port).start()
    try:
        assert "4 jobs pending" in node.text()
        assert node.wait_stored(4)["counts"]["stored"] == 4
    finally:
        node.stop()
    refs = sources_of(orthanc, child["StudyInstanceUID"])
    assert len(refs) == len(set(refs)) == 4


def test_tls_and_stow_rs(orthanc, model, tmp_path):
    """DICOM over TLS with client certificates (a plain caller is refused) and SRs stored by STOW-RS."""
    pem = _certificates(tmp_path / "tls")
    child = study("CHILD7", "002Y")
    files = write(tmp_path / "in", [xray_dicom(child, number=n) for n in range(1, 4)])
    node = Node(tmp_path, model, "--send-to-dicomweb", orthanc.dicomweb, "--username", orthanc.user,
                "--password-file", str(orthanc.password_file), "--tls-cert", str(pem["node.pem"]),
                "--tls-key", str(pem["node.key"]), "--tls-ca", str(pem["ca.pem"])).start()
    try:
        assert "(TLS on)" in node.text()
        assert storescu(node.port, files[:1]).returncode != 0  # no TLS: no association
        r = storescu(node.port, files, "+tls", str(pem["modality.key"]), str(pem["modality.pem"]),
                     "+cf", str(pem["ca.pem"]))
        assert r.returncode == 0, r.stdout + r.stderr
        assert node.wait_stored(3)["counts"]["stored"] == 3, node.text()
    finally:
        node.stop()
    assert orthanc.password not in node.text()
    refs = sources_of(orthanc, child["StudyInstanceUID"])
    assert len(refs) == len(set(refs)) == 3


def _certificates(folder: Path) -> dict:
    """A CA and three certificates it signed (the node's, the modality's and the PACS's), made with openssl."""
    folder.mkdir(parents=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=cxr test CA")
    for name in ("node", "modality", "pacs"):  # each for the host 127.0.0.1, where every peer runs
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy")
    return {p.name: p for p in folder.iterdir()}


def test_srs_go_to_a_pacs_over_dicom_tls(model, tmp_path):
    """--send-tls-ca/--send-tls-cert/--send-tls-key: the SRs reach an Orthanc that speaks DICOM only
    over TLS and asks callers for a certificate; a node without its own certificate gets no
    association, says so and keeps the SR for a later try."""
    pem = _certificates(tmp_path / "pki")
    orthanc = OrthancServer(tmp_path / "orthanc", dicom=True, settings={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pem["pacs.pem"]),
        "DicomTlsPrivateKey": str(pem["pacs.key"]), "DicomTlsTrustedCertificates": str(pem["ca.pem"]),
        "DicomTlsRemoteCertificateRequired": True})
    orthanc.start()
    child = study("CHILD5", "004Y")
    files = write(tmp_path / "in", [xray_dicom(child, number=n) for n in (1, 2)])
    to = ("--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--send-tls-ca", str(pem["ca.pem"]))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    try:
        node = Node(tmp_path / "a", model, *to, "--send-tls-cert", str(pem["node.pem"]), "--send-tls-key",
                    str(pem["node.key"])).start()
        try:
            assert "over TLS" in node.text()
            assert storescu(node.port, files).returncode == 0
            assert node.wait_stored(2)["counts"]["stored"] == 2, node.text()
        finally:
            assert node.stop() == 0
        assert len(sources_of(orthanc, child["StudyInstanceUID"])) == 2
        anonymous = Node(tmp_path / "b", model, *to).start()
        try:
            assert storescu(anonymous.port, files[:1]).returncode == 0
            deadline = time.monotonic() + 60
            while "retry 2" not in anonymous.text() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            assert anonymous.stop() == 0
        assert "SR not stored (no association with ORTHANC@127.0.0.1" in anonymous.text()
        assert "over TLS (is it up" in anonymous.text() and "Traceback" not in anonymous.text()
        assert anonymous.status()["counts"]["stored"] == 0
    finally:
        orthanc.stop()


def test_usage_errors_are_one_line_and_exit_2(model, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxr_hospital.node", *args], capture_output=True, text=True,
                              env=pacs_env(), timeout=60)

    cases = [((), "--state DIR is needed"),
             (("--state", str(tmp_path / "s")), "say where the SRs go"),
             (("--state", str(tmp_path / "s"), "--send-to", "PACS"), "is not AET@HOST:PORT"),
             (("--state", str(tmp_path / "s"), "--send-to", "P@h:1", "--tls-cert", "x.pem"), "needs both"),
             (("--state", str(tmp_path / "s"), "--send-to", "P@h:1", "--send-tls-cert", "x.pem"), "--send-tls-ca"),
             (("--state", str(tmp_path / "s"), "--send-to", "P@h:1", "--send-tls-ca", str(tmp_path / "no.pem")),
              "cannot load --send-tls-ca"),
             (("--status", str(tmp_path / "none")), "holds no cxr-node job table")]
    for args, words in cases:
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cxr_pacs_over_dicomweb(orthanc, model):
    """cxr-pacs --dicomweb: QIDO-RS finds the CR/DX images, WADO-RS fetches them, STOW-RS stores the
    SRs; a second run adds nothing."""
    child, adult = study("CHILD6", "003Y"), study("ADULT6", "067Y")
    for n in (1, 2):
        orthanc.upload(xray_dicom(child, level=200 if n == 1 else DARK, number=n))
    orthanc.upload(xray_dicom(adult))
    args = ("--dicomweb", orthanc.dicomweb, "--username", orthanc.user, "--password-file",
            str(orthanc.password_file), "--model", str(model), "--threads", "1", "--once")
    r = run_pacs(*args)
    assert r.returncode == 0, r.stderr
    assert "2 classified, 1 not classified" in r.stderr and "3 SRs stored" in r.stderr, r.stderr
    assert orthanc.password not in r.stderr
    assert sorted(values(sr, "Finding")[0][2] for sr in orthanc.srs(child["StudyInstanceUID"])) == \
        ["Normal", "Pneumonia"]
    (sr,) = orthanc.srs(adult["StudyInstanceUID"])
    assert values(sr, "Classified by the model") == [("373067005", "SCT", "No")]
    r = run_pacs(*args)
    assert "0 SRs stored; 3 already had an SR" in r.stderr, r.stderr


def test_cxr_pacs_follows_a_dicomweb_service(orthanc, model):
    """cxr-pacs --dicomweb without --once: a pass every --poll seconds classifies a study stored
    after it started, later passes add nothing, and SIGTERM ends it with exit 0 and the counts."""
    args = ("--dicomweb", orthanc.dicomweb, "--username", orthanc.user, "--password-file",
            str(orthanc.password_file), "--model", str(model), "--threads", "1", "--poll", "0.2")
    proc = subprocess.Popen(pacs_cmd(*args), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=pacs_env())
    child = study("CHILD7", "002Y")
    try:
        time.sleep(1.0)  # started: its passes find nothing yet
        orthanc.upload(xray_dicom(child, number=1))
        deadline, found = time.monotonic() + 60, []
        while not found and time.monotonic() < deadline:
            time.sleep(0.3)
            found = orthanc.srs(child["StudyInstanceUID"])
        assert len(found) == 1, "no SR appeared for the study stored after the start"
        time.sleep(1.0)  # several more passes
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "1 images: 1 classified" in err.strip().splitlines()[-1], err
    assert len(orthanc.srs(child["StudyInstanceUID"])) == 1
    assert orthanc.password not in err and "Traceback" not in err


def _send_parallel(port: int, groups: List[List[Path]]) -> List[subprocess.CompletedProcess]:
    results: List[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda g=g: results.append(storescu(port, g))) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_200_instances_from_4_senders_give_200_srs(orthanc, model, tmp_path):
    studies = [study(f"CHILD{k}", "003Y") for k in range(4)]
    groups = [write(tmp_path / f"in{k}", [xray_dicom(st, number=n) for n in range(1, 51)])
              for k, st in enumerate(studies)]
    node = Node(tmp_path, model, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--allow",
                "MODALITY").start()
    try:
        assert all(r.returncode == 0 for r in _send_parallel(node.port, groups))
        s = node.wait_stored(200, timeout=300)
    finally:
        node.stop()
    assert s["counts"]["stored"] == 200, s
    for st in studies:
        refs = sources_of(orthanc, st["StudyInstanceUID"])
        assert len(refs) == len(set(refs)) == 50


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(orthanc, model, tmp_path):
    """The node is killed (SIGKILL) while 4 senders stream 160 images; restarted, and the senders send
    everything again (what a modality does with failed transfers): every image gets exactly one SR."""
    studies = [study(f"CHILD{k}", "003Y") for k in range(4)]
    groups = [write(tmp_path / f"in{k}", [xray_dicom(st, number=n) for n in range(1, 41)])
              for k, st in enumerate(studies)]
    dest = ("--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    node = Node(tmp_path, model, *dest).start()

    def kill_when_half_received() -> None:
        while node.text().count("received DX") < 60:
            time.sleep(0.05)
        node.process.kill()

    killer = threading.Thread(target=kill_when_half_received)
    killer.start()
    _send_parallel(node.port, groups)
    killer.join()
    node.process.wait(30)
    acknowledged = node.status()["counts"]
    assert 0 < sum(acknowledged.values()) < 160, acknowledged
    node = Node(tmp_path, model, *dest, port=node.port).start()
    try:
        assert all(r.returncode == 0 for r in _send_parallel(node.port, groups))
        s = node.wait_stored(160, timeout=300)
    finally:
        node.stop()
    assert s["counts"]["stored"] == 160, s
    for st in studies:
        refs = sources_of(orthanc, st["StudyInstanceUID"])
        assert len(refs) == len(set(refs)) == 40


def test_cxr_bench_node_writes_its_report(model, tmp_path):
    """cxr-bench node on the tiny model: two small cases (1 and 2 senders) between dcmtk peers; the
    report has throughput, latency and a memory profile, and renders."""
    import json

    import numpy as np
    from PIL import Image

    from cxr_bench import cli

    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        Image.fromarray(np.full((64, 64), 40 + 60 * k, np.uint8)).save(images / f"x{k}.png")
    out = tmp_path / "out"
    assert cli.main(["node", "--images", str(images), "--model", str(model), "--senders", "1,2", "--counts",
                     "3,4", "--threads", "1", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "node.json").read_text())
    assert [(c["senders"], c["instances"], c["counts"]["stored"]) for c in report["cases"]] == [(1, 3, 3), (2, 4, 4)]
    assert all(c["instances_per_s"] > 0 and c["latency_p95_s"] >= c["latency_p50_s"] for c in report["cases"])
    assert "## Memory over 4 instances" in (out / "node.md").read_text()
