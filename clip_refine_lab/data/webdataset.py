"""WebDataset tar shards: listing, streaming for training, and writing.

Shards are the ones img2dataset writes: ``{key}.jpg`` + ``{key}.txt`` (+ ``{key}.json``), the members
of one key consecutive. :func:`read_webdataset` (the ``webdataset`` reader) lists every sample as a
record whose image is a ``"<shard>::<member>"`` locator; the trainer instead streams the shards with
:class:`WebDatasetPairs`, which deals each epoch's seeded shard order to the (rank, DataLoader worker)
slots so every shard is read once per epoch. :func:`manifest_num_samples` gives the epoch length
without reading the shards, and :func:`write_tar_shards` writes new shards (CLIP-score filtering).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .formats import manifest_data_root
from .images import decode_image
from .manifest import (
    LOCATOR_SEP,
    CaptionRecord,
    ClassificationRecord,
    Manifest,
    ManifestError,
    Record,
    expand_path,
    record_error,
    register_reader,
)

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# ---------------------------------------------------------------------------------------- shards
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
    image = ``"<shard>::<member>"`` (read with :func:`clip_refine_lab.data.images.load_image`). This
    lists every sample of every shard (a sequential pass over the tars, images not decoded); for
    training at scale stream with :class:`WebDatasetPairs` instead.
    """
    img_exts, cap_ext, lab_ext = _wds_exts(manifest)
    want = {cap_ext, lab_ext, "json"}
    for shard in manifest_shards(manifest):
        if not shard.is_file():
            record_error(ManifestError(f"{manifest.path}: field 'shards': shard not found: {shard}"))
            continue
        try:  # a corrupt shard is reported and the next one read (data check reports every one)
            for i, sample in enumerate(iter_tar_samples(shard, want=lambda e: e in want)):
                try:
                    record = _wds_record(sample, manifest.kind, img_exts, cap_ext, lab_ext, i)
                except ManifestError as e:
                    record_error(e)
                    continue
                yield record
        except ManifestError as e:
            record_error(e)


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
        self.manifest: Path | None = None  # named in the error about a bad sample

    @classmethod
    def from_manifest(cls, manifest: Manifest, preprocess: Callable, tokenizer: Callable,
                      shards: Sequence[str | os.PathLike] | None = None, **kwargs) -> "WebDatasetPairs":
        """Stream a ``webdataset`` manifest: all its shards, or ``shards`` (a subset, e.g. the training ones)."""
        img_exts, cap_ext, _ = _wds_exts(manifest)
        shards = manifest_shards(manifest) if shards is None else shards
        pairs = cls([str(s) for s in shards], preprocess, tokenizer, image_ext=img_exts, caption_ext=cap_ext, **kwargs)
        pairs.manifest = manifest.path
        return pairs

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
        """A sample that cannot be used: raise naming it and the remedy, or count it and name it on stderr
        (the streaming trainer never lists the shards, so this line is where a skipped sample is named)."""
        if self.on_bad_sample == "raise":
            raise ManifestError(f"{msg}; check the shards with `clip-refine-lab data check {self.manifest or 'MANIFEST'}`,"
                                " or pass --on-bad-sample skip to leave such samples out (the same run name resumes)")
        self.skipped += 1
        print(f"on_bad_sample=skip: left out {msg}", file=sys.stderr)

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
