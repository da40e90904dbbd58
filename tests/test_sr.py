"""DICOM SR output: ``cxr_hospital.sr.build_sr`` and ``cxr-infer --format dicom-sr --output DIR``.

The SR's content is read back item by item, and ``dciodvfy`` (Debian package dicom3tools)
checks each object against the Comprehensive SR IOD when it is installed.
"""
from __future__ import annotations

import io
import shutil
import subprocess

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from conftest import REPO, run_cli
from hospital_fixtures import DARK, intended_use_model, study, values, xray_dicom
from pydicom import dcmread

from cxr_hospital.report import ModelIdentity, model_identity
from cxr_hospital.sr import COMPREHENSIVE_SR, build_sr, sr_bytes
from cxr_infer.dicom import read_header

SAMPLE = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return intended_use_model(tmp_path_factory.mktemp("srmodel") / "tiny_use.onnx")


@pytest.fixture(scope="module")
def clf(model):
    from cxr_infer import Classifier
    return Classifier(model, threads=1)


@pytest.fixture(scope="module")
def child():
    return study("CHILD1", "003Y", "Doe^Jane")


@pytest.fixture(scope="module")
def adult():
    return study("ADULT1", "067Y", "Doe^John")


def _sr(clf, data: bytes, classified: bool = True):
    pred = clf.predict(data)
    return pred, build_sr(pred, read_header(data), model_identity(clf), classified=classified)


def test_sr_of_a_pneumonia_result(clf, child):
    data = xray_dicom(child)
    src = dcmread(io.BytesIO(data))
    pred, sr = _sr(clf, data)
    assert pred.label == "PNEUMONIA"
    # the source's patient and study, a new series, an SR
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR" and sr.Manufacturer == "cxr"
    for key in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert str(sr.get(key)) == str(src.get(key)), key
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    # the evidence sequence and the IMAGE content item reference the source image
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    (ref,) = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    assert values(sr, "Source of Measurement") == [src.SOPInstanceUID]
    # the finding as a code and in words, the probability, the threshold
    assert values(sr, "Finding") == [("233604007", "SCT", "Pneumonia")]
    assert values(sr, "Probability of pneumonia") == [pytest.approx(pred.probability, abs=1e-6)]
    assert values(sr, "Threshold Value") == [0.5]
    (impression,) = values(sr, "Impression")
    assert impression.startswith("PNEUMONIA: probability of PNEUMONIA") and "threshold 0.5" in impression
    assert any("not a diagnosis" in v for v in values(sr, "Comment"))
    # the model as the observer device
    identity = model_identity(clf)
    assert values(sr, "Observer Type") == [("121007", "DCM", "Device")]
    assert values(sr, "Device Observer UID") == [identity.device_uid]
    assert values(sr, "Device Observer Name") == [f"cxr {identity.cxr_version} tiny fp32"]
    assert values(sr, "Device Observer Serial Number") == [identity.sha256]
    params = values(sr, "Algorithm Parameters")
    assert f"sha256: {identity.sha256}" in params and "threshold: 0.5" in params and "backbone: tiny" in params
    assert values(sr, "Procedure reported") == [("399208008", "SCT", "Plain chest X-ray")]
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CXR"


def test_sr_of_a_normal_result_and_of_an_image_outside_the_intended_use(clf, child, adult):
    _, normal = _sr(clf, xray_dicom(child, level=DARK, number=2))
    assert values(normal, "Finding") == [("17621005", "SCT", "Normal")]

    pred, outside = _sr(clf, xray_dicom(adult))  # classified all the same (no --reject-out-of-domain)
    assert pred.in_domain is False
    assert values(outside, "Within the model's intended use") == [("373067005", "SCT", "No")]
    assert values(outside, "Reason outside the model's intended use") == [
        "patient age 67Y is outside the intended 1-5 years"]
    assert values(outside, "Finding")  # the label is there, with the reason beside it

    _, rejected = _sr(clf, xray_dicom(adult, number=2), classified=False)
    assert values(rejected, "Finding") == [] and values(rejected, "Probability of pneumonia") == []
    assert values(rejected, "Classified by the model") == [("373067005", "SCT", "No")]
    (impression,) = values(rejected, "Impression")
    assert impression.startswith("Not classified") and "67Y" in impression


def test_sr_uid_depends_only_on_image_model_thresholds_and_answer(clf, child):
    from cxr_hospital.report import Answer

    data = xray_dicom(child, number=3)
    header = read_header(data)
    pred = clf.predict(data)
    m = model_identity(clf)
    first, again = build_sr(pred, header, m), build_sr(pred, header, m)
    assert first.SOPInstanceUID == again.SOPInstanceUID == m.sr_uid(header.SOPInstanceUID, Answer.of(pred))
    assert len(first.SOPInstanceUID) <= 64
    other = ModelIdentity(m.name, m.backbone, m.precision, m.sha256, m.cxr_version, 0.3)
    assert build_sr(pred, header, other).SOPInstanceUID != first.SOPInstanceUID


def test_two_answers_about_one_image_never_share_a_uid(clf, adult):
    """cxr-infer classifies an adult's image (and says it is outside the intended use); cxr-pacs and
    cxr-node do not classify it; an unreadable copy is a third answer: three SRs, three UIDs, and each
    answer given again keeps its UID (even with a probability that differs in the last digits)."""
    import dataclasses

    from cxr_hospital.report import Answer

    data = xray_dicom(adult, number=5)
    header, pred, m = read_header(data), clf.predict(data), model_identity(clf)
    assert pred.in_domain is False
    srs = [build_sr(pred, header, m), build_sr(pred, header, m, classified=False),
           build_sr(None, header, m, classified=False, problem="cannot decode the DICOM pixel data")]
    assert len({sr.SOPInstanceUID for sr in srs}) == 3
    assert len({sr.SeriesInstanceUID for sr in srs}) == 1  # one cxr series per study and model
    nudged = dataclasses.replace(pred, probability=pred.probability - 1e-7)
    assert build_sr(nudged, header, m).SOPInstanceUID == srs[0].SOPInstanceUID
    assert build_sr(nudged, header, m, classified=False).SOPInstanceUID == srs[1].SOPInstanceUID
    normal = dataclasses.replace(pred, label="NORMAL")
    assert build_sr(normal, header, m).SOPInstanceUID != srs[0].SOPInstanceUID
    # the image check's numbers are not part of the answer, which test fired is
    a = Answer.of(dataclasses.replace(pred, domain_reasons=("image unlike the training X-rays (domain score 1.23 > 1; "
                                                            "test that fired: texture)",)), classified=False)
    b = Answer.of(dataclasses.replace(pred, domain_reasons=("image unlike the training X-rays (domain score 1.24 > 1; "
                                                            "test that fired: texture)",)), classified=False)
    assert a.key == b.key and "texture" in a.key
    unread = srs[2]
    assert values(unread, "Finding") == [] and values(unread, "Probability of pneumonia") == []
    assert values(unread, "Classified by the model") == [("373067005", "SCT", "No")]
    assert values(unread, "Within the model's intended use") == []  # nothing is known about it
    assert values(unread, "Impression") == ["Not classified: the image could not be read: cannot decode the DICOM "
                                            "pixel data"]


def test_header_without_study_uid_is_one_clear_error(clf):
    import numpy as np
    from test_dicom import make_dicom

    from cxr_infer.errors import InputError

    data = make_dicom(np.full((32, 32), 90, np.uint8))  # no StudyInstanceUID, no SeriesInstanceUID
    with pytest.raises(InputError, match="lacks StudyInstanceUID, SeriesInstanceUID"):
        build_sr(clf.predict(data), read_header(data), model_identity(clf))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)")
def test_dciodvfy_finds_no_error(clf, child, adult, tmp_path):
    unread = xray_dicom(child, number=6)
    srs = {name: _sr(clf, data, classified)[1] for name, data, classified in (
        ("pneumonia", xray_dicom(child), True), ("normal", xray_dicom(child, DARK), True),
        ("outside", xray_dicom(adult), True), ("rejected", xray_dicom(adult), False))}
    srs["unreadable"] = build_sr(None, read_header(unread), model_identity(clf), False, problem="cut short")
    for name, sr in srs.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(sr_bytes(sr))
        r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = r.stdout + r.stderr
        assert "ComprehensiveSR" in report, report
        errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
        assert not errors, f"{name}: " + "\n".join(errors)
        # the only warnings allowed: cxr's private coding scheme designator (declared in the header)
        warnings = [ln for ln in report.splitlines() if ln.startswith("Warning") and "99CXR" not in ln]
        assert not warnings, f"{name}: " + "\n".join(warnings)


# ---------------------------------------------------------------- the CLI


def test_cli_writes_one_sr_per_dicom_input_and_names_the_rest(model, child, adult, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.dcm").write_bytes(xray_dicom(child, number=1))
    (scans / "b.dcm").write_bytes(xray_dicom(child, level=DARK, number=2))
    (scans / "adult.dcm").write_bytes(xray_dicom(adult))
    shutil.copy(SAMPLE, scans / "photo.jpeg")
    out = tmp_path / "sr"
    r = run_cli("--model", str(model), "--format", "dicom-sr", "--output", str(out), str(scans))
    assert r.returncode == 1, r.stderr
    err = r.stderr.decode().splitlines()
    assert [ln for ln in err if "photo.jpeg" in ln] == [f"cxr-infer: {scans / 'photo.jpeg'}: not a DICOM file: "
                                                         "--format dicom-sr writes an SR into the source image's "
                                                         "study, so needs DICOM inputs"]
    assert "Traceback" not in r.stderr.decode()
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 3 and not list(out.glob("*.part"))
    listed = dict(line.split("\t") for line in r.stdout.decode().splitlines())
    assert sorted(listed.values()) == sorted(str(p) for p in written)
    sr = dcmread(listed[str(scans / "adult.dcm")])
    assert sr.PatientID == "ADULT1" and values(sr, "Reason outside the model's intended use")
    # a second run writes the same files again, never a second SR of an image
    before = {p.name: p.stat().st_size for p in written}
    r = run_cli("--model", str(model), "--format", "dicom-sr", "--output", str(out), str(scans))
    assert r.returncode == 1
    assert {p.name for p in out.glob("*.dcm")} == set(before)


def test_cli_reject_out_of_domain_writes_a_not_classified_sr(model, adult, tmp_path):
    src = tmp_path / "adult.dcm"
    src.write_bytes(xray_dicom(adult, number=5))
    r = run_cli("--model", str(model), "--format", "dicom-sr", "--output", str(tmp_path / "sr"),
                "--reject-out-of-domain", str(src))
    assert r.returncode == 1  # not classified counts as failed, as for every format
    assert "not classified: outside the model's intended use: patient age 67Y" in r.stderr.decode()
    (path,) = (tmp_path / "sr").glob("*.dcm")
    sr = dcmread(path)
    assert values(sr, "Finding") == [] and values(sr, "Impression")[0].startswith("Not classified")


def test_cli_usage_errors(model, child, tmp_path):
    src = tmp_path / "a.dcm"
    src.write_bytes(xray_dicom(child))
    r = run_cli("--model", str(model), "--format", "dicom-sr", str(src))
    assert r.returncode == 2 and "--output DIR" in r.stderr.decode()
    blocker = "import sys\nsys.modules['highdicom'] = None\n"
    r = run_cli("--model", str(model), "--format", "dicom-sr", "--output", str(tmp_path / "o"), str(src),
                prelude=blocker)
    assert r.returncode == 2 and "pip install 'cxr[dicom]'" in r.stderr.decode(), r.stderr
    assert "Traceback" not in r.stderr.decode()


def test_a_site_domain_threshold_makes_its_own_srs(clf, child):
    """A run with another image-check threshold can answer differently, so its SRs get their own UIDs
    and name that threshold; a run with the file's own keeps the UIDs results had before the option."""
    from cxr_hospital.report import Answer, result_uid

    data = xray_dicom(child, number=4)
    header = read_header(data)
    pred = clf.predict(data)
    m = model_identity(clf)
    assert m.domain_threshold is None and "domain threshold" not in m.parameters()
    answer = Answer.of(pred)
    assert m.sr_uid(header.SOPInstanceUID, answer) == result_uid("sr", header.SOPInstanceUID, m.sha256,
                                                                 f"{m.threshold:.6g}", answer.key)
    site = ModelIdentity(m.name, m.backbone, m.precision, m.sha256, m.cxr_version, m.threshold, domain_threshold=1.25)
    assert site.parameters()["domain threshold"] == "1.25"
    sr = build_sr(pred, header, site)
    assert sr.SOPInstanceUID == site.sr_uid(header.SOPInstanceUID, answer) != m.sr_uid(header.SOPInstanceUID, answer)
    assert sr.SeriesInstanceUID == site.series_uid(header.StudyInstanceUID) != m.series_uid(header.StudyInstanceUID)
