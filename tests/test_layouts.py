"""Data laid out the ways people keep it: class folders, split folders, label files, file names."""

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE, TINY_SIZE, make_dataset, write_image

from transfer import data
from transfer.cli import main
from transfer.layouts import check_dataset, find_layout


def class_folders(root, per_class=10, classes=("horizontal", "vertical"), seed=0):
    """<root>/<class>/*.png with a LICENSE.txt beside the class folders, as tf_flowers."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{name}_{i:03d}.png", label % 2, rng)
    (root / "LICENSE.txt").write_text("CC-BY 2.0 attributions\n")
    return root


def splits_of(root, test_split=0.0, validation_split=0.2, seed=1, **layout):
    layout, reports = check_dataset(root, **layout)
    splits = data.assign_splits(reports, layout.classes, validation_split, test_split, seed)
    return layout, reports, splits


def names(split):
    return sorted(Path(path).name for path in split.paths)


def test_class_folders_at_the_top_are_split_by_seed_and_stratified(tmp_path):
    root = class_folders(tmp_path / "flowers", per_class=10)
    layout, reports, splits = splits_of(root, test_split=0.2)
    assert layout.kind == "class folders" and layout.classes == ["horizontal", "vertical"]
    assert [report.name for report in reports] == ["images"]
    assert sum(len(report.skipped) for report in reports) == 1  # LICENSE.txt, counted
    assert {name: len(split) for name, split in splits.items()} == {
        "train": 12, "validation": 4, "test": 4}  # 20% of all for each of test and validation
    for split in splits.values():
        assert sorted(np.bincount(split.labels).tolist()) == [len(split) // 2] * 2
    files = [set(split.paths) for split in splits.values()]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    again = splits_of(root, test_split=0.2)[2]
    assert all(again[name] == splits[name] for name in splits)  # the same seed, the same files
    other = splits_of(root, test_split=0.2, seed=2)[2]
    assert set(other["test"].paths) != set(splits["test"].paths)


@pytest.mark.parametrize("alias", ["validation", "val", "valid"])
def test_split_folders_with_each_validation_alias_and_a_test_folder(tmp_path, alias):
    root = make_dataset(tmp_path / "kaggle", per_class=6, validation=3)
    (root / "validation").rename(root / alias)
    shutil.copytree(root / alias, root / "test")
    layout, reports, splits = splits_of(root)
    assert layout.kind == "split folders"
    assert [report.name for report in reports] == ["train", "validation", "test"]
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [12, 6, 6]
    assert all(Path(path).parent.parent.name == "test" for path in splits["test"].paths)
    with pytest.raises(ValueError, match="gives its test images; drop --test-split"):
        splits_of(root, test_split=0.2)


def test_a_data_set_with_both_layouts_at_the_top_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "mixed", per_class=3, validation=0)
    class_folders(root, per_class=2, classes=("cats", "dogs"))
    with pytest.raises(ValueError, match=r"both split folders \(train\) and class "
                                         r"folders \(cats, dogs\) at the top"):
        find_layout(root)
    (tmp_path / "two" / "val").mkdir(parents=True)
    (tmp_path / "two" / "valid").mkdir()
    (tmp_path / "two" / "train").mkdir()
    with pytest.raises(ValueError, match="has val/ and valid/: both are the validation split"):
        find_layout(tmp_path / "two")


def write_labels(path, rows, header=("path", "label"), delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def test_a_label_file_without_a_split_column_gives_the_same_split_as_class_folders(tmp_path):
    root = class_folders(tmp_path / "flowers", per_class=10)
    rows = [(f"{cls}/{path.name}", cls) for cls in ("vertical", "horizontal")  # any order
            for path in sorted((root / cls).iterdir())]
    labels = write_labels(root / "labels.csv", rows[::-1])
    layout, _, by_file = splits_of(root, test_split=0.2, labels=labels)
    assert layout.kind == "label file" and layout.unused == []
    _, _, by_folder = splits_of(root, test_split=0.2)
    assert all(by_file[name] == by_folder[name] for name in by_folder)
    tsv = write_labels(root / "labels.tsv", rows[:-2], delimiter="\t")  # two images in no row
    layout, reports, splits = splits_of(root, labels=tsv)
    assert len(layout.unused) == 2 and "2 image(s)" in layout.describe()
    assert sum(len(split) for split in splits.values()) == 18


def test_a_label_file_with_a_split_column_keeps_its_splits(tmp_path):
    root = class_folders(tmp_path / "pets", per_class=6)
    rows = [(f"{cls}/{path.name}", cls, ("train", "train", "train", "val", "test", "TEST")[i])
            for cls in ("horizontal", "vertical")
            for i, path in enumerate(sorted((root / cls).iterdir()))]
    labels = write_labels(root / "labels.csv", rows, header=("path", "label", "split"))
    layout, reports, splits = splits_of(root, labels=labels)
    assert [report.name for report in reports] == ["train", "validation", "test"]
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [6, 2, 4]


def test_file_name_labels_report_the_files_that_do_not_match(tmp_path, capsys):
    source = class_folders(tmp_path / "flowers", per_class=10)
    pets = tmp_path / "pets" / "images"
    pets.mkdir(parents=True)
    for cls in ("horizontal", "vertical"):  # Oxford-IIIT Pet's naming: <class>_<n>.<ext>
        for i, path in enumerate(sorted((source / cls).iterdir())):
            shutil.copy(path, pets / f"{cls}_{i + 1:03d}.png")
    shutil.copy(path, pets / "notes-about-it.png")
    pattern = r"^(.*)_\d+\.\w+$"
    layout, reports, by_name = splits_of(pets, test_split=0.2, label_pattern=pattern)
    assert layout.kind == "file names" and layout.classes == ["horizontal", "vertical"]
    assert [(path.name, reason.split(":")[0]) for path, reason in reports[0].bad] == [
        ("notes-about-it.png", f"file name does not match --label-pattern {pattern}")]
    _, _, by_folder = splits_of(source, test_split=0.2)
    assert all(len(by_name[name]) == len(by_folder[name]) for name in by_folder)
    assert all([int(n.split("_")[1].split(".")[0]) - 1 for n in names(by_name[split])]
               == [int(n.split("_")[1].split(".")[0]) for n in names(by_folder[split])]
               for split in by_folder)  # the same images, renamed, in the same splits
    assert main(["check", str(pets), "--label-pattern", pattern]) == 1
    out = capsys.readouterr().out
    assert "notes-about-it.png\tfile name does not match" in out
    assert "images 20 (horizontal 10, vertical 10); 1 file(s) set aside" in out
    assert main(["check", str(pets), "--label-pattern", "no-group"]) == 2
    assert "has no group" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("horizontal/a.png,horizontal\n", "must start with a header row naming its columns"),
    ("path,label,colour\n", "has column\\(s\\) colour; expected each of path, label, split"),
    ("", "received an empty file"),
    ("path,label,split\nhorizontal/horizontal_000.png,horizontal,dev\n", "has split 'dev'"),
    ("path,label\nhorizontal/horizontal_000.png,horizontal\n"
     "horizontal/horizontal_000.png,vertical\n", "names horizontal/horizontal_000.png twice"),
])
def test_bad_label_files_are_one_line_errors(tmp_path, capsys, content, message):
    root = class_folders(tmp_path / "pets", per_class=3)
    (root / "labels.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        find_layout(root, labels=root / "labels.csv")
    assert main(["check", "--labels", str(root / "labels.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1


def test_bad_label_rows_are_reported_and_set_aside(tmp_path, capsys):
    root = class_folders(tmp_path / "pets", per_class=3)
    outside = tmp_path / "elsewhere.png"
    shutil.copy(root / "vertical" / "vertical_000.png", outside)
    rows = [("horizontal/horizontal_000.png", "horizontal"), ("horizontal/horizontal_001.png", ""),
            ("vertical/vertical_001.png", "vertical"), ("vertical/gone.png", "vertical"),
            ("../elsewhere.png", "vertical"), (str(outside), "vertical"),
            ("horizontal/horizontal_002.png", "horizontal"),
            ("vertical/vertical_002.png", "vertical")]
    labels = write_labels(root / "labels.csv", rows)
    layout, reports = check_dataset(root, labels=labels)
    reasons = {Path(path).name: reason for path, reason in reports[0].bad}
    assert reasons["horizontal_001.png"].startswith("empty label (labels.csv line 3)")
    assert reasons["gone.png"].startswith("missing")
    assert reasons["elsewhere.png"].startswith("outside the label file's folder")
    assert len([r for r in reasons.values() if r.startswith("outside")]) == 1 and len(
        [p for p, r in reports[0].bad if str(r).startswith("outside")]) == 2
    assert reports[0].counts() == {"horizontal": 2, "vertical": 2}
    assert [path.name for path in layout.unused] == ["vertical_000.png"]  # in no row
    assert main(["check", "--labels", str(labels)]) == 1
    assert "4 file(s) set aside" in capsys.readouterr().out
    (root / "labels.csv").write_text("path,label\nhorizontal/horizontal_000.png,horizontal\n"
                                     "vertical/vertical_000.png,vertical\n"
                                     "vertical/vertical_001.png,vertical\n")
    layout, reports = check_dataset(root, labels=labels)
    with pytest.raises(ValueError, match="horizontal have one image in the data set, too few"):
        data.assign_splits(reports, layout.classes, 0.2, 0.0, 1)


def test_training_with_a_test_split_never_trains_or_chooses_on_it(tiny_config, tmp_path):
    from transfer.pipeline import train
    from transfer.runs import read_split

    root = class_folders(tmp_path / "flowers", per_class=10)
    run_dir = train(tiny_config(data=str(root), test_split=0.2, fine_tune_epochs=1,
                                evaluate=True), verbose=0)
    classes, splits = read_split(run_dir)
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [12, 4, 4]
    assert not set(splits["test"].paths) & (set(splits["train"].paths)
                                             | set(splits["validation"].paths))
    summary = json.loads((run_dir / "summary.json").read_text())
    test_metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert summary["test_accuracy"] == test_metrics["accuracy"] and test_metrics["images"] == 4
    assert test_metrics["split"] == "test"
    page = (run_dir / "report.html").read_text()
    assert "Evaluation on the validation images" in page and 'href="test/report.html"' in page
    assert f"accuracy <b>{summary['test_accuracy']:.4f}</b>" in page
    assert "Evaluation on the test images" in (run_dir / "test" / "report.html").read_text()
    assert json.loads((run_dir / "config.json").read_text())["layout"] == "class folders"


def test_evaluate_reads_a_label_file_or_file_names(trained_run, tmp_path, capsys):
    run_dir, dataset = trained_run
    folder = tmp_path / "holdout"
    folder.mkdir()
    rows = []
    for i, path in enumerate(sorted((dataset / "validation").rglob("*.jpg"))):
        shutil.copy(path, folder / f"{path.parent.name}_{i}.jpg")
        rows.append((f"{path.parent.name}_{i}.jpg", path.parent.name))
    labels = write_labels(folder / "labels.csv", rows)
    assert main(["evaluate", "--model", str(run_dir), "--labels", str(labels),
                 "--output", str(tmp_path / "by_file")]) == 0
    assert main(["evaluate", "--model", str(run_dir), str(folder), "--label-pattern",
                 r"^(.*)_\d+\.jpg$", "--output", str(tmp_path / "by_name")]) == 0
    capsys.readouterr()
    by_file, by_name = (json.loads((tmp_path / out / "metrics.json").read_text())
                        for out in ("by_file", "by_name"))
    assert by_file["images"] == by_name["images"] == 8
    assert by_file["confusion_matrix"] == by_name["confusion_matrix"]
    write_labels(folder / "zebras.csv", [(rows[0][0], "zebras")])
    assert main(["evaluate", "--model", str(run_dir), "--labels",
                 str(folder / "zebras.csv")]) == 2
    assert "zebras that are not classes of the model" in capsys.readouterr().err


def tgz(path, members):
    """A .tar.gz of {name: bytes}, or of tarfile.TarInfo objects for links."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            if isinstance(content, tarfile.TarInfo):
                tar.addfile(content)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def spec_for(archive, folder="flower_photos", **changes):
    settings = dict(url=archive.as_uri(), size=archive.stat().st_size, folder=folder,
                    layout="<class>/*.jpg", sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    return data.Download(**settings | changes)


def test_a_known_tar_archive_is_checked_then_unpacked_safely(tmp_path):
    png = (tmp_path / "x.png")
    write_image(png, 0, np.random.default_rng(0))
    archive = tgz(tmp_path / "flower_photos.tgz", {
        "flower_photos/LICENSE.txt": b"CC-BY", "flower_photos/daisy/1.png": png.read_bytes(),
        "flower_photos/roses/2.png": png.read_bytes()})
    data.download_dataset("flowers", tmp_path / "home" / "flowers", spec_for(archive))
    assert sorted(p.relative_to(tmp_path / "home").as_posix()
                  for p in (tmp_path / "home").rglob("*") if p.is_file()) == [
        "flowers/LICENSE.txt", "flowers/daisy/1.png", "flowers/roses/2.png"]
    with pytest.raises(ValueError, match="has sha256 .*; expected 0000"):
        data.download_dataset("flowers", tmp_path / "home2" / "flowers",
                              spec_for(archive, sha256="0" * 64))
    assert not (tmp_path / "home2" / "flowers").exists()
    escape = tarfile.TarInfo("flower_photos/daisy/evil")
    escape.type, escape.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for members in ({"flower_photos/daisy/evil": escape}, {"flower_photos/../../outside": b"x"}):
        bad = tgz(tmp_path / "bad.tgz", members)
        with pytest.raises(ValueError, match="cannot be unpacked safely"):
            data.download_dataset("flowers", tmp_path / "home3" / "flowers", spec_for(bad))
        assert not (tmp_path / "home3" / "flowers").exists()
        assert not (tmp_path / "outside").exists()
    absolute = tgz(tmp_path / "abs.tgz", {f"{tmp_path}/abs/x.png": b"x"})  # made relative
    with pytest.raises(ValueError, match="has no flower_photos/ folder"):
        data.download_dataset("flowers", tmp_path / "home4" / "flowers", spec_for(absolute))
    assert not (tmp_path / "abs").exists() and not (tmp_path / "home4" / "flowers").exists()


def test_flowers_offline_is_a_clear_failure_with_the_address_and_the_layout(tmp_path,
                                                                           monkeypatch):
    spec = data.KNOWN_DATASETS["flowers"]
    assert spec.sha256 == "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
    monkeypatch.setitem(data.KNOWN_DATASETS, "flowers", dataclasses.replace(
        spec, url="http://127.0.0.1:9/flower_photos.tgz"))
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Could not download data set 'flowers' from "
                                                r"http://127.0.0.1:9/flower_photos.tgz .*"
                                                r"holds <class>/\*.jpg \(daisy, dandelion"):
        data.resolve_dataset("flowers")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_mobilenetv2_on_real_flowers_with_a_test_split(real_flowers, real_mobilenetv2,
                                                      tmp_path):
    """A subset of the real tf_flowers photos, class folders as downloaded, five classes."""
    from transfer.config import resolve
    from transfer.pipeline import train

    subset = tmp_path / "flowers"
    for folder in sorted(p for p in real_flowers.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:60]:
            (subset / folder.name / photo.name).symlink_to(photo)
    shutil.copy(real_flowers / "LICENSE.txt", subset)
    cfg = resolve(None, dict(data=str(subset), backbone="mobilenetv2", test_split=0.2,
                             validation_split=0.1,
                             epochs=8, fine_tune_epochs=2, runs_dir=str(tmp_path / "runs"),
                             evaluate=False))
    run_dir = train(cfg, verbose=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "split.csv", newline="") as handle:
        counts = {}
        for row in csv.DictReader(handle):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    assert counts == {"train": 210, "validation": 30, "test": 60}
    assert summary["test_accuracy"] >= 0.80, summary
