"""Intended use: who and what a model is for, and the DICOM header checks that enforce it.

A model file's spec may carry an ``intended_use`` block, written by ``cxr-export`` from what
the training data is (for the Kermany set: children aged 1 to 5 years, CHEST, PA/AP views,
CR/DX/DR radiographs)::

    {"age_years": [1, 5], "age_margin_years": 0.5, "body_parts": ["CHEST"],
     "views": ["PA", "AP"], "modalities": ["CR", "DX", "DR"], "source": "..."}

A DICOM input's header is checked against it before inference: every value outside the
intended use is one reason in words ("patient age 67Y is outside the intended 1-5 years").
A missing, empty or unreadable tag is never a reason by itself: the image check still runs.

**The age range and its margin.** ``age_years`` ``[a, b]`` is in completed years, as ages are
usually stated ("aged one to five"): an age is inside from the ``a``-th birthday to the day
before the ``(b + 1)``-th (5 years 11 months is "5 years"). ``age_margin_years`` (0.5 by
default) widens that on each side, so the Kermany block accepts ``0.5 <= age < 6.5`` years:
the training ages themselves are stated approximately, and a few months changes a chest's
anatomy far less than the adult-versus-child gap the check exists for. DICOM ages (``AS``:
``067Y``, ``030M``, ``002W``, ``005D``) are truncated counts and are read as such (030M is
2.5 years); without ``PatientAge`` the age is computed from ``PatientBirthDate`` and the
first of ``StudyDate``, ``SeriesDate``, ``AcquisitionDate``.

Examples:
    >>> use = IntendedUse.from_spec(KERMANY)
    >>> use.header_reasons({"PatientAge": "067Y", "ViewPosition": "LL", "Modality": "CT"})
    ['patient age 67Y is outside the intended 1-5 years', 'view LL (lateral) is not frontal (PA, AP)', \
'modality CT is not a radiograph (CR, DX, DR)']
    >>> use.header_reasons({"PatientAge": "003Y", "ViewPosition": "PA", "Modality": "DX"})
    []
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ModelError

#: The Kermany training data (Guangzhou Women and Children's Medical Center): what cxr-export writes by default.
KERMANY: Dict[str, Any] = {
    "age_years": [1, 5], "age_margin_years": 0.5, "body_parts": ["CHEST"], "views": ["PA", "AP"],
    "modalities": ["CR", "DX", "DR"],
    "source": "Kermany et al. 2018: frontal chest radiographs of children aged 1 to 5 years, one hospital",
}
#: The DICOM header fields a check reads (see :func:`cxr_infer.dicom.header_of`).
HEADER_FIELDS = ("PatientAge", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ViewPosition",
                 "ViewCodeMeanings", "Modality", "BodyPartExamined", "ImageType")

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}
_VIEW_WORDS = {"LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral", "LLD": "decubitus",
               "RLD": "decubitus", "LAO": "oblique", "RAO": "oblique", "LPO": "oblique", "RPO": "oblique",
               "OBL": "oblique", "OBLIQUE": "oblique"}
_NOT_FRONTAL_MEANINGS = ("lateral", "oblique", "decubitus", "axial", "lordotic")
_FRONTAL_MEANINGS = {"postero-anterior": "PA", "posteroanterior": "PA", "antero-posterior": "AP",
                     "anteroposterior": "AP"}
_BODY_PART_SYNONYMS = {"THORAX": "CHEST", "LUNG": "CHEST", "LUNGS": "CHEST", "CHEST_LAT": "CHEST",
                       "PORTABLE CHEST": "CHEST"}
_RADIOGRAPHS = {"CR", "DX", "DR", "RG", "DF"}


def age_in_years(value: str) -> Optional[float]:
    """A DICOM age string (``AS``: ``nnnD/W/M/Y``) in years; None when it is not one.

    Examples:
        >>> age_in_years("030M"), age_in_years("002W") < 0.05, age_in_years("old")
        (2.5, True, None)
    """
    match = _AGE.match(str(value or ""))
    if not match:
        return None
    return int(match.group(1)) * _DAYS_PER[match.group(2).upper()] / 365.25


def _date(value: Any) -> Optional[_dt.date]:
    text = str(value or "").strip()
    try:
        return _dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8])) if re.fullmatch(r"\d{8}", text) else None
    except ValueError:
        return None


def age_from_dates(header: Mapping[str, Any]) -> Optional[float]:
    """Age in years at the study (``PatientBirthDate`` and the first of Study, Series, Acquisition date)."""
    born = _date(header.get("PatientBirthDate"))
    when = next((d for d in (_date(header.get(k)) for k in ("StudyDate", "SeriesDate", "AcquisitionDate")) if d),
                None)
    if born is None or when is None or when < born:
        return None
    return (when - born).days / 365.25


def _format_age(years: float, stated: str) -> str:
    match = _AGE.match(stated or "")
    if match:
        return f"{int(match.group(1))}{match.group(2).upper()}"
    return f"{years:.1f} years (from the birth date)"


def _words(values: Sequence[str]) -> str:
    return ", ".join(values)


@dataclass(frozen=True)
class IntendedUse:
    """A validated ``intended_use`` block; :meth:`header_reasons` checks a DICOM header against it."""

    age_years: Optional[Tuple[float, float]]
    age_margin_years: float
    body_parts: Tuple[str, ...]
    views: Tuple[str, ...]
    modalities: Tuple[str, ...]
    source: str = ""

    @classmethod
    def from_spec(cls, block: Any, source: str = "model") -> "IntendedUse":
        """Parse and validate a spec's ``intended_use`` block (:class:`ModelError` on anything wrong)."""
        if not isinstance(block, Mapping):
            raise ModelError(f"{source}: cxr.spec intended_use must be an object")
        age = block.get("age_years")
        if age is not None and not (isinstance(age, (list, tuple)) and len(age) == 2
                                    and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in age)
                                    and 0 <= age[0] <= age[1]):
            raise ModelError(f"{source}: cxr.spec intended_use.age_years must be [min, max] years, 0 <= min <= max")
        margin = block.get("age_margin_years", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise ModelError(f"{source}: cxr.spec intended_use.age_margin_years must be a number >= 0")
        lists = {}
        for key in ("body_parts", "views", "modalities"):
            value = block.get(key, [])
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ModelError(f"{source}: cxr.spec intended_use.{key} must be a list of names")
            lists[key] = tuple(v.strip().upper() for v in value)
        return cls(age_years=None if age is None else (float(age[0]), float(age[1])), age_margin_years=float(margin),
                   source=str(block.get("source", "")), **lists)

    def describe(self) -> str:
        """One line for people: ``ages 1-5 years (margin 0.5), CHEST, views PA/AP, modalities CR/DX/DR``."""
        parts = []
        if self.age_years:
            parts.append(f"ages {self._range()} years (margin {self.age_margin_years:g})")
        if self.body_parts:
            parts.append("/".join(self.body_parts))
        if self.views:
            parts.append("views " + "/".join(self.views))
        if self.modalities:
            parts.append("modalities " + "/".join(self.modalities))
        return ", ".join(parts)

    def _range(self) -> str:
        low, high = self.age_years or (0, 0)
        return f"{low:g}-{high:g}"

    # ---- the checks, one reason each
    def age_reason(self, header: Mapping[str, Any]) -> Optional[str]:
        if not self.age_years:
            return None
        stated = str(header.get("PatientAge") or "").strip()
        years = age_in_years(stated)
        if years is None:
            stated, years = "", age_from_dates(header)
        if years is None:
            return None
        low, high = self.age_years
        if low - self.age_margin_years <= years < high + 1 + self.age_margin_years:
            return None
        return f"patient age {_format_age(years, stated)} is outside the intended {self._range()} years"

    def view_reasons(self, header: Mapping[str, Any]) -> List[str]:
        if not self.views:
            return []
        reasons = []
        view = str(header.get("ViewPosition") or "").strip().upper()
        if view and view not in self.views:
            kind = _VIEW_WORDS.get(view)
            frontal = "frontal" if set(self.views) <= {"PA", "AP"} else "an intended view"
            reasons.append(f"view {view}{f' ({kind})' if kind else ''} is not {frontal} ({_words(self.views)})")
        for meaning in header.get("ViewCodeMeanings") or []:
            text = str(meaning).strip()
            lower = text.lower()
            code = next((v for k, v in _FRONTAL_MEANINGS.items() if k in lower), None)
            if code in self.views:
                continue
            if code or any(word in lower for word in _NOT_FRONTAL_MEANINGS):
                reasons.append(f"view code '{text}' is not one of the intended views ({_words(self.views)})")
        return reasons

    def modality_reason(self, header: Mapping[str, Any]) -> Optional[str]:
        modality = str(header.get("Modality") or "").strip().upper()
        if not modality or not self.modalities or modality in self.modalities:
            return None
        what = "a radiograph" if set(self.modalities) <= _RADIOGRAPHS else "an intended modality"
        return f"modality {modality} is not {what} ({_words(self.modalities)})"

    def body_part_reason(self, header: Mapping[str, Any]) -> Optional[str]:
        part = str(header.get("BodyPartExamined") or "").strip().upper()
        if not part or not self.body_parts:
            return None
        if _BODY_PART_SYNONYMS.get(part, part) in self.body_parts or part in self.body_parts:
            return None
        return f"body part {part} is not {_words(self.body_parts)}"

    @staticmethod
    def image_type_reason(header: Mapping[str, Any]) -> Optional[str]:
        values = [str(v).strip().upper() for v in header.get("ImageType") or [] if str(v).strip()]
        if "LOCALIZER" in values:
            return "image type LOCALIZER: a localizer (scout) image, not a diagnostic radiograph"
        if values and values[0] == "DERIVED":
            return "image type DERIVED: an image derived from others, not an original acquisition"
        return None

    def header_reasons(self, header: Optional[Mapping[str, Any]]) -> List[str]:
        """Every way ``header`` (see :data:`HEADER_FIELDS`) lies outside this intended use; [] when none."""
        if not header:
            return []
        found = [self.age_reason(header), *self.view_reasons(header), self.modality_reason(header),
                 self.body_part_reason(header), self.image_type_reason(header)]
        return [reason for reason in found if reason]
