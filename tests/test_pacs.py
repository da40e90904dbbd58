"""``cxr-pacs`` against a real Orthanc (Debian package ``orthanc``): a round trip through a PACS.

Each test starts its own Orthanc on 127.0.0.1 (a free port, a throw-away storage folder, basic
authentication, StableAge 1 s; about a second) and stops it after; the tests upload studies, run
``cxr-pacs`` in a fresh process (``python -m cxr_hospital.pacs``) and read the SRs back through
Orthanc's REST API. Skipped only where the Orthanc binary is absent.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from hospital_fixtures import (
    DARK,
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

needs_orthanc = pytest.mark.skipif(orthanc_binary() is None,
                                   reason="Orthanc not installed (Debian package orthanc: apt-get install orthanc)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return intended_use_model(tmp_path_factory.mktemp("pacsmodel") / "tiny_use.onnx")


@pytest.fixture
def orthanc(tmp_path):
    if orthanc_binary() is None:
        pytest.skip("Orthanc not installed (Debian package orthanc: apt-get install orthanc)")
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


def _args(orthanc, model, *more):
    return ("--url", orthanc.url, "--username", orthanc.user, "--password-file", str(orthanc.password_file),
            "--model", str(model), "--threads", "1", *more)


def _no_secret(orthanc, r):
    assert orthanc.password not in r.stdout + r.stderr


def test_orthanc_down_at_start_is_one_clear_line_and_exit_2(model):
    port = free_port()  # nothing listens there
    r = run_pacs("--url", f"http://127.0.0.1:{port}", "--model", str(model), "--once", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cxr-pacs: Orthanc is not reachable at http://127.0.0.1:{port}")
    assert "Traceback" not in r.stderr


def test_credentials_in_the_url_are_refused(model):
    r = run_pacs("--url", "http://cxr:secret@127.0.0.1:1", "--model", str(model), "--once")
    assert r.returncode == 2 and "not in --url" in r.stderr and "secret" not in r.stderr


@needs_orthanc
def test_wrong_password_is_exit_2_and_never_echoed(orthanc, model, tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-password-91c2\n")
    r = run_pacs("--url", orthanc.url, "--username", orthanc.user, "--password-file", str(wrong), "--once")
    assert r.returncode == 2 and "refused the credentials (HTTP 401)" in r.stderr, r.stderr
    assert "not-the-password-91c2" not in r.stdout + r.stderr


@needs_orthanc
def test_round_trip_classifies_stores_srs_and_a_second_run_adds_nothing(orthanc, model):
    child, adult = study("CHILD1", "003Y", "Doe^Jane"), study("ADULT1", "067Y", "Doe^John")
    sources = {}
    for n, level in ((1, 200), (2, DARK)):
        data = xray_dicom(child, level=level, number=n)
        orthanc.upload(data)
        sources[n] = data
    orthanc.upload(text_sr_dicom(child))  # a non-image instance: skipped
    orthanc.upload(corrupt_dicom(child))  # its pixel data cannot be decoded: one error, the rest go on
    orthanc.upload(xray_dicom(adult))

    t0 = time.monotonic()
    r = run_pacs(*_args(orthanc, model, "--once"))
    first_run_s = time.monotonic() - t0
    _no_secret(orthanc, r)
    assert r.returncode == 1, r.stderr  # the corrupt image failed
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "cannot decode the DICOM pixel data" in ln]
    assert len(errors) == 1, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert "3 classified" not in summary and "2 classified, 1 not classified" in summary, summary
    assert "1 failed; 3 SRs stored" in summary, summary

    # read back through Orthanc: patient, study, reference, finding
    import pydicom
    srs = orthanc.srs(child["StudyInstanceUID"])
    assert len(srs) == 2
    by_source = {values(sr, "Source of Measurement")[0]: sr for sr in srs}
    for n, data in sources.items():
        src = pydicom.dcmread(io.BytesIO(data))
        sr = by_source[src.SOPInstanceUID]
        assert (sr.PatientID, str(sr.PatientName), sr.StudyInstanceUID) == ("CHILD1", "Doe^Jane", src.StudyInstanceUID)
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        expected = ("233604007", "SCT", "Pneumonia") if n == 1 else ("17621005", "SCT", "Normal")
        assert values(sr, "Finding") == [expected]
    assert srs[0].SeriesInstanceUID == srs[1].SeriesInstanceUID  # one cxr series per study
    (adult_sr,) = orthanc.srs(adult["StudyInstanceUID"])
    assert adult_sr.PatientID == "ADULT1"
    assert values(adult_sr, "Finding") == []
    assert values(adult_sr, "Classified by the model") == [("373067005", "SCT", "No")]
    assert values(adult_sr, "Reason outside the model's intended use") == [
        "patient age 67Y is outside the intended 1-5 years"]
    assert values(adult_sr, "Impression")[0].startswith("Not classified")
    count = len(orthanc.get("/instances"))

    # a second run (a restart) adds nothing
    r = run_pacs(*_args(orthanc, model, "--once"))
    _no_secret(orthanc, r)
    assert "0 SRs stored; 3 already had an SR" in r.stderr, r.stderr
    assert len(orthanc.get("/instances")) == count
    assert first_run_s < 60


@needs_orthanc
def test_compressed_instances_as_a_pacs_holds_them(orthanc, model, tmp_path):
    """CR and DX images usually sit in a PACS as JPEG Lossless (or JPEG-LS, JPEG 2000): Orthanc hands
    them over as stored and cxr-pacs decodes them (GDCM, the DICOM extra) to the same finding as
    the uncompressed image."""
    pytest.importorskip("gdcm")
    import pydicom
    from test_dicom import compress

    child = study("CHILD2", "004Y", "Roe^Ann")
    syntaxes = {1: "JPEGLosslessProcess14_1", 2: "JPEGLSLossless", 3: "JPEG2000Lossless"}
    uids = {}
    for n, syntax in syntaxes.items():
        path = tmp_path / f"{syntax}.dcm"
        compress(xray_dicom(child, level=200, number=n), syntax, path)
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        uids[ds.SOPInstanceUID] = syntax
        orthanc.upload(path.read_bytes())
    r = run_pacs(*_args(orthanc, model, "--once"))
    assert r.returncode == 0, r.stderr
    assert "3 classified" in r.stderr and "3 SRs stored" in r.stderr, r.stderr
    srs = orthanc.srs(child["StudyInstanceUID"])
    assert {values(sr, "Source of Measurement")[0] for sr in srs} == set(uids)
    assert all(values(sr, "Finding") == [("233604007", "SCT", "Pneumonia")] for sr in srs)


@needs_orthanc
def test_orthanc_stopped_mid_run_is_retried_and_nothing_is_lost_or_duplicated(orthanc, model):
    child = study("CHILD2", "002Y", "Poe^Max")
    for n in range(1, 9):
        orthanc.upload(xray_dicom(child, level=200 if n % 2 else DARK, number=n))
    proc = subprocess.Popen(pacs_cmd(*_args(orthanc, model, "--once", "--retries", "8", "--retry-wait", "0.2")),
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=pacs_env())
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "stored" in line:  # the first SR is in: pause cxr-pacs, stop Orthanc, restart it a second later
                os.kill(proc.pid, signal.SIGSTOP)
                orthanc.stop()
                os.kill(proc.pid, signal.SIGCONT)
                threading.Timer(1.0, orthanc.start).start()
                break
        _, rest = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while orthanc.process is None and time.monotonic() < deadline:
        time.sleep(0.1)
    text = "".join(lines)
    print(text)
    assert proc.returncode == 0, text
    assert "Orthanc did not answer" in text and "retry 1/8" in text, text
    summary = text.strip().splitlines()[-1]
    assert "8 images: 8 classified" in summary and "0 failed" in summary and " 0 retries" not in summary, summary
    srs = orthanc.srs(child["StudyInstanceUID"])
    refs = [values(sr, "Source of Measurement")[0] for sr in srs]
    assert len(refs) == len(set(refs)) == 8  # none lost, none twice


@needs_orthanc
def test_following_the_change_feed_handles_a_new_stable_study(orthanc, model):
    proc = subprocess.Popen(pacs_cmd(*_args(orthanc, model, "--poll", "0.2")), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=pacs_env())
    try:
        deadline = time.monotonic() + 60
        child = study("CHILD3", "005Y", "Moe^Liz")
        time.sleep(1.0)  # it starts, makes its first pass (nothing yet), then follows the change feed
        orthanc.upload(xray_dicom(child))
        found = []
        while not found and time.monotonic() < deadline:  # StableAge is 1 s
            time.sleep(0.3)
            try:
                found = orthanc.srs(child["StudyInstanceUID"])
            except ValueError:
                found = []
        assert len(found) == 1, "no SR appeared for the new study"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "1 images: 1 classified" in err.strip().splitlines()[-1], err
    assert orthanc.password not in err


def test_a_failed_upload_is_retried_and_a_lost_answer_is_not_a_duplicate():
    """Orthanc.store against a stand-in server: two 503s, then a stored SR whose answer is lost
    (the connection drops), then "AlreadyStored" on the retry: one SR, reported as such."""
    import http.server
    import json

    from cxr_hospital.pacs import Orthanc

    stored, answers = [], ["503", "503", "drop", "ok"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            what = answers.pop(0)
            if what == "503":
                self.send_response(503)
                self.end_headers()
                return
            status = "AlreadyStored" if body in stored else "Success"
            if body not in stored:
                stored.append(body)
            if what == "drop":  # stored, but the answer never arrives
                self.close_connection = True
                self.connection.shutdown(2)
                return
            payload = json.dumps({"ID": "x", "Status": status}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        said = []
        client = Orthanc(f"http://127.0.0.1:{server.server_port}", retries=5, retry_wait=0.01, on_retry=said.append)
        assert client.store(b"DICM-sr-bytes") == "AlreadyStored"
        assert stored == [b"DICM-sr-bytes"] and client.retried == 3 and not answers
        assert "HTTP 503" in said[0] and "retry 1/5" in said[0]
    finally:
        server.shutdown()
        server.server_close()


@needs_orthanc
def test_domain_strictness_reaches_the_srs(orthanc, tmp_path):
    """cxr-pacs --domain-threshold: the image check with the site's threshold decides what is classified,
    and the SR's reason names that threshold; a strictness the model cannot apply is one line, exit 2."""
    import numpy as np
    from conftest import build_model
    from test_domain import SIZE, gray_images

    from cxr_export import domain

    plain = tmp_path / "plain.onnx"
    plain.write_bytes(build_model(features=True, size=SIZE))
    checked = tmp_path / "checked.onnx"
    domain.add_domain_stats(plain, gray_images(120, 0), np.arange(120) % 2, gray_images(60, 1), out_path=checked,
                            threads=1, features_branch=True)
    child = study("CHILD2", "003Y")
    orthanc.upload(xray_dicom(child, level=150))
    r = run_pacs(*_args(orthanc, checked, "--once", "--domain-threshold=-1e9"))
    assert r.returncode == 0, r.stderr
    (sr,) = orthanc.srs(child["StudyInstanceUID"])
    assert values(sr, "Finding") == []
    (reason,) = values(sr, "Reason outside the model's intended use")
    assert reason.startswith("image unlike the training X-rays (domain score") and "> -1e+09" in reason
    r = run_pacs(*_args(orthanc, plain, "--once", "--domain-flag-rate", "0.1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert lines[-1].endswith("has no domain statistics, so a domain flag rate cannot apply (add them with python -m "
                              "cxr_export.domain)"), r.stderr


@needs_orthanc
def test_a_different_answer_already_in_the_pacs_is_not_hidden(orthanc, model):
    """cxr-infer --format dicom-sr classifies an adult's image (outside the intended use); that SR is
    in the PACS. cxr-pacs does not classify such an image: its answer is another SR with its own UID,
    stored beside the first, never reported as "already had an SR"; a second run adds nothing."""
    from cxr_hospital.report import model_identity
    from cxr_hospital.sr import build_sr, sr_bytes
    from cxr_infer.classifier import Classifier
    from cxr_infer.dicom import read_header

    adult = study("ADULT2", "067Y", "Doe^Joan")
    data = xray_dicom(adult)
    orthanc.upload(data)
    clf = Classifier(str(model), threads=1)
    infer_sr = build_sr(clf.predict(data), read_header(data), model_identity(clf))  # what cxr-infer writes
    orthanc.upload(sr_bytes(infer_sr))
    r = run_pacs(*_args(orthanc, model, "--once"))
    assert r.returncode == 0 and "1 SRs stored; 0 already had an SR" in r.stderr, r.stderr
    srs = {sr.SOPInstanceUID: sr for sr in orthanc.srs(adult["StudyInstanceUID"])}
    assert len(srs) == 2 and infer_sr.SOPInstanceUID in srs
    (ours,) = [sr for uid, sr in srs.items() if uid != infer_sr.SOPInstanceUID]
    assert values(ours, "Finding") == [] and values(ours, "Classified by the model") == [("373067005", "SCT", "No")]
    r = run_pacs(*_args(orthanc, model, "--once"))
    assert "0 SRs stored; 1 already had an SR" in r.stderr, r.stderr
