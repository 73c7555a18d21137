"""What the trainer computes once and reuses: decoded images, teacher features, prior statistics.

* Decoded images: every image of the manifest decoded and resized once into a uint8 memory map
  (:class:`clip_refine_lab.features.DecodedImages`), shared by every run on the same data.
* Teacher features: the teacher is frozen and the eval preprocessing deterministic, so the features
  a teacher forward pass would give at each step (fp32) are those of the one feature cache,
  computed once per teacher and data set and reused across epochs and across every run of a sweep.
* Prior statistics: the per-dimension mean and std of the starting model's features in the run's
  feature space (raw, or L2-normalised), for the ``*-stats`` priors; computed once per run and kept
  in ``prior_stats.safetensors``, whose header records the space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..features import DecodedImages, Subset, dataset_features
from ..models.loading import LoadedModel
from ..priors import feature_statistics
from ..progress import stage
from ..utils import atomic_path

PRIOR_STATS_FILE = "prior_stats.safetensors"


def manifest_positions(all_records: Sequence, records: Sequence) -> list[int]:
    """Position of every kept record in the manifest (screening may have dropped or cleaned some)."""
    where = {id(r): i for i, r in enumerate(all_records)}
    by_id = {r.id: i for i, r in enumerate(all_records)}
    return [where.get(id(r), by_id[r.id]) for r in records]


def decoded_image_cache(all_records: Sequence, records: Sequence, preprocess, manifest, *, progress: bool,
                        num_workers: int = 0) -> Subset:
    """The kept records' preprocessed images, read from the decoded-image cache of the whole manifest
    (built by ``num_workers`` DataLoader processes when it is missing)."""
    cache = DecodedImages(all_records, preprocess, manifest, progress=progress, num_workers=num_workers)
    return Subset(cache, manifest_positions(all_records, records))


class TeacherFeatures:
    """Teacher features of every image and caption of a map-style source, from the one feature cache."""

    def __init__(self, teacher: LoadedModel, source, *, device: torch.device, progress: bool):
        # the run's loader workers decode the images when the features are not cached yet
        fs = dataset_features(teacher, source.manifest, device=device, progress=progress,
                              num_workers=source.cfg.num_workers)
        self.image, self.text, self.device = fs.image, fs.text, device
        all_records, records = source.all_records, source.records
        offsets = np.concatenate([[0], np.cumsum([len(r.captions) for r in all_records])])
        positions = manifest_positions(all_records, records)

        def caption_rows(subset_idx):
            # row of each caption of each record in the manifest's flattened caption list (a record
            # cleaned by on_bad_sample=skip keeps a subset of its captions, in order: map back by text)
            return [[int(offsets[positions[i]]) + all_records[positions[i]].captions.index(c) for c in records[i].captions]
                    for i in subset_idx]

        self.splits = {"train": ([positions[i] for i in source.train_idx], caption_rows(source.train_idx)),
                       "val": ([positions[i] for i in source.val_idx], caption_rows(source.val_idx))}

    def batch(self, split: str, dataset, indices, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached teacher features of these items of ``split``, with the caption each one draws in ``epoch``."""
        image_pos, caption_rows = self.splits[split]
        idx = [int(i) for i in indices]
        ti = self.image[[image_pos[i] for i in idx]]
        tt = self.text[[caption_rows[i][dataset.caption_index(i, epoch)] for i in idx]]
        return ti.to(self.device), tt.to(self.device)


def prior_statistics(run_dir: Path, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, rank: int,
                     device: torch.device, progress: bool, feature_space: str = "raw") -> dict:
    """{"image"|"text"|"all": (mean, std)} of the starting model's features in ``feature_space``, once per run.

    ``compute()`` returns the raw image and text features; with ``feature_space="normalized"`` the
    statistics are those of their L2-normalised rows, the space RaFA then compares z with. Rank 0
    writes them to the run directory with the space in the file's header, where a resumed run finds
    them; a file measured in the other space (or one without the header) is measured again, never
    reused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / PRIOR_STATS_FILE

    def saved() -> dict | None:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            space = (f.metadata() or {}).get("feature_space")
        return load_file(str(path)) if space == feature_space else None

    tensors = saved()
    if tensors is None:
        stage(f"Measuring the starting model's {feature_space} feature statistics for the prior", enabled=progress)
        image, text = compute()
        measured = {}
        normalize = feature_space == "normalized"
        for key, feats in (("image", image), ("text", text), ("all", torch.cat([image, text]))):
            mean, std = feature_statistics(feats, normalize=normalize)
            measured[f"{key}_mean"], measured[f"{key}_std"] = mean.contiguous(), std.contiguous()
        if rank == 0:
            with atomic_path(path) as tmp:
                save_file(measured, str(tmp), metadata={"feature_space": feature_space})
        # every rank takes rank 0's file once it is there, so all of them draw z from the same numbers
        tensors = saved() or measured
    return {k: (tensors[f"{k}_mean"].to(device), tensors[f"{k}_std"].to(device)) for k in ("image", "text", "all")}
