"""Dirty folders: every kind of file people's image folders hold, handled and reported."""

import io
import os
import random
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset, png_header_only
from transfer import check
from transfer.layouts import check_dataset
from transfer.cli import main
from transfer.images import MAX_IMAGE_PIXELS, ImageError, load_image, open_rgb


def _jpeg_bytes(size=(48, 32), color=(200, 30, 30), **save):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _exif_rotated_jpeg(path):
    """A 40x20 picture, left half black and right half white, tagged 'rotate 90 CW'."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(path, "JPEG", exif=exif.tobytes(), quality=95)


def build_dirty_class(folder):
    """Write every good and bad kind of file; returns (good names, {bad name: reason start})."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (30, 20), (10, 120, 250))
    rgb.save(folder / "plain.jpg")
    rgb.save(folder / "lossless.png")
    rgb.save(folder / "bitmap.bmp")
    rgb.save(folder / "modern.webp")
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (16, 16), 90).save(folder / "grayscale.jpg")
    Image.new("P", (16, 16), 3).save(folder / "palette.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(folder / "transparent.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "print_cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(folder / "deep_16bit.png")
    _exif_rotated_jpeg(folder / "phone_rotated.jpg")
    rgb.save(folder / "really_a_png.jpg", "PNG")
    rgb.save(folder / "name with spaces.jpg")
    rgb.save(folder / "chat_été_猫.jpg")
    (folder / "via_link.jpg").symlink_to(folder / "plain.jpg")  # same file twice: used once
    good = ["plain.jpg", "lossless.png", "bitmap.bmp", "modern.webp", "animated.gif",
            "grayscale.jpg", "palette.png", "transparent.png", "print_cmyk.jpg",
            "deep_16bit.png", "phone_rotated.jpg", "really_a_png.jpg", "name with spaces.jpg",
            "chat_été_猫.jpg"]

    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes(size=(64, 64))[:400])
    (folder / "notes.jpg").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    rgb.save(folder / "scan.jpg", "TIFF")
    (folder / "dangling.jpg").symlink_to(folder / "deleted-long-ago.jpg")
    bad = {"zero.jpg": "zero bytes", "truncated.jpg": "truncated", "notes.jpg": "not an image",
           "bomb.png": "too large", "scan.jpg": "unsupported format: TIFF",
           "dangling.jpg": "missing", "via_link.jpg": "repeated link"}

    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "README.txt").write_text("photos of cats")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    bad["loop"] = "symlink loop"
    return good, bad


def test_every_kind_of_file_is_decoded_or_reported(tmp_path):
    good, bad = build_dirty_class(tmp_path / "pets" / "train" / "cats")
    make_dataset(tmp_path / "other", classes=("dogs",), per_class=3, validation=0)
    (tmp_path / "other" / "train" / "dogs").rename(tmp_path / "pets" / "train" / "dogs")
    report = check.check_split("train", tmp_path / "pets" / "train", ["cats", "dogs"])

    assert sorted(p.name for p in report.good["cats"]) == sorted(good)
    reasons = {path.name: reason for path, reason in report.bad}
    assert sorted(reasons) == sorted(bad)
    for name, start in bad.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert sorted(p.name for p in report.skipped) == [".DS_Store", "._plain.jpg", "README.txt",
                                                       "Thumbs.db"]
    for path in report.good["cats"]:
        image = load_image(path, 8)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8


def test_conversions_are_the_documented_ones(tmp_path):
    good, _ = build_dirty_class(tmp_path)
    assert np.asarray(open_rgb(tmp_path / "transparent.png"))[0, 0].tolist() == [255, 127, 127]
    assert np.asarray(open_rgb(tmp_path / "deep_16bit.png"))[0, 0].tolist() == [155, 155, 155]
    cmyk = np.asarray(open_rgb(tmp_path / "print_cmyk.jpg"))[0, 0]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # cyan/magenta ink off: red
    rotated = np.asarray(open_rgb(tmp_path / "phone_rotated.jpg"))
    assert rotated.shape == (40, 20, 3)  # EXIF orientation applied: portrait now
    assert rotated[:15].mean() < 40 and rotated[25:].mean() > 215  # black on top, white below
    assert open_rgb(tmp_path / "animated.gif").size == (16, 16)


def test_decompression_bomb_is_rejected_by_the_pixel_limit_not_by_memory(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    (tmp_path / "big.png").write_bytes(png_header_only(side, side))
    with pytest.raises(ImageError, match="too large"):
        open_rgb(tmp_path / "big.png")


def test_folder_problems_are_clear_errors(tmp_path):
    (tmp_path / "none" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"0 class folder\(s\).*at least two"):
        check.class_names(tmp_path / "none" / "train")
    (tmp_path / "one" / "train" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"1 class folder\(s\) \(cats\)"):
        check.class_names(tmp_path / "one" / "train")
    root = make_dataset(tmp_path / "ds")
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        check.scan_split(root / "train", check.class_names(root / "train"))
    (root / "validation" / "zebras").mkdir()
    with pytest.raises(ValueError, match="zebras that train/ lacks"):
        check.scan_split(root / "validation", ["horizontal", "vertical"])
    (root / "train" / "empty" / "broken.jpg").write_text("nope")
    with pytest.raises(ValueError, match="'empty' .* has no readable images"):
        check.check_split("train", root / "train", check.class_names(root / "train"))


def test_few_images_warn_with_the_count(tmp_path):
    root = make_dataset(tmp_path / "ds", per_class=3)
    reports = [check.check_split("train", root / "train", ["horizontal", "vertical"])]
    assert check.warnings_for(reports) == [
        f"class '{name}' has only 3 training image(s); expect a poor classifier below 10"
        for name in ("horizontal", "vertical")]


def test_check_results_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    good, _ = build_dirty_class(tmp_path / "cats")
    # (A dangling link has no size or time of its own to key on: it is checked every time.)
    paths = [p for p in check.list_images(tmp_path / "cats").images if p.name != "dangling.jpg"]
    cache = tmp_path / "cache.json"
    first = check.check_files(paths, cache)
    decoded = []
    monkeypatch.setattr(check, "open_rgb", lambda path: decoded.append(path))
    assert check.check_files(paths, cache) == first and decoded == []  # nothing decoded again
    (tmp_path / "cats" / "plain.jpg").write_text("replaced by text")
    again = check.check_files(paths, cache)
    assert decoded == [tmp_path / "cats" / "plain.jpg"]  # only the changed file
    assert again[tmp_path / "cats" / "plain.jpg"] is None  # (the stand-in decoder accepted it)


def test_check_cli_reports_counts_and_quarantines_only_on_request(tmp_path, capsys):
    _, bad = build_dirty_class(tmp_path / "pets" / "train" / "cats")
    make_dataset(tmp_path / "pets2", classes=("dogs",), per_class=12, validation=0)
    (tmp_path / "pets2" / "train" / "dogs").rename(tmp_path / "pets" / "train" / "dogs")
    before = sorted(os.listdir(tmp_path / "pets" / "train" / "cats"))

    assert main(["check", str(tmp_path / "pets")]) == 1
    out = capsys.readouterr().out
    assert "pets: 2 classes; train 26 (cats 14, dogs 12); 8 file(s) set aside" in out
    assert "4 non-image or hidden file(s) skipped" in out
    assert sorted(os.listdir(tmp_path / "pets" / "train" / "cats")) == before  # nothing moved

    target = tmp_path / "quarantine"
    assert main(["check", str(tmp_path / "pets"), "--quarantine", str(target)]) == 1
    moved = sorted(p.name for p in (target / "train" / "cats").iterdir())
    assert moved == sorted(set(bad) - {"loop"})
    assert main(["check", str(tmp_path / "pets")]) == 1  # the folder loop is reported, not moved
    assert "1 file(s) set aside (1 symlink loop)" in capsys.readouterr().out


def _mutations(seed_bytes, count, rng):
    for _ in range(count):
        data = bytearray(seed_bytes)
        kind = rng.randrange(5)
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncate
            data = data[:rng.randrange(len(data))]
        elif kind == 2:  # splice in junk
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        elif kind == 3:  # random bytes with a JPEG or PNG signature
            data = bytearray(rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"])
                             + bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000))))
        else:  # pure noise
            data = bytearray(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))
        yield bytes(data)


def test_fuzzed_files_are_decoded_or_reported_never_crash_or_hang(tmp_path, capsys):
    rng = random.Random(7)
    seeds = [_jpeg_bytes(), _jpeg_bytes(size=(64, 40), progressive=True),
             _jpeg_bytes(size=(33, 17), quality=30)]
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for i, blob in enumerate(b for seed in seeds for b in _mutations(seed, 100, rng)):
        (folder / f"case_{i:03d}.jpg").write_bytes(blob)
    paths = sorted(folder.iterdir())

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the image loader hung"))
    signal.alarm(120)
    try:
        outcomes = check.check_files(paths)
        assert len(outcomes) == 300
        for path in paths:
            try:
                assert load_image(path, 16).shape == (16, 16, 3)
                assert outcomes[path] is None
            except ImageError as error:
                assert outcomes[path] == str(error)
    finally:
        signal.alarm(0)
    failed = sum(reason is not None for reason in outcomes.values())
    assert 0 < failed < 300


def test_train_and_predict_use_exactly_the_good_files_and_report_exactly_the_bad(tmp_path):
    import csv

    from transfer.config import resolve
    from transfer.predict import Predictor, expand_paths, predict_paths
    from transfer.pipeline import train

    good, bad = build_dirty_class(tmp_path / "pets" / "train" / "cats")
    make_dataset(tmp_path / "more", classes=("dogs",), per_class=12, validation=0)
    (tmp_path / "more" / "train" / "dogs").rename(tmp_path / "pets" / "train" / "dogs")
    cfg = resolve(None, dict(data=str(tmp_path / "pets"), backbone="vgg16", weights="none",
                             image_size=32, epochs=1, fine_tune_epochs=0,
                             runs_dir=str(tmp_path / "runs")))
    run_dir = train(cfg, verbose=0)

    with open(run_dir / "bad_files.csv", newline="") as handle:
        reported = {row["path"].rsplit("/", 1)[1] for row in csv.DictReader(handle)}
    assert reported == set(bad)
    with open(run_dir / "split.csv", newline="") as handle:
        used = [row["path"] for row in csv.DictReader(handle) if row["label"] == "cats"]
    assert sorted(path.rsplit("/", 1)[1] for path in used) == sorted(good)

    paths, problems, _ = expand_paths([tmp_path / "pets" / "train" / "cats"])
    rows = list(predict_paths(Predictor(run_dir), paths, batch_size=5))
    failed = {row["path"].rsplit("/", 1)[1] for row in rows if row["error"]}
    failed |= {path.name for path, _ in problems}
    predicted = sorted(row["path"].rsplit("/", 1)[1] for row in rows if not row["error"])
    assert failed == set(bad)
    assert predicted == sorted(good)


def test_a_file_linked_into_two_classes_or_splits_is_used_once_where_it_is(tmp_path):
    data_dir = make_dataset(tmp_path / "pets", classes=("cats", "dogs"), per_class=3, validation=1)
    dog = sorted((data_dir / "train" / "dogs").iterdir())[0]
    (data_dir / "train" / "cats" / "a_link.png").symlink_to(dog)  # listed before the dog itself
    (data_dir / "validation" / "dogs" / "leaked.png").symlink_to(dog)
    cat = sorted((data_dir / "validation" / "cats").iterdir())[0]
    (data_dir / "train" / "cats" / "from_validation.png").symlink_to(cat)
    train, validation = check_dataset(data_dir)[1]
    assert dog in train.good["dogs"] and cat in validation.good["cats"]
    assert {path.name: reason for path, reason in train.bad + validation.bad} == {
        "a_link.png": f"repeated link: same file as {dog}, which is used once",
        "leaked.png": f"repeated link: same file as {dog}, which is used once",
        "from_validation.png": f"repeated link: same file as {cat}, which is used once"}
    assert all(path.name not in ("a_link.png", "leaked.png", "from_validation.png")
               for report in (train, validation) for paths in report.good.values()
               for path in paths)


def test_a_folder_link_into_another_class_leaves_its_files_where_they_are(tmp_path, capsys):
    data_dir = make_dataset(tmp_path / "pets", classes=("cats", "dogs"), per_class=3, validation=0)
    sub = data_dir / "train" / "dogs" / "sub"
    sub.mkdir()
    for image in sorted((data_dir / "train" / "dogs").glob("*.*"))[:2]:
        image.rename(sub / image.name)
    (data_dir / "train" / "cats" / "more").symlink_to(sub, target_is_directory=True)
    train, = check_dataset(data_dir)[1]
    assert train.counts() == {"cats": 3, "dogs": 3}  # the dogs in sub/ stay dogs
    assert sorted(p.parent.name for p, _ in train.bad) == ["more", "more"]
    assert main(["check", str(data_dir), "--quarantine", str(tmp_path / "q")]) == 1
    assert len(list(sub.iterdir())) == 2  # not moved away through the link
    capsys.readouterr()


def test_a_file_name_that_is_not_utf8_is_set_aside_and_reported(tmp_path, capsysbinary):
    from transfer.files import write_csv

    data_dir = make_dataset(tmp_path / "pets", classes=("cats", "dogs"), per_class=3, validation=0)
    source = sorted((data_dir / "train" / "cats").iterdir())[0]
    shutil.copy(source, os.fsencode(data_dir / "train" / "cats") + b"/caf\xe9.png")
    train, = check_dataset(data_dir)[1]
    assert train.counts() == {"cats": 3, "dogs": 3}
    assert [(path.name, reason) for path, reason in train.bad] == [
        ("caf\udce9.png", "file name not UTF-8: rename it")]
    write_csv(tmp_path / "bad_files.csv", ["path", "reason"], train.bad)  # as train writes it
    assert "caf\\udce9.png" in (tmp_path / "bad_files.csv").read_text(encoding="utf-8")
    assert main(["check", str(data_dir)]) == 1
    out = capsysbinary.readouterr().out  # the name printed as it is: not UTF-8
    assert b"/caf\xe9.png\tfile name not UTF-8" in out
    assert b"1 file(s) set aside (1 file name not UTF-8)" in out


@pytest.mark.parametrize("linked, real", [("cats", "dogs"), ("dogs", "cats")])
def test_a_class_of_only_links_to_another_class_is_a_clear_error(tmp_path, linked, real):
    data_dir = make_dataset(tmp_path / "pets", classes=("cats", "dogs"), per_class=2, validation=0)
    for image in (data_dir / "train" / linked).iterdir():
        image.unlink()
    (data_dir / "train" / linked / "x.png").symlink_to(sorted((data_dir / "train" / real)
                                                              .iterdir())[0])
    with pytest.raises(ValueError, match=f"'{linked}' in .* has no images of its own: its "
                                         "files are links to images another class or split uses"):
        check_dataset(data_dir)[1]
