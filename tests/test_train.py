"""The trainer on the micro preset: every method end to end, accumulation, DDP, resume, NaN stop."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_refine_lab.config import ConfigError, RunConfig
from clip_refine_lab.methods import METHODS
from clip_refine_lab.training.loop import Refiner, refine
from clip_refine_lab.training.state import NonFiniteLossError
from clip_refine_lab.rundir import read_log

REPO = Path(__file__).resolve().parents[1]


def micro_config(tmp_path, **kw) -> RunConfig:
    values = dict(preset="micro", output_dir=str(tmp_path / "runs"), run_name="run", epochs=1, batch_size=32)
    values.update(kw)
    return RunConfig(**values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(tmp_path, micro_base, method):
    run_dir = refine(micro_config(tmp_path, method=method), progress=False)
    for name in ("config.yaml", "base.json", "log.jsonl", "model_best.safetensors", "model_final.safetensors",
                 "summary.json", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    log = read_log(run_dir)
    assert len(log) == json.loads((run_dir / "summary.json").read_text())["steps"] > 0
    for term in METHODS[method].terms:
        assert all(term in rec and rec[term] == rec[term] for rec in log)
    assert {"loss", "lr", "gap", "image_norm", "text_norm", "logit_scale", "pairs_per_s"} <= set(log[0])
    assert read_log(run_dir, "val"), "validation must be logged"
    if method == "self-kd":  # student == teacher at step 0: the loss is exactly zero there
        assert log[0]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_seeded_runs_are_identical(tmp_path, micro_base):
    a = refine(micro_config(tmp_path, run_name="a"), progress=False)
    b = refine(micro_config(tmp_path, run_name="b"), progress=False)
    wa, wb = load_file(str(a / "model_final.safetensors")), load_file(str(b / "model_final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda log: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in log]  # noqa: E731
    assert strip(read_log(a)) == strip(read_log(b))


def test_training_changes_the_model_and_keeps_the_starting_one_as_teacher(tmp_path, micro_base):
    run_dir = refine(micro_config(tmp_path, lr=1e-3), progress=False)
    base = load_file(str(micro_base))
    final = load_file(str(run_dir / "model_final.safetensors"))
    assert any(not torch.equal(base[k], final[k]) for k in base)


def _grads(refiner: Refiner, images, tokens):
    refiner.model.zero_grad(set_to_none=True)
    refiner.compute_loss(images, tokens, step=0, train=True)
    return {n: p.grad.detach().clone() for n, p in refiner.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["clip-refine", "contrastive"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, micro_base, method):
    one = Refiner(micro_config(tmp_path, method=method, batch_size=64, accum_steps=1).resolved(), progress=False)
    four = Refiner(micro_config(tmp_path, method=method, batch_size=64, accum_steps=4).resolved(), progress=False)
    images, tokens = one.load_batch(one.source.train_set, one.source.batch_indices(0, 0))
    g1, g4 = _grads(one, images, tokens), _grads(four, images, tokens)
    assert g1.keys() == g4.keys() and g1
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["clip-refine", "contrastive"])
def test_distributed_two_gloo_processes_match_single_process(tmp_path, micro_base, method):
    """torchrun with 2 CPU processes: loss and averaged gradients equal the single-process global batch."""
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from clip_refine_lab.config import RunConfig
        from clip_refine_lab.distributed import init_distributed_from_env
        from clip_refine_lab.training.loop import Refiner
        init_distributed_from_env()
        cfg = RunConfig(preset="micro", method=os.environ["METHOD"], output_dir={str(tmp_path / 'runs')!r},
                        run_name="ddp", batch_size=32, epochs=1).resolved()
        r = Refiner(cfg, progress=False)
        images, tokens = r.load_batch(r.source.train_set, r.source.batch_indices(0, 0))
        terms = r.compute_loss(images, tokens, step=0, train=True)
        r.all_reduce_gradients()
        grads = {{n: p.grad for n, p in r.model.named_parameters() if p.grad is not None}}
        torch.save({{"loss": terms["loss"], "grads": grads}}, os.path.join({str(out)!r}, f"rank{{r.rank}}.pt"))
    """))
    env = {**os.environ, "METHOD": method, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = Refiner(micro_config(tmp_path, run_name="single", method=method).resolved(), progress=False)
    images, tokens = single.load_batch(single.source.train_set, single.source.batch_indices(0, 0))
    single.model.zero_grad(set_to_none=True)
    terms = single.compute_loss(images, tokens, step=0, train=True)
    expected = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
    for rank in (0, 1):
        got = torch.load(out / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], terms["loss"], rtol=1e-5, atol=1e-6)
        for name, g in expected.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_after_sigkill_gives_identical_weights(tmp_path, micro_base):
    cfg = micro_config(tmp_path, run_name="killed", epochs=3, checkpoint_every=2, val_every=2)
    script = tmp_path / "killer.py"
    # Kill the process (SIGKILL: no cleanup) in the middle of step 5, after the step-4 checkpoint.
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from clip_refine_lab.training import loop as train
        from clip_refine_lab.config import RunConfig
        original = train.Refiner.compute_loss
        def compute_loss(self, images, tokens, step, *, train, **kw):
            if train and step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, images, tokens, step, train=train, **kw)
        train.Refiner.compute_loss = compute_loss
        train.refine(RunConfig.from_yaml({str(tmp_path / 'cfg.yaml')!r}), progress=False)
    """))
    cfg.to_yaml(tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = Path(cfg.output_dir) / "killed"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert not (run_dir / "summary.json").exists()
    refine(cfg, progress=False)
    uninterrupted = refine(micro_config(tmp_path, run_name="straight", epochs=3, checkpoint_every=2, val_every=2),
                           progress=False)
    for name in ("model_final.safetensors", "model_best.safetensors"):
        a, b = load_file(str(run_dir / name)), load_file(str(uninterrupted / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [r["step"] for r in read_log(run_dir)]
    assert steps == sorted(set(steps)), "the log has no duplicated steps after resuming"


def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, micro_base, monkeypatch):
    from clip_refine_lab.training import loop as train

    original = train.loss_terms
    calls = {"n": 0}

    def poisoned(method, cfg, image, text, **kw):
        terms = original(method, cfg, image, text, **kw)
        calls["n"] += 1
        if kw.get("teacher_image") is not None and torch.is_grad_enabled() and calls["n"] > 4:
            terms["hycd"] = terms["hycd"] * float("nan")
        return terms

    monkeypatch.setattr(train, "loss_terms", poisoned)
    cfg = micro_config(tmp_path, run_name="nan", checkpoint_every=1, val_every=100)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'hycd' is nan at step \d+"):
        refine(cfg, progress=False)
    run_dir = Path(cfg.output_dir) / "nan"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] >= 1
    assert not (run_dir / "model_final.safetensors").exists()


def test_bad_configurations_are_refused(tmp_path, micro_base):
    with pytest.raises(ConfigError, match="larger than the training set"):
        refine(micro_config(tmp_path, batch_size=100000), progress=False)
    with pytest.raises(ConfigError, match="neither a manifest file nor a split"):
        refine(micro_config(tmp_path, run_name="x", data="coco-train"), progress=False)
    refine(micro_config(tmp_path, run_name="y", max_steps=1), progress=False)
    with pytest.raises(ConfigError, match="different configuration"):
        refine(micro_config(tmp_path, run_name="y", max_steps=1, alpha=0.9), progress=False)


@pytest.mark.parametrize("method", ["clip-refine", "hycd+l2"])
def test_teacher_and_image_caches_give_the_same_losses(tmp_path, micro_base, method):
    plain = refine(micro_config(tmp_path, method=method, run_name="plain", max_steps=4), progress=False)
    cached = refine(micro_config(tmp_path, method=method, run_name="cached", max_steps=4, teacher_cache=True,
                                 image_cache=True), progress=False)
    a, b = read_log(plain), read_log(cached)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "hycd", "gap"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), key
    va, vb = read_log(plain, "val"), read_log(cached, "val")
    assert [r["val_loss"] for r in vb] == pytest.approx([r["val_loss"] for r in va], rel=1e-6, abs=1e-6)


def test_teacher_cache_is_built_once_and_reused_across_runs(tmp_path, micro_base, monkeypatch):
    refine(micro_config(tmp_path, run_name="first", max_steps=1, teacher_cache=True), progress=False)
    from clip_refine_lab import features

    def fail(*a, **k):
        raise AssertionError("teacher features recomputed")

    monkeypatch.setattr(features, "encode_images", fail)
    refine(micro_config(tmp_path, run_name="second", max_steps=1, teacher_cache=True, alpha=0.3), progress=False)


def test_worker_processes_load_the_same_batches(tmp_path, micro_base):
    a = refine(micro_config(tmp_path, run_name="w0", max_steps=3), progress=False)
    b = refine(micro_config(tmp_path, run_name="w2", max_steps=3, num_workers=2), progress=False)
    strip = lambda log: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in log]  # noqa: E731
    assert strip(read_log(a)) == strip(read_log(b))


def test_batch_norm_statistics_stay_frozen_so_self_kd_starts_at_zero(tmp_path, micro_world):
    """A ModifiedResNet tower has batch norm: in plain train mode the student would use batch statistics and
    differ from its eval-mode teacher at step 0. The trainer keeps the running statistics instead."""
    from clip_refine_lab.models.speed import train_with_frozen_batch_norm

    cfg = micro_config(tmp_path, method="self-kd", model="tiny-rn-48", pretrained=None, batch_size=16, epochs=1)
    refiner = Refiner(cfg.resolved(), progress=False)
    running = {n: b.clone() for n, b in refiner.model.named_buffers() if "running" in n}
    assert running, "tiny-rn-48 must have batch-norm layers for this test to mean anything"
    images, tokens = refiner.load_batch(refiner.source.train_set, refiner.source.batch_indices(0, 0))
    assert train_with_frozen_batch_norm(refiner.model) > 0 and refiner.model.training
    terms = refiner.compute_loss(images, tokens, step=0, train=True)
    assert float(terms["loss"]) == pytest.approx(0.0, abs=1e-6)
    buffers = dict(refiner.model.named_buffers())
    assert all(torch.equal(running[n], buffers[n]) for n in running)
    refiner.model.train()  # what the trainer must not do: batch statistics make the student differ
    assert float(refiner.compute_loss(images, tokens, step=0, train=True)["loss"]) > 1e-3
    assert not all(torch.equal(running[n], buffers[n]) for n in running)


def test_self_kd_starts_at_zero_on_a_batch_norm_model_through_the_trainer(tmp_path, micro_world):
    # the first logged loss is computed in the trainer's train mode, before any update (weight decay then
    # moves the student away from the teacher, so later steps need not be zero)
    run_dir = refine(micro_config(tmp_path, method="self-kd", model="tiny-rn-48", pretrained=None, batch_size=16,
                                  max_steps=2), progress=False)
    assert read_log(run_dir)[0]["loss"] == pytest.approx(0.0, abs=1e-6)
