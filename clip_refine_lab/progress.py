"""Progress that works where it runs: widget bars in a live Jupyter front end, text elsewhere.

JupyterLab (and Notebook, VS Code) start kernels with ``JPY_SESSION_NAME``; there a bar is an
ipywidgets progress bar. papermill, nbval and the command line get plain-text bars (tqdm's text
form), so an output notebook holds readable lines, not widgets frozen at "0 %".

The rule for long work: one :func:`stage` line saying what starts and about how long it takes, then
one bar for the whole stage (not one per data set or per task).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

PROGRESS_ENV = "CLIP_REFINE_LAB_PROGRESS"  # "widgets", "text" or unset (decide from the environment)


def widgets_render() -> bool:
    """Whether a Jupyter front end shows this kernel's widgets live (papermill and nbval do not)."""
    forced = os.environ.get(PROGRESS_ENV, "").lower()
    if forced in ("widgets", "text"):
        return forced == "widgets"
    return bool(os.environ.get("JPY_SESSION_NAME"))


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, unit: str = "it", initial: int = 0, leave: bool = True):
    """A tqdm bar: a widget in a live front end, text (on stderr) anywhere else."""
    if widgets_render():
        from tqdm.notebook import tqdm
        return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, initial=initial, leave=leave)
    from tqdm.std import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, initial=initial, leave=leave,
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def stage(what: str, about: str | None = None, *, enabled: bool = True) -> None:
    """One line before a stage of long work: what it does and, where known, about how long."""
    if enabled:
        print(f"{what}" + (f" (about {about})" if about else "") + ".", flush=True)
