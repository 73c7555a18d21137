"""Data check of a manifest: its fields, every record and every image, reported by kind of problem.

* :func:`check_manifest` reads a manifest and every record and image, and reports problems by kind
  (missing files, corrupt images, empty captions, duplicate ids, labels out of range, class folders
  that match no class, classes without images, ...), with counts and the first offenders located by
  ``file:line`` or JSON record index. :func:`run_data_check` prints it and returns an exit code
  (the CLI's ``clip-refine-lab data check MANIFEST``).
* :func:`validate_manifest_fields` checks a manifest's fields against the schema of its format
  (:data:`clip_refine_lab.data.formats.FORMAT_SPECS`): required and unknown fields, types.
* :func:`is_readable` tells whether one record can be used (for the trainer's ``on_bad_sample: skip``).

Overlap between training and evaluation images is checked by :mod:`clip_refine_lab.data.leakage`.
"""

from __future__ import annotations

import difflib
import io
import os
import sys
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .formats import COMMON_FIELDS, FORMAT_SPECS
from .imagefolder import scan_imagefolder
from .images import read_image_bytes, split_locator
from .manifest import (
    KINDS,
    CaptionRecord,
    ClassificationRecord,
    Manifest,
    ManifestError,
    Record,
    collect_record_errors,
    get_reader,
    load_manifest,
)

# kind -> (severity, what it means)
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "unknown_field": ("error", "manifest field that its format does not read (a misspelt field is ignored)"),
    "schema": ("error", "manifest fields do not match the format's schema"),
    "structure": ("error", "the records could not be read (the reader stopped here)"),
    "bad_record": ("error", "a record or line could not be read (the reader went on with the next)"),
    "no_records": ("error", "the manifest yields no records"),
    "missing_file": ("error", "image file not found"),
    "unreadable_image": ("error", "image cannot be opened or decoded (corrupt or truncated)"),
    "no_captions": ("error", "record has no caption"),
    "empty_caption": ("error", "caption is empty or blank"),
    "non_text_caption": ("error", "caption is not a string"),
    "duplicate_id": ("error", "record id used more than once"),
    "label_out_of_range": ("error", "label is not a valid class index"),
    "unknown_class_folder": ("error", "image folder matches no class of 'classnames'"),
    "class_without_images": ("warning", "class of 'classnames' has no images"),
    "duplicate_image": ("warning", "the same image file is used by several records"),
}


@dataclass
class Offender:
    where: str  # "file:line", "file: images[3]", ...
    record_id: str | None
    detail: str

    def format(self) -> str:
        rid = f" [id {self.record_id}]" if self.record_id is not None else ""
        return f"{self.where}{rid}: {self.detail}"


@dataclass
class Problem:
    kind: str
    severity: str
    description: str
    count: int = 0
    offenders: list[Offender] = field(default_factory=list)


@dataclass
class CheckReport:
    """What :func:`check_manifest` found. ``ok`` is True when there is no error (warnings allowed)."""

    manifest: str
    name: str = ""
    kind: str = ""
    format_name: str = ""
    num_records: int = 0
    num_images_checked: int = 0
    problems: "OrderedDict[str, Problem]" = field(default_factory=OrderedDict)
    max_offenders: int = 20

    def add(self, kind: str, where: str, record_id: str | None, detail: str) -> None:
        severity, description = PROBLEM_KINDS[kind]
        p = self.problems.get(kind)
        if p is None:
            p = self.problems[kind] = Problem(kind, severity, description)
        p.count += 1
        if len(p.offenders) < self.max_offenders:
            p.offenders.append(Offender(where, record_id, detail))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems.values() if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems.values() if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        return {k: p.count for k, p in self.problems.items()}

    def to_dict(self) -> dict:
        return {
            "manifest": self.manifest, "name": self.name, "kind": self.kind, "format": self.format_name,
            "num_records": self.num_records, "num_images_checked": self.num_images_checked, "ok": self.ok,
            "problems": {k: {"severity": p.severity, "description": p.description, "count": p.count,
                             "offenders": [o.__dict__ for o in p.offenders]} for k, p in self.problems.items()},
        }

    def format(self) -> str:
        head = f"Data check of {self.name or '?'} ({self.manifest})"
        lines = [head, f"  format {self.format_name or '?'}, kind {self.kind or '?'}: {self.num_records:,} records, "
                        f"{self.num_images_checked:,} images checked"]
        for title, group in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if not group:
                continue
            lines.append(f"  {title}")
            for p in group:
                lines.append(f"    {p.kind}: {p.count:,} ({p.description})")
                for o in p.offenders:
                    lines.append(f"      - {o.format()}")
                if p.count > len(p.offenders):
                    lines.append(f"      ... and {p.count - len(p.offenders):,} more")
        if self.ok:
            lines.append("  OK" + (f" ({sum(p.count for p in self.warnings):,} warnings)" if self.warnings else ""))
        else:
            n = sum(p.count for p in self.errors)
            lines.append(f"  FAILED: {n:,} error(s) of {len(self.errors)} kind(s); fix them or drop those records "
                         f"(refine --on-bad-sample skip leaves out, and lists, records whose image is missing or "
                         f"unreadable or that have no usable caption)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ schema
def known_fields(fmt: Any) -> set[str] | None:
    """Every field a manifest of format ``fmt`` may carry (None for an unknown format)."""
    spec = FORMAT_SPECS.get(fmt) if isinstance(fmt, str) else None
    if spec is None:
        return None
    return set(COMMON_FIELDS) | {"records"} | set(spec.required) | set(spec.optional)


def unknown_fields(fields: dict) -> list[str]:
    """Fields that neither every manifest nor the manifest's format defines (typos such as ``colums``)."""
    known = known_fields(fields.get("format"))
    return [] if known is None else [k for k in fields if k not in known]


def unknown_field_message(key: str, fmt: str) -> str:
    """One line about an unknown field: the closest known field when there is one, else where free text goes."""
    close = difflib.get_close_matches(str(key), sorted(known_fields(fmt) or ()), n=1)
    hint = (f"did you mean '{close[0]}'?" if close else
            "free text goes under 'description' or 'notes'; data_manifests/README.md lists each format's fields")
    return f"unknown field '{key}' for format '{fmt}' ({hint})"


def validate_manifest_fields(fields: Any, allow_unknown: bool = False) -> list[str]:
    """Problems with a manifest's fields (empty list if none): required, unknown and mistyped fields.

    Checks the common fields (name, kind, format, root, records, classnames, templates, source,
    layout, ...) and the fields of the format named by ``format`` (see FORMAT_SPECS). Unknown fields
    are problems unless ``allow_unknown`` (the data check reports them as a kind of their own,
    ``unknown_field``, with the closest known field).
    """
    if not isinstance(fields, dict):
        return [f"expected a mapping of fields, got {type(fields).__name__}"]
    out: list[str] = []
    for key in ("name", "kind", "format"):
        if key not in fields:
            out.append(f"missing field '{key}'")
    for key in ("name", "format", "root", "records", "source", "layout", "description", "notes"):
        if key in fields and not isinstance(fields[key], str):
            out.append(f"field '{key}' must be a string, got {type(fields[key]).__name__}")
    if isinstance(fields.get("name"), str) and not fields["name"].strip():
        out.append("field 'name' is empty")
    kind = fields.get("kind")
    if "kind" in fields and kind not in KINDS:
        out.append(f"field 'kind' must be one of {list(KINDS)}, got {kind!r}")
    fmt = fields.get("format")
    spec = FORMAT_SPECS.get(fmt) if isinstance(fmt, str) else None
    if "format" in fields and spec is None:
        out.append(f"unknown format {fmt!r}; known formats: {', '.join(sorted(FORMAT_SPECS))}")
    if spec is not None:
        if kind in KINDS and kind not in spec.kinds:
            out.append(f"format '{fmt}' holds {' or '.join(spec.kinds)} data, not kind '{kind}'")
        for key in spec.required:
            if key not in fields:
                out.append(f"missing field '{key}' (required by format '{fmt}')")
        if not allow_unknown:
            out.extend(unknown_field_message(key, fmt) for key in unknown_fields(fields))
    out.extend(_check_types(fields))
    if "probe" in fields and not isinstance(fields["probe"], bool):
        out.append(f"field 'probe' must be true or false, got {fields['probe']!r}")
    if fields.get("probe") is True and kind != "classification":
        out.append("field 'probe' applies to classification manifests only")
    if kind == "classification":
        names = fields.get("classnames")
        if names is None:
            out.append("field 'classnames' is required for classification manifests")
        elif not isinstance(names, list) or not names or not all(isinstance(c, str) and c.strip() for c in names):
            out.append("field 'classnames' must be a non-empty list of non-empty strings")
        # Repeated names are allowed: OpenAI's ImageNet list has two 'missile' and two 'sunglasses'
        # classes (different WordNet ids); 'class_folders' or the labels tell them apart.
        templates = fields.get("templates")
        if templates is not None:
            if not isinstance(templates, list) or not templates:
                out.append("field 'templates' must be a non-empty list of strings")
            else:
                for i, t in enumerate(templates):
                    if not isinstance(t, str) or "{c}" not in t:
                        out.append(f"field 'templates' item {i} must be a string containing '{{c}}', got {t!r}")
        folders = fields.get("class_folders")
        if isinstance(folders, list) and isinstance(names, list) and len(folders) != len(names):
            out.append(f"field 'class_folders' has {len(folders)} entries, 'classnames' {len(names)}")
    elif kind == "captions":
        for key in ("classnames", "templates"):
            if key in fields:
                out.append(f"field '{key}' is for classification manifests, not captions")
    return out


def _check_types(f: dict) -> list[str]:
    out = []

    def is_str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    if "split" in f and not (isinstance(f["split"], str) or is_str_list(f["split"])):
        out.append("field 'split' must be a string or a list of strings")
    for key in ("split_file", "split_ext", "image_pattern", "delimiter", "caption_ext", "label_ext"):
        if key in f and not isinstance(f[key], str):
            out.append(f"field '{key}' must be a string")
    if "image_pattern" in f and isinstance(f["image_pattern"], str) and "{}" not in f["image_pattern"]:
        out.append("field 'image_pattern' must contain '{}' (the image column's value), e.g. '{}.jpg'")
    for key in ("image_column", "label_column", "index_base", "maxsplit"):
        if key in f and (isinstance(f[key], bool) or not isinstance(f[key], int)):
            out.append(f"field '{key}' must be an integer")
    if "label_by" in f and f["label_by"] not in ("auto", "index", "name"):
        out.append(f"field 'label_by' must be auto, index or name, got {f['label_by']!r}")
    if "columns" in f:
        cols = f["columns"]
        if not isinstance(cols, dict):
            out.append("field 'columns' must be a mapping, e.g. {image: filepath, caption: title}")
        else:
            for role, col in cols.items():
                if role not in ("id", "image", "caption", "captions", "label"):
                    out.append(f"field 'columns': unknown role {role!r} (use id, image, caption, label)")
                elif not (isinstance(col, str) or (role in ("caption", "captions") and is_str_list(col))):
                    out.append(f"field 'columns.{role}' must be a column name"
                               + (" or a list of names" if role.startswith("caption") else ""))
    if "shards" in f and not (isinstance(f["shards"], str) or (is_str_list(f["shards"]) and f["shards"])):
        out.append("field 'shards' must be a string (brace pattern) or a non-empty list of strings")
    for key in ("image_ext", "extensions", "ignore_folders"):
        if key in f and not (isinstance(f[key], str) or is_str_list(f[key])):
            out.append(f"field '{key}' must be a string or a list of strings")
    if "class_folders" in f and not (f["class_folders"] == "index" or is_str_list(f["class_folders"])):
        out.append("field 'class_folders' must be a list of folder names (one per class) or 'index'")
    return out


# -------------------------------------------------------------------------------------- image check
def image_problem(locator: str) -> tuple[str, str] | None:
    """None if the image opens and decodes, else (problem kind, detail)."""
    from PIL import Image

    path, member = split_locator(locator)
    try:
        if member is None:
            if not os.path.isfile(path):
                return "missing_file", "no such file"
            src: Any = path
        else:
            try:
                src = io.BytesIO(read_image_bytes(locator))
            except ManifestError as e:
                return "missing_file", str(e)
        with Image.open(src) as im:
            im.verify()
        if hasattr(src, "seek"):
            src.seek(0)
        with Image.open(src) as im:
            im.load()
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ValueError, ...
        return "unreadable_image", f"{type(e).__name__}: {e}"
    return None


def is_readable(record: Record) -> str | None:
    """None if ``record`` can be used (image decodes; a caption record has a non-empty text caption;
    a classification label is a non-negative int), else a one-line description of the problem."""
    if isinstance(record, CaptionRecord):
        caps = record.captions
        if not caps:
            return "no captions"
        if not any(isinstance(c, str) and c.strip() for c in caps):
            return "no non-empty text caption"
    elif isinstance(record, ClassificationRecord):
        if isinstance(record.label, bool) or not isinstance(record.label, int) or record.label < 0:
            return f"invalid label {record.label!r}"
    problem = image_problem(record.image)
    return None if problem is None else f"{problem[0].replace('_', ' ')}: {problem[1]}"


def clean_captions(record: CaptionRecord) -> CaptionRecord | None:
    """``record`` with only its non-empty text captions (None if none is left): a record may mix good
    and empty captions, and training draws one caption per step."""
    import dataclasses

    good = tuple(c for c in record.captions if isinstance(c, str) and c.strip())
    if not good:
        return None
    return record if len(good) == len(record.captions) else dataclasses.replace(record, captions=good)


# -------------------------------------------------------------------------------------- data check
def iter_progress(it: Iterable, progress: bool, total: int | None, desc: str):
    """``it`` with a tqdm bar on stderr when ``progress`` (images checked or hashed)."""
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def check_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None, max_offenders: int = 20,
                   progress: bool = True, *, check_images: bool = True, workers: int | None = None) -> CheckReport:
    """Check a manifest, its records and its images; never raises for data problems.

    Reports (see PROBLEM_KINDS) every problem of a file in one pass: unknown fields (with the closest
    known one) and schema problems; records or lines a reader cannot parse (``bad_record``: a bad
    JSON line, CSV row or annotation; the reader goes on with the next), or ``structure`` when the
    reader cannot go on (the records file is missing or is not JSON at all); missing and unreadable
    images (open + verify + full decode), records without captions, empty or non-text captions,
    duplicate ids, labels outside 0..num_classes-1, image folders matching no class (imagefolder),
    classes without images (warning) and image files used by several records (warning). Each
    problem keeps a count and the first ``max_offenders`` offenders with their location
    (``record.source``: "file:line" or "file: images[i]").
    ``check_images=False`` skips opening images; ``workers`` threads decode images (default: up to 8).
    """
    return check_manifest_records(path, data_root, max_offenders, progress, check_images=check_images,
                                  workers=workers)[0]


def check_manifest_records(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                           max_offenders: int = 20, progress: bool = True, *, check_images: bool = True,
                           workers: int | None = None) -> tuple[CheckReport, list[Record]]:
    """:func:`check_manifest`'s report and the records it read (for checks that go on with them)."""
    report = CheckReport(str(path), max_offenders=max_offenders)
    try:
        manifest = load_manifest(path, data_root=data_root)
    except ManifestError as e:
        _report_unloadable(path, e, report)
        return report, []
    report.name, report.kind, report.format_name = manifest.name, manifest.kind, manifest.format
    for key in unknown_fields(manifest.fields):
        report.add("unknown_field", str(manifest.path), None, unknown_field_message(key, manifest.format))
    for msg in validate_manifest_fields(manifest.fields, allow_unknown=True):
        report.add("schema", str(manifest.path), None, msg)
    records = _read_records(manifest, report)
    report.num_records = len(records)
    if not records and not {"structure", "bad_record"} & set(report.problems):
        report.add("no_records", str(manifest.path), None, "no records (check 'root', 'records', 'split' and the layout)")

    _check_records(manifest, records, report)
    if check_images and records:
        _check_images(records, report, progress, workers)
    return report, records


def _report_unloadable(path: str | os.PathLike, error: ManifestError, report: CheckReport) -> None:
    """A manifest that does not load: every field problem found, then the loader's own message unless
    a field problem says the same already."""
    import yaml

    messages: list[str] = []
    try:
        fields = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception:  # not there, not text or not YAML: the loader's message says which
        fields = None
    if isinstance(fields, dict):
        fmt = fields.get("format")
        for key in unknown_fields(fields):
            report.add("unknown_field", str(path), None, unknown_field_message(key, fmt))
        messages = validate_manifest_fields(fields, allow_unknown=True)
        for msg in messages:
            report.add("schema", str(path), None, msg)
    if not any(msg in str(error) for msg in messages):
        report.add("structure", "manifest", None, str(error))


def _read_records(manifest: Manifest, report: CheckReport) -> list[Record]:
    """Every record the reader can read; the lines or records it cannot are reported and skipped."""
    records: list[Record] = []
    with collect_record_errors() as bad:
        try:
            if manifest.format == "imagefolder":
                scan = scan_imagefolder(manifest)
                records = list(scan.records)
                for key, n in sorted(scan.unknown_folders.items()):
                    report.add("unknown_class_folder", scan.unknown_examples[key], None,
                               f"folder {key!r} ({n:,} images) matches no class; map it with 'class_folders' or "
                               f"list it in 'ignore_folders'")
            else:
                for rec in get_reader(manifest.format)(manifest):
                    records.append(rec)
        except ManifestError as e:
            report.add("structure", f"reader '{manifest.format}'", None, str(e))
        except Exception as e:  # a reader bug or an unexpected file: still report, do not crash the check
            report.add("structure", f"reader '{manifest.format}'", None, f"{type(e).__name__}: {e}")
    for e in bad:
        report.add("bad_record", f"reader '{manifest.format}'", None, str(e))
    return records


def _check_records(manifest: Manifest, records: Sequence[Record], report: CheckReport) -> None:
    first_seen: dict[str, str] = {}
    image_seen: dict[str, str] = {}
    n_classes = len(manifest.classnames) if manifest.classnames else None
    label_counts: Counter = Counter()
    for rec in records:
        if rec.id in first_seen:
            report.add("duplicate_id", rec.source, rec.id, f"id {rec.id!r} already used at {first_seen[rec.id]}")
        else:
            first_seen[rec.id] = rec.source
        if rec.image in image_seen:
            report.add("duplicate_image", rec.source, rec.id, f"{rec.image} is also used at {image_seen[rec.image]}")
        else:
            image_seen[rec.image] = rec.source
        if isinstance(rec, CaptionRecord):
            sources = rec.meta.get("caption_sources") or []
            if not rec.captions:
                report.add("no_captions", rec.source, rec.id, f"image {rec.image} has no caption")
            for k, cap in enumerate(rec.captions):
                where = sources[k] if k < len(sources) else rec.source
                if not isinstance(cap, str):
                    report.add("non_text_caption", where, rec.id, f"caption {k} is {type(cap).__name__} {cap!r:.60}")
                elif not cap.strip():
                    report.add("empty_caption", where, rec.id, f"caption {k} is {'empty' if not cap else 'blank'}")
        else:
            label = rec.label
            bad = isinstance(label, bool) or not isinstance(label, int) or label < 0 or (
                n_classes is not None and label >= n_classes)
            if bad:
                rng = f"0..{n_classes - 1}" if n_classes else "a non-negative integer"
                report.add("label_out_of_range", rec.source, rec.id, f"label {label!r} is outside {rng}")
            else:
                label_counts[label] += 1
    if manifest.kind == "classification" and manifest.classnames and records:
        for i, name in enumerate(manifest.classnames):
            if label_counts[i] == 0:
                report.add("class_without_images", str(manifest.path), None, f"class {i} {name!r} has no images")


def _check_images(records: Sequence[Record], report: CheckReport, progress: bool, workers: int | None) -> None:
    unique: "OrderedDict[str, Record]" = OrderedDict()
    for rec in records:
        unique.setdefault(rec.image, rec)
    workers = workers or min(8, (os.cpu_count() or 2))
    items = list(unique.items())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda it: image_problem(it[0]), items, chunksize=16)
        for (image, rec), problem in iter_progress(zip(items, results), progress, len(items), "checking images"):
            report.num_images_checked += 1
            if problem is not None:
                report.add(problem[0], rec.source, rec.id, f"{image}: {problem[1]}")


def run_data_check(path: str | os.PathLike, data_root: str | os.PathLike | None = None, *, progress: bool = True,
                   file=None) -> int:
    """Print the data check report of ``path``; return 0 if it has no errors, 1 otherwise."""
    report = check_manifest(path, data_root=data_root, progress=progress)
    print(report.format(), file=file or sys.stdout)
    return 0 if report.ok else 1
