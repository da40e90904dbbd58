"""Run folders described without torch (checkpoint_summary), and the backbone registry.

Run: PYTHONPATH=runtime:train:export:benchmarks python -m pytest tests/test_train_checkpoint.py -q
"""
from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import REPO, TRAIN_DATA, needs_data, subprocess_env

from cxr_train.checkpoint import checkpoint_summary, find_weights, read_meta, safetensors_dtypes

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


def write_safetensors(path: Path, tensors: dict) -> int:
    """A valid safetensors file of zeros, ``{name: (dtype, shape)}``, written without torch; its size."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = _BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))
    return path.stat().st_size


def run_folder(folder: Path, *, fp16: bool = False, both: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.json").write_text(json.dumps({"backbone": "resnet50", "image_size": 224,
                                                         "eval_precision": "bf16"}))
    floating = "F16" if fp16 else "F32"
    tensors = {"head.0.weight": (floating, (4, 8)), "base.bn.num_batches_tracked": ("I64", ())}
    write_safetensors(folder / ("model_fp16.safetensors" if fp16 else "model.safetensors"), tensors)
    if both:
        write_safetensors(folder / "model_fp16.safetensors", {"w": ("F16", (2,))})
    return folder


# ---------------------------------------------------------------- checkpoint_summary

def test_summary_of_an_fp32_and_an_fp16_run(tmp_path):
    s = checkpoint_summary(run_folder(tmp_path / "fp32"))
    assert s["backbone"] == "resnet50" and s["weights_name"] == "model.safetensors"
    assert s["weights_file"] == str(tmp_path / "fp32" / "model.safetensors")
    assert s["file_bytes"] == (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert s["dtypes"] == ["F32", "I64"] and s["stored_fp16"] is False
    assert s["image_size"] == 224 and s["eval_precision"] == "bf16" and s["folder"] == str(tmp_path / "fp32")
    s = checkpoint_summary(run_folder(tmp_path / "fp16", fp16=True))
    assert s["weights_name"] == "model_fp16.safetensors" and s["stored_fp16"] is True and s["dtypes"] == ["F16", "I64"]


def test_weights_file_choice(tmp_path):
    folder = run_folder(tmp_path / "run", both=True)
    assert find_weights(folder).name == "model.safetensors"  # what load_checkpoint loads
    assert find_weights(folder / "model_fp16.safetensors").name == "model_fp16.safetensors"  # a file as given
    assert checkpoint_summary(folder / "model_fp16.safetensors")["stored_fp16"] is True
    assert read_meta(folder / "model.safetensors")["backbone"] == "resnet50"


def test_summary_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.json"):
        checkpoint_summary(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"backbone": "tiny"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors or model_fp16.safetensors"):
        checkpoint_summary(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint_summary(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(ValueError, match="names no backbone"):
        checkpoint_summary(tmp_path)


def test_summary_works_where_torch_cannot_be_imported(tmp_path):
    folder = run_folder(tmp_path / "run", fp16=True)
    code = (
        "import importlib.abc, json, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'safetensors'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from cxr_train.checkpoint import checkpoint_summary, read_meta\n"
        "from cxr_train.backbones import BACKBONES\n"
        f"s = checkpoint_summary({str(folder)!r})\n"
        "assert read_meta(s['folder'])['backbone'] == s['backbone'] in BACKBONES\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'safetensors')]\n"
        "print(json.dumps(s))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == checkpoint_summary(folder)


def test_summary_reads_what_save_weights_writes(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the train extra (torch)")
    pytest.importorskip("safetensors", reason="needs the train extra (safetensors)")
    from cxr_train.checkpoint import load_checkpoint, save_weights
    from cxr_train.models import build_model

    model, _ = build_model("tiny")
    (tmp_path / "checkpoint.json").write_text(json.dumps({"backbone": "tiny"}))
    save_weights(model, tmp_path / "model_fp16.safetensors", torch.float16)
    s = checkpoint_summary(tmp_path)
    assert s["stored_fp16"] is True and s["dtypes"] == ["F16", "I64"]  # BatchNorm counts stay integers
    assert safetensors_dtypes(s["weights_file"]) == s["dtypes"]
    assert load_checkpoint(tmp_path)[0].head[0].weight.dtype == torch.float32  # run as fp32


# ---------------------------------------------------------------- the backbone registry

def test_cli_offers_exactly_the_registered_backbones():
    from cxr_train.backbones import BACKBONES
    from cxr_train.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "backbone")
    assert list(action.choices) == list(BACKBONES)
    assert {"vgg16", "resnet50", "inception_v3"} <= set(BACKBONES)  # the runtime's known backbones


torch_needed = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "torchvision", "safetensors")),
    reason="needs the train extra (torch, torchvision, safetensors)")


@torch_needed
@pytest.mark.parametrize("name", ["vgg16", "resnet50", "inception_v3", "resnet18", "tiny"])
def test_every_backbone_gives_its_registered_feature_width(name):
    import torch

    from cxr_train.backbones import BACKBONES
    from cxr_train.models import build_model

    spec = BACKBONES[name]
    model, origin = build_model(name, init=False)
    assert origin == "random init" and model.head[0].in_features == spec.feature_dim
    assert hasattr(model.base, "transform_input") is spec.transform_input
    if spec.transform_input:
        assert model.base.transform_input is False  # on only for pretrained weights
    model.eval()
    with torch.no_grad():
        assert model.base(torch.zeros(1, 3, 75, 75)).shape == (1, spec.feature_dim)  # 75: inception's smallest


@torch_needed
def test_imagenet_lookup_follows_the_registry(tmp_path, monkeypatch):
    from cxr_train.models import build_model, cached_imagenet_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert cached_imagenet_file("tiny") is None and cached_imagenet_file("resnet18") is None  # empty cache
    with pytest.raises(ValueError, match="tiny has no ImageNet weights"):
        build_model("tiny", weights="imagenet")
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'; choose one of vgg16, resnet50"):
        build_model("alexnet")


@torch_needed
@needs_data
def test_a_new_backbone_is_one_registry_entry(tmp_path, monkeypatch):
    from cxr_train.backbones import BACKBONES, Backbone
    from cxr_train.checkpoint import load_checkpoint
    from cxr_train.cli import build_parser
    from cxr_train.loop import TrainConfig, train
    from cxr_train.models import TinyBase

    class ToyBase(TinyBase):
        def __init__(self, pretrained: bool):
            super().__init__(width=16)
            self.transform_input = pretrained

    monkeypatch.setitem(BACKBONES, "toy", Backbone("toy", lambda pretrained, init: ToyBase(pretrained),
                                                   feature_dim=16, imagenet=False, transform_input=True))
    assert build_parser().parse_args(["--backbone", "toy", "--data", "d", "--out", "o"]).backbone == "toy"
    meta = train(TrainConfig(backbone="toy", data=str(TRAIN_DATA), out=str(tmp_path), epochs=1, max_images=16,
                             image_size=32, batch_size=4, progress=False, workers=2), log=lambda *a: None)
    assert meta["backbone"] == "toy" and meta["transform_input"] is False
    model, _ = load_checkpoint(tmp_path)
    assert model.head[0].in_features == 16 and model.base.transform_input is False
    # load_checkpoint sets the flag from checkpoint.json for a backbone that has it
    meta["transform_input"] = True
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path)[0].base.transform_input is True
