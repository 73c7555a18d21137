"""Helpers the notebooks in ``notebooks/`` share: parameter checking, run selection, example picking.

Every notebook starts with a ``parameters`` cell of plain literals (papermill overrides them with
``-p name value``) and then calls :func:`check_parameters`, which type-checks every parameter and
builds/validates a :class:`~clip_refine_lab.config.RunConfig` from the run options among them, so a
wrong-typed or out-of-range value stops the notebook in its first cells with one clear line::

    ParameterError: 02_refine: alpha must be in [0, 1], got 1.5

Where runs go: ``output_dir`` (default ``"runs"``) is resolved against the *project root* (the
folder holding ``pyproject.toml`` and ``clip_refine_lab/``, found from the working directory
upwards; the working directory itself when there is none). JupyterLab and nbval start kernels in
``notebooks/`` and papermill in the caller's folder: all of them read and write ``<repo>/runs``, the
folder the command line (``clip-refine-lab refine``, run from the repository root) uses too.

Notebooks 03-07 take the run(s) named by their ``runs``/``run`` parameter, or else the latest
finished run of the current preset (:func:`select_runs`); when there is none they make a short one
(:func:`quick_run`), so each notebook also runs on its own.

Outputs: committed notebooks keep outputs only in cells marked ``# NBVAL_CHECK_OUTPUT`` (what
nbval compares). ``python -m clip_refine_lab.notebook strip notebooks/*.ipynb`` removes the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..config import ConfigError, RunConfig, preset_name
from ..rundir import find_run, finished_runs, resolve_output_dir, resolve_path, run_config

CHECK_OUTPUT_MARK = "# NBVAL_CHECK_OUTPUT"
QUICK_RUN_MAX_STEPS = 20  # the fallback run of notebooks 03-07 (micro preset: its whole epoch is 6 steps)


class ParameterError(ConfigError):
    """A notebook parameter has the wrong type or value; the message names the notebook and parameter."""


# ---------------------------------------------------------------------------------- parameters
def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and not math.isinf(v)


@dataclass(frozen=True)
class Param:
    """A notebook parameter that is not a RunConfig field: a type test, its description, a value test."""

    test: Callable[[Any], bool]
    kind: str  # the expected type, in words (for the error message)
    help: str
    check: Callable[[Any], str | None] | None = None  # value check: an error message or None


def _int_in(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: int) -> str | None:
        if v < lo or (hi is not None and v > hi):
            return f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}"
        return None
    return check


_OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or None")
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_BOOL = (lambda v: isinstance(v, bool), "True or False")


def _lambdas_check(v: list) -> str | None:
    return None if len(v) >= 2 else f"needs at least 2 values, got {len(v)}"


#: Notebook parameters that are not RunConfig fields.
PARAMS: dict[str, Param] = {
    "runs": Param(lambda v: v is None or isinstance(v, str) or (_is_str_list(v) and len(v) > 0),
                  "None, a run name/path or a non-empty list of them",
                  "runs to show: names under output_dir or run directories; None = the latest finished run "
                  "of the preset (a short one is made when there is none)"),
    "run": Param(*_OPT_STR, "run to show: a name under output_dir or a run directory; None = the latest finished run"),
    "suite": Param(*_OPT_STR, "suite YAML for the headline metrics (zero_shot/retrieval/geometry lists); "
                              "None = the embedded world's suite (or the data manifest for a real model)"),
    "dataset": Param(*_OPT_STR, "manifest path or embedded-world split name to look at; None = the notebook's default"),
    "class_task": Param(*_OPT_STR, "classification manifest or world task for the zero-shot part of the "
                                   "gap-shift curve; None = the first zero-shot task of the run's suite"),
    "n_images": Param(*_INT, "how many images the grid shows", _int_in(1, 64)),
    "n_queries": Param(*_INT, "how many retrieval queries to show", _int_in(1, 20)),
    "n_examples": Param(*_INT, "how many examples each gallery shows", _int_in(1, 64)),
    "top_k": Param(*_INT, "results shown per query", _int_in(1, 20)),
    "sample_size": Param(*_INT, "images projected per model (all class prompts are added as texts)", _int_in(10, 20000)),
    "n_neighbors": Param(*_INT, "UMAP n_neighbors", _int_in(2, 200)),
    "lambdas": Param(lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) for x in v),
                     "a list of numbers", "shifts along the gap direction (0 = none; about ||gap|| closes it)",
                     _lambdas_check),
    "options": Param(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                     "a dict of RunConfig field: value", "any other RunConfig option, e.g. {'max_steps': 5}"),
    "live_plot": Param(*_BOOL, "True: a live plotly FigureWidget in JupyterLab (static figure elsewhere); "
                               "False: the static figure only"),
    "show_form": Param(*_BOOL, "show the interactive ipywidgets form"),
    "show_widgets": Param(*_BOOL, "show the interactive widgets"),
    "evaluate": Param(*_BOOL, "evaluate the finished run (metrics.json) and print the paper's tables"),
    "figure_dir": Param(*_OPT_STR, "folder to export the notebook's main figure to as PNG "
                                   "(e.g. 'docs'); None = no export"),
    "seed": Param(*_INT, "seed of the random example picks", _int_in(0)),
}

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
# RunConfig fields that validate() does not type-check (strings); checked here.
_STR_FIELDS = {"model": True, "pretrained": True, "data": True, "data_root": True, "run_name": True,
               "output_dir": False, "preset": True, "device": False}

#: Each notebook's parameters, in the order of its parameters cell. Names that are RunConfig
#: fields are validated by RunConfig (notebooks 01 and 02 build one), the others by PARAMS.
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01_setup": ("model", "pretrained", "data", "preset", "device", "suite", "n_images", "seed", "figure_dir"),
    "02_refine": ("method", "alpha", "prior", "lr", "batch_size", "epochs", "max_steps", "temperature",
                  "feature_space", "seed", "model", "pretrained", "data", "preset", "device", "output_dir",
                  "run_name", "options", "live_plot", "show_form", "evaluate", "figure_dir"),
    "03_zero_shot": ("runs", "output_dir", "preset", "show_widgets", "figure_dir"),
    "04_retrieval": ("runs", "output_dir", "preset", "dataset", "n_queries", "top_k", "seed", "figure_dir"),
    "05_geometry": ("runs", "output_dir", "preset", "dataset", "class_task", "lambdas", "figure_dir"),
    "06_projections": ("run", "output_dir", "preset", "dataset", "sample_size", "n_neighbors", "seed",
                       "show_widgets", "figure_dir"),
    "07_failure_gallery": ("run", "output_dir", "preset", "dataset", "n_examples", "seed", "figure_dir"),
}
# notebooks whose run options make a RunConfig (the others only use output_dir/preset to find runs)
_BUILDS_CONFIG = {"01_setup", "02_refine"}


class Parameters(dict):
    """The checked parameters (a dict with attribute access) and, for 01/02, the RunConfig as ``.config``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    config: RunConfig | None = None


def check_parameters(namespace: dict, notebook: str) -> Parameters:
    """Check the parameters of ``notebook`` (e.g. ``"02_refine"``) found in ``namespace`` (``globals()``).

    Raises :class:`ParameterError` naming the first bad parameter. Returns the values; for notebooks
    01 and 02, ``.config`` is the validated :class:`RunConfig` built from the run options among them
    (plus ``options``).
    """
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ParameterError(f"unknown notebook '{notebook}'; known: {', '.join(NOTEBOOK_PARAMETERS)}")
    names = NOTEBOOK_PARAMETERS[notebook]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ParameterError(f"{notebook}: parameter(s) {', '.join(missing)} missing: run the parameters cell first")
    values = Parameters({n: namespace[n] for n in names})

    def fail(msg: str) -> None:
        raise ParameterError(f"{notebook}: {msg}")

    for name, value in values.items():
        if name in PARAMS and not (name == "seed" and notebook in _BUILDS_CONFIG):
            p = PARAMS[name]
            if not p.test(value):
                fail(f"{name} must be {p.kind}, got {value!r}")
            if p.check is not None and value is not None:
                msg = p.check(value)
                if msg:
                    fail(f"{name} {msg}")
        elif name in _STR_FIELDS:
            optional = _STR_FIELDS[name]
            if not (isinstance(value, str) or (optional and value is None)):
                fail(f"{name} must be a string{' or None' if optional else ''}, got {value!r}")
            if isinstance(value, str) and not value.strip():
                fail(f"{name} must not be empty")
    if values.get("preset") is not None:
        try:
            preset_name(values["preset"])
        except ValueError as e:
            fail(str(e))
    if notebook in _BUILDS_CONFIG:
        run_values = {n: v for n, v in values.items() if n in _RUN_FIELDS}
        extra = dict(values.get("options") or {})
        clash = sorted(set(extra) & set(run_values))
        if clash:
            fail(f"options repeats {', '.join(clash)}: set it with its own parameter instead")
        try:
            cfg = RunConfig.from_dict({**run_values, **extra}, where="options")
        except ConfigError as e:
            fail(str(e))
        except TypeError as e:  # e.g. a value of a type the dataclass cannot take
            fail(str(e))
        cfg.output_dir = str(resolve_output_dir(cfg.output_dir))
        for name in ("data", "pretrained", "data_root"):
            v = getattr(cfg, name)
            if isinstance(v, str) and _looks_like_file(v):
                setattr(cfg, name, str(resolve_path(v)))
        values.config = cfg
    return values


def parameter_help(notebook: str) -> str:
    """One line per parameter of ``notebook`` (for docs and error hints)."""
    from ..config import FIELD_HELP

    lines = []
    for n in NOTEBOOK_PARAMETERS[notebook]:
        use_field = n in _RUN_FIELDS and (n not in PARAMS or notebook == "02_refine")
        lines.append(f"{n}: {FIELD_HELP[n] if use_field else PARAMS[n].help}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- where things are
def quick_run(output_dir: str | os.PathLike = "runs", preset: str | None = None, *, progress: bool = True) -> Path:
    """A short CLIP-Refine run with the preset's defaults (at most QUICK_RUN_MAX_STEPS steps), made once
    and reused: its name is fixed (``quick-<preset>``) and refine returns a finished run as it is."""
    from ..training.loop import refine

    name = preset_name(preset)
    cfg = RunConfig(output_dir=str(resolve_output_dir(output_dir)), preset=name, run_name=f"quick-{name}",
                    max_steps=QUICK_RUN_MAX_STEPS)
    return refine(cfg, progress=progress)


def select_runs(runs: str | Sequence[str] | None = None, output_dir: str | os.PathLike = "runs",
                preset: str | None = None, *, make: bool = True, progress: bool = True) -> list[Path]:
    """The run directories a notebook shows: those named by ``runs`` (a name or a list), else the latest
    finished run of ``preset``; with none and ``make``, a short run made by :func:`quick_run`."""
    if runs is not None:
        names = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
        return [find_run(n, output_dir) for n in names]
    done = finished_runs(output_dir, preset)
    if done:
        return [done[-1]]
    if not make:
        raise FileNotFoundError(f"no finished run of preset '{preset_name(preset)}' under "
                                f"{resolve_output_dir(output_dir)}; run notebooks/02_refine.ipynb first")
    print(f"No finished run of preset '{preset_name(preset)}' under {resolve_output_dir(output_dir)}: "
          f"making a short one (quick-{preset_name(preset)}).")
    return [quick_run(output_dir, preset, progress=progress)]


def run_label(run_dir: Path) -> str:
    """The row label of a run in the tables (its run name, as :func:`evaluate.compare` uses)."""
    return Path(run_dir).name


# ------------------------------------------------------------------------------------- environment
def setup() -> None:
    """Notebook-wide settings: torch threads no more than the cores; quiet sklearn's FutureWarnings."""
    import warnings

    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")


def widgets_render() -> bool:
    """Whether a Jupyter front end (JupyterLab, Notebook, VS Code) shows this kernel's widgets live.

    Kernels started by a Jupyter server get ``JPY_SESSION_NAME``; papermill and nbval start theirs
    directly and do not, and there widgets do not render (so figures are shown statically).
    """
    return bool(os.environ.get("JPY_SESSION_NAME"))


def export(fig, figure_dir: str | os.PathLike | None, name: str, **kwargs) -> Path | None:
    """Save ``fig`` as ``<figure_dir>/<name>.png`` (figure_dir relative to the project root); no-op for None."""
    if figure_dir is None:
        return None
    from ..plots import save_png

    path = resolve_output_dir(figure_dir) / f"{name}.png"
    save_png(fig, path, **kwargs)
    print(f"saved {path}")
    return path


# ----------------------------------------------------------------------------------- data helpers
def pick(n_total: int, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct indices of ``range(n_total)`` drawn with ``seed``, sorted (all when n >= n_total)."""
    import numpy as np

    if n >= n_total:
        return list(range(n_total))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_total, n, replace=False))


def caption_samples(manifest: str | os.PathLike, n: int = 12, seed: int = 0, data_root: str | None = None) -> list[dict]:
    """``n`` records of a manifest as grid items: {"image": path, "caption": first caption or class name}."""
    from ..data.manifest import CaptionRecord, load_manifest

    m = load_manifest(manifest, data_root=data_root)
    records = m.records()
    items = []
    for i in pick(len(records), n, seed):
        r = records[i]
        if isinstance(r, CaptionRecord):
            extra = f" (+{len(r.captions) - 1} more)" if len(r.captions) > 1 else ""
            items.append({"image": r.image, "caption": r.captions[0] + extra, "id": r.id})
        else:
            items.append({"image": r.image, "caption": (m.classnames or [str(r.label)])[r.label], "id": r.id})
    return items


def headline_suite(cfg: RunConfig, suite: str | None = None):
    """The suite notebook 01 measures the starting model on: ``suite`` when given; the embedded world's
    default suite for the embedded model; else retrieval and geometry on the data manifest."""
    from ..evaluation.evaluate import Suite, default_suite, load_suite
    from ..training.loop import resolve_data

    if suite is not None:
        path = resolve_path(suite)
        if not path.is_file():
            raise FileNotFoundError(f"suite file not found: {suite}")
        return load_suite(path, cfg.preset)
    if cfg.pretrained == "embedded":
        return default_suite(cfg.preset)
    data = resolve_data(cfg)
    return Suite([], [data], [data])


def embedded_world(cfg: RunConfig):
    """The embedded world of ``cfg``'s preset (built on first use) when the run uses it (the embedded
    model or a world split as data); None for a real model on a real data set."""
    from ..config import PRESETS
    from ..embedded.world import WorldConfig, build_world

    uses_world = cfg.pretrained == "embedded" or not _looks_like_file(str(cfg.data or "synthetic-coco"))
    if not uses_world:
        return None
    return build_world(WorldConfig.preset(PRESETS[preset_name(cfg.preset)].world))


def task_table(world) -> str:
    """The zero-shot tasks of the embedded world: name, number of classes, the first class names; a compositional
    probe (not in the zero-shot average) is marked "(probe)"."""
    from ..embedded.world import TASKS, split_specs

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
    """The pre-training summary of the embedded base model (None for other models)."""
    if cfg.pretrained != "embedded":
        return None
    from ..embedded.pretrain import format_summary, pretrain_base

    path = pretrain_base(cfg.model, world_preset=cfg.preset, progress=False).with_suffix(".json")
    return format_summary(json.loads(path.read_text())) if path.is_file() else None


def with_chance(table, manifests: Iterable, data_root: str | None = None):
    """A Table-1 frame with a 'chance' row appended (columns it lacks stay NaN)."""
    import pandas as pd

    if table.empty:
        return table
    row = chance_row(manifests, data_root)
    return pd.concat([table, pd.DataFrame([row], index=["chance"])])[list(table.columns)]


def predictions(fs) -> "Any":
    """Top-1 zero-shot predictions (N,) of a classification FeatureSet."""
    from ..metrics import class_embeddings, zero_shot_logits

    return zero_shot_logits(fs.image, class_embeddings(fs.text)).argmax(dim=1)


def flips(base_pred, refined_pred, labels) -> tuple[list[int], list[int]]:
    """Indices the refinement fixed (base wrong, refined right) and broke (base right, refined wrong)."""
    import torch

    base_pred, refined_pred, labels = (torch.as_tensor(x).long() for x in (base_pred, refined_pred, labels))
    if not (base_pred.shape == refined_pred.shape == labels.shape):
        raise ValueError(f"shapes differ: {tuple(base_pred.shape)}, {tuple(refined_pred.shape)}, {tuple(labels.shape)}")
    fixed = ((base_pred != labels) & (refined_pred == labels)).nonzero().flatten().tolist()
    broken = ((base_pred == labels) & (refined_pred != labels)).nonzero().flatten().tolist()
    return fixed, broken


def failure_cases(base, refined, manifests: Iterable, *, n: int = 8, seed: int = 0, data_root: str | None = None,
                  progress: bool = False) -> dict:
    """Zero-shot cases the refined model fixed and broke over classification ``manifests``.

    Returns {"fixed": [...], "broken": [...], "counts": [per-task dict]}, each case a dict
    (task, image, true, base_pred, refined_pred); ``n`` cases of each kind, drawn with ``seed``
    across all tasks.
    """
    import numpy as np

    from ..data.manifest import load_manifest
    from ..features import dataset_features

    cases: dict[str, list] = {"fixed": [], "broken": []}
    counts = []
    for mpath in manifests:
        m = load_manifest(mpath, data_root=data_root)
        if m.kind != "classification":
            raise ValueError(f"{m.path} is a {m.kind} manifest; the failure gallery needs classification sets")
        fb = dataset_features(base, m, data_root=data_root, progress=progress)
        fr = dataset_features(refined, m, data_root=data_root, progress=progress)
        pb, pr = predictions(fb), predictions(fr)
        fixed, broken = flips(pb, pr, fb.labels)
        counts.append({"task": m.name, "images": int(fb.labels.shape[0]), "fixed": len(fixed), "broken": len(broken),
                       "net": len(fixed) - len(broken)})
        if not fixed and not broken:
            continue
        records = m.records()
        names = m.classnames or []
        for kind, idx in (("fixed", fixed), ("broken", broken)):
            for i in idx:
                y = int(fb.labels[i])
                cases[kind].append({"task": m.name, "image": records[i].image, "true": names[y],
                                    "base_pred": names[int(pb[i])], "refined_pred": names[int(pr[i])]})
    rng = np.random.default_rng(seed)
    for kind in cases:
        if len(cases[kind]) > n:
            keep = sorted(rng.choice(len(cases[kind]), n, replace=False))
            cases[kind] = [cases[kind][i] for i in keep]
    return {**cases, "counts": counts}


def text_to_image_topk(fs, queries: Sequence[int], k: int = 5):
    """(len(queries), k) indices of the top-k images for caption ``queries`` of a caption FeatureSet."""
    import torch

    from ..metrics import normalize

    q = normalize(fs.text[torch.as_tensor(list(queries), dtype=torch.long)].float())
    sims = q @ normalize(fs.image.float()).T
    return sims.topk(min(k, sims.shape[1]), dim=1).indices


def image_to_text_topk(fs, queries: Sequence[int], k: int = 5):
    """(len(queries), k) indices of the top-k captions for image ``queries`` of a caption FeatureSet."""
    import torch

    from ..metrics import normalize

    q = normalize(fs.image[torch.as_tensor(list(queries), dtype=torch.long)].float())
    sims = q @ normalize(fs.text.float()).T
    return sims.topk(min(k, sims.shape[1]), dim=1).indices


def retrieval_examples(models: dict, manifest, *, n_queries: int = 3, k: int = 5, seed: int = 0,
                       data_root: str | None = None, progress: bool = False) -> dict:
    """Top-k retrieval results of a few random queries under each model ({label: LoadedModel}).

    Returns {"t2i": [...], "i2t": [...]}: each text query {"query", "target", "results": {label:
    [{"image", "hit"}]}}, each image query {"image", "results": {label: [{"caption", "hit"}]}}.
    """
    from ..data.manifest import flatten_captions, load_manifest
    from ..features import dataset_features

    m = load_manifest(manifest, data_root=data_root)
    if m.kind != "captions":
        raise ValueError(f"{m.path} is a {m.kind} manifest; retrieval examples need captions")
    records = m.records()
    texts, owner = flatten_captions(records)  # type: ignore[arg-type]
    feats = {label: dataset_features(lm, m, data_root=data_root, progress=progress) for label, lm in models.items()}
    tq = pick(len(texts), n_queries, seed)
    iq = pick(len(records), n_queries, seed + 1)
    t2i = [{"query": texts[q], "target": records[int(owner[q])].image, "results": {}} for q in tq]
    i2t = [{"image": records[q].image, "captions": list(records[q].captions), "results": {}} for q in iq]
    for label, fs in feats.items():
        for item, q, row in zip(t2i, tq, text_to_image_topk(fs, tq, k).tolist()):
            item["results"][label] = [{"image": records[j].image, "hit": j == int(owner[q])} for j in row]
        for item, q, row in zip(i2t, iq, image_to_text_topk(fs, iq, k).tolist()):
            item["results"][label] = [{"caption": texts[j], "hit": int(owner[j]) == q} for j in row]
    return {"t2i": t2i, "i2t": i2t}


def _looks_like_file(value: str) -> bool:
    return Path(value).suffix in (".yaml", ".yml", ".safetensors", ".pt", ".pth", ".bin") or os.sep in value


def section_names(run_dir: Path, section: str) -> list[str]:
    """Data set names of a section (zero_shot, retrieval, geometry) of a run's metrics.json, else of the
    preset's default suite."""
    from ..evaluation.evaluate import default_suite

    suite_names = [p.stem for p in getattr(default_suite(run_config(run_dir).preset), section)]
    path = Path(run_dir) / "metrics.json"
    if path.is_file():
        models = json.loads(path.read_text())["models"]
        names = list(next(iter(models.values())).get(section, {}))
        if names:  # the embedded world's tasks in the suite's order (metrics.json sorts them), others after
            order = {n: i for i, n in enumerate(suite_names)}
            return sorted(names, key=lambda n: (order.get(n, len(order)), n))
    return suite_names


def dataset_for(run_dir: Path, name: str | None, section: str) -> Path:
    """The manifest a notebook looks at: ``name`` (a manifest path or a split/task of the embedded world)
    or, when None, the first data set of ``section`` the run was evaluated on."""
    from ..evaluation.evaluate import resolve_manifest

    preset = run_config(run_dir).preset
    if name is None:
        names = section_names(run_dir, section)
        if not names:
            raise ValueError(f"the run {Path(run_dir).name} has no {section} data set; pass one as the dataset parameter")
        name = names[0]
    if _looks_like_file(str(name)):
        path = resolve_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {name}")
        return path
    try:
        return resolve_manifest(name, preset)
    except KeyError:
        raise ValueError(f"'{name}' is not a split of the embedded world; pass its manifest file (a .yaml path) "
                         "as the dataset parameter") from None


def zero_shot_manifests(run_dir: Path) -> list[Path]:
    """The classification manifests a run was evaluated on (world names resolved; others skipped, noted)."""
    out = []
    for name in section_names(run_dir, "zero_shot"):
        try:
            out.append(dataset_for(run_dir, name, "zero_shot"))
        except (ValueError, FileNotFoundError):
            print(f"skipping '{name}': not in the embedded world (pass its manifest as the dataset parameter)")
    return out


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


def i2t_html(examples: Sequence[Mapping], thumb: int = 96):
    """Image queries of :func:`retrieval_examples` as one HTML table: the query image, then each
    model's top captions (a correct caption in green with ✓)."""
    import html

    from IPython.display import HTML

    from ..plots import HIT_COLOUR, thumbnail_uri

    if not examples:
        return HTML("<i>(no image queries)</i>")
    labels = list(examples[0]["results"])
    head = "".join(f"<th style='text-align:left'>{html.escape(lab)}</th>" for lab in labels)
    rows = []
    for ex in examples:
        cells = [f"<td><img src='{thumbnail_uri(ex['image'], thumb)}' width='{thumb}' height='{thumb}'></td>"]
        for lab in labels:
            items = "".join(
                f"<li style='color:{HIT_COLOUR if r['hit'] else 'inherit'}'>{'✓ ' if r['hit'] else ''}"
                f"{html.escape(r['caption'])}</li>" for r in ex["results"][lab])
            cells.append(f"<td style='text-align:left;vertical-align:top'><ol style='margin:0'>{items}</ol></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return HTML(f"<table class='crl-i2t'><tr><th>image query</th>{head}</tr>{''.join(rows)}</table>")


def leakage_summary(runs: Sequence[Path]) -> str:
    """The leakage check of each run's evaluation (metrics.json, written by ``evaluate_run``/``compare``):
    evaluation images that are also in the post-pre-training set (REFERENCE.md: the COCO pitfall)."""
    lines = []
    for run in runs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            lines.append(f"{Path(run).name}: not evaluated yet")
            continue
        leakage = json.loads(path.read_text()).get("leakage") or {}
        lines.append(f"{Path(run).name}: {leakage.get('text') or 'no leakage check recorded'}")
    return "\n".join(lines)


def styled(df, fmt: str = "{:.2f}"):
    """A DataFrame formatted for display (numbers with ``fmt``, MultiIndex columns kept)."""
    return df.style.format(fmt)


# ------------------------------------------------------------------------------ notebook cleaning
def strip_outputs(nb: dict) -> dict:
    """Clear outputs and execution counts except in ``# NBVAL_CHECK_OUTPUT`` cells; drop run metadata and
    widget state. Checked cells keep their outputs and an execution count (nbval refuses a cell that
    has outputs but no count: "Unrun reference cell has outputs")."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", ""))
        if CHECK_OUTPUT_MARK in source and cell.get("outputs"):
            cell["execution_count"] = cell.get("execution_count") or 1
            for out in cell["outputs"]:
                if "execution_count" in out:
                    out["execution_count"] = cell["execution_count"]
        else:
            cell["outputs"] = []
            cell["execution_count"] = None
        md = cell.get("metadata", {})
        for key in ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime"):
            md.pop(key, None)
    meta = nb.get("metadata", {})
    for key in ("widgets", "papermill"):
        meta.pop(key, None)
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_refine_lab.notebook",
                                     description="Notebook maintenance: strip outputs before committing.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strip", help="clear outputs except in '# NBVAL_CHECK_OUTPUT' cells (in place)")
    s.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    for p in args.paths:
        nb = json.loads(Path(p).read_text(encoding="utf-8"))
        text = json.dumps(strip_outputs(nb), indent=1, ensure_ascii=False) + "\n"
        Path(p).write_text(text, encoding="utf-8")
        print(f"stripped {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
