"""Sweeps: grids of post-pre-training runs, their evaluation, and the paper's tables as mean ± std.

A *sweep spec* (YAML, format in ``sweeps/README.md``) names a preset, the RunConfig fields shared by
every run (``base:``), the seeds, and named ``blocks``; each block expands a ``grid:`` (field -> list
of values, cartesian) and/or an explicit ``runs:`` list into runs, and says which table it feeds
(``table:``: main, prior, alpha, batch, epochs, weights, data, backbone, or none)::

    preset: default
    seeds: [0, 1, 2]
    base: {teacher_cache: true, image_cache: true}
    blocks:
      main:
        table: main
        grid: {method: [contrastive, m2-mix, self-kd, hycd, hycd+l2, clip-refine]}
      alpha:
        table: alpha
        base: {max_steps: 20}
        grid: {alpha: [0.0, 0.25, 0.5, 0.75, 1.0]}

Run directories are ``<sweep dir>/runs/<block>/<name>-s<seed>``, the name made from the block's
varied values (``clip-refine``, ``alpha0.25``, ``contrastive-bs1024-acc4``), so a second invocation
finds its runs again: finished ones are skipped (``refine`` is not even called), interrupted ones are
resumed from their last checkpoint by :func:`~clip_refine_lab.train.refine`, and a run directory that
holds a *different* configuration (the spec changed under the same name) is reported as a failure
rather than silently reused. Every finished run is evaluated once (``metrics.json``) with the
evaluation suite (the spec's or the block's ``suite:``: a suite YAML or an inline mapping; default: the
embedded world's). Runs with the same configuration and suite in several blocks (the default point of
every sweep) are run once and shared. A failed run is logged in ``sweep.jsonl`` and the sweep goes on;
the summary lists the failures.

Derived data sets (Table 5 analogue) are written into ``<sweep dir>/data/`` on first use: a ``data``
value may be a mapping ``{split: synthetic-web, size: 5000}`` (the first ``size`` pairs: the world's
pairs are drawn independently, so a prefix is a random sample, and the sizes nest) and/or
``keep_fraction: 0.3`` (the pairs with the highest CLIP score under the run's starting model,
:func:`~clip_refine_lab.filtering.clip_score_filter`) and/or ``where: {colour: [red, green]}`` (only the
scenes whose every object has one of the listed values of a scene attribute, read from the records'
scene metadata: ``shape``, ``colour``, ``size``, ``position`` (a grid cell's class name, "top left") per
object, ``background`` per scene; names are checked against the world's vocabulary; a narrower
post-pre-training set, as COCO is narrower than the paper's zero-shot sets).

:func:`aggregate` reads every evaluated run of a sweep directory and returns the paper-layout tables
as "mean ± std" frames (sample std, ddof = 1, over the seeds; a single value is shown without ±),
with the numeric means, stds and counts beside them; :func:`figures` draws the alpha, batch-size and
epoch sweeps and the loss-weight heatmap (plotly); :func:`write_outputs` writes both (CSV, Markdown,
HTML, optionally PNG) into ``<sweep dir>/tables`` and ``<sweep dir>/figures``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..config import PRESETS, ConfigError, RunConfig, preset_name
from ..metrics import zero_shot_average
from ..utils import atomic_write, atomic_write_json

PRETRAINED = "pre-trained"
TABLE_KINDS = ("main", "prior", "alpha", "batch", "epochs", "weights", "data", "backbone", "none")
SPEC_KEYS = ("name", "description", "preset", "output_dir", "seeds", "base", "blocks", "evaluate", "suite", "device")
BLOCK_KEYS = ("table", "description", "base", "seeds", "grid", "runs", "suite", "x", "series")
ENTRY_KEYS = ("label", "name")  # keys of a run entry that are not RunConfig fields
MANAGED_FIELDS = {"seed": "use 'seeds:'", "output_dir": "the sweep sets it (<sweep dir>/runs/<block>)",
                  "run_name": "the sweep names runs from their varied values", "preset": "use the spec's 'preset:'"}
DATA_REF_KEYS = ("split", "size", "keep_fraction", "where", "name")
WHERE_KEYS = ("shape", "colour", "size", "position", "background")  # scene attributes a 'where' filter may restrict


def where_vocabulary() -> dict[str, tuple[str, ...]]:
    """The names each ``where`` key accepts: the world's canonical class names (position: "top left", ...)."""
    from ..embedded.world import BACKGROUNDS, COLOUR_NAMES, POSITION_NAMES, SHAPES, SIZES

    return {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITION_NAMES,
            "background": BACKGROUNDS}


#: The paper's row order of Table 1-3.
METHOD_ORDER = (PRETRAINED, "contrastive", "m2-mix", "self-kd", "hycd", "hycd+l2", "clip-refine")
#: Short names of varied fields in run names (others use the field name).
ABBREV = {"alpha": "alpha", "batch_size": "bs", "accum_steps": "acc", "epochs": "ep", "max_steps": "steps",
          "rafa_weight": "rafa", "hycd_weight": "hycd", "align_weight": "align", "m2_weight": "m2w",
          "prior_sigma": "sigma", "prior_mean": "mu", "prior_low": "low", "prior_high": "high",
          "temperature": "T", "learning_rate": "lr", "lr": "lr", "feature_space": "", "prior": "", "method": "",
          "model": "", "data": ""}
#: Varied fields that lead a run's name (then the others, in spec order).
NAME_FIRST = ("method", "model", "data", "prior")
#: Default x axis of the sweep figures, per table kind.
DEFAULT_X = {"alpha": "alpha", "batch": "batch_size", "epochs": "epochs", "weights": "hycd_weight"}
#: Fields that change with the x value but are not a series of their own (gradient accumulation).
NOT_SERIES = {"accum_steps"}
SWEEP_LOG = "sweep.jsonl"


class SweepError(ConfigError):
    """A sweep spec is invalid; the message names the file, the block and the field."""


# ====================================================================================== the spec
@dataclass(frozen=True)
class DataRef:
    """A derived training set: a prefix of a split and/or its CLIP-score-filtered part."""

    split: str
    size: int | None = None
    keep_fraction: float | None = None
    name: str | None = None
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ((attribute, allowed values), ...)

    @property
    def slug(self) -> str:
        if self.name:
            return _safe(self.name)
        parts = [_safe(Path(self.split).stem if self.split.endswith((".yaml", ".yml")) else self.split)]
        for key, values in self.where:
            parts.append(_safe(f"{key}-{'+'.join(values)}"))
        if self.size is not None:
            parts.append(f"n{self.size}")
        if self.keep_fraction is not None:
            parts.append(f"clip{_num(self.keep_fraction)}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        text = Path(self.split).stem if self.split.endswith((".yaml", ".yml")) else self.split
        for key, values in self.where:
            text += f", {key} in {{{', '.join(values)}}}"
        if self.size is not None:
            text += f", first {self.size:,} pairs"
        if self.keep_fraction is not None:
            text += f", CLIP-score top {100 * self.keep_fraction:g}%"
        return text


@dataclass
class Block:
    name: str
    table: str
    description: str = ""
    base: dict = field(default_factory=dict)
    seeds: list[int] | None = None
    grid: dict[str, list] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    suite: Any = None  # suite of this block's evaluation: a YAML path or an inline mapping; None = the spec's
    x: str | None = None
    series: str | None = None


@dataclass
class SweepSpec:
    name: str
    blocks: list[Block]
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict = field(default_factory=dict)
    preset: str | None = None
    output_dir: str | None = None
    evaluate: bool = True
    suite: Any = None  # a suite YAML path or an inline {zero_shot, retrieval, geometry} mapping; None = default
    device: str = "auto"
    description: str = ""
    path: Path | None = None  # where it was read from (error messages, relative suite paths)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "preset": self.preset,
                               "output_dir": self.output_dir, "seeds": list(self.seeds), "base": dict(self.base),
                               "evaluate": self.evaluate, "suite": self.suite, "device": self.device, "blocks": {}}
        for b in self.blocks:
            d: dict[str, Any] = {"table": b.table}
            for k in ("description", "base", "seeds", "grid", "runs", "suite", "x", "series"):
                v = getattr(b, k)
                if v:
                    d[k] = v
            out["blocks"][b.name] = d
        return out


_FIELD_TYPES = typing.get_type_hints(RunConfig)
_FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


def _hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(name: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string: turn such strings into numbers for numeric fields."""
    tp = _FIELD_TYPES.get(name)
    args = typing.get_args(tp) or (tp,)
    if isinstance(value, str) and (float in args) and value.strip():
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_field(where: str, name: str, *, allow_data_ref: bool = False) -> None:
    if name in MANAGED_FIELDS:
        raise SweepError(f"{where}: field '{name}' cannot be set here: {MANAGED_FIELDS[name]}")
    if name not in _FIELDS:
        raise SweepError(f"{where}: unknown RunConfig field '{name}'{_hint(name, _FIELDS)}")


def _data_ref(where: str, value: Any) -> DataRef | str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise SweepError(f"{where}: field 'data' must be a manifest path, a split name, or a mapping with "
                         f"{', '.join(DATA_REF_KEYS)}; got {value!r}")
    unknown = [k for k in value if k not in DATA_REF_KEYS]
    if unknown:
        raise SweepError(f"{where}: field 'data': unknown key '{unknown[0]}'{_hint(unknown[0], DATA_REF_KEYS)}; "
                         f"known: {', '.join(DATA_REF_KEYS)}")
    split = value.get("split")
    if not isinstance(split, str) or not split:
        raise SweepError(f"{where}: field 'data': 'split' (a split name or manifest path) is required")
    size, keep = value.get("size"), value.get("keep_fraction")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise SweepError(f"{where}: field 'data': 'size' must be a positive integer, got {size!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        raise SweepError(f"{where}: field 'data': 'keep_fraction' must be in (0, 1], got {keep!r}")
    filters = value.get("where") or {}
    if not isinstance(filters, dict):
        raise SweepError(f"{where}: field 'data': 'where' must be a mapping such as {{colour: [red, green]}}, got {filters!r}")
    for key, allowed in filters.items():
        if key not in WHERE_KEYS:
            raise SweepError(f"{where}: field 'data': 'where' key '{key}'{_hint(str(key), WHERE_KEYS)} is not a scene "
                             f"attribute; known: {', '.join(WHERE_KEYS)}")
        if not isinstance(allowed, list) or not allowed or not all(isinstance(v, str) for v in allowed):
            raise SweepError(f"{where}: field 'data': 'where.{key}' must be a non-empty list of names, got {allowed!r}")
        known = where_vocabulary()[key]
        for v in allowed:
            if v not in known:
                raise SweepError(f"{where}: field 'data': 'where.{key}' value '{v}'{_hint(v, known)} is not a {key} of "
                                 f"the world; known: {', '.join(known)}")
    if size is None and keep is None and not filters:
        raise SweepError(f"{where}: field 'data': give 'size', 'keep_fraction' and/or 'where' (or use the split name "
                         "as a string)")
    return DataRef(split, size, None if keep is None else float(keep), value.get("name"),
                   tuple((k, tuple(v)) for k, v in filters.items()))


def scene_matches(meta: Mapping, where: Sequence[tuple[str, Sequence[str]]]) -> bool:
    """Whether a record's scene metadata passes a ``where`` filter: every object's attribute (shape, colour,
    size, position: its grid cell's canonical name such as "top left") and the scene's background among the
    allowed values. ``meta`` is a record's extra fields (the
    world's records keep their scene under ``meta``) or the scene itself."""
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
        from ..embedded.world import CELLS, POSITION_NAMES

        cell = tuple(obj.get("cell") or ())
        return POSITION_NAMES[CELLS.index(cell)] if cell in CELLS else None
    return obj.get(key)


def _check_values(where: str, values: Mapping) -> dict:
    if not isinstance(values, Mapping):
        raise SweepError(f"{where}: expected a mapping of RunConfig field: value, got {values!r}")
    out = {}
    for k, v in values.items():
        _check_field(where, str(k))
        out[str(k)] = _coerce(k, v)
    return out


def _seeds(where: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                            for s in value):
        raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: 'seeds' repeats a seed: {value}")
    return list(value)


SUITE_KEYS = ("zero_shot", "retrieval", "geometry")


def _check_suite(where: str, suite: Any) -> Any:
    if suite is None or isinstance(suite, str):
        return suite
    if not isinstance(suite, Mapping):
        raise SweepError(f"{where}: suite must be a suite YAML path or a mapping of {', '.join(SUITE_KEYS)}")
    for k, v in suite.items():
        if k not in SUITE_KEYS:
            raise SweepError(f"{where}: suite: unknown key '{k}'{_hint(str(k), SUITE_KEYS)}; known: {', '.join(SUITE_KEYS)}")
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise SweepError(f"{where}: suite: '{k}' must be a list of world names or manifest paths")
    return {k: list(suite.get(k) or []) for k in SUITE_KEYS}


def parse_spec(values: Mapping, *, where: str = "sweep spec", path: Path | None = None) -> SweepSpec:
    """Validate a spec mapping; raise :class:`SweepError` naming the block and field of the first problem."""
    if not isinstance(values, Mapping):
        raise SweepError(f"{where}: expected a mapping (name, preset, seeds, base, blocks, ...)")
    for k in values:
        if k not in SPEC_KEYS:
            raise SweepError(f"{where}: unknown key '{k}'{_hint(str(k), SPEC_KEYS)}; known: {', '.join(SPEC_KEYS)}")
    preset = values.get("preset")
    if preset is not None:
        try:
            preset_name(preset)
        except ValueError as e:
            raise SweepError(f"{where}: preset: {e}") from None
    seeds = _seeds(where, values.get("seeds", [0]))
    base = _check_values(f"{where}: base", values.get("base") or {})
    if "data" in base:
        base["data"] = _data_ref(f"{where}: base", base["data"])
    blocks_in = values.get("blocks")
    if not isinstance(blocks_in, Mapping) or not blocks_in:
        raise SweepError(f"{where}: 'blocks' must be a non-empty mapping of block name: block")
    blocks = []
    for bname, b in blocks_in.items():
        bw = f"{where}: block '{bname}'"
        if not isinstance(bname, str) or not bname or _safe(bname) != bname:
            raise SweepError(f"{where}: block name {bname!r} must be a non-empty name of letters, digits, '.', '_', '-'")
        if not isinstance(b, Mapping):
            raise SweepError(f"{bw}: expected a mapping with table, grid and/or runs")
        for k in b:
            if k not in BLOCK_KEYS:
                raise SweepError(f"{bw}: unknown key '{k}'{_hint(str(k), BLOCK_KEYS)}; known: {', '.join(BLOCK_KEYS)}")
        table = b.get("table", "none")
        if table not in TABLE_KINDS:
            raise SweepError(f"{bw}: table must be one of {', '.join(TABLE_KINDS)}; got {table!r}{_hint(str(table), TABLE_KINDS)}")
        bbase = _check_values(f"{bw}: base", b.get("base") or {})
        if "data" in bbase:
            bbase["data"] = _data_ref(f"{bw}: base", bbase["data"])
        grid_in = b.get("grid") or {}
        if not isinstance(grid_in, Mapping):
            raise SweepError(f"{bw}: grid must be a mapping of field: [values]")
        grid = {}
        for k, vals in grid_in.items():
            _check_field(f"{bw}: grid", str(k))
            if not isinstance(vals, list) or not vals:
                raise SweepError(f"{bw}: grid field '{k}' must be a non-empty list of values, got {vals!r}")
            vals = [_coerce(k, v) for v in vals]
            if k == "data":
                vals = [_data_ref(f"{bw}: grid", v) for v in vals]
            grid[str(k)] = vals
        runs_in = b.get("runs") or []
        if not isinstance(runs_in, list) or not all(isinstance(r, Mapping) for r in runs_in):
            raise SweepError(f"{bw}: runs must be a list of mappings (field: value, optional label and name)")
        runs = []
        for i, r in enumerate(runs_in):
            rw = f"{bw}: runs[{i}]"
            entry = {k: v for k, v in r.items() if k in ENTRY_KEYS}
            for k in entry:
                if not isinstance(entry[k], str) or not entry[k].strip():
                    raise SweepError(f"{rw}: '{k}' must be a non-empty string")
            fields_ = _check_values(rw, {k: v for k, v in r.items() if k not in ENTRY_KEYS})
            if "data" in fields_:
                fields_["data"] = _data_ref(rw, fields_["data"])
            clash = sorted(set(fields_) & set(grid))
            if clash:
                raise SweepError(f"{rw}: field '{clash[0]}' is set by both runs and grid; set it in one of them")
            runs.append({**fields_, **entry})
        x, series = b.get("x"), b.get("series")
        for key, v in (("x", x), ("series", series)):
            if v is not None and v not in _FIELDS:
                raise SweepError(f"{bw}: {key}: unknown RunConfig field '{v}'{_hint(str(v), _FIELDS)}")
        bseeds = _seeds(bw, b["seeds"]) if "seeds" in b else None
        bsuite = _check_suite(bw, b.get("suite"))
        blocks.append(Block(bname, table, str(b.get("description") or ""), bbase, bseeds, grid, runs, bsuite, x, series))
    evaluate = values.get("evaluate", True)
    if not isinstance(evaluate, bool):
        raise SweepError(f"{where}: 'evaluate' must be true or false, got {evaluate!r}")
    name = values.get("name") or (path.stem if path else "sweep")
    if _safe(str(name)) != str(name):
        raise SweepError(f"{where}: name {name!r} must consist of letters, digits, '.', '_', '-'")
    spec = SweepSpec(str(name), blocks, seeds, base, preset, values.get("output_dir"), evaluate,
                     _check_suite(where, values.get("suite")),
                     str(values.get("device") or "auto"), str(values.get("description") or ""), path)
    expand(spec, Path("/nonexistent-sweep-dir"))  # validates every run's RunConfig (pure, nothing is written)
    return spec


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(values, where=str(path), path=path)


# ================================================================================ grid expansion
def _num(v: Any) -> str:
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e6:
            return str(int(v)) if not (v == 0 and math.copysign(1, v) < 0) else "0"
        return f"{v:g}"
    return str(v)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in str(text))


def _value_slug(key: str, value: Any) -> str:
    if isinstance(value, DataRef):
        text = value.slug
    elif key == "data" and isinstance(value, str):
        text = Path(value).stem if value.endswith((".yaml", ".yml")) else value
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, list):
        text = "x".join(_num(v) for v in value) if len(value) <= 4 else f"vec{len(value)}"
    else:
        text = _num(value)
    prefix = ABBREV.get(key, key.replace("_", "-"))
    return _safe(prefix + text)


def _value_label(key: str, value: Any) -> str:
    if isinstance(value, DataRef):
        return value.label
    if key in ("method", "model", "prior", "data", "feature_space"):
        return str(value)
    return f"{key}={_num(value)}"


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


def _combos(block: Block) -> list[dict]:
    entries = block.runs or [{}]
    keys = list(block.grid)
    grid = [dict(zip(keys, vals)) for vals in itertools.product(*block.grid.values())] if keys else [{}]
    return [{**e, **g} for e in entries for g in grid]


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
            raise SweepError(f"no block '{o}' in the spec{_hint(o, names)}; blocks: {', '.join(names)}")
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
    preset = preset_name(spec.preset)
    where0 = str(spec.path or "sweep spec")
    out: list[PlannedRun] = []
    for block in spec.blocks:
        suite = block.suite if block.suite is not None else spec.suite
        where = f"{where0}: block '{block.name}'"
        combos = _combos(block)
        varied = list(dict.fromkeys(k for c in combos for k in c if k not in ENTRY_KEYS))
        varied = sorted(varied, key=lambda k, order=tuple(varied): (
            NAME_FIRST.index(k) if k in NAME_FIRST else len(NAME_FIRST), order.index(k)))
        seen: dict[str, dict] = {}
        named = []
        for c in combos:
            params = {k: c[k] for k in varied if k in c}
            name = c.get("name") or "-".join(_value_slug(k, v) for k, v in params.items()) or "run"
            name = _safe(name)
            if name in seen:
                raise SweepError(f"{where}: two runs get the same name '{name}' ({seen[name]} and {params}); "
                                 f"give one a 'name:'")
            seen[name] = params
            label = c.get("label") or ", ".join(_value_label(k, v) for k, v in params.items()) or block.name
            named.append((name, label, params))
        for seed in block.seeds or spec.seeds:
            for name, label, params in named:
                values = {**spec.base, **block.base, **params}
                ref = values.get("data") if isinstance(values.get("data"), DataRef) else None
                data_path = None
                if ref is not None:
                    model = values.get("model") or PRESETS[preset].model
                    filt = f"-{_safe(model)}" if ref.keep_fraction is not None else ""
                    data_path = (sweep_dir / "data" / f"{ref.slug}{filt}.yaml").absolute()
                    values["data"] = str(data_path)
                values.update(seed=seed, preset=preset, output_dir=str((sweep_dir / "runs" / block.name).absolute()),
                              run_name=f"{name}-s{seed}")
                try:
                    cfg = RunConfig.from_dict(values, where=f"{where}: run '{name}'")
                except ConfigError as e:
                    msg = str(e)
                    raise SweepError(msg if msg.startswith(where) else f"{where}: run '{name}': {msg}") from None
                except TypeError as e:
                    raise SweepError(f"{where}: run '{name}': {e}") from None
                if cfg.precision != "fp32" and cfg.device in ("cpu", "auto"):
                    import torch

                    if cfg.device == "cpu" or not torch.cuda.is_available():
                        raise SweepError(f"{where}: run '{name}': precision {cfg.precision} needs a GPU; use fp32 on CPU")
                out.append(PlannedRun(block.name, block.table, name, seed, label, params, cfg, ref, data_path, suite,
                                      tuple(varied)))
    return out


def default_sweep_dir(spec: SweepSpec) -> Path:
    """``output_dir`` of the spec, else ``runs/sweeps/<name>-<preset>`` (relative: from the project root)."""
    from ..rundir import resolve_output_dir

    return resolve_output_dir(spec.output_dir or f"runs/sweeps/{spec.name}-{preset_name(spec.preset)}")


# ===================================================================================== planning
def _split_size(preset: str, split: str) -> int | None:
    from ..embedded.world import WorldConfig

    wc = WorldConfig.preset(PRESETS[preset].world)
    return {"synthetic-web": wc.web_size, "synthetic-coco": wc.coco_size,
            "synthetic-retrieval": wc.retrieval_size}.get(split)


def _manifest_size(path: Path | None) -> int | None:
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
        if n is None and Path(data).is_file():
            from ..data.manifest import load_manifest

            n = len(load_manifest(data).records())
    if n is None:
        return None
    n_val = 0 if cfg.val_fraction == 0 else max(1, int(round(n * cfg.val_fraction)))
    bs = cfg.batch_size or preset.batch_size
    per_epoch = (n - n_val) // bs
    if per_epoch < 1:
        return 0
    steps = max(1, int(round(per_epoch * (cfg.epochs if cfg.epochs is not None else preset.epochs))))
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def plan(spec: SweepSpec | str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
         only: Sequence[str] | None = None):
    """A DataFrame of the runs: block, run, seed, steps, pairs (steps x batch), finished, evaluated."""
    import pandas as pd

    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    rows = []
    for r in expand(spec, sweep_dir, only=only):
        src = r.source
        steps = planned_steps(r)
        bs = r.config.batch_size or PRESETS[preset_name(r.config.preset)].batch_size
        rows.append({"block": r.block, "table": r.table, "run": r.run_name, "seed": r.seed, "steps": steps,
                     # pair-passes: the no-grad forward of gradient accumulation costs about a third more
                     "pairs": None if steps is None else steps * bs * (4 / 3 if r.config.accum_steps > 1 else 1),
                     "eval_images": suite_images(r, spec.path),
                     "shared_with": src.key if r.alias_of is not None else None,
                     "finished": (src.run_dir / "summary.json").is_file(),
                     "evaluated": (src.run_dir / "metrics.json").is_file()})
    return pd.DataFrame(rows)


def suite_images(run: PlannedRun, spec_path: Path | None = None) -> int | None:
    """Images one evaluation of the run encodes (its suite's zero-shot sets and caption sets), for estimates."""
    from ..embedded.world import TASK_NAMES, WorldConfig

    wc = WorldConfig.preset(PRESETS[preset_name(run.config.preset)].world)
    suite = run.suite
    if suite is None:
        return len(TASK_NAMES) * wc.task_size + wc.retrieval_size
    if isinstance(suite, str):
        try:
            suite = yaml.safe_load(_resolve_suite_file(suite, spec_path).read_text()) or {}
        except (SweepError, OSError, yaml.YAMLError):
            return None
    n = sum(wc.task_size for _ in suite.get("zero_shot") or [])
    captions = set(suite.get("retrieval") or []) | set(suite.get("geometry") or [])
    return n + wc.retrieval_size * len(captions)


# ======================================================================================= running
@dataclass
class SweepReport:
    sweep_dir: Path
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    block_seconds: dict[str, float] = field(default_factory=dict)
    tables: "Tables | None" = None
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


def _log(sweep_dir: Path, record: dict) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(sweep_dir / SWEEP_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_log(sweep_dir: str | os.PathLike) -> list[dict]:
    """The records of ``sweep.jsonl`` (what ran, was skipped or failed, and when)."""
    path = Path(sweep_dir) / SWEEP_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def config_mismatch(run: PlannedRun) -> list[str]:
    """Fields where the run directory's saved config differs from the planned one ([] when none saved).

    As ``refine`` does, fields that a resumed run may change (device, workers, logging) are ignored;
    ``max_steps`` too while the run is unfinished (resuming extends it exactly), but not once it is
    finished: ``refine`` would return the old result."""
    from ..training.loop import RESUMABLE_FIELDS

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
    if cfg.pretrained != "embedded" or not (run_dir / "base.json").is_file():
        return False
    from ..embedded.pretrain import base_checkpoint_path

    try:
        recorded = json.loads((run_dir / "base.json").read_text(encoding="utf-8")).get("pretrained")
    except (OSError, ValueError):
        return False
    if not recorded:
        return False
    return Path(recorded).name != base_checkpoint_path(cfg.model, world_preset=cfg.preset).name


def prepare_data(run: PlannedRun, *, progress: bool = False) -> Path | None:
    """Write the run's derived training set (subset and/or CLIP-score filter) if it is not there yet."""
    ref, path = run.data_ref, run.data_path
    if ref is None or path is None:
        return None
    if path.is_file():
        return path
    from ..data.manifest import load_manifest, write_manifest
    from ..embedded.world import WorldConfig, build_world

    preset = preset_name(run.config.preset)
    if ref.split.endswith((".yaml", ".yml")):
        source = Path(ref.split)
    else:
        world = build_world(WorldConfig.preset(PRESETS[preset].world), progress=progress)
        try:
            source = world.manifest(ref.split)
        except KeyError as e:
            raise SweepError(f"block '{run.block}': data split '{ref.split}' is not in the embedded world ({e})") from None
    if ref.size is not None or ref.where:
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
        source = target
    if ref.keep_fraction is not None:
        from ..data.filtering import clip_score_filter
        from ..models.loading import load_model

        cfg = run.config
        model = load_model(cfg.model or PRESETS[preset].model, cfg.pretrained, world_preset=preset,
                           quick_gelu=cfg.quick_gelu)
        clip_score_filter(source, path, model=model, keep_fraction=ref.keep_fraction, progress=progress,
                          workers=2, batch_size=256)
    return path


def _base_models(runs: Sequence[PlannedRun]) -> list[tuple[str, str]]:
    out = []
    for r in runs:
        preset = preset_name(r.config.preset)
        if r.config.pretrained == "embedded":
            item = (r.config.model or PRESETS[preset].model, preset)
            if item not in out:
                out.append(item)
    return out


def run_sweep(spec: SweepSpec | str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
              progress: bool = True, only: Sequence[str] | None = None, max_runs: int | None = None,
              evaluate: bool | None = None, reevaluate: bool = False, outputs: bool = True, png: bool = False,
              run_progress: bool = False) -> SweepReport:
    """Run (or finish) a sweep and write its tables and figures; return a :class:`SweepReport`.

    ``only``: block names to run; ``max_runs``: only the first N runs of the plan (quick checks);
    ``evaluate``: override the spec's ``evaluate``; ``reevaluate``: evaluate finished runs again;
    ``outputs``: write tables and figures afterwards (``png`` also as PNG, needs kaleido + Chromium);
    ``run_progress``: show each run's own progress bar under the sweep's.
    """
    from tqdm.auto import tqdm

    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    sweep_dir = sweep_dir.absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs = expand(spec, sweep_dir, only=only)
    if max_runs is not None:
        runs = runs[:max_runs]
    do_eval = spec.evaluate if evaluate is None else evaluate
    saved = sweep_dir / "spec.yaml"
    previous = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    current = _spec_for_saving(spec)
    if previous != current:
        atomic_write(saved, yaml.safe_dump(current, sort_keys=False, allow_unicode=True))
    report = SweepReport(sweep_dir)
    t_start = time.time()
    _log(sweep_dir, {"event": "start", "spec": str(spec.path), "preset": preset_name(spec.preset), "runs": len(runs),
                     "only": list(only) if only else None, "max_runs": max_runs})

    # one-off preparation: the world and every base model (pre-trained on first use, cached after)
    for arch, preset in _base_models(runs):
        from ..embedded.pretrain import base_checkpoint_path, pretrain_base

        if not base_checkpoint_path(arch, world_preset=preset).is_file():
            msg = f"pre-training base model {arch} on the {preset} world (once; cached afterwards)"
            print(msg, file=sys.stderr)
            t0 = time.time()
            try:
                pretrain_base(arch, world_preset=preset, progress=progress)
                _log(sweep_dir, {"event": "pretrained", "model": arch, "seconds": round(time.time() - t0, 1)})
            except Exception as e:  # the runs of this backbone will fail and be reported
                _log(sweep_dir, {"event": "failed", "run": f"pretrain/{arch}", "error": f"{type(e).__name__}: {e}"})
                report.failed.append((f"pretrain/{arch}", f"{type(e).__name__}: {e}"))
            report.block_seconds["(base models)"] = report.block_seconds.get("(base models)", 0) + time.time() - t0

    state: dict[str, set] = {"evaluated": set(), "failed": set()}
    bar = tqdm(runs, desc=f"sweep {spec.name}", unit="run", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.key)
        t0 = time.time()
        status = _one_run(run, sweep_dir, report, evaluate=do_eval, reevaluate=reevaluate, spec=spec,
                          device=spec.device, progress=run_progress and progress, state=state)
        dt = time.time() - t0
        report.block_seconds[run.block] = report.block_seconds.get(run.block, 0.0) + dt
        if progress and not status.startswith("skipped"):
            bar.write(f"{status:>8} {run.key} ({dt:.0f} s)")
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


def _spec_for_saving(spec: SweepSpec) -> dict:
    d = spec.to_dict()
    d["preset"] = preset_name(spec.preset)

    def plain(v):
        if isinstance(v, DataRef):
            ref = {k: x for k, x in dataclasses.asdict(v).items() if x is not None and k != "where"}
            if v.where:  # back to the spec's own form, {colour: [red, green]}, so the saved spec parses again
                ref["where"] = {key: list(values) for key, values in v.where}
            return ref
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    if isinstance(spec.suite, str):
        d["suite"] = str(_resolve_suite_file(spec.suite, spec.path))
    for b in spec.blocks:
        if isinstance(b.suite, str):
            d["blocks"][b.name]["suite"] = str(_resolve_suite_file(b.suite, spec.path))
    return plain(d)


def _resolve_suite_file(suite: str, spec_path: Path | None) -> Path:
    p = Path(suite)
    if not p.is_absolute():
        from ..rundir import project_root

        candidates = [(spec_path.parent / p) if spec_path else None, Path.cwd() / p, project_root() / p]
        p = next((c for c in candidates if c is not None and c.is_file()), p)
    if not p.is_file():
        raise SweepError(f"suite: file not found: {suite}")
    return p.resolve()


def suite_file(run: PlannedRun, sweep_dir: Path, spec_path: Path | None = None) -> Path | None:
    """The suite YAML a run is evaluated with (None = the default suite); an inline suite is written to
    ``<sweep dir>/suites/<hash>.yaml`` (world names stay names: they resolve in the run's preset)."""
    if run.suite is None:
        return None
    if isinstance(run.suite, str):
        return _resolve_suite_file(run.suite, spec_path)
    from ..utils import stable_hash

    path = sweep_dir / "suites" / f"{stable_hash(run.suite, 12)}.yaml"
    if not path.is_file():
        atomic_write(path, yaml.safe_dump(run.suite, sort_keys=False))
    return path


def _one_run(run: PlannedRun, sweep_dir: Path, report: SweepReport, *, evaluate: bool, reevaluate: bool,
             spec: SweepSpec, device: str, progress: bool, state: dict) -> str:
    """Run (or resume, or skip) one planned run and evaluate it; an alias does its source run's work."""
    from ..evaluation.evaluate import evaluate_run
    from ..training.loop import refine

    src = run.source
    shared = f" (shared with {src.key})" if run.alias_of is not None else ""
    status = "skipped"
    t0 = time.time()
    try:
        if src.key in state["failed"]:
            raise SweepError(f"shares the configuration of {src.key}, which failed")
        mismatch = config_mismatch(src)
        if mismatch:
            raise SweepError(f"{src.run_dir} holds a run with a different configuration ({', '.join(mismatch)}): "
                             f"the spec or its starting model changed under the same run name; delete the directory to rerun it, or "
                             f"give the entry another 'name:'")
        if (src.run_dir / "summary.json").is_file():
            report.skipped.append(run.key)
            _log(sweep_dir, {"event": "skipped", "run": run.key, **({"shared_with": src.key} if shared else {})})
        else:
            status = "resumed" if (src.run_dir / "checkpoints" / "last.pt").is_file() else "ran"
            prepare_data(src, progress=progress)
            refine(src.config, progress=progress)
            report.ran.append(run.key)
            if status == "resumed":
                report.resumed.append(run.key)
            _log(sweep_dir, {"event": status, "run": run.key, "seconds": round(time.time() - t0, 1),
                             **({"shared_with": src.key} if shared else {})})
        needs_eval = not (src.run_dir / "metrics.json").is_file() or (reevaluate and src.key not in state["evaluated"])
        if evaluate and needs_eval:
            t1 = time.time()
            evaluate_run(src.run_dir, suite=suite_file(src, sweep_dir, spec.path), device=device, progress=False)
            state["evaluated"].add(src.key)
            report.evaluated.append(run.key)
            _log(sweep_dir, {"event": "evaluated", "run": run.key, "seconds": round(time.time() - t1, 1)})
            if status == "skipped":
                status = "evaluated"
    except KeyboardInterrupt:
        raise
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        state["failed"].add(src.key)
        report.failed.append((run.key, err))
        _log(sweep_dir, {"event": "failed", "run": run.key, "error": err,
                         "traceback": traceback.format_exc(limit=8), "seconds": round(time.time() - t0, 1)})
        status = "FAILED"
    return status + shared


def run_sweep_cli(spec_path: str | os.PathLike, output_dir: str | os.PathLike | None = None, progress: bool = True, *,
                  only: Sequence[str] | None = None, max_runs: int | None = None, dry_run: bool = False,
                  evaluate: bool | None = None, reevaluate: bool = False, png: bool = False) -> int:
    """Entry point of ``clip-refine-lab sweep SPEC.yaml``: 0 when every run succeeded, 1 when some failed."""
    spec = load_spec(spec_path)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    if dry_run:
        df = plan(spec, sweep_dir, only=only)
        if max_runs is not None:
            df = df.head(max_runs)
        print(format_plan(df, preset_name(spec.preset)))
        print(f"sweep directory: {sweep_dir}")
        return 0
    report = run_sweep(spec, sweep_dir, progress=progress, only=only, max_runs=max_runs, evaluate=evaluate,
                       reevaluate=reevaluate, png=png)
    print(report.summary())
    return 0 if report.ok else 1


#: Cost model of --dry-run (2 CPU cores, fp32, teacher and image caches on, SDPA attention), per preset:
#: seconds per 1,000 training pairs, seconds per evaluated image of the refined model (the starting
#: model's features come from the cache) and a fixed overhead per run and per evaluation (loading,
#: validation, checkpoints). Fitted to the full paper grid of 2026-11-23 (sweep.jsonl: main runs 23 s
#: for 38 steps of 256 pairs, full-suite evaluations 14 s, sweep-suite evaluations 8.5 s); rough.
SECONDS_PER_KPAIR = {"default": 2.0, "micro": 1.0}
EVAL_SECONDS_PER_IMAGE = {"default": 0.45e-3, "micro": 0.5e-3}
RUN_OVERHEAD_SECONDS = {"default": 5.0, "micro": 3.0}


def format_plan(df, preset: str) -> str:
    """Runs and estimated cost per block (minutes on 2 CPU cores, rough)."""
    if df.empty:
        return "(no runs)"
    rate = SECONDS_PER_KPAIR.get(preset, SECONDS_PER_KPAIR["default"])
    per_image = EVAL_SECONDS_PER_IMAGE.get(preset, EVAL_SECONDS_PER_IMAGE["default"])
    overhead = RUN_OVERHEAD_SECONDS.get(preset, RUN_OVERHEAD_SECONDS["default"])
    w = max(12, 2 + max(len(str(b)) for b in df.block))  # the block column fits the longest block name
    lines = [f"{'block':<{w}}{'table':<10}{'runs':>6}{'shared':>8}{'done':>6}{'steps/run':>12}{'est. min':>10}"]
    total = 0.0
    for block, g in df.groupby("block", sort=False):
        own = g[g.shared_with.isna()]  # shared runs cost nothing here: their source run does the work
        todo = own[~own.finished]
        unevaluated = own[~own.evaluated]
        seconds = (todo.pairs.fillna(0).sum() / 1000 * rate + overhead * len(todo)
                   + (unevaluated.eval_images.fillna(0) * per_image + 5).sum())
        minutes = seconds / 60
        total += minutes
        steps = sorted({int(s) for s in g.steps.dropna()})
        steps_txt = f"{steps[0]}" if len(steps) == 1 else (f"{steps[0]}-{steps[-1]}" if steps else "?")
        lines.append(f"{block:<{w}}{g.table.iloc[0]:<10}{len(g):>6}{int(g.shared_with.notna().sum()):>8}"
                     f"{int(g.finished.sum()):>6}{steps_txt:>12}{minutes:>10.1f}")
    lines.append(f"{'total':<{w}}{'':<10}{len(df):>6}{int(df.shared_with.notna().sum()):>8}{int(df.finished.sum()):>6}"
                 f"{'':>12}{total:>10.1f}")
    lines.append("estimate for 2 CPU cores; not included: building the world, pre-training base models that are not "
                 "cached (~7 to 14 min each on 2 cores), and the first run on each data set (image and teacher caches)")
    return "\n".join(lines)


# =================================================================================== aggregation
class NoResultsError(FileNotFoundError):
    """A sweep directory has no evaluated run yet."""


class Tables(dict):
    """name -> "mean ± std" DataFrame; ``.mean``, ``.std``, ``.n``: name -> the numeric frames;
    ``.runs``: one row per evaluated run (every metric; ``.base``: the pre-trained rows);
    ``.meta``: per table (kind, block, title)."""

    def __init__(self):
        super().__init__()
        self.mean: dict = {}
        self.std: dict = {}
        self.n: dict = {}
        self.meta: dict[str, dict] = {}
        self.runs = None
        self.base = None
        self.sweep_dir: Path | None = None


def _flatten(model_metrics: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    zs = model_metrics.get("zero_shot", {})
    for task, v in zs.items():
        # a compositional probe keeps its own column, named as one (tables put it after the tasks)
        out[f"zs:{task} (probe)" if v.get("probe") else f"zs:{task}"] = 100 * v["top1"]
    average = zero_shot_average(zs)  # compositional probes (manifest `probe: true`) are not in it
    if average is not None:
        out["zs:average"] = 100 * average
    for ds, v in model_metrics.get("retrieval", {}).items():
        for d in ("t2i", "i2t"):
            for k in (1, 5, 10):
                if f"{d}_R@{k}" in v:
                    out[f"ret:{ds}:{d}:R@{k}"] = 100 * v[f"{d}_R@{k}"]
    for ds, v in model_metrics.get("geometry", {}).items():
        for k in ("gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf"):
            if k in v:
                out[f"geo:{ds}:{k}"] = float(v[k])
    return out


def _param_value(v: Any) -> Any:
    if isinstance(v, DataRef):
        return v.label
    if isinstance(v, str) and v.endswith((".yaml", ".yml")):
        return Path(v).stem
    if isinstance(v, list):
        return str(v)
    return v


def collect(sweep_dir: str | os.PathLike, spec: SweepSpec | None = None):
    """(runs, base): one row per evaluated run (block, name, label, seed, params ``p:<field>``, metrics) and
    one row per block and starting model (index (block, model) -> its metrics, from the runs' metrics.json:
    blocks may use different suites)."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    if spec is None:
        path = sweep_dir / "spec.yaml"
        if not path.is_file():
            raise NoResultsError(f"{path} not found: is {sweep_dir} a sweep directory? (run `clip-refine-lab sweep SPEC`)")
        spec = parse_spec(yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path), path=path)
    rows, base = [], {}
    for run in expand(spec, sweep_dir):
        src = run.source
        mpath = src.run_dir / "metrics.json"
        if not mpath.is_file():
            continue
        result = json.loads(mpath.read_text(encoding="utf-8"))
        models = result["models"]
        mine = [k for k in models if k != PRETRAINED]
        if not mine:
            continue
        model = run.config.model or PRESETS[preset_name(run.config.preset)].model
        base.setdefault((run.block, model), _flatten(models[PRETRAINED]))
        summary = {}
        if (src.run_dir / "summary.json").is_file():
            summary = json.loads((src.run_dir / "summary.json").read_text(encoding="utf-8"))
        row = {"block": run.block, "table": run.table, "name": run.name, "label": run.label, "seed": run.seed,
               "run": run.key, "source": src.key, "model": model, "method": run.config.method,
               "train_pairs": summary.get("train_pairs"), "steps": summary.get("steps")}
        resolved = run.config.resolved()  # the effective value of every varied field (preset defaults filled)
        row.update({f"p:{k}": _param_value(run.params.get(k, resolved.data) if k == "data" else getattr(resolved, k))
                    for k in run.varied})
        row.update(_flatten(models[mine[0]]))
        rows.append(row)
    if not rows:
        raise NoResultsError(f"no evaluated run under {sweep_dir}/runs yet")
    base_df = pd.DataFrame.from_dict(base, orient="index")
    base_df.index = pd.MultiIndex.from_tuples(list(base), names=["block", "model"])
    return pd.DataFrame(rows), base_df


def _metric_cols(df, prefix: str) -> list[str]:
    return [c for c in df.columns if c.startswith(prefix)]


def _fmt_cell(m: float, s: float, n: float, digits: int) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return ""
    if n is None or n < 2 or s is None or (isinstance(s, float) and math.isnan(s)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _digits(col) -> int:
    name = col if isinstance(col, str) else " ".join(map(str, col))
    return 4 if any(k in name for k in ("gap", "alignment", "uniformity", "geo:")) else 2


def format_mean_std(mean, std, n, digits: int | None = None):
    """A frame of "mean ± std" strings (sample std; a single value without ±; non-metric columns as they are)."""
    out = mean.copy().astype(object)
    for c in mean.columns:
        if c not in std.columns:
            continue
        d = digits if digits is not None else _digits(c)
        out[c] = [_fmt_cell(m, s, k, d) for m, s, k in zip(mean[c], std[c], n[c])]
    return out


def _group(sub, metrics: list[str]):
    g = sub.groupby("name", sort=False)
    order = list(dict.fromkeys(sub["name"]))
    mean = g[metrics].mean().reindex(order)
    std = g[metrics].std(ddof=1).reindex(order)
    n = g[metrics].count().reindex(order)
    first = g.first().reindex(order)
    return mean, std, n, first


def _summary_metrics(df) -> list[tuple[str, str]]:
    """(column, display name) of the headline metrics of the sweep tables."""
    ret_sets = list(dict.fromkeys(c.split(":")[1] for c in _metric_cols(df, "ret:")))
    geo_sets = list(dict.fromkeys(c.split(":")[1] for c in _metric_cols(df, "geo:")))
    out = [("zs:average", "zero-shot avg (%)")] if "zs:average" in df.columns else []
    for ds in ret_sets:
        suffix = f" {ds}" if len(ret_sets) > 1 else ""
        out += [(f"ret:{ds}:t2i:R@1", f"T→I R@1 (%){suffix}"), (f"ret:{ds}:i2t:R@1", f"I→T R@1 (%){suffix}")]
    for ds in geo_sets:
        suffix = f" {ds}" if len(geo_sets) > 1 else ""
        out += [(f"geo:{ds}:gap_l2", f"gap ‖Δ‖{suffix}"), (f"geo:{ds}:alignment", f"alignment{suffix}"),
                (f"geo:{ds}:uniformity_rbf", f"uniformity{suffix}")]
    return [(c, n) for c, n in out if c in df.columns]


def _base_row(base, key: tuple, cols: list[str]):
    import pandas as pd

    if base is None or key not in base.index:
        return None
    return pd.Series({c: base.loc[key].get(c, float("nan")) for c in cols})


def _with_base(mean, std, n, base, block: str, models: list[str], cols: list[str], label_of) -> tuple:
    """Prepend the starting model's row(s) (one value each: n = 1) to the frames."""
    import pandas as pd

    rows = [(label_of(m), _base_row(base, (block, m), cols)) for m in models]
    rows = [(lab, r) for lab, r in rows if r is not None]
    if not rows:
        return mean, std, n
    bm = pd.DataFrame([r for _, r in rows], index=[lab for lab, _ in rows])
    bs = pd.DataFrame(float("nan"), index=bm.index, columns=bm.columns)
    bn = pd.DataFrame(1, index=bm.index, columns=bm.columns)
    return (pd.concat([bm, mean]), pd.concat([bs, std]), pd.concat([bn, n]))


def _put(tables: Tables, key: str, mean, std, n, meta: dict, formatted=None) -> None:
    tables.mean[key], tables.std[key], tables.n[key] = mean, std, n
    tables[key] = formatted if formatted is not None else format_mean_std(mean, std, n)
    tables.meta[key] = meta


def _task_order(columns: list[str], suite: Any) -> list[str]:
    """Zero-shot columns in the suite's order (the world's task order for the default suite)."""
    from ..embedded.world import TASK_NAMES

    ref = [Path(x).stem if x.endswith((".yaml", ".yml")) else x for x in suite.get("zero_shot", [])] \
        if isinstance(suite, dict) else list(TASK_NAMES)
    return sorted(columns, key=lambda c: (ref.index(c[3:]) if c[3:] in ref else len(ref), c))


def _main_tables(tables: Tables, block: str, sub, base, suite: Any = None) -> None:
    import pandas as pd

    models = list(dict.fromkeys(sub["model"]))
    sub = sub.copy()
    sub["name"] = sub["label"]  # group seeds by row label
    zs = _task_order([c for c in _metric_cols(sub, "zs:") if c != "zs:average"], suite) + \
        (["zs:average"] if "zs:average" in sub else [])
    ret = _metric_cols(sub, "ret:")
    geo = _metric_cols(sub, "geo:")
    label_of = (lambda m: PRETRAINED) if len(models) == 1 else (lambda m: f"{PRETRAINED} ({m})")

    def order(frame):
        known = [i for i in METHOD_ORDER if i in frame.index]
        return known + [i for i in frame.index if i not in known]

    for part, cols, columns in (
        ("zero_shot", zs, lambda cs: [c.split(":", 1)[1] for c in cs]),
        ("retrieval", ret, lambda cs: pd.MultiIndex.from_tuples([tuple(c.split(":")[1:]) for c in cs],
                                                                names=["dataset", "direction", "recall"])),
        ("geometry", geo, lambda cs: pd.MultiIndex.from_tuples([tuple(c.split(":")[1:]) for c in cs],
                                                               names=["dataset", "metric"])),
    ):
        if not cols:
            continue
        mean, std, n, _ = _group(sub, cols)
        mean, std, n = _with_base(mean, std, n, base, block, models, cols, label_of)
        idx = order(mean)
        mean, std, n = mean.loc[idx], std.loc[idx], n.loc[idx]
        formatted = format_mean_std(mean, std, n, 4 if part == "geometry" else 2)
        for f in (mean, std, n, formatted):
            f.columns = columns(cols)
            f.index.name = "model"
        title = {"zero_shot": "zero-shot top-1 (%)", "retrieval": "retrieval recall (%)",
                 "geometry": "modality gap ‖Δ‖, ‖Δ‖²/d, alignment, uniformity (log and plain)"}[part]
        _put(tables, f"{block}_{part}", mean, std, n, {"kind": "main", "block": block, "part": part,
                                                        "title": f"{block}: {title}"}, formatted)


def _sweep_table(tables: Tables, block: str, kind: str, sub, base, spec_block: Block | None) -> None:
    import pandas as pd

    metrics = _summary_metrics(sub)
    cols = [c for c, _ in metrics]
    names = dict(metrics)
    params = [c for c in sub.columns if c.startswith("p:") and sub[c].notna().any()]
    mean, std, n, first = _group(sub, cols)
    index = list(first["label"])
    extra = ["train_pairs"] if kind == "data" else []
    info = first[params + extra].copy()
    info.columns = [c[2:] if c.startswith("p:") else "pairs" for c in info.columns]
    models = list(dict.fromkeys(sub["model"]))
    if kind == "backbone":
        _backbone_table(tables, block, sub, base, cols, names)
        return
    for f in (mean, std, n, info):
        f.index = index
    label_of = (lambda m: PRETRAINED) if len(models) == 1 else (lambda m: f"{PRETRAINED} ({m})")
    mean, std, n = _with_base(mean, std, n, base, block, models, cols, label_of)
    info = info.reindex(mean.index)
    formatted = format_mean_std(mean, std, n)
    frames = []
    for f in (mean, std, n, formatted):
        g = pd.concat([info, f.rename(columns=names)], axis=1)
        g.index.name = "run"
        frames.append(g)
    if kind == "weights":
        _weights_table(tables, block, sub, spec_block)
    title = {"prior": "RaFA prior (Table 4)", "alpha": "alpha sweep", "batch": "mini-batch size sweep",
             "epochs": "epochs sweep", "data": "post-pre-training data set (Table 5)",
             "weights": "loss weights", "none": "runs"}.get(kind, kind)
    key = block if kind != "weights" else f"{block}_all"
    _put(tables, key, frames[0], frames[1], frames[2], {"kind": kind, "block": block, "title": f"{block}: {title}"},
         frames[3])


def _weights_table(tables: Tables, block: str, sub, spec_block: Block | None) -> None:
    """The loss-weight grid: zero-shot average, rows lambda_RaFA, columns lambda_HyCD."""
    y_key = "p:rafa_weight"
    x_key = "p:" + ((spec_block.x if spec_block and spec_block.x else None) or "hycd_weight")
    if x_key not in sub or y_key not in sub or "zs:average" not in sub:
        return
    g = sub.groupby([y_key, x_key])["zs:average"]
    mean, std, n = g.mean().unstack(), g.std(ddof=1).unstack(), g.count().unstack()
    for f in (mean, std, n):
        f.index = [_num(v) for v in f.index]
        f.columns = [_num(v) for v in f.columns]
        f.index.name = "rafa_weight \\ " + x_key[2:]
    formatted = format_mean_std(mean, std, n, 2)
    _put(tables, block, mean, std, n, {"kind": "weights", "block": block,
                                       "title": f"{block}: zero-shot avg (%) over the loss-weight grid"}, formatted)


def _backbone_table(tables: Tables, block: str, sub, base, cols: list[str], names: dict) -> None:
    """Table 6 analogue: rows backbones, columns (metric, pre-trained / method)."""
    import pandas as pd

    sub = sub.copy()
    sub["name"] = sub["model"] + " | " + sub["method"]
    mean, std, n, first = _group(sub, cols)
    models = list(dict.fromkeys(sub["model"]))
    methods = list(dict.fromkeys(sub["method"]))
    out = {k: {} for k in ("mean", "std", "n")}
    for m in models:
        for kind, frame in (("mean", mean), ("std", std), ("n", n)):
            row = {}
            for c in cols:
                if base is not None and (block, m) in base.index:
                    row[(names[c], PRETRAINED)] = (base.loc[(block, m)].get(c, float("nan")) if kind == "mean" else
                                                   (float("nan") if kind == "std" else 1))
                for meth in methods:
                    key = f"{m} | {meth}"
                    row[(names[c], meth)] = frame.loc[key, c] if key in frame.index else float("nan")
            out[kind][m] = row
    frames = [pd.DataFrame.from_dict(out[k], orient="index") for k in ("mean", "std", "n")]
    for f in frames:
        f.columns = pd.MultiIndex.from_tuples(f.columns, names=["metric", "model"])
        f.index.name = "backbone"
    formatted = format_mean_std(frames[0], frames[1], frames[2].fillna(0))
    _put(tables, block, frames[0], frames[1], frames[2], {"kind": "backbone", "block": block,
                                                          "title": f"{block}: backbones (Table 6)"}, formatted)


def aggregate(sweep_dir: str | os.PathLike, spec: SweepSpec | None = None) -> Tables:
    """Every table of an evaluated sweep: ``<block>_zero_shot/_retrieval/_geometry`` for main blocks (the
    paper's Tables 1-3), ``<block>`` for the others (rows: configurations; columns: the varied values and
    headline metrics; ``<block>`` of a weights block is the rafa x hycd grid of zero-shot averages).
    Values are "mean ± std" over seeds; ``.mean``/``.std``/``.n`` hold the numbers."""
    runs, base = collect(sweep_dir, spec)
    if spec is None:
        spec = parse_spec(yaml.safe_load((Path(sweep_dir) / "spec.yaml").read_text(encoding="utf-8")))
    blocks = {b.name: b for b in spec.blocks}
    tables = Tables()
    tables.runs, tables.base, tables.sweep_dir = runs, base, Path(sweep_dir)
    for block, sub in runs.groupby("block", sort=False):
        kind = sub["table"].iloc[0]
        if kind == "main":
            b = blocks.get(block)
            _main_tables(tables, block, sub, base, b.suite if b is not None and b.suite is not None else spec.suite)
        else:
            _sweep_table(tables, block, kind, sub, base, blocks.get(block))
    return tables


# ======================================================================================= figures
def _sweep_figure(tables: Tables, block: str, kind: str, spec_block: Block | None):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..plots import BASE_COLOUR, RUN_COLOURS, TEMPLATE

    runs = tables.runs
    sub = runs[runs["block"] == block]
    x = (spec_block.x if spec_block and spec_block.x else None) or DEFAULT_X.get(kind)
    if x is None or f"p:{x}" not in sub:
        return None
    series_keys = ([spec_block.series] if spec_block and spec_block.series else
                   [c[2:] for c in sub.columns if c.startswith("p:") and c[2:] != x and c[2:] not in NOT_SERIES
                    and sub[c].nunique() > 1])
    metrics = [(c, name) for c, name in _summary_metrics(sub) if c.startswith(("zs:", "ret:"))][:3]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[n for _, n in metrics], horizontal_spacing=0.07)
    methods = list(dict.fromkeys(sub["method"]))
    single = methods[0] if len(methods) == 1 else block
    key = (lambda r: " / ".join(str(r[f"p:{s}"]) for s in series_keys)) if series_keys else (lambda r: single)
    sub = sub.assign(_series=sub.apply(key, axis=1))
    for i, (sname, g) in enumerate(sub.groupby("_series", sort=False)):
        agg = g.groupby(f"p:{x}")[[c for c, _ in metrics]]
        mean, std = agg.mean().sort_index(), agg.std(ddof=1).sort_index()
        for j, (c, _) in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(x=list(mean.index), y=list(mean[c]), name=str(sname), legendgroup=str(sname),
                                     showlegend=j == 1, mode="lines+markers",
                                     line=dict(color=RUN_COLOURS[i % len(RUN_COLOURS)]),
                                     error_y=dict(type="data", array=list(std[c].fillna(0)), visible=True)),
                          row=1, col=j)
    models = list(dict.fromkeys(sub["model"]))
    if tables.base is not None and len(models) == 1 and (block, models[0]) in tables.base.index:
        for j, (c, _) in enumerate(metrics, start=1):
            v = tables.base.loc[(block, models[0])].get(c)
            if v is not None and not math.isnan(v):
                note = dict(annotation_text=PRETRAINED, annotation_position="bottom right") if j == 1 else {}
                fig.add_hline(y=v, line=dict(color=BASE_COLOUR, dash="dash"), row=1, col=j, **note)
    if kind == "batch":
        fig.update_xaxes(type="log", dtick=math.log10(2))
    fig.update_xaxes(title_text=x)
    n_seeds = int(sub.groupby("name")["seed"].nunique().max())
    title = {"alpha": "HyCD α sweep", "batch": "Mini-batch size (gradient accumulation for the large ones)",
             "epochs": "Epochs"}.get(kind, block)
    fig.update_layout(title=f"{title}: mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}",
                      template=TEMPLATE, height=400, width=max(900, 330 * len(metrics)),
                      legend=dict(orientation="h", y=-0.25), margin=dict(l=50, r=20, t=80, b=100))
    return fig


def _weights_figure(tables: Tables, block: str):
    import plotly.graph_objects as go

    if block not in tables.mean or tables.meta.get(block, {}).get("kind") != "weights":
        return None
    mean, text = tables.mean[block], tables[block]
    fig = go.Figure(go.Heatmap(z=mean.values, x=[_num(c) for c in mean.columns], y=[_num(i) for i in mean.index],
                               text=text.values, texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title="zero-shot<br>avg (%)")))
    base = tables.base
    models = list(dict.fromkeys(tables.runs[tables.runs["block"] == block]["model"]))
    note = ""
    if base is not None and len(models) == 1 and (block, models[0]) in base.index and "zs:average" in base.columns:
        note = f" (pre-trained: {base.loc[(block, models[0]), 'zs:average']:.2f})"
    fig.update_layout(title=f"Loss weights: zero-shot avg (%){note}", xaxis_title="λ_HyCD", yaxis_title="λ_RaFA",
                      template="plotly_white", height=450, width=600)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def _main_figure(tables: Tables, block: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..plots import model_colours

    zs_key, ret_key = f"{block}_zero_shot", f"{block}_retrieval"
    panels = []
    if zs_key in tables.mean and "average" in tables.mean[zs_key].columns:
        panels.append(("zero-shot avg (%)", tables.mean[zs_key]["average"], tables.std[zs_key]["average"]))
    if ret_key in tables.mean:
        m, s = tables.mean[ret_key], tables.std[ret_key]
        for c in m.columns:
            if c[2] == "R@1":
                name = f"{'T→I' if c[1] == 't2i' else 'I→T'} R@1 (%)"
                if len({cc[0] for cc in m.columns}) > 1:
                    name += f" {c[0]}"
                panels.append((name, m[c], s[c]))
    if not panels:
        return None
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.06)
    labels = list(panels[0][1].index)
    colours = model_colours(labels, PRETRAINED)
    for j, (_, mean, std) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=labels, y=list(mean), marker_color=[colours[lab] for lab in labels],
                             error_y=dict(type="data", array=list(std.fillna(0)), visible=True), showlegend=False),
                      row=1, col=j)
    fig.update_layout(title=f"{block}: mean ± std over seeds", template="plotly_white", height=420,
                      width=max(900, 330 * len(panels)), margin=dict(l=50, r=20, t=80, b=120))
    fig.update_xaxes(tickangle=-40)
    return fig


def figures(tables: Tables, spec: SweepSpec | None = None) -> dict:
    """Plotly figures: ``<block>`` of each alpha/batch/epochs block (mean ± std against the swept value,
    one line per series, the starting model dashed), the loss-weight heatmap, and a bar chart of each
    main block."""
    if spec is None and tables.sweep_dir is not None and (tables.sweep_dir / "spec.yaml").is_file():
        spec = parse_spec(yaml.safe_load((tables.sweep_dir / "spec.yaml").read_text(encoding="utf-8")))
    blocks = {b.name: b for b in spec.blocks} if spec else {}
    out = {}
    for block, sub in tables.runs.groupby("block", sort=False):
        kind = sub["table"].iloc[0]
        fig = None
        if kind in ("alpha", "batch", "epochs"):
            fig = _sweep_figure(tables, block, kind, blocks.get(block))
        elif kind == "weights":
            fig = _weights_figure(tables, block)
        elif kind == "main":
            fig = _main_figure(tables, block)
        if fig is not None:
            out[block] = fig
    return out


# ======================================================================================= writing
def to_markdown(df, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table (MultiIndex columns joined with a space; no extra dependency)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [" ".join(str(x) for x in c if str(x)) if isinstance(c, tuple) else str(c) for c in df.columns]
    head = ([str(df.index.name or "")] if index else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for idx, row in zip(df.index, df.itertuples(index=False)):
        values = ([cell(idx if not isinstance(idx, tuple) else " / ".join(map(str, idx)))] if index else []) + \
                 [cell(v) for v in row]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def tables_markdown(tables: Tables) -> str:
    """Every table with a title, in order, as one Markdown document (for the README)."""
    n = tables.runs.groupby(["block", "name"])["seed"].nunique()
    parts = [f"Mean ± std (sample std) over seeds; {int(n.min())}-{int(n.max())} seed(s) per configuration. "
             f"Accuracies and recalls in %."]
    for key, df in tables.items():
        parts.append(f"### {tables.meta[key]['title']}\n\n{to_markdown(df)}")
    return "\n\n".join(parts) + "\n"


def write_outputs(tables: Tables, figs: Mapping | None, sweep_dir: str | os.PathLike, *, png: bool = False) -> list[Path]:
    """Write ``tables/<name>.csv`` (mean ± std), ``<name>.mean.csv``, ``<name>.std.csv``, ``tables/tables.md``,
    ``tables/runs.csv`` (every run's metrics) and ``figures/<name>.html`` (+ ``.png`` with ``png``)."""
    sweep_dir = Path(sweep_dir)
    tdir, fdir = sweep_dir / "tables", sweep_dir / "figures"
    written = []
    for key, df in tables.items():
        written.append(atomic_write(tdir / f"{key}.csv", df.to_csv()))
        written.append(atomic_write(tdir / f"{key}.mean.csv", tables.mean[key].to_csv()))
        written.append(atomic_write(tdir / f"{key}.std.csv", tables.std[key].to_csv()))
    written.append(atomic_write(tdir / "runs.csv", tables.runs.to_csv(index=False)))
    written.append(atomic_write(tdir / "tables.md", tables_markdown(tables)))
    for name, fig in (figs or {}).items():
        fdir.mkdir(parents=True, exist_ok=True)
        # plotly.js once beside the pages (figures/plotly.min.js): viewable offline, small pages
        written.append(atomic_write(fdir / f"{name}.html",
                                    lambda p, fig=fig: fig.write_html(str(p), include_plotlyjs="directory")))
        if png:
            from ..plots import save_png

            written.append(save_png(fig, fdir / f"{name}.png"))
    if figs:
        js = fdir / "plotly.min.js"
        if js.is_file():
            written.append(js)
    atomic_write_json(sweep_dir / "outputs.json", {"tables": list(tables), "figures": list(figs or {})})
    return written


# ================================================================================ notebook helper
NOTEBOOK_PARAMETERS = {
    "spec": (lambda v: isinstance(v, str) and v.strip() != "", "a spec path"),
    "output_dir": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "None or a folder"),
    "blocks": (lambda v: v is None or (isinstance(v, list) and v and all(isinstance(b, str) for b in v)),
               "None or a non-empty list of block names"),
    "max_runs": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                 "None or an integer >= 1"),
    "run": (lambda v: isinstance(v, bool), "True or False"),
    "figure_dir": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "None or a folder"),
}


def check_notebook_parameters(namespace: Mapping) -> dict:
    """Type-check notebook 08's parameters; raise ConfigError naming the first bad one. Resolves ``spec``
    and ``output_dir`` against the project root."""
    from ..rundir import resolve_output_dir, resolve_path

    out = {}
    for name, (test, kind) in NOTEBOOK_PARAMETERS.items():
        if name not in namespace:
            raise ConfigError(f"08_paper_tables: parameter {name} missing: run the parameters cell first")
        if not test(namespace[name]):
            raise ConfigError(f"08_paper_tables: {name} must be {kind}, got {namespace[name]!r}")
        out[name] = namespace[name]
    out["spec"] = resolve_path(out["spec"])
    if not Path(out["spec"]).is_file():
        raise ConfigError(f"08_paper_tables: spec: file not found: {namespace['spec']}")
    if out["output_dir"] is not None:
        out["output_dir"] = resolve_output_dir(out["output_dir"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clip_refine_lab.sweep SPEC.yaml`` (the same as ``clip-refine-lab sweep``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m clip_refine_lab.sweep", description="Run a sweep spec.")
    add_sweep_arguments(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    return cmd_sweep(args)


def add_sweep_arguments(p) -> None:
    """The ``sweep`` subcommand's arguments (shared by the CLI and ``python -m clip_refine_lab.sweep``)."""
    p.add_argument("spec", help="sweep spec YAML (sweeps/paper.yaml, sweeps/quick.yaml; format: sweeps/README.md)")
    p.add_argument("--output-dir", default=None,
                   help="sweep directory (default: the spec's output_dir, else runs/sweeps/<name>-<preset>)")
    p.add_argument("--only", nargs="+", default=None, metavar="BLOCK", help="run only these blocks")
    p.add_argument("--max-runs", type=int, default=None, help="only the first N runs of the plan")
    p.add_argument("--dry-run", action="store_true", help="list the blocks, runs done and estimated cost; run nothing")
    p.add_argument("--no-eval", action="store_true", help="train only (evaluate later with another invocation)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again (e.g. a new suite)")
    p.add_argument("--png", action="store_true", help="also write the figures as PNG (kaleido + Chromium)")


def cmd_sweep(args) -> int:
    return run_sweep_cli(args.spec, args.output_dir, progress=not getattr(args, "quiet", False), only=args.only,
                         max_runs=args.max_runs, dry_run=args.dry_run, evaluate=False if args.no_eval else None,
                         reevaluate=args.reevaluate, png=args.png)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError) as e:
        print(f"clip-refine-lab sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
