"""``cxr-bench heatmaps``: Grad-CAM overlays of a labelled folder, the first images of each kind
(TP, FP, FN, TN) by file name, and how an INT8 file's maps agree with the same graph without
activation rounding (Spearman rank correlation per image; see docs/benchmarks.md).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .dataset import PixelCache, list_dataset
from .upstream import ADD_HEATMAP_HINT
from .util import BenchError, fmt_num, md_table, new_report, say, write_report

KIND = "cxr-bench/heatmaps"
KINDS = ("true positive", "false positive", "false negative", "true negative")


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


def run_heatmaps(models: Sequence[str | Path], data: str | Path, out: str | Path, per_kind: int = 4,
                 threads: int = 1, batch: int = 16, name: Optional[str] = None, quiet: bool = False
                 ) -> Dict[str, Any]:
    """Overlay grids and INT8 agreement for each model on ``data``; writes heatmaps.json / .md and a grid
    .jpg per model into ``out``."""
    from cxr_infer.classifier import Classifier
    from cxr_infer.model import ModelFile
    from cxr_infer.overlay import render_overlay
    from cxr_infer.preprocess import open_image

    out = Path(out)
    ds = list_dataset(data)
    cache = PixelCache(ds.files, quiet=quiet)
    results: List[Dict[str, Any]] = []
    tiles_by_model: List[List[Any]] = []
    for path in map(Path, models):
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
        agreement = None
        if spec.precision == "int8":
            with tempfile.TemporaryDirectory() as tmp:
                twin = ModelFile(dequantized_activations(path, Path(tmp) / "fp32_act.onnx"), threads=threads)
                (twin_maps,) = twin.run(pixels, [spec.heatmap_output], batch)
            rho = [r for r in (_spearman(a.ravel(), b.ravel()) for a, b in zip(maps, twin_maps)) if r is not None]
            agreement = {"images": len(rho), "median": float(np.median(rho)), "q25": float(np.percentile(rho, 25)),
                         "q75": float(np.percentile(rho, 75)),
                         "against": "the same graph without activation rounding (each quantized activation "
                                    "clipped to its calibrated range instead; weights as quantized)"}
        results.append({"name": path.stem, "path": str(path), "backbone": spec.backbone, "precision": spec.precision,
                        "grid": list(maps.shape[1:]), "counts": {k: int(v.sum()) for k, v in kinds.items()},
                        "chosen": chosen, "int8_vs_fp32_activations": agreement})
        tiles_by_model.append(tiles)
        say(f"{path.stem}: maps {maps.shape[1]}x{maps.shape[2]}, "
            + (f"INT8 vs FP32 activations: median rank correlation {agreement['median']:.3f}" if agreement else ""),
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
        if m.get("grid_image"):
            L += [f"## {m['name']}", "", f"Rows: {', '.join(KINDS)}.", "", f"![{m['name']}]({m['grid_image']})", ""]
    L += ["Reproduce:", "", "```", report["command"], "```", ""]
    return "\n".join(L)
