"""The plan of a sweep: its runs in order, which of them are shared, their steps and estimated cost."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import PRESETS, RunConfig, preset_name
from .spec import (DataRef, SweepError, SweepSpec, block_runs, block_where, did_you_mean, load_spec,
                   resolve_suite_file, run_config)

#: Cost model of --dry-run (2 CPU cores, fp32, teacher and image caches on, SDPA attention), per preset:
#: seconds per 1,000 training pairs, seconds per evaluated image of the refined model (the starting
#: model's features come from the cache) and a fixed overhead per run and per evaluation (loading,
#: validation, checkpoints). Fitted to a full paper grid (main runs 23 s for 38 steps of 256 pairs,
#: full-suite evaluations 14 s, sweep-suite evaluations 8.5 s); rough.
SECONDS_PER_KPAIR = {"default": 2.0, "micro": 1.0}
EVAL_SECONDS_PER_IMAGE = {"default": 0.45e-3, "micro": 0.5e-3}
RUN_OVERHEAD_SECONDS = {"default": 5.0, "micro": 3.0}
EVAL_OVERHEAD_SECONDS = 5.0


@dataclass
class PlannedRun:
    """One run of a sweep: where it goes, its config and what it varies."""

    block: str
    table: str
    name: str  # the block-unique name, without the seed
    seed: int
    label: str  # row label in the tables
    params: dict  # varied field -> value (DataRef for derived data)
    config: RunConfig  # complete, validated (not resolved: preset defaults are filled at run time)
    data_ref: DataRef | None = None
    data_path: Path | None = None
    suite: Any = None  # the evaluation suite (YAML path, inline mapping, or None = the default suite)
    varied: tuple = ()  # every field the block varies (a run's params may set only some of them)
    alias_of: "PlannedRun | None" = None  # an earlier run with the same configuration and suite: its results are shared

    @property
    def source(self) -> "PlannedRun":
        """The run whose directory holds this run's results (itself, or the identical run it shares)."""
        return self.alias_of or self

    @property
    def suite_id(self) -> str:
        return "default" if self.suite is None else json.dumps(self.suite, sort_keys=True)

    @property
    def run_name(self) -> str:
        return f"{self.name}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir) / self.run_name

    @property
    def key(self) -> str:
        return f"{self.block}/{self.run_name}"


# ================================================================================ grid expansion
def expand(spec: SweepSpec, sweep_dir: str | os.PathLike, *, only: Sequence[str] | None = None) -> list[PlannedRun]:
    """Every run of the spec, in order (blocks in spec order; seed by seed, so a partial sweep has every
    configuration of seed 0 first). Pure: nothing is read or written.

    A run whose configuration and evaluation suite equal an earlier run's (e.g. the alpha = 0.5 point of
    an alpha sweep and the CLIP-Refine row of the main table) is not run twice: ``alias_of`` names the
    earlier run, whose results it shares (``only`` keeps the link when the earlier run's block is left out)."""
    runs = _expand_all(spec, Path(sweep_dir))
    names = [b.name for b in spec.blocks]
    for o in only or []:
        if o not in names:
            raise SweepError(f"no block '{o}' in the spec{did_you_mean(o, names)}; blocks: {', '.join(names)}")
    first: dict[str, PlannedRun] = {}
    for r in runs:
        key = json.dumps([_config_key(r.config), r.suite_id], sort_keys=True, default=str)
        if key in first:
            r.alias_of = first[key]
        else:
            first[key] = r
    return [r for r in runs if not only or r.block in only]


def _config_key(cfg: RunConfig) -> dict:
    d = cfg.resolved().to_dict()
    for k in ("output_dir", "run_name", "extra", "log_every"):
        d.pop(k, None)
    return d


def _expand_all(spec: SweepSpec, sweep_dir: Path) -> list[PlannedRun]:
    out: list[PlannedRun] = []
    for block in spec.blocks:
        suite = block.suite if block.suite is not None else spec.suite
        where = block_where(spec, block)
        varied, named = block_runs(block, where)
        for seed in block.seeds or spec.seeds:
            for name, label, params in named:
                cfg, ref, data_path = run_config(spec, block, name, params, seed, sweep_dir, where)
                out.append(PlannedRun(block.name, block.table, name, seed, label, params, cfg, ref, data_path, suite,
                                      tuple(varied)))
    return out


def default_sweep_dir(spec: SweepSpec) -> Path:
    """``output_dir`` of the spec, else ``runs/sweeps/<name>-<preset>`` (relative: from the project root)."""
    from ..rundir import resolve_output_dir

    return resolve_output_dir(spec.output_dir or f"runs/sweeps/{spec.name}-{preset_name(spec.preset)}")


# ======================================================================================= steps
def _split_size(preset: str, split: str) -> int | None:
    from ..embedded.world import WorldConfig

    wc = WorldConfig.preset(PRESETS[preset].world)
    return {"synthetic-web": wc.web_size, "synthetic-coco": wc.coco_size,
            "synthetic-retrieval": wc.retrieval_size}.get(split)


def _manifest_size(path: str | os.PathLike | None) -> int | None:
    if path is None or not Path(path).is_file():
        return None
    from ..data.manifest import load_manifest

    return len(load_manifest(path).records())


def planned_steps(run: PlannedRun) -> int | None:
    """Optimiser steps of a run, from the data size, batch, epochs and max_steps (None if unknown)."""
    cfg = run.config
    preset = PRESETS[preset_name(cfg.preset)]
    if run.data_ref is not None:
        n = run.data_ref.size or _split_size(preset.name, run.data_ref.split)
        if run.data_ref.where and run.data_ref.size is None:  # known once the filtered set is written
            n = _manifest_size(run.data_path)
        if n is not None and run.data_ref.keep_fraction is not None:
            n = int(math.floor(run.data_ref.keep_fraction * n + 0.5))
    else:
        data = cfg.data or "synthetic-coco"
        n = _split_size(preset.name, data)
        if n is None:
            n = _manifest_size(data)
    if n is None:
        return None
    n_val = 0 if cfg.val_fraction == 0 else max(1, int(round(n * cfg.val_fraction)))
    bs = cfg.batch_size or preset.batch_size
    per_epoch = (n - n_val) // bs
    if per_epoch < 1:
        return 0
    steps = max(1, int(round(per_epoch * (cfg.epochs if cfg.epochs is not None else preset.epochs))))
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def suite_images(run: PlannedRun, spec_path: Path | None = None) -> int | None:
    """Images one evaluation of the run encodes (its suite's zero-shot sets and caption sets), for estimates."""
    from ..embedded.tasks import TASK_NAMES
    from ..embedded.world import WorldConfig

    wc = WorldConfig.preset(PRESETS[preset_name(run.config.preset)].world)
    suite = run.suite
    if suite is None:
        return len(TASK_NAMES) * wc.task_size + wc.retrieval_size
    if isinstance(suite, str):
        try:
            suite = yaml.safe_load(resolve_suite_file(suite, spec_path).read_text()) or {}
        except (SweepError, OSError, yaml.YAMLError):
            return None
    n = sum(wc.task_size for _ in suite.get("zero_shot") or [])
    captions = set(suite.get("retrieval") or []) | set(suite.get("geometry") or [])
    return n + wc.retrieval_size * len(captions)


# ======================================================================================== plan
def plan_frame(runs: Sequence[PlannedRun], spec_path: Path | None = None):
    """A DataFrame of planned runs: block, run, seed, steps, pairs (steps x batch), finished, evaluated."""
    import pandas as pd

    rows = []
    for r in runs:
        src = r.source
        steps = planned_steps(r)
        bs = r.config.batch_size or PRESETS[preset_name(r.config.preset)].batch_size
        rows.append({"block": r.block, "table": r.table, "run": r.run_name, "seed": r.seed, "steps": steps,
                     # pair-passes: the no-grad forward of gradient accumulation costs about a third more
                     "pairs": None if steps is None else steps * bs * (4 / 3 if r.config.accum_steps > 1 else 1),
                     "eval_images": suite_images(r, spec_path),
                     "shared_with": src.key if r.alias_of is not None else None,
                     "finished": (src.run_dir / "summary.json").is_file(),
                     "evaluated": (src.run_dir / "metrics.json").is_file()})
    return pd.DataFrame(rows)


def plan(spec: SweepSpec | str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
         only: Sequence[str] | None = None):
    """The plan of a spec (:func:`plan_frame` of its runs) in ``output_dir`` (default: its sweep directory)."""
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    return plan_frame(expand(spec, sweep_dir, only=only), spec.path)


def block_minutes(df, preset: str) -> dict[str, float]:
    """Estimated minutes of the work left in each block (2 CPU cores, rough): training the unfinished runs,
    evaluating the unevaluated ones. Shared runs cost nothing: their source run does the work."""
    rate = SECONDS_PER_KPAIR.get(preset, SECONDS_PER_KPAIR["default"])
    per_image = EVAL_SECONDS_PER_IMAGE.get(preset, EVAL_SECONDS_PER_IMAGE["default"])
    overhead = RUN_OVERHEAD_SECONDS.get(preset, RUN_OVERHEAD_SECONDS["default"])
    out = {}
    for block, g in df.groupby("block", sort=False):
        own = g[g.shared_with.isna()]
        todo = own[~own.finished]
        unevaluated = own[~own.evaluated]
        seconds = (todo.pairs.fillna(0).sum() / 1000 * rate + overhead * len(todo)
                   + (unevaluated.eval_images.fillna(0) * per_image + EVAL_OVERHEAD_SECONDS).sum())
        out[block] = seconds / 60
    return out


def format_plan(df, preset: str) -> str:
    """Runs and estimated cost per block (minutes on 2 CPU cores, rough)."""
    if df.empty:
        return "(no runs)"
    minutes = block_minutes(df, preset)
    w = max(12, 2 + max(len(str(b)) for b in df.block))  # the block column fits the longest block name
    lines = [f"{'block':<{w}}{'table':<10}{'runs':>6}{'shared':>8}{'done':>6}{'steps/run':>12}{'est. min':>10}"]
    for block, g in df.groupby("block", sort=False):
        steps = sorted({int(s) for s in g.steps.dropna()})
        steps_txt = f"{steps[0]}" if len(steps) == 1 else (f"{steps[0]}-{steps[-1]}" if steps else "?")
        lines.append(f"{block:<{w}}{g.table.iloc[0]:<10}{len(g):>6}{int(g.shared_with.notna().sum()):>8}"
                     f"{int(g.finished.sum()):>6}{steps_txt:>12}{minutes[block]:>10.1f}")
    lines.append(f"{'total':<{w}}{'':<10}{len(df):>6}{int(df.shared_with.notna().sum()):>8}{int(df.finished.sum()):>6}"
                 f"{'':>12}{sum(minutes.values()):>10.1f}")
    lines.append("estimate for 2 CPU cores; not included: building the world, pre-training base models that are not "
                 "cached (~7 to 14 min each on 2 cores), and the first run on each data set (image and teacher caches)")
    return "\n".join(lines)
