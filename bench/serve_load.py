"""Load test of `transfer serve`: sustained concurrent :predict requests over loopback.

Starts the server on a free 127.0.0.1 port, sends real images from a folder for --seconds (and
at most --max-requests) from --concurrency clients, and prints one JSON line: requests/s,
p50/p99 latency, errors, and the reference measured in the same run: the same SavedModel
signature called in-process, one image at a time, with no HTTP.

    python bench/serve_load.py --model-dir saved_models/cats_dogs \\
        --images ../shared/datasets/cats_dogs/validation --signature serve_bytes
"""

import argparse
import asyncio
import base64
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bodies(images_dir, signature, size, count):
    from transfer.check import list_images
    from transfer.images import load_image

    files = list_images(images_dir).images[:count]
    if signature == "serve_bytes":
        return [json.dumps({"signature_name": signature, "instances": [
            {"image_bytes": {"b64": base64.b64encode(f.read_bytes()).decode()}}]}).encode()
            for f in files], files
    return [json.dumps({"signature_name": signature,
                        "instances": [load_image(f, size).tolist()]}).encode() for f in files], files


def direct_rate(version_dir, signature, files, size, seconds=10):
    import tensorflow as tf

    from transfer.images import load_image

    fn = tf.saved_model.load(str(version_dir)).signatures[signature]
    if signature == "serve_bytes":
        inputs = [{"image_bytes": tf.constant([f.read_bytes()])} for f in files]
    else:
        inputs = [{"images": tf.constant(load_image(f, size)[None].astype("float32"))}
                  for f in files]
    fn(**inputs[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(**inputs[done % len(inputs)])
        done += 1
    return done / (time.perf_counter() - start)


async def load(url, payloads, concurrency, seconds, max_requests):
    import aiohttp

    latencies, errors, sent = [], 0, 0
    stop = time.perf_counter() + seconds

    async def client(session, offset):
        nonlocal errors, sent
        i = offset
        while time.perf_counter() < stop and sent < max_requests:
            sent += 1
            began = time.perf_counter()
            async with session.post(url, data=payloads[i % len(payloads)]) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - began)
            i += concurrency

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, errors, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default="saved_models/cats_dogs")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/cats_dogs/validation"))
    parser.add_argument("--signature", default="serve_bytes",
                        choices=("serve_bytes", "serving_default"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args()

    from transfer.export import read_asset, versions

    found = versions(args.model_dir)
    if not found:
        sys.exit(f"error: {args.model_dir} holds no SavedModel versions; run `make export` first.")
    version_dir = found[max(found)]
    size = read_asset(version_dir, "config.json")["image_size"]
    payloads, files = bodies(args.images, args.signature, size, 200)
    direct = direct_rate(version_dir, args.signature, files, size)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "transfer", "serve", args.model_dir,
                               "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    name = Path(args.model_dir).name
    try:
        import urllib.request

        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{name}", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
        asyncio.run(load(url, payloads[:8], args.concurrency, 3, 10_000))  # warm up
        latencies, errors, elapsed = asyncio.run(
            load(url, payloads, args.concurrency, args.seconds, args.max_requests))
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    rate = len(latencies) / elapsed
    print(json.dumps({
        "bench": "serve_load", "model": name, "version": max(found), "signature": args.signature,
        "concurrency": args.concurrency, "seconds": round(elapsed, 1), "requests": len(latencies),
        "requests_per_s": round(rate, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
        "errors": errors, "reference": "in-process signature call, one image at a time",
        "direct_images_per_s": round(direct, 1), "ratio_vs_direct": round(rate / direct, 2)}))


if __name__ == "__main__":
    main()
