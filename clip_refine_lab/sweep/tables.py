"""The paper's tables of an evaluated sweep, as "mean ± std" over seeds.

:func:`aggregate` reads every evaluated run of a sweep directory and returns the paper-layout tables
as "mean ± std" frames (sample std, ddof = 1, over the seeds; a single value is shown without ±),
with the numeric means, stds and counts beside them; :func:`write_outputs` writes them (CSV, Markdown)
and the figures (HTML, optionally PNG) into ``<sweep dir>/tables`` and ``<sweep dir>/figures``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import PRESETS, preset_name
from ..evaluation.compare import GEOMETRY_COLUMNS
from ..metrics import zero_shot_average
from ..utils import atomic_write, atomic_write_json
from .plan import expand
from .spec import PRETRAINED, SPEC_FILE, Block, DataRef, SweepSpec, manifest_stem, number_text, read_saved_spec

#: The paper's row order of Table 1-3.
METHOD_ORDER = (PRETRAINED, "contrastive", "m2-mix", "self-kd", "hycd", "hycd+l2", "clip-refine")


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
        for k in GEOMETRY_COLUMNS:
            if k in v:
                out[f"geo:{ds}:{k}"] = float(v[k])
    return out


def _param_value(v: Any) -> Any:
    if isinstance(v, DataRef):
        return v.label
    if isinstance(v, str):
        return manifest_stem(v)
    if isinstance(v, list):
        return str(v)
    return v


def _spec_of(sweep_dir: Path, spec: SweepSpec | None) -> SweepSpec:
    if spec is not None:
        return spec
    saved = read_saved_spec(sweep_dir)
    if saved is None:
        raise NoResultsError(f"{sweep_dir / SPEC_FILE} not found: is {sweep_dir} a sweep directory? "
                             "(run `clip-refine-lab sweep SPEC`)")
    return saved


def collect(sweep_dir: str | os.PathLike, spec: SweepSpec | None = None):
    """(runs, base): one row per evaluated run (block, name, label, seed, params ``p:<field>``, metrics) and
    one row per block and starting model (index (block, model) -> its metrics, from the runs' metrics.json:
    blocks may use different suites)."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    rows, base = [], {}
    for run in expand(_spec_of(sweep_dir, spec), sweep_dir):
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


def summary_metrics(df) -> list[tuple[str, str]]:
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
    from ..embedded.tasks import TASK_NAMES

    ref = [manifest_stem(x) for x in suite.get("zero_shot", [])] if isinstance(suite, dict) else list(TASK_NAMES)
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
                 "geometry": "modality gap ‖Δ‖, ‖Δ‖²/d, alignment, uniformity (log and plain), logit scale, "
                              "raw norms' product over it"}[part]
        _put(tables, f"{block}_{part}", mean, std, n, {"kind": "main", "block": block, "part": part,
                                                        "title": f"{block}: {title}"}, formatted)


def _sweep_table(tables: Tables, block: str, kind: str, sub, base, spec_block: Block | None) -> None:
    import pandas as pd

    metrics = summary_metrics(sub)
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
        f.index = [number_text(v) for v in f.index]
        f.columns = [number_text(v) for v in f.columns]
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
    spec = _spec_of(Path(sweep_dir), spec)
    runs, base = collect(sweep_dir, spec)
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


def write_outputs(tables: Tables, figs: Mapping | None, sweep_dir: str | os.PathLike, *,
                  png: bool = False) -> list[Path]:
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
