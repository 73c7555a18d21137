"""Smoke tests of the benchmark scripts: each runs end to end with its smallest settings.

Speed is never asserted here (timings on shared machines mean nothing in a test); only that every
script runs, prints its table and writes well-formed results. Each script runs in a subprocess, as a
user would start it, on the micro world (built once per test session by the ``micro_world`` fixture,
in the session's private cache, which the subprocesses inherit through CLIP_REFINE_LAB_CACHE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _open_clip_train_importable() -> bool:
    try:
        import open_clip_train.main  # noqa: F401
    except Exception:
        return False
    return True


CONTENDERS = "ours,reference,open_clip_train" if _open_clip_train_importable() else "ours,reference"
SCRIPTS = {  # script -> its smallest settings (each also gets --json)
    "bench_refine.py": ["--quick", "--steps", "1", "--batch-size", "8", "--threads", "1", "--peak-tflops", "1"],
    "bench_vs_peers.py": ["--quick", "--threads", "1", "--workers", "0", "--contenders", CONTENDERS],
    "bench_encode.py": ["--quick", "--threads", "1"],
    "bench_loop.py": ["--steps", "3", "--skip", "1", "--threads", "1"],  # the micro preset (conftest)
    "pretrain_recipes.py": ["--world", "micro", "--threads", "1", "micro-vit-32:1:64:2e-3",
                            "micro-vit-32:1:64:2e-3:logit_scale_init=50:relation_hard_negatives=true"],
    "base_diagnostics.py": ["--world", "micro", "--threads", "1", "--supervised-steps", "3"],
    "bench_pretrain.py": ["--quick", "--threads", "1", "--batch-size", "16"],
    "bench_memory.py": ["--quick", "--threads", "1"],
    "bench_trimmed_text.py": ["--quick", "--threads", "1"],
}


@pytest.fixture(scope="module")
def runs(micro_world, tmp_path_factory):
    """Start every script at once (they are independent; this keeps the module near 30 s), then wait."""
    out_dir = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO), **ENV}
    procs = {}
    for script, args in SCRIPTS.items():
        out = out_dir / f"{script}.json"
        procs[script] = (out, subprocess.Popen([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True))
    results = {}
    for script, (out, proc) in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        results[script] = (proc.returncode, stdout, json.loads(out.read_text()) if out.is_file() else None)
    return results


def _result(runs, script):
    code, stdout, data = runs[script]
    assert code == 0 and data is not None, f"{script} failed (exit {code}):\n{stdout[-4000:]}"
    return stdout, data


def test_bench_refine_quick(runs):
    stdout, result = _result(runs, "bench_refine.py")
    from clip_refine_lab.methods import METHODS

    assert [r["method"] for r in result["rows"]] == list(METHODS)  # every method, tiny model
    for row in result["rows"]:
        assert row["model"] == "tiny-vit-48" and row["pairs_per_s"] > 0 and row["gflop_per_step"] > 0
        assert row["teacher"] == ("cache" if METHODS[row["method"]].needs_teacher else "none")
        assert 0 < row["mfu"]
    assert "| tiny-vit-48" in stdout and "MFU" in stdout


def test_bench_vs_peers_quick(runs):
    """Every contender ran (open_clip_train only where importable): reference_loop.py's build() and train()
    run inside it, in a subprocess of their own."""
    stdout, result = _result(runs, "bench_vs_peers.py")
    names = [r["contender"] for r in result["rows"]]
    assert names == CONTENDERS.split(",")
    for row in result["rows"]:
        assert row["pairs_per_s"] > 0 and row["pairs_per_cpu_s"] > 0
        if row["contender"] != "ours":
            assert row["ratio"] > 0 and row["cpu_ratio"] > 0
    assert "ours / this" in stdout


def test_bench_encode_quick(runs):
    stdout, result = _result(runs, "bench_encode.py")
    (row,) = result["rows"]
    assert row["model"] == "tiny-vit-48" and row["images_per_s"] > 0 and row["texts_per_s"] > 0
    assert "images/s" in stdout


@pytest.mark.skipif(not _open_clip_train_importable(), reason="open_clip_train (open_clip_torch[training]) not installed")
def test_open_clip_train_sees_our_tiny_architectures():
    """The launcher's premise: after registering our configs, open_clip (and so open_clip_train) knows the names."""
    import open_clip

    from clip_refine_lab.models.loading import register_tiny_architectures

    register_tiny_architectures()
    assert "tiny-vit-48" in open_clip.list_models()


def test_bench_loop_runs_the_trainer_with_and_without_caches(runs):
    stdout, result = _result(runs, "bench_loop.py")
    assert [r["variant"] for r in result["rows"]] == ["caches", "no-caches"]
    for row in result["rows"]:
        assert row["model"] == "micro-vit-32" and row["steps"] == 3 and row["pairs_per_s"] > 0
    assert "| caches" in stdout


def test_pretrain_recipes_reports_each_recipe(runs):
    stdout, summaries = _result(runs, "pretrain_recipes.py")
    assert len(summaries) == 2 and [s["recipe"]["logit_scale_init"] for s in summaries] == [None, 50.0]
    assert [s["recipe"]["relation_hard_negatives"] for s in summaries] == [False, True]
    # the micro web set names relations in a few captions; only the second recipe adds their swapped copies
    assert summaries[0]["hard_negative_fraction"] == 0 and 0 < summaries[1]["hard_negative_fraction"] < 0.5
    assert all(s["arch"] == "micro-vit-32" and "shape" in s["zero_shot"] for s in summaries)
    assert "logit_scale_init=50:relation_hard_negatives=true" in stdout and "mean top-1" in stdout


def test_base_diagnostics_reports_probes_text_and_learnability(runs):
    stdout, result = _result(runs, "base_diagnostics.py")
    assert result["arch"] == "micro-vit-32"
    assert [p["task"] for p in result["probes"]] == ["shape", "position", "size", "count", "relation",
                                                         "count-sketch", "position-sketch"]
    assert all(0 <= p["probe_top1"] <= 100 and p["chance"] > 0 for p in result["probes"])
    assert [t["group"] for t in result["text"]] == ["positions", "shapes", "colours", "relations"]
    assert all(-1 - 1e-6 <= t["min_cosine"] <= t["mean_cosine"] <= 1 + 1e-6 for t in result["text"])
    named, training = result["relation_binding"]["named_shapes"], result["relation_binding"]["training_captions"]
    assert 0 <= named["top1"] <= 100 and sum(named["predicted"].values()) > 0
    assert training["captions"] == 0 or all(0 <= training[k] <= 100
                                            for k in ("objects_swapped", "axis_swapped", "relation_swapped"))
    parts = result["palette_parts"]
    assert [r["part"] for r in parts][0] == "unshifted" and len(parts) == 6
    assert all(0 <= r["top1"] <= 100 and 0 < r["largest_class_share"] <= 100 for r in parts)
    sup = result["supervised"]
    assert sup["steps"] == 3 and sup["train_images"] > 0
    assert 0 <= sup["shape_top1"] <= 100 and 0 <= sup["position_top1"] <= 100
    assert "linear probe" in stdout and "supervised learnability" in stdout


def test_bench_pretrain_compares_the_step_forms(runs):
    stdout, rows = _result(runs, "bench_pretrain.py")
    assert [r["form"] for r in rows] == ["v2", "sdpa", "v3", "v4", "v5"]
    assert all(r["step_ms"] > 0 and r["speedup"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert "text columns used" in stdout


def test_bench_memory_measures_the_step_with_and_without_checkpointing(runs):
    stdout, result = _result(runs, "bench_memory.py")
    assert [r["checkpointing"] for r in result["rows"]] == [False, True]
    for row in result["rows"]:
        assert row["model"] == "micro-vit-32" and row["measured_gib"] > 0 and row["estimate_gib"] > 0
        assert row["ratio"] == pytest.approx(row["estimate_gib"] / row["measured_gib"])
    assert "estimate / measured" in stdout


def test_bench_trimmed_text_times_the_full_and_the_trimmed_step(runs):
    stdout, result = _result(runs, "bench_trimmed_text.py")
    full, trimmed = result["rows"]
    assert (full["form"], trimmed["form"]) == ("full", "trimmed")
    assert trimmed["text_columns"] < full["text_columns"] == 32
    assert all(r["step_ms"] > 0 and r["text_ms"] > 0 for r in result["rows"]) and full["step_speedup"] == 1.0
    assert "longest" in stdout
