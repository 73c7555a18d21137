"""Regime statistics (metrics.regime_statistics, clip_refine_lab.regime), the named embedded bases
(``embedded:NAME``) and the logit scale's own learning rate."""

import json
import math
from pathlib import Path

import pytest
import torch

from clip_refine_lab import metrics as M
from clip_refine_lab.config import ConfigError, RunConfig

VECTORS = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())["cases"]


# ------------------------------------------------------------------------------ the statistics
@pytest.mark.parametrize("case_index", range(len(VECTORS)))
def test_regime_statistics_reproduce_the_reference_geometry(case_index):
    case = VECTORS[case_index]
    image = torch.tensor(case["student_image"], dtype=torch.float64)
    text = torch.tensor(case["student_text"], dtype=torch.float64)
    stats = M.regime_statistics(image, text, logit_scale=14.3)
    for key in ("gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf"):
        assert stats[key] == pytest.approx(case["metrics"][key], rel=1e-9), key


def test_regime_norms_and_the_ratio_to_the_scale_by_hand():
    # image rows of norm 3 and 5, text rows of norm 2 and 4: means 4 and 3, product 12; scale 100 -> 0.12
    image = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    stats = M.regime_statistics(image, text, logit_scale=100.0)
    assert stats["image_norm"] == pytest.approx(4.0)
    assert stats["text_norm"] == pytest.approx(3.0)
    assert stats["norm_product"] == pytest.approx(12.0)
    assert stats["norm_product_over_scale"] == pytest.approx(0.12)
    assert stats["logit_scale"] == 100.0
    # same directions in both modalities: no gap, perfect alignment
    assert stats["gap_l2"] == pytest.approx(0.0, abs=1e-7) and stats["alignment"] == pytest.approx(0.0, abs=1e-7)


def test_regime_statistics_refuse_unpaired_rows_and_a_bad_scale():
    with pytest.raises(ValueError, match="logit_scale"):
        M.regime_statistics(torch.ones(3, 4), torch.ones(3, 4), logit_scale=0.0)
    with pytest.raises(ValueError):
        M.regime_statistics(torch.ones(3, 4), torch.ones(2, 4), logit_scale=10.0)


def test_report_puts_the_reference_beside_and_leaves_unpublished_figures_blank():
    from clip_refine_lab.regime import REAL_VIT_B32_COCO, format_regime, regime_rows, within_band

    stats = M.regime_statistics(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)),
                                torch.randn(20, 8, generator=torch.Generator().manual_seed(1)), logit_scale=14.3)
    rows = {r["statistic"]: r for r in regime_rows({"mine": stats}, reference_name="real")}
    assert rows["logit scale"] == {"statistic": "logit scale", "mine": "14.3", "real": "100.0"}
    # the paper prints ||delta||^2/d times 1e3 (1.3345 for ViT-B/32)
    assert rows["‖Δ‖²/d (×10³)"]["real"] == "1.3345"
    assert rows["‖Δ‖²/d (×10³)"]["mine"] == format(1e3 * stats["gap_mse"], ".4f")
    assert rows["mean raw image norm"]["real"] == "" and rows["uniformity (log)"]["real"] == ""
    assert REAL_VIT_B32_COCO["gap_l2"] == pytest.approx(0.83, abs=0.005)
    text = format_regime({"mine": stats})
    assert "real ViT-B/32 (COCO)" in text and "‖f_I‖·‖f_T‖ / logit scale" in text
    assert within_band(0.9, 0.83) and not within_band(1.10, 0.83) and within_band(0.0675, 0.09)


def test_model_regime_needs_a_caption_set(micro_world, micro_base):
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.regime import model_regime

    loaded = load_model(str(micro_base))
    stats = model_regime(loaded, micro_world.manifest("synthetic-retrieval"))
    assert stats["logit_scale"] == pytest.approx(float(loaded.model.logit_scale.detach().exp()))
    with pytest.raises(ConfigError, match=r"shape\.yaml.*kind 'classification'.*caption set"):
        model_regime(loaded, micro_world.manifest("shape"))


# ------------------------------------------------------------------------------ the base's summary and the CLI
def test_base_summary_prints_its_regime_beside_real_clip(micro_base):
    from clip_refine_lab.embedded.pretrain import format_summary

    summary = json.loads(micro_base.with_suffix(".json").read_text())
    assert summary["regime"]["logit_scale"] == pytest.approx(summary["logit_scale"], rel=1e-6)
    text = format_summary(summary)
    assert "regime statistics on synthetic-retrieval" in text and "real ViT-B/32 (COCO)" in text


def test_cli_regime_of_a_model_and_its_errors(micro_base, capsys):
    from clip_refine_lab.cli import main

    assert main(["regime", "--model", "micro-vit-32", "--pretrained", str(micro_base), "--preset", "micro"]) == 0
    out = capsys.readouterr().out
    assert "synthetic-retrieval" in out and "logit scale" in out and "real ViT-B/32 (COCO)" in out
    assert main(["regime", "--model", "micro-vit-32", "--preset", "micro", "--data", "shape"]) == 2
    assert "kind 'classification'" in capsys.readouterr().err
    assert main(["regime", "--preset", "micro"]) == 2
    assert "got neither" in capsys.readouterr().err


# ------------------------------------------------------------------------------ named bases
def test_embedded_tags():
    from clip_refine_lab.models.loading import embedded_base, is_embedded

    assert is_embedded("embedded") and is_embedded("embedded:high-temperature")
    assert not is_embedded("openai") and not is_embedded(None) and not is_embedded("embedded.pt")
    assert embedded_base("embedded") is None and embedded_base("embedded:high-temperature") == "high-temperature"
    assert embedded_base("openai") is None


def test_named_bases_have_their_own_cache_files():
    from clip_refine_lab.embedded.pretrain import BASE_RECIPES, DEFAULT_BASES, base_checkpoint_path, base_recipe

    assert base_recipe(None, "default") == ("converged", BASE_RECIPES["converged"])
    assert base_recipe(None, "micro")[0] == DEFAULT_BASES["micro"]
    default = base_checkpoint_path(world_preset="default")
    assert default == base_checkpoint_path(world_preset="default", base="converged")
    assert default != base_checkpoint_path(world_preset="default", base="high-temperature")
    with pytest.raises(ConfigError, match="unknown embedded base 'nope'.*converged, high-temperature"):
        base_recipe("nope")


def test_converged_base_starts_its_scale_at_the_cap_and_the_other_does_not():
    from clip_refine_lab.embedded.pretrain import BASE_RECIPES

    converged, hot = BASE_RECIPES["converged"], BASE_RECIPES["high-temperature"]
    assert (converged.logit_scale_init or 0) >= 90 or (converged.logit_scale_lr_factor or 0) >= 20
    assert hot.logit_scale_init is None and hot.logit_scale_lr_factor is None


def test_an_unbuilt_named_base_says_how_to_build_it(tmp_path, monkeypatch):
    from clip_refine_lab.embedded.base import resolve_pretrained
    from clip_refine_lab.models.loading import ModelNotAvailableError

    monkeypatch.setenv("CLIP_REFINE_LAB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="--base high-temperature"):
        resolve_pretrained("tiny-vit-48", "embedded:high-temperature", "default")


def test_a_run_from_an_unknown_base_is_refused_before_work(tmp_path):
    from clip_refine_lab.training.preflight import check_run

    cfg = RunConfig(preset="micro", pretrained="embedded:nope", output_dir=str(tmp_path), run_name="x")
    with pytest.raises(ConfigError, match="unknown embedded base 'nope'"):
        check_run(cfg.resolved())
    assert not (tmp_path / "x").exists()


def test_sweep_prepares_each_named_base_once():
    from clip_refine_lab.sweep.plan import PlannedRun
    from clip_refine_lab.sweep.runner import _base_models

    runs = [PlannedRun("b", "none", f"r{i}", 0, f"r{i}", {}, RunConfig(preset="micro", pretrained=pretrained))
            for i, pretrained in enumerate(("embedded", "embedded:high-temperature", "embedded", "openai"))]
    assert _base_models(runs) == [("micro-vit-32", "micro", None), ("micro-vit-32", "micro", "high-temperature")]


# ------------------------------------------------------------------------------ the logit scale's learning rate
def test_logit_scale_gets_its_own_rate_and_no_decay():
    from clip_refine_lab.optim import build_adamw, set_lr

    model = torch.nn.Linear(4, 4)
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                      exclude_gains=True, device=torch.device("cpu"), logit_scale_lr_factor=50.0)
    own = [g for g in opt.param_groups if any(p is model.logit_scale for p in g["params"])]
    assert len(own) == 1 and own[0]["weight_decay"] == 0.0 and own[0]["lr"] == pytest.approx(5e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3  # weight, bias, scale: each once
    set_lr(opt, 2e-4)
    assert own[0]["lr"] == pytest.approx(1e-2)
    assert all(g["lr"] == pytest.approx(2e-4) for g in opt.param_groups if g is not own[0])
    # without the factor the scale is an ordinary no-decay parameter at the base rate
    plain = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                        exclude_gains=True, device=torch.device("cpu"))
    assert len(plain.param_groups) == 2 and all(g["lr"] == 1e-3 for g in plain.param_groups)


# ------------------------------------------------------------------------------ notebook 09's helpers
def test_notebook_compares_the_preset_base_with_the_other_regime(micro_world, tmp_path):
    from clip_refine_lab.ui.regimes import caption_set, comparison_bases, regime_frame

    assert comparison_bases(None, "default") == ["converged", "high-temperature"]
    assert comparison_bases(None, "micro") == ["micro", "converged"]
    assert comparison_bases(["high-temperature"], "default") == ["high-temperature"]
    with pytest.raises(ConfigError, match="unknown embedded base 'hot'"):
        comparison_bases(["converged", "hot"], "default")
    assert caption_set(None, "micro") == micro_world.manifest("synthetic-retrieval")
    with pytest.raises(FileNotFoundError, match="dataset: manifest not found"):
        caption_set(str(tmp_path / "none.yaml"), "micro")
    stats = M.regime_statistics(torch.eye(4), torch.eye(4) + 0.1, logit_scale=50.0)
    frame = regime_frame({"a": stats})
    assert frame.loc["logit scale", "a"] == "50.0" and frame.loc["logit scale"].iloc[-1] == "100.0"
