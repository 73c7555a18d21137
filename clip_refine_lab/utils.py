"""Small shared helpers: the cache directory, atomic writes, JSON lines, stable hashing, seeding.

Everything the toolkit writes to disk (world images, manifests, checkpoints, feature caches) goes
through :func:`atomic_write` or one of its wrappers, so an interrupted process never leaves a
half-written file behind: the bytes go to a temporary file in the same directory, are flushed and
fsynced, and then renamed over the destination (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    Use for writers that insist on a file name (``torch.save``, ``safetensors.save_file``, PIL).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], Any]) -> Path:
    """Write ``data`` (bytes, text, or a callable that writes to a given path) atomically to ``path``."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
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
    """Append one JSON line: the one writer of every ``*.jsonl`` log (run logs, sweep logs)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


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
