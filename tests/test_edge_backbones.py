"""The edge backbones (MobileNetV3-Large, EfficientNet-B0) through the path every backbone takes:
one training epoch, ``cxr-export`` to FP32 and INT8 with the image check and the heatmap, then the
runtime's ``Classifier`` on both files.

Each run is random-init, one epoch on 40 shared images at 96 px (the stage taps at 48, 24, 12 and
6 rows, the last feature map 3 x 3), so the figures mean nothing; the test holds the plumbing: the
registry entry's taps exist in the exported graph and are what the image check reads, in FP32 and
through the INT8 file's quantizers, and the heatmap is the last feature map. The heatmap's parity
with autograd Grad-CAM is in ``tests/test_heatmap.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import REPO, TRAIN_DATA, needs_data

torch = pytest.importorskip("torch", reason="the edge backbones need the train extra (torch)")
pytest.importorskip("torchvision", reason="the edge backbones need the train extra (torchvision)")
pytest.importorskip("onnx", reason="exporting needs the export extra (onnx)")

import sys  # noqa: E402

for _sub in ("export", "benchmarks"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

from cxr_train.backbones import BACKBONES  # noqa: E402

pytestmark = needs_data
EDGE = ("mobilenet_v3_large", "efficientnet_b0")
SIZE = 96


def test_entries_build_their_base_with_the_declared_width():
    """``build`` gives image -> pooled features of ``feature_dim``; ImageNet weights load by name."""
    from cxr_train.models import build_model, load_base_weights

    for name in EDGE:
        entry = BACKBONES[name]
        assert entry.imagenet and entry.input_size == 224 and len(entry.domain_taps) == 4
        assert entry.heatmap_layer == ""  # the last feature map
        model, origin = build_model(name)
        assert origin == "random init"
        with torch.no_grad():
            assert model.base(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, entry.feature_dim)
        # a torchvision ImageNet state dict (its classifier included) fits the base by name
        import torchvision.models as tvm

        full = getattr(tvm, name)(weights=None).state_dict()
        assert load_base_weights(model.base, full) == len(model.base.state_dict())


@pytest.fixture(scope="module", params=EDGE)
def exported(request, tmp_path_factory):
    """A one-epoch run of the backbone and its FP32 and INT8 files (about 20 s each)."""
    from cxr_export.cli import main
    from cxr_train.loop import TrainConfig, train

    name = request.param
    root = tmp_path_factory.mktemp(name)
    train(TrainConfig(name, str(TRAIN_DATA), str(root / "run"), epochs=1, max_images=40, image_size=SIZE,
                      batch_size=8, progress=False, workers=2, ema=0.0, save_last=False), log=lambda *a: None)
    out = root / f"{name}.onnx"
    rc = main([str(root / "run"), "--out", str(out), "--int8", "--calibration", str(TRAIN_DATA),
               "--calibration-count", "32", "--domain-fit-count", "64", "--threads", "2",
               "--max-drop", "100"])  # a one-epoch model: the gate's accuracy means nothing here
    assert rc == 0
    return name, out, out.with_name(f"{name}_int8.onnx")


def test_export_carries_the_entry_taps_and_the_last_feature_map(exported):
    from cxr_export.modelio import read_spec

    name, fp32, int8 = exported
    entry = BACKBONES[name]
    for path in (fp32, int8):
        spec = read_spec(path).to_dict()
        assert spec["backbone"] == name and spec["precision"] == ("fp32" if path == fp32 else "int8")
        assert spec["domain"]["stage_tensors"] == list(entry.domain_taps), path.name
        assert spec["heatmap"]["grid"] == [SIZE // 32, SIZE // 32]
        assert spec["heatmap"]["layer"] == spec["heatmap"]["feature_map"]
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(fp32))).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    # the ends of the first four stages: strides 2, 4, 8 and 16
    assert [dims[t][2] for t in entry.domain_taps] == [SIZE // 2, SIZE // 4, SIZE // 8, SIZE // 16]


def test_runtime_classifies_with_the_check_and_the_heatmap(exported):
    from cxr_infer import Classifier

    name, fp32, int8 = exported
    images = sorted((TRAIN_DATA / "PNEUMONIA").iterdir())[:3] + sorted((TRAIN_DATA / "NORMAL").iterdir())[:3]
    probs = {}
    for path in (fp32, int8):
        clf = Classifier(path, threads=2)
        assert clf.domain_available
        predictions = clf.predict([str(p) for p in images], heatmap=True)
        assert len(predictions) == len(images)
        for p in predictions:
            assert p.in_domain is not None and np.isfinite(p.domain_score)
            assert p.heatmap.shape == (SIZE // 32, SIZE // 32) and np.all(np.isfinite(p.heatmap))
        probs[path] = np.array([p.probability for p in predictions])
    assert float(np.abs(probs[fp32] - probs[int8]).max()) < 0.25  # INT8 follows FP32 (an untrained model)
    meta = json.loads((Path(fp32).parent / "run" / "checkpoint.json").read_text())
    assert meta["backbone"] == name and meta["pretrained"] is False
