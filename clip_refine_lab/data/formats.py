"""Readers for real data formats, registered with :func:`clip_refine_lab.data.register_reader`.

Importing this module registers every reader below; :func:`clip_refine_lab.data.get_reader` does that
lazily the first time a manifest names a format that ``data.py`` does not know. Every reader yields
the same :class:`~clip_refine_lab.data.CaptionRecord` / :class:`~clip_refine_lab.data.ClassificationRecord`,
so training and evaluation never see the on-disk format. ``data_manifests/README.md`` documents the
fields of each format with an example; :data:`FORMAT_SPECS` is the machine-readable version that
:func:`clip_refine_lab.datacheck.validate_manifest_fields` checks manifests against.

Caption formats: ``coco`` (COCO captions JSON), ``karpathy`` (dataset_flickr30k.json-style JSON),
``flickr8k`` (Flickr8k.token.txt + a split list), ``csv``/``tsv``/``table`` (CSV, TSV or JSONL with a
column mapping), ``webdataset`` (img2dataset tar shards).
Classification formats: ``imagefolder`` (``root/<class>/*.jpg``, optional split list), ``csv``
(path,label), ``labels_txt`` (whitespace-separated "image label" lists such as FGVC-Aircraft's and
Oxford Pets'), ``cub200`` (CUB_200_2011's own index files), ``stanford_cars`` (the devkit's .mat
annotations), ``flowers102`` (imagelabels.mat + setid.mat), ``webdataset`` (``.cls`` members).

Conventions
-----------
* Path-valued fields of a format (``split_file``, ``shards``, ...) are resolved like ``root`` and
  ``records``: relative to the manifest's folder unless absolute, with ``${CLIP_REFINE_LAB_DATA}``
  replaced by the data root (the ``data_root`` given to ``load_manifest`` where it can be recovered,
  else the environment variable).
* Readers raise :class:`~clip_refine_lab.data.ManifestError` naming the file, the line or JSON record,
  and the field when the input is *structurally* broken (unparseable JSON, a missing key, an
  annotation pointing at an unknown image id, a class name not in ``classnames``). Problems with the
  *content* of a record (a missing or corrupt image file, an empty caption, a label out of range)
  are left for :func:`clip_refine_lab.datacheck.check_manifest` to report, and for the trainer to
  skip with :func:`clip_refine_lab.datacheck.is_readable`.
* WebDataset samples are addressed as ``"<shard path>::<member name>"``; :func:`open_image` and
  :func:`read_image_bytes` read them (and plain paths).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .manifest import (
    DATA_ROOT_ENV,
    CaptionRecord,
    ClassificationRecord,
    Manifest,
    ManifestError,
    Record,
    expand_path,
    load_image,
    register_reader,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOCATOR_SEP = "::"

# Fields every manifest may carry, whatever its format.
COMMON_FIELDS = ("name", "kind", "format", "root", "source", "layout", "description", "notes", "license",
                 "citation", "homepage", "classnames", "templates", "filtered_from", "filter",
                 "task", "style",  # task/style: written by the synthetic world (clip_refine_lab.world)
                 "probe")  # a classification set reported apart from the zero-shot average (data.Manifest.is_probe)


@dataclass(frozen=True)
class FormatSpec:
    """What a format needs in a manifest: kinds it supports, required and optional fields."""

    kinds: tuple[str, ...]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    doc: str = ""


FORMAT_SPECS: dict[str, FormatSpec] = {
    "jsonl": FormatSpec(("captions", "classification"), ("records",), (),
                        "one JSON object a line: {id, image, captions|caption} or {id, image, label}"),
    "coco": FormatSpec(("captions",), ("records",), (), "COCO captions JSON (images + annotations)"),
    "karpathy": FormatSpec(("captions",), ("records",), ("split",),
                           "Karpathy split JSON (dataset_coco/flickr8k/flickr30k.json)"),
    "flickr8k": FormatSpec(("captions",), ("records",), ("split_file",),
                           "Flickr8k.token.txt ('img.jpg#0<TAB>caption') + a split image list"),
    "csv": FormatSpec(("captions", "classification"), ("records",), ("columns", "delimiter", "label_by"),
                      "CSV/TSV/JSONL table: image path + caption(s), or image path + label"),
    "webdataset": FormatSpec(("captions", "classification"), ("shards",),
                             ("image_ext", "caption_ext", "label_ext", "num_samples"),
                             "WebDataset tar shards ({key}.jpg + {key}.txt [+ {key}.json]), as img2dataset writes them; "
                             "num_samples: the sample count of all shards together (the streaming trainer's epoch length)"),
    "imagefolder": FormatSpec(("classification",), (), ("class_folders", "split_file", "split_ext", "ignore_folders",
                                                        "extensions"),
                              "root/<class folder>/<image>, optionally restricted to a split list"),
    "labels_txt": FormatSpec(("classification",), ("records",), ("image_pattern", "image_column", "label_column",
                                                                 "label_by", "index_base", "maxsplit"),
                             "whitespace-separated 'image label' lines (FGVC-Aircraft, Oxford Pets)"),
    "cub200": FormatSpec(("classification",), (), ("split",), "CUB_200_2011 (images.txt, image_class_labels.txt, "
                                                              "train_test_split.txt)"),
    "stanford_cars": FormatSpec(("classification",), ("records",), (), "Stanford Cars devkit .mat annotations"),
    "flowers102": FormatSpec(("classification",), (), ("split",), "Oxford Flowers-102 (imagelabels.mat, setid.mat, jpg/)"),
}
FORMAT_SPECS["tsv"] = FORMAT_SPECS["csv"]
FORMAT_SPECS["table"] = FORMAT_SPECS["csv"]


ZERO_SHOT_DATA = Path(__file__).parent / "zero_shot_data"


def zero_shot_metadata(name: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a classification set of data_manifests/ by its name (``imagenet1k``,
    ``cars``, ``cub200``, ...), from the copies shipped in ``clip_refine_lab/zero_shot_data/``."""
    names = json.loads((ZERO_SHOT_DATA / "classnames.json").read_text(encoding="utf-8"))
    templates = json.loads((ZERO_SHOT_DATA / "templates.json").read_text(encoding="utf-8"))
    if name not in names:
        raise KeyError(f"no zero-shot metadata for {name!r}; known: {', '.join(sorted(names))}")
    return list(names[name]), list(templates[name])


# ------------------------------------------------------------------------------------------ helpers
def manifest_data_root(manifest: Manifest) -> str | None:
    """The data root a manifest was loaded with, where it can be known.

    ``load_manifest`` does not store ``data_root`` on the Manifest; we recover it from ``root`` or
    ``records`` when the manifest wrote them as ``${CLIP_REFINE_LAB_DATA}/...`` (the lead may add a
    ``data_root`` attribute to Manifest, which wins).
    """
    explicit = getattr(manifest, "data_root", None)
    if explicit is not None:
        return str(explicit)
    token = "${" + DATA_ROOT_ENV + "}"
    for key, resolved in (("root", manifest.root), ("records", manifest.records_path)):
        raw = manifest.fields.get(key)
        if isinstance(raw, str) and raw.startswith(token) and resolved is not None:
            rest = raw[len(token):].strip("/")
            resolved_s = str(resolved)
            if not rest:
                return resolved_s
            parts = Path(rest).parts
            p = Path(resolved_s)
            if len(p.parts) >= len(parts) and p.parts[-len(parts):] == parts:
                return str(Path(*p.parts[: len(p.parts) - len(parts)]))
    return None


def path_field(manifest: Manifest, key: str, required: bool = False, value: str | None = None) -> Path | None:
    """Resolve the path-valued manifest field ``key`` like ``root``/``records`` (None when absent)."""
    raw = manifest.fields.get(key) if value is None else value
    if raw is None or raw == "":
        if required:
            raise ManifestError(f"{manifest.path}: missing field '{key}' (required by format '{manifest.format}')")
        return None
    if not isinstance(raw, (str, os.PathLike)):
        raise ManifestError(f"{manifest.path}: field '{key}' must be a path string, got {raw!r}")
    return expand_path(str(raw), manifest.path.parent, manifest_data_root(manifest), f"{manifest.path}: field '{key}'")


def _records_file(manifest: Manifest) -> Path:
    path = manifest.records_path
    if path is None:
        raise ManifestError(f"{manifest.path}: missing field 'records' (required by format '{manifest.format}')")
    if not path.is_file():
        raise ManifestError(f"{manifest.path}: field 'records': file not found: {path} "
                            f"(check the data root and the layout described in the manifest)")
    return path


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def _resolve_image(root: Path, rel: str) -> str:
    return rel if os.path.isabs(rel) or LOCATOR_SEP in rel else str(root / rel)


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of a text file, skipping blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def _require_classnames(manifest: Manifest) -> list[str]:
    if not manifest.classnames:
        raise ManifestError(f"{manifest.path}: field 'classnames' is required for format '{manifest.format}'")
    return manifest.classnames


def _split_values(manifest: Manifest, default: str, allowed: Sequence[str]) -> set[str]:
    value = manifest.fields.get("split", default)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ManifestError(f"{manifest.path}: field 'split' must be one of {list(allowed)} or a list of them, got {value!r}")
    for v in values:
        if v not in allowed:
            raise ManifestError(f"{manifest.path}: field 'split': unknown split {v!r}; use one of {list(allowed)}")
    return set(values)


# --------------------------------------------------------------------------------------------- coco
@register_reader("coco")
def read_coco(manifest: Manifest) -> Iterator[CaptionRecord]:
    """COCO captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

    One record per image (id = the COCO image id as a string), its captions in annotation order.
    ``record.source`` is ``"<file>: images[i]"``; ``meta["caption_sources"]`` names each caption's
    ``annotations[j]``; ``meta["coco_id"]`` is the integer image id of the JSON.
    Images without any annotation are kept with no captions (data check reports them).
    """
    path = _records_file(manifest)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a COCO annotation object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ManifestError(f"{path}: missing list '{key}' (is this a COCO *captions* file, e.g. "
                                f"captions_train2017.json?)")
    images: dict[Any, tuple[int, dict]] = {}
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            raise ManifestError(f"{where}: expected an object")
        for key in ("id", "file_name"):
            if key not in im:
                raise ManifestError(f"{where}: missing field '{key}'")
        if im["id"] in images:
            raise ManifestError(f"{where}: duplicate image id {im['id']!r} (first at images[{images[im['id']][0]}])")
        images[im["id"]] = (i, im)
    captions: dict[Any, list[tuple[Any, str]]] = {k: [] for k in images}
    for j, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{j}]"
        if not isinstance(ann, dict):
            raise ManifestError(f"{where}: expected an object")
        for key in ("image_id", "caption"):
            if key not in ann:
                raise ManifestError(f"{where}: missing field '{key}'")
        if ann["image_id"] not in images:
            raise ManifestError(f"{where}: field 'image_id': {ann['image_id']!r} is not the id of any entry of 'images' "
                                f"({len(images):,} images); the annotation file may be truncated or mixed with another")
        captions[ann["image_id"]].append((ann["caption"], f"{path}: annotations[{j}]"))
    for image_id, (i, im) in images.items():
        caps = captions[image_id]
        coco_id = image_id if isinstance(image_id, int) else None
        yield CaptionRecord(
            str(image_id),
            _resolve_image(manifest.root, str(im["file_name"])),
            tuple(c for c, _ in caps),
            f"{path}: images[{i}]",
            {"coco_id": coco_id, "file_name": im["file_name"], "caption_sources": [w for _, w in caps]},
        )


# ----------------------------------------------------------------------------------------- karpathy
KARPATHY_SPLITS = ("train", "val", "test", "restval", "all")


@register_reader("karpathy")
def read_karpathy(manifest: Manifest) -> Iterator[CaptionRecord]:
    """Karpathy split JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``.

    ``split`` (default ``test``): one of train/val/test/restval/all, or a list. The image path is
    ``root/filepath/filename`` (COCO's file carries ``filepath`` = train2014/val2014; Flickr's do not).
    Record id = the file name without extension (e.g. ``1000092795`` or ``COCO_val2014_000000391895``).
    """
    path = _records_file(manifest)
    splits = _split_values(manifest, "test", KARPATHY_SPLITS)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: expected an object with an 'images' list (Karpathy split JSON, e.g. dataset_flickr30k.json)")
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            raise ManifestError(f"{where}: expected an object")
        for key in ("filename", "split", "sentences"):
            if key not in im:
                raise ManifestError(f"{where}: missing field '{key}'")
        if "all" not in splits and im["split"] not in splits:
            continue
        if not isinstance(im["sentences"], list):
            raise ManifestError(f"{where}: field 'sentences' must be a list")
        caps = []
        for k, s in enumerate(im["sentences"]):
            if isinstance(s, dict) and "raw" in s:
                caps.append(s["raw"])
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                caps.append(" ".join(map(str, s["tokens"])))
            else:
                raise ManifestError(f"{where}: sentences[{k}]: missing field 'raw'")
        rel = os.path.join(str(im.get("filepath", "")), str(im["filename"]))
        meta = {"split": im["split"], "file_name": im["filename"]}
        for key in ("imgid", "cocoid"):
            if key in im:
                meta[key] = im[key]
        if isinstance(im.get("cocoid"), int):
            meta["coco_id"] = im["cocoid"]
        meta["caption_sources"] = [f"{where}.sentences[{k}]" for k in range(len(caps))]
        yield CaptionRecord(Path(str(im["filename"])).stem, _resolve_image(manifest.root, rel), tuple(caps), where, meta)


# ----------------------------------------------------------------------------------------- flickr8k
@register_reader("flickr8k")
def read_flickr8k(manifest: Manifest) -> Iterator[CaptionRecord]:
    """Flickr8k.token.txt (``1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ...``).

    ``split_file`` (optional): an image list such as ``Flickr_8k.testImages.txt``; records follow
    its order, and every listed image must have captions. Without it, every image of the token file.
    Record id = the file name without extension; ``source`` = the token file line of its first
    caption, ``meta["caption_sources"]`` the line of each caption.
    """
    path = _records_file(manifest)
    caps: "OrderedDict[str, list[tuple[str, str]]]" = OrderedDict()
    for lineno, line in _read_lines(path):
        where = f"{path}:{lineno}"
        if "\t" not in line:
            raise ManifestError(f"{where}: expected 'IMAGE#N<TAB>caption', found no tab in {line[:80]!r}")
        left, caption = line.split("\t", 1)
        image = left.rsplit("#", 1)[0] if "#" in left else left
        if not image:
            raise ManifestError(f"{where}: empty image name before the tab")
        caps.setdefault(image, []).append((caption.strip(), where))
    split = path_field(manifest, "split_file")
    if split is None:
        names = [(name, None) for name in caps]
    else:
        if not split.is_file():
            raise ManifestError(f"{manifest.path}: field 'split_file': file not found: {split}")
        names = []
        for lineno, line in _read_lines(split):
            name = line.strip()
            if name not in caps:
                raise ManifestError(f"{split}:{lineno}: image {name!r} has no captions in {path}")
            names.append((name, f"{split}:{lineno}"))
    for name, _ in names:
        entries = caps[name]
        yield CaptionRecord(Path(name).stem, _resolve_image(manifest.root, name), tuple(c for c, _ in entries),
                            entries[0][1], {"file_name": name, "caption_sources": [w for _, w in entries]})


# ------------------------------------------------------------------------------------- csv / table
_DEFAULT_COLUMNS = {
    "id": ("id", "key"),
    "image": ("image", "filepath", "path", "file_name", "filename", "file"),
    "caption": ("captions", "caption", "text", "title"),
    "label": ("label", "class", "target"),
}


def _table_rows(path: Path, delimiter: str | None) -> Iterator[tuple[str, dict]]:
    """(where, row dict) for CSV/TSV (with a header line) or JSON-lines files."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        for lineno, line in _read_lines(path):
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj
        return
    if delimiter is None:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames:
                raise ManifestError(f"{path}:1: empty file or missing header line")
            line_start = 2
            for row in reader:
                where = f"{path}:{line_start}"
                line_start = reader.line_num + 1
                if None in row:
                    raise ManifestError(f"{where}: more values than header columns ({len(reader.fieldnames)})")
                yield where, row
    except csv.Error as e:
        raise ManifestError(f"{path}: CSV error: {e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def _pick_column(manifest: Manifest, role: str, row: dict, where: str, required: bool) -> Any:
    columns = manifest.fields.get("columns") or {}
    if not isinstance(columns, dict):
        raise ManifestError(f"{manifest.path}: field 'columns' must be a mapping such as {{image: filepath, caption: title}}")
    if role == "caption" and "captions" in columns and "caption" not in columns:
        role_key = "captions"
    else:
        role_key = role
    name = columns.get(role_key)
    if name is not None:
        names = name if isinstance(name, list) else [name]
        values = []
        for n in names:
            if n not in row:
                raise ManifestError(f"{where}: column {n!r} (manifest field columns.{role_key}) is missing; "
                                    f"columns present: {sorted(row)}")
            values.append(row[n])
        return values if isinstance(name, list) else values[0]
    for n in _DEFAULT_COLUMNS[role]:
        if n in row:
            return row[n]
    if required:
        raise ManifestError(f"{where}: no {role} column (looked for {list(_DEFAULT_COLUMNS[role])}); "
                            f"name it in the manifest, e.g. columns: {{{role}: YOUR_COLUMN}}")
    return None


def _label_index(manifest: Manifest, value: Any, where: str) -> int:
    mode = manifest.fields.get("label_by", "auto")
    if mode not in ("auto", "index", "name"):
        raise ManifestError(f"{manifest.path}: field 'label_by' must be auto, index or name, got {mode!r}")
    if isinstance(value, bool):
        raise ManifestError(f"{where}: label {value!r} is not a class index or name")
    if mode in ("auto", "index"):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if mode == "index":
            raise ManifestError(f"{where}: label {value!r} is not an integer class index (label_by: index)")
    names = _require_classnames(manifest)
    lookup = {n: i for i, n in enumerate(names)}
    if not isinstance(value, str) or value.strip() not in lookup:
        raise ManifestError(f"{where}: label {value!r} is not one of the manifest's classnames "
                            f"(first few: {names[:5]}); fix the label or add the class to 'classnames'")
    return lookup[value.strip()]


def _as_captions(value: Any) -> tuple:
    if isinstance(value, list):
        return tuple(value)
    if value is None:
        return ()
    return (value,)


@register_reader("csv")
@register_reader("tsv")
@register_reader("table")
def read_table(manifest: Manifest) -> Iterator[Record]:
    """CSV (header line), TSV (``.tsv``) or JSON lines (``.jsonl``) of image path + caption(s) or label.

    ``columns`` maps roles to column names: ``{id: ..., image: ..., caption: ... | [col1, col2],
    label: ...}``; unnamed roles use the first present of the usual names (image: image/filepath/path/
    file_name; caption: captions/caption/text/title; label: label/class/target; id: id/key).
    Captions: rows with the same image (and id) are merged into one record with several captions,
    in file order; the record id is the id column or else the image path as written.
    Classification: ``label_by`` = auto (integers are indices, other strings class names), index or name.
    """
    path = _records_file(manifest)
    delimiter = manifest.fields.get("delimiter")
    if manifest.kind == "classification":
        for where, row in _table_rows(path, delimiter):
            image = _pick_column(manifest, "image", row, where, True)
            label = _label_index(manifest, _pick_column(manifest, "label", row, where, True), where)
            rid = _pick_column(manifest, "id", row, where, False)
            yield ClassificationRecord(str(rid if rid not in (None, "") else image),
                                       _resolve_image(manifest.root, str(image)), label, where, {})
        return
    merged: "OrderedDict[tuple[str, str], list]" = OrderedDict()
    for where, row in _table_rows(path, delimiter):
        image = _pick_column(manifest, "image", row, where, True)
        if image is None or str(image) == "":
            raise ManifestError(f"{where}: empty image path")
        caps = _as_captions(_pick_column(manifest, "caption", row, where, True))
        rid = _pick_column(manifest, "id", row, where, False)
        rid = str(rid) if rid not in (None, "") else str(image)
        entry = merged.setdefault((rid, str(image)), [where, [], []])
        entry[1].extend(caps)
        entry[2].extend([where] * len(caps))
    for (rid, image), (where, caps, sources) in merged.items():
        yield CaptionRecord(rid, _resolve_image(manifest.root, image), tuple(caps), where, {"caption_sources": sources})


# -------------------------------------------------------------------------------------- labels_txt
@register_reader("labels_txt")
def read_labels_txt(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """Whitespace-separated lines ``IMAGE LABEL ...`` (lines starting with ``#`` are comments).

    Fields: ``image_pattern`` (``"{}.jpg"`` turns the image column into a file name; default ``"{}"``),
    ``image_column`` (0), ``label_column`` (1), ``label_by`` (``index`` or ``name``), ``index_base``
    (1 for 1-based class indices), ``maxsplit`` (split each line at most this often, so a label with
    spaces stays whole: FGVC-Aircraft's ``1514522 Cessna 172`` needs ``maxsplit: 1``).
    """
    path = _records_file(manifest)
    f = manifest.fields
    pattern = str(f.get("image_pattern", "{}"))
    icol, lcol = int(f.get("image_column", 0)), int(f.get("label_column", 1))
    label_by = f.get("label_by", "index")
    base = int(f.get("index_base", 0))
    maxsplit = f.get("maxsplit")
    maxsplit = -1 if maxsplit is None else int(maxsplit)
    names = {n: i for i, n in enumerate(manifest.classnames or [])}
    for lineno, line in _read_lines(path):
        if line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        parts = line.strip().split(None, maxsplit)
        if max(icol, lcol) >= len(parts):
            raise ManifestError(f"{where}: expected at least {max(icol, lcol) + 1} columns, got {len(parts)} in {line[:80]!r}")
        raw = parts[lcol].strip()
        if label_by == "name":
            if raw not in names:
                raise ManifestError(f"{where}: label {raw!r} is not one of the manifest's classnames")
            label = names[raw]
        else:
            if not re.fullmatch(r"-?\d+", raw):
                raise ManifestError(f"{where}: label column {lcol} is {raw!r}, not an integer (label_by: index)")
            label = int(raw) - base
        image = pattern.format(parts[icol])
        yield ClassificationRecord(parts[icol], _resolve_image(manifest.root, image), label, where, {})


# ------------------------------------------------------------------------------------- imagefolder
def _norm(s: str) -> str:
    return re.sub(r"[^0-9a-z]", "", s.lower())


@dataclass
class ImageFolderScan:
    """What :func:`scan_imagefolder` found: records, folders matching no class, images per class."""

    records: list[ClassificationRecord]
    unknown_folders: dict[str, int] = field(default_factory=dict)  # folder key -> number of images
    unknown_examples: dict[str, str] = field(default_factory=dict)  # folder key -> where
    class_counts: list[int] = field(default_factory=list)


class _ClassMatcher:
    """Map a folder key (its path relative to root, posix) to a class index."""

    def __init__(self, manifest: Manifest):
        names = _require_classnames(manifest)
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


def _remap_split_path(root: Path, rel: str, folder_names: dict) -> str:
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
    scan = ImageFolderScan([], {}, {}, [0] * match.n)
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
        for lineno, line in _read_lines(split):
            rel = line.strip().split()[0].lstrip("/")
            if split_ext:
                ext = split_ext if split_ext.startswith(".") else "." + split_ext
                rel = str(Path(rel).with_suffix(ext)) if Path(rel).suffix.lower() not in exts else rel
            entries.append((_remap_split_path(root, rel, folder_names), f"{split}:{lineno}"))
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
        scan.class_counts[label] += 1
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


# ------------------------------------------------------------------------------------------ cub200
@register_reader("cub200")
def read_cub200(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """CUB_200_2011 with its own index files: ``root`` is the CUB_200_2011 folder holding
    ``images.txt`` ("1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"),
    ``image_class_labels.txt`` ("1 1", 1-based classes), ``train_test_split.txt`` ("1 0", 1 = train)
    and ``images/``. ``split``: test (default, 5,794 images), train or all. Record id = image id."""
    root = manifest.root
    split = _split_values(manifest, "test", ("train", "test", "all"))

    def table(name: str) -> dict[str, tuple[str, str]]:
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{manifest.path}: CUB file not found: {path} (root must be the CUB_200_2011 folder)")
        out = {}
        for lineno, line in _read_lines(path):
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise ManifestError(f"{path}:{lineno}: expected 'IMAGE_ID VALUE', got {line[:80]!r}")
            out[parts[0]] = (parts[1].strip(), f"{path}:{lineno}")
        return out

    images, labels, splits = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    for image_id, (rel, where) in images.items():
        for other, name in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt")):
            if image_id not in other:
                raise ManifestError(f"{where}: image id {image_id} has no entry in {root / name}")
        is_train = splits[image_id][0] == "1"
        if "all" not in split and (("train" in split) != is_train):
            continue
        lab = labels[image_id][0]
        if not lab.isdigit():
            raise ManifestError(f"{labels[image_id][1]}: class {lab!r} is not an integer")
        yield ClassificationRecord(image_id, str(root / "images" / rel), int(lab) - 1, where, {})


# ---------------------------------------------------------------------------------- .mat formats
def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is an optional dependency
        raise ManifestError(f"{path}: reading MATLAB .mat annotations needs scipy (pip install scipy)") from None
    if not path.is_file():
        raise ManifestError(f"annotation file not found: {path}")
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError/TypeError/OSError on a broken file
        raise ManifestError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from None


@register_reader("stanford_cars")
def read_stanford_cars(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """Stanford Cars: ``records`` = the devkit's ``cars_test_annos_withlabels.mat`` (or
    ``cars_train_annos.mat``), a struct array ``annotations`` with ``fname`` and ``class`` (1-based);
    ``root`` = the folder of those images (``cars_test``). Record id = the file name."""
    path = _records_file(manifest)
    mat = _loadmat(path)
    if "annotations" not in mat:
        raise ManifestError(f"{path}: no 'annotations' variable (expected the Stanford Cars devkit annotation file)")
    ann = mat["annotations"]
    names = ann.dtype.names or ()
    for key in ("fname", "class"):
        if key not in names:
            raise ManifestError(f"{path}: annotations lack field '{key}' (has: {list(names)}); use the file with labels, "
                                f"cars_test_annos_withlabels.mat")
    import numpy as np

    for i, (fname, cls) in enumerate(zip(np.atleast_1d(ann["fname"]).ravel(), np.atleast_1d(ann["class"]).ravel())):
        fname = str(fname.item() if hasattr(fname, "item") else fname)
        yield ClassificationRecord(fname, _resolve_image(manifest.root, fname), int(cls) - 1,
                                   f"{path}: annotations[{i}]", {})


@register_reader("flowers102")
def read_flowers102(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """Oxford Flowers-102: ``root`` holds ``imagelabels.mat`` (``labels``, 1-based, one per image),
    ``setid.mat`` (``trnid``/``valid``/``tstid``, 1-based image numbers) and ``jpg/image_00001.jpg``.
    ``split``: test (default, 6,149 images), train, val or all."""
    root = manifest.root
    split = _split_values(manifest, "test", ("train", "val", "test", "all"))
    labels = _loadmat(root / "imagelabels.mat")
    if "labels" not in labels:
        raise ManifestError(f"{root / 'imagelabels.mat'}: no 'labels' variable")
    import numpy as np

    lab = [int(x) for x in np.atleast_1d(labels["labels"]).ravel()]
    if "all" in split:
        ids = list(range(1, len(lab) + 1))
    else:
        setid = _loadmat(root / "setid.mat")
        ids = []
        for s, var in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
            if s in split:
                if var not in setid:
                    raise ManifestError(f"{root / 'setid.mat'}: no '{var}' variable")
                ids.extend(int(x) for x in np.atleast_1d(setid[var]).ravel())
    for n in ids:
        if not 1 <= n <= len(lab):
            raise ManifestError(f"{root / 'setid.mat'}: image number {n} is outside imagelabels.mat's {len(lab)} labels")
        name = f"image_{n:05d}.jpg"
        yield ClassificationRecord(name, str(root / "jpg" / name), lab[n - 1] - 1, f"{root / 'imagelabels.mat'}: labels[{n - 1}]", {})


# ------------------------------------------------------------------------------------- webdataset
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00331}`` ranges (zero-padded to the width of the first bound) and ``{a,b,c}``
    alternatives, as webdataset/braceexpand do: ``"cc3m/{00000..00002}.tar"`` -> 3 paths."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]
        head, tail = pattern[: m.end()], pattern[m.end():]
        return [head + rest for rest in expand_braces(tail)]
    out = []
    for opt in options:
        out.extend(expand_braces(pattern[: m.start()] + opt + pattern[m.end():]))
    return out


def manifest_shards(manifest: Manifest) -> list[Path]:
    """The shard paths of a ``webdataset`` manifest (``shards``: a brace pattern or a list of them,
    relative to ``root`` unless absolute)."""
    raw = manifest.fields.get("shards")
    if raw is None:
        raise ManifestError(f"{manifest.path}: missing field 'shards' (e.g. shards: \"{{00000..00331}}.tar\")")
    patterns = [raw] if isinstance(raw, str) else raw
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ManifestError(f"{manifest.path}: field 'shards' must be a string or a list of strings")
    out: list[Path] = []
    for pat in patterns:
        base = expand_path(pat, manifest.root, manifest_data_root(manifest), f"{manifest.path}: field 'shards'")
        out.extend(Path(p) for p in expand_braces(str(base)))
    return out


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = the path up to the first dot of the file name, ext = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (directory + "/" + stem if directory else stem), ext.lower()


def iter_tar_samples(shard: str | os.PathLike, *, want: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Stream the samples of one tar shard, in file order, without seeking (works on pipes too).

    Yields ``{"__key__": key, "__shard__": path, "__members__": {ext: member name}, ext: bytes, ...}``;
    members of one key must be consecutive (as img2dataset and tarwriter write them). ``want(ext)``
    limits which members' bytes are read (the others are listed in __members__ only).
    """
    shard = str(shard)
    current: dict | None = None
    try:
        with tarfile.open(shard, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key.startswith("__") or not ext:
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": shard, "__members__": {}}
                current["__members__"][ext] = info.name
                if want is None or want(ext):
                    f = tf.extractfile(info)
                    current[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ManifestError(f"{shard}: cannot read tar shard ({type(e).__name__}: {e})") from None
    if current is not None:
        yield current


def _wds_exts(manifest: Manifest) -> tuple[tuple[str, ...], str, str]:
    f = manifest.fields
    img = f.get("image_ext", WDS_IMAGE_EXTS)
    img = (img,) if isinstance(img, str) else tuple(img)
    return tuple(e.lstrip(".").lower() for e in img), str(f.get("caption_ext", "txt")).lstrip("."), str(f.get("label_ext", "cls")).lstrip(".")


def _wds_record(sample: dict, kind: str, img_exts: Sequence[str], cap_ext: str, lab_ext: str, index: int) -> Record:
    shard, key, members = sample["__shard__"], sample["__key__"], sample["__members__"]
    where = f"{shard}: sample {index} (key {key})"
    image_member = next((members[e] for e in img_exts if e in members), f"{key}.{img_exts[0]}")
    image = f"{shard}{LOCATOR_SEP}{image_member}"
    meta = {"shard": shard, "members": dict(members)}
    if kind == "classification":
        raw = sample.get(lab_ext)
        try:
            label = int(raw.decode("utf-8").strip()) if raw is not None else -1
        except ValueError:
            raise ManifestError(f"{where}: member {key}.{lab_ext} is not an integer class index") from None
        return ClassificationRecord(key, image, label, where, meta)
    caps: tuple = ()
    if cap_ext in sample:
        try:
            caps = (sample[cap_ext].decode("utf-8").strip(),)
        except UnicodeDecodeError:
            caps = (None,)  # reported as a non-text caption by data check
    elif "json" in sample:
        try:
            obj = json.loads(sample["json"].decode("utf-8"))
            cap = obj.get("caption") if isinstance(obj, dict) else None
            caps = (cap,) if cap is not None else ()
        except (ValueError, UnicodeDecodeError):
            caps = ()
    return CaptionRecord(key, image, caps, where, meta)


@register_reader("webdataset")
def read_webdataset(manifest: Manifest) -> Iterator[Record]:
    """WebDataset shards as img2dataset writes them: ``{key}.jpg`` + ``{key}.txt`` (+ ``{key}.json``).

    Fields: ``shards`` (brace pattern(s) relative to ``root``), ``image_ext`` (default jpg, jpeg,
    png, webp: the first present is the image), ``caption_ext`` (txt; without it a ``json``
    member's "caption" is used), ``label_ext`` (cls, for classification). Record id = the sample key;
    image = ``"<shard>::<member>"`` (read with :func:`open_image`). This lists every sample of every
    shard (a sequential pass over the tars, images not decoded); for training at scale stream with
    :class:`WebDatasetPairs` instead.
    """
    img_exts, cap_ext, lab_ext = _wds_exts(manifest)
    want = {cap_ext, lab_ext, "json"}
    for shard in manifest_shards(manifest):
        if not shard.is_file():
            raise ManifestError(f"{manifest.path}: field 'shards': shard not found: {shard}")
        for i, sample in enumerate(iter_tar_samples(shard, want=lambda e: e in want)):
            yield _wds_record(sample, manifest.kind, img_exts, cap_ext, lab_ext, i)


# Formats the trainer streams (an IterableDataset over shards) instead of listing every record.
STREAMING_FORMATS = ("webdataset",)


def is_streaming(manifest: Manifest) -> bool:
    """Whether the trainer streams this manifest (WebDataset shards) rather than reading it map-style."""
    return manifest.format in STREAMING_FORMATS


def manifest_num_samples(manifest: Manifest) -> int | None:
    """The sample count a streaming manifest declares, without reading its shards (None if it does not).

    ``num_samples`` (all shards together) wins; a manifest written by CLIP-score filtering carries the
    count of kept samples as ``filter.kept``, which is used when ``num_samples`` is absent. Failing
    both, img2dataset's per-shard statistics (``00000_stats.json`` beside ``00000.tar``, field
    ``successes``) are summed when every shard has one: a plain img2dataset download needs no edit."""
    value = manifest.fields.get("num_samples")
    where = "num_samples"
    if value is None:
        filt = manifest.fields.get("filter")
        value, where = (filt.get("kept"), "filter.kept") if isinstance(filt, dict) else (None, where)
    if value is None:
        return _img2dataset_successes(manifest)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ManifestError(f"{manifest.path}: field '{where}' must be a positive integer (the number of samples "
                            f"of all shards together), got {value!r}")
    return value


def _img2dataset_successes(manifest: Manifest) -> int | None:
    """Sum of ``successes`` over the img2dataset ``<shard>_stats.json`` files, or None if any is missing."""
    total = 0
    try:
        shards = manifest_shards(manifest)
    except ManifestError:
        return None
    for shard in shards:
        stats = shard.with_name(shard.name[: -len(".tar")] + "_stats.json") if shard.name.endswith(".tar") else None
        if stats is None or not stats.is_file():
            return None
        try:
            count = json.loads(stats.read_text()).get("successes")
        except (OSError, ValueError) as e:
            raise ManifestError(f"{stats}: unreadable img2dataset statistics ({e}); delete it or add 'num_samples: N' "
                                f"to {manifest.path}") from None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ManifestError(f"{stats}: field 'successes' must be a non-negative integer, got {count!r}")
        total += count
    return total or None


# ------------------------------------------------------------------------------------ image access
class _TarIndex:
    """Member name -> (data offset, size) of uncompressed tar shards, for random access by locator."""

    def __init__(self, max_shards: int = 64):
        self.max_shards = max_shards
        self.index: "OrderedDict[str, tuple[float, int, dict[str, tuple[int, int]]]]" = OrderedDict()
        self.lock = threading.Lock()

    def lookup(self, shard: str, member: str) -> tuple[int, int] | None:
        st = os.stat(shard)
        with self.lock:
            hit = self.index.get(shard)
            if hit is not None and hit[0] == st.st_mtime and hit[1] == st.st_size:
                self.index.move_to_end(shard)
                return hit[2].get(member)
        try:
            with tarfile.open(shard, mode="r:") as tf:  # uncompressed only: offsets are file offsets
                members = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
        except tarfile.ReadError:
            return None
        with self.lock:
            self.index[shard] = (st.st_mtime, st.st_size, members)
            while len(self.index) > self.max_shards:
                self.index.popitem(last=False)
        return members.get(member)


_TAR_INDEX = _TarIndex()


def split_locator(locator: str) -> tuple[str, str | None]:
    if LOCATOR_SEP in locator:
        shard, member = locator.split(LOCATOR_SEP, 1)
        return shard, member
    return locator, None


def read_image_bytes(locator: str) -> bytes:
    """The raw bytes of an image file or of a ``"shard.tar::member"``; ManifestError if missing."""
    path, member = split_locator(locator)
    if member is None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ManifestError(f"image file not found: {path}") from None
        except OSError as e:
            raise ManifestError(f"cannot read image file {path}: {e}") from None
    if not os.path.isfile(path):
        raise ManifestError(f"tar shard not found: {path} (for {locator})")
    loc = _TAR_INDEX.lookup(path, member)
    if loc is None:
        try:  # compressed shard: fall back to tarfile's own extraction
            with tarfile.open(path) as tf:
                f = tf.extractfile(member)
                if f is not None:
                    return f.read()
        except KeyError:
            pass
        except (tarfile.TarError, OSError) as e:
            raise ManifestError(f"cannot read tar shard {path}: {e}") from None
        raise ManifestError(f"member {member!r} not found in tar shard {path}")
    offset, size = loc
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def decode_image(data: bytes, what: str):
    """Decode image bytes to an RGB PIL image; ManifestError naming ``what`` if they are not one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise ManifestError(f"cannot read image {what}: {type(e).__name__}: {e}") from None


def open_image(locator: str):
    """Open a record's image (a path or a ``"shard.tar::member"`` locator) as an RGB PIL image."""
    if LOCATOR_SEP not in locator:
        return load_image(locator)
    return decode_image(read_image_bytes(locator), locator)


# ------------------------------------------------------------------------------ WebDatasetPairs
def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices for an epoch: a permutation drawn from (seed, epoch), or 0..n-1."""
    import numpy as np

    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng((seed, epoch)).permutation(num_shards)]


def assign_shards(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int,
                  seed: int = 0, epoch: int = 0, shuffle: bool = True) -> list[int]:
    """The shards one (rank, DataLoader worker) reads in an epoch: every shard exactly once overall.

    Slot ``rank * num_workers + worker`` of ``world_size * num_workers`` slots takes every
    slot-count-th shard of the epoch's (seeded) order.
    """
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    order = shard_order(num_shards, seed, epoch, shuffle)
    return order[slot::slots]


try:  # torch is a dependency of the package, but keep this module importable without it
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover
    _IterableDataset = object  # type: ignore[misc,assignment]


class WebDatasetPairs(_IterableDataset):
    """Stream (image tensor, caption tokens, key) from WebDataset tar shards with Python's tarfile.

    Sharding: per epoch the shards are ordered by a permutation drawn from (seed, epoch) (or kept in
    order with ``shuffle_shards=False``) and dealt round-robin to the ``world_size × num_workers``
    (rank, DataLoader worker) slots, so each shard is read by exactly one of them per epoch and the
    order is deterministic given (seed, epoch). Call :meth:`set_epoch` before each epoch (in the main
    process, before iterating the DataLoader: workers get a copy of the dataset when they start).
    With fewer shards than slots some workers get nothing; ranks may get different numbers of
    samples, so in DDP stop on a fixed number of steps per epoch (or use equal-sized shards).

    Samples lacking an image or caption, or whose image cannot be decoded, are skipped when
    ``on_bad_sample="skip"`` (counted in ``self.skipped`` of the process that read them) or raise
    a ManifestError naming shard and key with ``"raise"``. Multi-line ``.txt`` captions are
    treated as one caption per line; one is drawn per (seed, epoch, key).
    """

    def __init__(self, shards: str | Sequence[str | os.PathLike], preprocess: Callable, tokenizer: Callable,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_shards: bool = True, *,
                 image_ext: Sequence[str] = WDS_IMAGE_EXTS, caption_ext: str = "txt", on_bad_sample: str = "skip"):
        if isinstance(shards, (str, os.PathLike)):
            shards = expand_braces(str(shards))
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("WebDatasetPairs: no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"WebDatasetPairs: rank {rank} is outside world_size {world_size}")
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError("on_bad_sample must be 'skip' or 'raise'")
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.rank, self.world_size, self.seed, self.shuffle_shards = rank, world_size, seed, shuffle_shards
        self.image_ext = tuple(e.lstrip(".").lower() for e in image_ext)
        self.caption_ext = caption_ext.lstrip(".")
        self.on_bad_sample = on_bad_sample
        self.epoch = 0
        self.skipped = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest, preprocess: Callable, tokenizer: Callable,
                      shards: Sequence[str | os.PathLike] | None = None, **kwargs) -> "WebDatasetPairs":
        """Stream a ``webdataset`` manifest: all its shards, or ``shards`` (a subset, e.g. the training ones)."""
        img_exts, cap_ext, _ = _wds_exts(manifest)
        shards = manifest_shards(manifest) if shards is None else shards
        return cls([str(s) for s in shards], preprocess, tokenizer, image_ext=img_exts, caption_ext=cap_ext, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[str]:
        """The shards this process (rank and, inside a DataLoader worker, worker) reads this epoch."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        idx = assign_shards(len(self.shards), self.rank, self.world_size, worker, num_workers,
                            self.seed, self.epoch, self.shuffle_shards)
        return [self.shards[i] for i in idx]

    def _bad(self, msg: str) -> None:
        if self.on_bad_sample == "raise":
            raise ManifestError(msg)
        self.skipped += 1

    def __iter__(self):
        import numpy as np

        wanted = set(self.image_ext) | {self.caption_ext}
        for shard in self.my_shards():
            for sample in iter_tar_samples(shard, want=lambda e: e in wanted):
                key = sample["__key__"]
                img_ext = next((e for e in self.image_ext if e in sample), None)
                if img_ext is None or self.caption_ext not in sample:
                    self._bad(f"{shard}: sample {key!r} lacks an image ({'/'.join(self.image_ext)}) or a "
                              f".{self.caption_ext} caption")
                    continue
                try:
                    text = sample[self.caption_ext].decode("utf-8")
                    captions = [c.strip() for c in text.splitlines() if c.strip()]
                    if not captions:
                        raise ValueError("empty caption")
                    image = decode_image(sample[img_ext], f"{shard}::{key}.{img_ext}")
                except (ManifestError, ValueError, UnicodeDecodeError) as e:
                    self._bad(f"{shard}: sample {key!r}: {e}")
                    continue
                if len(captions) > 1:
                    h = int.from_bytes(key.encode("utf-8")[-8:].rjust(8, b"\0"), "little")
                    caption = captions[int(np.random.default_rng((self.seed, self.epoch, h)).integers(len(captions)))]
                else:
                    caption = captions[0]
                yield self.preprocess(image), self.tokenizer([caption])[0], key


# --------------------------------------------------------------------------------- shard writing
def write_tar_shards(samples: Iterable[dict], out_dir: str | os.PathLike, *, samples_per_shard: int = 10000,
                     prefix: str = "") -> list[Path]:
    """Write samples (``{"__key__": key, ext: bytes, ...}``) into ``out_dir/{prefix}{00000..}.tar``.

    Each shard is written to a temporary file and renamed when complete (atomic per shard).
    Returns the shard paths written.
    """
    from ..utils import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    buffer: list[dict] = []

    def flush():
        path = out_dir / f"{prefix}{len(paths):05d}.tar"
        with atomic_path(path) as tmp:
            with tarfile.open(tmp, "w") as tf:
                for s in buffer:
                    for ext, data in s.items():
                        if ext.startswith("__"):
                            continue
                        info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                        info.size = len(data)
                        info.mtime = 0
                        tf.addfile(info, io.BytesIO(data))
        paths.append(path)
        buffer.clear()

    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= samples_per_shard:
            flush()
    if buffer:
        flush()
    return paths
