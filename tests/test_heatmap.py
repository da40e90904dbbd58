"""Grad-CAM in the graph (cxr_export.heatmap): equal to PyTorch autograd Grad-CAM, passes the
sanity checks of Adebayo et al. 2018, and finds a bright square in noise.

Tolerance of the parity: the graph and PyTorch compute the same FP32 expression with different
kernels (and BatchNorm folded into the convolutions on export), so the maps agree to float32
rounding carried through a few thousand multiply-adds: 1e-4 of the map's maximum (measured
differences are about 1e-6 of it).
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

#: the module whose output is the last feature map (the global pooling's input), per backbone
FEATURE_MAP = {"tiny": "base.features", "resnet50": "base.layer4", "vgg16": "base.features",
               "inception_v3": "base.Mixed_7c"}
PARITY = 1e-4


def export_with_heatmap(model, backbone: str, size: int, path: Path) -> ModelFile:
    from cxr_export.heatmap import add_heatmap
    from cxr_export.onnx_export import export_fp32

    export_fp32(model.eval(), {"backbone": backbone, "image_size": size}, path)
    add_heatmap(path, threads=1)
    return ModelFile(path, threads=1)


def autograd_gradcam(model, backbone: str, x: np.ndarray, positive: int = 1) -> np.ndarray:
    """Grad-CAM as pytorch-grad-cam computes it: spatial mean of dz/dA as channel weights."""
    module = model.get_submodule(FEATURE_MAP[backbone])
    captured = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        captured["A"] = output

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model.eval()(torch.from_numpy(x))
            logits[:, positive].sum().backward()
    finally:
        handle.remove()
    feature_map = captured["A"]
    alpha = feature_map.grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * feature_map).sum(dim=1)).detach().numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by position; the maps' ties are zeros)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def maps_of(model_file: ModelFile, pixels: np.ndarray) -> np.ndarray:
    return model_file.run(pixels, ["heatmap"])[0]


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


@pytest.mark.parametrize("backbone, size, seed", [("tiny", 64, 2), ("resnet50", 64, 2), ("vgg16", 64, 2),
                                                  ("inception_v3", 160, 3)])  # 160 px: a 3 x 3 grid
def test_graph_map_equals_autograd_gradcam(backbone, size, seed, tmp_path):
    from cxr_train.models import build_model

    torch.manual_seed(seed)  # random weights whose maps are not all zero (checked below)
    model, _ = build_model(backbone)
    model_file = export_with_heatmap(model, backbone, size, tmp_path / f"{backbone}.onnx")
    px = pixels(6, size)
    graph = maps_of(model_file, px)
    reference = autograd_gradcam(model, backbone, model_file.graph_input(px))
    assert graph.shape == reference.shape and graph.shape[1:] == tuple(model_file.spec.to_dict()["heatmap"]["grid"])
    assert np.mean(reference > 0) > 0.2  # maps to compare, not zero arrays
    np.testing.assert_allclose(graph, reference, rtol=0, atol=PARITY * float(reference.max()))


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
    map32 = maps_of(ModelFile(fp32, threads=1, spec=spec), test_images).reshape(40, -1)
    map8 = maps_of(ModelFile(int8, threads=1, spec=spec), test_images).reshape(40, -1)
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
    for p, q in zip(plain, with_map):
        assert p.probability == q.probability
        assert q.heatmap.dtype == np.float32 and q.heatmap.shape == (4, 4)
        assert q.heatmap.min() >= 0 and q.heatmap.max() in (0.0, 1.0)
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
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node if n.name.startswith(hm.PREFIX)]
    assert "MatMulInteger" in ops and "Transpose" not in ops
    test_images, labels, _ = square_images(40, seed=7)
    a = ModelFile(int8, threads=1, spec=spec)
    b = ModelFile(floated, threads=1, spec=spec)
    maps_int, maps_float = maps_of(a, test_images).reshape(40, -1), maps_of(b, test_images).reshape(40, -1)
    np.testing.assert_allclose(maps_int, maps_float, rtol=0, atol=0.02 * float(maps_float.max()))
    assert np.array_equal(a.run(test_images, [spec.prob_output])[0], b.run(test_images, [spec.prob_output])[0])
