"""How a data set is laid out, found from its folder: the files of each split and their classes.

  class folders   <data>/<class>/*            one pool, split by seed (stratified)
  split folders   <data>/train/<class>/*, with validation/ (or val/, valid/) and/or test/
  label file      --labels FILE.csv|.tsv: columns path,label[,split], paths relative to its folder;
                  a label cell may hold several labels, separated by spaces or ";" (multi-label)
  file names      --label-pattern REGEX: the first group of the file name's match is its class

find_layout() lists the files and check_layout() checks them (transfer.check decodes each
once). Where the layout leaves a split out, data.assign_splits() carves it from the rest.
"""

import csv
import dataclasses
import logging
import os
import re
from pathlib import Path

from transfer.check import (Listing, _checked, cache_file_for, class_names, extra_folders,
                            list_images, scan_split)

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "val", "valid"),
                 "test": ("test",)}
POOL = "images"  # the split of a layout that names none: training, validation and test to be
LABEL_COLUMNS = ("path", "label", "split")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation",
               "valid": "validation", "test": "test"}
LABEL_SEPARATORS = re.compile(r"[;\s]+")  # between the labels of a multi-label cell
# Characters that, joining labels the file also names alone, mean another separator was meant.
OTHER_SEPARATORS = ",|/+&"


@dataclasses.dataclass
class Layout:
    """A data set as listed, before any file is decoded."""

    kind: str  # "class folders", "split folders", "label file" or "file names"
    root: Path  # the folder its files are under (a label file's own folder)
    classes: list
    splits: dict  # {split name: (folder named in messages, {class, or None: check.Listing})}
    unused: list = dataclasses.field(default_factory=list)  # images under no label-file row
    source: str = ""  # what to name in messages: the folder, label file or pattern
    # Several labels per image (a label file's): each file is listed under each of its labels,
    # and an image with none under None.
    multi_label: bool = False

    def describe(self):
        note = (f"; {len(self.unused)} image(s) in {self.root} under no row of the label file, "
                "not used" if self.unused else "")
        return f"{self.kind}{', multi-label' if self.multi_label else ''} ({self.source}){note}"


def resolve(data, labels=None):
    """(name, folder, label file or None): the data set a run, check or evaluation reads.

    With a label file its folder is the data set's; a relative path is taken from here, or
    else from the data set's folder (`--data pets --labels labels.csv`).
    """
    from transfer.data import resolve_dataset

    if labels is None:
        return (*resolve_dataset(data), None)
    path = Path(labels).expanduser()
    if not path.is_file() and not path.is_absolute() and data is not None:
        beside = resolve_dataset(data)[1] / path
        path = beside if beside.is_file() else path
    if path.is_dir():
        raise ValueError(f"Label file {labels} is a folder; expected a .csv or .tsv file with a "
                         "header row path,label (and optionally split).")
    if not path.is_file():
        raise FileNotFoundError(f"Label file {labels} does not exist; expected a .csv or .tsv "
                                "file with a header row path,label (and optionally split).")
    return path.resolve().parent.name, path.parent, path


def find_layout(data_dir, labels=None, label_pattern=None, classes=None, multi_label=None):
    """The Layout of data_dir: from a label file, a file-name pattern, or its folders.

    classes: the names a model already has (evaluation); files of any other class are an
    error. None: the classes are what the data set holds. multi_label: whether a label
    file's cells hold several labels; None: detected (any cell with more than one).
    """
    data_dir = Path(data_dir)
    if labels is not None and label_pattern is not None:
        raise ValueError("--labels and --label-pattern both give the classes; use one.")
    if labels is not None:
        return _label_file(Path(labels), classes, multi_label)
    if multi_label:
        raise ValueError("--multi-label needs a label file: give --labels FILE.csv whose label "
                         "cells hold an image's labels, separated by spaces or ';'. Folders "
                         "and file names give one class per image.")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} does not exist; expected {data_dir}/<class>/*.jpg.")
    if label_pattern is not None:
        return _file_names(data_dir, label_pattern, classes)
    if classes is not None:  # a model's images to evaluate: class folders
        return _class_folders(data_dir, classes)
    folders = sorted(p.name for p in data_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    split_folders = [name for name in folders if name in SPLIT_NAMES]
    if not split_folders:
        return _class_folders(data_dir, classes)
    others = sorted(set(folders) - set(split_folders))
    if others:
        raise ValueError(f"{data_dir} has both split folders ({', '.join(split_folders)}) and "
                         f"class folders ({', '.join(others)}) at the top; expected one layout: "
                         f"{data_dir}/train/<class>/* or {data_dir}/<class>/*. Move the class "
                         "folders into train/, or the split folders out, or give --labels.")
    return _split_folders(data_dir, split_folders, classes)


def _class_folders(data_dir, classes):
    given = classes is not None  # a model's: its classes need not all be here
    if classes is None:
        classes = class_names(data_dir)
    extra = extra_folders(data_dir, classes)
    if extra:
        raise ValueError(f"{data_dir} has folder(s) {', '.join(extra)} that are not classes of "
                         f"the model ({', '.join(classes)}); expected {data_dir}/<class>/*.jpg "
                         "(for a data set of split folders, give its validation/ or test/ "
                         "folder).")
    listings = scan_split(data_dir, classes, require_all=not given)
    return Layout("class folders", data_dir, classes, {POOL: (data_dir, listings)},
                  source=str(data_dir))


def _split_folders(data_dir, present, classes):
    found = {}
    for split, aliases in SPLIT_FOLDERS.items():
        given = [name for name in aliases if name in present]
        if len(given) > 1:
            raise ValueError(f"{data_dir} has {' and '.join(f'{n}/' for n in given)}: both are "
                             f"the {split} split. Keep one.")
        if given:
            found[split] = data_dir / given[0]
    if "train" not in found:
        raise ValueError(f"{data_dir} has {', '.join(f'{n}/' for n in present)} but no train/; "
                         f"expected {data_dir}/train/<class>/*.jpg (or class folders at the top: "
                         f"{data_dir}/<class>/*.jpg).")
    given = classes is not None
    if classes is None:
        classes = class_names(found["train"])
    seen_files = {}  # every split is listed before any is checked: a link may move
    splits = {split: (folder, scan_split(folder, classes, split == "train" and not given,
                                         seen_files))
              for split, folder in found.items()}
    return Layout("split folders", data_dir, classes, splits,
                  source=", ".join(f"{folder.name}/" for folder in found.values()))


def _file_names(data_dir, pattern, classes):
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"--label-pattern {pattern!r} is not a regular expression: "
                         f"{error}.") from None
    if regex.groups < 1:
        raise ValueError(f"--label-pattern {pattern!r} has no group; its first group must "
                         r"capture the class, as in '^(.*)_\d+\.\w+$'.")
    listing = list_images(data_dir)
    by_class, outside = {}, Listing(skipped=listing.skipped, problems=list(listing.problems))
    for path in listing.images:
        match = regex.search(path.name)
        label = match.group(1) if match else None
        if not label:
            outside.problems.append((path, f"file name does not match --label-pattern "
                                           f"{pattern}: not used"))
        else:
            by_class.setdefault(label, []).append(path)
    return _labelled("file names", data_dir, {POOL: by_class}, outside, classes,
                     f"--label-pattern {pattern}", f"--label-pattern over {data_dir}")


def _label_file(path, classes, multi_label=None):
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"Label file {path} must end in .csv or .tsv; received "
                         f"{path.suffix or 'no suffix'}.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    header = [name.strip().lower() for name in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise ValueError(f"Label file {path} must start with a header row naming its columns "
                         f"path,label (and optionally split); received "
                         f"{','.join(rows[0]) if rows else 'an empty file'}.")
    unknown = [name for name in header if name not in LABEL_COLUMNS]
    if unknown or len(set(header)) < len(header):
        raise ValueError(f"Label file {path} has column(s) {', '.join(unknown or header)}; "
                         f"expected each of {', '.join(LABEL_COLUMNS)} once (split optional).")
    root = path.parent
    outside, named, mentioned = Listing(), {}, set()
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = dict(zip(header, (cell.strip() for cell in row)))
        where = f"{path.name} line {number}"
        file = cells.get("path", "")
        label = cells.get("label", "")
        split = SPLIT_NAMES.get(cells.get("split", "").lower()) if "split" in header else POOL
        target = Path(os.path.normpath(root / file)) if file else None
        if not file:
            raise ValueError(f"{where} has no path; every row names a file.")
        if split is None:
            raise ValueError(f"{where} has split {cells.get('split')!r}; expected train, "
                             "validation or test.")
        if Path(file).is_absolute() or not target.is_relative_to(os.path.normpath(root)):
            outside.problems.append((root / file, f"outside the label file's folder ({where}): "
                                                  "not used; give paths relative to it"))
            continue
        mentioned.add(os.path.realpath(target))
        if target in named and named[target][:2] != (label, split):
            raise ValueError(f"{path} names {file} twice with different labels or splits "
                             f"(line {named[target][2]}: {named[target][0]}, {named[target][1]}; "
                             f"line {number}: {label}, {split}); keep one row per file.")
        named.setdefault(target, (label, split, number))
    multi_label = _multi_label(path, named, multi_label)
    labels_of, unlabelled = {}, {}
    for target, (label, split, number) in named.items():
        cells = label_set(label) if multi_label else ([label] if label else [])
        if not cells and not multi_label:
            outside.problems.append((target, f"empty label ({path.name} line {number}): not "
                                             "used"))
        elif not cells:  # an image of none of the labels: a negative for every one
            unlabelled.setdefault(split, []).append(target)
        for name in cells:
            labels_of.setdefault(split, {}).setdefault(name, []).append(target)
    _check_separators(path, named, {name for by_label in labels_of.values() for name in by_label},
                      multi_label)
    unused = [p for p in list_images(root).images if os.path.realpath(p) not in mentioned]
    layout = _labelled("label file", root, labels_of, outside, classes, str(path), str(path),
                       unlabelled)
    layout.unused, layout.multi_label = unused, multi_label
    return layout


def label_set(cell):
    """The labels of a multi-label cell, in order, each once: separated by spaces or ';'."""
    return list(dict.fromkeys(name for name in LABEL_SEPARATORS.split(cell) if name))


def _multi_label(path, named, wanted):
    """Whether the label file's cells are read as sets of labels: as `wanted`, or (None)
    when any cell holds more than one, which is logged."""
    if wanted is not None:
        return wanted
    several = next(((label, number) for label, _, number in named.values()
                    if len(label_set(label)) > 1), None)
    if several is None:
        return False
    log.info("%s line %d holds %d labels (%s): each image may carry several labels; training "
             "multi-label, a sigmoid per label. --no-multi-label reads each cell as one class "
             "name.", path.name, several[1], len(label_set(several[0])), several[0])
    return True


def _check_separators(path, named, names, multi_label):
    """ValueError for a label that is other labels of the file joined by a character that
    does not separate labels (cat,dog or cat|dog where cat and dog are labels)."""
    for label, _, number in named.values():
        for name in label_set(label) if multi_label else [label]:
            for mark in OTHER_SEPARATORS:
                parts = [part for part in name.split(mark) if part]
                if len(parts) > 1 and all(part in names for part in parts):
                    raise ValueError(
                        f"{path.name} line {number} has the label {name!r}: the labels "
                        f"{', '.join(parts)} joined by {mark!r}, which does not separate "
                        "labels. Separate an image's labels with spaces or ';' (e.g. "
                        f"{';'.join(parts)}).")


def _labelled(kind, root, by_split, outside, classes, source, where, unlabelled=None):
    """A Layout from {split: {label: [paths]}}; files outside any class go to `outside`, and
    the images of no label ({split: [paths]}, multi-label) are listed under None."""
    found = sorted({label for by_class in by_split.values() for label in by_class})
    if classes is not None:
        extra = [label for label in found if label not in classes]
        if extra:
            raise ValueError(f"{where} names label(s) {', '.join(extra)} that are not classes "
                             f"of the model ({', '.join(classes)}).")
    else:
        classes = found
        if len(classes) < 2:
            raise ValueError(f"{where} names {len(classes)} class(es) "
                             f"({', '.join(classes) or 'none'}); expected at least two.")
    splits, unlabelled = {}, unlabelled or {}
    for split in [POOL, *SPLIT_FOLDERS]:
        if split in by_split or split in unlabelled:
            listings = {None: Listing(images=unlabelled.get(split, []))}
            listings.update({cls: Listing(images=by_split.get(split, {}).get(cls, []))
                             for cls in classes})
            splits[split] = (root, listings)
    first = next(iter(splits.values()), (root, {None: Listing()}))[1]
    first[None] = Listing(images=first[None].images, skipped=outside.skipped,
                          problems=outside.problems)
    if not splits:
        splits[POOL] = (root, first)
    return Layout(kind, root, classes, splits, source=source)


def check_layout(layout, require_all=True):
    """A check.SplitReport per split (the pool or train first), decoding every file once.

    require_all: every class must have usable images in the pool or train/ (training), else
    ValueError; False for images to evaluate, which may lack some of a model's classes.
    """
    cache = cache_file_for(layout.root)
    return [_checked(split, folder, listings, cache,
                     require_all=require_all and split in (POOL, "train"))
            for split, (folder, listings) in layout.splits.items()]


def check_dataset(data_dir, labels=None, label_pattern=None, multi_label=None):
    """(the Layout of data_dir, its checked SplitReports)."""
    layout = find_layout(data_dir, labels, label_pattern, multi_label=multi_label)
    return layout, check_layout(layout)
