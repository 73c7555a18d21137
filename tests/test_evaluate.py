"""Feature cache, evaluation reports and paper-layout tables on a micro run; the CLI."""

import dataclasses
import json

import pytest
import torch

from clip_refine_lab import features
from clip_refine_lab.cli import main
from clip_refine_lab.config import RunConfig
from clip_refine_lab.evaluation.compare import compare, format_tables
from clip_refine_lab.evaluation.evaluate import evaluate_run
from clip_refine_lab.rundir import latest_run
from clip_refine_lab.models.loading import load_model
from clip_refine_lab.training.loop import refine


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, micro_base):
    out = tmp_path_factory.mktemp("runs")
    a = refine(RunConfig(output_dir=str(out), run_name="refine", epochs=1), progress=False)
    b = refine(RunConfig(output_dir=str(out), run_name="contrast", method="contrastive", epochs=1), progress=False)
    return a, b


def test_feature_cache_is_reused_and_invalidated_by_new_weights(micro_world, micro_base, monkeypatch):
    loaded = load_model(str(micro_base))
    manifest = micro_world.manifest("synthetic-retrieval")
    first = features.dataset_features(loaded, manifest, progress=False)
    assert first.image.shape[0] == 100 and first.text.shape[0] == first.text_to_image.shape[0]

    def fail(*a, **k):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(features, "encode_images", fail)
    again = features.dataset_features(loaded, manifest, progress=False)
    assert torch.equal(again.image, first.image) and torch.equal(again.text, first.text)
    with torch.no_grad():
        loaded.model.visual.proj.mul_(2.0)  # new weights -> new key -> recomputation
    with pytest.raises(AssertionError, match="recomputed"):
        features.dataset_features(loaded, manifest, progress=False)
    monkeypatch.undo()
    changed = features.dataset_features(loaded, manifest, progress=False)
    torch.testing.assert_close(changed.image, 2 * first.image, rtol=1e-4, atol=1e-5)


def test_feature_cache_tells_data_roots_apart(tmp_path, monkeypatch):
    """One manifest under ${CLIP_REFINE_LAB_DATA} names other images under each data root: two roots, two
    cache entries (a folder-only manifest has no records file whose stat would differ)."""
    from conftest_data import make_image, write_manifest_yaml

    monkeypatch.delenv("CLIP_REFINE_LAB_DATA", raising=False)
    man = write_manifest_yaml(tmp_path / "cls.yaml", name="cls", kind="classification", format="imagefolder",
                              root="${CLIP_REFINE_LAB_DATA}/cls", classnames=["a", "b"])
    for r, (root, n) in enumerate((("one", 2), ("two", 3))):
        for k, c in enumerate("ab"):
            for i in range(n):
                make_image(tmp_path / root / "cls" / c / f"{i}.jpg", seed=100 * r + 10 * k + i)
    torch.manual_seed(0)
    loaded = load_model("micro-vit-32")
    one = features.dataset_features(loaded, man, data_root=str(tmp_path / "one"), progress=False)
    two = features.dataset_features(loaded, man, data_root=str(tmp_path / "two"), progress=False)
    assert one.image.shape[0] == 4 and two.image.shape[0] == 6 and two.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_cached_features_equal_direct_encoding(micro_world, micro_base):
    loaded = load_model(str(micro_base))
    fs = features.dataset_features(loaded, micro_world.manifest("shape"), progress=False)
    from clip_refine_lab.data.datasets import Images
    from clip_refine_lab.data.manifest import load_manifest

    records = load_manifest(micro_world.manifest("shape")).records()
    direct = features.encode_images(loaded.model, Images(records[:5], loaded.preprocess), progress=False)
    torch.testing.assert_close(fs.image[:5], direct)
    assert fs.text.shape[:2] == (8, 5) and fs.labels.tolist() == [r.label for r in records]


def test_features_through_the_image_cache_equal_decoding_every_file(micro_world, micro_base):
    loaded = load_model(str(micro_base))
    manifest = micro_world.manifest("synthetic-retrieval")
    plain = features.dataset_features(loaded, manifest, progress=False, cache=False)
    cached = features.dataset_features(loaded, manifest, progress=False, cache=False, image_cache=True)
    assert torch.equal(plain.image, cached.image) and torch.equal(plain.text, cached.text)
    assert torch.equal(plain.text_to_image, cached.text_to_image)


def test_decoded_uint8_path_equals_preprocess(micro_world, micro_base):
    from clip_refine_lab.data.images import load_image
    from clip_refine_lab.data.manifest import load_manifest

    loaded = load_model(str(micro_base))
    records = load_manifest(micro_world.manifest("synthetic-web")).records()[:4]
    raw = features.decode_images(records, 32, progress=False)
    fast = features.normalize_uint8(raw, loaded.spec.preprocess["mean"], loaded.spec.preprocess["std"])
    slow = torch.stack([loaded.preprocess(load_image(r.image)) for r in records])
    torch.testing.assert_close(fast, slow)


def test_evaluate_run_writes_reports_and_tables(two_runs):
    run, _ = two_runs
    result = evaluate_run(run, progress=False, device="cpu")
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved["models"]) == {"pre-trained", "refine"}
    m = saved["models"]["refine"]
    assert len(m["zero_shot"]) == 22 and "top1" in m["zero_shot"]["shape"]
    assert {"t2i_R@1", "i2t_R@10", "t2i_median_rank"} <= set(m["retrieval"]["synthetic-retrieval"])
    assert {"gap_l2", "gap_mse", "alignment", "uniformity_log", "uniformity_rbf"} <= set(m["geometry"]["synthetic-retrieval"])
    csv = (run / "metrics.csv").read_text().splitlines()
    assert csv[0] == "model,section,dataset,metric,value" and len(csv) > 100
    text = format_tables(result)
    for title in ("Table 1", "Table 2", "Table 3"):
        assert title in text


def test_compare_builds_paper_layouts(two_runs):
    tables = compare(list(two_runs))
    zs = tables["zero_shot"]
    assert list(zs.index) == ["pre-trained", "refine", "contrast"]
    # the average is over the classification tasks: the relation probe is a column of its own, not in it
    assert "relation" in zs.columns
    assert zs["average"].tolist() == pytest.approx(zs.drop(columns=["average", "relation"]).mean(axis=1).tolist())
    result = json.loads((two_runs[0] / "metrics.json").read_text())["models"]["pre-trained"]["zero_shot"]
    assert result["relation"]["probe"] is True and "probe" not in result["shape"]
    assert ("synthetic-retrieval", "t2i", "R@1") in tables["retrieval"].columns
    assert ("synthetic-retrieval", "gap_l2") in tables["geometry"].columns
    assert latest_run(two_runs[0].parent) == two_runs[1]


def test_cli_refine_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["refine", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(RunConfig):
        if f.name != "extra":
            assert f"--{f.name.replace('_', '-')}" in out


def test_cli_rejects_bad_values_clearly(capsys, tmp_path):
    assert main(["refine", "--alpha", "1.5", "--output-dir", str(tmp_path)]) == 2
    assert "alpha must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_refine_and_eval_end_to_end(capsys, tmp_path, micro_base):
    assert main(["--quiet", "refine", "--method", "hycd", "--alpha", "0.3", "--max-steps", "2",
                 "--output-dir", str(tmp_path), "--run-name", "cli"]) == 0
    cfg = RunConfig.from_yaml(tmp_path / "cli" / "config.yaml")
    assert (cfg.method, cfg.alpha, cfg.max_steps) == ("hycd", 0.3, 2)
    assert main(["--quiet", "eval", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert "Table 3" in capsys.readouterr().out


def test_suite_file_with_linear_probe(tmp_path, micro_world, micro_base):
    from clip_refine_lab.evaluation.evaluate import evaluate_model
    from clip_refine_lab.evaluation.suites import load_suite

    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("zero_shot: [colour]\nretrieval: []\ngeometry: [synthetic-retrieval]\n"
                          "linear_probe:\n  - {train: val/colour, test: colour}\n")
    suite = load_suite(suite_file, "micro")
    result = evaluate_model(load_model(str(micro_base)), suite, progress=False)
    assert set(result["zero_shot"]) == {"colour"} and not result["retrieval"]
    assert 0.0 <= result["linear_probe"]["colour"]["top1"] <= 1.0
    tables = compare([{"models": {"pre-trained": result}}])
    assert "linear_probe" in tables and tables["linear_probe"].shape == (1, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("zero_shot: [colour]\nzeroshot: [shape]\n")
    with pytest.raises(ValueError, match="unknown suite fields"):
        load_suite(bad, "micro")


def test_shipped_suites_resolve(tmp_path):
    from pathlib import Path

    from clip_refine_lab.evaluation.suites import load_suite

    for path in sorted((Path(__file__).resolve().parents[1] / "data_manifests" / "suites").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.zero_shot and all(p.is_file() for p in suite.zero_shot + suite.retrieval + suite.geometry)


# ------------------------------------------------------------------------ a model alone, unfinished runs
@pytest.fixture(scope="module")
def small_real(tmp_path_factory):
    """A random-init micro model saved as a plain .pt, a tiny Karpathy caption set, an image-folder
    classification set and a suite of the two."""
    from conftest_data import make_imagefolder, make_karpathy, write_manifest_yaml

    d = tmp_path_factory.mktemp("small-real")
    caps = make_karpathy(d / "flickr", [(f"{i}.jpg", "test", [f"photo {i}", f"picture {i}"]) for i in range(6)],
                         name="flickr-mini")
    make_imagefolder(d / "cls", {"cat": 3, "dog": 3, "fox": 2})
    cls = write_manifest_yaml(d / "cls" / "animals.yaml", name="animals", kind="classification", format="imagefolder",
                              root="images", classnames=["cat", "dog", "fox"], templates=["a photo of a {c}."])
    suite = d / "suite.yaml"
    suite.write_text(f"zero_shot: [{cls}]\nretrieval: [{caps}]\ngeometry: [{caps}]\n")
    torch.manual_seed(0)
    torch.save(load_model("micro-vit-32").model.state_dict(), d / "start.pt")
    return {"dir": d, "suite": suite, "start": d / "start.pt", "captions": caps, "classes": cls}


def test_eval_model_alone_writes_the_run_layout_and_sits_beside_runs(capsys, tmp_path, small_real, two_runs):
    from clip_refine_lab.evaluation.evaluate import evaluate_model, evaluate_pretrained
    from clip_refine_lab.evaluation.suites import load_suite

    out = tmp_path / "out"
    assert main(["--quiet", "eval", "--model", "micro-vit-32", "--pretrained", str(small_real["start"]),
                 "--suite", str(small_real["suite"]), "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    folder = out / "pretrained-micro-vit-32-start"
    assert "Table 1" in printed and f"metrics written to {folder}" in printed
    model = json.loads((folder / "model.json").read_text())
    assert (model["model"], model["pretrained"]) == ("micro-vit-32", str(small_real["start"]))
    assert model["spec"]["arch"] == "micro-vit-32"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["kind"] == "pretrained" and set(saved["models"]) == {"pre-trained"}
    assert saved["suite"] == str(small_real["suite"].resolve())
    assert saved["datasets"]["zero_shot"] == [{"name": "animals", "manifest": str(small_real["classes"].resolve())}]
    assert saved["datasets"]["retrieval"] == [{"name": "flickr-mini", "manifest": str(small_real["captions"].resolve())}]
    assert (folder / "metrics.csv").read_text().startswith("model,section,dataset,metric,value")
    # the same numbers as measuring the loaded model directly
    direct = evaluate_model(load_model("micro-vit-32", str(small_real["start"])), load_suite(small_real["suite"]),
                            progress=False)
    assert saved["models"]["pre-trained"] == json.loads(json.dumps(direct))
    # from Python, without writing anything
    assert evaluate_pretrained("micro-vit-32", str(small_real["start"]), suite=small_real["suite"], output_dir=None,
                               progress=False, device="cpu")["models"] == saved["models"]

    run = two_runs[0]
    beside = compare([folder, run], evaluate_missing=True)["retrieval"]
    assert list(beside.index) == ["pre-trained", "refine"]
    after = compare([run, folder])["zero_shot"]
    assert list(after.index) == ["pre-trained", "refine", "pretrained-micro-vit-32-start"]
    assert after.loc["pretrained-micro-vit-32-start", "animals"] == pytest.approx(
        100 * saved["models"]["pre-trained"]["zero_shot"]["animals"]["top1"])
    assert main(["compare", str(folder), str(run)]) == 0
    assert "pre-trained" in capsys.readouterr().out
    # by default the folder goes beside the runs (runs/), where compare finds it by name
    from clip_refine_lab.rundir import resolve_output_dir

    assert main(["--quiet", "eval", "--model", "micro-vit-32", "--pretrained", str(small_real["start"]),
                 "--suite", str(small_real["suite"]), "--name", "start-alone", "--device", "cpu"]) == 0
    assert (resolve_output_dir("runs") / "start-alone" / "model.json").is_file()
    capsys.readouterr()
    assert main(["compare", str(run), "start-alone"]) == 0
    assert "start-alone" in capsys.readouterr().out


def test_eval_takes_a_run_or_a_model(capsys, tmp_path, small_real):
    (tmp_path / "runs" / "a-run").mkdir(parents=True)
    (tmp_path / "runs" / "a-run" / "config.yaml").write_text("run_name: a-run\n")
    (tmp_path / "a-file").write_text("")
    alone = ["eval", "--model", "micro-vit-32", "--pretrained", str(small_real["start"]), "--output-dir"]
    cases = [(["eval"], "got neither"),
             (["eval", str(tmp_path), "--model", "micro-vit-32"], "not both"),
             (["eval", str(tmp_path), "--pretrained", "openai"], "--pretrained goes with --model"),
             (["eval", "--model", "ViT-B-32"], "name the weights of 'ViT-B-32'"),
             (["eval", str(tmp_path / "nope")], "is not a run directory (no config.yaml)"),
             (alone + [str(tmp_path / "runs"), "--name", "../up"], "must be a plain name"),
             (alone + [str(tmp_path / "a-file")], "a-file is a file"),
             (alone + [str(tmp_path / "runs"), "--name", "a-run"], "is a run directory; evaluate the model alone "
                                                                   "under another --name")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("clip-refine-lab: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a-run"]
    assert not (tmp_path / "runs" / "a-run" / "metrics.json").exists()


def test_eval_and_compare_refuse_an_unfinished_run_unless_allowed(capsys, tmp_path, two_runs):
    import shutil

    run = tmp_path / "stopped"
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("summary.json", "metrics.*"))
    assert main(["--quiet", "eval", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"run stopped ({run}) is not finished: no summary.json" in err
    assert "--run-name stopped" in err and "--allow-incomplete" in err and err.count("\n") == 1
    assert main(["compare", str(two_runs[1]), str(run)]) == 2
    assert "run stopped" in capsys.readouterr().err
    assert not (run / "metrics.json").exists()

    assert main(["--quiet", "eval", str(run), "--device", "cpu", "--allow-incomplete"]) == 0
    assert "[incomplete]" in capsys.readouterr().out
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["incomplete"] is True and saved["kind"] == "run"
    # evaluated already: compare still refuses it unless told, then marks its row
    with pytest.raises(Exception, match="is not finished"):
        compare([two_runs[1], run])
    tables = compare([two_runs[1], run], allow_incomplete=True)
    assert list(tables["zero_shot"].index) == ["pre-trained", "contrast", "refine [incomplete]"]
    assert main(["compare", str(two_runs[1]), str(run), "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "refine [incomplete]" in out and "[incomplete]: a run that has not finished" in out
    finished = json.loads((two_runs[0] / "metrics.json").read_text()) if (two_runs[0] / "metrics.json").is_file() else None
    assert finished is None or finished["incomplete"] is False


def test_label_out_of_range_is_named_before_any_model_loads(capsys, tmp_path, small_real, monkeypatch):
    from conftest_data import make_csv, make_image

    from clip_refine_lab.data.manifest import ManifestError
    from clip_refine_lab.evaluation.evaluate import evaluate_pretrained

    for i in range(3):
        make_image(tmp_path / "images" / f"c{i}.png", seed=i)
    bad = make_csv(tmp_path, [{"image": "c0.png", "label": 0}, {"image": "c1.png", "label": 7},
                              {"image": "c2.png", "label": 1}], name="bad-labels", kind="classification",
                   classnames=["a", "b", "c"])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"zero_shot: [{bad}]\n")

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the labels were checked")

    monkeypatch.setattr("clip_refine_lab.evaluation.evaluate.load_model", no_loading)
    with pytest.raises(ManifestError) as e:
        evaluate_pretrained("micro-vit-32", str(small_real["start"]), suite=suite, output_dir=None, progress=False)
    message = str(e.value)
    assert str(bad) in message and "pairs.csv:3" in message and "label 7" in message and "0..2" in message
    assert main(["--quiet", "eval", "--model", "micro-vit-32", "--pretrained", str(small_real["start"]),
                 "--suite", str(suite), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "label 7, outside the valid range 0..2" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_model_alone_on_the_paper_suite_with_its_layouts(capsys, tmp_path, small_real, monkeypatch):
    """`eval --model ARCH --pretrained FILE --suite data_manifests/suites/paper.yaml` on every set of the
    paper laid out as its archive unpacks (a few images each; every class prompt of the shipped manifests)."""
    from pathlib import Path

    from test_manifests import LAYOUTS

    monkeypatch.delenv("CLIP_REFINE_LAB_DATA", raising=False)
    data = tmp_path / "data"
    for build in LAYOUTS:
        build(data)
    paper = Path(__file__).resolve().parents[1] / "data_manifests" / "suites" / "paper.yaml"
    out = tmp_path / "out"
    assert main(["--quiet", "eval", "--model", "micro-vit-32", "--pretrained", str(small_real["start"]),
                 "--suite", str(paper), "--data-root", str(data), "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "pretrained-micro-vit-32-start" / "metrics.json").read_text())
    twelve = ["fgvc_aircraft", "cub200", "caltech101", "cars", "dtd", "eurosat", "flowers", "food101", "imagenet1k",
              "pets", "sun397", "ucf101"]
    assert [d["name"] for d in saved["datasets"]["zero_shot"]] == twelve
    assert set(saved["models"]["pre-trained"]["zero_shot"]) == set(twelve)
    assert set(saved["models"]["pre-trained"]["retrieval"]) == {"mscoco_captions-val2017", "flickr30k-test"}
    assert saved["data_root"] == str(data) and saved["suite"] == str(paper)
    assert "average" in printed and "mscoco_captions-val2017" in printed
