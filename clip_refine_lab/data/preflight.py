"""What a run or an evaluation checks on its manifests before any work starts.

The same checks as ``clip-refine-lab data check`` (:func:`clip_refine_lab.data.check.check_manifest`:
unknown and mistyped fields, records a reader cannot parse, duplicate ids, records without a usable
caption, labels out of range), on the records only, plus a cheap scan of every image: headers read,
not decoded (:func:`image_header_problem`), and the result of a clean scan kept in the cache under
a fingerprint of the image files (paths, sizes, modification times), so a data set that did not
change is scanned once. A problem stops the command with one line naming the manifest, the first
offending record (file and line) and the remedy; the full list is what ``data check`` prints.

* :func:`preflight_manifest`: one manifest, for training (``on_bad_sample="skip"`` lets records
  with a missing or unreadable image or no usable caption through: the trainer leaves them out and
  lists them) or for evaluation.
* :func:`check_suite`: every manifest of an evaluation suite, each against the kind its section needs.

The embedded world's manifests are checked like any other: on the micro world the scan costs about
70 ms the first time and the checks about 6 ms a run after: too little to make them an exception.
Streamed (WebDataset) manifests get the field checks only: listing their records means reading
every shard, which is what streaming avoids; their bad samples are met, and named, as they stream.
The header scan misses an image whose bytes are damaged in the middle (only a full decode finds
that: ``data check`` does one); the trainer then stops at that image naming the manifest line.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..progress import stage
from ..utils import atomic_write_json, cache_dir
from .check import (
    CheckReport,
    check_manifest_records,
    image_problem,
    unknown_field_message,
    unknown_fields,
    validate_manifest_fields,
)
from .formats import is_streaming
from .images import read_image_bytes, split_locator
from .manifest import Manifest, ManifestError, Record, load_manifest

# Problems of a record's own content: with on_bad_sample=skip the trainer leaves such records out.
SKIPPABLE = ("missing_file", "unreadable_image", "no_captions", "empty_caption", "non_text_caption")
SCAN_CACHE = "image-scan"
SCAN_VERSION = 1  # bump when image_header_problem finds more, so cached clean scans are redone
# The last bytes of a complete file: a truncated JPEG or PNG (the usual broken download) lacks them.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL = 64


# ----------------------------------------------------------------------------------- image scan
def image_header_problem(locator: str) -> tuple[str, str] | None:
    """None if the image looks complete, else (problem kind, detail); reads the header and the last bytes.

    A JPEG or PNG whose end marker is missing is decoded in full to make sure (a few encoders add
    trailing bytes after it), so a clean image is never reported."""
    from PIL import Image

    path, member = split_locator(locator)
    try:
        if member is None:
            if not os.path.isfile(path):
                return "missing_file", "no such file"
            with open(path, "rb") as f:
                with Image.open(f) as im:
                    fmt, size = im.format, im.size
                f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL))
                tail = f.read()
        else:
            import io

            data = read_image_bytes(locator)
            with Image.open(io.BytesIO(data)) as im:
                fmt, size = im.format, im.size
            tail = data[-_TAIL:]
    except ManifestError as e:
        return "missing_file", str(e)
    except Exception as e:  # PIL: UnidentifiedImageError, OSError, SyntaxError, ...
        return "unreadable_image", f"{type(e).__name__}: {e}"
    if not size[0] or not size[1]:
        return "unreadable_image", f"image of size {size[0]}x{size[1]}"
    marker = _END_MARKERS.get(fmt or "")
    if marker is not None and marker not in tail:
        return image_problem(locator)
    return None


def _fingerprint(images: Sequence[str]) -> tuple[str, list[str]]:
    """(fingerprint of the image files: paths, sizes, modification times; images whose file is missing)."""
    h = hashlib.sha256(f"scan-v{SCAN_VERSION}".encode())
    missing = []
    for image in images:
        path, _ = split_locator(image)
        try:
            st = os.stat(path)
        except OSError:
            missing.append(image)
            continue
        h.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24], missing


def scan_images(records: Sequence[Record], *, progress: bool = False, workers: int | None = None
                ) -> dict[str, tuple[str, str]]:
    """Image -> (problem kind, detail) for every image of ``records`` that is missing or looks broken
    (:func:`image_header_problem`); {} when all are fine. A clean scan is remembered in the cache
    (``<cache>/image-scan/``) under the files' fingerprint and not repeated."""
    images = list(dict.fromkeys(r.image for r in records))
    fingerprint, missing = _fingerprint(images)
    marker = cache_dir() / SCAN_CACHE / f"{fingerprint}.json"
    if not missing and marker.is_file():
        return {}
    stage(f"Scanning the headers of {len(images):,} images (once per data set)", enabled=progress)
    gone = set(missing)
    todo = [im for im in images if im not in gone]
    problems: dict[str, tuple[str, str]] = {im: ("missing_file", "no such file") for im in missing}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as pool:
        for image, problem in zip(todo, pool.map(image_header_problem, todo, chunksize=64)):
            if problem is not None:
                problems[image] = problem
    if not problems:
        atomic_write_json(marker, {"images": len(images), "version": SCAN_VERSION})
    return problems


# ------------------------------------------------------------------------------------ manifests
def data_check_command(path: str | os.PathLike, data_root: str | os.PathLike | None) -> str:
    root = f" --data-root {data_root}" if data_root is not None else ""
    return f"clip-refine-lab data check {path}{root}"


def _fields_report(manifest: Manifest) -> CheckReport:
    """The field checks of a manifest whose records are not listed (a streamed one)."""
    report = CheckReport(str(manifest.path), manifest.name, manifest.kind, manifest.format)
    for key in unknown_fields(manifest.fields):
        report.add("unknown_field", str(manifest.path), None, unknown_field_message(key, manifest.format))
    for msg in validate_manifest_fields(manifest.fields, allow_unknown=True):
        report.add("schema", str(manifest.path), None, msg)
    return report


def _add_image_problems(report: CheckReport, records: Sequence[Record], problems: dict[str, tuple[str, str]]) -> None:
    done: set[str] = set()
    for rec in records:
        if rec.image in problems and rec.image not in done:
            done.add(rec.image)
            kind, detail = problems[rec.image]
            report.add(kind, rec.source, rec.id, f"{rec.image}: {detail}")


def preflight_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                       kind: str | None = None, on_bad_sample: str = "fail", purpose: str = "training",
                       scan: bool = True, progress: bool = False) -> CheckReport:
    """Check a manifest before a run (``purpose="training"``) or an evaluation uses it; return the report.

    Raises ManifestError, one line, when the data check finds an error (warnings pass), when the
    manifest is not of ``kind``, or when the image scan (``scan``) finds a missing or broken image.
    Under ``on_bad_sample="skip"`` (training only) the problems of a record's own content
    (:data:`SKIPPABLE`) pass: the trainer leaves those records out, and it decodes every image to find
    them, so the scan is not made."""
    path = Path(path)
    try:
        manifest = load_manifest(path, data_root=data_root)
    except ManifestError:
        manifest = None
    records: list[Record] = []
    if manifest is None or not is_streaming(manifest):
        report, records = check_manifest_records(path, data_root=data_root, progress=False, check_images=False)
    else:
        report = _fields_report(manifest)
    skip = on_bad_sample == "skip" and purpose == "training"
    if manifest is not None and kind is not None and manifest.kind != kind:
        raise ManifestError(f"{path}: {purpose} needs a {kind} manifest; this one is kind '{manifest.kind}'")
    if records and report.ok and scan and not skip:
        _add_image_problems(report, records, scan_images(records, progress=progress))
    blocking = [p for p in report.errors if not (skip and p.kind in SKIPPABLE)]
    if blocking:
        raise ManifestError(preflight_message(path, data_root, blocking, purpose=purpose))
    return report


def preflight_message(path: Path, data_root, errors: Sequence[Any], *, purpose: str) -> str:
    """One line: how many problems of which kinds, the first offender, and what to do."""
    total = sum(p.count for p in errors)
    kinds = ", ".join(f"{p.kind} {p.count:,}" for p in errors)
    first = " ".join(errors[0].offenders[0].format().split())
    remedy = f"see every one with `{data_check_command(path, data_root)}` and fix them"
    if purpose == "training" and all(p.kind in SKIPPABLE for p in errors):
        remedy += (", or pass --on-bad-sample skip to leave those records out (they are counted in summary.json "
                   "and listed in the run's skipped_samples.jsonl)")
    noun = "problem" if total == 1 else "problems"
    return f"{path}: {total:,} data {noun} found before {purpose} ({kinds}); first: {first}; {remedy}"


# ---------------------------------------------------------------------------------------- suites
SUITE_SECTIONS = {"zero_shot": "classification", "retrieval": "captions", "geometry": "captions"}


def check_suite(suite: Any, data_root: str | os.PathLike | None = None, *, progress: bool = False) -> None:
    """Check every manifest of an evaluation suite before it is evaluated (ManifestError, one line).

    ``suite`` has the lists of :class:`clip_refine_lab.evaluation.suites.Suite` (``zero_shot``,
    ``retrieval``, ``geometry``: manifest paths; ``linear_probe``: (train, test) pairs); each manifest
    is checked once, against the kind its section needs."""
    wanted: dict[Path, tuple[str, str]] = {}
    for section, kind in SUITE_SECTIONS.items():
        for p in getattr(suite, section, None) or []:
            wanted.setdefault(Path(p), (section, kind))
    for pair in getattr(suite, "linear_probe", None) or []:
        for p in pair:
            wanted.setdefault(Path(p), ("linear_probe", "classification"))
    for path, (section, kind) in wanted.items():
        preflight_manifest(path, data_root, kind=kind, purpose=f"evaluation (suite section '{section}')",
                           progress=progress)
