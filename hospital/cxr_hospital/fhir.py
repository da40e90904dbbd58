"""FHIR R4 view of :class:`~cxr_infer.prediction.Prediction` records (``cxr-infer --format fhir``).

Plain JSON, no FHIR library at run time: one Bundle of type ``collection`` with a ``Device`` for
the model, an ``Observation`` per classified input (preliminary, AI-asserted, SNOMED CT coded,
with the probability, threshold and intended-use status as components), an Observation without
a value for an image outside the intended use (classified or not: ``dataAbsentReason``, and an
interpretation and text that say it was not assessed and why), and an ``OperationOutcome`` per
input that failed, so the bundle loses nothing (field by field: docs/hospital.md).

Examples:
    >>> from cxr_infer.prediction import Prediction
    >>> from cxr_hospital.report import ModelIdentity
    >>> m = ModelIdentity("default.onnx", "vgg16", "int8", "ab" * 32, "0.1.0", 0.5)
    >>> obs = observation(Prediction("PNEUMONIA", 0.87, 0.5, in_domain=True), m, "urn:uuid:x")
    >>> obs["status"], obs["valueCodeableConcept"]["text"], obs["component"][0]["valueQuantity"]["value"]
    ('preliminary', 'PNEUMONIA', 0.87)
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import uuid
from typing import IO, Any, Dict, List, Optional, Tuple

from cxr_infer.formats import FormatContext, OutputFormat, ResultWriter

from .report import (
    ABSENT,
    DECISION_THRESHOLD,
    DISCLAIMER,
    DOMAIN_THRESHOLD,
    IN_INTENDED_USE,
    NOT_ASSESSED,
    OUT_OF_USE_REASON,
    PNEUMONIA,
    PRESENT,
    PROBABILITY_OF_POSITIVE,
    UCUM_FHIR,
    Answer,
    ModelIdentity,
    SourceIds,
    finding_words,
    model_identity,
    not_assessed_words,
    result_uid,
    source_ids,
)

AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
               "display": "Artificial Intelligence asserted"}
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
           "display": "Imaging"}
NOT_PERFORMED = {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed",
                 "display": "Not Performed"}
#: Identifier system of DICOM UIDs (``urn:oid:`` values).
DICOM_UID_SYSTEM = "urn:dicom:uid"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _uuid_url(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_OID, result_uid(*parts)))


def device(model: ModelIdentity) -> Dict[str, Any]:
    """The FHIR Device of the model (R4).

    Examples:
        >>> device(ModelIdentity("m.onnx", "resnet50", "int8", "cd" * 32, "0.1.0", 0.4))["modelNumber"]
        'resnet50 int8'
    """
    return {
        "resourceType": "Device",
        "identifier": [{"system": "urn:cxr:model-sha256", "value": model.sha256}],
        "manufacturer": "cxr",
        "deviceName": [{"name": model.title, "type": "user-friendly-name"},
                       {"name": model.name, "type": "model-name"}],
        "modelNumber": f"{model.backbone} {model.precision}",
        "version": [{"type": {"text": "cxr"}, "value": model.cxr_version}],
        "property": [{"type": {"coding": [DECISION_THRESHOLD.fhir()]},
                      "valueQuantity": [{"value": model.threshold, "system": UCUM_FHIR, "code": "1"}]}]
        + ([{"type": {"coding": [DOMAIN_THRESHOLD.fhir()]},
             "valueQuantity": [{"value": model.domain_threshold, "system": UCUM_FHIR, "code": "1"}]}]
           if model.domain_threshold is not None else []),
        "note": [{"text": DISCLAIMER}],
    }


def _quantity(value: float) -> Dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": UCUM_FHIR, "code": "1"}


def _component(concept: Any, **value: Any) -> Dict[str, Any]:
    return {"code": {"coding": [concept.fhir()], "text": concept.display}, **value}


def _narrative(*paragraphs: str) -> Dict[str, str]:
    """A generated Narrative (the resource's ``text``) of the given paragraphs."""
    body = "".join(f"<p>{html.escape(p, quote=False)}</p>" for p in paragraphs)
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _subject(source: SourceIds) -> Dict[str, Any]:
    """The Observation's subject: the PatientID, in the system its DICOM issuer names (where present)."""
    identifier = {"value": source.patient_id}
    if source.patient_id_issuer:
        identifier = {"system": source.patient_id_issuer, **identifier}
    return {"identifier": identifier, "type": "Patient",
            **({"display": source.patient_name} if source.patient_name else {})}


def _derived_from(source: SourceIds) -> List[Dict[str, Any]]:
    derived = [("ImagingStudy", source.study_instance_uid), ("Media", source.sop_instance_uid)]
    return [{"type": kind, "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}}
            for kind, uid in derived if uid]


def observation(pred: Any, model: ModelIdentity, device_url: str, source: Optional[SourceIds] = None,
                classified: bool = True, path: Optional[str] = None) -> Dict[str, Any]:
    """The FHIR R4 Observation of one result (see the module docstring for its fields).

    ``source``: the DICOM image's identifiers (``subject`` and ``derivedFrom``); ``path``: the
    input's name, kept in ``identifier`` where there is no SOP Instance UID. A result outside the
    intended use (``classified`` or not) carries no value, probability or label: its
    ``dataAbsentReason``, ``interpretation`` and ``text`` say it was not assessed and why.
    """
    answer = Answer.of(pred, classified)
    components: List[Dict[str, Any]] = []
    if answer.assessed:
        components += [_component(PROBABILITY_OF_POSITIVE, valueQuantity=_quantity(pred.probability)),
                       _component(DECISION_THRESHOLD, valueQuantity=_quantity(pred.threshold))]
    if pred.in_domain is not None or not answer.assessed:
        components.append(_component(IN_INTENDED_USE, valueBoolean=answer.assessed and bool(pred.in_domain)))
    components += [_component(OUT_OF_USE_REASON, valueString=reason) for reason in pred.domain_reasons]
    key = source.sop_instance_uid if source and source.sop_instance_uid else (path or "")
    obs: Dict[str, Any] = {
        "resourceType": "Observation",
        "id": str(uuid.uuid5(uuid.NAMESPACE_OID, model.sr_uid(key, answer))),
        "meta": {"security": [AI_ASSERTED]},
        "status": "preliminary",
        "category": [{"coding": [IMAGING]}],
        "code": {"coding": [PNEUMONIA.fhir()], "text": "Pneumonia on chest X-ray (AI classifier)"},
        "issued": _now(),
        "device": {"reference": device_url, "display": model.title},
    }
    if key:
        obs["identifier"] = [{"system": "urn:cxr:input", "value": key}]
    if source is not None and source.patient_id:
        obs["subject"] = _subject(source)
    if source is not None and _derived_from(source):
        obs["derivedFrom"] = _derived_from(source)
    if answer.assessed:
        positive = pred.label == model.positive_label
        headline = finding_words(pred, model.positive_label)
        obs["valueCodeableConcept"] = {"coding": [(PRESENT if positive else ABSENT).fhir()], "text": pred.label}
    else:
        headline = not_assessed_words(pred)
        obs["dataAbsentReason"] = {"coding": [NOT_PERFORMED], "text": headline}
        obs["interpretation"] = [{"coding": [NOT_ASSESSED.fhir()], "text": headline}]
    obs["text"] = _narrative(headline, DISCLAIMER)
    obs["note"] = [{"text": headline}, {"text": DISCLAIMER}]
    if components:
        obs["component"] = components
    return obs


def operation_outcome(path: str, message: str) -> Dict[str, Any]:
    """An OperationOutcome naming an input that could not be classified."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": f"{path}: {message}"}]}


def bundle(entries: List[Tuple[Optional[str], Dict[str, Any]]]) -> Dict[str, Any]:
    """A Bundle of type collection holding ``(fullUrl, resource)`` entries (``None``: a new ``urn:uuid:``)."""
    items = [{"fullUrl": url or "urn:uuid:" + str(uuid.uuid4()), "resource": resource} for url, resource in entries]
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection", "timestamp": _now(),
            "entry": items}


class FhirBundleWriter(ResultWriter):
    """``cxr-infer --format fhir``: collects every result, writes one Bundle on :meth:`close`.

    Examples:
        >>> w = FhirBundleWriter(classifier, sys.stdout)                # doctest: +SKIP
        >>> w.result("chest.dcm", classifier.predict("chest.dcm")); w.close()  # doctest: +SKIP
    """

    def __init__(self, classifier: Any, out: IO[str]) -> None:
        super().__init__(FormatContext(out=out, classifier=classifier))
        self.model = model_identity(classifier)
        self.out = out
        self.device_url = _uuid_url("device", self.model.sha256)
        self.entries: List[Tuple[Optional[str], Dict[str, Any]]] = [(self.device_url, device(self.model))]

    def _source(self, path: str) -> Optional[SourceIds]:
        from cxr_infer.dicom import read_header
        from cxr_infer.errors import InputError

        if path == "-":
            return None
        try:
            return source_ids(read_header(path))
        except InputError:  # not DICOM (or unreadable now): no patient or study to name
            return None

    def _add(self, path: str, pred: Any, classified: bool) -> None:
        obs = observation(pred, self.model, self.device_url, self._source(path), classified=classified, path=path)
        self.entries.append(("urn:uuid:" + obs["id"], obs))

    def result(self, path: str, pred: Any) -> None:
        """Add the Observation of a classified input."""
        self._add(path, pred, classified=True)

    def rejected(self, path: str, pred: Any, message: str) -> None:
        """Add the not-performed Observation of an input outside the intended use."""
        self._add(path, pred, classified=False)

    def error(self, path: str, message: str) -> None:
        """Add an OperationOutcome naming an input that failed."""
        self.entries.append((None, operation_outcome(path, message)))

    def close(self) -> None:
        """Write the Bundle (pretty JSON) and a newline."""
        self.out.write(json.dumps(bundle(self.entries), indent=2) + "\n")


#: ``cxr-infer --format fhir`` (registered through the ``cxr.formats`` entry point).
FHIR_FORMAT = OutputFormat(
    "fhir", "one FHIR R4 Bundle (JSON): a Device for the model, an Observation per result, an "
            "OperationOutcome per failed input",
    writer=lambda context: FhirBundleWriter(context.classifier, context.out))
