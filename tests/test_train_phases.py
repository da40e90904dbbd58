"""The training loop's phases one at a time: data, state, one epoch, evaluation, selection, metadata, resume.

Tiny backbone on the CPU, 16 shared images at 32x32: each test takes a fraction of a second.

Run: PYTHONPATH=runtime:train:export:benchmarks python -m pytest tests/test_train_phases.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import TRAIN_DATA, needs_data

torch = pytest.importorskip("torch", reason="cxr-train needs the train extra (torch)")
pytest.importorskip("torchvision", reason="cxr-train needs the train extra (torchvision)")
pytest.importorskip("safetensors", reason="cxr-train needs the train extra (safetensors)")

from cxr_infer.metrics import binary_metrics, youden_threshold  # noqa: E402
from cxr_train.checkpoint import load_checkpoint  # noqa: E402
from cxr_train.config import AMP_ENV, THRESHOLD_RULES, TrainConfig, resolve_amp  # noqa: E402
from cxr_train.distributed import Cluster  # noqa: E402
from cxr_train.loop import (  # noqa: E402
    EpochResult,
    checkpoint_meta,
    epoch_record,
    evaluate,
    is_better,
    planned_epochs,
    predict_proba,
    run_epoch,
    select_and_save,
)
from cxr_train.state import build_state, prepare_data, restore, save_last, warmup_cosine  # noqa: E402

CPU = Cluster(torch.device("cpu"))
QUIET = lambda *a, **k: None  # noqa: E731


def config(out: Path, **kw) -> TrainConfig:
    args = dict(backbone="tiny", data=str(TRAIN_DATA), out=str(out), epochs=2, max_images=16, image_size=32,
                batch_size=4, progress=False, workers=2, amp=False)
    args.update(kw)
    return TrainConfig(**args)


def fresh(out: Path, **kw):
    """Seeded data and state of a run, as ``train`` builds them (same RNG use)."""
    cfg = config(out, **kw)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg, CPU, out, QUIET)
    return data, build_state(cfg, CPU, data, QUIET)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


pytestmark = needs_data


# ---------------------------------------------------------------- data and state

def test_prepare_data_splits_decodes_and_writes_the_manifest(tmp_path):
    data, _ = fresh(tmp_path)
    man = json.loads((tmp_path / "split.json").read_text())
    assert man == data.manifest
    assert data.train_pixels.shape == (len(man["train"]), 32, 32, 3) and data.train_pixels.dtype == torch.uint8
    assert data.val_pixels.shape == (len(man["val"]), 32, 32, 3)
    assert data.train_labels.tolist() == [label for _, label in man["train"]]
    assert data.val_labels.tolist() == [label for _, label in man["val"]]
    assert data.class_counts.tolist() == man["counts"]["train"]


def test_build_state_resolves_the_recipe_and_groups_the_parameters(tmp_path):
    data, state = fresh(tmp_path)
    assert state.cfg.lr == 2e-3 and state.cfg.ema == 0.998 and not state.pretrained  # finetune from random init
    assert state.trained is state.model and state.ema is not None and state.eval_model is state.ema.model
    assert state.steps_per_epoch == len(data.train_labels) // 4
    head, base = state.optimizer.param_groups
    assert head["lr_mult"] == 1.0 and base["lr_mult"] == 1.0  # discriminative rates only for pretrained bases
    assert state.lr_factor(0) == pytest.approx(1 / state.warmup_steps)
    assert state.lr_factor(state.steps_per_epoch * 2) == pytest.approx(0.0, abs=1e-12)
    # the reference recipe: frozen base, Adam, constant rate, no EMA
    _, ref = fresh(tmp_path / "ref", recipe="reference")
    assert len(ref.optimizer.param_groups) == 1 and isinstance(ref.optimizer, torch.optim.Adam)
    assert not any(p.requires_grad for p in ref.model.base.parameters())
    assert ref.ema is None and ref.lr_factor(0) == ref.lr_factor(10 ** 6) == 1.0


def test_schedule_and_time_budget_arithmetic():
    assert [warmup_cosine(s, 10, 2) for s in (0, 1, 2, 6, 10, 20)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert planned_epochs(100.0, 25.0, 10.0) == 9
    assert planned_epochs(10.0, 25.0, 10.0) == 2  # at least the two epochs already run


# ---------------------------------------------------------------- one epoch

def test_run_epoch_steps_every_batch_and_is_reproducible(tmp_path):
    data, state = fresh(tmp_path / "a")
    before = weights(state.model)
    ema_before = weights(state.ema.model)
    result = run_epoch(state, data, 0, CPU)
    assert state.step == state.steps_per_epoch and result.images == state.steps_per_epoch * 4
    assert np.isfinite(result.train_loss) and result.seconds > 0
    assert state.ema.updates == state.steps_per_epoch
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert any(not torch.equal(ema_before[k], v) for k, v in state.ema.model.state_dict().items())
    # same seed, same epoch: the same loss and weights
    data_b, state_b = fresh(tmp_path / "b")
    assert run_epoch(state_b, data_b, 0, CPU).train_loss == result.train_loss
    assert all(torch.equal(v, state_b.model.state_dict()[k]) for k, v in state.model.state_dict().items())


def test_mix_batch_mixup_and_cutmix():
    """Mixup blends each image with its partner by lam; CutMix pastes the partner's box, lam being
    the share of the image kept; both off leaves the batch as it is. Host draws, reproducible."""
    from cxr_train.augment import mix_batch

    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 16, 16).contiguous()  # image i is all i
    same, perm, lam = mix_batch(x, 0.0, 0.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert same is x and perm is None and lam == 1.0
    mixed, perm, lam = mix_batch(x, 0.4, 0.0, np.random.default_rng(1), torch.Generator().manual_seed(1))
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    again = mix_batch(x, 0.4, 0.0, np.random.default_rng(1), torch.Generator().manual_seed(1))
    assert again[2] == lam and torch.equal(again[0], mixed)
    cut, perm, lam = mix_batch(x, 0.0, 1.0, np.random.default_rng(2), torch.Generator().manual_seed(2))
    moved = perm != torch.arange(6)
    assert moved.any()
    for i in torch.nonzero(moved).flatten().tolist():
        kept = (cut[i] == i).float().mean().item()   # own pixels
        pasted = (cut[i] == perm[i]).float().mean().item()
        assert kept + pasted == 1.0 and abs(kept - lam) < 1e-6 and 0.0 < lam < 1.0
    assert torch.equal(cut[~moved], x[~moved])
    picks = {mix_batch(x, 0.4, 1.0, np.random.default_rng(seed), torch.Generator().manual_seed(seed))[0]
             .eq(x).float().mean().item() < 0.5 for seed in range(12)}  # mixup changes every pixel, CutMix a box
    assert picks == {True, False}


def test_run_epoch_with_mixup_and_cutmix(tmp_path):
    """An epoch with mixup and CutMix trains (finite loss, weights move), is reproducible, differs
    from one without, and the run's checkpoint args record both."""
    data, state = fresh(tmp_path / "a", mixup=0.4, cutmix=1.0)
    before = weights(state.model)
    mixed = run_epoch(state, data, 0, CPU)
    assert np.isfinite(mixed.train_loss)
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    data_b, state_b = fresh(tmp_path / "b", mixup=0.4, cutmix=1.0)
    assert run_epoch(state_b, data_b, 0, CPU).train_loss == mixed.train_loss
    data_c, state_c = fresh(tmp_path / "c")
    assert run_epoch(state_c, data_c, 0, CPU).train_loss != mixed.train_loss
    from cxr_train.loop import train

    train(config(tmp_path / "run", mixup=0.4, cutmix=1.0, epochs=1, save_last=False), log=QUIET)
    args = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["args"]
    assert (args["mixup"], args["cutmix"]) == (0.4, 1.0)


def test_a_frozen_base_does_not_move(tmp_path):
    data, state = fresh(tmp_path, recipe="reference")
    base_before, head_before = weights(state.model.base), weights(state.model.head)
    run_epoch(state, data, 0, CPU)
    assert all(torch.equal(v, state.model.base.state_dict()[k]) for k, v in base_before.items())  # BN stats too
    assert any(not torch.equal(v, state.model.head.state_dict()[k]) for k, v in head_before.items())


# ---------------------------------------------------------------- evaluation and selection

def test_evaluate_is_predict_proba_and_metrics_at_half(tmp_path):
    data, state = fresh(tmp_path)
    run_epoch(state, data, 0, CPU)
    probs, metrics = evaluate(state.eval_model, data.val_pixels, data.val_labels, CPU.device, amp=False)
    again = predict_proba(state.eval_model, data.val_pixels, CPU.device, amp=False)
    assert np.array_equal(probs, again)  # no randomness in evaluation
    assert metrics == binary_metrics(data.val_labels, probs, 0.5)


@pytest.mark.parametrize("record, best, better", [
    ({"val_auc": 0.8, "val_loss": 0.5}, None, True),
    ({"val_auc": 0.9, "val_loss": 0.9}, {"val_auc": 0.8, "val_loss": 0.1}, True),  # AUC first
    ({"val_auc": 0.8, "val_loss": 0.1}, {"val_auc": 0.9, "val_loss": 0.9}, False),
    ({"val_auc": 0.90005, "val_loss": 0.4}, {"val_auc": 0.9, "val_loss": 0.5}, True),  # a tie: lower loss
    ({"val_auc": 0.90005, "val_loss": 0.6}, {"val_auc": 0.9, "val_loss": 0.5}, False),
    ({"val_auc": float("nan"), "val_loss": 0.1}, {"val_auc": 0.5, "val_loss": 0.5}, False),
])
def test_is_better_is_auc_then_loss(record, best, better):
    assert is_better(record, best) is better


def _fake_epoch(state, epoch: int, probs: np.ndarray, labels: np.ndarray) -> dict:
    metrics = binary_metrics(labels, probs, 0.5)
    record = epoch_record(epoch, EpochResult(0.7, 8, 1.0), metrics, 1e-3)
    state.history.append(record)
    return record


@pytest.mark.parametrize("rule", sorted(THRESHOLD_RULES))
def test_select_and_save_keeps_the_best_epoch_with_its_rules_threshold(tmp_path, rule):
    data, state = fresh(tmp_path, threshold_rule=rule)
    labels = np.array([0, 0, 0, 1, 1, 1])
    good = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])  # AUC 1; Youden's J puts the cut at 0.325, not 0.5
    worse = np.array([0.1, 0.6, 0.3, 0.35, 0.8, 0.2])
    assert select_and_save(state, _fake_epoch(state, 1, good, labels), good, labels, tmp_path) is True
    youden = youden_threshold(labels, good)
    assert youden == pytest.approx(0.325)
    expected = 0.5 if rule == "balanced" else youden
    assert state.best["threshold"] == expected and state.best["youden_threshold"] == youden
    assert state.best["val_at_threshold"] == binary_metrics(labels, good, expected)
    saved = (tmp_path / "model.safetensors").read_bytes()
    # a worse epoch changes neither the best nor the saved weights, and counts as stalled
    assert select_and_save(state, _fake_epoch(state, 2, worse, labels), worse, labels, tmp_path) is False
    assert state.best["epoch"] == 1 and state.stalled == 1
    assert (tmp_path / "model.safetensors").read_bytes() == saved
    meta = checkpoint_meta(state, data, CPU)
    assert meta["threshold"] == expected and meta["threshold_rule"] == THRESHOLD_RULES[rule]
    assert meta["best_epoch"] == 1 and meta["history"] == state.history


def test_select_and_save_fp16_replaces_fp32_weights_and_rank_n_writes_nothing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"an older run")
    _, state = fresh(tmp_path, save_dtype="fp16")
    labels, probs = np.array([0, 1]), np.array([0.3, 0.7])
    select_and_save(state, _fake_epoch(state, 1, probs, labels), probs, labels, tmp_path)
    assert (tmp_path / "model_fp16.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    other = tmp_path / "rank1"
    other.mkdir()
    assert select_and_save(state, _fake_epoch(state, 2, probs, labels), probs, labels, other, improved=True,
                           write=False) is True
    assert list(other.iterdir()) == []


def test_checkpoint_meta_records_the_evaluation_precision_and_reloads(tmp_path):
    data, state = fresh(tmp_path, amp=True)
    run_epoch(state, data, 0, CPU)
    probs, metrics = evaluate(state.eval_model, data.val_pixels, data.val_labels, CPU.device, amp=True)
    record = epoch_record(1, EpochResult(0.7, 8, 1.0), metrics, 1e-3)
    state.history.append(record)
    select_and_save(state, record, probs, data.val_labels, tmp_path)
    meta = checkpoint_meta(state, data, CPU)
    assert meta["eval_precision"] == "bf16" and meta["args"]["amp"] is True
    assert json.loads(json.dumps(meta)) == meta  # plain JSON
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    model, _ = load_checkpoint(tmp_path)
    model.to(memory_format=torch.channels_last)
    again, _ = evaluate(model, data.val_pixels, data.val_labels, CPU.device, amp=meta["eval_precision"] == "bf16")
    assert np.array_equal(again, probs)  # same weights, precision and layout: the same arithmetic


# ---------------------------------------------------------------- last.pt

def test_save_last_then_restore_continues_the_run(tmp_path):
    data, state = fresh(tmp_path)
    run_epoch(state, data, 0, CPU)
    probs, metrics = evaluate(state.eval_model, data.val_pixels, data.val_labels, CPU.device)
    record = _fake_epoch(state, 1, probs, data.val_labels)
    select_and_save(state, record, probs, data.val_labels, tmp_path)
    state.epochs_done = 1
    save_last(state, data.manifest["hash"], tmp_path / "last.pt", CPU.device)
    assert not (tmp_path / "last.pt.tmp").exists()
    rng = torch.get_rng_state()
    torch.manual_seed(123)  # a new process: other RNG state, new weights
    _, resumed = fresh(tmp_path / "new")
    restore(resumed, tmp_path / "last.pt", data.manifest["hash"], CPU.device)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (resumed.epochs_done, resumed.step, resumed.history, resumed.best) == (1, state.step, state.history,
                                                                                   state.best)
    assert resumed.ema.updates == state.ema.updates and resumed.stalled == 0
    for mine, theirs in ((resumed.model, state.model), (resumed.ema.model, state.ema.model)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    assert resumed.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="another split"):
        restore(resumed, tmp_path / "last.pt", "0" * 64, CPU.device)


# ---------------------------------------------------------------- bf16: CXR_TRAIN_AMP

@pytest.mark.parametrize("env, expected", [("on", True), ("off", False), ("ON ", True)])
def test_amp_environment_override(monkeypatch, env, expected):
    monkeypatch.setenv(AMP_ENV, env)
    assert resolve_amp(None, "cpu") is expected and resolve_amp(None, "cuda") is expected
    assert resolve_amp(not expected, "cpu") is (not expected)  # an explicit choice wins


def test_amp_auto_and_a_bad_value(monkeypatch):
    monkeypatch.setenv(AMP_ENV, "auto")
    assert resolve_amp(None, "cuda") is True
    monkeypatch.delenv(AMP_ENV)
    assert resolve_amp(None, "cuda") is True
    monkeypatch.setenv(AMP_ENV, "maybe")
    with pytest.raises(ValueError, match=AMP_ENV):
        resolve_amp(None, "cpu")
