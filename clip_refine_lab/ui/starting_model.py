"""What notebook 01 shows about the starting point: the embedded world's tasks, the base model's
pre-training summary, the suite of headline numbers and the chance level they compare with.

Nothing here builds the world or pre-trains a base: the notebook calls
:func:`clip_refine_lab.embedded.base.ensure_world` / :func:`~clip_refine_lab.embedded.base.ensure_base`
for that (each says what it is about to do and about how long it takes).
"""

from __future__ import annotations

import json
from typing import Iterable

from ..config import RunConfig
from ..models.loading import embedded_base, is_embedded
from ..rundir import resolve_path
from .parameters import looks_like_file


def uses_embedded_world(cfg: RunConfig) -> bool:
    """Whether a run uses the embedded world: the embedded base model, or a world split as its data."""
    return is_embedded(cfg.pretrained) or not looks_like_file(str(cfg.data or "synthetic-coco"))


def task_table(world) -> str:
    """The zero-shot tasks of the embedded world: name, number of classes, the first class names; a compositional
    probe (not in the zero-shot average) is marked "(probe)"."""
    from ..embedded.tasks import TASKS
    from ..embedded.world import split_specs

    if world is None:
        return "(no embedded world: a real model and data set)"
    base = {s.name: s.task for s in split_specs(world.config)}
    lines = [f"{'task':<22}{'classes':>8}  first classes"]
    for name in world.tasks:
        task = TASKS[base[name]]
        label = f"{name} (probe)" if task.probe else name
        lines.append(f"{label:<22}{len(task.classnames):>8}  {', '.join(task.classnames[:3])}")
    return "\n".join(lines)


def base_summary(cfg: RunConfig) -> str | None:
    """The pre-training summary of the cached embedded base model; None for other models or when the
    base has no summary."""
    if not is_embedded(cfg.pretrained):
        return None
    from ..embedded.pretrain import base_checkpoint_path, format_summary

    path = base_checkpoint_path(cfg.model, world_preset=cfg.preset, base=embedded_base(cfg.pretrained)).with_suffix(".json")
    return format_summary(json.loads(path.read_text())) if path.is_file() else None


def headline_suite(cfg: RunConfig, suite: str | None = None):
    """The suite notebook 01 measures the starting model on: ``suite`` when given; the embedded world's
    default suite for the embedded model; else retrieval and geometry on the data manifest."""
    from ..evaluation.suites import Suite, default_suite, load_suite
    from ..training.sources import resolve_data

    if suite is not None:
        path = resolve_path(suite)
        if not path.is_file():
            raise FileNotFoundError(f"suite file not found: {suite}")
        return load_suite(path, cfg.preset)
    if is_embedded(cfg.pretrained):
        return default_suite(cfg.preset)
    data = resolve_data(cfg)
    return Suite([], [data], [data])


def chance_row(manifests: Iterable, data_root: str | None = None) -> dict[str, float]:
    """Chance-level top-1 (%) of classification manifests by data set name, and their 'average' (over the
    classification tasks: compositional probes, manifest ``probe: true``, are not in the zero-shot average)."""
    from ..data.manifest import load_manifest

    row, averaged = {}, []
    for mp in manifests:
        m = load_manifest(mp, data_root=data_root)
        row[m.name] = 100.0 / m.num_classes
        if not m.is_probe:
            averaged.append(row[m.name])
    if averaged:
        row["average"] = sum(averaged) / len(averaged)
    return row


def with_chance(table, manifests: Iterable, data_root: str | None = None):
    """A Table-1 frame with a 'chance' row appended (columns it lacks stay NaN)."""
    import pandas as pd

    if table.empty:
        return table
    row = chance_row(manifests, data_root)
    return pd.concat([table, pd.DataFrame([row], index=["chance"])])[list(table.columns)]
