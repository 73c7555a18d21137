"""Notebook-wide settings, figure export, and the output stripping the committed notebooks need.

The notebooks' other helpers: :mod:`.parameters` (the parameter checker), :mod:`.runs` (which runs and
data sets a notebook shows), :mod:`.examples` (examples and galleries), :mod:`.starting_model`
(notebook 01), :mod:`.widgets` and :mod:`.live` (JupyterLab only).

Outputs: committed notebooks keep outputs only in cells marked ``# NBVAL_CHECK_OUTPUT`` (what nbval
compares). ``python -m clip_refine_lab.ui.notebook strip notebooks/*.ipynb`` removes the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ..rundir import resolve_output_dir

CHECK_OUTPUT_MARK = "# NBVAL_CHECK_OUTPUT"


def setup() -> None:
    """Notebook-wide settings: torch threads no more than the cores; quiet sklearn's FutureWarnings."""
    import warnings

    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")


def export(fig, figure_dir: str | os.PathLike | None, name: str, **kwargs) -> Path | None:
    """Save ``fig`` as ``<figure_dir>/<name>.png`` (figure_dir resolved like an output folder); no-op for None."""
    if figure_dir is None:
        return None
    from ..plots import save_png

    path = resolve_output_dir(figure_dir) / f"{name}.png"
    save_png(fig, path, **kwargs)
    print(f"saved {path}")
    return path


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
    parser = argparse.ArgumentParser(prog="python -m clip_refine_lab.ui.notebook",
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
