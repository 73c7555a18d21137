"""clip_refine_lab.ui: parameter checking, run selection, examples, notebook 01's helpers, widgets and the live plot."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from clip_refine_lab import rundir
from clip_refine_lab.ui import examples, notebook, parameters, runs, starting_model
from clip_refine_lab.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def parameters_of(stem: str) -> dict:
    """The values of a committed notebook's parameters cell (plain literals)."""
    cells = json.loads((NOTEBOOKS / f"{stem}.ipynb").read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    out = {}
    for node in ast.parse("".join(cell["source"])).body:
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


# ------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("stem", sorted(parameters.NOTEBOOK_PARAMETERS))
def test_notebook_defaults_pass(stem):
    params = parameters.check_parameters(parameters_of(stem), stem)
    assert set(params) == set(parameters.NOTEBOOK_PARAMETERS[stem])
    if stem in ("01_setup", "02_refine"):
        assert isinstance(params.config, RunConfig)
        assert Path(params.config.output_dir).is_absolute()
    if stem == "08_paper_tables":  # the sweep notebook's paths come resolved
        assert params.spec == ROOT / "sweeps" / "quick.yaml" and params.output_dir is None
        ns = parameters_of(stem) | {"output_dir": "sweeps-x"}
        assert parameters.check_parameters(ns, stem).output_dir == rundir.resolve_output_dir("sweeps-x")


@pytest.mark.parametrize("name,value,message", [
    ("alpha", 1.5, "alpha must be in [0, 1], got 1.5"),
    ("alpha", "high", "alpha must be a number, got 'high'"),
    ("method", "clip-refin", "did you mean 'clip-refine'"),
    ("batch_size", 3.5, "batch_size must be an integer"),
    ("lr", -1e-5, "lr must be > 0"),
    ("live_plot", "yes", "live_plot must be True or False, got 'yes'"),
    ("options", {"alhpa": 0.2}, "did you mean 'alpha'"),
    ("options", {"alpha": 0.2}, "options repeats alpha"),
    ("options", [1, 2], "options must be a dict"),
    ("preset", "huge", "unknown preset 'huge'"),
    ("output_dir", 3, "output_dir must be a string, got 3"),
    ("run_name", 7, "run_name must be a string or None"),
    ("model", "", "model must not be empty"),
])
def test_refine_parameter_errors(name, value, message):
    ns = parameters_of("02_refine") | {name: value}
    with pytest.raises(parameters.ParameterError) as e:
        parameters.check_parameters(ns, "02_refine")
    assert message in str(e.value)
    assert str(e.value).startswith("02_refine: ")
    assert isinstance(e.value, ConfigError)


@pytest.mark.parametrize("stem,name,value,message", [
    ("03_zero_shot", "runs", 5, "runs must be None, a run name/path or a non-empty list"),
    ("03_zero_shot", "runs", [], "non-empty list"),
    ("03_zero_shot", "show_widgets", 1, "show_widgets must be True or False"),
    ("04_retrieval", "n_queries", 0, "n_queries must be in [1, 20], got 0"),
    ("04_retrieval", "top_k", "5", "top_k must be an integer, got '5'"),
    ("05_geometry", "lambdas", [0.5], "lambdas needs at least 2 values"),
    ("05_geometry", "lambdas", [0, "a"], "lambdas must be a list of numbers"),
    ("06_projections", "n_neighbors", 1, "n_neighbors must be in [2, 200]"),
    ("06_projections", "sample_size", True, "sample_size must be an integer"),
    ("07_failure_gallery", "run", ["a"], "run must be a string or None"),
    ("01_setup", "n_images", 1000, "n_images must be in [1, 64]"),
    ("01_setup", "seed", -1, "seed must be >= 0"),
    ("08_paper_tables", "spec", "sweeps/nowhere.yaml", "spec file not found: sweeps/nowhere.yaml"),
    ("08_paper_tables", "max_runs", 0, "max_runs must be >= 1, got 0"),
    ("08_paper_tables", "blocks", [], "blocks must be None or a non-empty list"),
    ("08_paper_tables", "run", "yes", "run must be True or False"),
    ("08_paper_tables", "output_dir", "", "output_dir must be None or a folder"),
])
def test_other_parameter_errors(stem, name, value, message):
    ns = parameters_of(stem) | {name: value}
    with pytest.raises(parameters.ParameterError, match=None) as e:
        parameters.check_parameters(ns, stem)
    assert message in str(e.value)


def test_papermill_style_values_pass():
    # papermill -p turns "0.5" into 0.5, "1" into 1, "hycd" into "hycd"
    ns = parameters_of("02_refine") | {"alpha": 1, "epochs": 1, "lr": 1e-4, "method": "hycd", "runs": None}
    cfg = parameters.check_parameters(ns, "02_refine").config
    assert (cfg.alpha, cfg.epochs, cfg.lr, cfg.method) == (1, 1, 1e-4, "hycd")


def test_missing_parameter_and_unknown_notebook():
    ns = parameters_of("03_zero_shot")
    del ns["runs"]
    with pytest.raises(parameters.ParameterError, match="runs missing"):
        parameters.check_parameters(ns, "03_zero_shot")
    with pytest.raises(parameters.ParameterError, match="unknown notebook"):
        parameters.check_parameters({}, "99_nothing")


def test_options_reach_the_config():
    ns = parameters_of("02_refine") | {"options": {"weight_decay": 0.0, "val_every": 3}}
    cfg = parameters.check_parameters(ns, "02_refine").config
    assert cfg.weight_decay == 0.0 and cfg.val_every == 3


def test_parameter_help_covers_every_parameter():
    for stem, names in parameters.NOTEBOOK_PARAMETERS.items():
        lines = parameters.parameter_help(stem).splitlines()
        assert [line.split(":")[0] for line in lines] == list(names)


# ---------------------------------------------------------------------------------------- paths
def test_output_dir_is_taken_from_the_project_root(monkeypatch, tmp_path):
    monkeypatch.delenv(rundir.OUTPUT_ROOT_ENV, raising=False)
    monkeypatch.chdir(NOTEBOOKS)
    assert rundir.project_root() == ROOT
    assert rundir.resolve_output_dir("runs") == ROOT / "runs"
    monkeypatch.chdir(ROOT)
    assert rundir.resolve_output_dir("runs") == ROOT / "runs"
    assert rundir.resolve_output_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.chdir(tmp_path)  # outside the project: the working directory
    assert rundir.resolve_output_dir("runs") == tmp_path.resolve() / "runs"
    monkeypatch.setenv(rundir.OUTPUT_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert rundir.resolve_output_dir("runs") == tmp_path / "elsewhere" / "runs"


def test_relative_data_paths_are_found_from_notebooks(monkeypatch):
    monkeypatch.chdir(NOTEBOOKS)
    manifest = sorted((ROOT / "data_manifests").glob("*.yaml"))[0]
    rel = str(manifest.relative_to(ROOT))
    assert rundir.resolve_path(rel) == manifest
    cfg = parameters.check_parameters(parameters_of("02_refine") | {"data": rel}, "02_refine").config
    assert cfg.data == str(manifest)


def fake_run(root: Path, name: str, preset: str, finished: bool = True, mtime: float | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"preset": preset, "run_name": name}))
    if finished:
        (d / "summary.json").write_text("{}")
        if mtime is not None:
            os.utime(d / "summary.json", (mtime, mtime))
    return d


def test_run_selection(tmp_path):
    a = fake_run(tmp_path, "a", "micro", mtime=1000)
    b = fake_run(tmp_path, "b", "micro", mtime=2000)
    fake_run(tmp_path, "c", "default", mtime=3000)
    fake_run(tmp_path, "d", "micro", finished=False)
    assert rundir.finished_runs(tmp_path, "micro") == [a, b]
    assert [p.name for p in rundir.finished_runs(tmp_path, "any")] == ["a", "b", "c"]
    assert runs.select_runs(None, tmp_path, "micro") == [b]  # the latest of the preset
    assert runs.select_runs("a", tmp_path, "micro") == [a.resolve()]
    assert runs.select_runs(["b", str(a)], tmp_path) == [b.resolve(), a.resolve()]
    with pytest.raises(FileNotFoundError, match="finished runs there: a, b, c"):
        runs.select_runs("zzz", tmp_path)
    with pytest.raises(FileNotFoundError, match="not finished"):
        rundir.find_run("d", tmp_path)
    assert runs.select_runs(None, tmp_path / "empty", "default") == []  # only looks: never trains


def test_data_sets_come_from_the_runs_metrics(tmp_path, monkeypatch):
    """A run evaluated on real manifests: its data sets and data root are found from metrics.json alone
    (no embedded world, no parameter), and a run without zero-shot sets says which parameter to set."""
    import json

    from conftest_data import make_karpathy

    data = tmp_path / "data"
    make_karpathy(data / "flickr30k", [("1.jpg", "test", ["a"]), ("2.jpg", "test", ["b"])],
                  images_dir="flickr30k-images", json_name="dataset_flickr30k.json")
    shipped = ROOT / "data_manifests" / "flickr30k_test.yaml"
    run = fake_run(tmp_path, "real", "micro")
    (run / "metrics.json").write_text(json.dumps({
        "data_root": str(data), "models": {},
        "datasets": {"zero_shot": [], "retrieval": [{"name": "flickr30k-test", "manifest": str(shipped)}],
                     "geometry": [{"name": "flickr30k-test", "manifest": str(shipped)}]}}))
    monkeypatch.delenv("CLIP_REFINE_LAB_DATA", raising=False)
    monkeypatch.setattr("clip_refine_lab.evaluation.suites.default_suite",
                        lambda *a: pytest.fail("looked at the embedded world"))
    for m in (runs.dataset_for(run, None, "retrieval"), runs.dataset_for(run, "flickr30k-test", "zero_shot"),
              runs.dataset_for(run, None, ("zero_shot", "geometry"))):
        assert m.path == shipped and m.name == "flickr30k-test" and len(m.records()) == 2
        assert str(m.root).startswith(str(data))
    with pytest.raises(ValueError, match="has no zero_shot data set; pass one as the class_task parameter"):
        runs.dataset_for(run, None, "zero_shot", parameter="class_task")
    with pytest.raises(ValueError, match="has no zero-shot set to look at; pass a classification manifest"):
        runs.gallery_manifests(run)


# ------------------------------------------------------------------------------------ small pieces
def test_pick_is_seeded_and_bounded():
    assert examples.pick(5, 10) == [0, 1, 2, 3, 4]
    p = examples.pick(100, 7, seed=3)
    assert p == sorted(set(p)) and len(p) == 7 and p == examples.pick(100, 7, seed=3)
    assert p != examples.pick(100, 7, seed=4)


def test_flips():
    labels = torch.tensor([0, 1, 2, 3, 0])
    base = torch.tensor([0, 0, 2, 1, 1])
    refined = torch.tensor([1, 1, 2, 3, 1])
    fixed, broken = examples.flips(base, refined, labels)
    assert fixed == [1, 3] and broken == [0]
    with pytest.raises(ValueError, match="shapes differ"):
        examples.flips(base[:2], refined, labels)


def test_topk_helpers():
    from clip_refine_lab.features import FeatureSet

    image = torch.eye(4)
    text = torch.eye(4)[[0, 0, 1, 2, 3]] + 0.01
    fs = FeatureSet("x", "captions", image, text, torch.tensor([0, 0, 1, 2, 3]))
    assert examples.text_to_image_topk(fs, [2, 4], k=1).flatten().tolist() == [1, 3]
    assert examples.image_to_text_topk(fs, [0], k=2)[0].sort().values.tolist() == [0, 1]


def test_strip_outputs_keeps_checked_cells():
    committed = {"metadata": {"widgets": {"state": {}}, "kernelspec": {"name": "python3"}}, "cells": [
        {"cell_type": "code", "source": "print(1)", "execution_count": 3, "metadata": {"execution": {}},
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}]},
        {"cell_type": "code", "source": "# NBVAL_CHECK_OUTPUT\nprint(2)", "execution_count": 4, "metadata": {},
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "2\n"}]},
        {"cell_type": "markdown", "source": "hi", "metadata": {}},
    ]}
    out = notebook.strip_outputs(committed)
    assert out["cells"][0]["outputs"] == [] and out["cells"][0]["execution_count"] is None
    assert out["cells"][0]["metadata"] == {}
    assert out["cells"][1]["outputs"][0]["text"] == "2\n"
    assert out["cells"][1]["execution_count"] == 4  # nbval: a cell with outputs needs a count
    assert "widgets" not in out["metadata"] and out["metadata"]["kernelspec"]


def test_widgets_render_follows_the_jupyter_server(monkeypatch):
    from clip_refine_lab.progress import PROGRESS_ENV, widgets_render

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert not widgets_render()  # papermill and nbval: text progress, static figures
    monkeypatch.setenv("JPY_SESSION_NAME", "/x/02_refine.ipynb")
    assert widgets_render()


def test_export_is_a_no_op_without_a_folder():
    assert notebook.export(object(), None, "x") is None


# --------------------------------------------------------------------------- with the micro world
def test_world_helpers(micro_world):
    cfg = RunConfig(preset="micro").resolved()
    assert starting_model.uses_embedded_world(cfg)
    table = starting_model.task_table(micro_world)
    assert all(t in table for t in micro_world.tasks)
    assert "shape-colour" in table and "64" in table
    assert starting_model.task_table(None).startswith("(no embedded world")
    real = RunConfig(preset="micro", pretrained="/x/model.safetensors", data="/x/coco.yaml")
    assert not starting_model.uses_embedded_world(real)
    assert starting_model.uses_embedded_world(RunConfig(preset="micro", pretrained="/x/model.safetensors"))
    items = examples.caption_samples(micro_world.manifest("synthetic-coco"), 5, seed=1)
    assert len(items) == 5 and all(Path(i["image"]).is_file() and i["caption"] for i in items)
    assert "(+4 more)" in items[0]["caption"]
    items = examples.caption_samples(micro_world.manifest("shape"), 3)
    assert items[0]["caption"] in ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
    row = starting_model.chance_row([micro_world.manifest("shape"), micro_world.manifest("size")])
    assert row == pytest.approx({"shape": 12.5, "size": 50.0, "average": 31.25})
    # a compositional probe gets its chance level but stays out of the average
    row = starting_model.chance_row([micro_world.manifest("shape"), micro_world.manifest("size"), micro_world.manifest("relation")])
    assert row == pytest.approx({"shape": 12.5, "size": 50.0, "relation": 25.0, "average": 31.25})


@pytest.fixture(scope="module")
def quick(micro_base, tmp_path_factory):
    """A finished micro run made by the notebooks' fallback."""
    out = tmp_path_factory.mktemp("runs")
    first = runs.select_runs_or_quick_run(None, out, "micro", progress=False)
    return out, first[0]


def test_quick_run_is_announced_and_explicit(tmp_path, monkeypatch, capsys):
    made = []
    monkeypatch.setattr("clip_refine_lab.ui.runs.quick_run",
                        lambda out, preset, progress=True: made.append(preset) or tmp_path / "quick-micro")
    assert runs.select_runs_or_quick_run(None, tmp_path, "micro") == [tmp_path / "quick-micro"]
    lines = capsys.readouterr().out.splitlines()
    assert made == ["micro"] and len(lines) == 1 and lines[0].startswith("No finished run of preset 'micro'")
    b = fake_run(tmp_path, "b", "micro")
    assert runs.select_runs_or_quick_run(None, tmp_path, "micro") == [b]
    assert made == ["micro"] and capsys.readouterr().out == ""


def test_ensure_evaluated_says_which_runs_it_evaluates(tmp_path, monkeypatch, capsys):
    done, pending = fake_run(tmp_path, "done", "micro"), fake_run(tmp_path, "pending", "micro")
    (done / "metrics.json").write_text("{}")
    evaluated = []
    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.evaluate_run",
                        lambda run, progress=True: evaluated.append(run))
    assert runs.ensure_evaluated([done, pending]) == [done, pending]
    assert evaluated == [pending]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "1 run(s) without metrics.json (pending)" in lines[0]
    runs.ensure_evaluated([done])
    assert evaluated == [pending] and capsys.readouterr().out == ""


def test_select_runs_makes_a_quick_run_once(quick):
    out, run = quick
    assert run.name == "quick-micro" and (run / "summary.json").is_file()
    assert runs.select_runs(None, out, "micro") == [run]
    assert runs.quick_run(out, "micro", progress=False) == run  # reused, not retrained


def test_examples_from_a_run(quick):
    from clip_refine_lab.evaluation.evaluate import load_run_models

    out, run = quick
    base, refined = load_run_models(run)
    ret = runs.dataset_for(run, None, "retrieval")
    assert ret.path.name == "synthetic-retrieval.yaml" and ret.kind == "captions"
    assert runs.dataset_for(run, None, "zero_shot").path.name == "shape.yaml"  # the suite's order
    assert runs.dataset_for(run, "colour", "zero_shot").path.name == "colour.yaml"
    assert runs.dataset_for(run, None, ("linear_probe", "geometry")).name == "synthetic-retrieval"
    with pytest.raises(ValueError, match="nor a split of the embedded world.*as the dataset parameter"):
        runs.dataset_for(run, "imagenet", "zero_shot")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        runs.dataset_for(run, "nowhere/x.yaml", "zero_shot")

    ex = examples.retrieval_examples({"pre-trained": base, "refined": refined}, ret, n_queries=2, k=3, seed=0)
    assert len(ex["t2i"]) == 2 and len(ex["i2t"]) == 2
    for q in ex["t2i"]:
        assert set(q["results"]) == {"pre-trained", "refined"} and len(q["results"]["refined"]) == 3
        hits = [r["image"] == q["target"] for r in q["results"]["refined"]]
        assert hits == [r["hit"] for r in q["results"]["refined"]]
    for q in ex["i2t"]:
        for r in q["results"]["pre-trained"]:
            assert r["hit"] == (r["caption"] in q["captions"])
    html = examples.i2t_html(ex["i2t"]).data
    assert html.count("<tr>") == 3 and "data:image/png;base64," in html

    manifests = runs.zero_shot_manifests(run)
    assert [m.name for m in manifests[:2]] == ["shape", "colour"]
    assert [m.name for m in runs.gallery_manifests(run)] == [m.name for m in manifests]
    assert [m.name for m in runs.gallery_manifests(run, "size")] == ["size"]
    cases = examples.failure_cases(base, refined, manifests[:4], n=3, seed=0)
    assert [c["task"] for c in cases["counts"]] == [m.name for m in manifests[:4]]
    for kind in ("fixed", "broken"):
        assert len(cases[kind]) <= 3
        for c in cases[kind]:
            assert Path(c["image"]).is_file()
            assert (c["refined_pred"] == c["true"]) == (kind == "fixed")
            assert (c["base_pred"] == c["true"]) == (kind == "broken")
    with pytest.raises(ValueError, match="needs classification sets"):
        examples.failure_cases(base, refined, [ret])


# ------------------------------------------------------------------------------------------ widgets
def test_refine_form_runs_with_its_values(tmp_path):
    from clip_refine_lab.ui.widgets import RefineForm

    calls = []

    def fake_run(cfg, callback):
        calls.append(cfg)
        callback({"kind": "train", "step": 1, "loss": 1.0, "rafa": 0.5, "hycd": 0.5, "gap": 1.2})
        d = tmp_path / "r1"
        d.mkdir(exist_ok=True)
        return d

    finished = []
    form = RefineForm(RunConfig(preset="micro"), run=fake_run, live_plot=False, on_finish=finished.append)
    assert (form.lr.value, form.epochs.value) == (1e-4, 1.0)  # the micro preset's
    form.method.value = "hycd"
    form.alpha.value = 0.25
    form.prior.value = "uniform"
    form.lr.value = 3e-5
    form.epochs.value = 2
    form.run_button.click()
    assert len(calls) == 1
    cfg = calls[0]
    assert (cfg.method, cfg.alpha, cfg.prior, cfg.lr, cfg.epochs, cfg.preset) == ("hycd", 0.25, "uniform", 3e-5, 2.0, "micro")
    assert cfg.run_name is None
    assert finished == [tmp_path / "r1"] and "finished" in form.status.value
    assert not form.run_button.disabled

    form.lr.value = -1.0  # invalid: reported in the form, nothing runs
    form.run_button.click()
    assert len(calls) == 1 and "lr must be > 0" in form.status.value

    def failing(cfg, callback):
        raise RuntimeError("boom")

    form2 = RefineForm(RunConfig(preset="micro"), run=failing, live_plot=False)
    form2.run_button.click()
    assert "RuntimeError: boom" in form2.status.value and not form2.run_button.disabled


def test_run_picker_renders_the_selection(tmp_path):
    from clip_refine_lab.ui.widgets import RunPicker

    a, b = fake_run(tmp_path, "a", "micro"), fake_run(tmp_path, "b", "micro")
    seen = []
    picker = RunPicker([a, b], [b], seen.append)
    assert picker.selected == [b]
    picker.show_button.click()
    picker.select.value = (str(a), str(b))
    picker.show_button.click()
    assert seen == [[b], [a, b]]
    outside = tmp_path / "elsewhere"
    assert RunPicker([a], [outside], seen.append).selected == [outside]


def test_projection_explorer_passes_its_values():
    from clip_refine_lab.ui.widgets import ProjectionExplorer

    seen = []
    ex = ProjectionExplorer(lambda **kw: seen.append(kw), sample_size=120, n_neighbors=7, max_sample=500)
    assert ex.n_neighbors.disabled  # PCA has no n_neighbors
    ex.method.value = "umap"
    assert not ex.n_neighbors.disabled
    ex.dims.value = 3
    ex.color.value = "class"
    ex.update_button.click()
    assert seen == [{"method": "umap", "dims": 3, "color": "class", "sample_size": 120, "n_neighbors": 7}]


def test_leakage_summary_reads_each_runs_metrics(tmp_path):
    import json

    from clip_refine_lab.ui.runs import leakage_summary

    done, pending = tmp_path / "done", tmp_path / "pending"
    done.mkdir()
    pending.mkdir()
    (done / "metrics.json").write_text(json.dumps({"leakage": {"text": "coco-karpathy-test: 5000 of 5000 images "
                                                                        "also in training (by id)"}}))
    text = leakage_summary([done, pending]).splitlines()
    assert text == ["done: coco-karpathy-test: 5000 of 5000 images also in training (by id)",
                    "pending: not evaluated yet"]


def test_widgets_show_only_where_they_render(monkeypatch, capsys):
    import ipywidgets

    from clip_refine_lab.progress import PROGRESS_ENV
    from clip_refine_lab.ui.widgets import show_widget

    monkeypatch.setenv(PROGRESS_ENV, "text")  # papermill / nbval: one line, no frozen widget in the output
    assert not show_widget(ipywidgets.Button(), "the form")
    assert capsys.readouterr().out == "(the form: interactive in JupyterLab)\n"
    monkeypatch.setenv(PROGRESS_ENV, "widgets")
    assert show_widget(ipywidgets.Button(), "the form")
