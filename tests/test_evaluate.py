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
