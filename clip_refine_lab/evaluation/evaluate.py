"""Evaluating models and runs on a suite (:mod:`.suites`): zero-shot, retrieval, geometry, linear probe.

Geometry is measured on each image paired with its *first* caption (N images, N texts): the gap
between the two centroids, alignment of matched pairs and uniformity of the pooled 2N features.

``evaluate_run`` writes ``metrics.json`` and a tidy ``metrics.csv`` (model, section, dataset,
metric, value) into the run directory; ``evaluate_pretrained`` does the same for a model alone (the
paper's "Pre-trained" row) in a folder of its own; :mod:`.compare` turns several of them into the
paper's tables. metrics.json also records the suite, the data root and each data set's manifest, so
whatever reads a run later finds its data.
Features go through the one feature cache (:mod:`clip_refine_lab.features`), so a model is
encoded once per data set whichever section or call needs it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ConfigError, RunConfig, preset_name
from ..data.manifest import load_manifest
from ..data.preflight import check_suite
from ..distributed import resolve_device
from ..embedded.base import resolve_pretrained
from ..features import FeatureSet, dataset_features, first_caption_pairs, weights_fingerprint
from ..metrics import (DEFAULT_RETRIEVAL_TIES, class_embeddings, classification_metrics, gap_vector, linear_probe,
                       modality_gap, regime_statistics, retrieval_metrics, shift_along_gap, zero_shot_logits)
from ..models.checkpoints import CHECKPOINT_SUFFIXES
from ..models.loading import EMBEDDED_TAG, LoadedModel, is_embedded, load_model, reload_spec
from ..progress import progress_bar, stage
from ..regime import logit_scale_of
from ..rundir import load_run_spec, resolve_output_dir, run_config
from ..utils import atomic_write, atomic_write_json
from .suites import Suite, check_labels, load_suite, resolve_manifest, suite_leakage

PRETRAINED_LABEL = "pre-trained"
MODEL_FILE = "model.json"  # what a folder of a model evaluated alone holds instead of a run's config.yaml


# ------------------------------------------------------------------------------------ measuring
def zero_shot_scores(fs: FeatureSet) -> dict[str, float]:
    logits = zero_shot_logits(fs.image, class_embeddings(fs.text))
    return classification_metrics(logits, fs.labels)


def retrieval_scores(fs: FeatureSet, ties: str = DEFAULT_RETRIEVAL_TIES) -> dict[str, float]:
    """Recall@k and median ranks; ``ties``: the rule for tied scores
    (:func:`clip_refine_lab.metrics.retrieval_metrics`)."""
    return retrieval_metrics(fs.image, fs.text, fs.text_to_image, ties=ties)


def geometry_scores(fs: FeatureSet, logit_scale: float) -> dict[str, float]:
    """The regime statistics (:func:`~clip_refine_lab.metrics.regime_statistics`) of a caption set's
    (image, first caption) pairs: gap, alignment, uniformity, raw norms and the model's logit scale."""
    image, text = first_caption_pairs(fs)
    return regime_statistics(image, text, logit_scale)


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
        result["geometry"][fs.name] = geometry_scores(fs, logit_scale_of(loaded.model))
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
class IncompleteRunError(ConfigError):
    """A run directory without ``summary.json`` (crashed, stopped or still training) given to eval or compare."""


def check_finished(run_dir: Path, allow_incomplete: bool = False) -> bool:
    """Whether the run at ``run_dir`` is unfinished (no ``summary.json``): refused with one line naming
    the run and what to do, unless ``allow_incomplete`` (then True, and its metrics are marked)."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); give the folder that "
                                "`clip-refine-lab refine` printed, or evaluate a model alone with "
                                "`clip-refine-lab eval --model ARCH --pretrained TAG|FILE`")
    if (run_dir / "summary.json").is_file():
        return False
    if not allow_incomplete:
        raise IncompleteRunError(
            f"run {run_dir.name} ({run_dir}) is not finished: no summary.json (it crashed, was stopped or is "
            f"still training); finish it by running `clip-refine-lab refine --run-name {run_dir.name}` with its "
            "options again (it resumes), or pass --allow-incomplete (allow_incomplete=True) to use it as it is, "
            "marked incomplete")
    return True


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
    if is_embedded(cfg.pretrained) and not (pretrained and Path(pretrained).is_file()):
        pretrained = resolve_pretrained(cfg.model, cfg.pretrained, cfg.preset)  # type: ignore[arg-type]
    base = load_model(spec.arch, pretrained, device=device, quick_gelu=spec.quick_gelu)
    return base, reload_spec(spec, weights, device=device)


def suite_datasets(suite: Suite, data_root: str | None = None) -> dict[str, list[dict]]:
    """Each section's data sets in the suite's order, ``{"name", "manifest"}`` (absolute manifest paths;
    linear probe: ``{"name", "train", "test"}``): metrics.json records them, so the notebooks find a
    run's data sets, real manifests included, with no other parameter."""
    def name(path: Path) -> str:
        return load_manifest(path, data_root=data_root).name

    out: dict[str, list[dict]] = {
        section: [{"name": name(p), "manifest": str(Path(p).resolve())} for p in getattr(suite, section)]
        for section in ("zero_shot", "retrieval", "geometry")}
    if suite.linear_probe:
        out["linear_probe"] = [{"name": name(test), "train": str(Path(train).resolve()),
                                "test": str(Path(test).resolve())} for train, test in suite.linear_probe]
    return out


def _suite(suite: Suite | str | os.PathLike | None, preset: str | None) -> tuple[Suite, str | None]:
    """(the suite, its file as metrics.json records it: None for the embedded world's default suite)."""
    if isinstance(suite, Suite):
        return suite, None
    return load_suite(suite, preset), (None if suite is None else str(Path(suite).resolve()))


def evaluate_run(run_dir: str | os.PathLike, *, suite: str | os.PathLike | None = None, device: str = "auto",
                 progress: bool = True, data_root: str | None = None, checkpoint: str = "best",
                 image_cache: bool | None = None, allow_incomplete: bool = False, num_workers: int = 0,
                 batch_size: int = 256) -> dict:
    """Evaluate a run's refined model and its starting model; write metrics.json and metrics.csv.

    ``data_root=None`` takes the run's own ``data_root``; ``image_cache=None`` follows the run's
    ``image_cache`` setting. A run without ``summary.json`` is refused (:class:`IncompleteRunError`)
    unless ``allow_incomplete``, which evaluates its current weights and records ``incomplete: true``.
    Progress is one line and one bar over both models' data sets. The starting model's features come
    from the feature cache when another run of the same starting model was evaluated on the suite
    before (its key is the weights). ``num_workers`` DataLoader processes decode images; results are
    the same for any number."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"eval: num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"eval: batch_size must be an integer >= 1, got {batch_size!r}")
    run_dir = Path(run_dir)
    incomplete = check_finished(run_dir, allow_incomplete)
    cfg = run_config(run_dir)
    dev = resolve_device(device)
    data_root = data_root or cfg.data_root
    the_suite, suite_file = _suite(suite, cfg.preset)
    check_labels(the_suite, data_root)  # the label range named first, then the data check's findings
    check_suite(the_suite, data_root)
    base, refined = load_run_models(run_dir, dev, checkpoint)
    use_cache = cfg.image_cache if image_cache is None else image_cache
    n = len(the_suite.manifests())
    stage(f"Evaluating run {cfg.run_name} and its starting model on {n} data sets", enabled=progress)
    with progress_bar(total=2 * n, desc=f"evaluate {cfg.run_name}", enabled=progress, unit="set") as bar:
        models = {label: measure(model, the_suite, device=dev, data_root=data_root, image_cache=use_cache,
                                 done=lambda: bar.update(1), num_workers=num_workers, batch_size=batch_size)
                  for label, model in ((PRETRAINED_LABEL, base), (cfg.run_name, refined))}
    result = {"kind": "run", "run": str(run_dir), "method": cfg.method, "run_name": cfg.run_name,
              "checkpoint": checkpoint, "incomplete": incomplete, "suite": suite_file, "data_root": data_root,
              "datasets": suite_datasets(the_suite, data_root), "models": models,
              "leakage": _leakage(cfg, the_suite, data_root)}
    write_metrics(run_dir, result)
    return result


def write_metrics(folder: Path, result: dict) -> None:
    """metrics.json and its tidy metrics.csv, each written atomically."""
    atomic_write_json(folder / "metrics.json", result)
    atomic_write(folder / "metrics.csv", tidy(result).to_csv(index=False))


# ------------------------------------------------------------------------------- a model alone
def pretrained_name(arch: str, pretrained: str | None) -> str:
    """The folder name of a model evaluated alone: ``pretrained-<arch>-<tag or file stem>``, with every
    character other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-`` (``hf-hub:org/x``)."""
    weights = Path(pretrained).stem if pretrained and looks_like_checkpoint(pretrained) else pretrained
    arch = Path(arch).stem if looks_like_checkpoint(arch) else arch
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(["pretrained", arch, *([weights] if weights else [])]))


def looks_like_checkpoint(name: str) -> bool:
    return Path(name).suffix in CHECKPOINT_SUFFIXES


def _requested(model: str | LoadedModel, pretrained: str | None) -> dict:
    """The model as the user named it (model.json records it; the folder is named after it)."""
    if isinstance(model, LoadedModel):
        return {"model": model.spec.arch, "pretrained": pretrained or model.spec.pretrained}
    if pretrained is None and not looks_like_checkpoint(model) and not model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"name the weights of '{model}' to evaluate (--pretrained): a tag such as openai, a "
                          f"checkpoint file, or '{EMBEDDED_TAG}' for our tiny architectures")
    return {"model": model, "pretrained": pretrained}


def _alone_folder(output_dir: str | os.PathLike | None, name: str) -> Path | None:
    """``<output_dir>/<name>``, checked before any work: a plain folder name, not a file, not a run directory."""
    if not name.strip() or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"the folder name of a model evaluated alone must be a plain name (no path separators), "
                          f"got {name!r}")
    if output_dir is None:
        return None
    folder = resolve_output_dir(output_dir) / name
    for p in (folder.parent, folder):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{p} is a file; the output folder of a model evaluated alone must be a folder "
                              "(--output-dir, --name)")
    if (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder} is a run directory; evaluate the model alone under another --name")
    return folder


def evaluate_pretrained(model: str | LoadedModel, pretrained: str | None = None, *,
                        suite: Suite | str | os.PathLike | None = None, output_dir: str | os.PathLike | None = "runs",
                        name: str | None = None, preset: str | None = None, device: str = "auto",
                        quick_gelu: bool | None = None, data_root: str | None = None, progress: bool = True,
                        image_cache: bool = False, num_workers: int = 0, batch_size: int = 256) -> dict:
    """Evaluate a model alone (the paper's "Pre-trained" row) on a suite; write its metrics.

    ``model`` is an architecture with ``pretrained`` (a tag such as ``openai``, a checkpoint file, or
    ``embedded`` for our tiny ones' cached base), one of our checkpoint files alone, or a loaded model
    (then ``pretrained``, when given, only names it: ``embedded`` rather than the cached file).
    The folder ``<output_dir>/<name>/`` (default name :func:`pretrained_name`) gets ``model.json`` (what
    was loaded) and the run layout's ``metrics.json`` / ``metrics.csv``, with the model under
    ``pre-trained``, so ``compare`` puts it beside runs; ``output_dir=None`` writes nothing."""
    preset = preset_name(preset)
    dev = resolve_device(device)
    requested = _requested(model, pretrained)
    folder_name = name or pretrained_name(requested["model"], requested["pretrained"])
    folder = _alone_folder(output_dir, folder_name)
    the_suite, suite_file = _suite(suite, preset)
    check_labels(the_suite, data_root)  # the label range named first, then the data check's findings
    check_suite(the_suite, data_root)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        weights = resolve_pretrained(model, pretrained, preset) if pretrained else None
        loaded = load_model(model, weights, device=dev, quick_gelu=quick_gelu)
    metrics = evaluate_model(loaded, the_suite, device=dev, progress=progress, data_root=data_root,
                             image_cache=image_cache, num_workers=num_workers,
                             batch_size=batch_size)
    result = {"kind": "pretrained", "run": str(folder) if folder else None, "run_name": folder_name, "method": None,
              "checkpoint": None, "incomplete": False, "suite": suite_file, "data_root": data_root,
              "datasets": suite_datasets(the_suite, data_root), "models": {PRETRAINED_LABEL: metrics},
              "leakage": None}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / MODEL_FILE, {**requested, "preset": preset, "spec": dataclasses.asdict(loaded.spec)})
        write_metrics(folder, result)
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
