"""Which runs and data sets a notebook shows.

Notebooks 03-07 take the run(s) named by their ``runs``/``run`` parameter, or else the latest finished
run of the current preset (:func:`select_runs`, which only looks). So that each of them also runs on its
own, they call :func:`select_runs_or_quick_run`: when nothing is found it says so in one line and makes
a short run with :func:`quick_run`. Runs without ``metrics.json`` are evaluated by
:func:`ensure_evaluated`, which says so first too.

Where runs are: ``output_dir`` goes through :func:`clip_refine_lab.rundir.resolve_output_dir`
(``$CLIP_REFINE_LAB_OUTPUT_ROOT`` when set, else the project root), so JupyterLab, nbval, papermill and
the command line all read and write the same folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig, preset_name
from ..rundir import find_run, finished_runs, resolve_output_dir, resolve_path, run_config
from .parameters import looks_like_file

QUICK_RUN_MAX_STEPS = 20  # the fallback run of notebooks 03-07 (micro preset: its whole epoch is 6 steps)


# ---------------------------------------------------------------------------------------- runs
def select_runs(runs: str | Sequence[str] | None = None, output_dir: str | os.PathLike = "runs",
                preset: str | None = None) -> list[Path]:
    """The run directories named by ``runs`` (a name, a path or a list of them), else the latest finished
    run of ``preset``; an empty list when ``runs`` is None and nothing has finished. Never trains."""
    if runs is not None:
        names = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
        return [find_run(n, output_dir) for n in names]
    done = finished_runs(output_dir, preset)
    return [done[-1]] if done else []


def quick_run(output_dir: str | os.PathLike = "runs", preset: str | None = None, *, progress: bool = True) -> Path:
    """A short CLIP-Refine run with the preset's defaults (at most QUICK_RUN_MAX_STEPS steps), made once and
    reused: its name is fixed (``quick-<preset>``) and refine returns a finished run as it is. The embedded
    base is pre-trained first when it is not cached (saying so)."""
    from ..embedded.base import ensure_base
    from ..training.loop import refine

    name = preset_name(preset)
    ensure_base(world_preset=name, progress=progress)
    cfg = RunConfig(output_dir=str(resolve_output_dir(output_dir)), preset=name, run_name=f"quick-{name}",
                    max_steps=QUICK_RUN_MAX_STEPS)
    return refine(cfg, progress=progress)


def select_runs_or_quick_run(runs: str | Sequence[str] | None = None, output_dir: str | os.PathLike = "runs",
                             preset: str | None = None, *, progress: bool = True) -> list[Path]:
    """:func:`select_runs`; when it finds nothing, one line saying so, then :func:`quick_run`."""
    found = select_runs(runs, output_dir, preset)
    if found:
        return found
    name = preset_name(preset)
    print(f"No finished run of preset '{name}' under {resolve_output_dir(output_dir)}: making a short one "
          f"(quick-{name}, at most {QUICK_RUN_MAX_STEPS} steps; run notebooks/02_refine.ipynb for a real one).",
          flush=True)
    return [quick_run(output_dir, name, progress=progress)]


def ensure_evaluated(runs: Sequence[Path], *, progress: bool = True) -> list[Path]:
    """``runs``, each with a ``metrics.json``: a run without one is evaluated first (one line says which)."""
    from ..evaluation.evaluate import evaluate_run

    missing = [Path(r) for r in runs if not (Path(r) / "metrics.json").is_file()]
    if missing:
        print(f"Evaluating {len(missing)} run(s) without metrics.json ({', '.join(r.name for r in missing)}): "
              "the starting and the refined model on the run's suite.", flush=True)
    for run in missing:
        evaluate_run(run, progress=progress)
    return [Path(r) for r in runs]


def leakage_summary(runs: Sequence[Path]) -> str:
    """The leakage check of each run's evaluation (metrics.json): evaluation images that are also in the
    post-pre-training set (on COCO, retrieval test images are often in the training captions)."""
    lines = []
    for run in runs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            lines.append(f"{Path(run).name}: not evaluated yet")
            continue
        leakage = json.loads(path.read_text()).get("leakage") or {}
        lines.append(f"{Path(run).name}: {leakage.get('text') or 'no leakage check recorded'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- data sets
def run_metrics(run_dir: Path) -> dict | None:
    """A run's metrics.json, or None before it is evaluated."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_data_root(run_dir: Path) -> str | None:
    """The data root a run was evaluated with (metrics.json), else the one it trained with."""
    metrics = run_metrics(run_dir) or {}
    return metrics["data_root"] if metrics.get("data_root") else run_config(run_dir).data_root


def recorded_datasets(run_dir: Path, section: str) -> list[dict] | None:
    """The data sets of a section as the run's evaluation recorded them ({"name", "manifest"}, in the suite's
    order), or None when metrics.json does not record them (not evaluated yet)."""
    datasets = (run_metrics(run_dir) or {}).get("datasets")
    return None if datasets is None else list(datasets.get(section) or [])


def section_names(run_dir: Path, section: str) -> list[str]:
    """Data set names of a section (zero_shot, retrieval, geometry) of a run's evaluation, else of the
    preset's default suite."""
    recorded = recorded_datasets(run_dir, section)
    if recorded is not None:
        return [d["name"] for d in recorded]
    from ..evaluation.suites import default_suite

    suite_names = [p.stem for p in getattr(default_suite(run_config(run_dir).preset), section)]
    metrics = run_metrics(run_dir)
    if metrics:
        names = list(next(iter(metrics["models"].values())).get(section, {}))
        if names:  # the embedded world's tasks in the suite's order (metrics.json sorts them), others after
            order = {n: i for i, n in enumerate(suite_names)}
            return sorted(names, key=lambda n: (order.get(n, len(order)), n))
    return suite_names


def dataset_for(run_dir: Path, name: str | None, section: str | Sequence[str], parameter: str = "dataset"):
    """The data set a notebook looks at, as a Manifest loaded with the run's data root: ``name`` (a manifest
    path, a data set of the run's evaluation, or a split/task of the embedded world) or, when None, the
    first data set of ``section`` (or of the first of several sections that has one) the run was evaluated
    on. Errors name the notebook ``parameter`` to set."""
    from ..data.manifest import load_manifest

    sections = (section,) if isinstance(section, str) else tuple(section)
    if name is None:
        name = next((names[0] for names in (section_names(run_dir, s) for s in sections) if names), None)
        if name is None:
            raise ValueError(f"the run {Path(run_dir).name} has no {' or '.join(sections)} data set; pass one as "
                             f"the {parameter} parameter")
    return load_manifest(_manifest_path(run_dir, str(name), parameter), data_root=run_data_root(run_dir))


def _manifest_path(run_dir: Path, name: str, parameter: str) -> Path:
    """A manifest file from a path, a data set name of the run's evaluation, or a split of the embedded world."""
    from ..evaluation.suites import resolve_manifest

    if looks_like_file(name):
        path = resolve_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {name}")
        return path
    for section in ("zero_shot", "retrieval", "geometry"):
        for d in recorded_datasets(run_dir, section) or []:
            if d["name"] == name:
                return Path(d["manifest"])
    try:
        return resolve_manifest(name, run_config(run_dir).preset)
    except (KeyError, ConfigError) as e:
        raise ValueError(f"{e}; pass a manifest file (a .yaml path) as the {parameter} parameter") from None


def zero_shot_manifests(run_dir: Path) -> list:
    """The classification manifests a run was evaluated on (names that cannot be found are skipped, noted)."""
    out = []
    for name in section_names(run_dir, "zero_shot"):
        try:
            out.append(dataset_for(run_dir, name, "zero_shot"))
        except (ValueError, FileNotFoundError):
            print(f"skipping '{name}': not in the embedded world (pass its manifest as the dataset parameter)")
    return out


def gallery_manifests(run_dir: Path, dataset: str | None = None) -> list:
    """The classification sets of notebook 07: ``dataset``, else every zero-shot set of the run's evaluation
    (one line says which)."""
    if dataset is not None:
        return [dataset_for(run_dir, dataset, "zero_shot")]
    manifests = zero_shot_manifests(run_dir)
    if not manifests:
        raise ValueError(f"the run {Path(run_dir).name} has no zero-shot set to look at; pass a classification "
                         "manifest as the dataset parameter")
    print(f"Zero-shot sets of the run's evaluation: {', '.join(m.name for m in manifests)} "
          "(the dataset parameter picks one)")
    return manifests
