"""Writing files so that an interruption never leaves a half-written one behind."""

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def require_writable(folder, what):
    """Make folder and try creating a file in it, before any work is done for it: ValueError
    naming `what` (the option and its value) where it cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {folder} is a file, not a folder; choose another place.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{what}: cannot write in {folder} ({error.strerror or error}); "
                         "choose a folder you can write to.") from None


def cache_home():
    """$TRANSFER_CACHE_HOME, else $XDG_CACHE_HOME/transfer or ~/.cache/transfer."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transfer"
    return Path(os.environ.get("TRANSFER_CACHE_HOME", default))


def write_atomic(path, text):
    """Write text as UTF-8; a file name that is not UTF-8 (set aside by the check, so only
    ever in reports) is written with backslash escapes."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_npz(path, *arrays, **named):
    """NumPy arrays as one .npz file (arr_0, arr_1, ... and the named ones)."""
    import numpy as np

    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, *arrays, **named)


def write_json(path, value):
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def write_csv(path, header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())
