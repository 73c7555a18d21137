"""Map-style torch datasets over manifest records: caption pairs for training, images for encoding.

Both are plain indexables (``__len__`` / ``__getitem__``) that a DataLoader can wrap; WebDataset shards
are streamed with :class:`clip_refine_lab.data.webdataset.WebDatasetPairs` instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .images import load_image
from .manifest import CaptionRecord, ManifestError, Record


def bad_sample_error(record: Record, problem: object, manifest: object = None, *, skippable: bool = False) -> ManifestError:
    """The one-line error of a record that cannot be used once work has started: where the record is
    (its manifest line or JSON entry), what is wrong, and what to do."""
    command = f"clip-refine-lab data check {manifest or 'MANIFEST'}"
    remedy = f"check every record with `{command}`"
    if skippable:
        remedy += ", or pass --on-bad-sample skip to leave such records out (the same run name resumes)"
    return ManifestError(f"{record.source or record.image} [id {record.id}]: {problem}; {remedy}")


def _load(record: Record, preprocess, manifest: object, skippable: bool):
    try:
        return preprocess(load_image(record.image))
    except ManifestError as e:
        raise bad_sample_error(record, e, manifest, skippable=skippable) from None


class CaptionPairs:
    """Map-style dataset of (image tensor, caption tokens, index) for training.

    Each item uses one caption of its image, drawn deterministically from (seed, epoch, index) so
    that a resumed run sees exactly the captions an uninterrupted run would (the paper uses one
    random caption per image per step). Index with ``(index, epoch)`` — what the trainer's sampler
    yields, so DataLoader workers need no shared state — or with a plain index after :meth:`set_epoch`.
    """

    def __init__(self, records: Sequence[CaptionRecord], preprocess, tokenizer, seed: int = 0,
                 image_cache: "Any | None" = None, *, manifest: object = None, skippable: bool = True):
        self.records = list(records)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.image_cache = image_cache  # optional: indexable of preprocessed image tensors
        self.manifest, self.skippable = manifest, skippable  # for the error naming a bad record

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def caption_index(self, index: int, epoch: int | None = None) -> int:
        n = len(self.records[index].captions)
        if n == 1:
            return 0
        return int(np.random.default_rng((self.seed, self.epoch if epoch is None else epoch, index)).integers(n))

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        rec = self.records[index]
        if not rec.captions:
            raise bad_sample_error(rec, "the record has no caption", self.manifest, skippable=self.skippable)
        if self.image_cache is not None:
            image = self.image_cache[index]
        else:
            image = _load(rec, self.preprocess, self.manifest, self.skippable)
        caption = rec.captions[self.caption_index(index, epoch)]
        tokens = self.tokenizer([caption])[0]
        return image, tokens, index


class Images:
    """Map-style dataset of (preprocessed image, index) for feature extraction."""

    def __init__(self, records: Sequence[Record], preprocess, *, manifest: object = None, skippable: bool = False):
        self.records = list(records)
        self.preprocess = preprocess
        self.manifest, self.skippable = manifest, skippable  # for the error naming a bad record

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return _load(self.records[index], self.preprocess, self.manifest, self.skippable), index
