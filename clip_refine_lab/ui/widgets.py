"""ipywidgets forms for interactive use of the notebooks in JupyterLab.

* :class:`RefineForm` (notebook 02): method, alpha slider, prior, learning rate, epochs and a Run
  button that post-pre-trains with a live plot in the form's output area.
* :class:`RunPicker` (notebook 03): a multi-select of finished runs and a Show button that
  re-draws the notebook's tables and charts for the selection.
* :class:`ProjectionExplorer` (notebook 06): PCA/UMAP, 2D/3D, colour, sample size and UMAP
  n_neighbors, with an Update button.

:func:`show_widget` displays one where a front end renders widgets. Each widget takes the function
that does the work as an argument (so tests can drive the widgets by setting values and calling
``button.click()``), and prints errors in its output area instead of raising them into the front
end's log.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Callable, Sequence

import ipywidgets as W

from ..config import METHOD_NAMES, PRIOR_NAMES, ConfigError, RunConfig
from ..progress import widgets_render

_LABEL = {"description_width": "90px"}
_WIDE = W.Layout(width="420px")


def show_widget(widget: W.Widget, what: str) -> bool:
    """Display ``widget`` where a Jupyter front end renders widgets; elsewhere (papermill, nbval) print one
    line instead, so output notebooks hold no frozen widget. Returns whether it was displayed."""
    if not widgets_render():
        print(f"({what}: interactive in JupyterLab)")
        return False
    from IPython.display import display

    display(widget)
    return True


class RefineForm(W.VBox):
    """Method, alpha, prior, lr, epochs, run name and a Run button.

    ``config``: the run options the form starts from (and keeps for every field it does not show).
    ``run(cfg, callback=...) -> run_dir`` does the work (default: :func:`clip_refine_lab.training.loop.refine`).
    """

    def __init__(self, config: RunConfig, *, run: Callable | None = None, live_plot: bool = True,
                 on_finish: Callable[[Path], None] | None = None):
        self.config = config
        try:  # show the preset's values for the fields left to it (lr, epochs)
            shown = config.resolved()
        except Exception:
            shown = config
        self._run = run
        self.live_plot = live_plot
        self.on_finish = on_finish
        self.runs: list[Path] = []
        self.method = W.Dropdown(options=list(METHOD_NAMES), value=config.method, description="method",
                                 style=_LABEL, layout=_WIDE)
        self.alpha = W.FloatSlider(value=float(config.alpha), min=0.0, max=1.0, step=0.05, description="alpha",
                                   readout_format=".2f", style=_LABEL, layout=_WIDE, continuous_update=False)
        self.prior = W.Dropdown(options=list(PRIOR_NAMES), value=config.prior, description="prior", style=_LABEL,
                                layout=_WIDE)
        self.lr = W.FloatText(value=float(shown.lr) if shown.lr is not None else 1e-5, description="lr",
                              style=_LABEL, layout=_WIDE)
        self.epochs = W.FloatText(value=float(shown.epochs) if shown.epochs is not None else 1.0,
                                  description="epochs", style=_LABEL, layout=_WIDE)
        self.run_name = W.Text(value="", placeholder="(automatic: method, time, seed)", description="run name",
                               style=_LABEL, layout=_WIDE)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play",
                                   tooltip="post-pre-train with these options")
        self.status = W.HTML(value="")
        self.output = W.Output()
        self.run_button.on_click(self._on_click)
        title = W.HTML("<b>Post-pre-train</b> (other options as in the parameters cell)")
        super().__init__([title, self.method, self.alpha, self.prior, self.lr, self.epochs, self.run_name,
                          W.HBox([self.run_button, self.status]), self.output])
        self.add_class("crl-refine-form")

    def current_config(self) -> RunConfig:
        """The RunConfig the Run button would use (validated; ConfigError when a value is wrong)."""
        cfg = dataclasses.replace(self.config, method=self.method.value, alpha=float(self.alpha.value),
                                  prior=self.prior.value, lr=float(self.lr.value), epochs=float(self.epochs.value),
                                  run_name=self.run_name.value.strip() or None)
        return cfg.validate()

    def _on_click(self, _button=None) -> None:
        from .live import LivePlot

        try:
            cfg = self.current_config()
        except ConfigError as e:
            self.status.value = f"<span style='color:#d62728'>{e}</span>"
            return
        self.run_button.disabled = True
        self.status.value = f"running {cfg.method} …"
        self.output.clear_output()
        try:
            with self.output:
                plot = LivePlot(self.live_plot)
                plot.display()
                run = self._run
                if run is None:
                    from ..training.loop import refine as run
                run_dir = Path(run(cfg, callback=plot))
                plot.finish()
                print(f"run directory: {run_dir}")
            self.runs.append(run_dir)
            self.status.value = f"finished: {run_dir.name}"
            if self.on_finish is not None:
                self.on_finish(run_dir)
        except Exception as e:  # shown in the form, not lost in the front end's log
            self.status.value = f"<span style='color:#d62728'>{type(e).__name__}: {e}</span>"
            with self.output:
                traceback.print_exc()
        finally:
            self.run_button.disabled = False


class RunPicker(W.VBox):
    """A multi-select of runs and a Show button: ``render(selected_run_dirs)`` draws into the output."""

    def __init__(self, runs: Sequence[Path], selected: Sequence[Path], render: Callable[[list[Path]], None],
                 *, description: str = "runs"):
        self.render = render
        options = [(Path(r).name, str(r)) for r in runs]
        for s in selected:  # a run chosen by path outside output_dir is still selectable
            if str(s) not in [v for _, v in options]:
                options.append((Path(s).name, str(s)))
        self.select = W.SelectMultiple(options=options, value=[str(s) for s in selected], description=description,
                                       rows=min(8, max(3, len(options))), layout=W.Layout(width="520px"))
        self.show_button = W.Button(description="Show", button_style="primary", icon="refresh")
        self.output = W.Output()
        self.show_button.on_click(self._on_click)
        super().__init__([W.HTML("Select one or more runs (Ctrl/Shift-click) and press <b>Show</b>:"),
                          W.HBox([self.select, self.show_button]), self.output])
        self.add_class("crl-run-picker")

    @property
    def selected(self) -> list[Path]:
        return [Path(v) for v in self.select.value]

    def _on_click(self, _button=None) -> None:
        self.output.clear_output()
        with self.output:
            if not self.selected:
                print("select at least one run")
                return
            try:
                self.render(self.selected)
            except Exception:
                traceback.print_exc()


class ProjectionExplorer(W.VBox):
    """Controls for notebook 06: ``render(method, dims, color, sample_size, n_neighbors)`` returns a figure."""

    def __init__(self, render: Callable[..., object], *, sample_size: int = 300, n_neighbors: int = 15,
                 max_sample: int = 2000):
        self.render = render
        self.method = W.ToggleButtons(options=[("PCA", "pca"), ("UMAP", "umap")], value="pca", description="method")
        self.dims = W.ToggleButtons(options=[("2D", 2), ("3D", 3)], value=2, description="dims")
        self.color = W.ToggleButtons(options=[("modality", "modality"), ("class", "class")], value="modality",
                                     description="colour by")
        self.sample_size = W.IntSlider(value=min(sample_size, max_sample), min=10, max=max(max_sample, 10), step=10,
                                       description="images", continuous_update=False)
        self.n_neighbors = W.IntSlider(value=n_neighbors, min=2, max=100, description="n_neighbors",
                                       continuous_update=False)
        self.update_button = W.Button(description="Update", button_style="primary", icon="refresh")
        self.output = W.Output()
        self.update_button.on_click(self._on_click)
        self.method.observe(lambda ch: self._sync(), names="value")
        self._sync()
        super().__init__([self.method, self.dims, self.color, self.sample_size, self.n_neighbors, self.update_button,
                          self.output])
        self.add_class("crl-projection-explorer")

    def _sync(self) -> None:
        self.n_neighbors.disabled = self.method.value != "umap"

    def values(self) -> dict:
        return {"method": self.method.value, "dims": int(self.dims.value), "color": self.color.value,
                "sample_size": int(self.sample_size.value), "n_neighbors": int(self.n_neighbors.value)}

    def _on_click(self, _button=None) -> None:
        from IPython.display import display

        self.output.clear_output()
        self.update_button.disabled = True
        try:
            with self.output:
                try:
                    fig = self.render(**self.values())
                    if fig is not None:
                        display(fig)
                except Exception:
                    traceback.print_exc()
        finally:
            self.update_button.disabled = False
