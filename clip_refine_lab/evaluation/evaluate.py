"""Evaluating models and runs on a suite (:mod:`.suites`): zero-shot, retrieval, geometry, linear probe.

Geometry is measured on each image paired with its *first* caption (N images, N texts): the gap
between the two centroids, alignment of matched pairs and uniformity of the pooled 2N features.

``evaluate_run`` writes ``metrics.json`` and a tidy ``metrics.csv`` (model, section, dataset,
metric, value) into the run directory; :mod:`.compare` turns several runs into the paper's tables.
Features go through the one feature cache (:mod:`clip_refine_lab.features`), so a model is
encoded once per data set whichever section or call needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ConfigError, RunConfig
from ..data.manifest import load_manifest
from ..distributed import resolve_device
from ..embedded.base import resolve_pretrained
from ..features import FeatureSet, dataset_features, weights_fingerprint
from ..metrics import (alignment, class_embeddings, classification_metrics, gap_vector, linear_probe, modality_gap,
                       pooled_uniformity, retrieval_metrics, shift_along_gap, zero_shot_logits)
from ..models.loading import EMBEDDED_TAG, LoadedModel, load_model, reload_spec
from ..progress import progress_bar, stage
from ..rundir import load_run_spec, run_config
from ..utils import atomic_write, atomic_write_json
from .suites import Suite, load_suite, resolve_manifest, suite_leakage

PRETRAINED_LABEL = "pre-trained"


# ------------------------------------------------------------------------------------ measuring
def zero_shot_scores(fs: FeatureSet) -> dict[str, float]:
    logits = zero_shot_logits(fs.image, class_embeddings(fs.text))
    return classification_metrics(logits, fs.labels)


def retrieval_scores(fs: FeatureSet) -> dict[str, float]:
    return retrieval_metrics(fs.image, fs.text, fs.text_to_image)


def first_caption_pairs(fs: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, first caption) feature pairs of a caption feature set."""
    owner = fs.text_to_image
    first = torch.full((fs.image.shape[0],), -1, dtype=torch.long)
    idx = torch.arange(owner.shape[0])
    first.scatter_reduce_(0, owner, idx, reduce="amin", include_self=False)
    return fs.image, fs.text[first]


def geometry_scores(fs: FeatureSet) -> dict[str, float]:
    image, text = first_caption_pairs(fs)
    out = dict(modality_gap(image, text))
    out["alignment"] = alignment(image, text)
    out.update(pooled_uniformity(image, text))
    out["image_norm"] = float(image.norm(dim=-1).mean())
    out["text_norm"] = float(text.norm(dim=-1).mean())
    return out


def measure(loaded: LoadedModel, suite: Suite, *, device: str | torch.device = "cpu", data_root: str | None = None,
            image_cache: bool = False, done: Callable[[], object] = lambda: None, num_workers: int = 0,
            batch_size: int = 256) -> dict:
    """All metrics of one model on a suite; ``done()`` is called after each data set's features.
    ``num_workers`` DataLoader processes decode the images, ``batch_size`` images are encoded at once."""
    fp = weights_fingerprint(loaded.model)

    def feats(manifest):
        fs = dataset_features(loaded, manifest, device=device, data_root=data_root, progress=False,
                              weights_fp=fp, image_cache=image_cache, num_workers=num_workers, batch_size=batch_size)
        done()
        return fs

    result: dict = {"zero_shot": {}, "retrieval": {}, "geometry": {}}
    if suite.linear_probe:
        result["linear_probe"] = {}
    for train_m, test_m in suite.linear_probe:
        train_fs, test_fs = feats(train_m), feats(test_m)
        result["linear_probe"][test_fs.name] = linear_probe(train_fs.image, train_fs.labels, test_fs.image, test_fs.labels)
    for m in suite.zero_shot:
        manifest = load_manifest(m, data_root=data_root)
        fs = feats(manifest)
        result["zero_shot"][fs.name] = zero_shot_scores(fs)
        if manifest.is_probe:  # reported, but not in the zero-shot average (metrics.zero_shot_average)
            result["zero_shot"][fs.name]["probe"] = True
    for m in suite.retrieval:
        fs = feats(m)
        result["retrieval"][fs.name] = retrieval_scores(fs)
    for m in suite.geometry:
        fs = feats(m)
        result["geometry"][fs.name] = geometry_scores(fs)
    return result


def evaluate_model(loaded: LoadedModel, suite: Suite, *, device: str | torch.device = "cpu", progress: bool = True,
                   data_root: str | None = None, image_cache: bool = False, num_workers: int = 0,
                   batch_size: int = 256) -> dict:
    """All metrics of one model on a suite (features through the cache; images through the decoded-image
    cache with ``image_cache``): one line, then one bar over the suite's data sets."""
    n = len(suite.manifests())
    stage(f"Evaluating {loaded.spec.arch} on {n} data sets", enabled=progress)
    with progress_bar(total=n, desc="evaluate", enabled=progress, unit="set") as bar:
        return measure(loaded, suite, device=device, data_root=data_root, image_cache=image_cache,
                       done=lambda: bar.update(1), num_workers=num_workers, batch_size=batch_size)


def gap_shift_curve(loaded: LoadedModel, caption_manifest, class_manifest, lambdas: Sequence[float], *,
                    device="cpu", progress: bool = False) -> list[dict]:
    """Liang et al.'s gap-shift experiment: shift image and text features along the unit gap direction
    (measured on the caption set) by each lambda, re-normalise, and re-measure the gap, zero-shot top-1
    and retrieval R@1 in both directions."""
    cap = dataset_features(loaded, caption_manifest, device=device, progress=progress)
    cls = dataset_features(loaded, class_manifest, device=device, progress=progress)
    image, text = first_caption_pairs(cap)
    direction = gap_vector(image, text)
    rows = []
    for lam in lambdas:
        ci, ct = shift_along_gap(cap.image, cap.text, lam, direction=direction)
        zi, zt = shift_along_gap(cls.image, cls.text.reshape(-1, cls.text.shape[-1]), lam, direction=direction)
        r = retrieval_metrics(ci, ct, cap.text_to_image)
        z = classification_metrics(zero_shot_logits(zi, class_embeddings(zt.reshape(cls.text.shape))), cls.labels)
        si, st = first_caption_pairs(FeatureSet(cap.name, cap.kind, ci, ct, cap.text_to_image))
        rows.append({"lambda": float(lam), "gap_l2": modality_gap(si, st)["gap_l2"], "zero_shot_top1": z["top1"],
                     "t2i_R@1": r["t2i_R@1"], "i2t_R@1": r["i2t_R@1"]})
    return rows


# -------------------------------------------------------------------------------------- runs
def load_run_models(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    checkpoint: str = "best") -> tuple[LoadedModel, LoadedModel]:
    """(starting model, refined model) of a run; ``checkpoint`` is best (default) or final.

    The starting model is loaded from the spec the run recorded in ``base.json``; an embedded base
    that is no longer at the recorded path is looked up in the cache (never pre-trained here)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    spec = load_run_spec(run_dir)
    weights = run_dir / f"model_{checkpoint}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: is the run finished? (clip-refine-lab refine ... --run-name "
                                f"{cfg.run_name} resumes it)")
    pretrained = spec.pretrained
    if cfg.pretrained == EMBEDDED_TAG and not (pretrained and Path(pretrained).is_file()):
        pretrained = resolve_pretrained(cfg.model, cfg.pretrained, cfg.preset)  # type: ignore[arg-type]
    base = load_model(spec.arch, pretrained, device=device, quick_gelu=spec.quick_gelu)
    return base, reload_spec(spec, weights, device=device)


def evaluate_run(run_dir: str | os.PathLike, *, suite: str | os.PathLike | None = None, device: str = "auto",
                 progress: bool = True, data_root: str | None = None, checkpoint: str = "best",
                 image_cache: bool | None = None, num_workers: int = 0, batch_size: int = 256) -> dict:
    """Evaluate a run's refined model and its starting model; write metrics.json and metrics.csv.

    ``image_cache=None`` follows the run's own ``image_cache`` setting. Progress is one line and one
    bar over both models' data sets. The starting model's features come from the feature cache when
    another run of the same starting model was evaluated on the suite before (its key is the weights).
    ``num_workers`` DataLoader processes decode images; results are the same for any number."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"eval: num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"eval: batch_size must be an integer >= 1, got {batch_size!r}")
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    dev = resolve_device(device)
    the_suite = load_suite(suite, cfg.preset)
    base, refined = load_run_models(run_dir, dev, checkpoint)
    use_cache = cfg.image_cache if image_cache is None else image_cache
    n = len(the_suite.manifests())
    stage(f"Evaluating run {cfg.run_name} and its starting model on {n} data sets", enabled=progress)
    with progress_bar(total=2 * n, desc=f"evaluate {cfg.run_name}", enabled=progress, unit="set") as bar:
        models = {label: measure(model, the_suite, device=dev, data_root=data_root, image_cache=use_cache,
                                 done=lambda: bar.update(1), num_workers=num_workers, batch_size=batch_size)
                  for label, model in ((PRETRAINED_LABEL, base), (cfg.run_name, refined))}
    result = {"run": str(run_dir), "method": cfg.method, "run_name": cfg.run_name, "checkpoint": checkpoint,
              "models": models, "leakage": _leakage(cfg, the_suite, data_root)}
    atomic_write_json(run_dir / "metrics.json", result)
    atomic_write(run_dir / "metrics.csv", tidy(result).to_csv(index=False))
    return result


def _leakage(cfg: RunConfig, suite: Suite, data_root: str | None) -> dict:
    """Image overlap between the training pairs and every evaluation set (COCO's train and Karpathy
    test splits share images, for one)."""
    train = load_manifest(resolve_manifest(cfg.data, cfg.preset), data_root=data_root or cfg.data_root)  # type: ignore[arg-type]
    report = suite_leakage(train, suite, data_root or cfg.data_root)
    if report is None:
        text = (f"leakage check skipped: {train.path} is streamed from WebDataset shards; run "
                f"'clip-refine-lab data leakage {train.path} <eval manifests>' once to check it")
        return {"text": text, "overlap": None}
    return {"text": report.format(), "overlap": report.to_dict()}


def tidy(result: dict):
    """metrics.csv's rows: one per (model, section, dataset, metric)."""
    import pandas as pd

    rows = [{"model": model, "section": section, "dataset": dataset, "metric": metric, "value": value}
            for model, sections in result["models"].items()
            for section, datasets in sections.items()
            for dataset, metrics in datasets.items()
            for metric, value in metrics.items()]
    return pd.DataFrame(rows, columns=["model", "section", "dataset", "metric", "value"])
