"""The post-pre-training loop: ``refine(config) -> run_dir``.

One readable loop in the spirit of nanoGPT's train.py. Per step:

1. take the step's global batch (order and caption choice are pure functions of seed, epoch and
   index, so a resumed run sees exactly the batches an uninterrupted one would); WebDataset
   manifests are streamed instead of indexed (:meth:`Refiner._setup_stream`, :meth:`Refiner._stream_batches`),
   with the same guarantee;
2. draw the step's randomness (RaFA prior sample z, m2-mix lambda) from a generator seeded by
   (seed, step): again nothing to save for resuming;
3. teacher features for the whole batch (frozen copy of the starting model, no grad);
4. student features and loss, with OpenCLIP-style gradient accumulation when ``accum_steps > 1``:
   a no-grad forward of every micro-batch caches features, then each micro-batch is re-forwarded
   with grad and the loss is computed on the full batch (its features spliced into the cached
   ones), so the B x B logits keep all negatives and the summed gradients equal the full batch's;
5. with several processes (torchrun), features are all-gathered with gradient for the local slice,
   every rank computes the global-batch loss times the world size, and gradients are averaged:
   the result equals the single-process gradient of the global batch;
6. a non-finite loss term stops the run naming the step and the term; checkpoints written before
   stay as they are;
7. AdamW step, logging (JSONL + progress bar), validation with best-checkpoint selection (the
   released code keeps the checkpoint with the lowest validation loss), periodic atomic checkpoints.

Run directory layout (README, "Run directory")::

    <output_dir>/<run_name>/
        config.yaml              the resolved RunConfig
        base.json                the starting model (architecture, weights, QuickGELU, preprocessing)
        log.jsonl                one line per logged step ({"kind": "train"|"val", ...})
        checkpoints/last.pt      training state for resuming (model, optimiser, step, best val loss)
        model_best.safetensors   lowest validation loss (open_clip-loadable state dict)
        model_final.safetensors  weights after the last step
        prior_stats.safetensors  per-dimension feature statistics, for the *-stats priors
        leakage.json             image-id overlap with the evaluation sets of leakage_suite, when set
        summary.json             written last: the run is complete
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig
from ..data.manifest import CaptionPairs, CaptionRecord, load_manifest
from ..data.formats import is_streaming
from ..features import Subset
from ..distributed import gather_features, world_info
from ..methods import Method, get_method, loss_terms
from ..optim import build_adamw, clamp_logit_scale, lr_at, set_lr
from ..models.loading import (LoadedModel, ModelSpec, compile_towers, load_model, save_checkpoint, train_with_frozen_batch_norm,
                     use_channels_last, use_sdpa_attention)
from ..priors import build_prior, feature_statistics
from ..rundir import truncate_log
from ..utils import append_jsonl, atomic_path, atomic_write, atomic_write_json, seed_everything

# Fields that may differ between a run and its resumption (where and how fast, not what is computed).
RESUMABLE_FIELDS = ("output_dir", "run_name", "device", "num_workers", "log_every", "max_steps",
                    "attention", "compile", "channels_last", "leakage_suite")

# Streaming (WebDataset manifests): at most this many held-out pairs are read at each validation, and
# the *-stats priors are computed on the first STREAM_STATS_SAMPLES training pairs of the stream.
STREAM_VAL_MAX = 2000
STREAM_STATS_SAMPLES = 10_000


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ------------------------------------------------------------------------------------------ setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was requested but CUDA is not available; use device 'cpu' or 'auto'")
    return dev


def resolve_data(cfg: RunConfig) -> "Path":
    """The manifest path of ``cfg.data``: a YAML file, or the name of a split of the embedded world."""
    data = str(cfg.data)
    if data.endswith((".yaml", ".yml")) or os.sep in data:
        if not Path(data).is_file():
            raise ConfigError(f"data: manifest file not found: {data}")
        return Path(data)
    from ..config import PRESETS
    from ..embedded.world import WorldConfig, build_world

    world = build_world(WorldConfig.preset(PRESETS[cfg.preset].world))  # type: ignore[index]
    try:
        return world.manifest(data)
    except KeyError as e:
        raise ConfigError(f"data: '{data}' is neither a manifest file nor a split of the embedded world ({e})") from None


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_fraction`` of the pairs (at least one when the fraction is positive), seeded."""
    order = np.random.default_rng((seed, 0x7A1)).permutation(n)
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The step's own generator: randomness is a pure function of (seed, step), so resuming needs no RNG state."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) % (2**63))
    return g


# ------------------------------------------------------------------------------------- the loop
class Refiner:
    """Holds what one run needs; :meth:`run` is the loop. Use :func:`refine` rather than this class."""

    def __init__(self, cfg: RunConfig, *, progress: bool = True, callback=None):
        self.cfg = cfg
        self.progress = progress
        self.callback = callback  # called with every log record (dict), e.g. for a live plot
        self.rank, self.world_size = world_info()
        self.device = resolve_device(cfg.device)
        self.method: Method = get_method(cfg.method)
        self.run_dir = cfg.run_dir

        seed_everything(cfg.seed)
        self.base: LoadedModel = load_model(cfg.model, cfg.pretrained, device=self.device,  # type: ignore[arg-type]
                                            quick_gelu=cfg.quick_gelu, world_preset=cfg.preset)
        self.model = self.base.model
        if cfg.attention == "sdpa":
            use_sdpa_attention(self.model)
        want_nhwc = self.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.channels_last = bool(want_nhwc) and use_channels_last(self.model)
        self.teacher = None
        if self.method.needs_teacher:
            # The teacher is an exact, frozen copy of the starting model (released code: deepcopy + no_grad).
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.compile:
            for m in (self.model, self.teacher):
                if m is not None:
                    compile_towers(m)
        self.manifest = load_manifest(resolve_data(cfg), data_root=cfg.data_root)
        if self.manifest.kind != "captions":
            raise ConfigError(f"data: {self.manifest.path} is a {self.manifest.kind} manifest; "
                              "post-pre-training needs image-caption pairs")
        if cfg.leakage_suite is not None and not Path(cfg.leakage_suite).is_file():
            raise ConfigError(f"leakage_suite: suite file not found: {cfg.leakage_suite} "
                              "(e.g. data_manifests/suites/paper.yaml)")
        # WebDataset shards are streamed (never listed: CC12M-size sets need not fit in memory);
        # every other format is read map-style: all records listed, then split and indexed.
        self.streaming = is_streaming(self.manifest)
        if self.streaming:
            self.num_train_pairs = self._setup_stream()
            self.skipped = 0  # counted while streaming (see summary.json)
        else:
            all_records = [r for r in self.manifest.records() if isinstance(r, CaptionRecord)]
            records, self.skipped = self._screen(all_records)
            train_idx, val_idx = split_train_val(len(records), cfg.val_fraction, cfg.seed)
            self.train_records = [records[i] for i in train_idx]
            self.val_records = [records[i] for i in val_idx]
            self.num_train_pairs, self.num_val_pairs = len(self.train_records), len(self.val_records)
        self.has_val = self.num_val_pairs > 0
        if self.num_train_pairs is not None and self.num_train_pairs < cfg.batch_size:  # type: ignore[operator]
            counted = f", counted from the num_samples of {self.manifest.path}" if self.streaming else ""
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set "
                              f"({self.num_train_pairs} pairs after the validation split{counted})")
        if cfg.batch_size % self.world_size:  # type: ignore[operator]
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({self.world_size})")
        self.local_batch = cfg.batch_size // self.world_size  # type: ignore[operator]
        if self.local_batch % cfg.accum_steps:
            raise ConfigError(f"per-process batch {self.local_batch} must be divisible by accum_steps ({cfg.accum_steps})")
        if self.num_train_pairs is None:  # a stream of unknown length: max_steps is the whole run, one epoch
            self.steps_per_epoch = self.total_steps = cfg.max_steps  # type: ignore[assignment]
        else:
            self.steps_per_epoch = self.num_train_pairs // cfg.batch_size  # type: ignore[operator]
            self.total_steps = max(1, int(round(self.steps_per_epoch * cfg.epochs)))  # type: ignore[operator]
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.streaming:
            self.teacher_features = None
        else:
            images = self._image_cache(all_records, records)
            self.train_set = CaptionPairs(self.train_records, self.base.preprocess, self.base.tokenizer, seed=cfg.seed,
                                          image_cache=Subset(images, train_idx) if images is not None else None)
            self.val_set = CaptionPairs(self.val_records, self.base.preprocess, self.base.tokenizer, seed=cfg.seed + 1,
                                        image_cache=Subset(images, val_idx) if images is not None else None)
            self.teacher_features = self._teacher_cache(all_records, records, train_idx, val_idx)
        self.val_every = cfg.val_every or max(1, self.steps_per_epoch // 4)
        self.checkpoint_every = cfg.checkpoint_every or self.val_every
        self.optimizer = build_adamw(self.model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                     exclude_gains=cfg.no_decay_gains, device=next(self.model.parameters()).device)
        self.prior = self._build_prior() if self.method.needs_prior else None
        self.autocast = self._autocast()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    # ------------------------------------------------------------ streaming (WebDataset manifests)
    def _setup_stream(self) -> int | None:
        """Set up streaming from a WebDataset manifest without listing its records; return the number
        of training pairs per epoch (None when the manifest does not declare a sample count).

        * Validation hold-out: with ``val_fraction > 0`` the *last* ``max(1, round(val_fraction *
          shards))`` shards of the manifest's shard list are validation shards, never streamed for
          training; each validation reads the first ``STREAM_VAL_MAX`` pairs of them, in order.
        * Epoch length: the manifest's ``num_samples`` (all shards; a filtered manifest's
          ``filter.kept`` when absent) times the training share of the shards, divided by the batch
          size. Without a count, ``max_steps`` is required and is the whole run (a single epoch).
        * Sharding: :class:`~clip_refine_lab.data_formats.WebDatasetPairs` with this process's rank,
          ``seed``; ``on_bad_sample`` fail -> raise, skip -> skip. See :meth:`_stream_batches` for
          epochs, running out of shards and resuming.
        """
        from ..data.formats import WebDatasetPairs, manifest_num_samples, manifest_shards

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
        self.bad_sample_policy = {"fail": "raise", "skip": "skip"}[cfg.on_bad_sample]
        self.cycled = 0  # passes started again because this rank's shards ran out before an epoch's end
        self.train_set = WebDatasetPairs.from_manifest(
            m, self.base.preprocess, self.base.tokenizer, shards=self.train_shards, rank=self.rank,
            world_size=self.world_size, seed=cfg.seed, on_bad_sample=self.bad_sample_policy)
        self.val_set = None
        self.val_keys: list[str] = []
        if self.val_shards:
            # every rank reads the same validation pairs (rank 0 of 1, shards in order) and takes its slice
            self.val_set = WebDatasetPairs.from_manifest(
                m, self.base.preprocess, self.base.tokenizer, shards=self.val_shards, seed=cfg.seed + 1,
                shuffle_shards=False, on_bad_sample=self.bad_sample_policy)
            self.val_keys = self._first_keys(self.val_shards, STREAM_VAL_MAX)
        self.num_val_pairs = len(self.val_keys)
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

    @staticmethod
    def _first_keys(shards, limit: int) -> list[str]:
        """Keys of the first ``limit`` samples of ``shards`` in order (tar headers only: no decoding)."""
        from ..data.formats import iter_tar_samples

        keys: list[str] = []
        for shard in shards:
            for sample in iter_tar_samples(shard, want=lambda ext: False):
                keys.append(sample["__key__"])
                if len(keys) >= limit:
                    return keys
        return keys

    def _stream_batches(self, start_step: int):
        """This rank's batches (images, tokens, keys) of steps start_step, start_step + 1, ... (streaming).

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

    def _stream_val_batches(self, n_val: int, global_bs: int, local_bs: int):
        """(start, images, tokens, None) of each full global validation batch, read from the validation shards."""
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=global_bs, num_workers=0, drop_last=True,
                                             collate_fn=collate_pairs)
        mine = slice(self.rank * local_bs, (self.rank + 1) * local_bs)
        for b, (images, tokens, _) in enumerate(loader):
            start = b * global_bs
            if start + global_bs > n_val:
                break
            yield (start, *self.to_device(images[mine], tokens[mine]), None)

    def _streamed_features(self, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image and text features of the first ``limit`` training pairs, shards in manifest order
        (the same on every rank), one caption per image as streamed: for the *-stats priors."""
        from ..data.formats import WebDatasetPairs

        ds = WebDatasetPairs.from_manifest(self.manifest, self.base.preprocess, self.base.tokenizer,
                                           shards=self.train_shards, seed=self.cfg.seed, shuffle_shards=False,
                                           on_bad_sample=self.bad_sample_policy)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=self.cfg.num_workers,
                                             collate_fn=collate_pairs)
        image, text, n = [], [], 0
        self.model.eval()
        with torch.no_grad():
            for images, tokens, _ in tqdm(loader, desc="prior stats", disable=not self.progress, leave=False):
                take = min(len(images), limit - n)
                image.append(self.model.encode_image(images[:take].to(self.device)).float().cpu())
                text.append(self.model.encode_text(tokens[:take].to(self.device)).float().cpu())
                n += take
                if n >= limit:
                    break
        return torch.cat(image), torch.cat(text)

    # ---------------------------------------------------------------------------------- helpers
    def _screen(self, records: list[CaptionRecord]) -> tuple[list[CaptionRecord], int]:
        if self.cfg.on_bad_sample != "skip":
            return records, 0
        from ..data.check import clean_captions, is_readable

        good = []
        for r in tqdm(records, desc="screen samples", disable=not self.progress, leave=False):
            cleaned = clean_captions(r)  # drops empty / non-text captions; None when none is left
            if cleaned is not None and is_readable(cleaned) is None:
                good.append(cleaned)
        return good, len(records) - len(good)

    def _positions(self, all_records: list, records: list) -> list[int]:
        """Position of every kept record in the manifest (screening may have dropped some)."""
        where = {id(r): i for i, r in enumerate(all_records)}
        by_id = {r.id: i for i, r in enumerate(all_records)}
        return [where.get(id(r), by_id[r.id]) for r in records]

    def _image_cache(self, all_records: list, records: list):
        if not self.cfg.image_cache:
            return None
        from ..features import DecodedImages

        cache = DecodedImages(all_records, self.base.preprocess, self.manifest, progress=self.progress)
        return Subset(cache, self._positions(all_records, records))

    def _teacher_cache(self, all_records, records, train_idx, val_idx) -> dict | None:
        """Teacher features of every image and caption of the manifest, from the one feature cache.

        The teacher is frozen and the eval preprocessing deterministic, so these equal the features a
        teacher forward pass would give at each step (fp32); they are computed once per teacher and
        data set and reused across epochs and across every run of a sweep."""
        if not (self.cfg.teacher_cache and self.teacher is not None):
            return None
        from ..features import dataset_features

        fs = dataset_features(self.base, self.manifest, device=self.device, progress=self.progress)
        offsets = np.concatenate([[0], np.cumsum([len(r.captions) for r in all_records])])
        positions = self._positions(all_records, records)

        def caption_rows(subset_idx):
            # row of each caption of each record in the manifest's flattened caption list (a record
            # cleaned by on_bad_sample=skip keeps a subset of its captions, in order: map back by text)
            return [[int(offsets[positions[i]]) + all_records[positions[i]].captions.index(c) for c in records[i].captions]
                    for i in subset_idx]

        return {"image": fs.image, "text": fs.text,
                "train": ([positions[i] for i in train_idx], caption_rows(train_idx)),
                "val": ([positions[i] for i in val_idx], caption_rows(val_idx))}

    def teacher_batch(self, split: str, dataset: CaptionPairs, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached teacher features of these items (None without a teacher cache)."""
        if self.teacher_features is None:
            return None
        image_pos, caption_rows = self.teacher_features[split]
        idx = [int(i) for i in indices]
        ti = self.teacher_features["image"][[image_pos[i] for i in idx]]
        tt = self.teacher_features["text"][[caption_rows[i][dataset.caption_index(i, epoch)] for i in idx]]
        return ti.to(self.device), tt.to(self.device)

    def _build_prior(self):
        cfg = self.cfg
        stats = None
        if cfg.prior.endswith("-stats"):
            stats = self._feature_stats()
        return build_prior(cfg.prior, sigma=cfg.prior_sigma, mean=cfg.prior_mean, low=cfg.prior_low,
                           high=cfg.prior_high, vector=cfg.prior_vector, stats=stats)

    def _feature_stats(self) -> dict:
        """Per-dimension mean/std of the starting model's raw features on the training set, once per run
        (streaming: on its first ``STREAM_STATS_SAMPLES`` pairs)."""
        from safetensors.torch import load_file, save_file

        from ..features import encode_images, encode_texts
        from ..data.manifest import Images

        path = self.run_dir / "prior_stats.safetensors"
        if not path.is_file():
            if self.streaming:  # the first STREAM_STATS_SAMPLES streamed pairs stand for the training set
                image, text = self._streamed_features(STREAM_STATS_SAMPLES)
            else:
                image = encode_images(self.model, Images(self.train_records, self.base.preprocess),
                                      device=self.device, progress=self.progress, desc="prior stats")
                text = encode_texts(self.model, self.base.tokenizer, [r.captions[0] for r in self.train_records],
                                    device=self.device, progress=self.progress, desc="prior stats")
            tensors = {}
            for key, feats in (("image", image), ("text", text), ("all", torch.cat([image, text]))):
                mean, std = feature_statistics(feats)
                tensors[f"{key}_mean"], tensors[f"{key}_std"] = mean.contiguous(), std.contiguous()
            if self.rank == 0:
                with atomic_path(path) as tmp:
                    save_file(tensors, str(tmp))
        t = load_file(str(path)) if path.is_file() else tensors
        return {k: (t[f"{k}_mean"].to(self.device), t[f"{k}_std"].to(self.device)) for k in ("image", "text", "all")}

    def _autocast(self):
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext
        if self.device.type != "cuda":
            raise ConfigError(f"precision {p} needs a GPU; on CPU use fp32")
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)

    def batch_indices(self, epoch: int, batch_in_epoch: int) -> np.ndarray:
        """This rank's slice of the global batch ``batch_in_epoch`` of ``epoch``."""
        order = np.random.default_rng((self.cfg.seed, epoch)).permutation(len(self.train_records))
        start = batch_in_epoch * self.cfg.batch_size  # type: ignore[operator]
        glob = order[start:start + self.cfg.batch_size]  # type: ignore[operator]
        return glob[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def load_batch(self, dataset: CaptionPairs, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Load items in this process (validation, tests); training goes through :meth:`train_loader`."""
        images, tokens, _ = collate_pairs([dataset[(int(i), epoch)] for i in indices])
        return self.to_device(images, tokens)

    def to_device(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return (images.to(self.device, non_blocking=True, memory_format=fmt),
                tokens.to(self.device, non_blocking=True))

    def train_loader(self, start_step: int) -> torch.utils.data.DataLoader:
        """Batches of steps start_step, start_step + 1, ... in order, loaded by ``num_workers`` processes."""
        if self.streaming:
            return self._stream_batches(start_step)  # type: ignore[return-value]
        steps = range(start_step, self.total_steps)

        def batches():
            for step in steps:
                epoch, b = divmod(step, self.steps_per_epoch)
                yield [(int(i), epoch) for i in self.batch_indices(epoch, b)]

        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=_Batches(batches, len(steps)), num_workers=self.cfg.num_workers,
            collate_fn=collate_pairs, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers else None)

    # ------------------------------------------------------------------------------- one step
    def compute_loss(self, images: torch.Tensor, tokens: torch.Tensor, step: int, *, train: bool,
                     teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Loss terms for one global batch; with ``train`` also accumulates gradients (OpenCLIP way).

        ``teacher``: this rank's teacher features when they come from the cache (else computed here)."""
        cfg, method = self.cfg, self.method
        gen = step_generator(cfg.seed if train else cfg.seed + 7919, step)
        n_global = images.shape[0] * self.world_size
        extras: dict = {}
        if self.teacher is not None:
            if teacher is None:
                with torch.no_grad(), self.autocast():
                    teacher = self.teacher.encode_image(images).float(), self.teacher.encode_text(tokens).float()
            ti, tt = gather_features(*teacher)
            extras.update(teacher_image=ti, teacher_text=tt)
        if method.needs_prior:
            dim = self.base.embed_dim
            # one z per pair of the global batch, shared by its image and its text
            extras["z"] = self.prior.sample(n_global, dim, gen).to(self.device, torch.float32)  # type: ignore[union-attr]
        if method.needs_mix:
            # one lambda ~ Beta(beta, beta) per batch, drawn through the step generator (inverse CDF)
            extras["lam"] = beta_inverse_cdf(cfg.m2_beta, float(torch.rand((), generator=gen)))
        model = self.model
        if not train:
            scale = model.logit_scale.exp()
            with torch.no_grad(), self.autocast():
                fi, ft = gather_features(model.encode_image(images).float(), model.encode_text(tokens).float())
                return {k: v.detach() for k, v in loss_terms(method, cfg, fi, ft, logit_scale=scale, **extras).items()} | {
                    "_features": (fi, ft)}
        micro = images.shape[0] // cfg.accum_steps
        chunks = [(slice(j * micro, (j + 1) * micro)) for j in range(cfg.accum_steps)]
        if cfg.accum_steps > 1:
            with torch.no_grad(), self.autocast():
                cached_i = [model.encode_image(images[c]).float() for c in chunks]
                cached_t = [model.encode_text(tokens[c]).float() for c in chunks]
        terms: dict = {}
        for j, c in enumerate(chunks):
            with self.autocast():
                fi_j, ft_j = model.encode_image(images[c]).float(), model.encode_text(tokens[c]).float()
            if cfg.accum_steps > 1:
                fi_local = torch.cat(cached_i[:j] + [fi_j] + cached_i[j + 1:])
                ft_local = torch.cat(cached_t[:j] + [ft_j] + cached_t[j + 1:])
            else:
                fi_local, ft_local = fi_j, ft_j
            fi, ft = gather_features(fi_local, ft_local)
            # The logit scale enters the loss directly, not through this micro-batch's features: only the
            # first micro-step of rank 0 carries its gradient, or it would be counted accum_steps times
            # (and, with the x world_size below, world_size times after averaging across ranks).
            scale = model.logit_scale.exp() if j == 0 and self.rank == 0 else model.logit_scale.exp().detach()
            terms = loss_terms(method, cfg, fi, ft, logit_scale=scale, **extras)
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            if bad:
                raise NonFiniteLossError(
                    f"loss term '{bad[0]}' is {terms[bad[0]].item()} at step {step}; the run stopped and kept its "
                    f"last checkpoint ({self.run_dir / 'checkpoints' / 'last.pt'}). Lower lr or check the data.")
            # Every rank computed the global-batch loss; x world_size makes the averaged gradients exact.
            backward_loss = terms["loss"] * self.world_size
            if self.scaler is not None:
                self.scaler.scale(backward_loss).backward()
            else:
                backward_loss.backward()
        out = {k: v.detach() for k, v in terms.items()}
        out["_features"] = (fi.detach(), ft.detach())
        return out

    def all_reduce_gradients(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.requires_grad]
        # A parameter may have a gradient on some ranks only (the logit scale: rank 0 carries it);
        # one that no rank touched keeps grad None, so AdamW skips it exactly as in a single process.
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        for p, flag in zip(params, has_grad.tolist()):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean method loss on the held-out pairs (fixed z and lambda, so values compare across steps)."""
        if not self.has_val:
            return None
        self.model.eval()
        global_bs = max(self.world_size, min(self.cfg.batch_size, self.num_val_pairs) // self.world_size * self.world_size)
        local_bs = global_bs // self.world_size
        total, count = 0.0, 0
        for start, images, tokens, items in (self._stream_val_batches(self.num_val_pairs, global_bs, local_bs)
                                             if self.streaming else self._val_batches(global_bs, local_bs)):
            terms = self.compute_loss(images, tokens, start, train=False,
                                      teacher=self.teacher_batch("val", self.val_set, items))
            total += float(terms["loss"]) * global_bs
            count += global_bs
        train_with_frozen_batch_norm(self.model)
        return total / count if count else None

    def _val_batches(self, global_bs: int, local_bs: int):
        """(start, images, tokens, items) of this rank's slice of each full global validation batch."""
        for start in range(0, self.num_val_pairs - global_bs + 1, global_bs):
            first = start + self.rank * local_bs
            items = range(first, first + local_bs)
            yield (start, *self.load_batch(self.val_set, items), items)

    # ------------------------------------------------------------------------------ checkpoints
    def save_state(self, step: int, best_val: float | None) -> None:
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "best_val": best_val if best_val is not None else float("nan")}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        with atomic_path(self.run_dir / "checkpoints" / "last.pt") as tmp:
            torch.save(state, tmp)

    def load_state(self) -> tuple[int, float | None]:
        path = self.run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            return 0, None
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        best = float(state["best_val"])
        return int(state["step"]), (None if math.isnan(best) else best)

    def save_weights(self, name: str) -> None:
        if self.rank == 0:
            save_checkpoint(self.model, self.run_dir / name, self.base.spec, method=self.cfg.method)

    def _emit(self, log_path: Path, record: dict) -> None:
        append_jsonl(log_path, record)
        if self.callback is not None:
            self.callback(record)

    # ------------------------------------------------------------------------------------- run
    def run(self) -> Path:
        cfg = self.cfg
        step, best_val = self.load_state()
        log_path = self.run_dir / "log.jsonl"
        if self.rank == 0:
            truncate_log(log_path, step)
            if step == 0 and cfg.leakage_suite is not None:
                self.check_leakage(log_path)
        if step == 0 and self.has_val:
            # the starting model is a candidate too: a run that only gets worse keeps it
            best_val = self.validate()
            self.save_weights("model_best.safetensors")
            if self.rank == 0:
                self._emit(log_path, {"kind": "val", "step": 0, "val_loss": best_val, "best": True})
        if self.skipped:
            print(f"on_bad_sample=skip: skipped {self.skipped} unreadable or captionless samples")
        train_with_frozen_batch_norm(self.model)
        bar = tqdm(total=self.total_steps, initial=step, desc=f"refine {cfg.method}",
                   disable=not self.progress or self.rank != 0)
        batches = iter(self.train_loader(step))
        while step < self.total_steps:
            epoch = step // self.steps_per_epoch
            t0 = time.perf_counter()
            images, tokens, items = next(batches)
            images, tokens = self.to_device(images, tokens)
            lr = lr_at(step, self.total_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule)
            set_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            terms = self.compute_loss(images, tokens, step, train=True,
                                      teacher=self.teacher_batch("train", self.train_set, items, epoch))
            self.all_reduce_gradients()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            clamp_logit_scale(self.model)
            step += 1
            if self.rank == 0 and (step % cfg.log_every == 0 or step == self.total_steps):
                if self.device.type == "cuda":  # kernels run asynchronously: time the step, not its launch
                    torch.cuda.synchronize(self.device)
                record = step_record(terms, step, epoch, lr, cfg.batch_size / (time.perf_counter() - t0),  # type: ignore[operator]
                                     float(self.model.logit_scale.exp().item()))
                self._emit(log_path, record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "rafa", "hycd", "clip", "gap")})
            bar.update(1)
            if step % self.val_every == 0 or step == self.total_steps:
                val = self.validate()
                improved = val is not None and (best_val is None or val < best_val)
                if improved:
                    best_val = val
                    self.save_weights("model_best.safetensors")
                if self.rank == 0 and val is not None:
                    self._emit(log_path, {"kind": "val", "step": step, "val_loss": val, "best": improved})
            if step % self.checkpoint_every == 0 or step == self.total_steps:
                self.save_state(step, best_val)
        bar.close()
        self.save_weights("model_final.safetensors")
        if not self.has_val:
            self.save_weights("model_best.safetensors")
        if self.rank == 0:
            summary = {"steps": step, "best_val_loss": best_val, "skipped_samples": self.skipped,
                       "train_pairs": self.num_train_pairs, "val_pairs": self.num_val_pairs,
                       "world_size": self.world_size}
            if self.streaming:
                # skipped samples are counted by whichever process read them: known here without workers only
                summary["skipped_samples"] = self.train_set.skipped if cfg.num_workers == 0 else None
                summary["streaming"] = {"train_shards": len(self.train_shards), "val_shards": len(self.val_shards),
                                        "steps_per_epoch": self.steps_per_epoch, "cycled_passes_rank0": self.cycled}
            atomic_write_json(self.run_dir / "summary.json", summary)
        return self.run_dir

    def check_leakage(self, log_path: Path) -> None:
        """Image-id overlap between the training set and the evaluation sets of ``cfg.leakage_suite``.

        Ids only (COCO ids from file names, Flickr photo ids: no image hashing, so it costs a listing of
        each manifest); written to ``leakage.json`` and one ``{"kind": "leakage"}`` line of log.jsonl,
        with a printed warning when any evaluation image is in the training set. Skipped (and logged
        as such) for streaming manifests, whose records the trainer never lists: check them offline
        with ``clip-refine-lab data leakage``. A suite whose data is missing is logged, not fatal.
        """
        from ..data.manifest import ManifestError
        from ..evaluation.evaluate import load_suite, suite_leakage

        record: dict = {"kind": "leakage", "step": 0, "suite": str(self.cfg.leakage_suite)}
        if self.streaming:
            record["skipped"] = "streaming manifest: records are not listed; run clip-refine-lab data leakage"
            print(f"leakage check skipped: {self.manifest.path} is streamed (WebDataset); "
                  "check it with: clip-refine-lab data leakage TRAIN EVAL...")
        else:
            try:
                suite = load_suite(self.cfg.leakage_suite, self.cfg.preset)
                report = suite_leakage(self.manifest, suite, self.cfg.data_root)
            except (ManifestError, OSError, ValueError) as e:
                record["error"] = f"{type(e).__name__}: {e}"
                print(f"leakage check failed ({record['error']}); training goes on")
            else:
                atomic_write_json(self.run_dir / "leakage.json", report.to_dict())
                record.update(overlap=sum(e.overlap for e in report.evals),
                              evals={e.name: e.overlap for e in report.evals})
                if report.leaks:
                    print("WARNING: evaluation images are in the training set\n" + report.format())
        append_jsonl(log_path, record)  # not through the callback: live plots expect train/val records


class _Batches(torch.utils.data.Sampler):
    """A batch sampler over a precomputed sequence of index lists (one per optimiser step)."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.length


def collate_pairs(items: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]), [it[2] for it in items])


def beta_inverse_cdf(beta: float, u: float) -> float:
    """The Beta(beta, beta) quantile of u: a Beta draw from one uniform draw of our own generator."""
    from scipy.special import betaincinv

    return float(betaincinv(beta, beta, u))


def step_record(terms: dict, step: int, epoch: int, lr: float, pairs_per_s: float, logit_scale: float) -> dict:
    """One log line: every loss term, lr, the batch modality gap, mean raw norms, logit scale, throughput."""
    fi, ft = terms["_features"]
    fin, ftn = torch.nn.functional.normalize(fi, dim=-1), torch.nn.functional.normalize(ft, dim=-1)
    record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr}
    record.update({k: float(v) for k, v in terms.items() if not k.startswith("_")})
    record.update(gap=float((fin.mean(0) - ftn.mean(0)).norm()), image_norm=float(fi.norm(dim=-1).mean()),
                  text_norm=float(ft.norm(dim=-1).mean()), logit_scale=logit_scale, pairs_per_s=pairs_per_s)
    return record


# ------------------------------------------------------------------------------------ entry point
def refine(config: RunConfig, *, progress: bool = True, resume: bool = True, callback=None) -> Path:
    """Run post-pre-training as configured and return the run directory.

    ``callback(record)`` receives every log record as it is written (train steps and validations),
    for live plots; the records are also in ``log.jsonl``.

    An existing run directory with the same configuration is resumed from its last checkpoint
    (``resume=False`` refuses instead); a complete one (``summary.json``) is returned as is.
    """
    cfg = config.resolved()
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if saved.is_file():
        previous = RunConfig.from_yaml(saved)
        mismatch = [k for k in asdict(cfg) if k not in RESUMABLE_FIELDS and k != "extra"
                    and getattr(previous, k) != getattr(cfg, k)]
        if mismatch:
            raise ConfigError(f"{run_dir} holds a run with a different configuration ({', '.join(mismatch)}); "
                              "choose another run_name or output_dir")
        if not resume:
            raise ConfigError(f"{run_dir} exists; pass resume=True (CLI: --resume) to continue it")
        if (run_dir / "summary.json").is_file():
            return run_dir
    _, world = world_info()
    if world > 1 and cfg.run_name is None:
        raise ConfigError("with several processes, set run_name so that every rank writes the same run")
    refiner = Refiner(cfg, progress=progress, callback=callback)
    if refiner.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(saved)
        atomic_write_json(run_dir / "base.json", asdict(refiner.base.spec))
    return refiner.run()


def init_distributed_from_env() -> None:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
