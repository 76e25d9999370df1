"""What is in a data set folder, and whether every file in it can be used.

Every candidate file is decoded for real, once: results are cached by path, size,
modification time, inode and permissions, so checking an unchanged folder again is instant.
Files that fail, and folders that cannot be read, are reported with the reason and set aside;
they are moved only by `quarantine()`.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import unicodedata
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: concurrent checks may then lose each other's new verdicts
    fcntl = None

from transfer.files import cache_home, write_atomic
from transfer.images import IMAGE_EXTENSIONS, ImageError, decode_workers, open_rgb

log = logging.getLogger(__name__)

FEW_IMAGES = 10  # a class with fewer training images than this gets a warning
REPEATED_LINK = "repeated link"  # the reason for a second name of a file: used once, elsewhere
UNREADABLE_FOLDER = "folder not readable"
NOT_READABLE = "not readable"  # images.open_rgb's reason for a file this user cannot read


@dataclasses.dataclass
class Listing:
    """The files under one folder: candidate images, skipped files, and link problems."""

    images: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)  # hidden or not an image extension
    problems: list = dataclasses.field(default_factory=list)  # (path, reason)


def list_images(folder, seen_files=None):
    """Walk `folder` for image files, following directory links once and detecting loops.

    seen_files ({real path: (path, its Listing, whether the path is the file itself rather
    than reached through a link)}) is shared by the calls that list one data set, so a file
    linked into two classes or splits is used once: where the file itself is, else at its
    first link.
    """
    listing = Listing()
    folder = Path(folder)
    seen = {os.path.realpath(folder)}
    seen_files = {} if seen_files is None else seen_files
    linked = {folder: False}  # whether a folder was reached through a link below `folder`

    def unreadable(error):  # os.walk would skip the folder and all its files silently
        listing.problems.append((Path(error.filename), f"{UNREADABLE_FOLDER}: "
                                 f"{(error.strerror or str(error)).lower()}; its files are "
                                 "not used"))

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        root = Path(root)
        for name in sorted(dirs):
            real = os.path.realpath(root / name)
            if name.startswith("."):
                dirs.remove(name)
            elif real in seen:
                dirs.remove(name)
                listing.problems.append((root / name, f"symlink loop: {real} is already "
                                                      "listed; not followed again"))
            else:
                seen.add(real)
                linked[root / name] = linked[root] or (root / name).is_symlink()
        dirs.sort()
        for name in sorted(files):
            path = root / name
            real = os.path.realpath(path)
            itself = not (linked[root] or path.is_symlink())  # not another name for the file
            if not _image_name(path):
                listing.skipped.append(path)
            elif not _utf8(str(path)):
                listing.problems.append((path, "file name not UTF-8: rename it"))
            elif real in seen_files:
                kept, kept_in, kept_itself = seen_files[real]
                if itself and not kept_itself:  # the file itself wins
                    kept_in.images.remove(kept)
                    kept_in.problems.append((kept, _repeated(path)))
                    seen_files[real] = path, listing, itself
                    listing.images.append(path)
                else:
                    listing.problems.append((path, _repeated(kept)))
            else:
                seen_files[real] = path, listing, itself
                listing.images.append(path)
    return listing


def _image_name(path):
    """Whether a file is one to list: an image extension, and not hidden."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _utf8(text):
    """Whether text (a path, as Python decodes file names) is valid UTF-8: run files such as
    split.csv are written in UTF-8 and read back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text):
    """text with its control characters (newline, tab, escape), invisible format characters
    and line separators as backslash escapes (a newline as \\n), so that a report gives each
    file one line. Other characters, and bytes that are not UTF-8, are left as they are."""
    return "".join(repr(char)[1:-1] if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")
                   else char for char in str(text))


def _repeated(used):
    return f"{REPEATED_LINK}: same file as {used}, which is used once"


def class_names(train_dir):
    """Sorted class folder names under train_dir; ValueError unless there are two or more."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir} does not exist; expected {train_dir}/<class>/*.jpg.")
    names = sorted(p.name for p in _entries(train_dir)
                   if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ValueError(f"{train_dir} has {len(names)} class folder(s) "
                         f"({', '.join(names) or 'none'}); expected at least two: "
                         f"{train_dir}/<class>/*.jpg, one folder per class.")
    return names


def scan_split(split_dir, classes, require_all=True, seen_files=None):
    """{class: Listing} for split_dir/<class>/ of each class, checking the folder layout; the
    files outside any class folder go under the key None (images as problems: not used)."""
    split_dir = Path(split_dir)
    extra = extra_folders(split_dir, classes)
    if extra:
        raise ValueError(f"{split_dir} has class folder(s) {', '.join(extra)} that train/ lacks; "
                         f"expected only {', '.join(classes)}. Add them to train/ or remove them.")
    listings = {None: Listing()}
    for path in sorted(p for p in _entries(split_dir) if not p.is_dir()):
        if not _image_name(path):
            listings[None].skipped.append(path)
        else:
            listings[None].problems.append((path, "outside any class folder: not used; move it "
                                                  "into a class folder"))
    for name in classes:
        folder = split_dir / name
        listings[name] = list_images(folder, seen_files) if folder.is_dir() else Listing()
        unreadable = _unreadable(listings[name])
        if require_all and not listings[name].images and unreadable:
            raise ValueError(f"Class folder {folder} holds no images that can be read: "
                             f"{unreadable} is not readable; make it readable "
                             f"(chmod -R a+rX {folder}) or remove the folder.")
        if require_all and not listings[name].images and not _links_only(listings[name]):
            raise ValueError(f"Class folder {folder} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder.")
    return listings


def extra_folders(folder, classes):
    """Sorted names of the folders in `folder` that are neither hidden nor one of classes."""
    return sorted(p.name for p in _entries(folder)
                  if p.is_dir() and not p.name.startswith(".") and p.name not in classes)


def _entries(folder):
    """The paths in folder; ValueError naming it when it cannot be read."""
    try:
        return list(Path(folder).iterdir())
    except PermissionError as error:
        raise ValueError(f"Folder {folder} cannot be read ({error.strerror.lower()}); make it "
                         f"readable (chmod -R a+rX {folder}) or point at another.") from None


def _unreadable(listing):
    """A folder of the listing that could not be read, or None."""
    return next((path for path, reason in listing.problems
                 if reason.startswith(UNREADABLE_FOLDER)), None)


def _links_only(listing):
    """Whether a listing's images are all links to files another listing uses (_checked
    then says so, once every split is listed)."""
    return any(reason.startswith(REPEATED_LINK) for _, reason in listing.problems)


def check_files(paths, cache_file=None, workers=None):
    """{path: reason or None} for each path, decoding each file unless the cache knows it."""
    cache = _read_cache(cache_file)
    results, todo = {}, []
    for path in paths:
        key = _cache_key(path)
        # A good verdict also needs the file readable now: by this user, through its folders.
        if key is not None and key in cache and (cache[key] is not None
                                                 or os.access(path, os.R_OK)):
            results[path] = cache[key]
        else:
            todo.append(path)

    def attempt(path):
        try:
            open_rgb(path)
            return None
        except ImageError as error:
            return str(error)

    with concurrent.futures.ThreadPoolExecutor(workers or decode_workers()) as pool:
        for path, reason in zip(todo, pool.map(attempt, todo)):
            results[path] = reason
            key = _cache_key(path)
            if key is not None and not (reason or "").startswith(NOT_READABLE):
                cache[key] = reason  # (whether a file can be read depends on who asks)
    if cache_file is not None and todo:
        _write_cache(cache_file, cache)
    return results


@dataclasses.dataclass
class SplitReport:
    """One split of a data set after checking: usable files per class and what was set aside."""

    name: str
    good: dict  # class -> [path]; of a multi-label layout, a file under each of its labels
    bad: list  # (path, reason)
    skipped: list  # paths
    folder: Path | None = None  # where its files are, for messages
    unlabelled: list = dataclasses.field(default_factory=list)  # multi-label: of no label

    def counts(self):
        return {name: len(paths) for name, paths in self.good.items()}

    def images(self):
        """How many usable images the split has (each once, however many labels it has)."""
        return len({path for paths in self.good.values() for path in paths}
                   | set(self.unlabelled))


def check_split(name, split_dir, classes, cache_file=None, require_all=True):
    return _checked(name, split_dir, scan_split(split_dir, classes, require_all), cache_file,
                    require_all)


def _checked(name, split_dir, listings, cache_file, require_all):
    # A multi-label file is listed under each of its labels: decoded and reported once.
    candidates = list(dict.fromkeys(path for listing in listings.values()
                                    for path in listing.images))
    results = check_files(candidates, cache_file)
    good = {cls: [p for p in listing.images if results[p] is None]
            for cls, listing in listings.items() if cls is not None}
    unlabelled = [p for p in listings.get(None, Listing()).images if results[p] is None]
    bad = [(p, results[p]) for p in candidates if results[p] is not None]
    bad += [problem for listing in listings.values() for problem in listing.problems]
    skipped = [p for listing in listings.values() for p in listing.skipped]
    if require_all:
        for cls, paths in good.items():
            if not paths and not listings[cls].images:  # all its files are links used elsewhere
                raise ValueError(f"Class {cls!r} in {split_dir} has no images of its own: its "
                                 "files are links to images another class or split uses. Copy "
                                 "them in, or remove the folder.")
            if not paths:
                raise ValueError(f"Class {cls!r} in {split_dir} has no readable images: all "
                                 f"{len(listings[cls].images)} failed to decode. See "
                                 "`python -m transfer check`.")
    return SplitReport(name, good, bad, skipped, Path(split_dir), unlabelled)


def summary_line(data_name, classes, reports, layout=None):
    """One line: the layout, classes, images per split and class, files set aside and
    skipped."""
    parts = []
    for report in reports:
        counts = ", ".join(f"{cls} {n}" for cls, n in report.counts().items())
        none = f", no label {len(report.unlabelled)}" if report.unlabelled else ""
        parts.append(f"{report.name} {report.images()} ({counts}{none})")
    bad = [reason.split(":")[0] for report in reports for _, reason in report.bad]  # the kind
    reasons = ", ".join(f"{n} {reason}" for reason, n in collections.Counter(bad).most_common())
    skipped = sum(len(report.skipped) for report in reports)
    return (f"{data_name}: {len(classes)} classes; {'; '.join(parts)}; "
            f"{len(bad)} file(s) set aside{f' ({reasons})' if bad else ''}; "
            f"{skipped} non-image or hidden file(s) skipped{f'; from {layout}' if layout else ''}")


def warnings_for(reports):
    """Human warnings about a checked data set: classes with very few images."""
    messages = []
    for report in reports:
        for cls, count in report.counts().items():
            if report.name in ("train", "images") and count < FEW_IMAGES:
                messages.append(f"class {cls!r} has only {count} training image(s); "
                                f"expect a poor classifier below {FEW_IMAGES}")
    return messages


def quarantine(bad, data_dir, target):
    """Move bad files from data_dir into target, keeping their relative paths; never overwrite."""
    moved = []
    for path, reason in bad:
        path = Path(path)
        if path.is_dir() or not (path.is_file() or path.is_symlink()):
            continue  # a looping folder link is reported, not moved
        if reason.startswith(REPEATED_LINK) and not path.is_symlink():
            continue  # reached through a folder link: moving it would move the file in use
        if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(data_dir)):
            continue  # a label file's row naming a file elsewhere: not ours to move
        destination = Path(target) / path.relative_to(data_dir)
        if destination.exists():
            raise FileExistsError(f"{destination} exists; quarantine never overwrites. "
                                  "Choose an empty --quarantine folder.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), destination)
        moved.append((path, destination))
    return moved


def cache_file_for(data_dir):
    """Where check results for data_dir are cached: $TRANSFER_CACHE_HOME or ~/.cache/transfer."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return cache_home() / "checks" / f"{Path(data_dir).resolve().name}-{digest}.json"


def _cache_key(path):
    """What a verdict holds for: the file's path, size and modification time, and which file
    it is (inode) with its permissions and owner, so a chmod or chown checks it again."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|"
            f"{stat.st_mode:o}|{stat.st_uid}|{stat.st_gid}")


def _read_cache(cache_file):
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        log.warning("Ignoring unreadable check cache %s", cache_file)
        return {}


def _write_cache(cache_file, cache):
    """Merge cache into the file, keeping what other checks wrote since it was read: checks
    running at once take turns (a lock file beside it). A cache that cannot be written is
    only a warning: the next check decodes the files again."""
    cache_file = Path(cache_file)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache_file.with_name(cache_file.name + ".lock")):
            write_atomic(cache_file, json.dumps(_read_cache(cache_file) | cache))
    except OSError as error:
        log.warning("Could not write the check cache %s (%s); the next check decodes these "
                    "files again", cache_file, error)


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock on the file at path (created if need be) while in the block."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield
