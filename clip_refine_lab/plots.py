"""Plotly figures for the notebooks, and PNG export.

Every builder returns a ``plotly.graph_objects.Figure`` (JupyterLab renders it through plotly's own
extension; ``fig.show()`` or leaving it as a cell's last value displays it). :func:`save_png` writes
any of them to a PNG file for reports.

PNG export uses kaleido 1.x, which drives a Chrome/Chromium it finds on the machine. On Debian or
Ubuntu one line installs one::

    apt-get install -y chromium        # kaleido finds /usr/bin/chromium; or set BROWSER_PATH=/path/to/chrome

(``plotly_get_chrome`` downloads Google's build instead, where the network allows.)

Builders are pure: they take data and return a figure, so the sweep exports them too. What reads a
running log or needs widgets (the live training plot) is in :mod:`clip_refine_lab.ui`.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

BASE_COLOUR = "#7f7f7f"  # the starting model, in every chart
CHANCE_COLOUR = "#d8c8a0"  # the chance-level row of notebook 01
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22")
HIT_COLOUR = "#2ca02c"
MISS_COLOUR = "#d62728"
TEMPLATE = "plotly_white"
# log-record keys that are not loss terms
_NOT_TERMS = {"kind", "step", "epoch", "lr", "gap", "image_norm", "text_norm", "logit_scale", "logit_bias",
              "pairs_per_s"}
_BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome",
                       "/usr/bin/google-chrome-stable")


def model_colours(labels: Iterable[str], base_label: str = "pre-trained") -> dict[str, str]:
    """A fixed colour per model: grey for the starting model, then a cycle for the runs."""
    out, i = {}, 0
    for label in labels:
        if label == base_label:
            out[label] = BASE_COLOUR
        elif label == "chance":
            out[label] = CHANCE_COLOUR
        else:
            out[label] = RUN_COLOURS[i % len(RUN_COLOURS)]
            i += 1
    return out


# ----------------------------------------------------------------------------------------- export
def _ensure_browser() -> None:
    """Point kaleido at a system Chromium when none is on PATH under the names it looks for."""
    if os.environ.get("BROWSER_PATH"):
        return
    if any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")):
        return
    for c in _BROWSER_CANDIDATES:
        if os.access(c, os.X_OK):
            os.environ["BROWSER_PATH"] = c
            return


def save_png(fig: Any, path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
             scale: float = 1.0) -> Path:
    """Write ``fig`` (a plotly Figure or FigureWidget) to ``path`` as PNG with kaleido; return the path.

    Width and height default to the figure's layout size (700 x 500 when it has none).
    """
    _ensure_browser()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = go.Figure(fig) if not isinstance(fig, go.Figure) else fig
    width = width or fig.layout.width or 700
    height = height or fig.layout.height or 500
    try:
        fig.write_image(str(path), format="png", width=width, height=height, scale=scale)
    except Exception as e:  # kaleido's errors do not say what to install
        raise RuntimeError(
            f"PNG export to {path} failed: {type(e).__name__}: {e}\n"
            "kaleido 1.x needs a Chrome or Chromium: `apt-get install -y chromium` (Debian/Ubuntu) or "
            "`plotly_get_chrome`; set BROWSER_PATH=/path/to/chrome when it is not on PATH."
        ) from e
    return path


# ------------------------------------------------------------------------------------------ images
def thumbnail_uri(image: Any, size: int = 96) -> str:
    """A PNG data URI of an image (path, PIL image or HxWx3 uint8 array), ``size`` pixels on its long side.

    Small images (the synthetic world's are 32-48 px) are enlarged with nearest-neighbour so that
    pixels stay crisp; large ones are shrunk with antialiasing.
    """
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        from .data.images import load_image

        im = load_image(str(image))
    elif isinstance(image, np.ndarray):
        im = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    else:
        im = image.convert("RGB")
    w, h = im.size
    s = size / max(w, h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    im = im.resize(new, Image.NEAREST if s >= 1 else Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines: list[str] = []
    for para in str(text).split("\n"):
        lines.extend(textwrap.wrap(para, width) or [""])
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 1)] + "…"
    return "<br>".join(lines)


def image_grid(items: Sequence[Mapping], *, ncols: int = 6, thumb: int = 96, title: str | None = None,
               caption_width: int = 22, caption_lines: int = 4, row_titles: Sequence[str] | None = None,
               row_title_lines: int = 2) -> go.Figure:
    """A grid of images with a caption under each.

    ``items``: dicts with ``image`` (path, PIL image or array), ``caption`` (str, optional) and
    ``border`` (a CSS colour, optional: e.g. green for a hit). Items fill the grid row by row;
    ``row_titles`` (one per row) are written above each row.
    """
    n = len(items)
    if n == 0:
        fig = go.Figure()
        fig.update_layout(title=title, template=TEMPLATE, height=120,
                          annotations=[dict(text="(nothing to show)", showarrow=False, x=0.5, y=0.5,
                                            xref="paper", yref="paper")])
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return fig
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    pad = 10
    line_h = 15  # px per caption line at font size 11
    cap_h = line_h * caption_lines + 6 if any(it.get("caption") for it in items) else 0
    rt_h = 16 * row_title_lines + 4 if row_titles else 0
    cell_w = max(thumb, 6 * caption_width) + 2 * pad
    cell_h = thumb + cap_h + rt_h + pad
    top = 45 if title else 5
    plot_w, plot_h = ncols * cell_w, nrows * cell_h  # the plotting area: paper coordinates span it
    fig = go.Figure()
    annotations, shapes = [], []
    for i, item in enumerate(items):
        r, c = divmod(i, ncols)
        k = "" if i == 0 else str(i + 1)
        x0 = c * cell_w + (cell_w - thumb) / 2  # pixel box of the image from the plot area's top left
        y0 = r * cell_h + rt_h
        dom_x = [x0 / plot_w, (x0 + thumb) / plot_w]
        dom_y = [1 - (y0 + thumb) / plot_h, 1 - y0 / plot_h]
        fig.add_trace(go.Image(source=thumbnail_uri(item["image"], thumb), x0=0, y0=0, dx=1, dy=1,
                               xaxis=f"x{k}", yaxis=f"y{k}", hoverinfo="skip"))
        fig.layout[f"xaxis{k}"] = dict(domain=dom_x, visible=False, range=[-0.5, thumb - 0.5], fixedrange=True)
        fig.layout[f"yaxis{k}"] = dict(domain=dom_y, visible=False, range=[thumb - 0.5, -0.5], fixedrange=True)
        if item.get("border"):
            shapes.append(dict(type="rect", xref="paper", yref="paper", x0=dom_x[0] - 2 / plot_w,
                               x1=dom_x[1] + 2 / plot_w, y0=dom_y[0] - 2 / plot_h, y1=dom_y[1] + 2 / plot_h,
                               line=dict(color=item["border"], width=4)))
        if item.get("caption"):
            annotations.append(dict(text=_wrap(item["caption"], caption_width, caption_lines), showarrow=False,
                                    x=(dom_x[0] + dom_x[1]) / 2, y=dom_y[0] - 5 / plot_h, xref="paper",
                                    yref="paper", xanchor="center", yanchor="top", align="center",
                                    font=dict(size=11)))
    if row_titles:
        for r, text in enumerate(row_titles[:nrows]):
            annotations.append(dict(text=f"<b>{_wrap(text, int(ncols * cell_w / 7), row_title_lines)}</b>",
                                    showarrow=False, x=0.005, y=1 - (r * cell_h) / plot_h,
                                    xref="paper", yref="paper", xanchor="left", yanchor="top", align="left",
                                    font=dict(size=12)))
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left") if title else None,
                      width=plot_w + 20, height=plot_h + top + 10,
                      margin=dict(l=10, r=10, t=top, b=10, autoexpand=False),
                      annotations=annotations, shapes=shapes, template=TEMPLATE, showlegend=False,
                      plot_bgcolor="white", paper_bgcolor="white")
    return fig


def failure_gallery(cases: Sequence[Mapping], *, title: str, ncols: int = 4, thumb: int = 96) -> go.Figure:
    """Cases from :func:`clip_refine_lab.ui.examples.failure_cases` with their true and predicted labels."""
    items = [{"image": c["image"],
              "caption": f"[{c['task']}]\ntrue: {c['true']}\nbefore: {c['base_pred']}\nafter: {c['refined_pred']}",
              "border": HIT_COLOUR if c["refined_pred"] == c["true"] else MISS_COLOUR} for c in cases]
    return image_grid(items, ncols=ncols, thumb=thumb, title=title, caption_width=26, caption_lines=5)


def retrieval_gallery(examples: Sequence[Mapping], *, title: str = "text → image: top results", thumb: int = 72) -> go.Figure:
    """Text-to-image queries from :func:`clip_refine_lab.ui.examples.retrieval_examples`: one row per query
    and model, its top-k images left to right, the correct image framed green."""
    items, row_titles, k = [], [], 0
    for ex in examples:
        for label, results in ex["results"].items():
            k = max(k, len(results))
    for ex in examples:
        for label, results in ex["results"].items():
            row_titles.append(f"{label}: “{ex['query']}”")
            row = [{"image": r["image"], "caption": f"#{i + 1}" + (" ✓" if r["hit"] else ""),
                    "border": HIT_COLOUR if r["hit"] else None} for i, r in enumerate(results)]
            items.extend(row + [{"image": _blank(), "caption": ""}] * (k - len(row)))
    return image_grid(items, ncols=k, thumb=thumb, title=title, caption_width=12, caption_lines=1,
                      row_titles=row_titles)


def _blank():
    import numpy as np

    return np.full((8, 8, 3), 255, dtype=np.uint8)


# -------------------------------------------------------------------------------------- training log
def loss_terms(records: Sequence[Mapping]) -> list[str]:
    """The loss-term keys of train log records ('loss' first), in first-seen order."""
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in _NOT_TERMS and k not in keys and isinstance(v, (int, float)):
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "loss",))


def _log_layout(fig: go.Figure, title: str | None) -> None:
    fig.update_layout(title=title, template=TEMPLATE, height=380, width=900, legend=dict(orientation="h", y=-0.2),
                      margin=dict(l=50, r=20, t=60 if title else 40, b=60))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="‖Δ‖ (normalised)", row=1, col=2)


def _log_subplots() -> go.Figure:
    return make_subplots(rows=1, cols=2, subplot_titles=("loss terms", "batch modality gap ‖Δ‖"),
                         horizontal_spacing=0.1)


def loss_figure(records: Sequence[Mapping], val_records: Sequence[Mapping] = (), *,
                title: str | None = "post-pre-training") -> go.Figure:
    """Loss terms (and the validation loss) and the batch modality gap against the step."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    val = list(val_records) or [r for r in records if r.get("kind") == "val"]
    fig = _log_subplots()
    steps = [r["step"] for r in train]
    for term in loss_terms(train):
        fig.add_trace(go.Scatter(x=steps, y=[r.get(term) for r in train], name=term, mode="lines+markers",
                                 marker=dict(size=4)), row=1, col=1)
    if val:
        fig.add_trace(go.Scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name="val_loss",
                                 mode="lines+markers", line=dict(dash="dash", color="black"), marker=dict(size=6)),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=[r.get("gap") for r in train], name="gap", mode="lines+markers",
                             line=dict(color="#9467bd"), marker=dict(size=4), showlegend=False), row=1, col=2)
    _log_layout(fig, title)
    return fig


# ------------------------------------------------------------------------------------- tables
def _bars(columns: Sequence[str], table, *, title: str, yaxis: str, colours: Mapping[str, str] | None = None,
          height: int = 420, text_fmt: str = ".1f") -> go.Figure:
    colours = colours or model_colours(list(table.index))
    fig = go.Figure()
    for model in table.index:
        vals = [float(table.loc[model, c]) for c in table.columns]
        fig.add_trace(go.Bar(name=str(model), x=list(columns), y=vals, marker_color=colours.get(model),
                             text=[format(v, text_fmt) for v in vals], textposition="outside",
                             textfont=dict(size=9)))
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, template=TEMPLATE, height=height,
                      width=max(700, 40 * len(columns) * max(1, len(table.index)) + 150),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
                      margin=dict(l=60, r=20, t=90, b=120))
    fig.update_xaxes(tickangle=-40)
    return fig


def zero_shot_figure(table, *, title: str = "Zero-shot top-1 accuracy (%)") -> go.Figure:
    """Grouped bars of the Table-1 frame (rows: models; columns: tasks and 'average')."""
    return _bars([str(c) for c in table.columns], table, title=title, yaxis="top-1 (%)")


def _flat(col) -> str:
    return " ".join(str(c) for c in col) if isinstance(col, tuple) else str(col)


def retrieval_figure(table, *, title: str = "Retrieval recall (%)") -> go.Figure:
    """Grouped bars of the Table-2 frame (columns: (dataset, t2i/i2t, R@k)); the dataset name is left
    out of the labels when there is only one."""
    cols = list(table.columns)
    one = len({c[0] for c in cols if isinstance(c, tuple)}) <= 1
    labels = [" ".join(str(x) for x in c[1:]) if one and isinstance(c, tuple) else _flat(c) for c in cols]
    labels = [lab.replace("t2i", "text→image").replace("i2t", "image→text") for lab in labels]
    return _bars(labels, table, title=title, yaxis="recall (%)")


GEOMETRY_METRICS = {"gap_l2": "modality gap ‖Δ‖", "alignment": "alignment (lower: closer pairs)",
                    "uniformity_rbf": "uniformity E exp(-2‖u−v‖²) (lower: more uniform)",
                    "uniformity_log": "uniformity log E exp(-2‖u−v‖²)", "gap_mse": "gap ‖Δ‖²/d"}


def geometry_figure(table, *, metrics: Sequence[str] = ("gap_l2", "alignment", "uniformity_rbf"),
                    title: str = "Feature geometry") -> go.Figure:
    """One bar chart per metric of the Table-3 frame (columns: (dataset, metric)), bars per model and data set."""
    cols = list(table.columns)
    datasets = list(dict.fromkeys(c[0] for c in cols))
    colours = model_colours(list(table.index))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[GEOMETRY_METRICS.get(m, m) for m in metrics],
                        horizontal_spacing=0.08)
    for j, metric in enumerate(metrics, start=1):
        for model in table.index:
            ys = [float(table.loc[model, (ds, metric)]) for ds in datasets if (ds, metric) in table.columns]
            fig.add_trace(go.Bar(name=str(model), x=[ds for ds in datasets if (ds, metric) in table.columns], y=ys,
                                 marker_color=colours[model], showlegend=j == 1, legendgroup=str(model),
                                 text=[f"{v:.3f}" for v in ys], textposition="outside", textfont=dict(size=9)),
                          row=1, col=j)
    fig.update_layout(barmode="group", title=title, template=TEMPLATE, height=420, width=max(900, 320 * len(metrics)),
                      legend=dict(orientation="h", y=-0.15), margin=dict(l=50, r=20, t=90, b=80))
    fig.update_annotations(font_size=12)
    return fig


def gap_shift_figure(curves: Mapping[str, Sequence[Mapping]], *, title: str = "Shifting features along the gap") -> go.Figure:
    """Liang et al.'s gap-shift experiment: gap, zero-shot top-1 and R@1 against the shift λ, per model."""
    panels = (("gap_l2", "gap ‖Δ‖"), ("zero_shot_top1", "zero-shot top-1 (%)"), ("t2i_R@1", "text→image R@1 (%)"),
              ("i2t_R@1", "image→text R@1 (%)"))
    colours = model_colours(list(curves))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels], horizontal_spacing=0.07)
    for j, (key, _) in enumerate(panels, start=1):
        for label, rows in curves.items():
            scale = 1.0 if key == "gap_l2" else 100.0
            fig.add_trace(go.Scatter(x=[r["lambda"] for r in rows], y=[scale * r[key] for r in rows], name=label,
                                     mode="lines+markers", line=dict(color=colours[label]), legendgroup=label,
                                     showlegend=j == 1), row=1, col=j)
        fig.update_xaxes(title_text="λ (shift along the gap)", row=1, col=j)
    fig.update_layout(title=title, template=TEMPLATE, height=380, width=1200, legend=dict(orientation="h", y=-0.25),
                      margin=dict(l=50, r=20, t=80, b=90))
    return fig


# ---------------------------------------------------------------------------------- projections
def projection_figure(frame, *, color: str = "modality", title: str | None = None, marker_size: int = 5) -> go.Figure:
    """Scatter of a :func:`clip_refine_lab.evaluation.projections.projection_frame` (2D or 3D: a ``z`` column), one
    panel per model, coloured by ``modality`` or ``class`` (texts drawn as diamonds/crosses)."""
    import plotly.express as px

    models = list(dict.fromkeys(frame["model"]))
    three_d = "z" in frame.columns
    specs = [[{"type": "scene"} if three_d else {"type": "xy"} for _ in models]]
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, specs=specs, horizontal_spacing=0.05)
    groups = list(dict.fromkeys(frame[color].astype(str)))
    palette = (["#1f77b4", "#ff7f0e"] if color == "modality" else
               (px.colors.qualitative.Plotly if len(groups) <= 10 else px.colors.qualitative.Dark24 + px.colors.qualitative.Light24))
    colours = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    symbols2d = {"image": "circle", "text": "diamond"}
    symbols3d = {"image": "circle", "text": "diamond"}
    for j, model in enumerate(models, start=1):
        sub = frame[frame["model"] == model]
        for g in groups:
            for modality in ("image", "text"):
                part = sub[(sub[color].astype(str) == g) & (sub["modality"] == modality)]
                if part.empty:
                    continue
                name = g if color == "modality" else f"{g} ({modality})"
                common = dict(name=name, legendgroup=name, showlegend=j == 1, text=part["item"],
                              hovertemplate="%{text}<extra>" + name + "</extra>")
                if three_d:
                    fig.add_trace(go.Scatter3d(x=part["x"], y=part["y"], z=part["z"], mode="markers",
                                               marker=dict(size=max(2, marker_size - 2), color=colours[g],
                                                           symbol=symbols3d[modality], opacity=0.8), **common),
                                  row=1, col=j)
                else:
                    fig.add_trace(go.Scatter(x=part["x"], y=part["y"], mode="markers",
                                             marker=dict(size=marker_size + (2 if modality == "text" else 0),
                                                         color=colours[g], symbol=symbols2d[modality], opacity=0.8,
                                                         line=dict(width=1 if modality == "text" else 0, color="black")),
                                             **common), row=1, col=j)
    fig.update_layout(title=title, template=TEMPLATE, height=480 if three_d else 440, width=1000,
                      margin=dict(l=30, r=20, t=70, b=30), legend=dict(itemsizing="constant", font=dict(size=10)),
                      showlegend=len(groups) <= 40)
    return fig
