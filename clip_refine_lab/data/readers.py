"""Readers of index-file formats: COCO and Karpathy JSON, Flickr8k, tables, label lists, CUB, Cars, Flowers.

Each reader turns a format's own index files into records and registers itself for its ``format:``
with :func:`clip_refine_lab.data.manifest.register_reader`; the fields each format takes are in
:data:`clip_refine_lab.data.formats.FORMAT_SPECS`, the shared conventions in that module's docstring.
Image folders and WebDataset shards have their own modules. :func:`zero_shot_metadata` gives the
classnames and templates of the classification sets of ``data_manifests/`` without that folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

from .formats import load_json, path_field, read_lines, records_file, require_classnames, resolve_image, split_values
from .manifest import CaptionRecord, ClassificationRecord, Manifest, ManifestError, Record, record_error, register_reader

ZERO_SHOT_DATA = Path(__file__).parent / "zero_shot_data"


def zero_shot_metadata(name: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a classification set of data_manifests/ by its name (``imagenet1k``,
    ``cars``, ``cub200``, ...), from the copies shipped in ``clip_refine_lab/data/zero_shot_data/``."""
    names = json.loads((ZERO_SHOT_DATA / "classnames.json").read_text(encoding="utf-8"))
    templates = json.loads((ZERO_SHOT_DATA / "templates.json").read_text(encoding="utf-8"))
    if name not in names:
        raise KeyError(f"no zero-shot metadata for {name!r}; known: {', '.join(sorted(names))}")
    return list(names[name]), list(templates[name])


# --------------------------------------------------------------------------------------------- coco
@register_reader("coco")
def read_coco(manifest: Manifest) -> Iterator[CaptionRecord]:
    """COCO captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

    One record per image (id = the COCO image id as a string), its captions in annotation order.
    ``record.source`` is ``"<file>: images[i]"``; ``meta["caption_sources"]`` names each caption's
    ``annotations[j]``; ``meta["coco_id"]`` is the integer image id of the JSON.
    Images without any annotation are kept with no captions (data check reports them).
    """
    path = records_file(manifest)
    data = load_json(path)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a COCO annotation object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ManifestError(f"{path}: missing list '{key}' (is this a COCO *captions* file, e.g. "
                                f"captions_train2017.json?)")
    images: dict[Any, tuple[int, dict]] = {}
    for i, im in enumerate(data["images"]):
        problem = _coco_image_problem(im, images)
        if problem:
            record_error(ManifestError(f"{path}: images[{i}]: {problem}"))
            continue
        images[im["id"]] = (i, im)
    captions: dict[Any, list[tuple[Any, str]]] = {k: [] for k in images}
    for j, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{j}]"
        problem = _coco_annotation_problem(ann, images)
        if problem:
            record_error(ManifestError(f"{where}: {problem}"))
            continue
        captions[ann["image_id"]].append((ann["caption"], where))
    for image_id, (i, im) in images.items():
        caps = captions[image_id]
        coco_id = image_id if isinstance(image_id, int) else None
        yield CaptionRecord(
            str(image_id),
            resolve_image(manifest.root, str(im["file_name"])),
            tuple(c for c, _ in caps),
            f"{path}: images[{i}]",
            {"coco_id": coco_id, "file_name": im["file_name"], "caption_sources": [w for _, w in caps]},
        )


def _coco_image_problem(im: Any, images: dict) -> str | None:
    if not isinstance(im, dict):
        return "expected an object"
    for key in ("id", "file_name"):
        if key not in im:
            return f"missing field '{key}'"
    if im["id"] in images:
        return f"duplicate image id {im['id']!r} (first at images[{images[im['id']][0]}])"
    return None


def _coco_annotation_problem(ann: Any, images: dict) -> str | None:
    if not isinstance(ann, dict):
        return "expected an object"
    for key in ("image_id", "caption"):
        if key not in ann:
            return f"missing field '{key}'"
    if ann["image_id"] not in images:
        return (f"field 'image_id': {ann['image_id']!r} is not the id of any entry of 'images' ({len(images):,} "
                "images); the annotation file may be truncated or mixed with another")
    return None


# ----------------------------------------------------------------------------------------- karpathy
KARPATHY_SPLITS = ("train", "val", "test", "restval", "all")


@register_reader("karpathy")
def read_karpathy(manifest: Manifest) -> Iterator[CaptionRecord]:
    """Karpathy split JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``.

    ``split`` (default ``test``): one of train/val/test/restval/all, or a list. The image path is
    ``root/filepath/filename`` (COCO's file carries ``filepath`` = train2014/val2014; Flickr's do not).
    Record id = the file name without extension (e.g. ``1000092795`` or ``COCO_val2014_000000391895``).
    """
    path = records_file(manifest)
    splits = split_values(manifest, "test", KARPATHY_SPLITS)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: expected an object with an 'images' list (Karpathy split JSON, e.g. dataset_flickr30k.json)")
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        try:
            if "all" not in splits and _karpathy_split(im, where) not in splits:
                continue
            caps = _karpathy_captions(im, where)
        except ManifestError as e:
            record_error(e)
            continue
        rel = os.path.join(str(im.get("filepath", "")), str(im["filename"]))
        meta = {"split": im["split"], "file_name": im["filename"]}
        for key in ("imgid", "cocoid"):
            if key in im:
                meta[key] = im[key]
        if isinstance(im.get("cocoid"), int):
            meta["coco_id"] = im["cocoid"]
        meta["caption_sources"] = [f"{where}.sentences[{k}]" for k in range(len(caps))]
        yield CaptionRecord(Path(str(im["filename"])).stem, resolve_image(manifest.root, rel), tuple(caps), where, meta)


def _karpathy_split(im: Any, where: str) -> Any:
    if not isinstance(im, dict):
        raise ManifestError(f"{where}: expected an object")
    for key in ("filename", "split", "sentences"):
        if key not in im:
            raise ManifestError(f"{where}: missing field '{key}'")
    return im["split"]


def _karpathy_captions(im: dict, where: str) -> list:
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
    return caps


# ----------------------------------------------------------------------------------------- flickr8k
@register_reader("flickr8k")
def read_flickr8k(manifest: Manifest) -> Iterator[CaptionRecord]:
    """Flickr8k.token.txt (``1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ...``).

    ``split_file`` (optional): an image list such as ``Flickr_8k.testImages.txt``; records follow
    its order, and every listed image must have captions. Without it, every image of the token file.
    Record id = the file name without extension; ``source`` = the token file line of its first
    caption, ``meta["caption_sources"]`` the line of each caption.
    """
    path = records_file(manifest)
    caps: "OrderedDict[str, list[tuple[str, str]]]" = OrderedDict()
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        if "\t" not in line:
            record_error(ManifestError(f"{where}: expected 'IMAGE#N<TAB>caption', found no tab in {line[:80]!r}"))
            continue
        left, caption = line.split("\t", 1)
        image = left.rsplit("#", 1)[0] if "#" in left else left
        if not image:
            record_error(ManifestError(f"{where}: empty image name before the tab"))
            continue
        caps.setdefault(image, []).append((caption.strip(), where))
    split = path_field(manifest, "split_file")
    if split is None:
        names = [(name, None) for name in caps]
    else:
        if not split.is_file():
            raise ManifestError(f"{manifest.path}: field 'split_file': file not found: {split}")
        names = []
        for lineno, line in read_lines(split):
            name = line.strip()
            if name not in caps:
                record_error(ManifestError(f"{split}:{lineno}: image {name!r} has no captions in {path}"))
                continue
            names.append((name, f"{split}:{lineno}"))
    for name, _ in names:
        entries = caps[name]
        yield CaptionRecord(Path(name).stem, resolve_image(manifest.root, name), tuple(c for c, _ in entries),
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
        for lineno, line in read_lines(path):
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                record_error(ManifestError(f"{where}: not valid JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                record_error(ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}"))
                continue
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
                    record_error(ManifestError(f"{where}: more values than header columns ({len(reader.fieldnames)})"))
                    continue
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
    names = require_classnames(manifest)
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
    path = records_file(manifest)
    delimiter = manifest.fields.get("delimiter")
    if not isinstance(manifest.fields.get("columns") or {}, dict):
        raise ManifestError(f"{manifest.path}: field 'columns' must be a mapping such as {{image: filepath, caption: title}}")
    if manifest.kind == "classification":
        for where, row in _table_rows(path, delimiter):
            try:
                image = _pick_column(manifest, "image", row, where, True)
                label = _label_index(manifest, _pick_column(manifest, "label", row, where, True), where)
                rid = _pick_column(manifest, "id", row, where, False)
            except ManifestError as e:
                record_error(e)
                continue
            yield ClassificationRecord(str(rid if rid not in (None, "") else image),
                                       resolve_image(manifest.root, str(image)), label, where, {})
        return
    merged: "OrderedDict[tuple[str, str], list]" = OrderedDict()
    for where, row in _table_rows(path, delimiter):
        try:
            image = _pick_column(manifest, "image", row, where, True)
            if image is None or str(image) == "":
                raise ManifestError(f"{where}: empty image path")
            caps = _as_captions(_pick_column(manifest, "caption", row, where, True))
            rid = _pick_column(manifest, "id", row, where, False)
        except ManifestError as e:
            record_error(e)
            continue
        rid = str(rid) if rid not in (None, "") else str(image)
        entry = merged.setdefault((rid, str(image)), [where, [], []])
        entry[1].extend(caps)
        entry[2].extend([where] * len(caps))
    for (rid, image), (where, caps, sources) in merged.items():
        yield CaptionRecord(rid, resolve_image(manifest.root, image), tuple(caps), where, {"caption_sources": sources})


# -------------------------------------------------------------------------------------- labels_txt
@register_reader("labels_txt")
def read_labels_txt(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """Whitespace-separated lines ``IMAGE LABEL ...`` (lines starting with ``#`` are comments).

    Fields: ``image_pattern`` (``"{}.jpg"`` turns the image column into a file name; default ``"{}"``),
    ``image_column`` (0), ``label_column`` (1), ``label_by`` (``index`` or ``name``), ``index_base``
    (1 for 1-based class indices), ``maxsplit`` (split each line at most this often, so a label with
    spaces stays whole: FGVC-Aircraft's ``1514522 Cessna 172`` needs ``maxsplit: 1``).
    """
    path = records_file(manifest)
    f = manifest.fields
    pattern = str(f.get("image_pattern", "{}"))
    icol, lcol = int(f.get("image_column", 0)), int(f.get("label_column", 1))
    label_by = f.get("label_by", "index")
    base = int(f.get("index_base", 0))
    maxsplit = f.get("maxsplit")
    maxsplit = -1 if maxsplit is None else int(maxsplit)
    names = {n: i for i, n in enumerate(manifest.classnames or [])}
    for lineno, line in read_lines(path):
        if line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        parts = line.strip().split(None, maxsplit)
        if max(icol, lcol) >= len(parts):
            record_error(ManifestError(f"{where}: expected at least {max(icol, lcol) + 1} columns, got {len(parts)} "
                                       f"in {line[:80]!r}"))
            continue
        raw = parts[lcol].strip()
        if label_by == "name":
            if raw not in names:
                record_error(ManifestError(f"{where}: label {raw!r} is not one of the manifest's classnames"))
                continue
            label = names[raw]
        else:
            if not re.fullmatch(r"-?\d+", raw):
                record_error(ManifestError(f"{where}: label column {lcol} is {raw!r}, not an integer (label_by: index)"))
                continue
            label = int(raw) - base
        image = pattern.format(parts[icol])
        yield ClassificationRecord(parts[icol], resolve_image(manifest.root, image), label, where, {})


# ------------------------------------------------------------------------------------------ cub200
@register_reader("cub200")
def read_cub200(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """CUB_200_2011 with its own index files: ``root`` is the CUB_200_2011 folder holding
    ``images.txt`` ("1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"),
    ``image_class_labels.txt`` ("1 1", 1-based classes), ``train_test_split.txt`` ("1 0", 1 = train)
    and ``images/``. ``split``: test (default, 5,794 images), train or all. Record id = image id."""
    root = manifest.root
    split = split_values(manifest, "test", ("train", "test", "all"))

    def table(name: str) -> dict[str, tuple[str, str]]:
        path = root / name
        if not path.is_file():
            raise ManifestError(f"{manifest.path}: CUB file not found: {path} (root must be the CUB_200_2011 folder)")
        out = {}
        for lineno, line in read_lines(path):
            parts = line.split(None, 1)
            if len(parts) != 2:
                record_error(ManifestError(f"{path}:{lineno}: expected 'IMAGE_ID VALUE', got {line[:80]!r}"))
                continue
            out[parts[0]] = (parts[1].strip(), f"{path}:{lineno}")
        return out

    images, labels, splits = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    for image_id, (rel, where) in images.items():
        missing = [name for other, name in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt"))
                   if image_id not in other]
        if missing:
            record_error(ManifestError(f"{where}: image id {image_id} has no entry in {root / missing[0]}"))
            continue
        is_train = splits[image_id][0] == "1"
        if "all" not in split and (("train" in split) != is_train):
            continue
        lab = labels[image_id][0]
        if not lab.isdigit():
            record_error(ManifestError(f"{labels[image_id][1]}: class {lab!r} is not an integer"))
            continue
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
    path = records_file(manifest)
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
        yield ClassificationRecord(fname, resolve_image(manifest.root, fname), int(cls) - 1,
                                   f"{path}: annotations[{i}]", {})


@register_reader("flowers102")
def read_flowers102(manifest: Manifest) -> Iterator[ClassificationRecord]:
    """Oxford Flowers-102: ``root`` holds ``imagelabels.mat`` (``labels``, 1-based, one per image),
    ``setid.mat`` (``trnid``/``valid``/``tstid``, 1-based image numbers) and ``jpg/image_00001.jpg``.
    ``split``: test (default, 6,149 images), train, val or all."""
    root = manifest.root
    split = split_values(manifest, "test", ("train", "val", "test", "all"))
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
            record_error(ManifestError(f"{root / 'setid.mat'}: image number {n} is outside imagelabels.mat's "
                                       f"{len(lab)} labels"))
            continue
        name = f"image_{n:05d}.jpg"
        yield ClassificationRecord(name, str(root / "jpg" / name), lab[n - 1] - 1, f"{root / 'imagelabels.mat'}: labels[{n - 1}]", {})
