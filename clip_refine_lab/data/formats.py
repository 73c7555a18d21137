"""What each manifest format needs, and the conventions every reader follows.

:data:`FORMAT_SPECS` lists, for each ``format:``, the kinds of data it holds and its required and
optional fields; :func:`clip_refine_lab.data.check.validate_manifest_fields` checks manifests against
it, and ``data_manifests/README.md`` documents each format with an example. The readers live in
:mod:`~clip_refine_lab.data.readers`, :mod:`~clip_refine_lab.data.imagefolder` and
:mod:`~clip_refine_lab.data.webdataset`; each yields the same
:class:`~clip_refine_lab.data.manifest.CaptionRecord` / :class:`~clip_refine_lab.data.manifest.ClassificationRecord`,
so training and evaluation never see the on-disk format.

Caption formats: ``jsonl``, ``coco`` (COCO captions JSON), ``karpathy`` (dataset_flickr30k.json-style
JSON), ``flickr8k`` (Flickr8k.token.txt + a split list), ``csv``/``tsv``/``table`` (CSV, TSV or JSONL with
a column mapping), ``webdataset`` (img2dataset tar shards).
Classification formats: ``jsonl``, ``imagefolder`` (``root/<class>/*.jpg``, optional split list), ``csv``
(path,label), ``labels_txt`` (whitespace-separated "image label" lists such as FGVC-Aircraft's and
Oxford Pets'), ``cub200`` (CUB_200_2011's own index files), ``stanford_cars`` (the devkit's .mat
annotations), ``flowers102`` (imagelabels.mat + setid.mat), ``webdataset`` (``.cls`` members).

Conventions
-----------
* Path-valued fields of a format (``split_file``, ``shards``, ...) are resolved like ``root`` and
  ``records``: relative to the manifest's folder unless absolute, with ``${CLIP_REFINE_LAB_DATA}``
  replaced by the data root (the ``data_root`` given to ``load_manifest`` where it can be recovered,
  else the environment variable).
* Readers raise :class:`~clip_refine_lab.data.manifest.ManifestError` naming the file, the line or
  JSON record, and the field when the input is *structurally* broken (unparseable JSON, a missing key,
  an annotation pointing at an unknown image id, a class name not in ``classnames``). Problems with the
  *content* of a record (a missing or corrupt image file, an empty caption, a label out of range)
  are left for :func:`clip_refine_lab.data.check.check_manifest` to report, and for the trainer to
  skip with :func:`clip_refine_lab.data.check.is_readable`.
* WebDataset samples are addressed as ``"<shard path>::<member name>"``;
  :func:`clip_refine_lab.data.images.load_image` and :func:`~clip_refine_lab.data.images.read_image_bytes`
  read them (and plain paths).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .manifest import DATA_ROOT_ENV, LOCATOR_SEP, Manifest, ManifestError, expand_path

# Fields every manifest may carry, whatever its format.
COMMON_FIELDS = ("name", "kind", "format", "root", "source", "layout", "description", "notes", "license",
                 "citation", "homepage", "classnames", "templates", "filtered_from", "filter",
                 "subset_of",  # written by a sweep's derived training sets (clip_refine_lab.sweep.runner)
                 "task", "style",  # task/style: written by the synthetic world (clip_refine_lab.embedded.world)
                 "probe")  # a classification set reported apart from the zero-shot average (Manifest.is_probe)


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

# Formats the trainer streams (an IterableDataset over shards) instead of listing every record.
STREAMING_FORMATS = ("webdataset",)


def is_streaming(manifest: Manifest) -> bool:
    """Whether the trainer streams this manifest (WebDataset shards) rather than reading it map-style."""
    return manifest.format in STREAMING_FORMATS


# ---------------------------------------------------------------------------- reader helpers
def manifest_data_root(manifest: Manifest) -> str | None:
    """The data root a manifest was loaded with: ``manifest.data_root`` when given, else recovered from
    ``root`` or ``records`` when the manifest wrote them as ``${CLIP_REFINE_LAB_DATA}/...`` (None if unknown)."""
    if manifest.data_root is not None:
        return str(manifest.data_root)
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


def path_field(manifest: Manifest, key: str) -> Path | None:
    """Resolve the path-valued manifest field ``key`` like ``root``/``records`` (None when absent)."""
    raw = manifest.fields.get(key)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, (str, os.PathLike)):
        raise ManifestError(f"{manifest.path}: field '{key}' must be a path string, got {raw!r}")
    return expand_path(str(raw), manifest.path.parent, manifest_data_root(manifest), f"{manifest.path}: field '{key}'")


def records_file(manifest: Manifest) -> Path:
    """The manifest's ``records`` file; ManifestError if the field is missing or the file is not there."""
    path = manifest.records_path
    if path is None:
        raise ManifestError(f"{manifest.path}: missing field 'records' (required by format '{manifest.format}')")
    if not path.is_file():
        raise ManifestError(f"{manifest.path}: field 'records': file not found: {path} "
                            f"(check the data root and the layout described in the manifest)")
    return path


def load_json(path: Path) -> Any:
    """A JSON file's content; ManifestError naming the line and column if it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def resolve_image(root: Path, rel: str) -> str:
    """An image path as written in an index file, resolved against ``root`` (absolute paths and
    ``shard::member`` locators are kept as they are)."""
    return rel if os.path.isabs(rel) or LOCATOR_SEP in rel else str(root / rel)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file, skipping blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None


def require_classnames(manifest: Manifest) -> list[str]:
    """The manifest's ``classnames``; ManifestError if the format needs them and they are missing."""
    if not manifest.classnames:
        raise ManifestError(f"{manifest.path}: field 'classnames' is required for format '{manifest.format}'")
    return manifest.classnames


def split_values(manifest: Manifest, default: str, allowed: Sequence[str]) -> set[str]:
    """The splits named by the manifest's ``split`` field (a name or a list of names from ``allowed``)."""
    value = manifest.fields.get("split", default)
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ManifestError(f"{manifest.path}: field 'split' must be one of {list(allowed)} or a list of them, got {value!r}")
    for v in values:
        if v not in allowed:
            raise ManifestError(f"{manifest.path}: field 'split': unknown split {v!r}; use one of {list(allowed)}")
    return set(values)
