"""DICOM Structured Report view of a :class:`~cxr_infer.prediction.Prediction` (``--format dicom-sr``).

One Comprehensive SR per DICOM source image, built with highdicom (``pip install 'cxr[dicom]'``)
as a TID 1500 Imaging Measurement Report: the source's patient and study, the model as observer
device and algorithm, the finding coded in SNOMED CT, the probability and threshold, whether the
image is within the intended use and why not, and that it is not a diagnosis (the content, item
by item: docs/hospital.md). An image outside the intended use that was not classified, or one that
could not be read, gets an SR saying so, without finding or probability. The SOP Instance UID
depends only on the source image, the model file, the thresholds and the answer
(:meth:`cxr_hospital.report.ModelIdentity.sr_uid`), so writing or storing one answer twice never
makes two, and two different answers never share one.

Examples:
    >>> clf = Classifier()                                                    # doctest: +SKIP
    >>> header = read_header("chest.dcm")                                     # doctest: +SKIP
    >>> sr = build_sr(clf.predict("chest.dcm"), header, model_identity(clf))  # doctest: +SKIP
    >>> sr.SOPClassUID.name, sr.StudyInstanceUID == header.StudyInstanceUID   # doctest: +SKIP
    ('Comprehensive SR Storage', True)
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any, Dict, Optional, Tuple

from cxr_infer.dicom import read_header
from cxr_infer.errors import InputError
from cxr_infer.formats import FormatContext, OutputFormat, ResultWriter

from .report import (
    CLASSIFIED,
    CXR_SCHEME,
    DISCLAIMER,
    IN_INTENDED_USE,
    NO,
    OUT_OF_USE_REASON,
    PLAIN_CHEST_XRAY,
    PROBABILITY_OF_POSITIVE,
    THRESHOLD,
    UNITLESS,
    YES,
    Answer,
    Concept,
    ModelIdentity,
    finding_for,
    finding_words,
    model_identity,
    not_classified_words,
    result_uid,
    source_ids,
)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
#: Series Number of cxr's SR series (one per study and model).
SERIES_NUMBER = 7701
SERIES_DESCRIPTION = "cxr AI pneumonia classification (not a diagnosis)"
INSTALL_HINT = "writing DICOM SR needs highdicom: pip install 'cxr[dicom]'"
# TID 1500 rows 12-14: a container of qualitative evaluations at document level
_QUALITATIVE_EVALUATIONS = Concept("C0034375", "UMLS", "Qualitative Evaluations")
_IMPRESSION = Concept("121073", "DCM", "Impression")
_COMMENT = Concept("121106", "DCM", "Comment")
# Type 2 attributes of the Patient and General Study modules: an SR needs them present (empty is fine)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return highdicom


def missing() -> Optional[str]:
    """None when SR writing works here, otherwise what to install (one line)."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


def _code(concept: Concept) -> Any:
    from pydicom.sr.coding import Code

    return Code(concept.code, concept.scheme, concept.display)


def _evidence(header: Any) -> Any:
    """A copy of the source header that highdicom can take as evidence (Type 2 tags present)."""
    ids = source_ids(header)
    missing = [k for k, v in (("StudyInstanceUID", ids.study_instance_uid), ("SeriesInstanceUID",
               ids.series_instance_uid), ("SOPInstanceUID", ids.sop_instance_uid), ("SOPClassUID",
               ids.sop_class_uid)) if not v]
    if missing:
        raise InputError(f"DICOM header lacks {', '.join(missing)}: an SR must reference its image and study")
    evidence = header.copy()
    if "SOPClassUID" not in evidence:
        evidence.SOPClassUID = ids.sop_class_uid
    for key in _TYPE2:
        if key not in evidence:
            setattr(evidence, key, None)
    return evidence


def build_sr(pred: Any, header: Any, model: ModelIdentity, classified: bool = True,
             problem: Optional[str] = None) -> Any:
    """The Comprehensive SR (a highdicom ``ComprehensiveSR``, a pydicom Dataset) of one result.

    Args:
        pred: the :class:`~cxr_infer.classifier.Prediction` of the image ``header`` describes
            (``None`` with ``problem``).
        header: the source image's pydicom dataset (pixel data not needed).
        model: the model that made ``pred``.
        classified: ``False`` for an image outside the intended use that was not classified:
            the SR then holds the reasons instead of a finding.
        problem: why the image could not be read (one line): the SR then says it was not
            classified because of that.

    Raises:
        InputError: highdicom is missing, or the header lacks the UIDs an SR must reference.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    answer = Answer.unreadable(problem) if problem is not None else Answer.of(pred, classified)
    evidence = _evidence(header)
    ids = source_ids(evidence)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid, name=model.title, manufacturer_name="cxr", model_name=model.name,
        serial_number=model.sha256)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"cxr {model.backbone} {model.precision}", version=model.cxr_version,
        parameters=[f"{k}: {v}" for k, v in model.parameters().items()])
    tracking = hd.sr.TrackingIdentifier(uid=result_uid("tracking", ids.sop_instance_uid, model.sha256),
                                        identifier="cxr pneumonia classification")
    source = hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=ids.sop_class_uid,
                                                  referenced_sop_instance_uid=ids.sop_instance_uid)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, algorithm_id=algorithm, source_images=[source],
        **_group_content(hd, pred, answer, model))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=_code(PLAIN_CHEST_XRAY),
                                     imaging_measurements=[group])
    if answer.problem:
        texts = [(_IMPRESSION, f"Not classified: the image could not be read: {answer.problem}")]
    else:
        texts = [(_IMPRESSION, finding_words(pred, model.positive_label) if classified else not_classified_words(pred))]
        texts += [(OUT_OF_USE_REASON, reason) for reason in pred.domain_reasons]
    texts.append((_COMMENT, DISCLAIMER))
    container = hd.sr.ContainerContentItem(name=_code(_QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=_code(name), value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for name, text in texts])
    report[0].ContentSequence.append(container)
    schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=CXR_SCHEME, name="cxr result concepts",
        responsible_organization="cxr project (see the cxr README, Hospital integration)")]
    from cxr_infer import __version__

    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=report, series_instance_uid=model.series_uid(ids.study_instance_uid),
        series_number=SERIES_NUMBER, sop_instance_uid=model.sr_uid(ids.sop_instance_uid, answer),
        instance_number=_instance_number(evidence), manufacturer="cxr", is_complete=True, is_final=False,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=model.title[:64],
        software_versions=f"cxr {__version__}", coding_schemes=schemes)


def _group_content(hd: Any, pred: Any, answer: Answer, model: ModelIdentity) -> Dict[str, Any]:
    """The measurement group's finding, measurements and qualitative evaluations for ``answer``."""
    if not answer.classified:
        evaluations = [hd.sr.QualitativeEvaluation(_code(CLASSIFIED), _code(NO))]
        if not answer.problem:
            evaluations.append(hd.sr.QualitativeEvaluation(_code(IN_INTENDED_USE), _code(NO)))
        return {"finding_type": None, "measurements": None, "qualitative_evaluations": evaluations}
    unit = _code(UNITLESS)
    probability = Concept(PROBABILITY_OF_POSITIVE.code, CXR_SCHEME, f"Probability of {model.positive_label.lower()}")
    measurements = [hd.sr.Measurement(name=_code(probability), value=round(float(pred.probability), 6), unit=unit),
                    hd.sr.Measurement(name=_code(THRESHOLD), value=float(pred.threshold), unit=unit)]
    evaluations = [] if pred.in_domain is None else [
        hd.sr.QualitativeEvaluation(_code(IN_INTENDED_USE), _code(YES if pred.in_domain else NO))]
    return {"finding_type": _code(finding_for(pred.label)), "measurements": measurements,
            "qualitative_evaluations": evaluations or None}


def sr_of_result(result: Any, header: Any, model: ModelIdentity, unreadable_sr: bool = False,
                 name: str = "<bytes>") -> Tuple[Any, Answer, str]:
    """The SR of one DICOM image as ``cxr-pacs`` and ``cxr-node`` store it: ``(sr, answer, words)``.

    ``result`` is the classifier's :class:`~cxr_infer.prediction.Prediction` or
    :class:`~cxr_infer.errors.InputError` for the image; an image outside the intended use is
    not classified. An image that could not be read raises its error, or, with
    ``unreadable_sr``, gets an SR saying so (the error without the input's ``name``). ``words``
    is the answer for a log line (no patient data).

    Examples:
        >>> sr, answer, words = sr_of_result(clf.predict(data), read_header(data), model)  # doctest: +SKIP
        >>> words                                                                        # doctest: +SKIP
        'PNEUMONIA 0.873'
    """
    if isinstance(result, InputError):
        if not unreadable_sr:
            raise result
        problem = str(result).removeprefix(f"{name}: ")
        sr = build_sr(None, header, model, classified=False, problem=problem)
        return sr, Answer.unreadable(problem), f"not read ({problem})"
    classified = result.in_domain is not False
    sr = build_sr(result, header, model, classified=classified)
    words = (f"{result.label} {result.probability:.3f}" if classified
             else "not classified (" + "; ".join(result.domain_reasons) + ")")
    return sr, Answer.of(result, classified), words


def _instance_number(header: Any) -> int:
    try:
        return max(1, int(header.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def sr_bytes(sr: Any) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buf = io.BytesIO()
    try:
        sr.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2
        sr.save_as(buf, write_like_original=False)
    return buf.getvalue()


class SRFolderWriter(ResultWriter):
    """``cxr-infer --format dicom-sr --output DIR``: one SR file per DICOM input, named by its UID.

    ``out`` gets one line per SR written: the input, a tab, the SR file. A second input with
    the same SOP Instance UID as an earlier one is an error (its SR is already written).

    Examples:
        >>> w = SRFolderWriter("results/", classifier, sys.stdout)       # doctest: +SKIP
        >>> w.result("chest.dcm", classifier.predict("chest.dcm"))       # doctest: +SKIP
        chest.dcm	results/2.25.1234....dcm
    """

    def __init__(self, folder: str, classifier: Any, out: IO[str]) -> None:
        super().__init__(FormatContext(out=out, folder=folder, classifier=classifier))
        self.folder = Path(folder)
        self.model = model_identity(classifier)
        self.out = out
        self._written: Dict[str, str] = {}

    def _write(self, path: str, pred: Any, classified: bool) -> None:
        header = read_header(path)
        uid = source_ids(header).sop_instance_uid
        if uid and uid in self._written:
            raise InputError(f"same SOP Instance UID as {self._written[uid]}, whose SR is already written")
        sr = build_sr(pred, header, self.model, classified=classified)
        target = self.folder / f"{sr.SOPInstanceUID}.dcm"
        tmp = target.with_suffix(".dcm.part")
        try:
            tmp.write_bytes(sr_bytes(sr))
            os.replace(tmp, target)
        except OSError as exc:
            raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
        self._written[uid] = path
        self.out.write(f"{path}\t{target}\n")

    def result(self, path: str, pred: Any) -> None:
        """Write the SR of a classified input (raises :class:`InputError` naming what is wrong)."""
        self._write(path, pred, classified=True)

    def rejected(self, path: str, pred: Any, message: str) -> None:
        """Write the "not classified" SR of an input outside the intended use."""
        self._write(path, pred, classified=False)

    def error(self, path: str, message: str) -> None:
        """Failed inputs are reported on stderr only: there is no SR to write."""

    def close(self) -> None:
        """Nothing is buffered: each SR is written as its result comes."""


def input_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot get an SR before it is even classified (None when it can)."""
    if path == "-":
        return "--format dicom-sr needs DICOM files (an SR is written into the source's study), not stdin"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None  # the classifier names the problem
    from cxr_infer.dicom import looks_like_dicom

    if not looks_like_dicom(head):
        return "not a DICOM file: --format dicom-sr writes an SR into the source image's study, so needs DICOM inputs"
    return None


#: ``cxr-infer --format dicom-sr --output DIR`` (registered through the ``cxr.formats`` entry point).
SR_FORMAT = OutputFormat(
    "dicom-sr", "one DICOM Comprehensive SR per DICOM input (pip install 'cxr[dicom]'); stdout lists "
                "input<TAB>SR file. Non-DICOM inputs fail",
    writer=lambda context: SRFolderWriter(context.folder or ".", context.classifier, context.out),
    target="folder", missing=missing, input_problem=input_problem)
