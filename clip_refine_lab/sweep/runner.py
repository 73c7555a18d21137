"""Running a sweep: prepare the base models and derived data, run or resume or skip each run, evaluate it.

A second invocation finds its runs again: finished ones are skipped (``refine`` is not even called),
interrupted ones are resumed from their last checkpoint by :func:`~clip_refine_lab.training.loop.refine`,
and a run directory that holds a *different* configuration (the spec changed under the same name) is
reported as a failure rather than silently reused. A failed run is logged in ``sweep.jsonl`` and the
sweep goes on; the summary lists the failures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import PRESETS, RunConfig, preset_name
from ..models.loading import embedded_base, is_embedded
from ..progress import progress_bar, stage
from ..utils import append_jsonl, atomic_write, read_jsonl, stable_hash
from .figures import figures
from .plan import PlannedRun, block_minutes, default_sweep_dir, expand, plan_frame
from .spec import SPEC_FILE, DataRef, SweepError, SweepSpec, load_spec, resolve_suite_file, spec_for_saving
from .tables import NoResultsError, Tables, aggregate, write_outputs

SWEEP_LOG = "sweep.jsonl"
BASE_MODELS = "(base models)"  # the block_seconds entry of the one-off base-model pre-training


@dataclass
class SweepReport:
    """What one invocation did: run keys that ran, resumed, were skipped, evaluated or failed, and the outputs."""

    sweep_dir: Path
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    block_seconds: dict[str, float] = field(default_factory=dict)
    tables: Tables | None = None
    figures: dict = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"sweep {self.sweep_dir}: ran {len(self.ran)} (resumed {len(self.resumed)}), "
                 f"skipped {len(self.skipped)} finished, evaluated {len(self.evaluated)}, failed {len(self.failed)} "
                 f"in {self.seconds / 60:.1f} min"]
        w = max([12] + [len(b) for b in self.block_seconds])
        for b, s in self.block_seconds.items():
            lines.append(f"  {b:<{w}} {s / 60:6.1f} min")
        for key, err in self.failed:
            lines.append(f"  FAILED {key}: {err}")
        if self.written:
            tables = self.sweep_dir / "tables"
            lines.append(f"tables and figures: {tables}/tables.md, {self.sweep_dir / 'figures'}/")
        return "\n".join(lines)


# ==================================================================================== the log
def _log(sweep_dir: Path, record: dict) -> None:
    append_jsonl(sweep_dir / SWEEP_LOG, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record})


def read_sweep_log(sweep_dir: str | os.PathLike) -> list[dict]:
    """The records of ``sweep.jsonl`` (what ran, was skipped or failed, and when)."""
    return read_jsonl(Path(sweep_dir) / SWEEP_LOG)


# ========================================================================= resuming, mismatches
def config_mismatch(run: PlannedRun) -> list[str]:
    """Fields where the run directory's saved config differs from the planned one ([] when none saved).

    As ``refine`` does, fields that a resumed run may change (device, workers, logging) are ignored;
    ``max_steps`` too while the run is unfinished (resuming extends it exactly), but not once it is
    finished: ``refine`` would return the old result."""
    from ..training.state import RESUMABLE_FIELDS

    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return []
    previous = RunConfig.from_yaml(saved)
    cfg = run.config.resolved()
    finished = (run.run_dir / "summary.json").is_file()
    ignored = set(RESUMABLE_FIELDS) - ({"max_steps"} if finished else set())
    changed = [f.name for f in dataclasses.fields(RunConfig)
               if f.name not in ignored and f.name != "extra" and getattr(previous, f.name) != getattr(cfg, f.name)]
    if "pretrained" not in changed and _embedded_base_changed(run.run_dir, cfg):
        changed.append("pretrained: the embedded base model is a newer version")
    return changed


def _embedded_base_changed(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether a run that started from the embedded base model started from another one than the current.

    The config says only ``pretrained: embedded``; the run's ``base.json`` records the checkpoint file, whose
    name carries the key of world version, world config, architecture and recipe (pretrain.base_checkpoint_path).
    Compared by name, so a moved cache directory does not count as a change."""
    if not is_embedded(cfg.pretrained) or not (run_dir / "base.json").is_file():
        return False
    from ..embedded.pretrain import base_checkpoint_path

    try:
        recorded = json.loads((run_dir / "base.json").read_text(encoding="utf-8")).get("pretrained")
    except (OSError, ValueError):
        return False
    if not recorded:
        return False
    current = base_checkpoint_path(cfg.model, world_preset=cfg.preset, base=embedded_base(cfg.pretrained))
    return Path(recorded).name != current.name


# ================================================================================ preparation
def prepare_data(run: PlannedRun, *, progress: bool = False) -> Path | None:
    """Write the run's derived training set (subset and/or CLIP-score filter) if it is not there yet."""
    ref, path = run.data_ref, run.data_path
    if ref is None or path is None:
        return None
    if path.is_file():
        return path
    preset = preset_name(run.config.preset)
    source = _source_manifest(run, preset, progress=progress)
    if ref.size is not None or ref.where:
        source = _write_subset(run, source)
    if ref.keep_fraction is not None:
        from ..data.filtering import clip_score_filter
        from ..embedded.base import resolve_pretrained
        from ..models.loading import load_model

        cfg = run.config
        arch = cfg.model or PRESETS[preset].model
        model = load_model(arch, resolve_pretrained(arch, cfg.pretrained, world_preset=preset),
                           quick_gelu=cfg.quick_gelu)
        clip_score_filter(source, path, model=model, keep_fraction=ref.keep_fraction, progress=progress,
                          workers=2, batch_size=256)
    return path


def _source_manifest(run: PlannedRun, preset: str, *, progress: bool) -> Path:
    """The manifest a derived set is drawn from: a manifest file, or a split of the embedded world."""
    split = run.data_ref.split
    if split.endswith((".yaml", ".yml")):
        return Path(split)
    from ..embedded.base import ensure_world

    world = ensure_world(preset, progress=progress)
    try:
        return world.manifest(split)
    except KeyError as e:
        raise SweepError(f"block '{run.block}': data split '{split}' is not in the embedded world ({e})") from None


def _write_subset(run: PlannedRun, source: Path) -> Path:
    """The first ``size`` pairs of ``source`` whose scenes pass ``where``: the run's training set, or the
    set its CLIP-score filter starts from."""
    from ..data.manifest import load_manifest, write_manifest

    ref, path = run.data_ref, run.data_path
    manifest = load_manifest(source)
    records = manifest.records()
    if ref.where:
        records = [r for r in records if scene_matches(r.meta, ref.where)]
        if not records:
            raise SweepError(f"block '{run.block}': no pair of {source} passes the filter {dict(ref.where)}")
    if ref.size is not None and ref.size > len(records):
        raise SweepError(f"block '{run.block}': data size {ref.size} is larger than {source} ({len(records)} pairs"
                         f"{' after the where filter' if ref.where else ''})")
    subset = DataRef(ref.split, ref.size, where=ref.where)
    target = path if ref.keep_fraction is None else path.with_name(f"{subset.slug}.yaml")
    if not target.is_file():
        what = f"the first {ref.size} pairs" if ref.size is not None else "the pairs"
        suffix = subset.slug[len(DataRef(ref.split).slug) + 1:]  # e.g. "n5000", "colour-red+green"
        write_manifest(target, name=f"{manifest.name}-{suffix}", kind="captions", root=".",
                       records=[{"id": r.id, "image": r.image, "captions": list(r.captions), **r.meta}
                                for r in records[:ref.size]],
                       source=f"{what} of {source}" + (f" whose scenes pass {dict(ref.where)}" if ref.where else ""),
                       subset_of=str(source))
    return target


def scene_matches(meta: Mapping, where: Sequence[tuple[str, Sequence[str]]]) -> bool:
    """Whether a record's scene metadata passes a ``where`` filter: every object's attribute (shape, colour,
    size, position: its grid cell's canonical name such as "top left") and the scene's background among the
    allowed values. ``meta`` is a record's extra fields (the world's records keep their scene under
    ``meta``) or the scene itself."""
    scene = meta["meta"] if isinstance(meta.get("meta"), Mapping) else meta
    for key, allowed in where:
        if key == "background":
            if scene.get("background") not in allowed:
                return False
        elif not scene.get("objects") or any(_object_attribute(o, key) not in allowed for o in scene["objects"]):
            return False
    return True


def _object_attribute(obj: Mapping, key: str) -> Any:
    if key == "position":
        from ..embedded.vocabulary import CELLS, POSITION_NAMES

        cell = tuple(obj.get("cell") or ())
        return POSITION_NAMES[CELLS.index(cell)] if cell in CELLS else None
    return obj.get(key)


def _base_models(runs: Sequence[PlannedRun]) -> list[tuple[str, str, str | None]]:
    """(architecture, preset, base name or None for the preset's default) of each embedded base the runs use."""
    out = []
    for r in runs:
        preset = preset_name(r.config.preset)
        if is_embedded(r.config.pretrained):
            item = (r.config.model or PRESETS[preset].model, preset, embedded_base(r.config.pretrained))
            if item not in out:
                out.append(item)
    return out


def _prepare_base_models(runs: Sequence[PlannedRun], sweep_dir: Path, report: SweepReport, *, progress: bool) -> None:
    """Pre-train every embedded base model the runs start from that is not cached yet (once; cached after).
    A failure is reported, and the runs of that backbone fail in turn."""
    from ..embedded.base import base_is_built, ensure_base

    for arch, preset, base in _base_models(runs):
        if base_is_built(arch, world_preset=preset, base=base):
            continue
        t0 = time.time()
        try:
            ensure_base(arch, world_preset=preset, base=base, progress=progress)
            _log(sweep_dir, {"event": "pretrained", "model": arch, "seconds": round(time.time() - t0, 1)})
        except Exception as e:
            _log(sweep_dir, {"event": "failed", "run": f"pretrain/{arch}", "error": f"{type(e).__name__}: {e}"})
            report.failed.append((f"pretrain/{arch}", f"{type(e).__name__}: {e}"))
        report.block_seconds[BASE_MODELS] = report.block_seconds.get(BASE_MODELS, 0) + time.time() - t0


def suite_file(run: PlannedRun, sweep_dir: Path, spec_path: Path | None = None) -> Path | None:
    """The suite YAML a run is evaluated with (None = the default suite); an inline suite is written to
    ``<sweep dir>/suites/<hash>.yaml`` (world names stay names: they resolve in the run's preset)."""
    if run.suite is None:
        return None
    if isinstance(run.suite, str):
        return resolve_suite_file(run.suite, spec_path)
    path = sweep_dir / "suites" / f"{stable_hash(run.suite, 12)}.yaml"
    if not path.is_file():
        atomic_write(path, yaml.safe_dump(run.suite, sort_keys=False))
    return path


def _save_spec(spec: SweepSpec, sweep_dir: Path) -> None:
    """``<sweep dir>/spec.yaml``: the spec as run (rewritten only when it changed)."""
    saved = sweep_dir / SPEC_FILE
    previous = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    current = spec_for_saving(spec)
    if previous != current:
        atomic_write(saved, yaml.safe_dump(current, sort_keys=False, allow_unicode=True))


def check_runs_first(runs: Sequence[PlannedRun], sweep_dir: Path, spec: SweepSpec, *, evaluate: bool) -> None:
    """Every unfinished run's options and training manifest, and the evaluation suites, checked before the
    first run (:func:`clip_refine_lab.training.preflight.check_runs`); a derived training set not written
    yet is checked through the set it is drawn from."""
    from ..training.preflight import check_runs

    def checked_config(run: PlannedRun) -> RunConfig:
        if run.data_ref is not None and not (run.data_path is not None and run.data_path.is_file()):
            return dataclasses.replace(run.config, data=run.data_ref.split)
        return run.config

    own = [r for r in runs if r.alias_of is None]
    suites = [(suite_file(r, sweep_dir, spec.path), preset_name(r.config.preset)) for r in own] if evaluate else []
    to_train = [r for r in own if not (r.run_dir / "summary.json").is_file()]  # finished runs are not trained again
    check_runs([(r.key, checked_config(r)) for r in to_train], suites)


# ==================================================================================== running
def run_sweep(spec: SweepSpec | str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
              progress: bool = True, only: Sequence[str] | None = None, max_runs: int | None = None,
              evaluate: bool | None = None, reevaluate: bool = False, outputs: bool = True, png: bool = False,
              run_progress: bool = False) -> SweepReport:
    """Run (or finish) a sweep and write its tables and figures; return a :class:`SweepReport`.

    ``only``: block names to run; ``max_runs``: only the first N runs of the plan (quick checks);
    ``evaluate``: override the spec's ``evaluate``; ``reevaluate``: evaluate finished runs again;
    ``outputs``: write tables and figures afterwards (``png`` also as PNG, needs kaleido + Chromium);
    ``run_progress``: show each run's own progress under the sweep's bar.
    """
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    sweep_dir = sweep_dir.absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = expand(spec, sweep_dir, only=only)
    if max_runs is not None:
        runs = runs[:max_runs]
    do_eval = spec.evaluate if evaluate is None else evaluate
    check_runs_first(runs, sweep_dir, spec, evaluate=do_eval)
    _save_spec(spec, sweep_dir)
    report = SweepReport(sweep_dir)
    t_start = time.time()
    _log(sweep_dir, {"event": "start", "spec": str(spec.path), "preset": preset_name(spec.preset), "runs": len(runs),
                     "only": list(only) if only else None, "max_runs": max_runs})
    if progress and runs:
        minutes = sum(block_minutes(plan_frame(runs, spec.path), preset_name(spec.preset)).values())
        about = f"{minutes:.0f} min" if minutes >= 1 else "a minute or less"
        stage(f"Sweep '{spec.name}': {len(runs)} runs into {sweep_dir}",
              f"{about} on 2 CPU cores, besides base models not cached yet")
    _prepare_base_models(runs, sweep_dir, report, progress=progress)

    state: dict[str, set] = {"evaluated": set(), "failed": set()}
    bar = progress_bar(runs, desc=f"sweep {spec.name}", unit="run", enabled=progress)
    for run in bar:
        bar.set_postfix_str(run.key)
        t0, n_failed = time.time(), len(report.failed)
        _one_run(run, sweep_dir, report, evaluate=do_eval, reevaluate=reevaluate, spec=spec, device=spec.device,
                 progress=run_progress and progress, state=state)
        report.block_seconds[run.block] = report.block_seconds.get(run.block, 0.0) + time.time() - t0
        if progress and len(report.failed) > n_failed:
            bar.write(f"FAILED {run.key}: {report.failed[-1][1]}")
    bar.close()
    report.seconds = time.time() - t_start
    _log(sweep_dir, {"event": "done", "ran": len(report.ran), "resumed": len(report.resumed),
                     "skipped": len(report.skipped), "evaluated": len(report.evaluated),
                     "failed": [k for k, _ in report.failed], "seconds": round(report.seconds, 1)})
    if outputs:
        try:
            report.tables = aggregate(sweep_dir, spec=spec)
            report.figures = figures(report.tables, spec)
            report.written = write_outputs(report.tables, report.figures, sweep_dir, png=png)
        except NoResultsError:
            pass
    return report


def _one_run(run: PlannedRun, sweep_dir: Path, report: SweepReport, *, evaluate: bool, reevaluate: bool,
             spec: SweepSpec, device: str, progress: bool, state: dict) -> None:
    """Run (or resume, or skip) one planned run and evaluate it; an alias does its source run's work.
    A failure is recorded in ``report`` and the log, and the sweep goes on."""
    from ..evaluation.evaluate import evaluate_run
    from ..training.loop import refine

    src = run.source
    shared = {"shared_with": src.key} if run.alias_of is not None else {}
    t0 = time.time()
    try:
        if src.key in state["failed"]:
            raise SweepError(f"shares the configuration of {src.key}, which failed")
        mismatch = config_mismatch(src)
        if mismatch:
            raise SweepError(f"{src.run_dir} holds a run with a different configuration ({', '.join(mismatch)}): "
                             f"the spec or its starting model changed under the same run name; delete the directory "
                             f"to rerun it, or give the entry another 'name:'")
        if (src.run_dir / "summary.json").is_file():
            report.skipped.append(run.key)
            _log(sweep_dir, {"event": "skipped", "run": run.key, **shared})
        else:
            status = "resumed" if (src.run_dir / "checkpoints" / "last.pt").is_file() else "ran"
            prepare_data(src, progress=progress)
            refine(src.config, progress=progress)
            report.ran.append(run.key)
            if status == "resumed":
                report.resumed.append(run.key)
            _log(sweep_dir, {"event": status, "run": run.key, "seconds": round(time.time() - t0, 1), **shared})
        needs_eval = not (src.run_dir / "metrics.json").is_file() or (reevaluate and src.key not in state["evaluated"])
        if evaluate and needs_eval:
            t1 = time.time()
            evaluate_run(src.run_dir, suite=suite_file(src, sweep_dir, spec.path), device=device, progress=False)
            state["evaluated"].add(src.key)
            report.evaluated.append(run.key)
            _log(sweep_dir, {"event": "evaluated", "run": run.key, "seconds": round(time.time() - t1, 1)})
    except KeyboardInterrupt:
        raise
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        state["failed"].add(src.key)
        report.failed.append((run.key, err))
        _log(sweep_dir, {"event": "failed", "run": run.key, "error": err,
                         "traceback": traceback.format_exc(limit=8), "seconds": round(time.time() - t0, 1)})
