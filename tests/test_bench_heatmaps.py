"""cxr-bench heatmaps' border mass: the share of a map's mass in the image's outer 10%, on synthetic maps
and through the runtime's ``Prediction.heatmap_at``, grouped by true and by predicted label."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from cxr_bench.heatmaps import border_mass, border_share
from cxr_infer.prediction import Prediction


def _frame_only(size: int, frame: float = 0.1) -> np.ndarray:
    heat = np.ones((size, size), np.float32)
    k = int(np.ceil(size * frame - 0.5))  # the pixels whose centres lie in the frame
    heat[k:size - k, k:size - k] = 0.0
    return heat


def _blob(size: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_border_share_on_synthetic_maps():
    assert border_share(_frame_only(224)) == 1.0
    assert border_share(_blob(224, 15.0)) < 1e-3
    assert border_share(np.zeros((224, 224))) is None
    assert border_share(-np.ones((10, 10))) is None  # negative evidence is no mass
    uniform = border_share(np.ones((100, 100)))
    assert uniform == pytest.approx(1 - 0.8 * 0.8)  # a frame 10% wide on each side holds 36% of the area
    assert border_share(np.ones((7, 7))) == pytest.approx(1 - 25 / 49)  # a coarse grid: cells by their centres


class _Maps:
    """A classifier stand-in: one Prediction per file with the map given for it."""

    def __init__(self, maps: Dict[str, np.ndarray], labels: Dict[str, str]) -> None:
        self.maps, self.labels = maps, labels
        self.spec = type("Spec", (), {"image_size": (224, 224)})()

    def iter_predict(self, files, batch_size=None, heatmap=False):
        assert heatmap
        for f in files:
            yield Prediction(self.labels[Path(f).name], 0.5, 0.5, heatmap=self.maps[Path(f).name])


def test_border_mass_groups_by_true_and_predicted_label(tmp_path):
    files: List[Path] = []
    for name in ("a.png", "b.png", "c.png"):
        files.append(tmp_path / name)
        Image.new("L", (60, 60)).save(files[-1])
    maps = {"a.png": _frame_only(60), "b.png": _blob(60, 4.0), "c.png": np.zeros((60, 60), np.float32)}
    predicted = {"a.png": "PNEUMONIA", "b.png": "PNEUMONIA", "c.png": "NORMAL"}
    result = border_mass(_Maps(maps, predicted), files, ["NORMAL", "PNEUMONIA", "PNEUMONIA"], batch=2)
    assert result["images"] == 3 and result["zero_maps"] == 1
    assert result["mean"] == pytest.approx(0.5, abs=1e-3) and result["median"] == pytest.approx(0.5, abs=1e-3)
    assert result["by_true_label"]["NORMAL"]["mean"] == pytest.approx(1.0)
    assert result["by_true_label"]["PNEUMONIA"] == {"images": 2, "zero_maps": 1, "mean": pytest.approx(0, abs=1e-3),
                                                    "median": pytest.approx(0, abs=1e-3)}
    assert result["by_predicted_label"]["NORMAL"] == {"images": 1, "zero_maps": 1, "mean": None, "median": None}
    assert result["frame"] == 0.1 and "10%" in result["definition"]


