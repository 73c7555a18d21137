"""Reading record images: plain files and members of WebDataset tar shards.

A record's ``image`` is a path or a ``"<shard path>::<member name>"`` locator
(:data:`~clip_refine_lab.data.manifest.LOCATOR_SEP`). :func:`load_image` opens either as an RGB PIL
image; :func:`read_image_bytes` returns the raw bytes (what the data check and the leakage hashes
read). Members of uncompressed shards are read by seeking to their offset, found once per shard and
kept in a small index, so random access into a shard costs one seek instead of a scan.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict

from .manifest import LOCATOR_SEP, ManifestError


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
    """(shard path, member name) of a ``"shard.tar::member"`` locator; (path, None) of a plain path."""
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


def load_image(locator: str):
    """Open a record's image (a path or a ``"shard.tar::member"`` locator) as an RGB PIL image; a missing
    or corrupt image raises ManifestError naming it."""
    from PIL import Image, UnidentifiedImageError

    if LOCATOR_SEP in str(locator):
        return decode_image(read_image_bytes(locator), locator)
    try:
        with Image.open(locator) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ManifestError(f"image file not found: {locator}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ManifestError(f"cannot read image {locator}: {e}") from None
