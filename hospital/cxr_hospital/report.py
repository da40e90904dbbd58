"""What every hospital-facing view of a :class:`~cxr_infer.prediction.Prediction` says, in one place.

The SR and FHIR writers and the PACS client share this vocabulary, so a result reads the same
wherever it lands: the finding as words and as a SNOMED CT code, the sentence that the result is
not a diagnosis, the model that made it (:class:`ModelIdentity`) and the identifiers of the DICOM
image it came from (:class:`SourceIds`), and what was decided about it (:class:`Answer`). Result
UIDs are name-based (:func:`result_uid`): the same image, model file, thresholds and answer always
give the same SOP Instance UID, so a retry or a second run never makes a duplicate, and two
different answers about one image never share a UID.

Examples:
    >>> finding_for("PNEUMONIA").code, finding_for("NORMAL").display
    ('233604007', 'Normal')
    >>> result_uid("sr", "1.2.3", "abc") == result_uid("sr", "1.2.3", "abc")
    True
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from cxr_infer.classifier import Classifier
    from cxr_infer.prediction import Prediction

#: Says on every SR, FHIR Observation and PACS log what the result is and is not.
DISCLAIMER = ("Computer-generated result of the cxr AI model, for decision support only: not a diagnosis. "
              "A qualified clinician must read the image.")

#: Namespace of cxr's name-based UIDs (a fixed, random UUID; never change it: it keeps UIDs stable).
UID_NAMESPACE = uuid.UUID("6d1c3f4e-8a43-4b7e-9d0c-2f5b8e1a7c90")

SNOMED_FHIR = "http://snomed.info/sct"
UCUM_FHIR = "http://unitsofmeasure.org"
#: cxr's own code system, for the concepts no standard terminology has (FHIR system URI;
#: in DICOM the private coding scheme designator ``99CXR``).
CXR_FHIR = "urn:cxr:codes"
CXR_SCHEME = "99CXR"


@dataclass(frozen=True)
class Concept:
    """One coded concept: ``code`` in the DICOM coding ``scheme`` (FHIR ``system``), ``display`` words.

    Examples:
        >>> PNEUMONIA.fhir()
        {'system': 'http://snomed.info/sct', 'code': '233604007', 'display': 'Pneumonia'}
    """

    code: str
    scheme: str
    display: str

    @property
    def system(self) -> str:
        """The FHIR code system URI of ``scheme``."""
        return {"SCT": SNOMED_FHIR, "UCUM": UCUM_FHIR, CXR_SCHEME: CXR_FHIR}.get(self.scheme, self.scheme)

    def fhir(self) -> Dict[str, str]:
        """This concept as a FHIR Coding."""
        return {"system": self.system, "code": self.code, "display": self.display}


PNEUMONIA = Concept("233604007", "SCT", "Pneumonia")
NORMAL = Concept("17621005", "SCT", "Normal")
#: What the report is about (the procedure reported).
PLAIN_CHEST_XRAY = Concept("399208008", "SCT", "Plain chest X-ray")
PRESENT = Concept("52101004", "SCT", "Present")
ABSENT = Concept("272519000", "SCT", "Absent")
YES = Concept("373066001", "SCT", "Yes")
NO = Concept("373067005", "SCT", "No")
THRESHOLD = Concept("122411", "DCM", "Threshold Value")
UNITLESS = Concept("1", "UCUM", "no units")
# cxr's own concepts (99CXR / urn:cxr:codes)
PROBABILITY_OF_POSITIVE = Concept("probability", CXR_SCHEME, "Probability of the positive label")
DECISION_THRESHOLD = Concept("threshold", CXR_SCHEME, "Decision threshold")
IN_INTENDED_USE = Concept("in-intended-use", CXR_SCHEME, "Within the model's intended use")
OUT_OF_USE_REASON = Concept("intended-use-reason", CXR_SCHEME, "Reason outside the model's intended use")
CLASSIFIED = Concept("classified", CXR_SCHEME, "Classified by the model")
NOT_ASSESSED = Concept("not-assessed", CXR_SCHEME, "Not assessed by the model")
DOMAIN_THRESHOLD = Concept("domain-threshold", CXR_SCHEME, "Domain check threshold")

_FINDINGS = {"PNEUMONIA": PNEUMONIA, "NORMAL": NORMAL}


def finding_for(label: str) -> Concept:
    """The coded finding of a label: SNOMED CT Pneumonia or Normal; other labels get a 99CXR code."""
    return _FINDINGS.get(label.upper(), Concept(label, CXR_SCHEME, label.capitalize()))


def result_uid(*parts: str) -> str:
    """A DICOM UID (``2.25.`` + a name-based UUID, at most 44 characters) that depends only on ``parts``."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class ModelIdentity:
    """The model that made a result, as the SR observer device and the FHIR Device name it.

    Examples:
        >>> m = ModelIdentity("default.onnx", "vgg16", "int8", "ab" * 32, "0.1.0", 0.5)
        >>> m.title
        'cxr 0.1.0 vgg16 int8'
        >>> m.device_uid == ModelIdentity("other.onnx", "vgg16", "int8", "ab" * 32, "0.2.0", 0.3).device_uid
        True
    """

    name: str
    backbone: str
    precision: str
    sha256: str
    cxr_version: str
    threshold: float
    positive_label: str = "PNEUMONIA"
    #: the image check's threshold where the caller set one (``--domain-threshold`` or
    #: ``--domain-flag-rate``); None: the model file's own
    domain_threshold: Optional[float] = None

    @property
    def title(self) -> str:
        """``cxr VERSION BACKBONE PRECISION``: the device's name."""
        return f"cxr {self.cxr_version} {self.backbone} {self.precision}"

    @property
    def device_uid(self) -> str:
        """One UID per model file content (its SHA-256): the SR's Device Observer UID."""
        return result_uid("device", self.sha256)

    def _settings(self) -> Tuple[str, ...]:
        """The run's settings that can change a result: the threshold, and a site's domain threshold
        (left out when it is the file's own, so results made before it existed keep their UIDs)."""
        own = (f"{self.threshold:.6g}",)
        return own if self.domain_threshold is None else own + (f"domain {self.domain_threshold:.6g}",)

    def sr_uid(self, source_sop_instance_uid: str, answer: "Answer") -> str:
        """The SOP Instance UID of this model's SR giving ``answer`` about one source image: the same
        image, settings and answer give the same UID; another answer, another UID."""
        return result_uid("sr", source_sop_instance_uid, self.sha256, *self._settings(), answer.key)

    def series_uid(self, study_instance_uid: str) -> str:
        """The Series Instance UID of this model's SRs in one study: one cxr series per study and model."""
        return result_uid("series", study_instance_uid, self.sha256, *self._settings())

    def parameters(self) -> Dict[str, str]:
        """``{name: value}`` of what identifies the run: file, backbone, precision, SHA-256, threshold
        (and the domain threshold where the caller set one)."""
        out = {"model file": self.name, "backbone": self.backbone, "precision": self.precision,
               "sha256": self.sha256, "threshold": f"{self.threshold:g}", "cxr version": self.cxr_version}
        if self.domain_threshold is not None:
            out["domain threshold"] = f"{self.domain_threshold:.6g}"
        return out


def model_identity(classifier: "Classifier") -> ModelIdentity:
    """The :class:`ModelIdentity` of a loaded classifier (its threshold as it runs, not only its spec's).

    A model given as bytes has no file to hash: its spec's JSON is hashed instead.
    """
    from cxr_infer import __version__
    from cxr_infer.info import file_sha256

    if classifier.model_path:
        sha, name = file_sha256(classifier.model_path), Path(classifier.model_path).name
    else:
        sha, name = hashlib.sha256(classifier.spec.to_json().encode()).hexdigest(), classifier.name
    return ModelIdentity(name=name, backbone=classifier.spec.backbone, precision=classifier.spec.precision,
                         sha256=sha, cxr_version=__version__, threshold=float(classifier.threshold),
                         positive_label=classifier.spec.positive_label,
                         domain_threshold=classifier.domain_threshold if classifier.domain_threshold_overridden
                         else None)


def finding_words(pred: "Prediction", positive_label: str = "PNEUMONIA") -> str:
    """The result in one sentence.

    Examples:
        >>> from cxr_infer.prediction import Prediction
        >>> finding_words(Prediction("PNEUMONIA", 0.8734, 0.5))
        'PNEUMONIA: probability of PNEUMONIA 0.873, at or above the decision threshold 0.5'
    """
    side = "at or above" if pred.probability >= pred.threshold else "below"
    return (f"{pred.label}: probability of {positive_label} {pred.probability:.3f}, {side} the decision "
            f"threshold {pred.threshold:g}")


def not_classified_words(pred: "Prediction") -> str:
    """Why an image outside the intended use was not classified."""
    return "Not classified: the image is outside the model's intended use: " + "; ".join(
        pred.domain_reasons or ("no reason given",))


def not_assessed_words(pred: "Prediction") -> str:
    """Why a result outside the intended use is no assessment (the FHIR Observation's headline)."""
    return "Not assessed: the image is outside the model's intended use: " + "; ".join(
        pred.domain_reasons or ("no reason given",))


#: the numbers of the image check's reason (they differ in the last digits between CPUs): an
#: answer's key keeps which check fired, not its score
_SCORE = re.compile(r"\(domain score [^;)]*")


@dataclass(frozen=True)
class Answer:
    """What was decided about one image: classified with a label (inside the intended use, or
    outside it with the reasons), not classified because it is outside the intended use (and
    why), or not read at all (``problem``). Its :attr:`key` is part of the SR's UID.

    Examples:
        >>> from cxr_infer.prediction import Prediction
        >>> Answer.of(Prediction("PNEUMONIA", 0.87, 0.5, in_domain=True)).key
        'classified PNEUMONIA'
        >>> adult = Prediction("PNEUMONIA", 0.87, 0.5, in_domain=False, domain_reasons=("age 67Y",))
        >>> Answer.of(adult, classified=False).key, Answer.of(adult).key
        ('not classified: age 67Y', 'classified PNEUMONIA; outside the intended use: age 67Y')
        >>> Answer.unreadable("cannot decode the pixel data").key
        'not read'
    """

    classified: bool
    label: str = ""
    reasons: Tuple[str, ...] = ()
    problem: str = ""

    @classmethod
    def of(cls, pred: "Prediction", classified: bool = True) -> "Answer":
        """The answer a prediction gives, classified or (outside the intended use) not."""
        reasons = tuple(pred.domain_reasons) if pred.in_domain is False or not classified else ()
        return cls(classified=classified, label=pred.label if classified else "", reasons=reasons)

    @classmethod
    def unreadable(cls, problem: str) -> "Answer":
        """The answer about an image that could not be read (``problem`` says why, in one line)."""
        return cls(classified=False, problem=problem or "unreadable")

    @property
    def key(self) -> str:
        """The answer in fixed words (no probability, no score): the part of the SR's UID it decides."""
        if self.problem:
            return "not read"
        why = "; ".join(sorted(_SCORE.sub("(domain score", r) for r in self.reasons))
        if not self.classified:
            return f"not classified: {why}"
        return f"classified {self.label}" + (f"; outside the intended use: {why}" if why else "")

    @property
    def assessed(self) -> bool:
        """True for a label given inside the intended use: the only answer a record may headline."""
        return self.classified and not self.reasons and not self.problem


@dataclass(frozen=True)
class SourceIds:
    """Identifiers of a DICOM source image: whom and which study, series and instance it belongs to."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    accession_number: str = ""
    #: Issuer of Patient ID (0010,0021), or the universal entity ID of its qualifiers
    patient_id_issuer: str = ""


def source_ids(header: Any) -> SourceIds:
    """The :class:`SourceIds` of a pydicom dataset (empty strings for absent tags)."""
    def text(key: str) -> str:
        value = header.get(key)
        return "" if value is None else str(value).strip()

    meta = getattr(header, "file_meta", None)
    sop_class = text("SOPClassUID") or ("" if meta is None else str(meta.get("MediaStorageSOPClassUID") or ""))
    return SourceIds(patient_id=text("PatientID"), patient_name=text("PatientName"),
                     study_instance_uid=text("StudyInstanceUID"), series_instance_uid=text("SeriesInstanceUID"),
                     sop_instance_uid=text("SOPInstanceUID"), sop_class_uid=sop_class,
                     accession_number=text("AccessionNumber"), patient_id_issuer=_issuer(header, text))


def _issuer(header: Any, text: Any) -> str:
    """The Issuer of Patient ID as a URI where the header says which kind it is (ISO: ``urn:oid:``,
    UUID: ``urn:uuid:``, URI), else the plain Issuer of Patient ID text."""
    qualifiers = header.get("IssuerOfPatientIDQualifiersSequence")
    for item in qualifiers or ():
        value = str(item.get("UniversalEntityID") or "").strip()
        kind = str(item.get("UniversalEntityIDType") or "").strip().upper()
        if value:
            prefix = {"ISO": "urn:oid:", "UUID": "urn:uuid:"}.get(kind, "")
            return value if value.startswith(prefix) else prefix + value
    issuer = text("IssuerOfPatientID")
    return f"urn:oid:{issuer}" if re.fullmatch(r"[0-2](\.\d+)+", issuer) else issuer
