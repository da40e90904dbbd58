"""The result record: one :class:`Prediction` per classified image.

Every view of a result (the table, JSON lines and CSV of ``cxr-infer``, a DICOM SR, a FHIR
Observation, a service's answer) is written from this one record.

Examples:
    >>> p = Prediction("PNEUMONIA", 0.87, 0.5, in_domain=True)
    >>> p.positive, p.to_dict()["label"]
    (True, 'PNEUMONIA')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """The result for one image.

    ``probability`` is the model's probability of ``positive_label``; ``label`` is the positive
    label when ``probability >= threshold``, otherwise the most probable other label.

    ``in_domain`` says whether the image lies inside the model's intended use: ``False`` when
    a DICOM header says otherwise (an adult, a lateral view, a CT: see
    :mod:`cxr_infer.intended_use`) or when its ``domain_score`` (how far the image lies from the
    training images, see ``cxr_export.domain``) exceeds the model's calibrated domain threshold;
    the label should then not be trusted, and ``domain_reasons`` says why in words (empty when
    in domain). ``None`` when no check is possible (the model file carries no domain statistics
    and no header said otherwise).
    """

    label: str
    probability: float
    threshold: float
    probabilities: Mapping[str, float] = field(default_factory=dict)
    source: Optional[str] = None
    in_domain: Optional[bool] = None
    domain_score: Optional[float] = None
    domain_reasons: Tuple[str, ...] = ()
    #: Grad-CAM: where the model saw evidence for :attr:`heatmap_label`, float32 ``(h, w)`` at the
    #: model's heatmap grid, scaled to 0..1 (all zeros: no region raised that label's score); only with
    #: ``predict(..., heatmap=True)``. Model attention, not a localisation; :meth:`heatmap_at` gives it
    #: at the image's own size.
    heatmap: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    #: the label whose evidence :attr:`heatmap` shows: the predicted one (files whose map is unsigned:
    #: always the positive label)
    heatmap_label: Optional[str] = None

    def heatmap_at(self, size: Tuple[int, int]) -> np.ndarray:
        """The heatmap resized (bilinear) to ``size`` = ``(width, height)``, e.g. the original image's.

        Examples:
            >>> p = clf.predict("chest.jpeg", heatmap=True)               # doctest: +SKIP
            >>> p.heatmap.shape, p.heatmap_at((1024, 880)).shape        # doctest: +SKIP
            ((7, 7), (880, 1024))
        """
        if self.heatmap is None:
            raise ValueError("this prediction has no heatmap: ask for it with predict(..., heatmap=True)")
        from PIL import Image

        resized = Image.fromarray(np.asarray(self.heatmap, np.float32), "F").resize(
            (int(size[0]), int(size[1])), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)

    @property
    def positive(self) -> bool:
        """True when ``probability >= threshold``."""
        return self.probability >= self.threshold

    def to_dict(self, rounded: bool = False) -> Dict[str, Any]:
        """A JSON-ready dict: ``path``, ``label``, ``probability``, ``threshold``, ``probabilities``,
        ``in_domain``, ``domain_score``, ``domain_reasons``. ``rounded=True`` gives the values as every
        text view writes them: probabilities to 6 decimals, the domain score to 4."""
        def prob(v: float) -> float:
            return round(float(v), 6) if rounded else v

        score = self.domain_score
        if rounded and score is not None:
            score = round(float(score), 4)
        return {"path": self.source, "label": self.label, "probability": prob(self.probability),
                "threshold": self.threshold, "probabilities": {k: prob(v) for k, v in self.probabilities.items()},
                "in_domain": self.in_domain, "domain_score": score, "domain_reasons": list(self.domain_reasons)}
