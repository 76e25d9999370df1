"""A real multi-label run: photos of ../shared pasted side by side, two to an image, each
image labelled with the classes of its two photos; `transfer train` on them, judged on a
seeded test split. Prints one JSON line: the per-label table, mAP, micro/macro F1 and
subset accuracy on the test images, and the training time.

Each composite takes two photos, each drawn (without replacement) from cats_dogs (train/ and
validation/, cat or dog) or from flowers (five classes), with even odds between the two data
sets: so an image carries one label (two cats) or two (a cat and a dog, a dog and a tulip, two
different flowers). Each photo is centre-cropped to a square, resized to 224 x 224, and the
two are pasted into one 448 x 224 JPEG.

    python bench/multilabel.py --images 1200 --out /tmp/multilabel
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("TRANSFER_SHARED", REPO.parent / "shared"))
TILE = 224


def sources():
    """{label: [photo paths]} of cats_dogs (both splits) and flowers, by data set."""
    cats_dogs, flowers = SHARED / "datasets" / "cats_dogs", SHARED / "datasets" / "flowers"
    for folder in (cats_dogs, flowers):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing; this bench reads ../shared's photos "
                                    "(set TRANSFER_SHARED to the folder holding datasets/).")
    animals = {label: sorted(p for split in ("train", "validation")
                             for p in (cats_dogs / split / f"{label}s").glob("*.jpg"))
               for label in ("cat", "dog")}
    plants = {folder.name: sorted(folder.glob("*.jpg"))
              for folder in sorted(flowers.iterdir()) if folder.is_dir()}
    return animals, plants


def tile(path):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"), (TILE, TILE),
                            Image.Resampling.BILINEAR)


def build(out, count, seed):
    """Write count composites and out/labels.csv; returns the label file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pools = [{label: list(rng.permutation(paths)) for label, paths in group.items()}
             for group in sources()]
    out.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i in range(count):
        picked = []
        for _ in range(2):
            group = pools[rng.integers(2)]
            label = rng.choice([name for name, left in group.items() if left])
            picked.append((label, group[label].pop()))
        canvas = Image.new("RGB", (2 * TILE, TILE))
        for position, (_, path) in enumerate(picked):
            canvas.paste(tile(path), (position * TILE, 0))
        name = f"composite{i:05d}.jpg"
        canvas.save(out / name, quality=92)
        rows.append(f"{name},{';'.join(sorted({label for label, _ in picked}))}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out / "labels.csv"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--out", default="/tmp/transfer-multilabel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--test-split", type=float, default=0.2)
    args = parser.parse_args()

    from transfer.config import resolve
    from transfer.pipeline import train

    out = Path(args.out)
    labels = (out / "images" / "labels.csv" if (out / "images" / "labels.csv").is_file()
              else build(out / "images", args.images, args.seed))
    cfg = resolve(None, dict(labels=str(labels), backbone=args.backbone,
                             test_split=args.test_split, runs_dir=str(out / "runs")))
    started = time.time()
    run_dir = train(cfg, verbose=2)
    wall = time.time() - started
    test = json.loads((run_dir / "test" / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    table = {label: {key: None if value is None else round(value, 4)
                     for key, value in figures.items()}
             for label, figures in test["per_label"].items()}
    print(json.dumps({"images": args.images, "backbone": args.backbone, "run": str(run_dir),
                      "test_images": test["images"], "per_label": table,
                      "mean_average_precision": round(test["mean_average_precision"], 4),
                      "micro_f1": round(test["micro_f1"], 4),
                      "macro_f1": round(test["macro_f1"], 4),
                      "subset_accuracy": round(test["subset_accuracy"], 4),
                      "train_s": summary["seconds"], "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
