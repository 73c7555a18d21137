"""The ``imagefolder`` format: ``root/<class folder>/<image>``, optionally restricted to a split list.

Class order comes from the manifest's ``classnames``; folders map to classes by ``class_folders`` or
by name (see :func:`read_imagefolder`). :func:`scan_imagefolder` reads the folders without raising on
ones that match no class, so the data check can report them all.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .formats import path_field, read_lines, require_classnames
from .manifest import ClassificationRecord, Manifest, ManifestError, register_reader

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _norm(s: str) -> str:
    return re.sub(r"[^0-9a-z]", "", s.lower())


@dataclass
class ImageFolderScan:
    """What :func:`scan_imagefolder` found: the records, and the folders that match no class."""

    records: list[ClassificationRecord]
    unknown_folders: dict[str, int] = field(default_factory=dict)  # folder key -> number of images
    unknown_examples: dict[str, str] = field(default_factory=dict)  # folder key -> where


class _ClassMatcher:
    """Map a folder key (its path relative to root, posix) to a class index."""

    def __init__(self, manifest: Manifest):
        names = require_classnames(manifest)
        self.n = len(names)
        folders = manifest.fields.get("class_folders")
        self.by_index = folders == "index"
        self.exact: dict[str, int] = {}
        self.normed: dict[str, int] = {}
        if isinstance(folders, list):
            if len(folders) != len(names):
                raise ManifestError(f"{manifest.path}: field 'class_folders' has {len(folders)} entries but "
                                    f"'classnames' has {len(names)}; give one folder per class, in class order")
            self.exact = {str(f).strip("/"): i for i, f in enumerate(folders)}
        elif folders is not None and not self.by_index:
            raise ManifestError(f"{manifest.path}: field 'class_folders' must be a list of folder names or 'index'")
        elif not self.by_index:
            self.exact = {n: i for i, n in enumerate(names)}
            counts: dict[str, int] = {}
            for n in names:
                counts[_norm(n)] = counts.get(_norm(n), 0) + 1
            self.normed = {_norm(n): i for i, n in enumerate(names) if counts[_norm(n)] == 1}
        self.ignore = {str(x).strip("/") for x in (manifest.fields.get("ignore_folders") or [])}
        self.cache: dict[str, int | None] = {}

    def __call__(self, key: str) -> int | None:
        if key in self.cache:
            return self.cache[key]
        label = None
        if self.by_index:
            if re.fullmatch(r"\d+", key) and int(key) < self.n:
                label = int(key)
        elif key in self.exact:
            label = self.exact[key]
        elif self.normed:
            parts = key.split("/")
            candidates = [key]
            while len(parts) > 1 and len(parts[0]) == 1:  # SUN397-style one-letter folders: a/abbey
                parts = parts[1:]
                candidates.append("/".join(parts))
            for c in candidates:
                if c in self.exact:
                    label = self.exact[c]
                    break
                if _norm(c) in self.normed:
                    label = self.normed[_norm(c)]
                    break
        self.cache[key] = label
        return label


def _remap_split_path(rel: str, folder_names: dict) -> str:
    """A split list may name a class folder differently from the disk (UCF-101's testlist says
    ``ApplyEyeMakeup/...``, CoOp's middle-frame folders are ``Apply_Eye_Makeup``): when the listed
    top folder does not exist, use the existing folder with the same letters and digits."""
    if "/" not in rel:
        return rel
    top, rest = rel.split("/", 1)
    if not folder_names or top in folder_names.get("", ()):  # "" holds the set of existing names
        return rel
    other = folder_names.get(_norm(top))
    return f"{other}/{rest}" if other else rel


def scan_imagefolder(manifest: Manifest) -> ImageFolderScan:
    """Read an ``imagefolder`` manifest without raising on folders that match no class."""
    root = manifest.root
    match = _ClassMatcher(manifest)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in (manifest.fields.get("extensions") or IMAGE_EXTENSIONS))
    split = path_field(manifest, "split_file")
    split_ext = manifest.fields.get("split_ext")
    scan = ImageFolderScan([])
    entries: list[tuple[str, str]] = []  # (relative path, where)
    if split is not None:
        if not split.is_file():
            raise ManifestError(f"{manifest.path}: field 'split_file': file not found: {split}")
        folder_names: dict = {}
        if root.is_dir():
            existing = {e.name for e in os.scandir(root) if e.is_dir()}
            for name in existing:
                n = _norm(name)
                folder_names[n] = None if n in folder_names else name  # None: ambiguous
            folder_names[""] = existing
        for lineno, line in read_lines(split):
            rel = line.strip().split()[0].lstrip("/")
            if split_ext:
                ext = split_ext if split_ext.startswith(".") else "." + split_ext
                rel = str(Path(rel).with_suffix(ext)) if Path(rel).suffix.lower() not in exts else rel
            entries.append((_remap_split_path(rel, folder_names), f"{split}:{lineno}"))
    else:
        if not root.is_dir():
            raise ManifestError(f"{manifest.path}: field 'root': folder not found: {root}")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(exts) and not name.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                    entries.append((rel, rel))
    for rel, where in entries:
        key = rel.rsplit("/", 1)[0] if "/" in rel else "."
        if key in match.ignore:
            continue
        label = match(key)
        if label is None:
            scan.unknown_folders[key] = scan.unknown_folders.get(key, 0) + 1
            scan.unknown_examples.setdefault(key, where)
            continue
        source = where if split is not None else str(root / rel)
        scan.records.append(ClassificationRecord(rel, str(root / rel), label, source, {}))
    return scan


@register_reader("imagefolder")
def read_imagefolder(manifest: Manifest) -> list[ClassificationRecord]:
    """Image folders ``root/<class folder>/<image>`` (any depth: the folder key is the image's folder
    relative to ``root``, e.g. ``n01440764`` or SUN397's ``a/abbey``).

    Class order comes from ``classnames``. A folder maps to a class by ``class_folders`` (a list of
    folder keys parallel to ``classnames``, or ``index`` for folders named 0..N-1 as in ImageNet-V2);
    without it, by name: the folder key equals a class name, or equals it after lower-casing and
    dropping everything but letters and digits (``apple_pie`` = ``apple pie``, ``ApplyEyeMakeup`` =
    ``Apply Eye Makeup``), one-letter parent folders ignored (SUN397's ``a/abbey``).
    ``split_file`` restricts the records to a list of image paths relative to ``root`` (DTD's
    labels/test1.txt, Food-101's meta/test.txt, UCF-101's testlist01.txt; only the first
    whitespace-separated token of a line is used, a leading ``/`` is dropped); ``split_ext`` gives
    listed names without (or with another) extension one (``.jpg``, replacing UCF-101's ``.avi``).
    A listed top folder that does not exist is matched to an existing folder with the same letters
    and digits (``ApplyEyeMakeup`` -> ``Apply_Eye_Makeup``). ``ignore_folders`` lists folder keys to skip; ``extensions``
    the image file extensions walked (default common image types).
    An image in a folder matching no class is an error naming the folder: silently dropping images
    would change the accuracy.
    """
    scan = scan_imagefolder(manifest)
    if scan.unknown_folders:
        items = sorted(scan.unknown_folders.items())
        shown = ", ".join(f"{k!r} ({n} images, e.g. {scan.unknown_examples[k]})" for k, n in items[:5])
        raise ManifestError(f"{manifest.path}: {len(items)} image folder(s) under {manifest.root} match no class of "
                            f"'classnames': {shown}{' ...' if len(items) > 5 else ''}. Add the mapping with "
                            f"'class_folders', or list them in 'ignore_folders'")
    return scan.records
