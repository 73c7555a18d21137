"""clip_refine_lab.plots (figure builders, PNG export), clip_refine_lab.ui.live.LivePlot and
clip_refine_lab.evaluation.projections."""

import base64
import io
import os
import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from clip_refine_lab import plots
from clip_refine_lab.features import FeatureSet
from clip_refine_lab.ui.live import LivePlot

TRAIN = [{"kind": "train", "step": s, "epoch": 0, "lr": 1e-4, "rafa": 2.0 / s, "hycd": 1.0 / s, "loss": 3.0 / s,
          "gap": 1.5 - 0.1 * s, "image_norm": 5.0, "text_norm": 6.0, "logit_scale": 14.0, "pairs_per_s": 30.0}
         for s in range(1, 5)]
VAL = [{"kind": "val", "step": 0, "val_loss": 3.5, "best": True}, {"kind": "val", "step": 4, "val_loss": 2.0, "best": True}]


def png_size(uri_or_bytes) -> tuple[int, int]:
    data = uri_or_bytes
    if isinstance(data, str):
        assert data.startswith("data:image/png;base64,")
        data = base64.b64decode(data.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).size


def rgb(size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- images
def test_thumbnail_uri_scales_to_the_long_side(tmp_path):
    assert png_size(plots.thumbnail_uri(rgb(32), 96)) == (96, 96)
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((50, 200, 3), np.uint8)).save(path)
    assert png_size(plots.thumbnail_uri(path, 100)) == (100, 25)
    assert png_size(plots.thumbnail_uri(Image.fromarray(rgb(300)), 64)) == (64, 64)


def test_image_grid_layout():
    items = [{"image": rgb(seed=i), "caption": f"caption number {i} " * 3, "border": "#2ca02c" if i % 2 else None}
             for i in range(7)]
    fig = plots.image_grid(items, ncols=3, thumb=64, title="grid", row_titles=["a", "b", "c"])
    assert sum(isinstance(t, go.Image) for t in fig.data) == 7
    assert len(fig.layout.shapes) == 3  # one border per odd item
    texts = [a.text for a in fig.layout.annotations]
    assert sum("caption number" in t for t in texts) == 7 and "<b>a</b>" in texts
    # every image sits inside the figure, rows do not overlap
    doms = [(fig.layout[f"yaxis{'' if i == 0 else i + 1}"].domain) for i in range(7)]
    assert all(0 <= lo < hi <= 1 for lo, hi in doms)
    assert doms[0][0] > doms[3][1]  # row 1 above row 2
    assert fig.layout.width == 3 * (max(64, 6 * 22) + 20) + 20


def test_image_grid_empty():
    fig = plots.image_grid([], title="nothing")
    assert not fig.data and "nothing to show" in fig.layout.annotations[0].text


def test_galleries():
    cases = [{"task": "shape", "image": rgb(), "true": "circle", "base_pred": "star", "refined_pred": "circle"},
             {"task": "colour", "image": rgb(seed=1), "true": "red", "base_pred": "red", "refined_pred": "blue"}]
    fig = plots.failure_gallery(cases, title="flips")
    assert [s.line.color for s in fig.layout.shapes] == [plots.HIT_COLOUR, plots.MISS_COLOUR]
    assert "true: circle" in fig.layout.annotations[0].text.replace("<br>", "\n")
    ex = [{"query": "a red circle", "target": "x", "results": {
        "pre-trained": [{"image": rgb(seed=k), "hit": k == 1} for k in range(3)],
        "run": [{"image": rgb(seed=k), "hit": k == 0} for k in range(3)]}}]
    fig = plots.retrieval_gallery(ex)
    assert sum(isinstance(t, go.Image) for t in fig.data) == 6
    assert len(fig.layout.shapes) == 2
    assert any("pre-trained: “a red circle”" in a.text for a in fig.layout.annotations)


# ------------------------------------------------------------------------------------ training log
def test_loss_terms_and_figure():
    assert plots.loss_terms(TRAIN) == ["loss", "rafa", "hycd"]
    fig = plots.loss_figure(TRAIN, VAL)
    names = [t.name for t in fig.data]
    assert names == ["loss", "rafa", "hycd", "val_loss", "gap"]
    assert list(fig.data[0].x) == [1, 2, 3, 4] and fig.data[-1].xaxis == "x2"
    assert list(fig.data[3].y) == [3.5, 2.0]
    empty = plots.loss_figure([])
    assert [t.name for t in empty.data] == ["gap"]


def test_live_plot_static_where_widgets_do_not_render(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIP_REFINE_LAB_PROGRESS", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    lp = LivePlot(live=True)
    assert not lp.live
    for r in TRAIN[:2] + VAL[:1]:
        lp(r)
    fig = lp.finish(display=False)
    assert [t.name for t in fig.data] == ["loss", "rafa", "hycd", "val_loss", "gap"]
    assert "(live)" not in (fig.layout.title.text or "")
    # from a run directory's log (a finished run calls nothing back)
    (tmp_path / "log.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in TRAIN + VAL))
    fig = LivePlot(live=False).finish(tmp_path, display=False)
    assert len(fig.data[0].x) == 4


def test_live_plot_updates_a_figure_widget(monkeypatch):
    pytest.importorskip("anywidget")
    monkeypatch.delenv("CLIP_REFINE_LAB_PROGRESS", raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", "02_refine.ipynb")
    lp = LivePlot(live=True, min_interval=0.0)
    assert lp.live and isinstance(lp.widget, go.FigureWidget)
    for r in TRAIN:
        lp(r)
    lp(VAL[0])
    names = [t.name for t in lp.widget.data]
    assert names == ["loss", "rafa", "hycd", "val_loss", "gap"]
    assert list(lp.widget.data[0].y) == pytest.approx([r["loss"] for r in TRAIN])
    assert LivePlot(live=False).widget is None


# --------------------------------------------------------------------------------------- tables
def tables():
    zs = pd.DataFrame({"shape": [10.0, 20.0], "colour": [30.0, 35.0]}, index=["pre-trained", "run-a"])
    zs["average"] = zs.mean(axis=1)
    cols = pd.MultiIndex.from_tuples([("ret", d, f"R@{k}") for d in ("t2i", "i2t") for k in (1, 5, 10)])
    ret = pd.DataFrame(np.arange(12.0).reshape(2, 6), index=zs.index, columns=cols)
    gcols = pd.MultiIndex.from_tuples([("ret", m) for m in ("gap_l2", "gap_mse", "alignment", "uniformity_log",
                                                             "uniformity_rbf")])
    geo = pd.DataFrame(np.random.default_rng(0).random((2, 5)), index=zs.index, columns=gcols)
    return zs, ret, geo


def test_table_figures():
    zs, ret, geo = tables()
    fig = plots.zero_shot_figure(zs)
    assert [t.name for t in fig.data] == ["pre-trained", "run-a"]
    assert list(fig.data[0].x) == ["shape", "colour", "average"]
    assert fig.data[0].marker.color == plots.BASE_COLOUR
    fig = plots.retrieval_figure(ret)
    assert list(fig.data[1].x)[0] == "text→image R@1" and list(fig.data[1].y) == list(ret.iloc[1])
    fig = plots.geometry_figure(geo)
    assert len(fig.data) == 6  # 3 metrics x 2 models
    assert fig.data[0].y[0] == pytest.approx(geo.loc["pre-trained", ("ret", "gap_l2")])
    curves = {m: [{"lambda": lam, "gap_l2": 1 - lam / 2, "zero_shot_top1": 0.5, "t2i_R@1": 0.1, "i2t_R@1": 0.2}
                  for lam in (0.0, 0.5, 1.0)] for m in ("pre-trained", "run-a")}
    fig = plots.gap_shift_figure(curves)
    assert len(fig.data) == 8 and list(fig.data[2].y) == [50.0, 50.0, 50.0]


def test_model_colours():
    c = plots.model_colours(["pre-trained", "a", "b", "chance"])
    assert c["pre-trained"] == plots.BASE_COLOUR and c["chance"] == plots.CHANCE_COLOUR
    assert c["a"] != c["b"]


# ----------------------------------------------------------------------------------- projections
def feature_sets():
    g = torch.Generator().manual_seed(0)
    cls = FeatureSet("toy", "classification", torch.randn(40, 16, generator=g), torch.randn(4, 3, 16, generator=g),
                     labels=torch.arange(40) % 4, classnames=["a", "b", "c", "d"])
    cap = FeatureSet("caps", "captions", torch.randn(20, 16, generator=g), torch.randn(40, 16, generator=g),
                     text_to_image=torch.arange(40) // 2)
    return cls, cap


def test_feature_points():
    from clip_refine_lab.evaluation.projections import feature_points

    cls, cap = feature_sets()
    x, meta = feature_points(cls, np.array([0, 5, 6]))
    assert x.shape == (3 + 12, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert list(meta["modality"]).count("text") == 12 and list(meta["class"][:3]) == ["a", "b", "c"]
    x, meta = feature_points(cap, np.array([1, 2]))
    assert x.shape == (4, 16)
    assert np.allclose(x[2], torch.nn.functional.normalize(cap.text[2], dim=0).numpy(), atol=1e-6)  # first caption of image 1
    assert list(meta["class"]) == ["pair 1", "pair 2", "pair 1", "pair 2"]


@pytest.mark.parametrize("method", ["pca", "umap"])
@pytest.mark.parametrize("dims", [2, 3])
def test_projection_frame_and_figure(method, dims):
    from clip_refine_lab.evaluation.projections import projection_frame

    cls, _ = feature_sets()
    frame = projection_frame({"pre-trained": cls, "run": cls}, method=method, dims=dims, sample_size=25,
                             n_neighbors=5, seed=0)
    assert len(frame) == 2 * (25 + 12)
    assert ("z" in frame.columns) == (dims == 3)
    assert np.isfinite(frame[["x", "y"]].to_numpy()).all()
    again = projection_frame({"pre-trained": cls}, method=method, dims=dims, sample_size=25, n_neighbors=5, seed=0)
    assert np.allclose(again[["x", "y"]].to_numpy(), frame[frame.model == "pre-trained"][["x", "y"]].to_numpy())
    fig = plots.projection_figure(frame, color="class")
    trace_type = go.Scatter3d if dims == 3 else go.Scatter
    assert all(isinstance(t, trace_type) for t in fig.data)
    assert sum(len(t.x) for t in fig.data) == len(frame)
    assert len(plots.projection_figure(frame, color="modality").data) == 4  # 2 models x 2 modalities


def test_project_rejects_bad_arguments():
    from clip_refine_lab.evaluation.projections import project

    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError, match="method must be one of pca, umap"):
        project(x, "tsne")
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        project(x, "pca", 4)
    with pytest.raises(ValueError, match="at least 4 points"):
        project(x[:3], "pca", 2)


# ---------------------------------------------------------------------------------------- export
def _have_browser() -> bool:
    return bool(os.environ.get("BROWSER_PATH") or any(shutil.which(n) for n in ("chromium", "chromium-browser",
                                                                                   "google-chrome", "chrome")))


@pytest.mark.skipif(not _have_browser(), reason="PNG export needs Chromium: apt-get install -y chromium")
def test_save_png_writes_a_png(tmp_path):
    fig = plots.image_grid([{"image": rgb(), "caption": "a caption"}], thumb=48, title="t")
    fig.add_annotation(text="x", x=0, y=0, showarrow=False)
    path = plots.save_png(fig, tmp_path / "sub" / "grid.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_size(data) == (fig.layout.width, fig.layout.height)
    path = plots.save_png(plots.loss_figure(TRAIN), tmp_path / "loss.png", width=300, height=200, scale=2)
    assert png_size(path.read_bytes()) == (600, 400)


def test_save_png_failure_names_the_fix(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("no chrome here")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        plots.save_png(go.Figure(), tmp_path / "x.png")
