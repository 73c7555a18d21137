"""Leakage check: evaluation images that are also in the training set.

:func:`leakage_report` matches images by id (COCO ids parsed from file names, so
``COCO_val2014_000000123456.jpg`` and ``000000123456.jpg`` are the same image; Flickr photo ids in
Flickr manifests) and by content (sha256 of the file bytes, cached per manifest under
``utils.cache_dir()/hashes/`` keyed by path, size and mtime). The classic case: the Karpathy COCO test
split comes from val2014, most of which is inside train2017.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..utils import atomic_write_json, cache_dir, stable_hash
from .check import iter_progress
from .images import read_image_bytes, split_locator
from .manifest import Manifest, ManifestError, Record, get_reader, load_manifest

_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})\.(?:jpe?g|png)$", re.I)
_FLICKR_NAME = re.compile(r"^(\d{4,})(?:_[0-9a-f]+)?\.jpe?g$", re.I)


def _is_flickr_manifest(manifest: Manifest) -> bool:
    if manifest.format == "flickr8k":
        return True
    text = " ".join(str(x) for x in (manifest.name, manifest.fields.get("records", ""), manifest.fields.get("root", "")))
    return "flickr" in text.lower()


def image_identity(record: Record, flickr: bool = False) -> str | None:
    """A data-set-independent id of a record's image: ``coco:<id>`` from COCO file names (2014 and 2017
    namings agree: ``000000123456.jpg`` = ``COCO_val2014_000000123456.jpg``); with ``flickr=True``,
    ``flickr:<photo id>`` from Flickr file names (``1000092795.jpg``, Flickr8k's
    ``1000268201_693b08cb0e.jpg``). None otherwise. Only file names count, not the ids inside a
    COCO-format JSON: any custom data set may use that format with ids 1, 2, 3..."""
    path, member = split_locator(record.image)
    name = os.path.basename(member if member is not None else path)
    m = _COCO_NAME.match(name)
    if m:
        return f"coco:{int(m.group(1))}"
    if flickr:
        m = _FLICKR_NAME.match(name)
        if m:
            return f"flickr:{int(m.group(1))}"
    return None


def _hash_cache_path(manifest: Manifest) -> Path:
    key = stable_hash({"manifest": str(Path(manifest.path).resolve()), "root": str(manifest.root)})
    return cache_dir() / "hashes" / f"{key}.json"


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def image_hashes(manifest: Manifest, records: Sequence[Record], progress: bool = False,
                 save_every: int = 5000) -> dict[str, str]:
    """sha256 of each record's image bytes (missing images left out), cached per manifest under
    ``cache_dir()/hashes/`` keyed by image path (or shard::member), file size and mtime."""
    cache_file = _hash_cache_path(manifest)
    entries: dict[str, list] = {}
    if cache_file.is_file():
        try:
            entries = json.loads(cache_file.read_text(encoding="utf-8")).get("entries", {})
        except (ValueError, OSError):
            entries = {}
    out: dict[str, str] = {}
    dirty = 0
    images = list(OrderedDict.fromkeys(r.image for r in records))
    for image in iter_progress(images, progress, len(images), f"hashing {manifest.name}"):
        path, _ = split_locator(image)
        stamp = _file_stamp(path)
        if stamp is None:
            continue
        hit = entries.get(image)
        if hit and hit[0] == stamp[0] and hit[1] == stamp[1]:
            out[image] = hit[2]
            continue
        try:
            digest = hashlib.sha256(read_image_bytes(image)).hexdigest()
        except ManifestError:
            continue
        entries[image] = [stamp[0], stamp[1], digest]
        out[image] = digest
        dirty += 1
        if dirty >= save_every:
            atomic_write_json(cache_file, {"manifest": str(manifest.path), "entries": entries})
            dirty = 0
    if dirty:
        atomic_write_json(cache_file, {"manifest": str(manifest.path), "entries": entries})
    return out


@dataclass
class EvalOverlap:
    """Overlap of one evaluation set with the training set."""

    name: str
    manifest: str
    num_images: int
    overlap: int  # eval images found in the train set by id or by content
    overlap_by_id: int
    overlap_by_hash: int
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (eval image, train image, why)
    overlap_coco_ids: int = 0  # of overlap_by_id, how many are COCO ids

    @property
    def fraction(self) -> float:
        return self.overlap / self.num_images if self.num_images else 0.0

    def warning(self, train_name: str) -> str | None:
        if not self.overlap:
            return None
        hint = (" (after COCO train2017, use COCO 2017 val, not the Karpathy test split drawn from val2014)"
                if self.overlap_coco_ids else "")
        return (f"LEAKAGE: {self.name} overlaps {train_name}: {self.overlap:,} of {self.num_images:,} images "
                f"({100 * self.fraction:.1f}%) are also in the training set ({self.overlap_by_id:,} by image id, "
                f"{self.overlap_by_hash:,} by identical file content). Results on {self.name} are inflated for a "
                f"model trained on {train_name}; evaluate on a disjoint set{hint}.")


@dataclass
class LeakageReport:
    train_name: str
    train_manifest: str
    num_train_images: int
    hash_images: bool
    evals: list[EvalOverlap] = field(default_factory=list)

    @property
    def leaks(self) -> bool:
        return any(e.overlap for e in self.evals)

    @property
    def warnings(self) -> list[str]:
        return [w for e in self.evals if (w := e.warning(self.train_name))]

    def to_dict(self) -> dict:
        return {"train": self.train_name, "train_manifest": self.train_manifest,
                "num_train_images": self.num_train_images, "hash_images": self.hash_images,
                "evals": [{"name": e.name, "manifest": e.manifest, "num_images": e.num_images, "overlap": e.overlap,
                           "overlap_by_id": e.overlap_by_id, "overlap_by_hash": e.overlap_by_hash,
                           "overlap_coco_ids": e.overlap_coco_ids,
                           "fraction": e.fraction, "examples": e.examples, "warning": e.warning(self.train_name)}
                          for e in self.evals]}

    def format(self) -> str:
        how = "image ids and file content (sha256)" if self.hash_images else "image ids only"
        lines = [f"Leakage check: training set {self.train_name} ({self.num_train_images:,} images) against "
                 f"{len(self.evals)} evaluation set(s), by {how}"]
        for e in self.evals:
            status = "LEAK" if e.overlap else "ok"
            lines.append(f"  [{status}] {e.name}: {e.overlap:,} of {e.num_images:,} images in the training set "
                         f"({100 * e.fraction:.1f}%; by id {e.overlap_by_id:,}, by content {e.overlap_by_hash:,})")
            for ev, tr, why in e.examples:
                lines.append(f"      {ev}  ==  {tr}  ({why})")
        for w in self.warnings:
            lines.append("  " + w)
        return "\n".join(lines)


def _as_manifest(m: str | os.PathLike | Manifest, data_root) -> Manifest:
    return m if isinstance(m, Manifest) else load_manifest(m, data_root=data_root)


def leakage_report(train_manifest: str | os.PathLike | Manifest,
                   eval_manifests: str | os.PathLike | Manifest | Sequence[str | os.PathLike | Manifest],
                   data_root: str | os.PathLike | None = None, hash_images: bool = True, *,
                   max_examples: int = 5, progress: bool = False) -> LeakageReport:
    """How many images of each evaluation set are also in the training set (by id and by content).

    Ids: COCO ids parsed from file names (``000000123456.jpg`` = ``COCO_val2014_000000123456.jpg``),
    and Flickr photo ids in Flickr manifests (format flickr8k or
    a name/records/root containing "flickr"; Flickr30K contains Flickr8K's photos). Content: sha256 of
    the image bytes (``hash_images=True``), which also catches copies under other names.
    """
    train = _as_manifest(train_manifest, data_root)
    if isinstance(eval_manifests, (str, os.PathLike, Manifest)):
        eval_manifests = [eval_manifests]
    train_records = list(get_reader(train.format)(train))
    t_flickr = _is_flickr_manifest(train)
    train_ids: dict[str, str] = {}
    for r in train_records:
        ident = image_identity(r, t_flickr)
        if ident is not None:
            train_ids.setdefault(ident, r.image)
    train_hashes: dict[str, str] = {}
    if hash_images:
        for image, digest in image_hashes(train, train_records, progress).items():
            train_hashes.setdefault(digest, image)
    num_train = len({r.image for r in train_records})
    report = LeakageReport(train.name, str(train.path), num_train, hash_images)
    for em in eval_manifests:
        ev = _as_manifest(em, data_root)
        records = list(get_reader(ev.format)(ev))
        e_flickr = _is_flickr_manifest(ev)
        hashes = image_hashes(ev, records, progress) if hash_images else {}
        seen: set[str] = set()
        n = by_id = by_hash = both = coco = 0
        examples: list[tuple[str, str, str]] = []
        for r in records:
            if r.image in seen:
                continue
            seen.add(r.image)
            n += 1
            ident = image_identity(r, e_flickr)
            id_hit = train_ids.get(ident) if ident is not None else None
            digest = hashes.get(r.image)
            hash_hit = train_hashes.get(digest) if digest is not None else None
            by_id += id_hit is not None
            coco += id_hit is not None and ident.startswith("coco:")
            by_hash += hash_hit is not None
            if id_hit is not None or hash_hit is not None:
                both += 1
                if len(examples) < max_examples:
                    why = f"same id {ident}" if id_hit is not None else "identical content (sha256)"
                    examples.append((r.image, id_hit if id_hit is not None else hash_hit, why))
        report.evals.append(EvalOverlap(ev.name, str(ev.path), n, both, by_id, by_hash, examples, coco))
    return report
