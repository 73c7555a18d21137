"""The sweep spec: what a spec YAML may say, how its runs are named, and the checks that name the field.

A spec (format: ``sweeps/README.md``) is validated completely when it is read: every key, every
value of ``data:``, the suite, and every run's RunConfig, so that a typo fails in the first second,
not after an hour of runs. Errors name the file, the block and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..config import PRESETS, ConfigError, RunConfig, preset_name

PRETRAINED = "pre-trained"
SPEC_FILE = "spec.yaml"  # the spec as run, saved in the sweep directory (tables and figures read it)
TABLE_KINDS = ("main", "prior", "alpha", "batch", "epochs", "weights", "data", "backbone", "none")
SPEC_KEYS = ("name", "description", "preset", "output_dir", "seeds", "base", "blocks", "evaluate", "suite", "device",
             "extends")
BLOCK_KEYS = ("table", "description", "base", "seeds", "grid", "runs", "suite", "x", "series")
ENTRY_KEYS = ("label", "name")  # keys of a run entry that are not RunConfig fields
MANAGED_FIELDS = {"seed": "use 'seeds:'", "output_dir": "the sweep sets it (<sweep dir>/runs/<block>)",
                  "run_name": "the sweep names runs from their varied values", "preset": "use the spec's 'preset:'"}
DATA_REF_KEYS = ("split", "size", "keep_fraction", "where", "name")
WHERE_KEYS = ("shape", "colour", "size", "position", "background")  # scene attributes a 'where' filter may restrict
SUITE_KEYS = ("zero_shot", "retrieval", "geometry")
#: Short names of varied fields in run names (others use the field name).
ABBREV = {"alpha": "alpha", "batch_size": "bs", "accum_steps": "acc", "epochs": "ep", "max_steps": "steps",
          "rafa_weight": "rafa", "hycd_weight": "hycd", "align_weight": "align", "m2_weight": "m2w",
          "prior_sigma": "sigma", "prior_mean": "mu", "prior_low": "low", "prior_high": "high",
          "temperature": "T", "learning_rate": "lr", "lr": "lr", "feature_space": "", "prior": "", "method": "",
          "model": "", "data": ""}
#: Varied fields that lead a run's name (then the others, in spec order).
NAME_FIRST = ("method", "model", "data", "prior")

_FIELD_TYPES = typing.get_type_hints(RunConfig)
_FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


class SweepError(ConfigError):
    """A sweep spec is invalid; the message names the file, the block and the field."""


def where_vocabulary() -> dict[str, tuple[str, ...]]:
    """The names each ``where`` key accepts: the world's canonical class names (position: "top left", ...)."""
    from ..embedded.vocabulary import BACKGROUNDS, COLOUR_NAMES, POSITION_NAMES, SHAPES, SIZES

    return {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITION_NAMES,
            "background": BACKGROUNDS}


# ===================================================================================== the spec
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
        parts = [_safe(manifest_stem(self.split))]
        for key, values in self.where:
            parts.append(_safe(f"{key}-{'+'.join(values)}"))
        if self.size is not None:
            parts.append(f"n{self.size}")
        if self.keep_fraction is not None:
            parts.append(f"clip{number_text(self.keep_fraction)}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        text = manifest_stem(self.split)
        for key, values in self.where:
            text += f", {key} in {{{', '.join(values)}}}"
        if self.size is not None:
            text += f", first {self.size:,} pairs"
        if self.keep_fraction is not None:
            text += f", CLIP-score top {100 * self.keep_fraction:g}%"
        return text


@dataclass
class Block:
    """A named group of runs feeding one table: a grid and/or explicit runs over shared settings."""

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


# ================================================================================ field checks
def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_key(where: str, key: Any, known: Sequence[str]) -> SweepError:
    return SweepError(f"{where}: unknown key '{key}'{did_you_mean(str(key), known)}; known: {', '.join(known)}")


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


def _check_field(where: str, name: str) -> None:
    if name in MANAGED_FIELDS:
        raise SweepError(f"{where}: field '{name}' cannot be set here: {MANAGED_FIELDS[name]}")
    if name not in _FIELDS:
        raise SweepError(f"{where}: unknown RunConfig field '{name}'{did_you_mean(name, _FIELDS)}")


def _data_ref(where: str, value: Any) -> DataRef | str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise SweepError(f"{where}: field 'data' must be a manifest path, a split name, or a mapping with "
                         f"{', '.join(DATA_REF_KEYS)}; got {value!r}")
    unknown = [k for k in value if k not in DATA_REF_KEYS]
    if unknown:
        raise SweepError(f"{where}: field 'data': unknown key '{unknown[0]}'{did_you_mean(unknown[0], DATA_REF_KEYS)}; "
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
        raise SweepError(f"{where}: field 'data': 'where' must be a mapping such as {{colour: [red, green]}}, "
                         f"got {filters!r}")
    for key, allowed in filters.items():
        if key not in WHERE_KEYS:
            raise SweepError(f"{where}: field 'data': 'where' key '{key}'{did_you_mean(str(key), WHERE_KEYS)} is not "
                             f"a scene attribute; known: {', '.join(WHERE_KEYS)}")
        if not isinstance(allowed, list) or not allowed or not all(isinstance(v, str) for v in allowed):
            raise SweepError(f"{where}: field 'data': 'where.{key}' must be a non-empty list of names, got {allowed!r}")
        known = where_vocabulary()[key]
        for v in allowed:
            if v not in known:
                raise SweepError(f"{where}: field 'data': 'where.{key}' value '{v}'{did_you_mean(v, known)} is not "
                                 f"a {key} of the world; known: {', '.join(known)}")
    if size is None and keep is None and not filters:
        raise SweepError(f"{where}: field 'data': give 'size', 'keep_fraction' and/or 'where' (or use the split name "
                         "as a string)")
    return DataRef(split, size, None if keep is None else float(keep), value.get("name"),
                   tuple((k, tuple(v)) for k, v in filters.items()))


def _check_values(where: str, values: Mapping) -> dict:
    if not isinstance(values, Mapping):
        raise SweepError(f"{where}: expected a mapping of RunConfig field: value, got {values!r}")
    out = {}
    for k, v in values.items():
        _check_field(where, str(k))
        out[str(k)] = _coerce(k, v)
    if "data" in out:
        out["data"] = _data_ref(where, out["data"])
    return out


def _seeds(where: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                            for s in value):
        raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: 'seeds' repeats a seed: {value}")
    return list(value)


def _check_suite(where: str, suite: Any) -> Any:
    if suite is None or isinstance(suite, str):
        return suite
    if not isinstance(suite, Mapping):
        raise SweepError(f"{where}: suite must be a suite YAML path or a mapping of {', '.join(SUITE_KEYS)}")
    for k, v in suite.items():
        if k not in SUITE_KEYS:
            raise _unknown_key(f"{where}: suite", k, SUITE_KEYS)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise SweepError(f"{where}: suite: '{k}' must be a list of world names or manifest paths")
    return {k: list(suite.get(k) or []) for k in SUITE_KEYS}


# ==================================================================================== parsing
def _parse_grid(where: str, grid_in: Any) -> dict[str, list]:
    if not isinstance(grid_in, Mapping):
        raise SweepError(f"{where}: grid must be a mapping of field: [values]")
    grid = {}
    for k, vals in grid_in.items():
        _check_field(f"{where}: grid", str(k))
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{where}: grid field '{k}' must be a non-empty list of values, got {vals!r}")
        vals = [_coerce(k, v) for v in vals]
        if k == "data":
            vals = [_data_ref(f"{where}: grid", v) for v in vals]
        grid[str(k)] = vals
    return grid


def _parse_runs(where: str, runs_in: Any, grid: Mapping) -> list[dict]:
    if not isinstance(runs_in, list) or not all(isinstance(r, Mapping) for r in runs_in):
        raise SweepError(f"{where}: runs must be a list of mappings (field: value, optional label and name)")
    runs = []
    for i, r in enumerate(runs_in):
        rw = f"{where}: runs[{i}]"
        entry = {k: v for k, v in r.items() if k in ENTRY_KEYS}
        for k in entry:
            if not isinstance(entry[k], str) or not entry[k].strip():
                raise SweepError(f"{rw}: '{k}' must be a non-empty string")
        fields_ = _check_values(rw, {k: v for k, v in r.items() if k not in ENTRY_KEYS})
        clash = sorted(set(fields_) & set(grid))
        if clash:
            raise SweepError(f"{rw}: field '{clash[0]}' is set by both runs and grid; set it in one of them")
        runs.append({**fields_, **entry})
    return runs


def _parse_block(where: str, bname: Any, b: Any) -> Block:
    bw = f"{where}: block '{bname}'"
    if not isinstance(bname, str) or not bname or _safe(bname) != bname:
        raise SweepError(f"{where}: block name {bname!r} must be a non-empty name of letters, digits, '.', '_', '-'")
    if not isinstance(b, Mapping):
        raise SweepError(f"{bw}: expected a mapping with table, grid and/or runs")
    for k in b:
        if k not in BLOCK_KEYS:
            raise _unknown_key(bw, k, BLOCK_KEYS)
    table = b.get("table", "none")
    if table not in TABLE_KINDS:
        raise SweepError(f"{bw}: table must be one of {', '.join(TABLE_KINDS)}; "
                         f"got {table!r}{did_you_mean(str(table), TABLE_KINDS)}")
    base = _check_values(f"{bw}: base", b.get("base") or {})
    grid = _parse_grid(bw, b.get("grid") or {})
    runs = _parse_runs(bw, b.get("runs") or [], grid)
    x, series = b.get("x"), b.get("series")
    for key, v in (("x", x), ("series", series)):
        if v is not None and v not in _FIELDS:
            raise SweepError(f"{bw}: {key}: unknown RunConfig field '{v}'{did_you_mean(str(v), _FIELDS)}")
    seeds = _seeds(bw, b["seeds"]) if "seeds" in b else None
    suite = _check_suite(bw, b.get("suite"))
    return Block(bname, table, str(b.get("description") or ""), base, seeds, grid, runs, suite, x, series)


def parse_spec(values: Mapping, *, where: str = "sweep spec", path: Path | None = None) -> SweepSpec:
    """Validate a spec mapping; raise :class:`SweepError` naming the block and field of the first problem."""
    if not isinstance(values, Mapping):
        raise SweepError(f"{where}: expected a mapping (name, preset, seeds, base, blocks, ...)")
    for k in values:
        if k not in SPEC_KEYS:
            raise _unknown_key(where, k, SPEC_KEYS)
    preset = values.get("preset")
    if preset is not None:
        try:
            preset_name(preset)
        except ValueError as e:
            raise SweepError(f"{where}: preset: {e}") from None
    seeds = _seeds(where, values.get("seeds", [0]))
    base = _check_values(f"{where}: base", values.get("base") or {})
    blocks_in = values.get("blocks")
    if not isinstance(blocks_in, Mapping) or not blocks_in:
        raise SweepError(f"{where}: 'blocks' must be a non-empty mapping of block name: block")
    blocks = [_parse_block(where, bname, b) for bname, b in blocks_in.items()]
    evaluate = values.get("evaluate", True)
    if not isinstance(evaluate, bool):
        raise SweepError(f"{where}: 'evaluate' must be true or false, got {evaluate!r}")
    name = values.get("name") or (path.stem if path else "sweep")
    if _safe(str(name)) != str(name):
        raise SweepError(f"{where}: name {name!r} must consist of letters, digits, '.', '_', '-'")
    spec = SweepSpec(str(name), blocks, seeds, base, preset, values.get("output_dir"), evaluate,
                     _check_suite(where, values.get("suite")),
                     str(values.get("device") or "auto"), str(values.get("description") or ""), path)
    _check_runs(spec)
    return spec


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep spec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec not found: {path}")
    return parse_spec(_read_extended(path, ()), where=str(path), path=path)


def _read_extended(path: Path, chain: tuple[Path, ...]) -> dict:
    """The spec mapping of ``path``, with ``extends: OTHER.yaml`` (relative to the file) resolved: the other
    spec's keys, then this one's on top; ``base`` is merged field by field (this spec's fields win), and
    ``blocks`` too, block by block (a block named here replaces the other's of that name)."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict) or "extends" not in values:
        return values
    parent = (path.parent / str(values.pop("extends"))).resolve()
    if parent in chain or parent == path.resolve():
        raise SweepError(f"{path}: extends: {parent} extends {path} in turn (a cycle)")
    if not parent.is_file():
        raise SweepError(f"{path}: extends: spec not found: {parent}")
    merged = dict(_read_extended(parent, chain + (path.resolve(),)))
    for key in ("base", "blocks"):
        if isinstance(merged.get(key), dict) and isinstance(values.get(key), dict):
            values[key] = {**merged[key], **values[key]}
    merged.update(values)
    return merged


def read_saved_spec(sweep_dir: str | os.PathLike) -> SweepSpec | None:
    """The spec saved in a sweep directory (``spec.yaml``), or None when there is none."""
    path = Path(sweep_dir) / SPEC_FILE
    if not path.is_file():
        return None
    return parse_spec(yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path), path=path)


def spec_for_saving(spec: SweepSpec) -> dict:
    """The spec as plain YAML values that parse again: the preset filled in, suite files made absolute,
    derived data sets back in the spec's own form."""
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
        d["suite"] = str(resolve_suite_file(spec.suite, spec.path))
    for b in spec.blocks:
        if isinstance(b.suite, str):
            d["blocks"][b.name]["suite"] = str(resolve_suite_file(b.suite, spec.path))
    return plain(d)


def resolve_suite_file(suite: str, spec_path: Path | None) -> Path:
    """A suite YAML named by a spec: beside the spec, in the working directory, or from the project root."""
    p = Path(suite)
    if not p.is_absolute():
        from ..rundir import project_root

        candidates = [(spec_path.parent / p) if spec_path else None, Path.cwd() / p, project_root() / p]
        p = next((c for c in candidates if c is not None and c.is_file()), p)
    if not p.is_file():
        raise SweepError(f"suite: file not found: {suite}")
    return p.resolve()


# =================================================================================== run names
def number_text(v: Any) -> str:
    if isinstance(v, float):
        if v == int(v) and abs(v) < 1e6:
            return str(int(v)) if not (v == 0 and math.copysign(1, v) < 0) else "0"
        return f"{v:g}"
    return str(v)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in str(text))


def manifest_stem(path_or_name: str) -> str:
    """A manifest path's stem (``data_manifests/x.yaml`` -> ``x``); a split name as it is."""
    return Path(path_or_name).stem if path_or_name.endswith((".yaml", ".yml")) else path_or_name


def _value_slug(key: str, value: Any) -> str:
    if isinstance(value, DataRef):
        text = value.slug
    elif key == "data" and isinstance(value, str):
        text = manifest_stem(value)
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, list):
        text = "x".join(number_text(v) for v in value) if len(value) <= 4 else f"vec{len(value)}"
    else:
        text = number_text(value)
    prefix = ABBREV.get(key, key.replace("_", "-"))
    return _safe(prefix + text)


def _value_label(key: str, value: Any) -> str:
    if isinstance(value, DataRef):
        return value.label
    if key in ("method", "model", "prior", "data", "feature_space"):
        return str(value)
    return f"{key}={number_text(value)}"


def _combos(block: Block) -> list[dict]:
    entries = block.runs or [{}]
    keys = list(block.grid)
    grid = [dict(zip(keys, vals)) for vals in itertools.product(*block.grid.values())] if keys else [{}]
    return [{**e, **g} for e in entries for g in grid]


def block_runs(block: Block, where: str) -> tuple[list[str], list[tuple[str, str, dict]]]:
    """(varied fields, [(name, row label, varied values)]) of a block's runs, in spec order; the name is
    made from the varied values (method, model, data and prior first), unique in the block."""
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
    return varied, named


def derived_data_path(ref: DataRef, model: str, sweep_dir: Path) -> Path:
    """Where a derived training set is written: ``<sweep dir>/data/<slug>.yaml``; a CLIP-score-filtered
    set depends on the scoring model, so its name carries the model."""
    filt = f"-{_safe(model)}" if ref.keep_fraction is not None else ""
    return (sweep_dir / "data" / f"{ref.slug}{filt}.yaml").absolute()


def run_config(spec: SweepSpec, block: Block, name: str, params: Mapping, seed: int, sweep_dir: Path,
               where: str) -> tuple[RunConfig, DataRef | None, Path | None]:
    """(config, derived data set, its path) of one run: the spec's base, the block's base and the run's
    varied values, in that order of precedence; the sweep sets seed, preset, output_dir and run_name."""
    preset = preset_name(spec.preset)
    values = {**spec.base, **block.base, **params}
    ref = values.get("data") if isinstance(values.get("data"), DataRef) else None
    data_path = None
    if ref is not None:
        data_path = derived_data_path(ref, values.get("model") or PRESETS[preset].model, sweep_dir)
        values["data"] = str(data_path)
    values.update(seed=seed, preset=preset, output_dir=str((sweep_dir / "runs" / block.name).absolute()),
                  run_name=f"{name}-s{seed}")
    try:
        cfg = RunConfig.from_dict(values, where=f"{where}: run '{name}'")
        cfg.resolved()  # the preset's defaults must fit too (a batch size divisible by accum_steps)
    except ConfigError as e:
        msg = str(e)
        raise SweepError(msg if msg.startswith(where) else f"{where}: run '{name}': {msg}") from None
    except TypeError as e:
        raise SweepError(f"{where}: run '{name}': {e}") from None
    if cfg.precision != "fp32" and cfg.device in ("cpu", "auto"):
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            raise SweepError(f"{where}: run '{name}': precision {cfg.precision} needs a GPU; use fp32 on CPU")
    return cfg, ref, data_path


def block_where(spec: SweepSpec, block: Block) -> str:
    return f"{spec.path or 'sweep spec'}: block '{block.name}'"


def _check_runs(spec: SweepSpec) -> None:
    """Build every run's RunConfig once (pure: nothing is read or written), so a bad value fails now."""
    sweep_dir = Path("/nonexistent-sweep-dir")
    for block in spec.blocks:
        where = block_where(spec, block)
        _, named = block_runs(block, where)
        for seed in block.seeds or spec.seeds:
            for name, _, params in named:
                run_config(spec, block, name, params, seed, sweep_dir, where)
