import functools
import http.server
import threading
import zipfile

import pytest

from conftest import make_dataset, split_of
from transfer import data
from transfer.check import list_images


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
        assert len(list_images(folder).images) == 10

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


def test_stratified_split_is_seeded_and_disjoint(dataset):
    split = split_of(dataset / "train", ["horizontal", "vertical"])
    train, val = data.stratified_split(split, 0.25, seed=3)
    again, _ = data.stratified_split(split, 0.25, seed=3)
    assert train == again
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(split.paths)
    assert sorted(val.labels) == [0, 0, 1, 1]


def test_class_weights_balance_only_imbalanced_classes():
    assert data.class_weights([0, 0, 1, 1], 2, "auto") is None
    weights = data.class_weights([0] * 8 + [1] * 2, 2, "auto")
    assert weights == {0: 10 / 16, 1: 10 / 4}
    assert 8 * weights[0] == 2 * weights[1]  # each class carries the same total weight
    assert data.class_weights([0, 0, 1, 1], 2, "balanced") == {0: 1.0, 1: 1.0}
    assert data.class_weights([0] * 8 + [1] * 2, 2, "none") is None
    with pytest.raises(ValueError, match="auto, balanced, none"):
        data.class_weights([0, 1], 2, "equal")
