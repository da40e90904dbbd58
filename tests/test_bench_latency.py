"""cxr-bench latency and end-to-end runners on a tiny model, 1 repeat (fresh processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_fixtures import FULLRES_TRAIN, tiny_model

from cxr_bench import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    return tiny_model(root / "tiny_int8.onnx", image_size=32, precision="int8"), \
        tiny_model(root / "tiny_fp32.onnx", image_size=32)


def test_latency_runner_one_repeat(tiny, tmp_path):
    int8, fp32 = tiny
    rc = cli.main(["latency", "--model", str(int8), str(fp32), "--batch", "1,2", "--threads", "1", "--repeats", "1",
                   "--iterations", "5", "--warmup", "1", "--out", str(tmp_path), "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "latency.json").read_text())
    assert rep["kind"] == "cxr-bench/latency"
    assert len(rep["results"]) == 4
    pids = set()
    for r in rep["results"]:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["min_ms"] and r["p99_ms"] >= r["p90_ms"]
        assert r["images_per_s"] > 0 and r["load_s"] >= 0 and r["peak_rss_bytes"] > 10 * 2**20
        assert r["file_bytes"] > 0 and r["timed_calls"] == 5 and r["processes_ok"] == 1
        pids.add(r["processes"][0]["pid"])
    assert len(pids) == 4  # every configuration in its own process
    # the report states this CPU's vector ISA, whatever it is (AVX2 only, AVX-512 VNNI, AMX, ...)
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith(("flags", "Features"))), [])
    assert rep["machine"]["cpu_model"]
    assert rep["machine"]["cpu_isa"] == {f: f in flags for f in rep["machine"]["cpu_isa"]}
    assert rep["machine"]["onnxruntime_providers"]
    assert {c["kind"] for c in rep["comparisons"]} == {"vs ONNX fp32"}
    md = (tmp_path / "latency.md").read_text()
    assert "tiny_int8" in md and "Median ms" in md and "Vector ISA" in md


def test_latency_bad_inputs(tiny, tmp_path, capsys):
    assert cli.main(["latency", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["latency", "--model", str(tiny[0]), "--checkpoint", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "checkpoint.json" in capsys.readouterr().err


def test_latency_failed_worker_is_reported(tiny, tmp_path, monkeypatch):
    from cxr_bench import latency

    monkeypatch.setattr(latency, "run_worker", lambda cfg, env, timeout: {"error": "worker failed: boom"})
    rep = latency.run_latency([tiny[0]], batches=[1], repeats=1, quiet=True, out=tmp_path)
    assert rep["results"][0]["error"] == "worker failed: boom"
    assert "failed: worker failed: boom" in (tmp_path / "latency.md").read_text()


@pytest.mark.skipif(not FULLRES_TRAIN.is_dir(), reason="full-size images not found")
def test_e2e_on_full_size_images(tiny, tmp_path):
    rc = cli.main(["e2e", "--model", str(tiny[1]), "--images", str(FULLRES_TRAIN), "--count", "2", "--repeats", "1",
                   "--threads", "1", "--out", str(tmp_path), "-q"])
    rep = json.loads((tmp_path / "e2e.json").read_text())
    med = rep["per_image"]["median_ms"]
    assert med["read_decode"] > 0 and med["inference"] > 0
    assert rep["per_image"]["images"][0]["width"] > 500  # really full size
    cold = rep["cold"]
    assert cold["median_s"]["python_startup"] > 0
    assert rc == 0, cold.get("errors")
    assert cold["median_s"]["cxr_infer_1_image"] > 0 and cold["imports_torch"] is False  # never loads torch
    assert "decode + preprocess" in (tmp_path / "e2e.md").read_text()


def test_worker_reports_errors_as_one_line(tmp_path, capsys):
    from cxr_bench import worker

    rc = worker.main([json.dumps({"engine": "onnx", "path": str(tmp_path / "missing.onnx"), "batch": 1, "threads": 1})])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 1 and out.startswith(worker.MARKER)
    assert "error" in json.loads(out[len(worker.MARKER):])


RUN = Path(__file__).resolve().parents[1] / "runs" / "gpu2" / "resnet50"


@pytest.mark.slow
@pytest.mark.skipif(not (RUN / "checkpoint.json").is_file(), reason="no trained checkpoint in runs/gpu2/resnet50")
def test_torch_eager_baseline_on_real_checkpoint(tiny, tmp_path):
    pytest.importorskip("torch")
    rc = cli.main(["latency", "--model", str(tiny[1]), "--checkpoint", str(RUN), "--batch", "1", "--threads", "1",
                   "--repeats", "1", "--iterations", "2", "--warmup", "1", "--out", str(tmp_path), "-q"])
    assert rc == 0
    rep = json.loads((tmp_path / "latency.json").read_text())
    torch_row = next(r for r in rep["results"] if r["engine"] == "torch")
    assert torch_row["backbone"] == "resnet50" and torch_row["median_ms"] > 0
    assert rep["machine"]["torch"]


@pytest.mark.skipif(not FULLRES_TRAIN.is_dir(), reason="full-size images not found")
def test_e2e_cold_processes_run_on_the_device_asked_for(tiny, tmp_path, monkeypatch):
    """--device reaches the cold cxr-infer processes too, not only the in-process part."""
    from cxr_infer.devices import DEVICES

    if DEVICES["openvino"].missing() is not None:
        pytest.skip("the OpenVINO runtime is not installed (pip install 'cxr[openvino]')")
    monkeypatch.setenv("CXR_OPENVINO_CACHE", str(tmp_path / "ov"))
    rc = cli.main(["e2e", "--model", str(tiny[1]), "--images", str(FULLRES_TRAIN), "--count", "1", "--repeats", "1",
                   "--threads", "1", "--device", "openvino", "--out", str(tmp_path), "-q"])
    rep = json.loads((tmp_path / "e2e.json").read_text())
    assert rc == 0, rep["cold"].get("errors")
    assert rep["settings"]["infer_args"] == ["--threads", "1", "--device", "openvino"]
    assert "--device openvino" in (tmp_path / "e2e.md").read_text()
    assert [f for f in (tmp_path / "ov").iterdir() if f.name != ".lock"]  # OpenVINO compiled into the cache
