"""cxr-infer --ray and cxr-serve --ray on a real two-node Ray cluster started by the test.

- the 624 test images scored on the cluster with the embedded default model: the rows equal a
  local ``cxr-infer`` run's, each input once, although a Scorer worker is killed mid-run;
- ``--resume`` scores only what the journal lacks (or what changed since);
- ``cxr-serve --ray --replicas 2``: the record of a local run, and a killed replica does not
  stop the answers.

Slow (a cluster starts in about 20 s and the runs take minutes on 2 cores):
``python3 -m pytest -q -p no:cacheprovider -m slow tests/test_ray.py`` (``.ci/run`` runs it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_fixtures import Cluster, free_port
from serve_fixtures import REPO, SAMPLE, env, post_json, request

from cxr_bench.util import stop_process

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: .[ray]")]

TEST = REPO.parent / "shared" / "data" / "chest_xray_224" / "test"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(nodes=2, cpus=2)
    yield c
    c.stop()


def cxr_infer(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_infer.cli", *args], capture_output=True, text=True, env=env(),
                          cwd=str(REPO), timeout=timeout)


def rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_rows_equal_a_local_run_after_a_worker_is_killed(cluster, tmp_path):
    if not TEST.is_dir():
        pytest.skip(f"shared data not found at {TEST}")
    (tmp_path / "bad.jpeg").write_bytes(b"not an image")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"# the pneumonia half, then a bad file\n{TEST / 'PNEUMONIA'}\n\n{tmp_path / 'bad.jpeg'}\n")
    inputs = [str(TEST / "NORMAL"), "--files-from", str(manifest)]
    local = cxr_infer(*inputs, "--format", "jsonl", "--output", str(tmp_path / "local.jsonl"))
    assert local.returncode == 1, local.stderr  # the bad file
    out = tmp_path / "ray.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "cxr_infer.cli", "--ray", cluster.address, *inputs, "--format",
                            "jsonl", "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env(), cwd=str(REPO))
    journal = Path(str(out) + ".journal.jsonl")
    killed, pool_up, pool = [], None, len(cluster.nodes) * cluster.cpus
    deadline = time.monotonic() + 600
    while run.poll() is None and not killed and time.monotonic() < deadline:
        # Rows reach the journal in bursts (blocks come back in input order), so a row count alone
        # can miss the run. The kill comes once the whole pool (one Scorer per CPU of the cluster)
        # has been scoring for a second, or at the first journaled row, whichever is first.
        done = len(journal.read_text().splitlines()) if journal.exists() else 0
        workers = cluster.processes("Scorer")
        if len(workers) >= pool and pool_up is None:
            pool_up = time.monotonic()
        if workers and (done or (pool_up is not None and time.monotonic() - pool_up >= 1.0)):
            os.kill(workers[0], signal.SIGKILL)  # a Scorer actor of this cluster, mid-run
            killed.append((workers[0], done))
        time.sleep(0.1)
    _, stderr = run.communicate(timeout=900)
    assert killed, f"the run ended before a worker could be killed: {stderr}"
    assert killed[0][1] < 625, killed
    assert run.returncode == 1, stderr
    got, want = rows(out), rows(tmp_path / "local.jsonl")
    assert len(got) == 625 and len({r["path"] for r in got}) == 625  # every input, once
    assert got == want
    assert got[-1]["error"].startswith("not a supported image")
    assert "on 2 node(s)" in stderr


def test_resume_scores_only_what_is_missing_or_changed(cluster, tmp_path, tiny_model, xrays224):
    files = []
    for f in xrays224:
        shutil.copy2(f, tmp_path / f.name)
        files.append(tmp_path / f.name)
    first, out = [str(f) for f in files[:8]], tmp_path / "out.csv"
    r = cxr_infer("--ray", cluster.address, "--model", str(tiny_model), *first, "--format", "csv", "--output", str(out))
    assert r.returncode == 0, r.stderr
    files[0].write_bytes(files[-1].read_bytes())  # changed since: its SHA-256 no longer matches
    everything = [str(f) for f in files]
    r = cxr_infer("--ray", cluster.address, "--model", str(tiny_model), *everything, "--format", "csv", "--output",
                  str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert re.search(r"5 inputs to score .*; 7 already scored \(--resume\)", r.stderr), r.stderr
    local = cxr_infer("--model", str(tiny_model), *everything, "--format", "csv")
    assert out.read_text() == local.stdout


def test_serve_on_ray_survives_a_replica_kill(cluster, tmp_path, tiny_model):
    port = free_port()
    (tmp_path / "token").write_text("t0ken\n")
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "cxr_serve", "--ray", cluster.address, "--replicas", "2",
                              "--replica-cpus", "0.5", "--port", str(port), "--model", str(tiny_model),
                              "--token-file", str(tmp_path / "token")],
                             stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=str(REPO))
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer t0ken"}
    try:
        deadline = time.monotonic() + 180
        while "Ray Serve on http" not in (tmp_path / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        want = json.loads(cxr_infer("--model", str(tiny_model), "--format", "jsonl", str(SAMPLE)).stdout)
        status, got = post_json(url + "/v1/classify", SAMPLE.read_bytes(), auth)
        assert status == 200 and got == {**want, "path": None}, got
        assert post_json(url + "/v1/classify", SAMPLE.read_bytes())[0] == 401
        replicas = cluster.processes("ServeReplica:cxr:Classifier")
        assert len(replicas) == 2, replicas
        os.kill(replicas[0], signal.SIGKILL)
        answered = [post_json(url + "/v1/classify", SAMPLE.read_bytes(), auth)[0] for _ in range(30)]
        assert answered.count(200) >= 28, answered  # a request caught on the dying replica may fail
        assert all(code in (200, 500, 503) for code in answered), answered
        deadline = time.monotonic() + 120
        while len(cluster.processes("ServeReplica:cxr:Classifier")) < 2:  # the controller replaces it
            assert time.monotonic() < deadline, "the killed replica was not replaced"
            time.sleep(1)
        assert request(url + "/v2/health/ready")[0] == 200
    finally:
        stop_process(serve, signal.SIGINT)
        log.close()
    assert "cxr-serve: stopped" in (tmp_path / "serve.log").read_text()
