"""``cxr-bench heatmaps``: Grad-CAM overlays of a labelled folder, the first images of each kind
(TP, FP, FN, TN) by file name, how an INT8 file's maps agree with the same graph without
activation rounding (Spearman rank correlation per image), and the share of each map's mass in
the image's outer frame (border mass; see docs/benchmarks.md).

Examples:
    >>> heat = np.zeros((10, 10)); heat[0, :] = 1.0
    >>> border_share(heat)
    1.0
    >>> border_share(np.zeros((10, 10))) is None
    True
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .dataset import PixelCache, list_dataset
from .upstream import ADD_HEATMAP_HINT
from .util import BenchError, fmt_num, md_table, new_report, say, write_report

KIND = "cxr-bench/heatmaps"
KINDS = ("true positive", "false positive", "false negative", "true negative")
#: the border: a frame this share of the image's width (left and right) and height (top and bottom) wide
FRAME = 0.1


def border_share(heat: np.ndarray, frame: float = FRAME) -> Optional[float]:
    """The share of a map's mass (negative values count as 0) whose pixel centres lie within the outer
    ``frame`` of its width and height; None for a map without mass (all zeros)."""
    heat = np.maximum(np.asarray(heat, np.float64), 0.0)
    total = float(heat.sum())
    if not total > 0:
        return None
    h, w = heat.shape
    inner_y = np.abs((np.arange(h) + 0.5) / h - 0.5) <= 0.5 - frame
    inner_x = np.abs((np.arange(w) + 0.5) / w - 0.5) <= 0.5 - frame
    return float(max(0.0, 1.0 - heat[np.ix_(inner_y, inner_x)].sum() / total))


def _image_size(path: Path, fallback: Tuple[int, int]) -> Tuple[int, int]:
    """``(width, height)`` of an image file as Pillow reads its header; ``fallback`` where it cannot."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError):
        return fallback


def _share_stats(shares: Sequence[Optional[float]]) -> Dict[str, Any]:
    measured = np.array([s for s in shares if s is not None], np.float64)
    return {"images": len(shares), "zero_maps": len(shares) - len(measured),
            "mean": float(measured.mean()) if len(measured) else None,
            "median": float(np.median(measured)) if len(measured) else None}


def border_mass(classifier: Any, files: Sequence[Path], truth: Sequence[str], batch: int,
                frame: float = FRAME) -> Dict[str, Any]:
    """Border mass of every image of ``files`` (true labels ``truth``): each map as the runtime gives
    it (``Prediction.heatmap_at`` the image's own size), its share by :func:`border_share`; mean and
    median over images, and by true and by predicted label. A map without mass is counted in
    ``zero_maps`` and left out of the shares."""
    shares: List[Optional[float]] = []
    true_labels: List[str] = []
    predicted: List[str] = []
    results = classifier.iter_predict([str(f) for f in files], batch_size=batch, heatmap=True)
    for path, label, result in zip(files, truth, results):
        if not hasattr(result, "heatmap_at"):
            continue  # an input the runtime could not read: no map, no share
        shares.append(border_share(result.heatmap_at(_image_size(path, classifier.spec.image_size)), frame))
        true_labels.append(label)
        predicted.append(result.label)

    def grouped(labels: List[str]) -> Dict[str, Any]:
        return {lab: _share_stats([s for s, g in zip(shares, labels) if g == lab]) for lab in sorted(set(labels))}

    return {"frame": frame, **_share_stats(shares), "by_true_label": grouped(true_labels),
            "by_predicted_label": grouped(predicted),
            "definition": f"share of the map's mass (Prediction.heatmap_at the image's size) in a frame {frame:.0%} "
                          "of the width and height wide on each side; maps without mass counted apart"}


def dequantized_activations(path: Path, out: Path) -> Path:
    """``path`` with the rounding of every activation removed: each QuantizeLinear -> DequantizeLinear
    pair on an activation becomes a Clip to the range it can represent (so a ReLU that the INT8
    graph folded into a zero-point-0 quantization is kept); weights stay as quantized."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    replaced = {}
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is None or source.op_type != "QuantizeLinear" or source.input[0] in initializers:
            continue  # a weight (its quantized initializer has no producer) or not a Q/DQ pair
        scale = numpy_helper.to_array(initializers[source.input[1]]).astype(np.float64)
        zero_t = initializers.get(source.input[2]) if len(source.input) > 2 else None
        zero = numpy_helper.to_array(zero_t) if zero_t is not None else np.zeros((), np.uint8)
        if scale.size != 1:
            continue  # per-channel activations do not occur in cxr's INT8 files
        info = np.iinfo(zero.dtype)
        low = float(scale) * (info.min - int(zero))
        high = float(scale) * (info.max - int(zero))
        bounds = [f"{node.output[0]}/low", f"{node.output[0]}/high"]
        graph.initializer.extend([numpy_helper.from_array(np.array(low, np.float32), bounds[0]),
                                  numpy_helper.from_array(np.array(high, np.float32), bounds[1])])
        replaced[id(node)] = onnx.helper.make_node("Clip", [source.input[0], *bounds], [node.output[0]],
                                                   name=node.output[0] + "/clip")
    nodes = [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    if a.std() == 0 or b.std() == 0:
        return None
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def _agreement(path: Path, pixels: np.ndarray, maps: np.ndarray, output: str, threads: int, batch: int
               ) -> Dict[str, Any]:
    """Per-image rank correlation of an INT8 file's maps with those of its twin without activation rounding."""
    from cxr_infer.model import ModelFile

    with tempfile.TemporaryDirectory() as tmp:
        twin = ModelFile(dequantized_activations(path, Path(tmp) / "fp32_act.onnx"), threads=threads)
        (twin_maps,) = twin.run(pixels, [output], batch)
    rho = [r for r in (_spearman(a.ravel(), b.ravel()) for a, b in zip(maps, twin_maps)) if r is not None]
    return {"images": len(rho), "median": float(np.median(rho)), "q25": float(np.percentile(rho, 25)),
            "q75": float(np.percentile(rho, 75)),
            "against": "the same graph without activation rounding (each quantized activation "
                       "clipped to its calibrated range instead; weights as quantized)"}


def measure_model(path: Path, ds: Any, cache: PixelCache, per_kind: int, threads: int, batch: int
                  ) -> Tuple[Dict[str, Any], List[Any]]:
    """One model's report entry (kinds, chosen images, INT8 agreement, border mass) and its grid's tiles."""
    from cxr_infer.classifier import Classifier
    from cxr_infer.info import file_sha256
    from cxr_infer.model import ModelFile
    from cxr_infer.overlay import render_overlay
    from cxr_infer.preprocess import open_image

    model = ModelFile(path, threads=threads)
    spec = model.spec
    if not spec.heatmap_output:
        raise BenchError(f"{path}: has no heatmap output (add it: {ADD_HEATMAP_HINT})")
    keep = np.ones(len(ds.files), bool)
    keep[list(cache.failed)] = False
    pixels = cache.pixels(spec.image_size, spec.resize_method)[keep]
    files = [f for f, k in zip(ds.files, keep) if k]
    truth = ds.targets(spec.positive_label, spec.labels)[keep]
    probs, maps = model.run(pixels, [spec.prob_output, spec.heatmap_output], batch)
    positive = probs[:, spec.positive_index] >= spec.threshold
    kinds = {"true positive": positive & (truth == 1), "false positive": positive & (truth == 0),
             "false negative": ~positive & (truth == 1), "true negative": ~positive & (truth == 0)}
    chosen: Dict[str, List[str]] = {}
    tiles: List[Optional[Any]] = []
    classifier = Classifier(path, threads=threads)  # the chosen images exactly as cxr-infer --heatmap draws them
    for kind in KINDS:
        index = sorted(np.flatnonzero(kinds[kind]), key=lambda i: files[i].name)[:per_kind]
        chosen[kind] = [files[i].name for i in index]
        row = [_labelled(render_overlay(open_image(files[i]), classifier.predict(str(files[i]), heatmap=True)),
                         f"{kind}: {files[i].name}") for i in index]
        tiles += row + [None] * (per_kind - len(row))  # one row per kind, empty cells where it has fewer
    agreement = _agreement(path, pixels, maps, spec.heatmap_output, threads, batch) if spec.precision == "int8" \
        else None
    labels = [lab for lab, k in zip(ds.folder_labels, keep) if k]
    entry = {"name": path.stem, "path": str(path), "file_bytes": path.stat().st_size, "sha256": file_sha256(path),
             "backbone": spec.backbone, "precision": spec.precision, "threshold": spec.threshold,
             "grid": list(maps.shape[1:]), "counts": {k: int(v.sum()) for k, v in kinds.items()},
             "chosen": chosen, "int8_vs_fp32_activations": agreement,
             "border_mass": border_mass(classifier, files, labels, batch)}
    return entry, tiles


def run_heatmaps(models: Sequence[str | Path], data: str | Path, out: str | Path, per_kind: int = 4,
                 threads: int = 1, batch: int = 16, name: Optional[str] = None, quiet: bool = False
                 ) -> Dict[str, Any]:
    """Overlay grids, INT8 agreement and border mass for each model on ``data``; writes heatmaps.json / .md
    and a grid .jpg per model into ``out``."""
    out = Path(out)
    ds = list_dataset(data)
    cache = PixelCache(ds.files, quiet=quiet)
    results: List[Dict[str, Any]] = []
    tiles_by_model: List[List[Any]] = []
    for path in map(Path, models):
        entry, tiles = measure_model(path, ds, cache, per_kind, threads, batch)
        results.append(entry)
        tiles_by_model.append(tiles)
        agreement, border = entry["int8_vs_fp32_activations"], entry["border_mass"]
        say(f"{path.stem}: maps {entry['grid'][0]}x{entry['grid'][1]}, border mass mean {fmt_num(border['mean'], 3)}"
            f" ({border['zero_maps']} maps without mass)"
            + (f", INT8 vs FP32 activations: median rank correlation {agreement['median']:.3f}" if agreement else ""),
            quiet)
    report = new_report(KIND, data={"root": str(ds.root), "n_images": len(ds.files)}, per_kind=per_kind,
                        rule="for each kind at the model's threshold, the first images by file name",
                        models=results)
    stem = f"heatmaps-{name}" if name else "heatmaps"
    out.mkdir(parents=True, exist_ok=True)
    grids = []
    for entry, tiles in zip(results, tiles_by_model):
        if any(tiles):
            grid_path = out / f"{stem}-{entry['name']}.jpg"  # JPEG: a photo-like sheet, a tenth of a PNG's size
            _grid(tiles, per_kind).save(grid_path, quality=85, optimize=True)
            grids.append(grid_path.name)
            entry["grid_image"] = grid_path.name
    report["files"] = {"grids": grids}
    write_report(out, "heatmaps", name, report, render_markdown, quiet)
    return report


def _labelled(tile: Any, text: str, width: int = 320) -> Any:
    from PIL import Image, ImageDraw

    from cxr_infer.overlay import _font

    scaled = tile.resize((width, round(tile.height * width / tile.width)), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, scaled.height + 22), (20, 20, 20))
    canvas.paste(scaled, (0, 22))
    ImageDraw.Draw(canvas).text((4, 3), text[:48], fill=(235, 235, 235), font=_font(13))
    return canvas


def _grid(tiles: List[Any], columns: int) -> Any:
    """Tiles (None: an empty cell) in rows of ``columns``."""
    from PIL import Image

    columns = max(1, columns)
    rows = (len(tiles) + columns - 1) // columns
    present = [t for t in tiles if t is not None]
    width, height = present[0].width, max(t.height for t in present)
    sheet = Image.new("RGB", (columns * width, rows * height), (20, 20, 20))
    for i, tile in enumerate(tiles):
        if tile is not None:
            sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    return sheet


def border_table(border: Dict[str, Any]) -> str:
    """A model's border mass (from :func:`border_mass`) as a Markdown table: all images, then by true and
    by predicted label."""
    groups = [("all images", border)] + [(f"true {k}", v) for k, v in border["by_true_label"].items()] \
        + [(f"predicted {k}", v) for k, v in border["by_predicted_label"].items()]
    return md_table(["Images", "Mean share in the border", "Median", "Maps with mass", "Maps without mass"],
                    [[what, fmt_num(g["mean"], 3), fmt_num(g["median"], 3), g["images"] - g["zero_maps"],
                      g["zero_maps"]] for what, g in groups], "lrrrr")


def render_markdown(report: Dict[str, Any]) -> str:
    L = ["# Grad-CAM heatmaps", "",
         f"Data: `{report['data']['root']}` ({report['data']['n_images']} images). Images shown: "
         f"{report['rule']}, {report['per_kind']} of each kind (never picked by eye). The map is model "
         "attention, not a localisation.", ""]
    rows = []
    for m in report["models"]:
        agree = m.get("int8_vs_fp32_activations")
        rows.append([m["name"], m["backbone"], m["precision"], f"{m['grid'][0]} x {m['grid'][1]}",
                     " / ".join(str(m["counts"][k]) for k in KINDS),
                     "n/a" if not agree else f"{fmt_num(agree['median'], 3)} ({fmt_num(agree['q25'], 3)} - "
                                             f"{fmt_num(agree['q75'], 3)}), {agree['images']} images"])
    L += [md_table(["Model", "Backbone", "Precision", "Grid", "TP / FP / FN / TN",
                    "INT8 vs FP32 activations: rank correlation, median (quartiles)"], rows), ""]
    for m in report["models"]:
        L += [f"## {m['name']}", ""]
        if m.get("border_mass"):
            L += [f"Border mass: {m['border_mass']['definition']}, over every image of the folder.", "",
                  border_table(m["border_mass"]), ""]
        if m.get("grid_image"):
            L += [f"Rows: {', '.join(KINDS)}.", "", f"![{m['name']}]({m['grid_image']})", ""]
    L += ["Reproduce:", "", "```", report["command"], "```", ""]
    return "\n".join(L)
