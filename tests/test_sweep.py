"""Sweeps: spec validation, grid expansion and naming, skip/resume, aggregation math, a tiny end-to-end run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from clip_refine_lab import sweep as sw
from clip_refine_lab.sweep.runner import scene_matches
from clip_refine_lab.sweep.spec import _data_ref, spec_for_saving
from clip_refine_lab.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def spec_of(blocks, **top):
    return sw.parse_spec({"preset": "micro", "seeds": [0, 1], "blocks": blocks, **top})


# ------------------------------------------------------------------------------ grid and naming
def test_grid_expansion_and_names(tmp_path):
    spec = spec_of({
        "main": {"table": "main", "grid": {"method": ["contrastive", "clip-refine"]}},
        "batch": {"table": "batch", "seeds": [3],
                  "runs": [{"batch_size": 32}, {"batch_size": 64, "accum_steps": 2}],
                  "grid": {"method": ["contrastive", "clip-refine"]}},
        "weights": {"table": "weights", "grid": {"rafa_weight": [0.5, 1.0], "hycd_weight": [0.0, 1.0]}},
    }, base={"teacher_cache": True, "max_steps": 3})
    runs = sw.expand(spec, tmp_path)
    keys = [r.key for r in runs]
    assert keys[:4] == ["main/contrastive-s0", "main/clip-refine-s0", "main/contrastive-s1", "main/clip-refine-s1"]
    batch = [r for r in runs if r.block == "batch"]
    assert [r.run_name for r in batch] == ["contrastive-bs32-s3", "clip-refine-bs32-s3",
                                           "contrastive-bs64-acc2-s3", "clip-refine-bs64-acc2-s3"]
    assert batch[2].config.accum_steps == 2 and batch[2].config.batch_size == 64 and batch[2].config.seed == 3
    w = [r for r in runs if r.block == "weights"]
    assert len(w) == 8 and w[0].run_name == "rafa0.5-hycd0-s0"
    assert len(set(keys)) == len(keys) == 4 + 4 + 8
    r = runs[0]
    assert r.config.teacher_cache and r.config.max_steps == 3 and r.config.preset == "micro"
    assert r.run_dir == (tmp_path / "runs" / "main" / "contrastive-s0").absolute()
    assert r.label == "contrastive" and w[0].label == "rafa_weight=0.5, hycd_weight=0"
    # deterministic: a second expansion gives the same names and configs
    assert [x.config for x in sw.expand(spec, tmp_path)] == [x.config for x in runs]


def test_data_refs_and_labels(tmp_path):
    spec = spec_of({"data": {"table": "data", "seeds": [0], "runs": [
        {"data": "synthetic-coco"},
        {"data": {"split": "synthetic-web", "size": 300}},
        {"data": {"split": "synthetic-web", "keep_fraction": 0.5}, "label": "web, filtered"}]}})
    runs = sw.expand(spec, tmp_path)
    assert [r.name for r in runs] == ["synthetic-coco", "synthetic-web-n300", "synthetic-web-clip0.5"]
    assert runs[1].config.data == str((tmp_path / "data" / "synthetic-web-n300.yaml").absolute())
    assert runs[2].config.data.endswith("synthetic-web-clip0.5-micro-vit-32.yaml")  # filtered by its own base model
    assert runs[2].label == "web, filtered" and "first 300" in runs[1].label
    assert sw.planned_steps(runs[1]) == (300 - 3) // 32  # micro: batch 32, 1 epoch, 1% held out


def test_where_filter_writes_a_narrower_training_set(tmp_path, micro_world):
    from clip_refine_lab.data.manifest import load_manifest

    spec = spec_of({"narrow": {"table": "data", "seeds": [0], "runs": [
        {"data": {"split": "synthetic-coco", "where": {"colour": ["red", "green", "blue", "yellow"]}}},
        {"data": {"split": "synthetic-coco", "size": 10, "where": {"background": ["plain"]}}}]}})
    runs = sw.expand(spec, tmp_path)
    assert [r.name for r in runs] == ["synthetic-coco-colour-red+green+blue+yellow",
                                      "synthetic-coco-background-plain-n10"]
    assert runs[0].label == "synthetic-coco, colour in {red, green, blue, yellow}"
    assert sw.planned_steps(runs[0]) is None  # unknown until the filtered set is written
    kept = load_manifest(sw.prepare_data(runs[0])).records()
    full = load_manifest(micro_world.manifest("synthetic-coco")).records()
    expected = [r.id for r in full
                if all(o["colour"] in ("red", "green", "blue", "yellow") for o in r.meta["meta"]["objects"])]
    assert 0 < len(kept) < len(full) and [r.id for r in kept] == expected
    assert sw.planned_steps(runs[0]) == (len(kept) - round(0.01 * len(kept))) // 32
    plain = load_manifest(sw.prepare_data(runs[1])).records()
    assert len(plain) == 10 and all(r.meta["meta"]["background"] == "plain" for r in plain)


def test_where_position_keeps_scenes_whose_every_object_is_in_the_listed_cells():
    from clip_refine_lab.embedded.vocabulary import CELLS, POSITION_NAMES

    middle_row = ["middle left", "centre", "middle right"]
    assert [POSITION_NAMES[CELLS.index(c)] for c in ((1, 0), (1, 1), (1, 2))] == middle_row
    where = (("position", tuple(middle_row)),)
    assert scene_matches({"objects": [{"cell": [1, 0]}, {"cell": [1, 2]}]}, where)
    assert not scene_matches({"objects": [{"cell": [1, 1]}, {"cell": [0, 1]}]}, where)
    assert not scene_matches({"objects": [{"colour": "red"}]}, where)  # no cell recorded: not kept
    ref = _data_ref("x", {"split": "synthetic-coco", "where": {"position": middle_row}})
    assert ref.where == where and ref.label == "synthetic-coco, position in {middle left, centre, middle right}"


def test_saved_spec_with_where_filter_parses_again(tmp_path):
    """The sweep folder's spec.yaml (read back by notebook 08 and the tables) keeps 'where' a mapping."""
    spec = spec_of({"narrow": {"table": "data", "seeds": [0], "base": {
        "data": {"split": "synthetic-coco", "where": {"colour": ["red", "green"], "background": ["plain"]}}}}})
    saved = yaml.safe_load(yaml.safe_dump(spec_for_saving(spec), sort_keys=False))
    assert saved["blocks"]["narrow"]["base"]["data"]["where"] == {"colour": ["red", "green"], "background": ["plain"]}
    again = sw.parse_spec(saved)
    assert [r.name for r in sw.expand(again, tmp_path)] == [r.name for r in sw.expand(spec, tmp_path)]


@pytest.mark.parametrize("blocks, top, words", [
    ({"a": {"table": "alpha", "grid": {"alpah": [0.1]}}}, {}, ["block 'a'", "grid", "alpah", "did you mean 'alpha'"]),
    ({"a": {"table": "alpha", "grid": {"alpha": 0.1}}}, {}, ["block 'a'", "'alpha'", "non-empty list"]),
    ({"a": {"table": "alpha", "grid": {"alpha": [0.5, 1.5]}}}, {}, ["block 'a'", "alpha1.5", "alpha must be in [0, 1]"]),
    ({"a": {"table": "alpha", "grid": {"seed": [1, 2]}}}, {}, ["'seed'", "seeds"]),
    ({"a": {"table": "tabel", "grid": {"alpha": [0.5]}}}, {}, ["table must be one of", "tabel"]),
    ({"a": {"tabel": "main"}}, {}, ["block 'a'", "unknown key 'tabel'", "did you mean 'table'"]),
    ({"a": {"table": "main", "runs": [{"methd": "hycd"}]}}, {}, ["runs[0]", "methd", "did you mean 'method'"]),
    ({"a": {"table": "main", "runs": [{"method": "hycd"}], "grid": {"method": ["self-kd"]}}}, {},
     ["runs[0]", "'method' is set by both"]),
    ({"a": {"table": "main", "runs": [{"method": "hycd"}, {"method": "hycd"}]}}, {}, ["same name 'hycd'"]),
    ({"a": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "sise": 5}}]}}, {}, ["'data'", "sise"]),
    ({"a": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "where": {"colour": "red"}}}]}}, {},
     ["'where.colour'", "non-empty list"]),
    ({"a": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "where": {"colur": ["red"]}}}]}}, {},
     ["'where' key 'colur'", "did you mean 'colour'"]),
    ({"a": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "where": {"position": ["middle"]}}}]}}, {},
     ["'where.position' value 'middle'", "known: top left"]),
    ({"a": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "where": {"colour": ["gren"]}}}]}}, {},
     ["'where.colour' value 'gren'", "did you mean 'green'"]),
    ({"a": {"table": "main"}}, {"base": {"lr": -1.0}}, ["lr must be > 0"]),
    ({"a": {"table": "main"}}, {"base": {"bogus": 1}}, ["base", "unknown RunConfig field 'bogus'"]),
    ({"a": {"table": "main"}}, {"seeds": []}, ["'seeds'"]),
    ({"a": {"table": "main"}}, {"blokcs": {}}, ["unknown key 'blokcs'", "did you mean 'blocks'"]),
])
def test_spec_errors_name_the_field(blocks, top, words):
    with pytest.raises(sw.SweepError) as e:
        spec_of(blocks, **top)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_yaml_numbers_and_files(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("preset: micro\nbase: {lr: 1e-5}\nblocks:\n  lr:\n    table: none\n    grid: {lr: [1e-5, 3e-5]}\n")
    spec = sw.load_spec(path)
    assert spec.name == "s"
    assert [r.config.lr for r in sw.expand(spec, tmp_path)] == [1e-5, 3e-5]
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks:\n  x:\n    grid: {alpah: [1]}\n")
    with pytest.raises(sw.SweepError, match=r"bad.yaml: block 'x': grid: unknown RunConfig field 'alpah'"):
        sw.load_spec(bad)


def test_extends_reuses_another_specs_blocks_and_merges_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\npreset: micro\nseeds: [0, 1]\nbase: {lr: 1e-5, max_steps: 3}\n"
                                         "blocks:\n  a:\n    table: none\n    grid: {alpha: [0.25, 0.5]}\n"
                                         "  b:\n    table: none\n    grid: {alpha: [1.0]}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nname: child\nbase: {pretrained: embedded:high-temperature}\n"
                                        "blocks:\n  b:\n    table: none\n    grid: {alpha: [0.0]}\n")
    spec = sw.load_spec(tmp_path / "child.yaml")
    assert spec.name == "child" and spec.seeds == [0, 1] and spec.preset == "micro"
    assert spec.base == {"lr": 1e-5, "max_steps": 3, "pretrained": "embedded:high-temperature"}
    assert [b.name for b in spec.blocks] == ["a", "b"] and spec.blocks[1].grid == {"alpha": [0.0]}
    assert all(r.config.pretrained == "embedded:high-temperature" for r in sw.expand(spec, tmp_path))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nblocks: {}\n")
    with pytest.raises(sw.SweepError, match="a cycle"):
        sw.load_spec(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(sw.SweepError, match=r"orphan.yaml: extends: spec not found: .*nowhere.yaml"):
        sw.load_spec(tmp_path / "orphan.yaml")


def test_high_temperature_spec_is_paper_on_the_other_base(tmp_path):
    paper, hot = sw.load_spec(ROOT / "sweeps" / "paper.yaml"), sw.load_spec(ROOT / "sweeps" / "high-temperature.yaml")
    assert [b.name for b in hot.blocks] == [b.name for b in paper.blocks] and hot.seeds == paper.seeds
    assert hot.base == {**paper.base, "pretrained": "embedded:high-temperature"}
    assert sw.default_sweep_dir(hot) != sw.default_sweep_dir(paper)


def test_high_temperature_diagnostics_are_the_diagnostics_on_the_other_base():
    hot = sw.load_spec(ROOT / "sweeps" / "high-temperature.yaml")
    diag = sw.load_spec(ROOT / "sweeps" / "diagnostics.yaml")
    hot_diag = sw.load_spec(ROOT / "sweeps" / "high-temperature-diagnostics.yaml")
    assert [b.name for b in hot_diag.blocks] == [b.name for b in diag.blocks]
    assert hot_diag.base == {**diag.base, "pretrained": "embedded:high-temperature"}
    assert sw.default_sweep_dir(hot_diag) not in {sw.default_sweep_dir(diag), sw.default_sweep_dir(hot)}


@pytest.mark.parametrize("name", ["paper.yaml", "diagnostics.yaml", "quick.yaml", "embedded_defaults.yaml",
                                  "high-temperature.yaml", "high-temperature-diagnostics.yaml"])
def test_shipped_specs_are_valid(name, tmp_path):
    spec = sw.load_spec(ROOT / "sweeps" / name)
    runs = sw.expand(spec, tmp_path)
    assert len({r.key for r in runs}) == len(runs)
    assert all(r.config.teacher_cache and r.config.image_cache for r in runs)
    assert all(r.config.precision == "fp32" for r in runs)
    tables = {b.table for b in spec.blocks}
    if name == "paper.yaml":
        assert tables >= {"main", "prior", "alpha", "batch", "epochs", "weights", "data", "backbone"}
        main = [r for r in runs if r.table == "main"]
        assert {r.config.method for r in main} == {"contrastive", "m2-mix", "self-kd", "hycd", "hycd+l2", "clip-refine"}
        assert {r.seed for r in main} == {0, 1, 2}
        assert {r.config.model for r in runs if r.table == "backbone"} >= {"tiny-vit-deep-48", "tiny-rn-48"}
        big = [r for r in runs if r.table == "batch" and r.config.batch_size > 256]
        assert big and all(r.config.accum_steps > 1 for r in big)
        assert (sw.plan(spec, tmp_path).steps > 0).all()  # no filtered set: every step count known before running
    if name == "diagnostics.yaml":
        assert {b.name for b in spec.blocks} == {"lr", "narrow", "narrow-position"}
        plan = sw.plan(spec, tmp_path)
        # steps are known before running, except on sets filtered by scene attributes (known once written)
        filtered = [r.data_ref is not None and bool(r.data_ref.where) for r in runs]
        assert any(filtered) and plan.steps[filtered].isna().all()
        known = plan.steps[[not f for f in filtered]]
        assert known.notna().all() and (known > 0).all()


def test_identical_configs_are_shared_not_rerun(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {
        "main": {"table": "main", "grid": {"method": ["clip-refine"]}},
        "alpha": {"table": "alpha", "grid": {"alpha": [0.5, 1.0]}},  # alpha 0.5 is the default: the main run
        "other": {"table": "alpha", "suite": {"zero_shot": ["shape"]}, "grid": {"alpha": [0.5]}},  # other suite: own run
    }, seeds=(0,))
    by_key = {r.key: r for r in runs}
    assert by_key["alpha/alpha0.5-s0"].alias_of is by_key["main/clip-refine-s0"]
    assert by_key["alpha/alpha1-s0"].alias_of is None and by_key["other/alpha0.5-s0"].alias_of is None
    # --only keeps the link: the alias does its source run's work
    only = sw.expand(spec, sweep_dir, only=["alpha"])
    assert [r.key for r in only] == ["alpha/alpha0.5-s0", "alpha/alpha1-s0"] and only[0].source.block == "main"
    calls, suites = [], []

    def fake_refine(cfg, progress=True):
        calls.append(cfg.run_name)
        run = next(r for r in runs if r.run_dir == cfg.run_dir)
        _write_run(run, None)
        return run.run_dir

    def fake_eval(run_dir, suite=None, **kw):
        suites.append(suite)
        (Path(run_dir) / "metrics.json").write_text(json.dumps(_metrics(Path(run_dir).name, {"shape": 0.5}, 0.1, 1.0)))

    monkeypatch.setattr("clip_refine_lab.training.loop.refine", fake_refine)
    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.evaluate_run", fake_eval)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False)
    assert calls == ["clip-refine-s0", "alpha1-s0", "alpha0.5-s0"] and report.ok
    assert report.skipped == ["alpha/alpha0.5-s0"]
    assert suites[:2] == [None, None] and yaml.safe_load(suites[2].read_text())["zero_shot"] == ["shape"]
    assert sw.read_sweep_log(sweep_dir)[3] == {**sw.read_sweep_log(sweep_dir)[3], "event": "skipped", "shared_with": "main/clip-refine-s0"}
    assert list(report.tables.mean["alpha"].index) == ["pre-trained", "alpha=0.5", "alpha=1"]
    plan = sw.plan(spec, sweep_dir)
    shared = plan.set_index(["block", "run"]).shared_with
    assert shared[("alpha", "alpha0.5-s0")] == "main/clip-refine-s0" and shared.isna().sum() == 3


# ------------------------------------------------------------------------------ aggregation math
def _metrics(run_name: str, acc: dict, r1: float, gap: float) -> dict:
    def model(a, r, g):
        return {"zero_shot": {t: {"top1": v} for t, v in a.items()},
                "retrieval": {"synthetic-retrieval": {f"{d}_R@{k}": r * k for d in ("t2i", "i2t") for k in (1, 5, 10)}},
                "geometry": {"synthetic-retrieval": {"gap_l2": g, "gap_mse": g * g / 32, "alignment": 2 * g,
                                                     "uniformity_log": -g, "uniformity_rbf": g / 3}}}
    return {"models": {"pre-trained": model({"shape": 0.30, "colour": 0.50}, 0.05, 1.5), run_name: model(acc, r1, gap)}}


def _fake_sweep(tmp_path, blocks, seeds=(0, 1, 2)):
    spec = sw.parse_spec({"name": "t", "preset": "micro", "seeds": list(seeds), "blocks": blocks})
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec_for_saving(spec), sort_keys=False))
    return spec, sweep_dir, sw.expand(spec, sweep_dir)


def _write_run(run, metrics, finished=True):
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.config.resolved().to_yaml(run.run_dir / "config.yaml")
    if finished:
        (run.run_dir / "summary.json").write_text(json.dumps({"steps": 3, "train_pairs": 100}))
    if metrics is not None:
        (run.run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_aggregate_mean_std(tmp_path):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {
        "main": {"table": "main", "grid": {"method": ["clip-refine", "contrastive"]}},
        "alpha": {"table": "alpha", "grid": {"alpha": [0.0, 1.0]}},
        "weights": {"table": "weights", "seeds": [0], "grid": {"rafa_weight": [0.5, 1.0], "hycd_weight": [0.5, 1.0]}},
    })
    values = {}
    rng = np.random.default_rng(0)
    for r in runs:
        a = {"shape": float(rng.uniform(0.2, 0.6)), "colour": float(rng.uniform(0.2, 0.6))}
        r1, gap = float(rng.uniform(0.01, 0.1)), float(rng.uniform(0.5, 1.5))
        values[r.key] = (a, r1, gap)
        _write_run(r, _metrics(r.run_name, a, r1, gap))
    tables = sw.aggregate(sweep_dir)
    zs = tables.mean["main_zero_shot"]
    assert list(zs.index) == ["pre-trained", "contrastive", "clip-refine"]  # the paper's row order
    assert list(zs.columns) == ["shape", "colour", "average"]
    for method in ("clip-refine", "contrastive"):
        per_seed = [values[f"main/{method}-s{s}"] for s in (0, 1, 2)]
        shape = [100 * v[0]["shape"] for v in per_seed]
        avg = [100 * (v[0]["shape"] + v[0]["colour"]) / 2 for v in per_seed]
        assert zs.loc[method, "shape"] == pytest.approx(np.mean(shape))
        assert tables.std["main_zero_shot"].loc[method, "average"] == pytest.approx(np.std(avg, ddof=1))
        assert tables["main_zero_shot"].loc[method, "average"] == f"{np.mean(avg):.2f} ± {np.std(avg, ddof=1):.2f}"
        gaps = [v[2] for v in per_seed]
        assert tables.mean["main_geometry"].loc[method, ("synthetic-retrieval", "gap_l2")] == pytest.approx(np.mean(gaps))
        assert tables.n["main_zero_shot"].loc[method, "shape"] == 3
    # the starting model: one deterministic value, shown without ±
    assert zs.loc["pre-trained", "average"] == pytest.approx(40.0)
    assert tables["main_zero_shot"].loc["pre-trained", "average"] == "40.00"
    ret = tables.mean["main_retrieval"]
    assert ret.loc["pre-trained", ("synthetic-retrieval", "t2i", "R@5")] == pytest.approx(25.0)
    # sweep tables: the varied value beside the metrics, pre-trained first
    alpha = tables.mean["alpha"]
    assert list(alpha.index) == ["pre-trained", "alpha=0", "alpha=1"]
    r1 = [100 * values[f"alpha/alpha1-s{s}"][1] for s in (0, 1, 2)]
    assert alpha.loc["alpha=1", "T→I R@1 (%)"] == pytest.approx(np.mean(r1))
    assert alpha.loc["alpha=1", "alpha"] == 1.0
    # the loss-weight grid: rows rafa, columns hycd, one seed -> no ±
    w = tables.mean["weights"]
    assert list(w.index) == ["0.5", "1"] and list(w.columns) == ["0.5", "1"]
    v = values["weights/rafa1-hycd0.5-s0"][0]
    assert w.loc["1", "0.5"] == pytest.approx(100 * (v["shape"] + v["colour"]) / 2)
    assert "±" not in tables["weights"].loc["1", "0.5"]
    figs = sw.figures(tables)
    assert set(figs) == {"main", "alpha", "weights"}
    alpha_fig = figs["alpha"]
    assert list(alpha_fig.data[0].x) == [0.0, 1.0]
    assert alpha_fig.layout.title.text.endswith("mean ± std over 3 seeds")
    assert alpha_fig.data[0].error_y.array[1] == pytest.approx(np.std([100 * values[f"alpha/alpha1-s{s}"][0]["shape"] / 2
                                                                      + 100 * values[f"alpha/alpha1-s{s}"][0]["colour"] / 2
                                                                      for s in (0, 1, 2)], ddof=1))
    written = sw.write_outputs(tables, figs, sweep_dir)
    md = (sweep_dir / "tables" / "tables.md").read_text()
    assert "| pre-trained | 30.00 | 50.00 | 40.00 |" in md
    assert (sweep_dir / "tables" / "main_zero_shot.mean.csv").is_file() and (sweep_dir / "figures" / "alpha.html").is_file()
    assert all(p.is_file() for p in written)


def test_one_seed_sweep_figure_says_so_instead_of_a_spread(tmp_path):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"alpha": {"table": "alpha", "grid": {"alpha": [0.0, 1.0]}}},
                                        seeds=(0,))
    for r in runs:
        _write_run(r, _metrics(r.run_name, {"shape": 0.4, "colour": 0.5}, 0.05, 1.0))
    title = sw.figures(sw.aggregate(sweep_dir))["alpha"].layout.title.text
    assert title.endswith(": one seed") and "±" not in title


def test_probe_columns_come_after_the_tasks_and_stay_out_of_the_average(tmp_path):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["clip-refine"]}}},
                                        seeds=(0,))
    metrics = _metrics(runs[0].run_name, {"shape": 0.4, "colour": 0.6}, 0.05, 1.0)
    for model in metrics["models"].values():  # a probe in the middle of the results, as a suite may list it
        model["zero_shot"] = {"shape": model["zero_shot"]["shape"], "relation": {"top1": 0.2, "probe": True},
                              "colour": model["zero_shot"]["colour"]}
    _write_run(runs[0], metrics)
    zs = sw.aggregate(sweep_dir).mean["main_zero_shot"]
    assert list(zs.columns) == ["shape", "colour", "relation (probe)", "average"]
    assert zs.loc["clip-refine", "average"] == pytest.approx(50.0)  # (40 + 60) / 2: the probe's 20 is not in it
    assert zs.loc["clip-refine", "relation (probe)"] == pytest.approx(20.0)


def test_aggregate_backbone_and_missing_runs(tmp_path):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {
        "backbone": {"table": "backbone", "grid": {"model": ["micro-vit-32", "micro-vit-24"]}},
    }, seeds=(0, 1))
    for r in runs[:-1]:  # the last run is not evaluated yet: left out, not an error
        _write_run(r, _metrics(r.run_name, {"shape": 0.4 + 0.1 * r.seed, "colour": 0.5}, 0.1, 1.0))
    tables = sw.aggregate(sweep_dir)
    t = tables.mean["backbone"]
    assert list(t.index) == ["micro-vit-32", "micro-vit-24"]
    assert t.loc["micro-vit-32", ("zero-shot avg (%)", "pre-trained")] == pytest.approx(40.0)
    assert t.loc["micro-vit-32", ("zero-shot avg (%)", "clip-refine")] == pytest.approx(100 * (0.45 + 0.5) / 2)
    assert tables.n["backbone"].loc["micro-vit-24", ("zero-shot avg (%)", "clip-refine")] == 1
    assert tables["backbone"].loc["micro-vit-32", ("zero-shot avg (%)", "clip-refine")] == "47.50 ± 3.54"


def test_aggregate_without_results(tmp_path):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd"]}}})
    with pytest.raises(sw.NoResultsError):
        sw.aggregate(sweep_dir)


# ------------------------------------------------------------------------------ skip / fail / resume
def _boom(*a, **k):
    raise AssertionError("must not be called for a finished, evaluated run")


def test_second_invocation_runs_nothing(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd", "self-kd"]}}},
                                        seeds=(0,))
    for r in runs:
        _write_run(r, _metrics(r.run_name, {"shape": 0.5}, 0.1, 1.0))
    monkeypatch.setattr("clip_refine_lab.training.loop.refine", _boom)
    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.evaluate_run", _boom)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False)
    assert report.ok and report.skipped == ["main/hycd-s0", "main/self-kd-s0"] and not report.ran
    assert "main_zero_shot" in report.tables
    events = [e["event"] for e in sw.read_sweep_log(sweep_dir)]
    assert events == ["start", "skipped", "skipped", "done"]


def test_failed_run_is_logged_and_sweep_continues(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd", "self-kd"]}}},
                                        seeds=(0,))
    calls = []

    def fake_refine(cfg, progress=True):
        calls.append(cfg.run_name)
        if cfg.method == "hycd":
            raise RuntimeError("loss exploded")
        run = next(r for r in runs if r.run_name == cfg.run_name)
        _write_run(run, None)
        return run.run_dir

    def fake_eval(run_dir, **kw):
        name = Path(run_dir).name
        (Path(run_dir) / "metrics.json").write_text(json.dumps(_metrics(name, {"shape": 0.5}, 0.1, 1.0)))

    monkeypatch.setattr("clip_refine_lab.training.loop.refine", fake_refine)
    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.evaluate_run", fake_eval)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False)
    assert calls == ["hycd-s0", "self-kd-s0"]
    assert [k for k, _ in report.failed] == ["main/hycd-s0"] and "loss exploded" in report.failed[0][1]
    assert report.ran == ["main/self-kd-s0"] and report.evaluated == ["main/self-kd-s0"]
    assert "FAILED main/hycd-s0: RuntimeError: loss exploded" in report.summary()
    failed = [e for e in sw.read_sweep_log(sweep_dir) if e["event"] == "failed"]
    assert failed[0]["run"] == "main/hycd-s0" and "loss exploded" in failed[0]["error"]
    assert list(report.tables.mean["main_zero_shot"].index) == ["pre-trained", "self-kd"]


def test_changed_config_under_same_name_is_reported(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd"]}}}, seeds=(0,))
    run = runs[0]
    run.run_dir.mkdir(parents=True)
    other = RunConfig(**{**run.config.resolved().to_dict(), "lr": 0.5})
    other.to_yaml(run.run_dir / "config.yaml")
    (run.run_dir / "summary.json").write_text("{}")
    monkeypatch.setattr("clip_refine_lab.training.loop.refine", _boom)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False, outputs=False)
    assert len(report.failed) == 1 and "different configuration (lr)" in report.failed[0][1]


def test_run_from_an_older_embedded_base_is_reported(tmp_path, monkeypatch):
    """Same config ('pretrained: embedded'), but the run started from a base model of an older world or recipe."""
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd"]}}}, seeds=(0,))
    run = runs[0]
    _write_run(run, None)
    current = tmp_path / "cache" / "base" / "micro-vit-32-newkey.safetensors"
    monkeypatch.setattr("clip_refine_lab.embedded.pretrain.base_checkpoint_path", lambda *a, **k: current)
    (run.run_dir / "base.json").write_text(json.dumps({"pretrained": "/elsewhere/base/micro-vit-32-newkey.safetensors"}))
    assert sw.config_mismatch(run) == []  # same base, other cache directory: not a change
    (run.run_dir / "base.json").write_text(json.dumps({"pretrained": "/elsewhere/base/micro-vit-32-oldkey.safetensors"}))
    assert sw.config_mismatch(run) == ["pretrained: the embedded base model is a newer version"]
    monkeypatch.setattr("clip_refine_lab.training.loop.refine", _boom)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False, outputs=False)
    assert len(report.failed) == 1 and "embedded base model is a newer version" in report.failed[0][1]


def test_interrupted_run_is_resumed(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd"]}}}, seeds=(0,))
    run = runs[0]
    _write_run(run, None, finished=False)
    (run.run_dir / "checkpoints").mkdir()
    (run.run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    seen = []
    monkeypatch.setattr("clip_refine_lab.training.loop.refine", lambda cfg, progress=True: seen.append(cfg) or run.run_dir)
    monkeypatch.setattr("clip_refine_lab.embedded.base.base_is_built", lambda *a, **k: True)
    report = sw.run_sweep(spec, sweep_dir, progress=False, evaluate=False, outputs=False)
    assert report.resumed == ["main/hycd-s0"] and seen[0].run_name == "hycd-s0"
    assert sw.read_sweep_log(sweep_dir)[1]["event"] == "resumed"


def test_dry_run_plan(tmp_path, capsys):
    code = sw.run_sweep_cli(ROOT / "sweeps" / "quick.yaml", tmp_path / "q", dry_run=True)
    out = capsys.readouterr().out
    assert code == 0 and "main" in out and "total" in out and "est. min" in out
    assert not (tmp_path / "q").exists()  # a dry run writes nothing


def test_module_entry_point(tmp_path, capsys):
    """``python -m clip_refine_lab.sweep`` takes the CLI's arguments; a bad spec is one error line, exit 2."""
    from clip_refine_lab.sweep.cli import main

    assert main([str(ROOT / "sweeps" / "quick.yaml"), "--output-dir", str(tmp_path / "q"), "--dry-run"]) == 0
    assert "est. min" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks:\n  x:\n    grid: {alpah: [1]}\n")
    assert main([str(bad), "--dry-run"]) == 2
    assert "did you mean 'alpha'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end (micro)
@pytest.mark.slow
def test_tiny_end_to_end_sweep(tmp_path, micro_base, monkeypatch):
    spec = sw.parse_spec({
        "name": "e2e", "preset": "micro", "seeds": [0],
        "base": {"teacher_cache": True, "image_cache": True, "max_steps": 2, "val_fraction": 0.0},
        "suite": {"zero_shot": ["shape", "colour"], "retrieval": ["synthetic-retrieval"], "geometry": ["synthetic-retrieval"]},
        "blocks": {
            "main": {"table": "main", "grid": {"method": ["clip-refine"]}},
            "data": {"table": "data", "runs": [{"data": {"split": "synthetic-web", "size": 200, "keep_fraction": 0.5}}]},
        }})
    report = sw.run_sweep(spec, tmp_path / "sw", progress=False)
    assert report.ok, report.summary()
    assert report.ran == ["main/clip-refine-s0", "data/synthetic-web-n200-clip0.5-s0"]
    tables = report.tables
    assert list(tables.mean["main_zero_shot"].index) == ["pre-trained", "clip-refine"]
    assert list(tables.mean["main_zero_shot"].columns) == ["shape", "colour", "average"]  # the spec's inline suite
    assert tables.mean["data"].loc["synthetic-web, first 200 pairs, CLIP-score top 50%", "pairs"] == 100
    assert (tmp_path / "sw" / "tables" / "tables.md").is_file()
    data = tmp_path / "sw" / "data"
    assert (data / "synthetic-web-n200.yaml").is_file() and (data / "synthetic-web-n200-clip0.5-micro-vit-32.yaml").is_file()
    # again: nothing runs, nothing is evaluated
    monkeypatch.setattr("clip_refine_lab.training.loop.refine", _boom)
    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.evaluate_run", _boom)
    again = sw.run_sweep(spec, tmp_path / "sw", progress=False)
    assert again.ok and not again.ran and len(again.skipped) == 2
    assert math.isclose(again.tables.mean["main_zero_shot"].loc["clip-refine", "average"],
                        tables.mean["main_zero_shot"].loc["clip-refine", "average"])


def test_finished_run_with_other_max_steps_is_not_reused(tmp_path, monkeypatch):
    spec, sweep_dir, runs = _fake_sweep(tmp_path, {"main": {"table": "main", "grid": {"method": ["hycd"]}}}, seeds=(0,))
    run = runs[0]
    run.run_dir.mkdir(parents=True)
    RunConfig(**{**run.config.resolved().to_dict(), "max_steps": 7}).to_yaml(run.run_dir / "config.yaml")
    assert sw.config_mismatch(run) == []  # unfinished: resuming to the new max_steps is exact
    (run.run_dir / "summary.json").write_text("{}")
    assert sw.config_mismatch(run) == ["max_steps"]  # finished: refine would hand back the old result
