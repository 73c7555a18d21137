"""The embedded base model: its recipe, its cache key, and that a cached base is loaded, not re-trained."""

import json
from dataclasses import replace

import pytest

from clip_refine_lab.embedded.pretrain import BASE_RECIPES, PretrainRecipe, base_checkpoint_path, pretrain_base


def test_base_summary_records_the_recipe_and_its_hard_negatives(micro_base):
    summary = json.loads(micro_base.with_suffix(".json").read_text())
    assert summary["recipe"]["object_order_hard_negatives"] is True
    # the micro world has two-object scenes with relation captions, so some captions got a swapped negative
    assert 0 < summary["hard_negative_fraction"] < 0.5
    assert set(summary["zero_shot"]) and 0 <= summary["gap"]["gap_l2"] <= 2


def test_base_summary_reports_the_relation_probe_apart(micro_base):
    from clip_refine_lab.metrics import zero_shot_average
    from clip_refine_lab.embedded.pretrain import format_summary

    summary = json.loads(micro_base.with_suffix(".json").read_text())
    assert summary["zero_shot"]["relation"]["probe"] is True
    assert not any(r.get("probe") for t, r in summary["zero_shot"].items() if t != "relation")
    text = format_summary(summary)
    tasks, probes = text.split("compositional probes")
    assert "\nrelation " not in tasks and "\nrelation " in probes and "\nshape " in tasks
    average = zero_shot_average(summary["zero_shot"])
    assert f"{'average':<28}{100 * average:>7.1f}%" in tasks


def test_second_call_loads_instead_of_training(micro_base, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("pretrain_base trained again although the base is cached")

    monkeypatch.setattr("clip_refine_lab.models.loading.load_model", must_not_train)
    monkeypatch.setattr("clip_refine_lab.embedded.pretrain.build_world", must_not_train)
    assert pretrain_base(world_preset="micro", progress=False) == micro_base


def test_both_presets_use_object_order_hard_negatives():
    # one recipe for the embedded base; the dataclass default stays plain CLIP (benchmarks build recipes bare)
    assert all(r.object_order_hard_negatives for r in BASE_RECIPES.values())
    assert not PretrainRecipe(epochs=1, batch_size=8, lr=1e-3).object_order_hard_negatives


@pytest.mark.parametrize("field,value", [("lr", 1e-4), ("object_order_hard_negatives", False), ("seed", 1)])
def test_recipe_changes_change_the_cache_key(field, value):
    default = BASE_RECIPES["micro"]
    assert base_checkpoint_path(world_preset="micro", recipe=replace(default, **{field: value})) != \
        base_checkpoint_path(world_preset="micro", recipe=default)


def test_switches_left_off_stay_out_of_the_key():
    # a newly added off switch must not invalidate bases cached before it existed
    plain = PretrainRecipe(epochs=6, batch_size=64, lr=2e-3, warmup_steps=10)
    assert base_checkpoint_path(world_preset="micro", recipe=replace(plain, relation_hard_negatives=False)) == \
        base_checkpoint_path(world_preset="micro", recipe=plain)
    assert base_checkpoint_path(world_preset="micro") == base_checkpoint_path(world_preset="micro", recipe=BASE_RECIPES["micro"])


def test_relation_axis_negatives_add_to_the_object_order_ones(micro_base):
    recipe = replace(BASE_RECIPES["micro"], epochs=1, relation_axis_hard_negatives=True)
    path = pretrain_base(world_preset="micro", recipe=recipe, progress=False)
    both = json.loads(path.with_suffix(".json").read_text())
    plain = json.loads(micro_base.with_suffix(".json").read_text())
    assert both["recipe"]["relation_axis_hard_negatives"] is True
    # every object-order negative is still there, plus one per caption whose scene has all objects in one row
    # (or column); an axis negative needs the same caption form as an object-order one, so the captions that
    # have negatives are the same
    assert both["hard_negatives"] > plain["hard_negatives"] >= 1
    assert both["hard_negative_fraction"] == plain["hard_negative_fraction"]


def test_pretraining_from_random_weights_does_not_warn_about_them(micro_world, caplog):
    # open_clip warns "Model initialized randomly" on every random build; here that is the point, and a
    # warning in the pretrain output would read as a failed load of the user's weights
    recipe = replace(BASE_RECIPES["micro"], epochs=1, seed=7)  # a key of its own: this call trains
    with caplog.at_level("WARNING"):
        pretrain_base(world_preset="micro", recipe=recipe, progress=False)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
