"""The one parameter checker of the notebooks in ``notebooks/``.

Every notebook starts with a ``parameters`` cell of plain literals (papermill overrides them with
``-p name value``) and then calls :func:`check_parameters`, which type-checks every parameter and, for
notebooks 01 and 02, builds and validates a :class:`~clip_refine_lab.config.RunConfig` from the run
options among them, so a wrong-typed or out-of-range value stops the notebook in its first cells with
one clear line::

    ParameterError: 02_refine: alpha must be in [0, 1], got 1.5

Papermill passes ``-p runs '["a", "b"]'`` as the *string* ``'["a", "b"]'``: a parameter that takes a
list (or a dict, like ``options``) also takes such a string, read as JSON or YAML flow syntax
(``[a, b]``, ``{max_steps: 5}``), so the syntax the docs give works from the shell.

Folders and files are resolved here too: ``output_dir`` through
:func:`clip_refine_lab.rundir.resolve_output_dir` (``$CLIP_REFINE_LAB_OUTPUT_ROOT``, else the project
root), manifests and specs through :func:`clip_refine_lab.rundir.resolve_path`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from ..config import ConfigError, RunConfig, preset_name
from ..rundir import resolve_output_dir, resolve_path

SWEEP_NOTEBOOK = "08_paper_tables"


class ParameterError(ConfigError):
    """A notebook parameter has the wrong type or value; the message names the notebook and parameter."""


def looks_like_file(value: str) -> bool:
    """Whether a user-given name is a file path (a manifest, suite or checkpoint) rather than a world split or tag."""
    return Path(value).suffix in (".yaml", ".yml", ".safetensors", ".pt", ".pth", ".bin") or os.sep in value


# ---------------------------------------------------------------------------------------- tests
_OPENING = {"list": "[", "dict": "{"}
_EXAMPLES = {"list": """-p runs '["run-a", "run-b"]'""", "dict": """-p options '{"max_steps": 5}'"""}


def parse_text_value(value: Any, kind: str | None) -> Any:
    """``value`` itself, or the list/dict that a string in JSON or YAML flow syntax spells (papermill
    passes ``-p runs '["a", "b"]'`` as text). Raises ValueError naming the problem when it does not parse."""
    if kind is None or not isinstance(value, str):
        return value
    text = value.strip()
    if not text.startswith(_OPENING[kind]):
        return value
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"could not read {value!r} as a {kind} ({first}); write it in JSON, e.g. "
                         f"{_EXAMPLES[kind]}") from None
    if not isinstance(parsed, list if kind == "list" else dict):
        raise ValueError(f"could not read {value!r} as a {kind}")
    return parsed


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and not math.isinf(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_folder(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() != "")


@dataclass(frozen=True)
class Param:
    """A notebook parameter that is not a RunConfig field: a type test, its description, a value test,
    and what the notebook gets instead of the raw value (e.g. a resolved path)."""

    test: Callable[[Any], bool]
    kind: str  # the expected type, in words (for the error message)
    help: str
    check: Callable[[Any], str | None] | None = None  # value check: an error message or None
    convert: Callable[[Any], Any] | None = None
    parse: str | None = None  # "list" or "dict": a string in JSON/YAML syntax is read as one (papermill -p)


def _int_in(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: int) -> str | None:
        if v < lo or (hi is not None and v > hi):
            return f"must be in [{lo}, {hi}], got {v}" if hi is not None else f"must be >= {lo}, got {v}"
        return None
    return check


def _at_least_two(v: list) -> str | None:
    return None if len(v) >= 2 else f"needs at least 2 values, got {len(v)}"


def _existing_file(v: str) -> str | None:
    return None if resolve_path(v).is_file() else f"file not found: {v}"


_OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or None")
_INT = (_is_int, "an integer")
_BOOL = (lambda v: isinstance(v, bool), "True or False")

#: Notebook parameters that are not RunConfig fields.
PARAMS: dict[str, Param] = {
    "runs": Param(lambda v: v is None or isinstance(v, str) or (_is_str_list(v) and len(v) > 0),
                  "None, a run name/path or a non-empty list of them",
                  "runs to show: names under output_dir or run directories; None = the latest finished run "
                  "of the preset (a short one is made, saying so, when there is none)", parse="list"),
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
                     _at_least_two, parse="list"),
    "options": Param(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                     "a dict of RunConfig field: value", "any other RunConfig option, e.g. {'max_steps': 5}",
                     parse="dict"),
    "live_plot": Param(*_BOOL, "True: a live plotly FigureWidget in JupyterLab (static figure elsewhere); "
                               "False: the static figure only"),
    "show_form": Param(*_BOOL, "show the interactive ipywidgets form"),
    "show_widgets": Param(*_BOOL, "show the interactive widgets"),
    "evaluate": Param(*_BOOL, "evaluate the finished run (metrics.json) and print the paper's tables"),
    "figure_dir": Param(*_OPT_STR, "folder to export the notebook's main figure to as PNG "
                                   "(e.g. 'docs'); None = no export"),
    "seed": Param(*_INT, "seed of the random example picks", _int_in(0)),
    "bases": Param(lambda v: v is None or (_is_str_list(v) and len(v) > 0),
                   "None or a non-empty list of base names",
                   "embedded bases to compare (converged, high-temperature, micro); None = the preset's own base "
                   "and the other regime", parse="list"),
}

#: Parameters whose meaning in one notebook differs from PARAMS (notebook 08 runs a sweep).
NOTEBOOK_OVERRIDES: dict[str, dict[str, Param]] = {
    SWEEP_NOTEBOOK: {
        "spec": Param(lambda v: isinstance(v, str) and v.strip() != "", "a spec path",
                      "sweep spec YAML, relative to the repository root (sweeps/quick.yaml, sweeps/paper.yaml)",
                      _existing_file, resolve_path),
        "output_dir": Param(_is_folder, "None or a folder",
                            "sweep directory; None = the spec's output_dir, else runs/sweeps/<name>-<preset>",
                            convert=lambda v: None if v is None else resolve_output_dir(v)),
        "blocks": Param(lambda v: v is None or (_is_str_list(v) and len(v) > 0),
                        "None or a non-empty list of block names", "blocks of the spec to run; None = all",
                        parse="list"),
        "max_runs": Param(lambda v: v is None or _is_int(v), "None or an integer",
                          "only the first N runs of the plan; None = all of them", _int_in(1)),
        "run": Param(*_BOOL, "True: run what has not finished; False: only show the tables of what has"),
        "figure_dir": Param(_is_folder, "None or a folder", "folder to save every figure to as PNG; None = no export"),
    },
}

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
# RunConfig fields that validate() does not type-check (strings): name -> whether None is allowed.
_STR_FIELDS = {"model": True, "pretrained": True, "data": True, "data_root": True, "run_name": True,
               "output_dir": False, "preset": True, "device": False}

#: Each notebook's parameters, in the order of its parameters cell. Names that are RunConfig fields
#: are validated by RunConfig (notebooks 01 and 02 build one), the others by PARAMS / NOTEBOOK_OVERRIDES.
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
    "09_regimes": ("bases", "preset", "dataset", "sample_size", "seed", "figure_dir"),
    SWEEP_NOTEBOOK: ("spec", "output_dir", "blocks", "max_runs", "run", "figure_dir"),
}
# notebooks whose run options make a RunConfig (the others only use output_dir/preset to find runs)
_BUILDS_CONFIG = {"01_setup", "02_refine"}


def _param(notebook: str, name: str) -> Param | None:
    """The Param that checks ``name`` in ``notebook``; None for a RunConfig field (``seed`` is one in 01/02)."""
    override = NOTEBOOK_OVERRIDES.get(notebook, {})
    if name in override:
        return override[name]
    if name in PARAMS and not (name == "seed" and notebook in _BUILDS_CONFIG):
        return PARAMS[name]
    return None


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

    Raises :class:`ParameterError` naming the first bad parameter. Returns the values (paths resolved);
    for notebooks 01 and 02, ``.config`` is the validated :class:`RunConfig` built from the run options
    among them (plus ``options``).
    """
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ParameterError(f"unknown notebook '{notebook}'; known: {', '.join(NOTEBOOK_PARAMETERS)}")
    names = NOTEBOOK_PARAMETERS[notebook]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ParameterError(f"{notebook}: parameter(s) {', '.join(missing)} missing: run the parameters cell first")
    values = Parameters({n: namespace[n] for n in names})

    def fail(msg: str) -> NoReturn:
        raise ParameterError(f"{notebook}: {msg}")

    for name, value in values.items():
        p = _param(notebook, name)
        if p is not None:
            try:
                value = values[name] = parse_text_value(value, p.parse)
            except ValueError as e:
                fail(f"{name}: {e}")
            if not p.test(value):
                fail(f"{name} must be {p.kind}, got {value!r}")
            if p.check is not None and value is not None:
                msg = p.check(value)
                if msg:
                    fail(f"{name} {msg}")
            if p.convert is not None:
                values[name] = p.convert(value)
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
        values.config = _run_config(values, fail)
    return values


def _run_config(values: Parameters, fail: Callable[[str], NoReturn]) -> RunConfig:
    """The validated RunConfig of the run options among ``values`` (plus ``options``), paths resolved."""
    run_values = {n: v for n, v in values.items() if n in _RUN_FIELDS}
    extra = dict(values.get("options") or {})
    clash = sorted(set(extra) & set(run_values))
    if clash:
        fail(f"options repeats {', '.join(clash)}: set it with its own parameter instead")
    try:
        cfg = RunConfig.from_dict({**run_values, **extra}, where="options")
    except (ConfigError, TypeError) as e:  # TypeError: a value of a type the dataclass cannot take
        fail(str(e))
    cfg.output_dir = str(resolve_output_dir(cfg.output_dir))
    for name in ("data", "pretrained", "data_root"):
        v = getattr(cfg, name)
        if isinstance(v, str) and looks_like_file(v):
            setattr(cfg, name, str(resolve_path(v)))
    return cfg


def parameter_help(notebook: str) -> str:
    """One line per parameter of ``notebook`` (for docs and error hints)."""
    from ..config import FIELD_HELP

    override = NOTEBOOK_OVERRIDES.get(notebook, {})
    lines = []
    for n in NOTEBOOK_PARAMETERS[notebook]:
        if n in override:
            text = override[n].help
        elif n in _RUN_FIELDS and (n not in PARAMS or notebook == "02_refine"):
            text = FIELD_HELP[n]
        else:  # e.g. seed in 01: it picks the images shown
            text = PARAMS[n].help
        lines.append(f"{n}: {text}")
    return "\n".join(lines)
