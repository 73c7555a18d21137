"""Several runs as the paper's tables (Table 1 zero-shot, Table 2 retrieval, Table 3 geometry, and
the linear probe when measured), as pandas DataFrames, and their text rendering for the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..rundir import resolve_output_dir
from .evaluate import MODEL_FILE, PRETRAINED_LABEL, check_finished, evaluate_run

#: The geometry columns of the tables: the paper's Table 3, then the two statistics that say which regime the
#: model is in (its learned logit scale, and the raw norms' product over it; clip_refine_lab.regime).
GEOMETRY_COLUMNS = ("gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf", "logit_scale",
                    "norm_product_over_scale")
INCOMPLETE_MARK = " [incomplete]"  # appended to the row of a run evaluated with allow_incomplete


def locate(name: str | os.PathLike) -> Path:
    """A run directory or a folder of a model evaluated alone: a path, else a name under ``runs/``."""
    path = Path(name).expanduser()
    if path.is_dir() or path.is_absolute():
        return path
    under = resolve_output_dir("runs") / path
    if under.is_dir():
        return under
    raise FileNotFoundError(f"no run or evaluated model '{name}': neither {path.resolve()} nor {under} is a folder")


def load_result(run: str | os.PathLike | dict, *, evaluate_missing: bool = True, allow_incomplete: bool = False) -> dict:
    """The metrics.json of a run or of a model evaluated alone (a dict passes through). A run without
    metrics.json is evaluated first (``evaluate_missing``); an unfinished run is refused unless
    ``allow_incomplete``, and then marked ``incomplete``."""
    if isinstance(run, dict):
        return run
    folder = locate(run)
    path = folder / "metrics.json"
    if (folder / MODEL_FILE).is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; evaluate the model again with `clip-refine-lab eval --model ...`")
        return json.loads(path.read_text())
    incomplete = check_finished(folder, allow_incomplete)
    if not path.is_file():
        if not evaluate_missing:
            raise FileNotFoundError(f"{path} not found; run `clip-refine-lab eval {run}` first")
        return evaluate_run(folder, progress=False, allow_incomplete=allow_incomplete)
    result = json.loads(path.read_text())
    result["incomplete"] = bool(result.get("incomplete")) or incomplete
    return result


def model_rows(results: list[dict]) -> dict[str, dict]:
    """Table rows, label -> metrics: the first result's starting model as ``pre-trained``, then each run's
    refined model by name (marked when incomplete), and a model evaluated alone that is not first by its
    folder name."""
    models: dict[str, dict] = {PRETRAINED_LABEL: results[0]["models"][PRETRAINED_LABEL]}
    for i, res in enumerate(results):
        if i > 0 and res.get("kind") == "pretrained":
            models[res["run_name"]] = res["models"][PRETRAINED_LABEL]
        mark = INCOMPLETE_MARK if res.get("incomplete") else ""
        models.update({label + mark: m for label, m in res["models"].items() if label != PRETRAINED_LABEL})
    return models


def compare(runs: Iterable[str | os.PathLike | dict], *, evaluate_missing: bool = True,
            allow_incomplete: bool = False) -> dict:
    """Paper-layout tables over several runs: {"zero_shot", "retrieval", "geometry"} -> DataFrame.

    ``runs`` are run directories, folders of models evaluated alone (``evaluate_pretrained``), names of
    either under ``runs/``, or metrics dicts. Rows are models: the starting model once (from the first
    item), then each run by name. Unfinished runs are refused unless ``allow_incomplete``; their rows
    then end in ``[incomplete]``. Accuracies and recalls are in percent, as in the paper.
    """
    import pandas as pd

    results = [load_result(r, evaluate_missing=evaluate_missing, allow_incomplete=allow_incomplete) for r in runs]
    if not results:
        raise ValueError("compare needs at least one run")
    models = model_rows(results)
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
    geo = pd.DataFrame({m: {(ds, k): v[k] for ds, v in r["geometry"].items() for k in GEOMETRY_COLUMNS if k in v}
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
    if any(str(label).endswith(INCOMPLETE_MARK) for df in tables.values() for label in df.index):
        parts.append(f"{INCOMPLETE_MARK.strip()}: a run that has not finished (no summary.json), evaluated as it is "
                     "with --allow-incomplete")
    leak = result_or_tables.get("leakage", {}) if "models" in result_or_tables else {}
    if leak and leak.get("text"):
        parts.append(leak["text"])
    return "\n\n".join(parts)
