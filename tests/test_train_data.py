"""cxr-train without training: patient ids, the patient-wise split, starting weights, the CLI shell.

Run: PYTHONPATH=runtime:train:export:benchmarks python -m pytest tests/test_train_data.py -q
"""
from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from train_fixtures import REPO, TRAIN_DATA, needs_data, subprocess_env

torch = pytest.importorskip("torch", reason="cxr-train needs the train extra (torch)")
pytest.importorskip("torchvision", reason="cxr-train needs the train extra (torchvision)")

from cxr_train import data as D  # noqa: E402
from cxr_train.models import WeightsUnavailable, build_model  # noqa: E402

# ---------------------------------------------------------------- patient ids (data README forms)

@pytest.mark.parametrize("name, patient", [
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0381-0001.jpeg", "IM-0381"),
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1946_bacteria_4874.jpeg", "person1946"),
    ("train/PNEUMONIA/person22_virus_55.jpeg", "person22"),
    ("scan-from-elsewhere.png", "scan-from-elsewhere"),
])
def test_patient_id_on_the_readme_name_forms(name, patient):
    assert D.patient_id(name) == patient


def test_one_patient_several_images_and_series():
    # Both pneumonia kinds of one person, and the IM-/NORMAL2-IM- series of one number, are one patient.
    assert D.patient_id("person1_bacteria_1.jpeg") == D.patient_id("person1_virus_6.jpeg")
    assert D.patient_id("IM-0381-0001.jpeg") == D.patient_id("NORMAL2-IM-0381-0002.jpeg")
    assert D.patient_id("person1_bacteria_1.jpeg") != D.patient_id("person11_bacteria_1.jpeg")
    assert D.patient_id("IM-0115-0001.jpeg") != D.patient_id("IM-0117-0001.jpeg")


# ---------------------------------------------------------------- the split, on the full train listing

@pytest.fixture(scope="module")
def listing():
    if not TRAIN_DATA.is_dir():
        pytest.skip(f"shared training images not found at {TRAIN_DATA}")
    return D.scan_folder(TRAIN_DATA)


@needs_data
def test_listing_matches_the_readme(listing):
    assert Counter(s.label for s in listing) == {0: 1341, 1: 3875}
    assert [s.path for s in listing] == sorted(s.path for s in listing if s.label == 0) + sorted(
        s.path for s in listing if s.label == 1)


@needs_data
@pytest.mark.parametrize("seed", [0, 1])
def test_split_is_patient_disjoint_stratified_and_complete(listing, seed):
    tr, va = D.split_by_patient(listing, val_fraction=0.1, seed=seed)
    assert sorted(s.path for s in tr + va) == sorted(s.path for s in listing)  # nothing lost or doubled
    assert len({s.path for s in tr}) == len(tr)
    assert not {s.patient for s in tr} & {s.patient for s in va}  # no patient on both sides
    total = Counter(s.label for s in listing)
    val = Counter(s.label for s in va)
    for label in (0, 1):
        # each class gives its own ~10% (whole patients, so a little over)
        assert 0.095 <= val[label] / total[label] <= 0.115, (label, val[label], total[label])
    ratio_all = total[1] / len(listing)
    ratio_val = val[1] / len(va)
    assert abs(ratio_val - ratio_all) < 0.02


@needs_data
def test_split_is_deterministic_for_a_seed_and_changes_with_it(listing):
    a = D.split_by_patient(listing, 0.1, seed=0)
    b = D.split_by_patient(list(reversed(listing)), 0.1, seed=0)  # input order must not matter
    c = D.split_by_patient(listing, 0.1, seed=1)
    assert {s.path for s in a[1]} == {s.path for s in b[1]}
    assert {s.path for s in a[1]} != {s.path for s in c[1]}
    ma = D.manifest(*a, TRAIN_DATA, 0, 0.1)
    ma2 = D.manifest(*D.split_by_patient(listing, 0.1, seed=0), TRAIN_DATA, 0, 0.1)
    assert ma["hash"] == ma2["hash"] and len(ma["hash"]) == 64
    assert ma["hash"] != D.manifest(*c, TRAIN_DATA, 1, 0.1)["hash"]
    assert ma["counts"]["train"] == [sum(1 for s in a[0] if s.label == i) for i in (0, 1)]


@needs_data
def test_multi_image_patients_exist_and_stay_together(listing):
    # The check above would be vacuous if every patient had one image: the real set has many.
    by_patient = defaultdict(list)
    for s in listing:
        by_patient[s.patient].append(s)
    multi = [p for p, items in by_patient.items() if len(items) > 1]
    assert len(multi) > 300
    tr, va = D.split_by_patient(listing, 0.1, seed=0)
    side = {s.path: "val" for s in va} | {s.path: "train" for s in tr}
    for p in multi:
        assert len({side[s.path] for s in by_patient[p]}) == 1, p


@needs_data
def test_subsample_is_class_balanced_and_deterministic(listing):
    a = D.subsample(listing, 40, seed=3)
    assert a == D.subsample(listing, 40, seed=3)
    assert a != D.subsample(listing, 40, seed=4)
    assert Counter(s.label for s in a) == {0: 20, 1: 20}
    assert D.subsample(listing, None, seed=0) is listing


# ---------------------------------------------------------------- starting weights

def test_offline_imagenet_error_names_the_three_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("CXR_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as err:
        build_model("resnet50", weights="imagenet")
    msg = str(err.value)
    for option in ("--weights imagenet", "--weights FILE", "--weights none"):
        assert option in msg, msg
    assert str(tmp_path) in msg  # says which cache it looked in
    assert "resnet50-" in msg  # and which file would do


def test_failed_download_is_the_same_clear_error(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    def no_network(self, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("CXR_OFFLINE", raising=False)
    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailable, match="--weights none") as err:
        build_model("vgg16", weights="imagenet")
    assert "download failed: OSError" in str(err.value)


def test_auto_weights_fall_back_to_random_init_when_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, origin = build_model("resnet18", weights="auto")
    assert origin.startswith("random init")


def test_weights_file_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)  # a torchvision model, classifier (fc) included
    f = tmp_path / "resnet18-imagenet.pth"
    torch.save(tv.state_dict(), f)
    model, origin = build_model("resnet18", weights=str(f))
    assert origin.startswith(f"file {f}") and "tensors" in origin
    got = model.base.state_dict()
    assert torch.equal(got["conv1.weight"], tv.state_dict()["conv1.weight"])
    assert torch.equal(got["layer4.1.bn2.running_var"], tv.state_dict()["layer4.1.bn2.running_var"])
    # the same weights as safetensors, and wrapped in {"state_dict": ...}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m2, _ = build_model("resnet18", weights=str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": tv.state_dict(), "epoch": 90}, tmp_path / "wrapped.pt")
    m3, _ = build_model("resnet18", weights=str(tmp_path / "wrapped.pt"))
    for m in (m2, m3):
        assert torch.equal(m.base.state_dict()["conv1.weight"], tv.state_dict()["conv1.weight"])


def test_weights_file_of_another_backbone_is_refused(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="same backbone"):
        build_model("resnet50", weights=str(tmp_path / "r18.pth"))


class _Planted:
    """Unpickling this runs code (touches a file): weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_weights_file_is_loaded_with_weights_only(tmp_path):
    marker = tmp_path / "code-ran"
    f = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Planted(str(marker))}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        build_model("resnet18", weights=str(f))
    assert not marker.exists(), "the pickle's code ran: weights were not loaded with weights_only=True"
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model("resnet18", weights=str(tmp_path / "missing.pth"))


@needs_data
@pytest.mark.parametrize("weights", ["imagenet", "FILE"])
def test_cli_prints_one_clear_line_and_exits_2(tmp_path, monkeypatch, capsys, weights):
    from cxr_train.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("CXR_OFFLINE", "1")
    if weights == "FILE":
        weights = str(tmp_path / "not-a-state-dict.pt")
        (tmp_path / "not-a-state-dict.pt").write_bytes(b"this is not a pickle")
    rc = main(["--backbone", "resnet50", "--data", str(TRAIN_DATA), "--out", str(tmp_path / "run"),
               "--weights", weights, "--epochs", "1", "--max-images", "8", "--image-size", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("cxr-train: error: "), err
    assert "Traceback" not in err[0]
    if weights == "imagenet":
        assert "--weights FILE" in err[0] and "--weights none" in err[0]
    else:
        assert "not-a-state-dict.pt" in err[0] and "weights_only=True" in err[0]


# ---------------------------------------------------------------- the CLI shell

def test_help_works_without_importing_torch():
    code = (
        "import sys\n"
        "from cxr_train import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'cxr-train --help imported torch'\n"
        "assert 'torchvision' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok") and "--weights" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cxr_train.cli", "--help"], env=subprocess_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--backbone" in r.stdout and "torchrun" in r.stdout


def test_cli_rejects_an_unknown_backbone(capsys):
    from cxr_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--backbone", "alexnet", "--data", "x", "--out", "y"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--mixup", "-0.2"), ("--cutmix", "inf"), ("--mixup", "much")])
def test_cli_rejects_a_bad_mixing_parameter(capsys, flag, value):
    from cxr_train.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--backbone", "tiny", "--data", "x", "--out", "y", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"cxr-train: error: argument {flag}: ") and value in err
