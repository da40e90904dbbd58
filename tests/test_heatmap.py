"""Grad-CAM in the graph (cxr_export.heatmap): equal to PyTorch autograd Grad-CAM, passes the
sanity checks of Adebayo et al. 2018, and finds a bright square in noise.

Tolerance of the parity, against PyTorch autograd in float32, per image and relative to the map's
largest magnitude (:data:`PARITY`): 1e-4 for the last feature map (tiny, MobileNetV3,
EfficientNet-B0), VGG16's last convolution and ResNet50's layer3 (measured 1e-6 to 5e-5); 5% for
InceptionV3's Mixed_5d, with the maps' ranks agreeing (Spearman > 0.99). Its gradient comes back
through eight Inception blocks, and float32 rounding flips the ReLUs whose input lies near zero:
PyTorch's own float32 map is up to 3.7% off the float64 one on these images, and the graph's
(BatchNorm folded, other kernels) up to 2.4% off PyTorch's. The models' BatchNorm statistics are
those of random images first, so that activations keep a trained network's scale (freshly
initialised, InceptionV3's grow to 1e7).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
for sub in ("runtime", "train", "export", "benchmarks"):
    sys.path.insert(0, str(REPO / sub))

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from cxr_infer.model import ModelFile  # noqa: E402

#: the module whose output is the heatmap's layer, per backbone (the backbone entry's heatmap_layer;
#: tiny has none: its last feature map)
LAYER = {"tiny": "base.features", "resnet50": "base.layer3", "vgg16": "base.features.29",
         "inception_v3": "base.Mixed_5d", "mobilenet_v3_large": "base.features", "efficientnet_b0": "base.features"}
PARITY = {"tiny": 1e-4, "resnet50": 1e-4, "vgg16": 1e-4, "inception_v3": 0.05, "mobilenet_v3_large": 1e-4,
          "efficientnet_b0": 1e-4}


def export_with_heatmap(model, backbone: str, size: int, path: Path) -> ModelFile:
    from cxr_export.heatmap import add_heatmap
    from cxr_export.onnx_export import export_fp32

    export_fp32(model.eval(), {"backbone": backbone, "image_size": size}, path)
    add_heatmap(path, threads=1)
    return ModelFile(path, threads=1)


def autograd_gradcam(model, backbone: str, x: np.ndarray, positive: int = 1) -> np.ndarray:
    """Grad-CAM as pytorch-grad-cam computes it, of the logit margin (positive minus the other label) and
    signed: the spatial mean of d(margin)/dA as channel weights, A the layer's output."""
    module = model.get_submodule(LAYER[backbone])
    captured = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        captured["A"] = output

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model.eval()(torch.from_numpy(x))
            (logits[:, positive] - logits[:, 1 - positive]).sum().backward()
    finally:
        handle.remove()
    feature_map = captured["A"]
    alpha = feature_map.grad.mean(dim=(2, 3), keepdim=True)
    return (alpha * feature_map).sum(dim=1).detach().numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by position; the maps' ties are zeros)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def maps_of(model_file: ModelFile, pixels: np.ndarray) -> np.ndarray:
    return model_file.run(pixels, ["heatmap"])[0]


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def calibrated(model, size: int):
    """``model`` with the BatchNorm statistics of a few batches of random images, in eval mode."""
    from cxr_infer.model import graph_input
    from cxr_infer.spec import ModelSpec

    spec = ModelSpec.new(backbone="any", image_size=size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for seed in range(4):
            model(torch.from_numpy(graph_input(spec, pixels(8, size, seed=10 + seed))))
    return model.eval()


@pytest.mark.parametrize("backbone, size, seed", [("tiny", 64, 2), ("resnet50", 64, 2), ("vgg16", 64, 2),
                                                  ("inception_v3", 160, 3),  # 160 px: Mixed_5d at 17 x 17
                                                  ("mobilenet_v3_large", 128, 2), ("efficientnet_b0", 128, 2)])
def test_graph_map_equals_autograd_gradcam(backbone, size, seed, tmp_path):
    from cxr_train.models import build_model

    torch.manual_seed(seed)
    model = calibrated(build_model(backbone)[0], size)
    model_file = export_with_heatmap(model, backbone, size, tmp_path / f"{backbone}.onnx")
    px = pixels(6, size)
    x = model_file.graph_input(px)
    graph = maps_of(model_file, px)
    reference = autograd_gradcam(model, backbone, x)
    assert graph.shape == reference.shape and graph.shape[1:] == model_file.spec.heatmap.grid
    assert np.mean(reference > 0) > 0.05 and np.mean(reference < 0) > 0.05  # signed maps, not zero arrays
    for i in range(len(px)):
        assert float(np.abs(graph[i] - reference[i]).max()) <= PARITY[backbone] * float(np.abs(reference[i]).max()), i
        assert spearman(graph[i].ravel(), reference[i].ravel()) > 0.99, i


def test_int8_map_agrees_with_fp32(tmp_path):
    """An INT8 export keeps the heatmap (dequantized weights, quantized activations) close to FP32."""
    model, meta = trained_square_model()
    from cxr_export.heatmap import add_heatmap
    from cxr_export.onnx_export import export_fp32
    from cxr_export.quantize import quantize_int8

    fp32 = tmp_path / "sq.onnx"
    _, spec = export_fp32(model, meta, fp32)
    images, _, _ = square_images(64, seed=5)
    int8 = quantize_int8(fp32, tmp_path / "sq_int8.onnx", images, spec)
    for path in (fp32, int8):
        add_heatmap(path, threads=1)
    test_images, labels, _ = square_images(80, seed=6)
    test_images = test_images[labels == 1]  # 40 images with a square: maps with something to agree on
    map32 = maps_of(ModelFile(fp32, threads=1), test_images).reshape(40, -1)
    map8 = maps_of(ModelFile(int8, threads=1), test_images).reshape(40, -1)
    rho = [spearman(a, b) for a, b in zip(map32, map8) if a.std() > 0 and b.std() > 0]
    assert len(rho) >= 30 and np.median(rho) > 0.8


# ---- a tiny model that finds a bright square in noise
def square_images(n: int, seed: int, size: int = 64, side: int = 16):
    """Noise images, every second one with a bright square; returns (pixels, labels, corners)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 140, (n, size, size, 1), np.uint8).repeat(3, axis=3)
    labels = np.arange(n) % 2
    corners = rng.integers(0, size - side, (n, 2))
    for i in np.flatnonzero(labels):
        y, x = corners[i]
        images[i, y:y + side, x:x + side] = 230
    return images, labels, corners


_TRAINED = {}


def trained_square_model():
    """TinyBase + head trained for a few seconds to tell squares from noise (cached per session)."""
    if "model" not in _TRAINED:
        from cxr_infer.model import graph_input
        from cxr_infer.spec import ModelSpec
        from cxr_train.models import build_model

        torch.manual_seed(0)
        model, _ = build_model("tiny", dropout=0.0)
        images, labels, _ = square_images(512, seed=1)
        x = torch.from_numpy(graph_input(ModelSpec.new(backbone="tiny", image_size=64), images))
        y = torch.from_numpy(labels)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(6):
            for start in range(0, len(x), 64):
                loss = torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
        _TRAINED["model"] = model.eval()
    return _TRAINED["model"], {"backbone": "tiny", "image_size": 64}


def test_a_model_that_finds_a_square_points_at_it(tmp_path):
    model, meta = trained_square_model()
    model_file = export_with_heatmap(model, "tiny", 64, tmp_path / "sq.onnx")
    images, labels, corners = square_images(100, seed=2)
    probs = model_file.positive_probability(images)
    assert np.mean((probs >= 0.5) == labels) > 0.9  # it learned the task
    maps = maps_of(model_file, images[labels == 1])
    grid = maps.shape[1]
    cell = 64 // grid
    hits = []
    for heat, (y, x) in zip(maps, corners[labels == 1]):
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        # the peak's cell overlaps the 16 x 16 square
        hits.append(row * cell < y + 16 and y < (row + 1) * cell and col * cell < x + 16 and x < (col + 1) * cell)
    assert np.mean(hits) >= 0.8


@pytest.mark.parametrize("part", ["head", "last block"])
def test_map_changes_when_weights_are_rerandomised(part, tmp_path):
    """Adebayo et al. 2018: a saliency map that survives re-randomising the model explains nothing."""
    import copy

    model, _ = trained_square_model()
    images, labels, _ = square_images(40, seed=3)
    images = images[labels == 1]
    original = maps_of(export_with_heatmap(model, "tiny", 64, tmp_path / "a.onnx"), images)
    randomised = copy.deepcopy(model)
    torch.manual_seed(123)
    target = randomised.head if part == "head" else randomised.base.features[-3]  # the last convolution
    for module in target.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    changed = maps_of(export_with_heatmap(randomised, "tiny", 64, tmp_path / "b.onnx"), images)
    # a map that became constant (all zero) has no rank correlation with the original: count it as 0
    rho = [spearman(a.ravel(), b.ravel()) if a.std() > 0 and b.std() > 0 else 0.0
           for a, b in zip(original, changed)]
    assert np.median(rho) < 0.5


def test_files_without_a_head_are_refused_clearly(tiny_model, tmp_path):
    import onnx

    from cxr_export.heatmap import HeadNotFound, add_heatmap_graph

    model = onnx.load(str(tiny_model))  # the test model: GlobalAveragePool -> Flatten -> MatMul -> Softmax
    with pytest.raises(HeadNotFound):
        add_heatmap_graph(model, "feat", 1)


# ---- the runtime: on request only, and the overlays of cxr-infer --heatmap
@pytest.fixture(scope="module")
def square_model(tmp_path_factory) -> Path:
    model, _ = trained_square_model()
    path = tmp_path_factory.mktemp("sq") / "square.onnx"
    export_with_heatmap(model, "tiny", 64, path)
    return path


def test_predict_gives_a_unit_map_only_when_asked(square_model, monkeypatch):
    from cxr_infer import Classifier

    clf = Classifier(square_model, threads=1)
    assert clf.info()["heatmap"]["available"] and clf.info()["heatmap"]["grid"] == [4, 4]
    assert clf.info()["heatmap"]["computed"] == "only when asked for" and clf.info()["heatmap"]["signed"]
    from cxr_infer.info import summary
    assert "Grad-CAM 4x4" in summary(clf) and "computed only when asked for" in summary(clf)
    asked = []
    original = ModelFile.run

    def recording(self, pixels, outputs, batch_size=None):
        asked.append(list(outputs))
        return original(self, pixels, outputs, batch_size)

    monkeypatch.setattr(ModelFile, "run", recording)
    images, labels, corners = square_images(4, seed=9)
    plain = clf.predict(list(images))
    assert all(p.heatmap is None for p in plain) and all("heatmap" not in o for o in asked)  # not fetched
    with_map = clf.predict(list(images), heatmap=True)
    assert asked[-1][-1] == "heatmap"
    (raw,) = ModelFile(square_model, threads=1).run(images, ["heatmap"])  # signed: > 0 for PNEUMONIA
    for p, q, signed in zip(plain, with_map, raw):
        assert p.probability == q.probability and q.heatmap_label == q.label  # the predicted label's evidence
        assert q.heatmap.dtype == np.float32 and q.heatmap.shape == (4, 4)
        own = np.maximum(signed if q.label == "PNEUMONIA" else -signed, 0)
        np.testing.assert_allclose(q.heatmap, own / own.max() if own.max() > 0 else own, atol=1e-6)
    full = with_map[1].heatmap_at((64, 48))
    assert full.shape == (48, 64) and 0 <= full.min() and full.max() <= 1
    with pytest.raises(ValueError, match="heatmap=True"):
        plain[0].heatmap_at((8, 8))


def test_a_model_without_the_output_says_how_to_add_it(tiny_model, tmp_path):
    from conftest import run_cli

    from cxr_infer import Classifier
    from cxr_infer.errors import ModelError

    clf = Classifier(tiny_model, threads=1)
    assert not clf.heatmap_available and "python -m cxr_export.heatmap" in clf.info()["heatmap"]["reason"]
    with pytest.raises(ModelError, match="python -m cxr_export.heatmap"):
        clf.predict(np.zeros((224, 224, 3), np.uint8), heatmap=True)
    r = run_cli("--model", str(tiny_model), "--heatmap", str(tmp_path / "maps"), str(tmp_path / "x.png"))
    # nothing half-written
    assert r.returncode == 2 and "has no heatmap output" in r.stderr.decode() and r.stdout == b""


def test_cli_writes_one_overlay_per_input(square_model, tmp_path):
    from conftest import run_cli
    from PIL import Image
    from test_dicom import make_dicom

    images, _, _ = square_images(2, seed=4)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(images[1]).save(tmp_path / folder / "same.png")
    dicom = tmp_path / "scan.dcm"
    dicom.write_bytes(make_dicom(images[1][..., 0]))
    out = tmp_path / "maps"
    r = run_cli("--model", str(square_model), "--heatmap", str(out), str(tmp_path / "a" / "same.png"),
                str(tmp_path / "b" / "same.png"), str(dicom), str(tmp_path / "missing.png"))
    assert r.returncode == 1  # the missing file failed, the others were classified and drawn
    assert sorted(p.name for p in out.iterdir()) == ["same-2.png", "same.png", "scan.png"]  # none overwritten
    overlay = Image.open(out / "scan.png")
    assert overlay.mode == "RGB" and overlay.width > 512 and overlay.height > 512  # small inputs are shown larger


def test_overlay_marks_out_of_domain_images():
    from PIL import Image

    from cxr_infer.overlay import CAPTION, _status_lines, render_overlay
    from cxr_infer.prediction import Prediction

    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 1.0
    outside = Prediction("PNEUMONIA", 0.9, 0.5, in_domain=False, heatmap=heat,
                         domain_reasons=("patient age 67Y is outside the intended 1-5 years",))
    lines = _status_lines(outside, 80)
    assert lines[-1] == CAPTION and any("OUTSIDE THE INTENDED USE" in line and "67Y" in " ".join(lines)
                                        for line in lines)
    picture = np.asarray(render_overlay(Image.new("L", (600, 600), 128), outside))
    top = picture[: picture.shape[0] // 8]
    assert (top[..., 0] > 200).sum() > (top[..., 2] > 200).sum()  # the caption is drawn in red


def test_overlay_scale_has_numbers_and_an_empty_map_says_so(monkeypatch):
    """The colour bar is labelled 0 to 1 (the share of the strongest region); a map without evidence
    says in the picture that no region raised the label's score; the colour is laid on linearly (no
    square root that would draw edges the map does not have)."""
    from PIL import Image, ImageDraw

    from cxr_infer.overlay import render_overlay
    from cxr_infer.prediction import Prediction

    written = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: written.append(text) or original(self, xy, text, *a, **k))
    empty = Prediction("NORMAL", 0.1, 0.5, in_domain=True, heatmap=np.zeros((14, 14), np.float32),
                       heatmap_label="NORMAL")
    render_overlay(Image.new("L", (600, 600), 128), empty)
    assert "no region raised the NORMAL score" in written
    assert {"1.00", "0.75", "0.50", "0.25", "0.00"} <= set(written)
    assert any("evidence for NORMAL" in line for line in written)
    written.clear()
    ramp = np.tile(np.linspace(0, 1, 14, dtype=np.float32), (14, 1))  # 0 on the left, 1 on the right
    picture = np.asarray(render_overlay(Image.new("L", (700, 700), 0), Prediction(
        "PNEUMONIA", 0.9, 0.5, heatmap=ramp, heatmap_label="PNEUMONIA")), np.float32)
    assert "no region raised the PNEUMONIA score" not in written
    row = picture[picture.shape[0] - 50, :700].sum(axis=1)  # a black image: the colour alone, left to right
    near_zero = row[60:160].mean()
    assert near_zero < 0.15 * row[540:640].mean()  # low attention stays faint (0.08; a square root: 0.21)


def test_colormap_is_viridis():
    matplotlib = pytest.importorskip("matplotlib")
    from cxr_infer.overlay import viridis

    t = np.linspace(0, 1, 256)
    reference = matplotlib.colormaps["viridis"](t)[:, :3] * 255
    assert np.abs(viridis(t).astype(float) - reference).max() <= 3  # within 3 of 255 gray levels


def test_bench_heatmaps_report(square_model, tmp_path):
    """cxr-bench heatmaps: a grid chosen by file name per kind, and the INT8 agreement figure."""
    import json

    from PIL import Image

    from cxr_bench.cli import main
    from cxr_export.heatmap import add_heatmap
    from cxr_export.modelio import read_spec, write_spec
    from cxr_export.quantize import quantize_int8

    images, labels, _ = square_images(16, seed=11)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:02d}.png")
    spec = read_spec(square_model)
    spec = spec.without_additions(["domain", "heatmap"])
    int8 = quantize_int8(square_model, tmp_path / "square_int8.onnx", images, spec)
    write_spec(int8, spec.updated({"precision": "int8"}))
    add_heatmap(int8, threads=1)
    assert main(["heatmaps", "--model", str(int8), "--data", str(tmp_path / "data"), "--per-kind", "2",
                 "--threads", "1", "--out", str(tmp_path / "out"), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "heatmaps.json").read_text())
    (entry,) = report["models"]
    assert entry["chosen"]["true positive"] == sorted(entry["chosen"]["true positive"])  # by file name
    assert sum(entry["counts"].values()) == 16 and entry["int8_vs_fp32_activations"]["median"] > 0.8
    grid = Image.open(tmp_path / "out" / entry["grid_image"])
    assert grid.format == "JPEG"
    assert grid.width == 2 * 320 and grid.height > 4 * 300  # two columns, one row per kind
    assert "never picked by eye" in (tmp_path / "out" / "heatmaps.md").read_text()


def test_int8_head_weight_is_multiplied_as_integers(tmp_path, monkeypatch):
    """An INT8 file's first head weight (int8, one scale per row, zero offsets) is not dequantized
    per call: the gated vector takes the scales and is multiplied by the int8 matrix
    (DynamicQuantizeLinear + MatMulInteger). The map stays that of the dequantized weight to within
    the 8-bit rounding of that vector, and the probabilities are untouched."""
    import onnx

    model, meta = trained_square_model()
    from cxr_export import heatmap as hm
    from cxr_export.onnx_export import export_fp32
    from cxr_export.quantize import quantize_int8

    fp32 = tmp_path / "sq.onnx"
    _, spec = export_fp32(model, meta, fp32)
    images, labels, _ = square_images(64, seed=5)
    int8 = quantize_int8(fp32, tmp_path / "sq_int8.onnx", images, spec)
    head = hm.find_head(onnx.load(str(int8)), spec.features_output)
    assert hm._int8_rows(onnx.load(str(int8)), head["w1"]) is not None  # the quantizer's per-row int8 weight
    fp32_head = hm.find_head(onnx.load(str(fp32)), spec.features_output)
    assert hm._int8_rows(onnx.load(str(fp32)), fp32_head["w1"]) is None  # an FP32 weight: the float path
    floated = tmp_path / "sq_int8_float.onnx"
    with monkeypatch.context() as m:
        m.setattr(hm, "_int8_rows", lambda model, weight: None)
        hm.add_heatmap(int8, out_path=floated, threads=1)
    hm.add_heatmap(int8, threads=1)
    (switched,) = [n for n in onnx.load(str(int8)).graph.node if n.name.startswith(hm.PREFIX)]
    branch = next(a.g for a in switched.attribute if a.name == "then_branch").node
    assert "MatMulInteger" in [n.op_type for n in branch]
    assert hm.PREFIX + "w1_t" not in [n.name for n in branch]  # the float weight is never transposed
    test_images, labels, _ = square_images(40, seed=7)
    a = ModelFile(int8, threads=1)
    b = ModelFile(floated, threads=1)
    maps_int, maps_float = maps_of(a, test_images).reshape(40, -1), maps_of(b, test_images).reshape(40, -1)
    np.testing.assert_allclose(maps_int, maps_float, rtol=0, atol=0.02 * float(maps_float.max()))
    assert np.array_equal(a.run(test_images, [spec.prob_output])[0], b.run(test_images, [spec.prob_output])[0])
