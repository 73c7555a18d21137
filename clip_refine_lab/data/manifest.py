"""Data manifests and records: one format for the embedded world and for real data.

A *manifest* is a small YAML file that says what a data set is and where its files are::

    name: synthetic-coco          # free text, used in logs and reports
    kind: captions                # captions | classification
    format: jsonl                 # how the records are stored (see READERS)
    root: images                  # image paths are relative to this folder
    records: synthetic-coco.jsonl # the records file (format-specific)
    classnames: [...]             # classification only
    templates: ["a photo of a {c}."]   # classification only; {c} is the class name
    source: where the data comes from (free text)
    layout: the expected directory layout (free text)

``root`` and ``records`` are relative to the manifest's own folder unless absolute, and may use
environment variables such as ``${CLIP_REFINE_LAB_DATA}`` (the data root, which ``--data-root``
overrides). The ``jsonl`` format has one JSON object a line:
``{"id": "000001", "image": "000001.png", "captions": ["...", "..."]}`` for captions and
``{"id": "000001", "image": "000001.png", "label": 3}`` for classification; other keys (such as the
synthetic world's scene metadata under ``"meta"``) are kept in ``record.meta``.

Other formats (COCO JSON, Karpathy JSON, CSV, WebDataset shards, image folders; see
:mod:`clip_refine_lab.data.formats`) register a reader with :func:`register_reader`; every reader yields
the same :class:`CaptionRecord` or :class:`ClassificationRecord`, so training and evaluation never see
the on-disk format. Images are opened with :func:`clip_refine_lab.data.images.load_image`; the
torch datasets over records are in :mod:`clip_refine_lab.data.datasets`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml

from ..utils import atomic_write

DATA_ROOT_ENV = "CLIP_REFINE_LAB_DATA"
KINDS = ("captions", "classification")
LOCATOR_SEP = "::"  # a record image "shard.tar::member" names a member of a tar shard


class ManifestError(ValueError):
    """A manifest or one of its records is wrong; the message names the file, line and field.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``ManifestError("Caught ManifestError in DataLoader worker process 0.\\nOriginal Traceback ...")``;
    the message is cut back to the original one line here, so the user sees what is wrong and where
    rather than a worker's traceback."""

    def __init__(self, message: object = "", *args):
        if isinstance(message, str) and message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = _original_message(message)
        super().__init__(message, *args)


def _original_message(wrapped: str) -> str:
    """The message of the exception a DataLoader worker caught: the last line's text after ``Type: ``."""
    lines = [line for line in wrapped.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else wrapped
    head, sep, text = last.partition(": ")
    return text if sep and head.split(".")[-1].endswith(("Error", "Exception")) else last


# While data check reads a manifest it collects the records' structural errors here (a bad JSON line,
# an annotation naming an unknown image, ...) and the readers go on with the next line or record, so
# one pass reports every problem of a file. Everywhere else the first such error is raised.
_RECORD_ERRORS: contextvars.ContextVar[list | None] = contextvars.ContextVar("record_errors", default=None)


@contextlib.contextmanager
def collect_record_errors():
    """Within the block, :func:`record_error` appends to the yielded list instead of raising."""
    errors: list[ManifestError] = []
    token = _RECORD_ERRORS.set(errors)
    try:
        yield errors
    finally:
        _RECORD_ERRORS.reset(token)


def record_error(error: ManifestError) -> None:
    """A reader found a record or line it cannot read: raise ``error``, or, inside
    :func:`collect_record_errors`, keep it and return so that the reader skips that record and goes on."""
    errors = _RECORD_ERRORS.get()
    if errors is None:
        raise error
    errors.append(error)


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    image: str  # absolute path, or a "shard.tar::member" locator (LOCATOR_SEP)
    captions: tuple[str, ...]
    source: str = ""  # "file:line" of the record, for error messages
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ClassificationRecord:
    id: str
    image: str
    label: int
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


Record = CaptionRecord | ClassificationRecord


@dataclass
class Manifest:
    path: Path  # the YAML file
    name: str
    kind: str
    format: str
    root: Path  # resolved image root
    records_path: Path | None  # resolved records file (or shard pattern / folder) when the format has one
    classnames: list[str] | None = None
    templates: list[str] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # every key of the YAML, as written
    data_root: str | None = None  # the --data-root this manifest was loaded with, if any

    def records(self) -> list[Record]:
        """All records, read through the reader registered for ``format``."""
        reader = get_reader(self.format)
        return list(reader(self))

    @property
    def num_classes(self) -> int:
        if self.classnames is None:
            raise ManifestError(f"{self.path}: manifest '{self.name}' has no classnames")
        return len(self.classnames)

    @property
    def is_probe(self) -> bool:
        """``probe: true``: a compositional probe (word order, relations; ARO and Winoground are the web-scale
        examples), evaluated and reported like any classification set but left out of the zero-shot average,
        which stays a mean over classification tasks (:func:`clip_refine_lab.metrics.zero_shot_average`)."""
        return self.fields.get("probe") is True

    def prompts(self, classname: str) -> list[str]:
        return [t.replace("{c}", classname) for t in (self.templates or ["a photo of a {c}."])]


# ----------------------------------------------------------------------------------------- readers
READERS: dict[str, Callable[[Manifest], Iterable[Record]]] = {}


def register_reader(fmt: str):
    """Decorator: register ``fn(manifest) -> iterable of records`` for manifests of ``format: fmt``."""

    def wrap(fn):
        READERS[fmt] = fn
        return fn

    return wrap


def get_reader(fmt: str):
    """The reader of ``format: fmt``. The real-data readers register when the package is imported
    (``clip_refine_lab/data/__init__.py``), so every format is known by the time a manifest is read."""
    if fmt not in READERS:
        raise ManifestError(f"unknown manifest format '{fmt}'; known formats: {', '.join(sorted(READERS))}")
    return READERS[fmt]


@register_reader("jsonl")
def read_jsonl_records(manifest: Manifest) -> Iterable[Record]:
    """One JSON object a line (see the module docstring); errors name the file and line."""
    path = manifest.records_path
    if path is None:
        raise ManifestError(f"{manifest.path}: missing field 'records' (required by format 'jsonl')")
    if not path.is_file():
        raise ManifestError(f"{manifest.path}: field 'records': file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield record_from_dict(json.loads(line), manifest.kind, manifest.root, where)
            except json.JSONDecodeError as e:
                record_error(ManifestError(f"{where}: not valid JSON ({e.msg})"))
            except ManifestError as e:
                record_error(e)


def record_from_dict(obj: dict, kind: str, root: Path, where: str) -> Record:
    """Build a record from a plain dict (``id``, ``image``, ``captions``/``caption`` or ``label``)."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "image"):
        if key not in obj:
            raise ManifestError(f"{where}: missing field '{key}'")
    image = str(obj["image"])
    image = image if os.path.isabs(image) or LOCATOR_SEP in image else str(root / image)
    meta = {k: v for k, v in obj.items() if k not in ("id", "image", "captions", "caption", "label")}
    if kind == "captions":
        caps = obj.get("captions", obj.get("caption"))
        if caps is None:
            raise ManifestError(f"{where}: missing field 'captions'")
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ManifestError(f"{where}: field 'captions' must be a string or a list of strings")
        return CaptionRecord(str(obj["id"]), image, tuple(caps), where, meta)
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ManifestError(f"{where}: field 'label' must be an integer class index, got {label!r}")
    return ClassificationRecord(str(obj["id"]), image, label, where, meta)


# ------------------------------------------------------------------------------ loading and writing
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def expand_path(value: str, base: Path, data_root: str | os.PathLike | None, where: str) -> Path:
    """Expand ``${VAR}`` (``data_root`` wins for ${CLIP_REFINE_LAB_DATA}) and resolve against ``base``."""

    def sub(m: re.Match) -> str:
        var = m.group(1) or m.group(2)
        if var == DATA_ROOT_ENV and data_root is not None:
            return str(Path(data_root).expanduser().resolve())
        if var not in os.environ:
            hint = " (pass --data-root or set it to the folder holding your data sets)" if var == DATA_ROOT_ENV else ""
            raise ManifestError(f"{where} uses ${{{var}}}, which is not set{hint}")
        return os.environ[var]

    path = Path(os.path.expanduser(_VAR.sub(sub, str(value))))
    return path if path.is_absolute() else (base / path)


def load_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest YAML file. Errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(fields, dict):
        raise ManifestError(f"{path}: expected a mapping of fields, got {type(fields).__name__}")
    for key in ("name", "kind", "format"):
        if key not in fields:
            raise ManifestError(f"{path}: missing field '{key}'")
    kind = fields["kind"]
    if kind not in KINDS:
        raise ManifestError(f"{path}: field 'kind' must be one of {KINDS}, got {kind!r}")
    base = path.parent
    root = expand_path(fields.get("root", "."), base, data_root, f"{path}: field 'root'")
    records = fields.get("records")
    records_path = expand_path(records, base, data_root, f"{path}: field 'records'") if records else None
    classnames = fields.get("classnames")
    templates = fields.get("templates")
    if "probe" in fields and not isinstance(fields["probe"], bool):
        raise ManifestError(f"{path}: field 'probe' must be true or false, got {fields['probe']!r}")
    if kind == "classification":
        if classnames is not None and (
            not isinstance(classnames, list) or not all(isinstance(c, str) and c.strip() for c in classnames)
        ):
            raise ManifestError(f"{path}: field 'classnames' must be a list of non-empty strings")
        if templates is not None:
            if not isinstance(templates, list) or not templates:
                raise ManifestError(f"{path}: field 'templates' must be a non-empty list of strings")
            for i, t in enumerate(templates):
                if not isinstance(t, str) or "{c}" not in t:
                    raise ManifestError(f"{path}: field 'templates' item {i} must contain '{{c}}', got {t!r}")
    return Manifest(path, str(fields["name"]), kind, str(fields["format"]), root, records_path,
                    classnames, templates, fields, str(data_root) if data_root is not None else None)


def write_manifest(
    path: str | os.PathLike,
    *,
    name: str,
    kind: str,
    records: Sequence[dict],
    root: str = ".",
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    **extra: Any,
) -> Path:
    """Write ``records`` (plain dicts in the jsonl record schema) and a manifest YAML, atomically.

    The records go to ``<path stem>.jsonl`` beside the YAML; the YAML is written last, so a
    manifest that exists always points at a complete records file.
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    records_file = path.with_suffix(".jsonl")
    atomic_write(records_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    fields: dict[str, Any] = {"name": name, "kind": kind, "format": "jsonl", "root": root,
                              "records": records_file.name}
    if classnames is not None:
        fields["classnames"] = list(classnames)
    if templates is not None:
        fields["templates"] = list(templates)
    fields.update(extra)
    atomic_write(path, yaml.safe_dump(fields, sort_keys=False, allow_unicode=True))
    return path


# ---------------------------------------------------------------------------------------- captions
def flatten_captions(records: Sequence[CaptionRecord]) -> tuple[list[str], np.ndarray]:
    """All captions in record order and, for each, the index of its image (for retrieval)."""
    texts: list[str] = []
    owner: list[int] = []
    for i, rec in enumerate(records):
        texts.extend(rec.captions)
        owner.extend([i] * len(rec.captions))
    return texts, np.asarray(owner, dtype=np.int64)
