"""Map-style torch datasets over manifest records: caption pairs for training, images for encoding.

Both are plain indexables (``__len__`` / ``__getitem__``) that a DataLoader can wrap; WebDataset shards
are streamed with :class:`clip_refine_lab.data.webdataset.WebDatasetPairs` instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .images import load_image
from .manifest import CaptionRecord, Record


class CaptionPairs:
    """Map-style dataset of (image tensor, caption tokens, index) for training.

    Each item uses one caption of its image, drawn deterministically from (seed, epoch, index) so
    that a resumed run sees exactly the captions an uninterrupted run would (the paper uses one
    random caption per image per step). Index with ``(index, epoch)`` — what the trainer's sampler
    yields, so DataLoader workers need no shared state — or with a plain index after :meth:`set_epoch`.
    """

    def __init__(self, records: Sequence[CaptionRecord], preprocess, tokenizer, seed: int = 0,
                 image_cache: "Any | None" = None):
        self.records = list(records)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.image_cache = image_cache  # optional: indexable of preprocessed image tensors

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
        if self.image_cache is not None:
            image = self.image_cache[index]
        else:
            image = self.preprocess(load_image(rec.image))
        caption = rec.captions[self.caption_index(index, epoch)]
        tokens = self.tokenizer([caption])[0]
        return image, tokens, index


class Images:
    """Map-style dataset of (preprocessed image, index) for feature extraction."""

    def __init__(self, records: Sequence[Record], preprocess):
        self.records = list(records)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.preprocess(load_image(self.records[index].image)), index
