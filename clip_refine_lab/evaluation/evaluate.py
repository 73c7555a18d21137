"""Evaluating models and runs on a task suite, and the paper-layout tables.

A *suite* says what to measure::

    zero_shot: [shape, colour, ...]         # classification manifests (paths or world task names)
    retrieval: [synthetic-retrieval]        # caption manifests: recall@k both directions
    geometry: [synthetic-retrieval]         # caption manifests: gap, alignment, uniformity
    linear_probe:                           # optional: logistic regression on frozen image features
      - {train: imagenet1k_train.yaml, test: imagenet1k.yaml}   # (the paper's Table 7)

Names that are not files are looked up in the embedded world of the run's preset. The default
suite is the embedded world's (every zero-shot task incl. the shifted variants; synthetic-retrieval
for retrieval and geometry). ``data_manifests/suites/paper.yaml`` is the paper's (12 zero-shot sets,
COCO val2017 and Flickr30K test).

Geometry is measured on each image paired with its *first* caption (N images, N texts): the gap
between the two centroids, alignment of matched pairs and uniformity of the pooled 2N features.

``evaluate_run`` writes ``metrics.json`` and a tidy ``metrics.csv`` (model, section, dataset,
metric, value) into the run directory; ``compare`` turns several runs into the paper's tables
(Table 1 zero-shot, Table 2 retrieval, Table 3 geometry) as pandas DataFrames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import yaml

from ..config import PRESETS, RunConfig, preset_name
from ..rundir import load_run_spec, run_config
from ..data.manifest import load_manifest
from ..features import FeatureSet, dataset_features
from ..metrics import (alignment, class_embeddings, classification_metrics, linear_probe, modality_gap,
                      pooled_uniformity, retrieval_metrics, shift_along_gap, zero_shot_logits)
from ..models.loading import LoadedModel, load_model, reload_spec
from ..utils import atomic_write, atomic_write_json

PRETRAINED_LABEL = "pre-trained"


@dataclass
class Suite:
    zero_shot: list[Path] = field(default_factory=list)
    retrieval: list[Path] = field(default_factory=list)
    geometry: list[Path] = field(default_factory=list)
    linear_probe: list[tuple[Path, Path]] = field(default_factory=list)  # (train, test) classification manifests


def _world(preset: str | None):
    from ..embedded.world import WorldConfig, build_world

    return build_world(WorldConfig.preset(PRESETS[preset_name(preset)].world), progress=False)


def resolve_manifest(name: str | os.PathLike, preset: str | None = None, base: Path | None = None) -> Path:
    """A manifest path from a path (relative to ``base``) or a name of the embedded world."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        p = p if p.is_absolute() or base is None else base / p
        if not p.is_file():
            raise FileNotFoundError(f"manifest not found: {p}")
        return p
    return _world(preset).manifest(str(name))


def default_suite(preset: str | None = None) -> Suite:
    world = _world(preset)
    ret = world.manifest("synthetic-retrieval")
    return Suite([world.manifest(t) for t in world.tasks], [ret], [ret])


def load_suite(path: str | os.PathLike | None, preset: str | None = None) -> Suite:
    if path is None:
        return default_suite(preset)
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"zero_shot", "retrieval", "geometry", "linear_probe"}
    if unknown:
        raise ValueError(f"{path}: unknown suite fields {sorted(unknown)}; use zero_shot, retrieval, geometry, linear_probe")
    suite = Suite(*[[resolve_manifest(n, preset, path.parent) for n in spec.get(k) or []]
                    for k in ("zero_shot", "retrieval", "geometry")])
    for i, pair in enumerate(spec.get("linear_probe") or []):
        if not isinstance(pair, dict) or set(pair) != {"train", "test"}:
            raise ValueError(f"{path}: linear_probe item {i} must be a mapping with 'train' and 'test'")
        suite.linear_probe.append((resolve_manifest(pair["train"], preset, path.parent),
                                   resolve_manifest(pair["test"], preset, path.parent)))
    return suite


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


def evaluate_model(loaded: LoadedModel, suite: Suite, *, device: str | torch.device = "cpu", progress: bool = True,
                   data_root: str | None = None, image_cache: bool = False) -> dict:
    """All metrics of one model on a suite (features through the cache; images through the decoded-image
    cache with ``image_cache``)."""
    from ..features import weights_fingerprint

    fp = weights_fingerprint(loaded.model)
    feats = lambda m: dataset_features(loaded, m, device=device, data_root=data_root, progress=progress,  # noqa: E731
                                       weights_fp=fp, image_cache=image_cache)
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


def gap_shift_curve(loaded: LoadedModel, caption_manifest, class_manifest, lambdas: Sequence[float], *,
                    device="cpu", progress: bool = False) -> list[dict]:
    """Liang et al.'s gap-shift experiment: shift image and text features along the unit gap direction
    (measured on the caption set) by each lambda, re-normalise, and re-measure the gap, zero-shot top-1
    and retrieval R@1 in both directions."""
    from ..metrics import gap_vector

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
    """(starting model, refined model) of a run; ``checkpoint`` is best (default) or final."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    spec = load_run_spec(run_dir)
    weights = run_dir / f"model_{checkpoint}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: is the run finished? (clip-refine-lab refine ... --run-name "
                                f"{cfg.run_name} resumes it)")
    base = load_model(cfg.model, cfg.pretrained, device=device, quick_gelu=cfg.quick_gelu, world_preset=cfg.preset)  # type: ignore[arg-type]
    return base, reload_spec(spec, weights, device=device)


def evaluate_run(run_dir: str | os.PathLike, *, suite: str | os.PathLike | None = None, device: str = "auto",
                 progress: bool = True, data_root: str | None = None, checkpoint: str = "best",
                 image_cache: bool | None = None) -> dict:
    """Evaluate a run's refined model and its starting model; write metrics.json and metrics.csv.

    ``image_cache=None`` follows the run's own ``image_cache`` setting."""
    from ..training.loop import resolve_device

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    dev = resolve_device(device)
    the_suite = load_suite(suite, cfg.preset)
    base, refined = load_run_models(run_dir, dev, checkpoint)
    use_cache = cfg.image_cache if image_cache is None else image_cache
    result = {
        "run": str(run_dir), "method": cfg.method, "run_name": cfg.run_name, "checkpoint": checkpoint,
        "models": {
            PRETRAINED_LABEL: evaluate_model(base, the_suite, device=dev, progress=progress, data_root=data_root,
                                             image_cache=use_cache),
            cfg.run_name: evaluate_model(refined, the_suite, device=dev, progress=progress, data_root=data_root,
                                         image_cache=use_cache),
        },
        "leakage": _leakage(cfg, the_suite, data_root),
    }
    atomic_write_json(run_dir / "metrics.json", result)
    atomic_write(run_dir / "metrics.csv", tidy(result).to_csv(index=False))
    return result


def suite_leakage(train, suite: Suite, data_root: str | None = None):
    """Image-id overlap between a training manifest and every evaluation set of ``suite`` (no hashing), or
    None for a streamed (WebDataset) training manifest: listing web-scale shards means reading all of them,
    so those are checked offline with ``clip-refine-lab data leakage``. Used by evaluation and the trainer."""
    from ..data.formats import is_streaming
    from ..data.check import leakage_report

    if is_streaming(train):
        return None
    evals = sorted({str(p) for p in [*suite.zero_shot, *suite.retrieval, *suite.geometry]})
    return leakage_report(train, evals, data_root=data_root, hash_images=False)


def _leakage(cfg: RunConfig, suite: Suite, data_root: str | None) -> dict:
    """Image overlap between the training pairs and every evaluation set (REFERENCE.md: COCO pitfall)."""
    from ..training.loop import resolve_data

    train = load_manifest(resolve_data(cfg), data_root=data_root or cfg.data_root)
    report = suite_leakage(train, suite, data_root or cfg.data_root)
    if report is None:
        text = (f"leakage check skipped: {train.path} is streamed from WebDataset shards; run "
                f"'clip-refine-lab data leakage {train.path} <eval manifests>' once to check it")
        return {"text": text, "overlap": None}
    return {"text": report.format(), "overlap": report.to_dict()}


def tidy(result: dict):
    import pandas as pd

    rows = [{"model": model, "section": section, "dataset": dataset, "metric": metric, "value": value}
            for model, sections in result["models"].items()
            for section, datasets in sections.items()
            for dataset, metrics in datasets.items()
            for metric, value in metrics.items()]
    return pd.DataFrame(rows, columns=["model", "section", "dataset", "metric", "value"])


def compare(runs: Iterable[str | os.PathLike | dict], *, evaluate_missing: bool = True) -> dict:
    """Paper-layout tables over several runs: {"zero_shot", "retrieval", "geometry"} -> DataFrame.

    Rows are models: the starting model once (its numbers from the first run), then each run by name.
    Accuracies and recalls are in percent, as in the paper.
    """
    import pandas as pd

    results = []
    for r in runs:
        if isinstance(r, dict):
            results.append(r)
            continue
        path = Path(r) / "metrics.json"
        if not path.is_file():
            if not evaluate_missing:
                raise FileNotFoundError(f"{path} not found; run `clip-refine-lab eval {r}` first")
            results.append(evaluate_run(r, progress=False))
        else:
            results.append(json.loads(path.read_text()))
    if not results:
        raise ValueError("compare needs at least one run")
    models: dict[str, dict] = {PRETRAINED_LABEL: results[0]["models"][PRETRAINED_LABEL]}
    for res in results:
        models.update({k: v for k, v in res["models"].items() if k != PRETRAINED_LABEL})
    zs = pd.DataFrame({m: {t: 100 * v["top1"] for t, v in r["zero_shot"].items()} for m, r in models.items()}).T
    if not zs.empty:
        # the average of the classification tasks; compositional probes (manifest `probe: true`) stay out of it
        probes = {t for r in models.values() for t, v in r["zero_shot"].items() if v.get("probe")}
        zs["average"] = zs[[c for c in zs.columns if c not in probes]].mean(axis=1)
    ret_rows = {}
    for m, r in models.items():
        ret_rows[m] = {(ds, d, f"R@{k}"): 100 * v[f"{d}_R@{k}"] for ds, v in r["retrieval"].items()
                       for d in ("t2i", "i2t") for k in (1, 5, 10)}
    ret = pd.DataFrame(ret_rows).T
    geo = pd.DataFrame({m: {(ds, k): v[k] for ds, v in r["geometry"].items()
                            for k in ("gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf")}
                        for m, r in models.items()}).T
    tables = {"zero_shot": zs, "retrieval": ret, "geometry": geo}
    if any(r.get("linear_probe") for r in models.values()):
        tables["linear_probe"] = pd.DataFrame({m: {ds: 100 * v["top1"] for ds, v in (r.get("linear_probe") or {}).items()}
                                               for m, r in models.items()}).T
    return tables


def format_tables(result_or_tables: dict) -> str:
    """Text rendering of the three tables (for the CLI)."""
    tables = compare([result_or_tables]) if "models" in result_or_tables else result_or_tables
    parts = []
    for title, key, fmt in (("Table 1: zero-shot top-1 (%)", "zero_shot", "{:.2f}"),
                            ("Table 2: retrieval recall (%)", "retrieval", "{:.2f}"),
                            ("Table 3: modality gap, alignment, uniformity", "geometry", "{:.4f}"),
                            ("Linear probe top-1 (%)", "linear_probe", "{:.2f}")):
        if key not in tables:
            continue
        df = tables[key]
        parts.append(f"{title}\n{df.to_string(float_format=lambda v: fmt.format(v))}" if not df.empty else f"{title}\n(none)")
    leak = result_or_tables.get("leakage", {}) if "models" in result_or_tables else {}
    if leak and leak.get("text"):
        parts.append(leak["text"])
    return "\n\n".join(parts)

