"""cxr-serve over real HTTP: curl, a Python client with concurrent requests, tritonclient's HTTP
client on the Open Inference Protocol, the bearer token, the limits and one-line errors.

One server runs the embedded default model (with its image check and heatmap) behind a token;
a second one runs the tiny model with small limits for the 413 and 503 answers.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from serve_fixtures import REPO, SAMPLE, env, post_json, request, start_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    srv = start_server(["--token-file", str(tmp / "token"), "--threads", "2", "--max-wait-ms", "10"], tmp / "log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("serve-small")
    srv = start_server(["--model", str(tiny_model), "--max-concurrency", "1", "--max-body-mb", "0.25",
                        "--threads", "1"], tmp / "log")
    yield srv
    srv.stop()


def cli_record(path: Path) -> dict:
    """What ``cxr-infer --format jsonl -`` writes for the file's bytes (the path aside)."""
    r = subprocess.run([sys.executable, "-m", "cxr_infer.cli", "--format", "jsonl", "-"], input=path.read_bytes(),
                       capture_output=True, env=env(), cwd=str(REPO), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    out.pop("path")
    return out


def close(a: dict, b: dict) -> bool:
    """Equal records, probabilities within 2e-6 (a batch may round the last digit otherwise)."""
    probs_a, probs_b = a.pop("probabilities"), b.pop("probabilities")
    pa, pb = a.pop("probability"), b.pop("probability")
    return a == b and abs(pa - pb) <= 2e-6 and all(abs(probs_a[k] - probs_b[k]) <= 2e-6 for k in probs_b)


def test_curl_gets_the_record_cxr_infer_writes(server, xrays224):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    for path in (SAMPLE, xrays224[0], xrays224[-1]):
        r = subprocess.run(["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {TOKEN}",
                            "--data-binary", f"@{path}", server.url + "/v1/classify"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        got = json.loads(r.stdout)
        assert got.pop("path") is None
        assert got == cli_record(path)
        assert got["in_domain"] is True and got["domain_score"] is not None


def test_concurrent_requests_share_model_runs(server, xrays224):
    from cxr_infer import Classifier
    from cxr_serve.service import record

    def batches() -> tuple:
        _, _, text = request(server.url + "/metrics", headers=AUTH)
        values = dict(line.rsplit(" ", 1) for line in text.decode().splitlines()
                      if line.startswith(("cxr_batch_size_count", "cxr_batch_size_sum")))
        return float(values["cxr_batch_size_count"]), float(values["cxr_batch_size_sum"])

    before = batches()
    bodies = [p.read_bytes() for p in xrays224] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post_json(server.url + "/v1/classify", b, AUTH), bodies))
    clf = Classifier(threads=1)
    for body, (status, got) in zip(bodies, answers):
        assert status == 200, got
        want = record(clf.predict(body))
        assert close(got, want), (got, want)
    runs, images = (after - b for after, b in zip(batches(), before))
    assert images == len(bodies)
    assert runs < images, "no two requests shared a model run"


def test_tritonclient_http_client_is_answered(server, xrays224):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(urlparse(server.url).netloc)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("cxr", headers=dict(AUTH))  # tritonclient adds to the dict it gets
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]][:4] == ["probabilities", "label", "in_domain", "domain_score"]
    bodies = [xrays224[0].read_bytes(), xrays224[-1].read_bytes()]
    for binary in (True, False):  # the images always go as binary data (tritonclient sends bytes no other way)
        image = httpclient.InferInput("image", [len(bodies)], "BYTES")
        image.set_data_from_numpy(np.array(bodies, dtype=np.object_), binary_data=True)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("probabilities", "label", "in_domain", "domain_score")]
        result = client.infer("cxr", [image], outputs=outputs, headers=dict(AUTH), request_id="r1")
        probs = result.as_numpy("probabilities")
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        for k, path in enumerate((xrays224[0], xrays224[-1])):
            want = cli_record(path)
            assert labels[k] == want["label"]
            assert np.allclose(probs[k], [want["probabilities"][lb] for lb in ("NORMAL", "PNEUMONIA")], atol=2e-6)
            assert bool(result.as_numpy("in_domain")[k]) is want["in_domain"]
            assert abs(float(result.as_numpy("domain_score")[k]) - want["domain_score"]) < 1e-4
        assert result.get_response()["id"] == "r1"
    client.close()
    # the same request as JSON with base64 data, sent by hand
    payload = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(bodies[0]).decode()]}]}
    status, answer = post_json(server.url + "/v2/models/cxr/infer", json.dumps(payload).encode(), AUTH)
    assert status == 200 and answer["outputs"][1]["data"] == [cli_record(xrays224[0])["label"]], answer


def test_the_token_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, got = post_json(server.url + "/v1/classify", SAMPLE.read_bytes(), headers)
        assert status == 401 and "bearer token" in got["error"], got
        status, _, _ = request(server.url + "/metrics", headers=headers)
        assert status == 401
    assert request(server.url + "/v2/health/live")[0] == 200  # what a load balancer probes
    log = server.log.read_text()
    assert TOKEN not in log, log
    assert "POST other 401" in log


def test_bad_bodies_get_one_line_4xx(server, tmp_path):
    cases = [(b"hello", 400, "not a supported image (text; expected JPEG, PNG, BMP, TIFF or DICOM)"),
             (SAMPLE.read_bytes()[:100], 400, "corrupt or truncated image"),
             (b"", 400, "empty request body")]
    for body, code, message in cases:
        status, got = post_json(server.url + "/v1/classify", body, AUTH)
        assert status == code and got["error"].startswith(message) and "\n" not in got["error"], got
    # the very line cxr-infer prints for the same bytes on stdin
    r = subprocess.run([sys.executable, "-m", "cxr_infer.cli", "-"], input=b"hello", capture_output=True, env=env(),
                       cwd=str(REPO), timeout=60)
    assert f"cxr-infer: -: {cases[0][2]}" in r.stderr.decode()
    oip = server.url + "/v2/models/cxr/infer"
    for body, code in ((b"{not json", 400), (b'{"inputs": []}', 400),
                       (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                "data": ["aGVsbG8="]}]}).encode(), 400)):
        status, got = post_json(oip, body, AUTH)
        assert status == code and "error" in got and "Traceback" not in got["error"], got
    status, got = post_json(server.url + "/v2/models/other/infer", b"{}", AUTH)
    assert status == 404 and "unknown model 'other'" in got["error"]
    status, got = post_json(server.url + "/v1/classify?heatmap=perhaps", SAMPLE.read_bytes(), AUTH)
    assert status == 400 and "?heatmap=perhaps" in got["error"]


def test_heatmap_adds_the_overlay_png(server):
    from PIL import Image

    status, got = post_json(server.url + "/v1/classify?heatmap=true", SAMPLE.read_bytes(), AUTH)
    assert status == 200, got
    image = Image.open(io.BytesIO(base64.b64decode(got.pop("overlay_png"))))
    assert image.format == "PNG" and image.size[0] >= 224
    assert got == {"path": None, **cli_record(SAMPLE)}


def test_oversize_body_gets_413(small):
    status, got = post_json(small.url + "/v1/classify", b"\xff" * (300 * 1024))
    assert status == 413 and "larger than the limit" in got["error"], got
    status, got = post_json(small.url + "/v1/classify", (REPO / "runtime/cxr_infer/samples/person1_virus_6.jpeg")
                            .read_bytes())
    assert status == 200, got


def test_beyond_the_concurrency_limit_503_with_retry_after(small):
    host, port = urlparse(small.url).hostname, urlparse(small.url).port
    held = socket.create_connection((host, port))  # a slow upload holds the one slot
    held.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"\xff\xd8")
    try:
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = request(small.url + "/v1/classify", SAMPLE.read_bytes())
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503 and headers.get("retry-after") == "1", (status, body)
        assert "busy" in json.loads(body)["error"]
        assert request(small.url + "/v2/health/ready")[0] == 200  # probes are never refused
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while request(small.url + "/v1/classify", SAMPLE.read_bytes())[0] != 200:
        assert time.monotonic() < deadline, "the slot was not given back"
        time.sleep(0.05)
    _, _, text = request(small.url + "/metrics")
    assert 'cxr_rejected_total{reason="concurrency"}' in text.decode()


def test_sigterm_stops_it_cleanly(tmp_path, tiny_model):
    srv = start_server(["--model", str(tiny_model), "--threads", "1"], tmp_path / "log")
    assert post_json(srv.url + "/v1/classify", SAMPLE.read_bytes())[0] == 200
    assert srv.stop() == 0
    log = srv.log.read_text()
    assert "cxr-serve: stopped" in log and "Traceback" not in log
    assert all(" ms" in line or "cxr-serve: stopped" in line for line in log.splitlines()[1:]), log


def test_startup_problems_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxr_serve", "--model", str(tmp_path / "missing.onnx")],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.onnx" in r.stderr, r.stderr
    (tmp_path / "empty").write_text("\n")
    r = subprocess.run([sys.executable, "-m", "cxr_serve", "--token-file", str(tmp_path / "empty")],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "first line is empty" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "cxr_serve", "--help"], capture_output=True, text=True, env=env(),
                       timeout=60)
    assert r.returncode == 0 and "curl --data-binary" in r.stdout and "/v2/models/NAME/infer" in r.stdout
