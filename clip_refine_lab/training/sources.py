"""Where the trainer's batches come from: listed caption pairs, or WebDataset shards streamed.

Both sources give the loop the same things: this rank's batch of every step from a given step on,
this rank's slice of each validation batch, the raw features the ``*-stats`` priors are measured
on, and the counts (pairs, steps per epoch, total steps). A batch is a pure function of the seed,
the epoch and its index, so a resumed run sees exactly the batches of an uninterrupted one.

* :class:`MapSource` lists every record of the manifest, holds out a seeded validation share, and
  draws each epoch's order from (seed, epoch).
* :class:`StreamSource` never lists the records (CC12M-size sets need not fit in memory): whole
  shards are held out for validation and each epoch streams the rest in an order drawn from
  (seed, epoch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..data.datasets import CaptionPairs, Images
from ..data.formats import is_streaming
from ..data.manifest import CaptionRecord, Manifest
from ..features import Subset, encode_images, encode_texts
from ..models.loading import LoadedModel
from ..progress import progress_bar, stage
from .caches import decoded_image_cache

# Streaming: at most this many held-out pairs are read at each validation, and the *-stats priors
# are measured on the first STREAM_STATS_SAMPLES training pairs of the stream.
STREAM_VAL_MAX = 2000
STREAM_STATS_SAMPLES = 10_000
SKIPPED_FILE = "skipped_samples.jsonl"  # the records on_bad_sample=skip left out, one JSON object a line


# ------------------------------------------------------------------------------------ the data
def is_manifest_path(data: str) -> bool:
    """Whether a ``data`` value names a manifest file (else it names a split of the embedded world)."""
    return data.endswith((".yaml", ".yml")) or os.sep in data


def resolve_data(cfg: RunConfig) -> Path:
    """The manifest path of ``cfg.data``: a YAML file, or a split of the built embedded world
    (never builds it: :func:`clip_refine_lab.embedded.base.ensure_world` does)."""
    from ..embedded.base import world_manifest

    data = str(cfg.data)
    if is_manifest_path(data):
        if not Path(data).is_file():
            raise ConfigError(f"data: manifest file not found: {data}")
        return Path(data)
    return world_manifest(data, cfg.preset)


def open_source(cfg: RunConfig, manifest: Manifest, base: LoadedModel, *, rank: int, world_size: int,
                device: torch.device, progress: bool) -> "MapSource | StreamSource":
    """The source for ``manifest``: WebDataset shards stream, every other format is listed."""
    if manifest.kind != "captions":
        raise ConfigError(f"data: {manifest.path} is a {manifest.kind} manifest; "
                          "post-pre-training needs image-caption pairs")
    kind = StreamSource if is_streaming(manifest) else MapSource
    return kind(cfg, manifest, base, rank=rank, world_size=world_size, device=device, progress=progress)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_fraction`` of the pairs (at least one when the fraction is positive), seeded."""
    order = np.random.default_rng((seed, 0x7A1)).permutation(n)
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def collate_pairs(items: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]), [it[2] for it in items])


def screen(records: list[CaptionRecord], on_bad_sample: str, *, progress: bool
           ) -> tuple[list[CaptionRecord], list[dict], int]:
    """The records to train on, those left out (each ``{"where", "id", "image", "reason"}``) and the number
    of captions dropped from kept records: with ``on_bad_sample="skip"``, records whose image cannot be read
    or that have no text caption left after cleaning are left out, and empty or blank captions dropped."""
    if on_bad_sample != "skip":
        return records, [], 0
    from ..data.check import clean_captions, is_readable

    stage(f"Screening {len(records)} samples for unreadable images and empty captions", enabled=progress)
    good, skipped, dropped = [], [], 0
    for r in progress_bar(records, total=len(records), desc="screen samples", enabled=progress, unit="img"):
        cleaned = clean_captions(r)  # drops empty / non-text captions; None when none is left
        reason = "no non-empty text caption" if cleaned is None else is_readable(cleaned)
        if reason is None:
            good.append(cleaned)
            dropped += len(r.captions) - len(cleaned.captions)
        else:
            skipped.append({"where": r.source, "id": r.id, "image": r.image, "reason": reason})
    return good, skipped, dropped


def write_skipped(path: Path, skipped: list[dict]) -> None:
    """Every skipped record, one JSON object a line."""
    from ..utils import atomic_write

    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in skipped))


def skipped_line(skipped: list[dict], manifest: Path, listed_in: Path) -> str:
    first = skipped[0]
    return (f"on_bad_sample=skip: left out {len(skipped)} record(s) of {manifest} with an unreadable image or no "
            f"usable caption, listed in {listed_in} (first: {first['where']} [id {first['id']}]: {first['reason']})")


# ------------------------------------------------------------------------------ batch sizes and steps
def check_batch_sizes(cfg: RunConfig, num_train_pairs: int | None, world_size: int, counted: str = "") -> int:
    """This process's batch size, after checking the global batch against the data and the processes."""
    if num_train_pairs is not None and num_train_pairs < cfg.batch_size:  # type: ignore[operator]
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set "
                          f"({num_train_pairs} pairs after the validation split{counted})")
    if cfg.batch_size % world_size:  # type: ignore[operator]
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world_size})")
    local_batch = cfg.batch_size // world_size  # type: ignore[operator]
    if local_batch % cfg.accum_steps:
        raise ConfigError(f"per-process batch {local_batch} must be divisible by accum_steps ({cfg.accum_steps})")
    return local_batch


def plan_steps(cfg: RunConfig, num_train_pairs: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps); a stream of unknown length is one epoch of ``max_steps``."""
    if num_train_pairs is None:
        return cfg.max_steps, cfg.max_steps  # type: ignore[return-value]
    steps_per_epoch = num_train_pairs // cfg.batch_size  # type: ignore[operator]
    total_steps = max(1, int(round(steps_per_epoch * cfg.epochs)))  # type: ignore[operator]
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


class _Batches(torch.utils.data.Sampler):
    """A batch sampler over a precomputed sequence of index lists (one per optimiser step)."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.length


# --------------------------------------------------------------------------------- map-style
class MapSource:
    """Every record listed, a seeded validation hold-out, each epoch's order drawn from (seed, epoch)."""

    streaming = False

    def __init__(self, cfg: RunConfig, manifest: Manifest, base: LoadedModel, *, rank: int, world_size: int,
                 device: torch.device, progress: bool):
        self.cfg, self.manifest, self.base, self.rank, self.device = cfg, manifest, base, rank, device
        self.all_records = [r for r in manifest.records() if isinstance(r, CaptionRecord)]
        self.records, self.skipped_records, self.dropped_captions = screen(self.all_records, cfg.on_bad_sample,
                                                                           progress=progress)
        self.skipped = len(self.skipped_records)
        self.train_idx, self.val_idx = split_train_val(len(self.records), cfg.val_fraction, cfg.seed)
        self.train_records = [self.records[i] for i in self.train_idx]
        self.val_records = [self.records[i] for i in self.val_idx]
        self.num_train_pairs, self.num_val_pairs = len(self.train_records), len(self.val_records)
        self.local_batch = check_batch_sizes(cfg, self.num_train_pairs, world_size)
        self.steps_per_epoch, self.total_steps = plan_steps(cfg, self.num_train_pairs)
        images = (decoded_image_cache(self.all_records, self.records, base.preprocess, manifest, progress=progress,
                                      num_workers=cfg.num_workers) if cfg.image_cache else None)
        self.train_set = CaptionPairs(self.train_records, base.preprocess, base.tokenizer, seed=cfg.seed,
                                      image_cache=Subset(images, self.train_idx) if images is not None else None,
                                      manifest=manifest.path)
        self.val_set = CaptionPairs(self.val_records, base.preprocess, base.tokenizer, seed=cfg.seed + 1,
                                    image_cache=Subset(images, self.val_idx) if images is not None else None,
                                    manifest=manifest.path)

    def batch_indices(self, epoch: int, batch_in_epoch: int) -> np.ndarray:
        """This rank's slice of the global batch ``batch_in_epoch`` of ``epoch``."""
        order = np.random.default_rng((self.cfg.seed, epoch)).permutation(len(self.train_records))
        start = batch_in_epoch * self.cfg.batch_size  # type: ignore[operator]
        glob = order[start:start + self.cfg.batch_size]  # type: ignore[operator]
        return glob[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    @staticmethod
    def load(dataset: CaptionPairs, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Items loaded in this process (validation, tests); training batches come from :meth:`train_batches`."""
        images, tokens, _ = collate_pairs([dataset[(int(i), epoch)] for i in indices])
        return images, tokens

    def train_batches(self, start_step: int):
        """(images, tokens, items) of steps start_step, start_step + 1, ..., loaded by ``num_workers`` processes."""
        steps = range(start_step, self.total_steps)

        def batches():
            for step in steps:
                epoch, b = divmod(step, self.steps_per_epoch)
                yield [(int(i), epoch) for i in self.batch_indices(epoch, b)]

        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=_Batches(batches, len(steps)), num_workers=self.cfg.num_workers,
            collate_fn=collate_pairs, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers else None)

    def val_batches(self, global_bs: int, local_bs: int):
        """(start, images, tokens, items) of this rank's slice of each full global validation batch."""
        for start in range(0, self.num_val_pairs - global_bs + 1, global_bs):
            first = start + self.rank * local_bs
            items = range(first, first + local_bs)
            yield (start, *self.load(self.val_set, items), items)

    def stats_features(self, model: torch.nn.Module, *, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of every training image and its first caption, for the *-stats priors."""
        images = Images(self.train_records, self.base.preprocess, manifest=self.manifest.path, skippable=True)
        image = encode_images(model, images, device=self.device,
                              progress=progress, desc="prior stats")
        text = encode_texts(model, self.base.tokenizer, [r.captions[0] for r in self.train_records],
                            device=self.device, progress=False)
        return image, text

    def skipped_report(self, run_dir: Path) -> str:
        """The line saying how many records were left out and where they are listed (rank 0 lists them
        in the run directory)."""
        if self.rank == 0:
            write_skipped(run_dir / SKIPPED_FILE, self.skipped_records)
        return skipped_line(self.skipped_records, self.manifest.path, run_dir / SKIPPED_FILE)

    def summary(self) -> dict:
        out: dict = {"skipped_samples_file": SKIPPED_FILE} if self.skipped else {}
        if self.dropped_captions:
            out["dropped_empty_captions"] = self.dropped_captions
        return out


# --------------------------------------------------------------------------------- streaming
class StreamSource:
    """WebDataset shards streamed, never listed.

    * Validation hold-out: with ``val_fraction > 0`` the *last* ``max(1, round(val_fraction * shards))``
      shards of the manifest's shard list are validation shards, never streamed for training; each
      validation reads the first ``STREAM_VAL_MAX`` pairs of them, in order.
    * Epoch length: the manifest's ``num_samples`` (all shards; a filtered manifest's ``filter.kept``
      when absent) times the training share of the shards, divided by the batch size. Without a count,
      ``max_steps`` is required and is the whole run (a single epoch).
    * Sharding: :class:`~clip_refine_lab.data.webdataset.WebDatasetPairs` with this process's rank and
      ``seed``; ``on_bad_sample`` fail -> raise, skip -> skip. See :meth:`train_batches` for epochs,
      running out of shards and resuming.
    """

    streaming = True

    def __init__(self, cfg: RunConfig, manifest: Manifest, base: LoadedModel, *, rank: int, world_size: int,
                 device: torch.device, progress: bool):
        from ..data.webdataset import WebDatasetPairs

        self.cfg, self.manifest, self.base, self.rank, self.device = cfg, manifest, base, rank, device
        self.world_size = world_size
        self.num_train_pairs = self._split_shards()
        self.skipped = 0  # counted while streaming (see summary.json)
        self.cycled = 0  # passes started again because this rank's shards ran out before an epoch's end
        self.bad_sample_policy = {"fail": "raise", "skip": "skip"}[cfg.on_bad_sample]
        self.train_set = WebDatasetPairs.from_manifest(
            manifest, base.preprocess, base.tokenizer, shards=self.train_shards, rank=rank,
            world_size=world_size, seed=cfg.seed, on_bad_sample=self.bad_sample_policy)
        self.val_set = None
        self.val_keys: list[str] = []
        if self.val_shards:
            # every rank reads the same validation pairs (rank 0 of 1, shards in order) and takes its slice
            self.val_set = WebDatasetPairs.from_manifest(
                manifest, base.preprocess, base.tokenizer, shards=self.val_shards, seed=cfg.seed + 1,
                shuffle_shards=False, on_bad_sample=self.bad_sample_policy)
            self.val_keys = first_keys(self.val_shards, STREAM_VAL_MAX)
        self.num_val_pairs = len(self.val_keys)
        self.local_batch = check_batch_sizes(cfg, self.num_train_pairs, world_size,
                                             counted=f", counted from the num_samples of {manifest.path}")
        self.steps_per_epoch, self.total_steps = plan_steps(cfg, self.num_train_pairs)

    def _split_shards(self) -> int | None:
        """Set the training and validation shards; return the training pairs per epoch (None when the
        manifest declares no sample count)."""
        from ..data.webdataset import manifest_num_samples, manifest_shards

        cfg, m = self.cfg, self.manifest
        if cfg.teacher_cache:
            raise ConfigError(f"teacher_cache needs a map-style manifest; with WebDataset shards ({m.path}) the "
                              "teacher runs every step: set teacher_cache false")
        if cfg.image_cache:
            raise ConfigError(f"image_cache needs a map-style manifest; WebDataset shards ({m.path}) are decoded as "
                              "they stream: set image_cache false")
        shards = manifest_shards(m)
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"data: {m.path}: field 'shards': {len(missing)} of {len(shards)} shards not found "
                              f"(first: {missing[0]}); set 'shards' to the files you have")
        n_val = 0 if cfg.val_fraction == 0 else max(1, int(round(len(shards) * cfg.val_fraction)))
        if n_val >= len(shards):
            raise ConfigError(f"val_fraction {cfg.val_fraction}: streaming holds out whole shards for validation and "
                              f"{m.path} has {len(shards)} shard(s), leaving none for training; set val_fraction 0 "
                              "or split the data into more shards")
        self.train_shards, self.val_shards = shards[:len(shards) - n_val], shards[len(shards) - n_val:]
        if len(self.train_shards) < self.world_size:
            raise ConfigError(f"data: {m.path} has {len(self.train_shards)} training shard(s) for {self.world_size} "
                              "processes; each process streams whole shards, so use fewer processes or more shards")
        total = manifest_num_samples(m)
        if total is None:
            if cfg.max_steps is None:
                raise ConfigError(f"data: {m.path} is a WebDataset manifest without 'num_samples' (and without "
                                  "img2dataset _stats.json files beside every shard); the trainer streams its shards "
                                  "and needs the sample count for the steps per epoch: add 'num_samples: N' (all "
                                  "shards together) to the manifest, or set max_steps")
            return None
        # shards are assumed about equal in size (img2dataset writes 10,000 samples each)
        return total * len(self.train_shards) // len(shards)

    def train_batches(self, start_step: int):
        """This rank's batches (images, tokens, keys) of steps start_step, start_step + 1, ...

        Epoch ``e`` is steps ``[e * steps_per_epoch, (e + 1) * steps_per_epoch)`` on every rank (DDP
        ranks must take the same number of steps): the stream is restarted with ``set_epoch(e)`` (shard
        order and caption choice drawn from (seed, e)) and stopped after the epoch's last step.
        If this rank's shards run out first (bad samples skipped, unequal shards, or each DataLoader
        worker dropping its last partial batch), it reads its shards again in the order of the next
        epoch (``set_epoch(e + 1)``, then ``e + 2``, ...) until the epoch's steps are done, and says so;
        a pass that yields no batch at all raises. Resuming at step ``e * steps_per_epoch + k`` restarts
        epoch ``e`` the same way and discards its first ``k`` batches (they are read and decoded again),
        so the resumed run sees exactly the batches of an uninterrupted one (exactly with
        ``num_workers`` equal in both; the order of workers' batches depends on their number).
        """
        cfg = self.cfg
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.local_batch, num_workers=cfg.num_workers, collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=False,
            prefetch_factor=4 if cfg.num_workers else None)
        step = start_step
        while step < self.total_steps:
            epoch, skip = divmod(step, self.steps_per_epoch)
            end = min(self.total_steps, (epoch + 1) * self.steps_per_epoch) - epoch * self.steps_per_epoch
            taken, p = 0, 0  # batches of this epoch so far (discarded ones included); pass over the shards
            while taken < end:
                if p > 0:
                    self.cycled += 1
                    print(f"streaming: rank {self.rank}'s training shards ran out after {taken} of {end} batches of "
                          f"epoch {epoch}; reading them again in epoch {epoch + p}'s shard order")
                self.train_set.set_epoch(epoch + p)  # before iter(): workers copy the dataset when they start
                got = 0
                for batch in loader:
                    got += 1
                    if taken >= skip:
                        yield batch
                    taken += 1
                    if taken == end:
                        break
                if got == 0:
                    raise ConfigError(f"data: rank {self.rank} got no training batch from its shards of "
                                      f"{self.manifest.path} ({len(self.train_shards)} training shards, "
                                      f"{self.world_size} processes x {max(1, cfg.num_workers)} workers, per-process "
                                      f"batch {self.local_batch}); use fewer workers or more, larger shards")
                p += 1
            step = epoch * self.steps_per_epoch + end

    def val_batches(self, global_bs: int, local_bs: int):
        """(start, images, tokens, None) of each full global validation batch, read from the validation shards."""
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=global_bs, num_workers=0, drop_last=True,
                                             collate_fn=collate_pairs)
        mine = slice(self.rank * local_bs, (self.rank + 1) * local_bs)
        for b, (images, tokens, _) in enumerate(loader):
            start = b * global_bs
            if start + global_bs > self.num_val_pairs:
                break
            yield (start, images[mine], tokens[mine], None)

    def stats_features(self, model: torch.nn.Module, *, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of the first ``STREAM_STATS_SAMPLES`` training pairs, which stand for the set."""
        return self.first_features(model, STREAM_STATS_SAMPLES, progress=progress)

    def first_features(self, model: torch.nn.Module, limit: int, *, progress: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image and text features of the first ``limit`` training pairs, shards in manifest order
        (the same on every rank), one caption per image as streamed."""
        from ..data.webdataset import WebDatasetPairs

        ds = WebDatasetPairs.from_manifest(self.manifest, self.base.preprocess, self.base.tokenizer,
                                           shards=self.train_shards, seed=self.cfg.seed, shuffle_shards=False,
                                           on_bad_sample=self.bad_sample_policy)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=self.cfg.num_workers,
                                             collate_fn=collate_pairs)
        image, text, n = [], [], 0
        model.eval()
        bar = progress_bar(total=limit, desc="prior stats", enabled=progress, unit="pair")
        with torch.no_grad():
            for images, tokens, _ in loader:
                take = min(len(images), limit - n)
                image.append(model.encode_image(images[:take].to(self.device)).float().cpu())
                text.append(model.encode_text(tokens[:take].to(self.device)).float().cpu())
                n += take
                bar.update(take)
                if n >= limit:
                    break
        bar.close()
        return torch.cat(image), torch.cat(text)

    def summary(self) -> dict:
        """The summary.json fields of a streamed run."""
        # skipped samples are counted by whichever process read them: known here without workers only
        return {"skipped_samples": self.train_set.skipped if self.cfg.num_workers == 0 else None,
                "streaming": {"train_shards": len(self.train_shards), "val_shards": len(self.val_shards),
                              "steps_per_epoch": self.steps_per_epoch, "cycled_passes_rank0": self.cycled}}


def first_keys(shards, limit: int) -> list[str]:
    """Keys of the first ``limit`` samples of ``shards`` in order (tar headers only: no decoding)."""
    from ..data.webdataset import iter_tar_samples

    keys: list[str] = []
    for shard in shards:
        for sample in iter_tar_samples(shard, want=lambda ext: False):
            keys.append(sample["__key__"])
            if len(keys) >= limit:
                return keys
    return keys
