"""Intended use: DICOM headers checked against the model's ``intended_use`` block, reasons everywhere.

Every header case is a DICOM file next to an in-domain twin with the very same pixels, so any
difference in the verdict comes from the header alone.
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("pydicom")

from test_dicom import make_dicom

from cxr_infer import Classifier
from cxr_infer.errors import ModelError
from cxr_infer.intended_use import KERMANY, IntendedUse, age_in_years

#: the header of an in-domain twin: a 3-year-old's PA chest radiograph
TWIN = {"PatientAge": "003Y", "ViewPosition": "PA", "Modality": "DX", "BodyPartExamined": "CHEST",
        "ImageType": ["ORIGINAL", "PRIMARY"], "StudyDate": "20240105"}
CASES = {
    "adult 067Y": ({"PatientAge": "067Y"}, "patient age 67Y is outside the intended 1-5 years"),
    "infant 002W": ({"PatientAge": "002W"}, "patient age 2W is outside the intended 1-5 years"),
    "birth date only": ({"PatientAge": None, "PatientBirthDate": "19600105"},
                        "patient age 64.0 years (from the birth date) is outside the intended 1-5 years"),
    "lateral": ({"ViewPosition": "LL"}, "view LL (lateral) is not frontal (PA, AP)"),
    "CT": ({"Modality": "CT"}, "modality CT is not a radiograph (CR, DX, DR)"),
    "localizer": ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
                  "image type LOCALIZER: a localizer (scout) image, not a diagnostic radiograph"),
    "abdomen": ({"BodyPartExamined": "ABDOMEN"}, "body part ABDOMEN is not CHEST"),
}


def dicom_with(pixels: np.ndarray, changes: dict) -> bytes:
    header = {k: v for k, v in dict(TWIN, **changes).items() if v is not None}
    return make_dicom(pixels, **header)


@pytest.fixture(scope="module")
def pixels(xrays224) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(xrays224[0]).convert("L"))


@pytest.fixture(scope="module")
def kermany_model(model_dir):
    """A tiny model with the Kermany intended use (and no domain statistics: header checks alone)."""
    from conftest import build_model

    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="tiny", intended_use=KERMANY).to_dict()
    path = model_dir / "kermany_use.onnx"
    path.write_bytes(build_model(spec=spec))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_header_reason_next_to_its_in_domain_twin(case, kermany_model, pixels):
    changes, reason = CASES[case]
    clf = Classifier(kermany_model, threads=1)
    twin = clf.predict(dicom_with(pixels, {}))
    out = clf.predict(dicom_with(pixels, changes))
    assert twin.domain_reasons == () and twin.in_domain is None  # no image check in this file: nothing to say
    assert out.domain_reasons == (reason,) and out.in_domain is False
    assert out.probability == twin.probability  # same pixels, same answer: the header alone decides


def test_ages_inside_the_range_and_its_margin_are_not_reasons(kermany_model, pixels):
    clf = Classifier(kermany_model, threads=1)
    for age in ("001Y", "005Y", "006Y", "010M", "030M", "070M"):  # 6 years: 5 completed + margin; 10 months: margin
        assert clf.predict(dicom_with(pixels, {"PatientAge": age})).domain_reasons == (), age
    for age in ("007Y", "005M", "018Y"):
        assert clf.predict(dicom_with(pixels, {"PatientAge": age})).in_domain is False, age


def test_missing_or_empty_tags_are_never_reasons(kermany_model, pixels):
    clf = Classifier(kermany_model, threads=1)
    bare = {"PatientAge": None, "ViewPosition": None, "BodyPartExamined": None, "ImageType": None,
            "StudyDate": None}
    assert clf.predict(dicom_with(pixels, bare)).domain_reasons == ()
    assert clf.predict(dicom_with(pixels, {"PatientAge": "", "ViewPosition": ""})).domain_reasons == ()
    with pytest.warns(UserWarning, match="Invalid value for VR AS"):  # pydicom's own warning on writing it
        unreadable = dicom_with(pixels, {"PatientAge": "abc"})
    assert clf.predict(unreadable).domain_reasons == ()  # an unreadable age is not a reason either


def test_view_code_sequence_is_read(kermany_model, pixels):
    from pydicom.dataset import Dataset

    def view_code(meaning: str):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X", "SCT", meaning
        return [item]

    clf = Classifier(kermany_model, threads=1)
    lateral = clf.predict(dicom_with(pixels, {"ViewPosition": None, "ViewCodeSequence": view_code("left lateral")}))
    frontal = clf.predict(dicom_with(pixels, {"ViewPosition": None,
                                              "ViewCodeSequence": view_code("postero-anterior")}))
    assert lateral.domain_reasons == ("view code 'left lateral' is not one of the intended views (PA, AP)",)
    assert frontal.domain_reasons == ()


def test_non_dicom_inputs_and_files_without_intended_use(tiny_model, kermany_model, pixels, xrays224):
    clf = Classifier(kermany_model, threads=1)
    assert clf.predict(str(xrays224[0])).domain_reasons == ()  # a JPEG has no header to check
    plain = Classifier(tiny_model, threads=1)  # no intended_use block: header checks are off
    assert plain.intended_use is None and plain.info()["intended_use"]["header_checks"] is False
    assert "no intended_use block" in plain.info()["intended_use"]["reason"]
    adult = plain.predict(dicom_with(pixels, CASES["adult 067Y"][0]))
    assert adult.in_domain is None and adult.domain_reasons == ()
    info = clf.info()["intended_use"]
    assert info["header_checks"] is True and info["age_years"] == [1, 5] and "ages 1-5 years" in info["summary"]
    off = Classifier(kermany_model, threads=1, header_check=False)
    assert off.predict(dicom_with(pixels, CASES["CT"][0])).domain_reasons == ()


def test_reasons_in_every_output_format_and_the_reject_option(kermany_model, pixels, tmp_path):
    adult, twin = tmp_path / "adult.dcm", tmp_path / "child.dcm"
    adult.write_bytes(dicom_with(pixels, {"PatientAge": "067Y", "ViewPosition": "LL"}))
    twin.write_bytes(dicom_with(pixels, {}))
    reasons = ["patient age 67Y is outside the intended 1-5 years", "view LL (lateral) is not frontal (PA, AP)"]

    r = run_cli("--model", str(kermany_model), "--format", "jsonl", str(adult), str(twin))
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert r.returncode == 0 and rows[0]["domain_reasons"] == reasons and rows[0]["in_domain"] is False
    assert rows[1]["domain_reasons"] == [] and rows[1]["in_domain"] is None

    r = run_cli("--model", str(kermany_model), "--format", "csv", str(adult), str(twin))
    table = list(csv.DictReader(io.StringIO(r.stdout.decode())))
    assert table[0]["domain_reasons"] == "; ".join(reasons) and table[0]["in_domain"] == "false"
    assert table[1]["domain_reasons"] == ""

    r = run_cli("--model", str(kermany_model), str(adult), str(twin))
    lines = r.stdout.decode().splitlines()
    assert lines[1].endswith("OUTSIDE (!): " + "; ".join(reasons)) and lines[2].endswith("n/a")

    r = run_cli("--model", str(kermany_model), "--reject-out-of-domain", "--format", "jsonl", str(adult), str(twin))
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert rows[0] == {"path": str(adult), "error": "not classified: outside the model's intended use: "
                       + "; ".join(reasons)}
    assert "label" in rows[1]
    assert r.stderr.decode().count(str(adult)) == 1

    info = json.loads(run_cli("--model", str(kermany_model), "--info", "--json").stdout)
    assert info["intended_use"]["header_checks"] is True and info["intended_use"]["modalities"] == ["CR", "DX", "DR"]


def test_a_bad_intended_use_block_is_refused_on_load(model_dir):
    from conftest import build_model

    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="tiny").to_dict()
    spec["intended_use"] = dict(KERMANY, age_years=[5, 1])
    path = model_dir / "bad_use.onnx"
    path.write_bytes(build_model(spec=spec))
    with pytest.raises(ModelError, match="intended_use.age_years"):
        Classifier(path, threads=1)


def test_age_strings_and_export_options():
    import argparse

    from cxr_export.intended import add_arguments, block_from_args

    assert age_in_years("067Y") == 67 and age_in_years("030M") == 2.5
    assert age_in_years("14D") == pytest.approx(14 / 365.25)
    assert age_in_years("") is None and age_in_years("67") is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert block_from_args(parser.parse_args([])) == KERMANY
    adults = block_from_args(parser.parse_args(["--intended-ages", "18", "90", "--intended-views", "PA"]))
    use = IntendedUse.from_spec(adults)
    assert use.header_reasons({"PatientAge": "067Y", "ViewPosition": "AP"}) == [
        "view AP is not frontal (PA)"]
    assert block_from_args(parser.parse_args(["--no-intended-use"])) is None
    with pytest.raises(ModelError):
        block_from_args(parser.parse_args(["--intended-ages", "9", "3"]))


def test_intended_use_command_writes_only_the_spec(tiny_model, tmp_path):
    import shutil

    import onnx

    from cxr_export.intended import main

    path = tmp_path / "m.onnx"
    shutil.copy(tiny_model, path)
    assert main([str(path)]) == 0
    after = onnx.load(str(path))
    assert after.graph == onnx.load(str(tiny_model)).graph
    assert Classifier(path, threads=1).intended_use == IntendedUse.from_spec(KERMANY)
    assert main([str(path), "--intended-ages", "9", "3"]) == 2
