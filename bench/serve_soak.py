"""Soak test of `transfer serve`: valid and hostile traffic together, for minutes, over loopback.

Starts the server on a free 127.0.0.1 port and, for --seconds, holds --concurrency clients
sending valid requests (real images through serve_bytes, one and four at a time, and pixels
through serving_default) beside --hostile clients sending what issue 17 tried: 10,000-instance
requests, 64-megapixel images, decompression bombs, JSON nested 5,000 deep, NaN and other
non-pixels, odd version spellings, a broken version, 9 KB URLs and headers, bodies that never
arrive or are too large, broken image bytes, wrong methods, bytes that are not HTTP, and clients
that leave before their answer. Prints one JSON line: requests, statuses, the valid requests'
latency, the server's resident memory at start (warmed up), peak and end, and the targets (no
5xx, valid p99 under 1 s, memory at the end within 20% of the start).

Without --model-dir it exports a tiny random-weights model (VGG16 at 32 px, as the tests use),
with a broken newest version beside it, into a temporary folder.

    python bench/serve_soak.py --seconds 180
    python bench/serve_soak.py --model-dir saved_models/cats_dogs \
        --images ../shared/datasets/cats_dogs/validation
"""

import argparse
import asyncio
import base64
import io
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

from serve_load import REPO, bodies  # also puts the repository on sys.path


def tiny_export(folder):
    """A random-weights VGG16 at 32 px exported as version 1, and a version 2 whose
    saved_model.pb is cut short, as a half-finished copy leaves it."""
    from transfer.backbones import get_spec
    from transfer.export import export_savedmodel
    from transfer.model import build_classifier

    model = build_classifier(get_spec("vgg16"), 2, 32, weights="none")
    model_dir = Path(folder) / "soak"
    first = export_savedmodel(model, ["cats", "dogs"], model_dir, config={"image_size": 32})
    shutil.copytree(first, model_dir / "2")
    pb = model_dir / "2" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:1000])
    return model_dir


def sample_images(folder, count=8):
    """Photo-sized JPEGs of noise, for when no --images folder is there."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        path = Path(folder) / "images" / f"noise_{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return path.parent


def encoded(size, fmt, **options):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buffer, fmt, **options)
    return buffer.getvalue()


def bomb_header(width, height):
    """A PNG header declaring width x height, with a tiny IDAT: a decompression bomb."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def hostile_requests(name, size, broken_version):
    """(kind, what to send): a dict is a JSON body POSTed to :predict, bytes go to the socket
    as they are, ("GET", path) and ("DELETE", path) are requests without a body."""
    def b64(data):
        return {"b64": base64.b64encode(data).decode()}

    def pixels(first):
        row = ",".join(["[0,0,0]"] * size)
        image = ",".join([f"[[{first},0,0]," + ",".join(["[0,0,0]"] * (size - 1)) + "]"]
                         + [f"[{row}]"] * (size - 1))
        return ('{"instances": [[' + image + "]]}").encode()

    predict = f"/v1/models/{name}:predict"
    one_pixel = b64(encoded((1, 1), "PNG"))
    png = encoded((300, 200), "PNG")
    cases = [
        ("10000_instances", {"signature_name": "serve_bytes", "instances": [one_pixel] * 10_000}),
        ("64mpx_webp", {"signature_name": "serve_bytes", "instances": [
            b64(encoded((8000, 8000), "WEBP", lossless=True, method=0))]}),
        ("64mpx_png", {"signature_name": "serve_bytes",
                       "instances": [b64(encoded((8000, 8000), "PNG"))]}),
        ("bomb_header", {"signature_name": "serve_bytes",
                         "instances": [b64(bomb_header(10**5, 10**5))]}),
        ("truncated_png", {"signature_name": "serve_bytes",
                           "instances": [b64(png[:len(png) // 2])]}),
        ("not_an_image", {"signature_name": "serve_bytes", "instances": [b64(b"hello" * 40)]}),
        ("deep_json", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        *[(f"pixel_{value}", pixels(value)) for value in
          ("NaN", "Infinity", "1e39", "null", '"12"', "true", "-1")],
        *[(f"version_{v}", ("GET", f"/v1/models/{name}/versions/{v}/metadata"))
          for v in ("0001", "%201", "1_0", "%D9%A1")],
        ("long_url", f"GET /v1/models/{name}/{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        ("long_header", f"GET /v1/models/{name} HTTP/1.1\r\nHost: x\r\nX-A: {'b' * 9000}\r\n\r\n"
         .encode()),
        ("not_http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200)),
        ("short_body", f"POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{"
         .encode()),
        ("huge_length", f"POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n"
                        "\r\n{\"instances\": [".encode()),
        ("wrong_method", ("DELETE", f"/v1/models/{name}")),
        ("leave_mid_body", ("leave", f"POST {predict} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                     "5000\r\n\r\n{\"instances\": [".encode())),
        ("leave_before_answer", ("leave", json.dumps({
            "signature_name": "serve_bytes", "instances": [one_pixel] * 64}).encode())),
    ]
    if broken_version:
        cases.append(("broken_version", ("GET", f"/v1/models/{name}/versions/{broken_version}"
                                                "/metadata")))
    return cases


async def raw(port, data, leave=False, timeout=60):
    """Send bytes on a fresh connection; the status the server answers (None if we left)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if leave:
            return None
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else -1
    finally:
        writer.close()


async def soak(port, name, valid, hostile, concurrency, hostile_concurrency, seconds):
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    valid_latencies, valid_statuses, hostile_statuses, kinds = [], {}, {}, {}
    stop = time.perf_counter() + seconds
    rng = random.Random(17)

    def count(table, key):
        table[str(key)] = table.get(str(key), 0) + 1

    async def valid_client(session, offset):
        i = offset
        while time.perf_counter() < stop:
            began = time.perf_counter()
            try:
                async with session.post(f"{base}/v1/models/{name}:predict",
                                        data=valid[i % len(valid)]) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                status = type(error).__name__
            valid_latencies.append(time.perf_counter() - began)
            count(valid_statuses, status)
            i += concurrency

    async def hostile_client(session):
        while time.perf_counter() < stop:
            kind, request = rng.choice(hostile)
            try:
                if isinstance(request, bytes) and request.startswith((b"GET ", b"POST ", b"\x16")):
                    status = await raw(port, request)
                elif isinstance(request, tuple) and request[0] == "leave":
                    data = request[1]
                    if not data.startswith(b"POST "):
                        data = (f"POST /v1/models/{name}:predict HTTP/1.1\r\nHost: x\r\n"
                                f"Content-Length: {len(data)}\r\n\r\n").encode() + data
                    status = await raw(port, data, leave=True)
                elif isinstance(request, tuple):
                    async with session.request(request[0], base + request[1]) as response:
                        await response.read()
                        status = response.status
                else:
                    data = request if isinstance(request, bytes) else json.dumps(request).encode()
                    async with session.post(f"{base}/v1/models/{name}:predict",
                                            data=data) as response:
                        await response.read()
                        status = response.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                status = type(error).__name__
            count(hostile_statuses, "left" if status is None else status)
            kinds.setdefault(kind, {})
            count(kinds[kind], "left" if status is None else status)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()
        await asyncio.gather(*(valid_client(session, k) for k in range(concurrency)),
                             *(hostile_client(session) for _ in range(hostile_concurrency)))
        elapsed = time.perf_counter() - began
    return valid_latencies, valid_statuses, hostile_statuses, kinds, elapsed


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_memory(pid, samples, stop):
    while not stop.is_set():
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.2)


def start_server(model_dir, log):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "transfer", "serve", str(model_dir),
                               "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{model_dir.name}", timeout=1)
            return server, port
        except OSError:
            if server.poll() is not None:
                sys.exit("error: the server exited; see its log")
            time.sleep(0.2)
    server.kill()
    sys.exit("error: the server did not answer within 120 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="saved_models/<name> (default: a tiny export)")
    parser.add_argument("--images",
                        default=str(REPO.parent / "shared/datasets/cats_dogs/validation"),
                        help="images for the valid requests (default: cats_dogs validation, or "
                             "noise when that is not there)")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="valid clients, each sending its next request when answered "
                             "(default: 2; on 2 cores more only queue, and p99 measures that)")
    parser.add_argument("--hostile", type=int, default=4, help="hostile clients (default: 4)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    try:
        model_dir = Path(args.model_dir) if args.model_dir else tiny_export(scratch)
        images = Path(args.images) if Path(args.images).is_dir() else sample_images(scratch)
        log_path = scratch / "server.log"
        with log_path.open("w") as log:
            server, port = start_server(model_dir, log)
        try:
            name = model_dir.name
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{name}/metadata") as r:
                meta = json.loads(r.read())
            version = meta["model_spec"]["version"]
            dims = meta["metadata"]["signature_def"]["signature_def"]["serving_default"][
                "inputs"]["images"]["tensor_shape"]["dim"]
            size = int(dims[1]["size"])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{name}") as r:
                states = json.loads(r.read())["model_version_status"]
            broken = next((s["version"] for s in states if s["state"] == "END"), None)
            singles, files = bodies(images, "serve_bytes", size, 40)
            pixels, _ = bodies(images, "serving_default", size, 8)
            fours = [json.dumps({"signature_name": "serve_bytes", "instances": [
                {"b64": base64.b64encode(f.read_bytes()).decode()} for f in files[i:i + 4]]})
                .encode() for i in range(0, len(files), 4)]
            valid = [body for group in zip(singles, pixels * 5, fours * 4) for body in group]
            hostile = hostile_requests(name, size, broken)

            async def run():
                await soak(port, name, valid, [], args.concurrency, 0, 5)  # warm up
                await asyncio.sleep(2)
                start = rss_mb(server.pid)
                samples, stop = [start], asyncio.Event()
                sampler = asyncio.get_running_loop().create_task(
                    sample_memory(server.pid, samples, stop))
                result = await soak(port, name, valid, hostile, args.concurrency, args.hostile,
                                    args.seconds)
                await asyncio.sleep(5)  # idle: what the server keeps
                stop.set()
                await sampler
                return start, max(samples), rss_mb(server.pid), result

            start, peak, end, (latencies, valid_statuses, hostile_statuses, kinds, elapsed) = \
                asyncio.run(run())
        finally:
            server.terminate()
            server.wait(timeout=60)
        log_text = log_path.read_text(errors="replace")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    latencies.sort()
    statuses = dict(valid_statuses)
    for key, value in hostile_statuses.items():
        statuses[key] = statuses.get(key, 0) + value
    server_errors = sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(json.dumps({
        "bench": "serve_soak", "model": name, "version": version, "seconds": round(elapsed, 1),
        "concurrency": args.concurrency, "hostile_concurrency": args.hostile,
        "requests": sum(statuses.values()),
        "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "5xx": server_errors,
        "valid": {"requests": len(latencies), "statuses": valid_statuses,
                  "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                  "p99_ms": round(1000 * p99, 1), "max_ms": round(1000 * latencies[-1], 1)},
        "hostile": {"requests": sum(hostile_statuses.values()), "by_kind": kinds},
        "rss_mb": {"start": round(start), "peak": round(peak), "end": round(end)},
        "log_tracebacks": log_text.count("Traceback"),
        "targets": {"no_5xx": server_errors == 0, "valid_p99_under_1s": p99 < 1.0,
                    "rss_end_within_20pct": end <= 1.2 * start}}))


if __name__ == "__main__":
    main()
