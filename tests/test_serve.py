"""The local server, started as users start it, spoken to over real HTTP on loopback."""

import base64
import collections
import concurrent.futures
import contextlib
import functools
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_SIZE, median_calibration, png_header_only
from transfer.export import export_savedmodel
from transfer.images import load_image
from transfer.model import load_model

Served = collections.namedtuple("Served", "base port dataset model process log model_dir")


def validation_files(dataset):
    return sorted((dataset / "validation").rglob("*.jpg"))


def start_server(model_dir, log, *options):
    """`python -m transfer serve model_dir` on a free loopback port, its output in `log`:
    (process, base URL, port) once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer", "serve", str(model_dir), "--port", str(port), *options],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1/models/{Path(model_dir).name}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base, timeout=1)
            return process, base, port
        except urllib.error.HTTPError:
            return process, base, port
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()}")
            time.sleep(0.2)
    process.kill()
    pytest.fail("server did not answer within 120 s")


def break_version(folder):
    """Truncate a version's saved_model.pb, as a half-finished copy leaves it."""
    pb = folder / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:1000])


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """Versions 1 and 2, calibrated (temperature 2, half the validation images unknown), and
    a broken version 3 there from the start."""
    run_dir, dataset = trained_run
    root = tmp_path_factory.mktemp("served")
    model_dir = root / "stripes"
    model = load_model(run_dir / "model.keras")
    pixels = np.stack([load_image(f, TINY_SIZE) for f in validation_files(dataset)])
    calibration = median_calibration(model, pixels.astype("float32"))
    for _ in range(2):
        export_savedmodel(model, ["horizontal", "vertical"], model_dir, calibration)
    shutil.copytree(model_dir / "2", model_dir / "3")
    break_version(model_dir / "3")
    log = root / "server.log"
    process, base, port = start_server(
        model_dir, log, "--max-image-mb", "0.01", "--max-body-mb", "1", "--max-batch", "8",
        "--max-instances", "200", "--max-request-mpx", "200", "--read-timeout-s", "1")
    yield Served(base, port, dataset, model, process, log, model_dir)
    process.terminate()
    process.wait(timeout=30)


def call(url, body=None, raw=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_http(port, data, timeout=10):
    """Send bytes as they are; (seconds until the server closed, what it sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        began, received = time.perf_counter(), b""
        while chunk := connection.recv(65536):
            received += chunk
    return time.perf_counter() - began, received


def b64(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return {"b64": base64.b64encode(data).decode()}


def encoded(size, fmt="PNG", **options):
    buffer = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buffer, fmt, **options)
    return buffer.getvalue()


@functools.cache
def heavy_webp():
    """38 bytes of lossless WebP that decode to 8000 x 8000 pixels (64 million, the most one
    image may declare): a second of one core, and a gigabyte, to decode."""
    return b64(encoded((8000, 8000), "WEBP", lossless=True, method=0))


def memory_mb(pid):
    """(resident, peak resident) memory of a process in MB, from Linux's /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def test_status_and_metadata(server):
    status, body = call(server.base)
    assert status == 200
    assert [v["version"] for v in body["model_version_status"]] == ["3", "2", "1"]
    assert body["model_version_status"][1]["state"] == "AVAILABLE"
    assert call(server.base + "/versions/1")[1]["model_version_status"][0]["version"] == "1"
    status, body = call(server.base + "/metadata")
    assert status == 200 and body["model_spec"] == {"name": "stripes", "signature_name": "",
                                                     "version": "2"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    images = defs["serving_default"]["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", str(TINY_SIZE),
                                                                  str(TINY_SIZE), "3"]
    assert defs["serve_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    outputs = defs["serving_default"]["outputs"]
    assert set(outputs) == {"probabilities", "class_index", "class_name", "score", "unknown"}
    assert outputs["score"]["dtype"] == "DT_FLOAT" and outputs["unknown"]["dtype"] == "DT_BOOL"
    assert set(defs["serve_bytes"]["outputs"]) == set(outputs)


def test_predict_rows_columns_and_bytes_agree_with_the_export(server):
    """Each prediction holds the export's calibrated probabilities, its score and its unknown
    flag (JSON true/false), in rows and in columns, from pixels and from image files."""
    import tensorflow as tf

    files = validation_files(server.dataset)
    pixels = np.stack([load_image(f, TINY_SIZE) for f in files]).astype("float32")
    signatures = tf.saved_model.load(str(server.model_dir / "2")).signatures
    expected = {key: value.numpy() for key, value in
                signatures["serving_default"](images=tf.constant(pixels)).items()}
    assert sorted(set(expected["unknown"].tolist())) == [False, True]
    assert expected["probabilities"].argmax(axis=1).tolist() == (
        server.model.predict(pixels, verbose=0).argmax(axis=1).tolist())

    def check(predictions, wanted, atol=1e-5):
        for key in ("probabilities", "score"):
            np.testing.assert_allclose([p[key] for p in predictions], wanted[key], atol=atol,
                                       rtol=1e-5)
        assert [p["unknown"] for p in predictions] == wanted["unknown"].tolist()
        assert all(type(p["unknown"]) is bool for p in predictions)
        assert [p["class_name"] for p in predictions] == [
            name.decode() for name in wanted["class_name"]]

    status, rows = call(server.base + ":predict", {"instances": pixels.tolist()})
    assert status == 200
    check(rows["predictions"], expected)

    status, columns = call(server.base + "/versions/1:predict",
                           {"signature_name": "serving_default", "inputs": {"images": pixels.tolist()}})
    assert status == 200 and set(columns["outputs"]) == set(expected)
    check([dict(zip(columns["outputs"], row)) for row in zip(*columns["outputs"].values())],
          expected)

    status, by_bytes = call(server.base + ":predict", {
        "signature_name": "serve_bytes", "instances": [{"image_bytes": b64(f)} for f in files]})
    assert status == 200
    check(by_bytes["predictions"], {key: value.numpy() for key, value in signatures[
        "serve_bytes"](image_bytes=tf.constant([f.read_bytes() for f in files])).items()})
    np.testing.assert_allclose([r["probabilities"] for r in by_bytes["predictions"]],
                               expected["probabilities"], atol=0.02)


def pixel_body(value):
    """A one-image pixel request whose first value is the JSON text `value`, the rest 0."""
    row = ",".join(["[0,0,0]"] * TINY_SIZE)
    first = ",".join([f"[{value},0,0]"] + ["[0,0,0]"] * (TINY_SIZE - 1))
    return ('{"instances": [[[' + first + "]," + ",".join([f"[{row}]"] * (TINY_SIZE - 1))
            + "]]}").encode()


MUST_BE_PIXELS = f"images must be numbers 0-255 (raw RGB) of shape [N, {TINY_SIZE}, {TINY_SIZE}, 3]"


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
    # Issue 17, 4: nothing malformed reaches a 500 or an answer of NaN.
    (":predict", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
     "JSON Parse error: nested too deeply"),
    (":predict", pixel_body("NaN"), 400, "NaN is not a JSON number"),
    (":predict", pixel_body("Infinity"), 400, "Infinity is not a JSON number"),
    (":predict", pixel_body("-Infinity"), 400, "-Infinity is not a JSON number"),
    (":predict", pixel_body("1e39"), 400, f"{MUST_BE_PIXELS}; received 1e+39 at [0, 0, 0, 0]"),
    (":predict", pixel_body("-1"), 400, f"{MUST_BE_PIXELS}; received -1 at [0, 0, 0, 0]"),
    (":predict", pixel_body("256"), 400, f"{MUST_BE_PIXELS}; received 256 at"),
    (":predict", pixel_body("null"), 400, f"{MUST_BE_PIXELS}; received null"),
    (":predict", pixel_body('"12"'), 400, f"{MUST_BE_PIXELS}; received strings"),
    (":predict", pixel_body("true"), 400, f"{MUST_BE_PIXELS}; received true or false"),
    (":predict", pixel_body("false"), 400, f"{MUST_BE_PIXELS}; received true or false"),
])
def test_bad_requests_get_a_4xx_with_a_json_error(server, path, body, status, message):
    raw = body if isinstance(body, bytes) else None
    got_status, got = call(server.base + path, None if raw else body, raw)
    assert got_status == status and message in got["error"], got


@pytest.mark.parametrize("version", ["%201", "0001", "1_0", "%D9%A1", "+1", "1%20", "2" * 30])
def test_versions_are_read_one_way_everywhere(server, version):
    """Only the canonical spelling of a version number is one, in every call."""
    for suffix, body in [("", None), ("/metadata", None), (":predict", {"instances": [1]})]:
        status, got = call(f"{server.base}/versions/{version}{suffix}", body)
        assert status == 400 and "Version must be an integer written as version folders are " \
                                  "named" in got["error"], (suffix, got)
    assert call(server.base + "/versions/1")[0] == 200


def test_unknown_models_and_routes_are_404s(server):
    other = server.base.replace("/stripes", "/flowers")
    assert call(other)[0] == 404
    status, body = call(other + ":predict", {"instances": [1]})
    assert status == 404 and "Latest(flowers)" in body["error"]
    assert call(server.base.replace("/v1/models/stripes", "/v2/other"))[0] == 404


def test_a_bad_image_in_a_busy_batch_fails_only_its_own_request(server):
    good = b64(sorted((server.dataset / "validation" / "vertical").iterdir())[0])
    bodies = [{"signature_name": "serve_bytes", "instances": [good]}] * 12
    bodies[5] = {"signature_name": "serve_bytes", "instances": [{"b64": "aGVsbG8="}]}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda body: call(server.base + ":predict", body), bodies))
    assert [status for status, _ in results] == [200] * 5 + [400] + [200] * 6


def test_a_broken_version_is_reported_and_never_served(server):
    """Issue 17, 2: version 3's saved_model.pb is truncated. The server started anyway, serves
    version 2 by default, and reports 3 as TensorFlow Serving does, without a server path."""
    status, body = call(server.base + "/versions/3")
    (broken,) = body["model_version_status"]
    assert status == 200 and broken["state"] == "END"
    assert broken["status"]["error_code"] != "OK"
    assert "Cannot parse file" in broken["status"]["error_message"]
    for suffix, request in [("/metadata", None), (":predict", {"instances": [1]})]:
        status, got = call(server.base + "/versions/3" + suffix, request)
        assert status == 404, got
        assert "version 3 did not load" in got["error"]
        assert "available versions: 1, 2" in got["error"]
        assert str(server.model_dir.parent) not in json.dumps(got)
    assert str(server.model_dir.parent) not in json.dumps(call(server.base)[1])
    assert call(server.base + "/metadata")[1]["model_spec"]["version"] == "2"
    black = [[[0] * 3] * TINY_SIZE] * TINY_SIZE
    status, body = call(server.base + ":predict", {"instances": [black]})
    assert status == 200 and len(body["predictions"]) == 1


def test_a_folder_where_no_version_loads_is_a_one_line_error(server, tmp_path, capsys,
                                                               monkeypatch):
    from transfer.cli import main

    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "0")  # keep this process's TensorFlow as it is
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "0")
    shutil.copytree(server.model_dir / "3", tmp_path / "stripes" / "1")
    assert main(["serve", str(tmp_path / "stripes")]) == 2
    error = capsys.readouterr().err
    (line,) = [line for line in error.splitlines() if line.startswith("error:")]
    assert line.startswith("error: No version of ") and "version 1: OSError: Cannot parse" in line
    assert "Traceback" not in error


def test_too_many_instances_or_pixels_in_one_request_are_a_413(server):
    """Issue 17, 1: 1,000 one-pixel PNGs (69 bytes each) once took gigabytes and minutes."""
    one_pixel = b64(encoded((1, 1)))
    began = time.perf_counter()
    status, got = call(server.base + ":predict",
                       {"signature_name": "serve_bytes", "instances": [one_pixel] * 1000})
    assert status == 413
    assert "1,000 instances exceeds the limit of 200 (--max-instances)" in got["error"]
    # Five 38-byte WebPs declaring 8000 x 8000 each: 320 million pixels to decode.
    status, got = call(server.base + ":predict",
                       {"signature_name": "serve_bytes", "instances": [heavy_webp()] * 5})
    assert status == 413 and "320,000,000 pixels, over the limit of 200,000,000" in got["error"]
    assert "--max-request-mpx" in got["error"]
    assert time.perf_counter() - began < 5


def test_a_large_request_runs_in_max_batch_chunks_in_bounded_memory(server):
    """Issue 17, 1: 200 instances run as batches of --max-batch (8), not one batch of 200
    (which took 100 MB more at its peak here; 20 GB for 2,000 at 224 px)."""
    one_pixel = b64(encoded((1, 1)))
    call(server.base + ":predict", {"signature_name": "serve_bytes", "instances": [one_pixel] * 8})
    before, _ = memory_mb(server.process.pid)
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # peak := now
    status, body = call(server.base + ":predict",
                        {"signature_name": "serve_bytes", "instances": [one_pixel] * 200})
    after, peak = memory_mb(server.process.pid)
    assert status == 200 and len(body["predictions"]) == 200
    probabilities = [p["probabilities"] for p in body["predictions"]]  # one image throughout
    np.testing.assert_allclose(probabilities, [probabilities[0]] * 200, atol=1e-5)
    assert peak - before < 50, (before, peak)
    assert after - before < 50, (before, after)


def test_a_heavy_request_does_not_hold_up_small_ones(server):
    """Issue 17, 3: while a request of two 64-megapixel images decodes (5 s here; one core),
    one-image requests are answered in well under a second, not after it."""
    heavy = heavy_webp()
    small = {"signature_name": "serve_bytes", "instances": [b64(encoded((20, 20)))]}
    call(server.base + ":predict", small)
    before, _ = memory_mb(server.process.pid)
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("heavy", call(
        server.base + ":predict", {"signature_name": "serve_bytes", "instances": [heavy] * 2})))
    worker.start()
    time.sleep(0.5)
    latencies = []
    for _ in range(3):
        began = time.perf_counter()
        assert call(server.base + ":predict", small)[0] == 200
        latencies.append(time.perf_counter() - began)
    still_decoding = worker.is_alive()
    worker.join(timeout=120)
    assert done["heavy"][0] == 200 and len(done["heavy"][1]["predictions"]) == 2
    assert still_decoding and max(latencies) < 1.0, latencies
    after, _ = memory_mb(server.process.pid)
    assert after - before < 200, (before, after)  # its gigabytes are given back


def test_long_lines_short_bodies_and_disconnects_are_answered_without_tracebacks(server):
    """Issue 17, 4: over-long URLs and headers get JSON 400s that do not echo them; a body
    that never arrives gets a 408 after --read-timeout-s (1) and the connection closes;
    clients that leave are one log line each."""
    head = b"GET /v1/models/stripes/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    for request in [head, b"GET /v1/models/stripes HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 9000
                    + b"\r\n\r\n"]:
        _, answer = raw_http(server.port, request)
        header, _, body = answer.partition(b"\r\n\r\n")
        assert header.startswith(b"HTTP/1.") and b" 400 " in header.split(b"\r\n")[0]
        assert b"application/json" in header and b"xxxx" not in body and b"yyyy" not in body
        assert "longer than 8,190 bytes" in json.loads(body)["error"]

    short = (b"POST /v1/models/stripes:predict HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n"
             b"\r\n{")
    seconds, answer = raw_http(server.port, short)
    header, _, body = answer.partition(b"\r\n\r\n")
    assert b" 408 " in header.split(b"\r\n")[0] and "--read-timeout-s" in json.loads(body)["error"]
    assert seconds < 4  # answered and closed, not held open

    lines_before = len(server.log.read_text().splitlines())
    whole = json.dumps({"signature_name": "serve_bytes",
                        "instances": [b64(encoded((1, 1)))] * 200}).encode()
    for sent in [short, b"POST /v1/models/stripes:predict HTTP/1.1\r\nHost: a\r\nContent-Length: "
                 + str(len(whole)).encode() + b"\r\n\r\n" + whole]:
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(sent)  # and leave at once
    time.sleep(3)
    new_lines = [line for line in server.log.read_text().splitlines()[lines_before:]
                 if '] "' not in line]  # not aiohttp's access log
    assert len(new_lines) <= 2 and all("the client closed the connection first" in line
                                       for line in new_lines), new_lines


def test_the_log_holds_no_tracebacks(server):
    assert "Traceback" not in server.log.read_text()


def test_new_versions_are_served_once_they_load_and_sigterm_ends_a_busy_server(server, tmp_path):
    """Issue 17, 2: a version folder being copied in is not served until it loads, then is
    the default; removing it rolls back. Issue 17, 1: SIGTERM ends the server within seconds,
    even while it works on a heavy request."""
    model_dir = tmp_path / "stripes"
    shutil.copytree(server.model_dir / "1", model_dir / "1")
    process, base, _ = start_server(model_dir, tmp_path / "server.log", "--max-request-mpx", "600")

    def wait_for(version, state):
        deadline = time.time() + 30
        while time.time() < deadline:
            status, body = call(f"{base}/versions/{version}")
            if status == 200 and body["model_version_status"][0]["state"] == state:
                return body["model_version_status"][0]
            time.sleep(0.2)
        pytest.fail(f"version {version} never reached {state}: {body}")

    try:
        (model_dir / "2").mkdir()
        shutil.copy(server.model_dir / "1" / "saved_model.pb", model_dir / "2")
        half = wait_for(2, "END")
        assert "variables" in half["status"]["error_message"]
        assert str(tmp_path) not in half["status"]["error_message"]
        assert call(base + "/metadata")[1]["model_spec"]["version"] == "1"
        for part in ["variables", "assets", "fingerprint.pb"]:
            source = server.model_dir / "1" / part
            (shutil.copytree if source.is_dir() else shutil.copy)(source, model_dir / "2" / part)
        wait_for(2, "AVAILABLE")
        assert call(base + "/metadata")[1]["model_spec"]["version"] == "2"
        shutil.rmtree(model_dir / "2")
        assert call(base + "/metadata")[1]["model_spec"]["version"] == "1"

        def busy():  # 8 heavy images: over 10 s of work, cut short
            with contextlib.suppress(OSError):
                call(base + ":predict", {"signature_name": "serve_bytes",
                                         "instances": [heavy_webp()] * 8}, timeout=120)

        threading.Thread(target=busy, daemon=True).start()
        time.sleep(1)
        began = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.perf_counter() - began < 8
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_a_port_in_use_is_named_with_the_fix(trained_run, tmp_path, capsys, monkeypatch):
    from transfer.cli import main

    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "0")  # keep this process's TensorFlow as it is
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "0")
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
    assert main(["serve", str(model_dir), "--max-instances", "0"]) == 2
    assert "--max-instances must be positive; received 0" in capsys.readouterr().err
