"""Several runs as the paper's tables (Table 1 zero-shot, Table 2 retrieval, Table 3 geometry, and
the linear probe when measured), as pandas DataFrames, and their text rendering for the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .evaluate import PRETRAINED_LABEL, evaluate_run


def compare(runs: Iterable[str | os.PathLike | dict], *, evaluate_missing: bool = True) -> dict:
    """Paper-layout tables over several runs: {"zero_shot", "retrieval", "geometry"} -> DataFrame.

    Rows are models: the starting model once (its numbers from the first run), then each run by name.
    Accuracies and recalls are in percent, as in the paper.
    """
    import pandas as pd

    results = []
    for r in runs:
        if isinstance(r, dict):
            results.append(r)
            continue
        path = Path(r) / "metrics.json"
        if not path.is_file():
            if not evaluate_missing:
                raise FileNotFoundError(f"{path} not found; run `clip-refine-lab eval {r}` first")
            results.append(evaluate_run(r, progress=False))
        else:
            results.append(json.loads(path.read_text()))
    if not results:
        raise ValueError("compare needs at least one run")
    models: dict[str, dict] = {PRETRAINED_LABEL: results[0]["models"][PRETRAINED_LABEL]}
    for res in results:
        models.update({k: v for k, v in res["models"].items() if k != PRETRAINED_LABEL})
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
    geo = pd.DataFrame({m: {(ds, k): v[k] for ds, v in r["geometry"].items()
                            for k in ("gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf")}
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
    leak = result_or_tables.get("leakage", {}) if "models" in result_or_tables else {}
    if leak and leak.get("text"):
        parts.append(leak["text"])
    return "\n\n".join(parts)
