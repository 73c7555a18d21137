"""The sweep figures (plotly): the swept value against the headline metrics, the loss-weight heatmap,
and a bar chart of each main table."""

from __future__ import annotations

import math

from .spec import PRETRAINED, Block, SweepSpec, number_text, read_saved_spec
from .tables import Tables, summary_metrics

#: Default x axis of the sweep figures, per table kind.
DEFAULT_X = {"alpha": "alpha", "batch": "batch_size", "epochs": "epochs", "weights": "hycd_weight"}
#: Fields that change with the x value but are not a series of their own (gradient accumulation).
NOT_SERIES = {"accum_steps"}


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
    metrics = [(c, name) for c, name in summary_metrics(sub) if c.startswith(("zs:", "ret:"))][:3]
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
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"  # no spread to show from one
    fig.update_layout(title=f"{title}: {seeds}",
                      template=TEMPLATE, height=400, width=max(900, 330 * len(metrics)),
                      legend=dict(orientation="h", y=-0.25), margin=dict(l=50, r=20, t=80, b=100))
    return fig


def _weights_figure(tables: Tables, block: str):
    import plotly.graph_objects as go

    from ..plots import TEMPLATE

    if block not in tables.mean or tables.meta.get(block, {}).get("kind") != "weights":
        return None
    mean, text = tables.mean[block], tables[block]
    fig = go.Figure(go.Heatmap(z=mean.values, x=[number_text(c) for c in mean.columns],
                               y=[number_text(i) for i in mean.index],
                               text=text.values, texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title="zero-shot<br>avg (%)")))
    base = tables.base
    models = list(dict.fromkeys(tables.runs[tables.runs["block"] == block]["model"]))
    note = ""
    if base is not None and len(models) == 1 and (block, models[0]) in base.index and "zs:average" in base.columns:
        note = f" (pre-trained: {base.loc[(block, models[0]), 'zs:average']:.2f})"
    fig.update_layout(title=f"Loss weights: zero-shot avg (%){note}", xaxis_title="λ_HyCD", yaxis_title="λ_RaFA",
                      template=TEMPLATE, height=450, width=600)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def _main_figure(tables: Tables, block: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..plots import TEMPLATE, model_colours

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
    fig.update_layout(title=f"{block}: mean ± std over seeds", template=TEMPLATE, height=420,
                      width=max(900, 330 * len(panels)), margin=dict(l=50, r=20, t=80, b=120))
    fig.update_xaxes(tickangle=-40)
    return fig


def figures(tables: Tables, spec: SweepSpec | None = None) -> dict:
    """Plotly figures: ``<block>`` of each alpha/batch/epochs block (mean ± std against the swept value,
    one line per series, the starting model dashed), the loss-weight heatmap, and a bar chart of each
    main block."""
    if spec is None and tables.sweep_dir is not None:
        spec = read_saved_spec(tables.sweep_dir)
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
