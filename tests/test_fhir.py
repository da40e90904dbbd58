"""FHIR output: ``cxr-infer --format fhir`` writes one R4 Bundle, validated with fhir.resources.

fhir.resources 7+ ships R5 as its default and R4B (the R4 technical correction) beside it:
every resource and element written here is the same in R4 and R4B, so the R4B models check it.
"""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_cli

from cxr_hospital.fhir import AI_ASSERTED

SAMPLE = REPO / "runtime" / "cxr_infer" / "samples" / "person1_virus_6.jpeg"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("pydicom")
    from hospital_fixtures import intended_use_model
    return intended_use_model(tmp_path_factory.mktemp("fhirmodel") / "tiny_use.onnx")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    pytest.importorskip("pydicom")
    from hospital_fixtures import DARK, study, xray_dicom

    root = tmp_path_factory.mktemp("fhirscans")
    child, adult = study("CHILD7", "004Y", "Roe^Ann"), study("ADULT7", "045Y", "Roe^Bob")
    (root / "child.dcm").write_bytes(xray_dicom(child))
    (root / "child_normal.dcm").write_bytes(xray_dicom(child, level=DARK, number=2))
    (root / "adult.dcm").write_bytes(xray_dicom(adult))
    shutil.copy(SAMPLE, root / "photo.jpeg")
    return root


def _validate(text: str):
    """The Bundle, parsed by fhir.resources (raises on any invalid element)."""
    bundle_model = pytest.importorskip("fhir.resources.R4B.bundle")
    data = json.loads(text)
    bundle = bundle_model.Bundle.model_validate(data)
    assert bundle.type == "collection"
    return data


def _by_type(data):
    out = {}
    for entry in data["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry)
    return out


def _components(obs):
    return {c["code"]["coding"][0]["code"]: c for c in obs.get("component", [])}


def test_bundle_has_a_device_an_observation_per_result_and_an_outcome_per_failure(model, scans):
    missing = scans / "missing.png"
    r = run_cli("--model", str(model), "--format", "fhir", str(scans), str(missing))
    assert r.returncode == 1, r.stderr
    data = _validate(r.stdout.decode())
    kinds = _by_type(data)
    assert sorted(kinds) == ["Device", "Observation", "OperationOutcome"]
    (device,) = kinds["Device"]
    assert device["resource"]["modelNumber"] == "tiny fp32" and len(device["resource"]["identifier"][0]["value"]) == 64
    (outcome,) = kinds["OperationOutcome"]
    assert str(missing) in outcome["resource"]["issue"][0]["diagnostics"]
    obs = {e["resource"]["identifier"][0]["value"]: e["resource"] for e in kinds["Observation"]}
    assert len(obs) == 4
    for o in obs.values():
        assert o["status"] == "preliminary"
        assert o["category"][0]["coding"][0]["code"] == "imaging"
        assert o["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": "233604007",
                                          "display": "Pneumonia"}
        assert AI_ASSERTED in o["meta"]["security"]
        assert o["device"]["reference"] == device["fullUrl"]
        assert any("not a diagnosis" in n["text"] for n in o["note"])
    by_patient = {o.get("subject", {}).get("identifier", {}).get("value"): o for o in obs.values()}
    photo = by_patient[None]  # a JPEG names no patient
    assert "derivedFrom" not in photo
    child = [o for o in obs.values() if o.get("subject", {}).get("identifier", {}).get("value") == "CHILD7"]
    values = sorted(o["valueCodeableConcept"]["text"] for o in child)
    assert values == ["NORMAL", "PNEUMONIA"]
    for o in child:
        comps = _components(o)
        assert comps["threshold"]["valueQuantity"]["value"] == 0.5
        p = comps["probability"]["valueQuantity"]["value"]
        assert (p >= 0.5) == (o["valueCodeableConcept"]["text"] == "PNEUMONIA")
        expected = "52101004" if p >= 0.5 else "272519000"  # Present / Absent
        assert o["valueCodeableConcept"]["coding"][0]["code"] == expected
        assert [d["type"] for d in o["derivedFrom"]] == ["ImagingStudy", "Media"]
        assert o["derivedFrom"][0]["identifier"]["value"].startswith("urn:oid:")
    adult = by_patient["ADULT7"]  # classified (no --reject-out-of-domain), but no assessment to headline
    comps = _components(adult)
    assert comps["in-intended-use"]["valueBoolean"] is False
    assert comps["intended-use-reason"]["valueString"] == "patient age 45Y is outside the intended 1-5 years"
    _not_assessed(adult, "patient age 45Y is outside the intended 1-5 years")


def _not_assessed(obs, reason):
    """An Observation outside the intended use: no value, label or probability anywhere; its absent
    reason, interpretation, text and note say it was not assessed and why."""
    assert "valueCodeableConcept" not in obs and "probability" not in _components(obs)
    assert "threshold" not in _components(obs)
    assert obs["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    why = f"Not assessed: the image is outside the model's intended use: {reason}"
    assert obs["dataAbsentReason"]["text"] == why
    assert obs["interpretation"][0]["text"] == why and obs["interpretation"][0]["coding"][0]["code"] == "not-assessed"
    assert why in obs["text"]["div"] and obs["note"][0]["text"] == why
    text = json.dumps(obs)
    assert "PNEUMONIA" not in text and "NORMAL" not in text and "probability" not in text.lower()


def test_rejected_images_get_a_not_performed_observation_and_output_file_works(model, scans, tmp_path):
    out = tmp_path / "bundle.json"
    r = run_cli("--model", str(model), "--format", "fhir", "--reject-out-of-domain", "--output", str(out),
                str(scans / "adult.dcm"), str(scans / "child.dcm"))
    assert r.returncode == 1 and r.stdout == b""
    data = _validate(out.read_text())
    obs = {e["resource"]["subject"]["identifier"]["value"]: e["resource"]
           for e in data["entry"] if e["resource"]["resourceType"] == "Observation"}
    _not_assessed(obs["ADULT7"], "patient age 45Y is outside the intended 1-5 years")
    assert obs["CHILD7"]["valueCodeableConcept"]["text"] == "PNEUMONIA"
    assert "PNEUMONIA: probability of PNEUMONIA" in obs["CHILD7"]["text"]["div"]


def test_fhir_needs_no_extra_for_plain_images(tiny_model):
    """--format fhir is plain JSON written by the runtime: a JPEG needs neither pydicom nor highdicom."""
    blocker = "import sys\nfor m in ('pydicom', 'highdicom', 'fhir'):\n    sys.modules[m] = None\n"
    r = run_cli("--model", str(tiny_model), "--format", "fhir", str(SAMPLE), prelude=blocker)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [e["resource"]["resourceType"] for e in data["entry"]] == ["Device", "Observation"]


def test_a_site_domain_threshold_is_a_device_property():
    """The Device of a run with a site's image-check threshold says it (valid R4B); the model's own adds
    nothing; and the Observation's id changes with it, as the SR's UID does."""
    from cxr_hospital.fhir import bundle, device, observation
    from cxr_hospital.report import ModelIdentity
    from cxr_infer.prediction import Prediction

    own = ModelIdentity("m.onnx", "vgg16", "int8", "ab" * 32, "0.1.0", 0.5)
    site = ModelIdentity("m.onnx", "vgg16", "int8", "ab" * 32, "0.1.0", 0.5, domain_threshold=1.232)
    assert [p["type"]["coding"][0]["code"] for p in device(own)["property"]] == ["threshold"]
    (prop,) = [p for p in device(site)["property"] if p["type"]["coding"][0]["code"] == "domain-threshold"]
    assert prop["valueQuantity"][0]["value"] == 1.232
    pred = Prediction("NORMAL", 0.1, 0.5, in_domain=True, source="a.jpeg")
    obs = [observation(pred, m, "urn:uuid:d") for m in (own, site)]
    assert obs[0]["id"] != obs[1]["id"]
    _validate(json.dumps(bundle([("urn:uuid:d", device(site)), (None, obs[1])])))


def test_the_subject_names_the_issuer_of_the_patient_id():
    """subject.identifier.system comes from the DICOM Issuer of Patient ID (an OID as urn:oid:, the
    qualifiers' universal entity ID first); without one there is no system (valid R4B either way)."""
    pytest.importorskip("pydicom")
    from hospital_fixtures import study, xray_dicom
    from pydicom import Dataset, dcmread

    from cxr_hospital.fhir import observation
    from cxr_hospital.report import ModelIdentity, source_ids
    from cxr_infer.prediction import Prediction

    obs_model = pytest.importorskip("fhir.resources.R4B.observation")
    m = ModelIdentity("m.onnx", "vgg16", "int8", "ab" * 32, "0.1.0", 0.5)
    pred = Prediction("NORMAL", 0.1, 0.5, in_domain=True)
    qualified = Dataset()
    qualified.UniversalEntityID, qualified.UniversalEntityIDType = "https://hospital.example/mrn", "URI"
    cases = [({}, None), ({"IssuerOfPatientID": "1.2.840.99999.1"}, "urn:oid:1.2.840.99999.1"),
             ({"IssuerOfPatientID": "urn:oid:1.2.3"}, "urn:oid:1.2.3"),
             ({"IssuerOfPatientID": "MRN", "IssuerOfPatientIDQualifiersSequence": [qualified]},
              "https://hospital.example/mrn")]
    for more, system in cases:
        import io
        header = dcmread(io.BytesIO(xray_dicom(study("P1"))))
        for key, value in more.items():
            setattr(header, key, value)
        obs = observation(pred, m, "urn:uuid:d", source_ids(header))
        assert obs["subject"]["identifier"].get("system") == system
        assert obs["subject"]["identifier"]["value"] == "P1"
        obs_model.Observation.model_validate(obs)
