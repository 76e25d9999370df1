import functools
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset
from transfer import data


def test_dataset_by_name_under_transfer_data_home(tmp_path, monkeypatch):
    make_dataset(tmp_path / "home" / "stripes")
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path / "home"))
    name, folder = data.resolve_dataset("stripes")
    assert name == "stripes" and folder == tmp_path / "home" / "stripes"


def test_unknown_dataset_explains_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train/<class>/\*.jpg.*cats_dogs"):
        data.resolve_dataset("flowers")


def test_offline_download_fails_at_once_with_address_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path))
    unreachable = data.Download("http://127.0.0.1:9/cats_and_dogs_filtered.zip", 1, "0", "x")
    monkeypatch.setitem(data.KNOWN_DATASETS, "cats_dogs", unreachable)
    with pytest.raises(FileNotFoundError, match=r"127.0.0.1:9/cats_and_dogs_filtered.zip.*"
                                                r"cats_dogs/train/<class>/\*.jpg"):
        data.resolve_dataset("cats_dogs")
    assert not (tmp_path / "cats_dogs").exists()


def _serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _zip_dataset(tmp_path):
    source = make_dataset(tmp_path / "src" / "pets_filtered", per_class=3, validation=2)
    archive = tmp_path / "www" / "pets.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(source.rglob("*")):
            zipped.write(path, path.relative_to(source.parent))
    return source, archive


def test_download_checks_size_and_checksum_then_unpacks(tmp_path, monkeypatch):
    source, archive = _zip_dataset(tmp_path)
    server = _serve(archive.parent)
    try:
        url = f"http://127.0.0.1:{server.server_port}/pets.zip"
        good = data.Download(url, archive.stat().st_size, data.manifest_sha256(source),
                             "pets_filtered")
        monkeypatch.setitem(data.KNOWN_DATASETS, "pets", good)
        monkeypatch.setenv("TRANSFER_DATA_HOME", str(tmp_path / "home"))
        name, folder = data.resolve_dataset("pets")
        assert sorted(p.name for p in folder.iterdir()) == ["train", "validation"]
        assert len(data.list_images(folder)) == 10

        bad = data.Download(url, archive.stat().st_size, "0" * 64, "pets_filtered")
        monkeypatch.setitem(data.KNOWN_DATASETS, "pets2", bad)
        with pytest.raises(ValueError, match="sha256 manifest"):
            data.resolve_dataset("pets2")
        assert not (tmp_path / "home" / "pets2").exists()
    finally:
        server.shutdown()


@pytest.mark.real
def test_cats_dogs_checksum_matches_the_real_files(real_cats_dogs):
    assert data.manifest_sha256(real_cats_dogs) == data.KNOWN_DATASETS["cats_dogs"].manifest_sha256


def test_folder_problems_are_clear_errors(tmp_path):
    (tmp_path / "one" / "train" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected at least two"):
        data.class_names(tmp_path / "one" / "train")
    root = make_dataset(tmp_path / "ds")
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.scan_split(root / "train", data.class_names(root / "train"))
    (root / "validation" / "zebras").mkdir()
    with pytest.raises(ValueError, match="zebras that train/ lacks"):
        data.scan_split(root / "validation", ["horizontal", "vertical"])


def test_stratified_split_is_seeded_and_disjoint(dataset):
    split = data.scan_split(dataset / "train", ["horizontal", "vertical"])
    train, val = data.stratified_split(split, 0.25, seed=3)
    again, _ = data.stratified_split(split, 0.25, seed=3)
    assert train == again
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(split.paths)
    assert sorted(val.labels) == [0, 0, 1, 1]


def test_load_image_handles_modes_and_reports_bad_files(tmp_path):
    Image.new("RGBA", (10, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (5, 5), 80).save(tmp_path / "gray.jpg")
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:300])

    clear = data.load_image(tmp_path / "clear.png", 8)
    assert clear.shape == (8, 8, 3) and clear.dtype == np.uint8
    assert (clear == 255).all()  # transparent pixels composited on white
    assert (data.load_image(tmp_path / "gray.jpg", 8) == 80).all()
    with pytest.raises(data.ImageError, match="not an image"):
        data.load_image(tmp_path / "notes.jpg", 8)
    with pytest.raises(data.ImageError, match="empty file"):
        data.load_image(tmp_path / "empty.jpg", 8)
    with pytest.raises(data.ImageError, match="cannot decode"):
        data.load_image(tmp_path / "cut.jpg", 8)
    good, bad = data.check_images([tmp_path / n for n in ("gray.jpg", "notes.jpg", "clear.png")], 8)
    assert good == [0, 2] and [path.name for path, _ in bad] == ["notes.jpg"]
