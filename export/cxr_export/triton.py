"""A Triton Inference Server model repository for a cxr model file (onnxruntime backend).

``DIR/<name>/config.pbtxt`` and ``DIR/<name>/1/model.onnx``; the spec travels inside the file and
as a config parameter. Serving: ``docs/serving.md``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Sequence

_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8",
          9: "TYPE_BOOL"}


def _io_block(kind: str, items) -> str:
    parts = []
    for v in items:  # the batch dimension is Triton's (max_batch_size > 0)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim][1:]
        dtype = _TYPES.get(v.type.tensor_type.elem_type, "TYPE_FP32")
        shape = ", ".join(str(d) for d in dims)
        parts.append(f'  {{\n    name: "{v.name}"\n    data_type: {dtype}\n    dims: [ {shape} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(parts) + "\n]\n"


def write_triton_repo(model_path: str | Path, repo: str | Path, name: str = "", max_batch_size: int = 32,
                      cpu_instances: int = 2, gpu_instances: int = 1,
                      preferred_batch_sizes: Sequence[int] = (8, 16, 32), max_queue_delay_us: int = 2000) -> Path:
    """Write ``repo/<name>/`` for ``model_path``; returns the path of config.pbtxt."""
    from .modelio import load_onnx, spec_of, write_without

    model_path = Path(model_path)
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", model_path.stem)
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    served = folder / "1" / "model.onnx"
    if spec_of(load_onnx(model_path), str(model_path)).switches:
        # a switch input is one boolean per call, which Triton's batching cannot carry: the repository
        # serves the file without the graphs it turns on (heatmaps come from the runtime)
        write_without(model_path, served, ["heatmap"])
    else:
        shutil.copyfile(model_path, served)
    m = load_onnx(served)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    spec = spec_of(m, str(served)).to_json()  # validated: a repository never serves a file cxr would refuse
    pref = ", ".join(str(b) for b in preferred_batch_sizes if b <= max_batch_size)
    text = (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
        + _io_block("input", inputs) + _io_block("output", m.graph.output)
        + f"dynamic_batching {{\n  preferred_batch_size: [ {pref} ]\n"
        + f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
        + "instance_group [\n"
        + (f"  {{\n    kind: KIND_GPU\n    count: {gpu_instances}\n  }},\n" if gpu_instances else "")
        + f"  {{\n    kind: KIND_CPU\n    count: {cpu_instances}\n  }}\n]\n"
    )
    text += f'parameters {{\n  key: "cxr_spec"\n  value: {{ string_value: {json.dumps(spec)} }}\n}}\n'
    cfg = folder / "config.pbtxt"
    cfg.write_text(text)
    return cfg
