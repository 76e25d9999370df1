"""Prediction throughput against a one-at-a-time loop and the model's raw forward speed.

On the same SavedModel and images, in one run, each figure the median of --repeats:
- predict_images_per_s: what predict.py runs (transfer.predict.predict_paths: batches of 32,
  threads decoding one batch ahead), model loaded; predict_cli_s: `python predict.py` end to
  end, start-up included.
- loop_images_per_s: the plain loop: decode one image, call the signature on it, repeat.
- raw_images_per_s: the signature on random [32, H, W, 3] tensors, nothing decoded.
- decode_images_per_s: decoding alone, with predict's threads: the other cost predict pays.
- model_cpu_ms_per_image, decode_cpu_ms_per_image: the CPU time (all threads) each of those
  two costs per image; ceiling_images_per_s: the most any pipeline could reach, with every
  core busy doing only that work (and no more than raw), and ceiling_ratio_to_raw its ratio.
Target: predict_images_per_s >= 0.8 x raw_images_per_s.

With --also BACKBONE, the same figures for a second, randomly initialised classifier of that
backbone (exported to a temporary folder): the throughput does not depend on the weights.

    python bench/predict_speed.py --model saved_models/cats_dogs --also mobilenetv2
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.8


def timed(function, repeats):
    """Median wall seconds of function() over repeats."""
    return timed_with_cpu(function, repeats)[0]


def timed_with_cpu(function, repeats):
    """Median (wall seconds, CPU seconds of all this process's threads) of function()."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, started = time.process_time(), time.perf_counter()
        function()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure(model_dir, images_dir, files, loop_count, repeats):
    import numpy as np
    import tensorflow as tf

    from transfer.images import decode_workers, load_image
    from transfer.predict import Predictor, predict_paths

    predictor = Predictor(model_dir)
    size = predictor.image_size
    signature = tf.saved_model.load(str(predictor.path)).signatures["serving_default"]
    list(predict_paths(predictor, files[:64]))  # traced before timing

    def predict_all():
        rows = list(predict_paths(predictor, files))
        if any(row["error"] for row in rows):
            raise SystemExit(f"predict failed on {[r for r in rows if r['error']][:3]}")

    def loop():
        for path in files[:loop_count]:
            signature(images=tf.constant(load_image(path, size)[None].astype("float32")))

    batch = tf.constant(np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)),
                        dtype=tf.float32)
    signature(images=batch)
    raw_batches = max(1, len(files) // 32)

    def raw():
        for _ in range(raw_batches):
            signature(images=batch)

    def decode():
        with concurrent.futures.ThreadPoolExecutor(decode_workers()) as pool:
            list(pool.map(lambda path: load_image(path, size), files))

    cli = [sys.executable, "predict.py", "--model", str(model_dir), str(images_dir)]
    raw_s, raw_cpu_s = timed_with_cpu(raw, repeats)
    decode_s, decode_cpu_s = timed_with_cpu(decode, repeats)
    model_ms, decode_ms = 1000 * raw_cpu_s / (raw_batches * 32), 1000 * decode_cpu_s / len(files)
    # No pipeline beats all cores busy with only the model's and the decoder's work.
    best = min(raw_batches * 32 / raw_s, 1000 * os.cpu_count() / (model_ms + decode_ms))
    result = {
        "model": str(model_dir), "images": len(files), "image_size": size,
        "predict_images_per_s": round(len(files) / timed(predict_all, repeats), 1),
        "loop_images_per_s": round(loop_count / timed(loop, repeats), 1),
        "raw_images_per_s": round(raw_batches * 32 / raw_s, 1),
        "decode_images_per_s": round(len(files) / decode_s, 1),
        "model_cpu_ms_per_image": round(model_ms, 3),
        "decode_cpu_ms_per_image": round(decode_ms, 3),
        "ceiling_images_per_s": round(best, 1),
        "predict_cli_s": round(timed(lambda: subprocess.run(
            cli, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            repeats), 2),
    }
    result["ratio_to_raw"] = round(result["predict_images_per_s"] / result["raw_images_per_s"], 3)
    result["ceiling_ratio_to_raw"] = round(best / result["raw_images_per_s"], 3)
    result["ratio_to_loop"] = round(result["predict_images_per_s"] / result["loop_images_per_s"],
                                    2)
    result["target_met"] = result["ratio_to_raw"] >= TARGET
    return result


def random_export(backbone, classes, folder):
    from transfer.backbones import get_spec
    from transfer.export import export_savedmodel
    from transfer.model import build_classifier

    spec = get_spec(backbone)
    model = build_classifier(spec, len(classes), spec.default_size, weights="none")
    export_savedmodel(model, classes, Path(folder) / backbone)
    return Path(folder) / backbone


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="saved_models/cats_dogs")
    parser.add_argument("--images", default=str(REPO.parent / "shared/datasets/cats_dogs/validation"))
    parser.add_argument("--also", metavar="BACKBONE", help="also measure a random-weight "
                                                          "classifier of this backbone")
    parser.add_argument("--loop-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transfer.predict import Predictor, expand_paths

    files = expand_paths([args.images])[0]
    results = [measure(args.model, args.images, files, args.loop_images, args.repeats)]
    if args.also:
        with tempfile.TemporaryDirectory() as folder:
            exported = random_export(args.also, Predictor(args.model).classes, folder)
            results.append(measure(exported, args.images, files, args.loop_images, args.repeats)
                           | {"backbone": args.also, "weights": "random"})
    print(json.dumps({"bench": "predict_speed", "target_ratio_to_raw": TARGET,
                      "results": results}))


if __name__ == "__main__":
    main()
