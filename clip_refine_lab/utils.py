"""Small shared helpers: the cache directory, atomic writes, JSON lines, stable hashing, seeding.

Everything the toolkit writes to disk (world images, manifests, checkpoints, feature caches) goes
through :func:`atomic_write` or one of its wrappers, so an interrupted process never leaves a
half-written file behind: the bytes go to a temporary file in the same directory, are flushed and
fsynced, and then renamed over the destination (rename is atomic on POSIX file systems).

A write that fails because the disk is full raises :class:`DiskFullError`, one line naming the file,
its folder, the space it needed and the space free; the file it would have replaced is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

CACHE_ENV = "CLIP_REFINE_LAB_CACHE"
PRESET_ENV = "CLIP_REFINE_LAB_PRESET"


def cache_dir() -> Path:
    """The toolkit's cache directory: ``$CLIP_REFINE_LAB_CACHE`` or ``~/.cache/clip_refine_lab``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clip_refine_lab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


class DiskFullError(OSError):
    """A write failed for want of disk space; the message names the file, the folder and the sizes."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# What writers that do not raise OSError say when the disk fills: safetensors (Rust io::Error) and
# torch.save to a path (its zip writer checks the file position after a short write).
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull")
_SHORT_WRITE_WORDS = ("unexpected pos", "file write failed")


def human_size(n: float) -> str:
    """``n`` bytes as a short decimal size: 512 B, 12.3 MB, 1.5 GB."""
    units, i = ("B", "kB", "MB", "GB", "TB"), 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: Path, needed: int | None = None) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk (or the quota) is full."""
    if isinstance(error, DiskFullError):
        return False  # already reported
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error)
    if any(w in text for w in _DISK_FULL_WORDS):
        return True
    if any(w in text for w in _SHORT_WRITE_WORDS):
        free = free_space(folder)
        return free is not None and free < max(needed or 0, 16 * 2**20)
    return False


def disk_full_error(path: Path, *, needed: int | None = None, written: int | None = None) -> DiskFullError:
    """The one-line error for a write of ``path`` that ran out of space."""
    free = free_space(path.parent)
    if needed:
        size = f"needs about {human_size(needed)}"
    elif written:
        size = f"needs more than the {human_size(written)} written before the disk filled"
    else:
        size = "could not be written"
    where = f"{human_size(free)} free there" if free is not None else "free space unknown"
    return DiskFullError(f"disk full: {path.name} in {path.parent} {size} ({where}); free some space or write "
                         "elsewhere (--output-dir, $CLIP_REFINE_LAB_CACHE) and rerun: the files written before are intact")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    Use for writers that insist on a file name (``torch.save``, ``safetensors.save_file``, PIL).
    ``size_hint``: about how many bytes the file takes, for the message when the disk is full.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        written = None
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                written = tmp_path.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if isinstance(e, Exception) and is_disk_full(e, path.parent, size_hint):
            raise disk_full_error(path, needed=size_hint, written=written) from None
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> Path:
    """Write ``data`` (bytes, text, or a callable that writes to a given path) atomically to ``path``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path, size_hint=None if callable(data) else len(data)) as tmp:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object, independent of dict ordering."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line: the one writer of every ``*.jsonl`` log (run logs, sweep logs).

    The line is written whole or not at all: a write that fails (a full disk) cuts the file back to
    where it was, so the log stays readable and a resumed run finds every earlier line."""
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    path = Path(path)
    with open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[f.write(view):]
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(start)
            if is_disk_full(e, path.parent, len(line)):
                raise disk_full_error(path, needed=len(line)) from None
            raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``*.jsonl`` log; an absent file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so CPU runs are bit-for-bit repeatable."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
