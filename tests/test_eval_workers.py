"""Evaluation at real size: images decoded in DataLoader workers (same results as in one process), and
the starting model's features computed once per suite, whatever the number of runs evaluated."""

import json
import shutil

import numpy as np
import pytest
import torch

from clip_refine_lab import features
from clip_refine_lab.cli import main
from clip_refine_lab.config import RunConfig
from clip_refine_lab.data.manifest import load_manifest
from clip_refine_lab.evaluation.evaluate import evaluate_run, load_run_models
from clip_refine_lab.models.loading import load_model
from clip_refine_lab.training import caches
from clip_refine_lab.training.loop import Refiner, refine
from clip_refine_lab.utils import cache_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_base):
    """Two short runs of the same starting model, and a small suite (2 zero-shot sets, 1 caption set)."""
    out = tmp_path_factory.mktemp("runs")
    a = refine(RunConfig(output_dir=str(out), run_name="a", max_steps=2, lr=1e-3), progress=False)
    b = refine(RunConfig(output_dir=str(out), run_name="b", method="contrastive", max_steps=2, lr=1e-3),
               progress=False)
    suite = out / "suite.yaml"
    suite.write_text("zero_shot: [colour, shape]\nretrieval: [synthetic-retrieval]\ngeometry: [synthetic-retrieval]\n")
    return a, b, suite


def _forget_features(*run_dirs, checkpoint: str = "final") -> list[str]:
    """Remove the feature-cache entries of these runs' models (starting and refined); their fingerprints.
    (Final by default, not best: a run's best checkpoint may be its starting model, sharing its entry.)"""
    fps = []
    for run in run_dirs:
        for loaded in load_run_models(run, "cpu", checkpoint=checkpoint):
            fp = features.weights_fingerprint(loaded.model)
            shutil.rmtree(cache_dir() / "features" / fp, ignore_errors=True)
            fps.append(fp)
    return fps


def test_features_are_identical_with_0_and_2_workers(micro_world, micro_base):
    loaded = load_model(str(micro_base))
    manifest = micro_world.manifest("synthetic-retrieval")
    one = features.dataset_features(loaded, manifest, progress=False, cache=False, num_workers=0, batch_size=16)
    two = features.dataset_features(loaded, manifest, progress=False, cache=False, num_workers=2, batch_size=16)
    assert one.image.shape[0] == 100
    assert torch.equal(one.image, two.image) and torch.equal(one.text, two.text)
    assert torch.equal(one.text_to_image, two.text_to_image)


def test_decoded_image_cache_built_by_workers_is_identical(micro_world, micro_base):
    loaded = load_model(str(micro_base))
    manifest = load_manifest(micro_world.manifest("shape"))
    records = manifest.records()
    first = features.DecodedImages(records, loaded.preprocess, manifest, progress=False, num_workers=0)
    in_one_process = np.array(first.array)
    first.path.unlink()  # built again below, by 2 workers in batches of 64 (the last one short)
    again = features.DecodedImages(records, loaded.preprocess, manifest, progress=False, num_workers=2)
    assert len(records) % features.DECODE_BATCH, "a short last batch is part of what this checks"
    assert np.array_equal(np.array(again.array), in_one_process)
    direct = torch.stack([loaded.preprocess(features.load_image(r.image)) for r in records[:3]])
    assert torch.equal(torch.stack([again[i] for i in range(3)]), direct)


def test_teacher_cache_decodes_with_the_runs_workers(tmp_path, micro_base, monkeypatch):
    seen = []
    real = caches.dataset_features

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(caches, "dataset_features", spy)
    cfg = RunConfig(output_dir=str(tmp_path), run_name="t", teacher_cache=True, num_workers=2, max_steps=1)
    Refiner(cfg.resolved(), progress=False)
    assert seen == [2]


def test_second_run_of_the_same_base_encodes_only_its_own_model(runs, monkeypatch):
    a, b, suite = runs
    base_fp, fp_a, base_fp_b, fp_b = _forget_features(a, b)
    assert base_fp == base_fp_b and len({base_fp, fp_a, fp_b}) == 3
    encoded: list[str] = []
    real = features.encode_images

    def counting(model, dataset, **kw):
        encoded.append(features.weights_fingerprint(model))
        return real(model, dataset, **kw)

    monkeypatch.setattr(features, "encode_images", counting)
    first = evaluate_run(a, suite=str(suite), device="cpu", progress=False, num_workers=2, batch_size=32,
                         checkpoint="final")
    n_sets = 3  # colour, shape, synthetic-retrieval (retrieval and geometry share its features)
    assert encoded.count(base_fp) == n_sets and encoded.count(fp_a) == n_sets
    encoded.clear()
    second = evaluate_run(b, suite=str(suite), device="cpu", progress=False, num_workers=2, batch_size=32,
                          checkpoint="final")
    assert encoded == [fp_b] * n_sets, "the starting model's features must come from the first evaluation"
    assert len(list((cache_dir() / "features" / base_fp).glob("*.safetensors"))) == n_sets
    assert second["models"]["pre-trained"] == first["models"]["pre-trained"]


def test_cli_eval_with_workers_gives_the_same_metrics(runs, capsys):
    a, _, suite = runs
    _forget_features(a, checkpoint="best")  # what the CLI evaluates
    evaluate_run(a, suite=str(suite), device="cpu", progress=False)  # one process
    in_one_process = json.loads((a / "metrics.json").read_text())["models"]
    _forget_features(a, checkpoint="best")
    assert main(["--quiet", "eval", str(a), "--suite", str(suite), "--device", "cpu", "--num-workers", "2",
                 "--batch-size", "16"]) == 0
    assert json.loads((a / "metrics.json").read_text())["models"] == in_one_process
    capsys.readouterr()
    assert main(["--quiet", "eval", str(a), "--suite", str(suite), "--num-workers", "-1"]) == 2
    assert "num_workers must be an integer >= 0, got -1" in capsys.readouterr().err


def test_bench_eval_workers_quick(tmp_path):
    """The benchmark runs end to end on its smallest fixture and reports every measurement (speed is
    never asserted)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_eval_workers.py"), "--quick", "--threads",
                           "1", "--fixture-dir", str(tmp_path / "fixture"), "--cache", str(tmp_path / "cache"),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["throughput"]] == [0, 2]
    assert all(r["images"] == 96 and r["images_per_s"] > 0 for r in result["throughput"])
    assert len(result["evaluation"]) == 4 and all(e["seconds"] > 0 for e in result["evaluation"])
    assert len(list((tmp_path / "fixture" / "images").glob("*.jpg"))) == 96
    assert "images/s" in proc.stdout
