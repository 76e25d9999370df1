"""Files that cannot be read, runs that share a cache, and names that would break a report.

Permissions mean nothing to root, who reads every file: where these tests run as root, the part
that must be refused runs in a forked process as the user `nobody`, for real.
"""

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import pwd
import shutil
import signal
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset
from transfer import check
from transfer.cache import FeatureStore
from transfer.cli import main


@pytest.fixture
def shared(tmp_path):
    """A folder the user `nobody` may enter (pytest's own tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="transfer-hardening-"))
    folder.chmod(0o755)
    (folder / "cache").mkdir()
    (folder / "cache").chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:  # (a user other than root must open them again)
        if not path.is_symlink() and (path.is_dir() or path.is_file()):
            path.chmod(0o755)
    shutil.rmtree(folder)


def _start(fn, *args, unprivileged=False):
    """Run fn(*args) in a forked process (as `nobody` when unprivileged and this is root)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            if unprivileged and os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            result = ("ok", fn(*args))
        except BaseException:
            result = ("error", traceback.format_exc())
        with os.fdopen(write, "wb") as handle:
            pickle.dump(result, handle)
        os._exit(0)
    os.close(write)
    return pid, read


def _result(child):
    pid, read = child
    with os.fdopen(read, "rb") as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "error":
        pytest.fail(f"in the child process:\n{value}")
    return value


def as_other_user(fn, *args):
    """fn(*args) as a user the chmods below apply to: this one, or `nobody` for root."""
    if os.geteuid() != 0:
        return fn(*args)
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no user nobody to test permissions with")
    import concurrent.futures.thread  # noqa: F401  (nobody cannot import from root's Python)

    Image.init()
    return _result(_start(fn, *args, unprivileged=True))


def _cli(argv, cache_home):
    """(exit status, stdout, stderr) of the command line, with its own check cache."""
    saved = os.environ["TRANSFER_CACHE_HOME"]
    os.environ["TRANSFER_CACHE_HOME"] = str(cache_home)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.environ["TRANSFER_CACHE_HOME"] = saved
    return status, out.getvalue(), err.getvalue()


def _classes(root, per_class=3):
    """root/cats and root/dogs holding per_class pictures each (the class-folder layout)."""
    make_dataset(root / "tmp", classes=("cats", "dogs"), per_class=per_class, validation=0)
    for name in ("cats", "dogs"):
        (root / "tmp" / "train" / name).rename(root / name)
    shutil.rmtree(root / "tmp")
    return root


# Item 6: what cannot be read is reported by name, like any bad file.

def test_check_reports_a_folder_and_a_file_it_cannot_read(shared):
    data = _classes(shared / "pets")
    hidden = data / "cats" / "more"
    hidden.mkdir()
    for image in sorted((data / "dogs").iterdir())[:2]:
        shutil.copy(image, hidden / image.name)
    locked = sorted((data / "dogs").iterdir())[0]
    hidden.chmod(0)
    locked.chmod(0)

    status, out, _ = as_other_user(_cli, ["check", str(data)], shared / "cache")
    lines = out.splitlines()
    assert status == 1
    assert f"{hidden}\tfolder not readable: permission denied; its files are not used" in lines
    assert f"{locked}\tnot readable: permission denied" in lines
    assert ("2 file(s) set aside (1 folder not readable, 1 not readable)" in lines[-1]
            or "2 file(s) set aside (1 not readable, 1 folder not readable)" in lines[-1])


def test_a_class_folder_that_cannot_be_read_is_named_in_the_error(shared):
    data = _classes(shared / "pets")
    (data / "dogs").chmod(0)
    error = as_other_user(_error_of, check.scan_split, data, ["cats", "dogs"])
    assert isinstance(error, ValueError) and str(error).startswith(
        f"Class folder {data / 'dogs'} holds no images that can be read: {data / 'dogs'} is not "
        f"readable; make it readable (chmod -R a+rX {data / 'dogs'}) or remove the folder.")
    data.chmod(0o311)  # the data set's folder itself cannot be listed
    status, _, err = as_other_user(_cli, ["check", str(data)], shared / "cache")
    assert status == 2 and err == (f"error: {data}: Permission denied; check that it exists "
                                   "and that you may read (or write) it.\n")


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as error:
        return error
    return AssertionError("no error")


def test_predict_counts_a_folder_it_cannot_read_as_failed(shared):
    from transfer.predict import expand_paths

    data = _classes(shared / "pets")
    inside = sorted((data / "cats").iterdir())[0]
    (data / "cats").chmod(0)
    paths, problems, _ = as_other_user(expand_paths, [data, inside])
    assert [path.parent.name for path in paths] == ["dogs"] * 3
    assert problems == [(data / "cats", "folder not readable: permission denied; its files "
                                        "are not used"),
                        (inside, "not readable: permission denied")]  # not "does not exist"


def test_a_fifo_or_a_link_to_a_device_is_not_a_regular_file(tmp_path):
    data = _classes(tmp_path / "pets")
    os.mkfifo(data / "cats" / "pipe.jpg")  # reading it would wait for a writer forever
    (data / "cats" / "endless.jpg").symlink_to("/dev/zero")  # and this never ends
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a FIFO or device hung"))
    signal.alarm(60)
    try:
        report = check.check_split("images", data, ["cats", "dogs"])
    finally:
        signal.alarm(0)
    assert {path.name: reason for path, reason in report.bad} == {
        "pipe.jpg": "not a regular file: a FIFO (named pipe)",
        "endless.jpg": "not a regular file: a character device"}
    assert len(report.good["cats"]) == len(report.good["dogs"]) == 3


def test_a_file_whose_permissions_changed_is_checked_again(shared, tmp_path):
    data = _classes(shared / "pets")
    image = sorted((data / "cats").iterdir())[0]
    cache = shared / "cache" / "checks.json"
    assert as_other_user(check.check_files, [image], cache) == {image: None}
    image.chmod(0)  # same size and modification time: only its permissions say
    assert as_other_user(check.check_files, [image], cache) == {
        image: "not readable: permission denied"}
    before = check._cache_key(image)  # a chmod alone changes the key, for root too
    image.chmod(0o644)
    assert check._cache_key(image) != before


# Item 5: runs and checks that share $TRANSFER_CACHE_HOME at the same time.

def _create_entry(root, barrier, value):
    def fill(array):
        barrier.wait(60)  # both processes are writing the same entry now
        array[:] = value

    store = FeatureStore(root, budget=10**8)
    array = store.create("k" * 24, {"what": "test"}, (2, 50, 4), "float32", fill)
    return np.asarray(array).copy()


def test_two_processes_creating_the_same_feature_entry_both_finish(tmp_path):
    barrier = multiprocessing.get_context("fork").Barrier(2)
    children = [_start(_create_entry, tmp_path / "features", barrier, 1.0) for _ in range(2)]
    arrays = [_result(child) for child in children]
    for array in arrays:  # the second to finish uses the first's entry
        np.testing.assert_array_equal(array, np.ones((2, 50, 4), "float32"))
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["k" * 24]
    assert json.loads((tmp_path / "features" / ("k" * 24) / "key.json").read_text()) == {
        "what": "test"}


def _check_with_barrier(paths, cache, barrier):
    real = check.open_rgb
    waited = []

    def decode(path):
        if not waited:
            waited.append(True)
            barrier.wait(60)  # both processes have read the cache and decode now
        return real(path)

    check.open_rgb = decode
    return check.check_files(paths, cache, workers=1)


def test_checks_running_at_once_both_finish_and_keep_each_others_verdicts(tmp_path):
    data = _classes(tmp_path / "pets")
    cats, dogs = (sorted((data / name).iterdir()) for name in ("cats", "dogs"))
    cache = tmp_path / "cache" / "checks.json"
    barrier = multiprocessing.get_context("fork").Barrier(2)
    children = [_start(_check_with_barrier, paths, cache, barrier) for paths in (cats, dogs)]
    assert [_result(child) for child in children] == [dict.fromkeys(cats), dict.fromkeys(dogs)]
    assert len(json.loads(cache.read_text())) == 6  # neither check lost the other's verdicts


def test_a_check_cache_that_cannot_be_written_is_only_a_warning(tmp_path, caplog):
    data = _classes(tmp_path / "pets")
    (tmp_path / "cache").write_text("a file where the cache's folder should be")
    paths = sorted((data / "cats").iterdir())
    assert check.check_files(paths, tmp_path / "cache" / "checks.json") == dict.fromkeys(paths)
    assert "Could not write the check cache" in caplog.text


# Item 7: predict's --output is checked before anything is predicted.

def test_predict_refuses_an_output_folder_it_cannot_write_before_predicting(shared):
    from transfer.quiet import import_tensorflow

    import_tensorflow()  # (as main does first; nobody cannot import from root's Python)
    data = _classes(shared / "pets")
    image = sorted((data / "cats").iterdir())[0]
    locked = shared / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    # No model at all: the folder is refused before the model would even be loaded.
    status, _, err = as_other_user(_cli, ["predict", "--model", str(shared / "no-model"),
                                          str(image), "--output", str(locked / "out.csv")],
                                   shared / "cache")
    assert status == 2
    assert err == (f"error: --output {locked / 'out.csv'}: cannot write in {locked} "
                   "(Permission denied); choose a folder you can write to.\n")
    (shared / "a_file").write_text("")
    status, _, err = _cli(["predict", "--model", str(shared / "no-model"), str(image),
                           "--output", str(shared / "a_file" / "out.csv")], shared / "cache")
    assert status == 2 and err == (f"error: --output {shared / 'a_file' / 'out.csv'}: "
                                   f"{shared / 'a_file'} is a file, not a folder; choose another "
                                   "place.\n")


# Item 9: one line per file in check's report, whatever the name holds.

def test_check_prints_one_line_per_file_whatever_its_name(tmp_path, capsys):
    data = _classes(tmp_path / "pets")
    for name in ("new\nline.jpg", "tab\there.jpg", "escape\x1b[31mred.jpg", "carriage\r.jpg",
                 "right-to-left\u202egpj.exe.jpg"):
        (data / "cats" / name).write_text("not a picture")
    assert main(["check", str(data)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"{data / 'cats'}/{name}\tnot an image" for name in (
        "carriage\\r.jpg", "escape\\x1b[31mred.jpg", "new\\nline.jpg",
        "right-to-left\\u202egpj.exe.jpg", "tab\\there.jpg")]
    assert lines[-1].startswith("pets: 2 classes; images 6 (cats 3, dogs 3); 5 file(s) set aside")
