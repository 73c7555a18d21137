"""The live training plot of notebook 02 and of the RefineForm.

:class:`LivePlot` is a refine callback: in a live Jupyter front end it shows a plotly ``FigureWidget``
(needs ``anywidget``) updated at every logged step; where widgets do not render (papermill, nbval) it
shows the same figure statically when the run ends. The figure itself is
:func:`clip_refine_lab.plots.loss_figure`.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import plotly.graph_objects as go

from ..plots import loss_figure
from ..progress import widgets_render
from ..rundir import read_log


class LivePlot:
    """A refine callback that plots the loss terms and the batch gap as the run goes.

    ``live=True`` shows a plotly FigureWidget updated at every record when a Jupyter front end renders
    widgets (:func:`clip_refine_lab.progress.widgets_render`) and ``anywidget`` is installed;
    otherwise (or with ``live=False``) :meth:`finish` displays the static figure once the run ends.
    """

    def __init__(self, live: bool = True, *, title: str | None = "post-pre-training (live)", min_interval: float = 0.25):
        self.records: list[dict] = []
        self.val: list[dict] = []
        self.title = title
        self.min_interval = min_interval
        self._last = 0.0
        self.widget = None
        if live and widgets_render():
            try:
                self.widget = go.FigureWidget(loss_figure([], title=title))
            except ImportError:  # plotly >= 6 needs anywidget for FigureWidget
                self.widget = None

    @property
    def live(self) -> bool:
        return self.widget is not None

    def display(self) -> None:
        if self.widget is not None:
            from IPython.display import display

            display(self.widget)

    def __call__(self, record: Mapping) -> None:
        (self.val if record.get("kind") == "val" else self.records).append(dict(record))
        if self.widget is not None and time.monotonic() - self._last >= self.min_interval:
            self._refresh()

    def _refresh(self) -> None:
        new = loss_figure(self.records, self.val, title=self.title)
        w = self.widget
        with w.batch_update():
            if len(w.data) != len(new.data):
                w.data = ()
                w.add_traces(list(new.data))  # the traces keep their subplot axes (x, x2)
            else:
                for old, fresh in zip(w.data, new.data):
                    old.x, old.y = fresh.x, fresh.y
        self._last = time.monotonic()

    def figure(self) -> go.Figure:
        return loss_figure(self.records, self.val, title=(self.title or "").replace(" (live)", "") or None)

    def finish(self, run_dir: str | os.PathLike | None = None, display: bool | None = None) -> go.Figure:
        """Bring the live figure up to date; display the static one when nothing was shown live.

        With ``run_dir`` the records are re-read from its log (complete even when the run had been
        finished before and ``refine`` returned at once, calling back nothing).
        """
        if run_dir is not None:
            self.records, self.val = read_log(run_dir, "train"), read_log(run_dir, "val")
        if self.widget is not None:
            self._refresh()
        fig = self.figure()
        if display if display is not None else self.widget is None:
            from IPython.display import display as show

            show(fig)
        return fig
