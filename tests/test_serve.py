"""The local server, started as users start it, spoken to over real HTTP on loopback."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_SIZE, png_header_only
from transfer.export import export_savedmodel
from transfer.model import load_model


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    run_dir, dataset = trained_run
    model_dir = tmp_path_factory.mktemp("served") / "stripes"
    model = load_model(run_dir / "model.keras")
    for _ in range(2):
        export_savedmodel(model, ["horizontal", "vertical"], model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer", "serve", str(model_dir), "--port", str(port),
         "--max-image-mb", "0.01", "--max-body-mb", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1/models/stripes"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base, timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"server exited: {process.stdout.read()}")
            time.sleep(0.2)
    yield base, dataset, model
    process.terminate()
    process.wait(timeout=30)


def call(url, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def b64(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return {"b64": base64.b64encode(data).decode()}


def test_status_and_metadata(server):
    base, _, _ = server
    status, body = call(base)
    assert status == 200
    assert [v["version"] for v in body["model_version_status"]] == ["2", "1"]
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert call(base + "/versions/1")[1]["model_version_status"][0]["version"] == "1"
    status, body = call(base + "/metadata")
    assert status == 200 and body["model_spec"] == {"name": "stripes", "signature_name": "",
                                                     "version": "2"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    images = defs["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", str(TINY_SIZE),
                                                                  str(TINY_SIZE), "3"]
    assert defs["serve_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert set(defs["serving_default"]["outputs"]) == {"probabilities", "class_index", "class_name"}


def test_predict_rows_columns_and_bytes_agree_with_the_model(server):
    base, dataset, model = server
    files = sorted((dataset / "validation" / "vertical").iterdir())[:3]
    from transfer.images import load_image

    pixels = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    expected = model.predict(pixels, verbose=0)

    status, rows = call(base + ":predict", {"instances": pixels.tolist()})
    assert status == 200
    np.testing.assert_allclose([r["probabilities"] for r in rows["predictions"]], expected,
                               atol=1e-5)
    assert [r["class_name"] for r in rows["predictions"]] == [
        ["horizontal", "vertical"][i] for i in expected.argmax(axis=1)]

    status, columns = call(base + "/versions/1:predict",
                           {"signature_name": "serving_default", "inputs": {"images": pixels.tolist()}})
    assert status == 200
    np.testing.assert_allclose(columns["outputs"]["probabilities"], expected, atol=1e-5)

    status, by_bytes = call(base + ":predict", {"signature_name": "serve_bytes",
                                                "instances": [{"image_bytes": b64(f)} for f in files]})
    assert status == 200
    np.testing.assert_allclose([r["probabilities"] for r in by_bytes["predictions"]], expected,
                               atol=0.02)


@pytest.mark.parametrize("path, body, status, message", [
    (":predict", b"{not json", 400, "JSON Parse error"),
    (":predict", {"instances": [[0]], "inputs": [[0]]}, 400, "Not both"),
    (":predict", {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances'"),
    (":predict", {"instances": [[1, 2, 3]]}, 400, f"must have shape [N, {TINY_SIZE}"),
    (":predict", {"instances": [[["a"] * 3] * TINY_SIZE] * TINY_SIZE}, 400, "must be numbers"),
    (":predict", {"instances": []}, 400, "non-empty list"),
    (":predict", {"signature_name": "nope", "instances": [1]}, 400, "\"nope\" not found"),
    (":predict", {"signature_name": ["x"], "instances": [1]}, 400,
     "signature_name must be a string; received [\"x\"]"),
    (":predict", {"signature_name": "serve_bytes", "instances": [{"b64": "aGVsbG8="}]}, 400,
     "Unknown image file format"),
    (":predict", {"signature_name": "serve_bytes", "instances": [{"b64": "%%%"}]}, 400,
     "invalid base64"),
    (":predict", {"signature_name": "serve_bytes", "instances": ["plain text"]}, 400,
     "must be {\"b64\""),
    (":predict", {"signature_name": "serve_bytes",
                  "instances": [{"b64": base64.b64encode(bytes(20_000)).decode()}]}, 413,
     "exceeds the limit"),
    (":predict", {"signature_name": "serve_bytes",  # 70 bytes declaring 10,000 x 10,000
                  "instances": [{"b64": base64.b64encode(png_header_only(10**4, 10**4)).decode()}]},
     413, "an image declaring 100,000,000 pixels exceeds the limit of 64,000,000"),
    (":predict", {"signature_name": "serve_bytes",
                  "instances": [{"b64": base64.b64encode(png_header_only(10**5, 10**5)).decode()}]},
     413, "an image declaring more than 178,956,970 pixels exceeds the limit of 64,000,000"),
    (":predict", b"[" + b"0," * 600_000 + b"0]", 413, "Request body exceeds"),
    ("/versions/7:predict", {"instances": [1]}, 404, "Specific(stripes, 7)"),
    ("/versions/x:predict", {"instances": [1]}, 400, "Version must be an integer"),
])
def test_bad_requests_get_a_4xx_with_a_json_error(server, path, body, status, message):
    base, _, _ = server
    raw = body if isinstance(body, bytes) else None
    got_status, got = call(base + path, None if raw else body, raw)
    assert got_status == status and message in got["error"], got


def test_unknown_models_and_routes_are_404s(server):
    base, _, _ = server
    other = base.replace("/stripes", "/flowers")
    assert call(other)[0] == 404
    status, body = call(other + ":predict", {"instances": [1]})
    assert status == 404 and "Latest(flowers)" in body["error"]
    assert call(base.replace("/v1/models/stripes", "/v2/other"))[0] == 404


def test_a_bad_image_in_a_busy_batch_fails_only_its_own_request(server):
    import concurrent.futures

    base, dataset, _ = server
    good = b64(sorted((dataset / "validation" / "vertical").iterdir())[0])
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "PNG")
    bodies = [{"signature_name": "serve_bytes", "instances": [good]}] * 12
    bodies[5] = {"signature_name": "serve_bytes", "instances": [{"b64": "aGVsbG8="}]}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda body: call(base + ":predict", body), bodies))
    assert [status for status, _ in results] == [200] * 5 + [400] + [200] * 6


def test_a_port_in_use_is_named_with_the_fix(trained_run, tmp_path, capsys):
    from transfer.cli import main

    run_dir, _ = trained_run
    model_dir = tmp_path / "stripes"
    export_savedmodel(load_model(run_dir / "model.keras"), ["horizontal", "vertical"], model_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is already in use" in error and "--port" in error
    assert main(["serve", str(model_dir), "--port", "70000"]) == 2
    assert "--port must be 1-65535; received 70000" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--host", "no-such-host.invalid"]) == 2
    assert "Cannot listen on no-such-host.invalid:8501" in capsys.readouterr().err
