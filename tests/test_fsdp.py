"""Sharded training (``--fsdp``, PyTorch FSDP2) on 2 CPU processes with gloo: the same gradients, losses
and weights as data-parallel and single-process training, ordinary checkpoints, and resuming."""

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
from clip_refine_lab.models.loading import load_model
from clip_refine_lab.rundir import read_log
from clip_refine_lab.training.loop import Refiner, refine

REPO = Path(__file__).resolve().parents[1]
CLIP = 0.05  # small enough that clipping acts at every step (asserted below)
RUN = dict(preset="micro", method="clip-refine", batch_size=32, epochs=1, val_every=100, checkpoint_every=1,
           grad_clip=CLIP)


# clip-refine: teacher and prior, no logit scale; contrastive: the logit scale's rank-0-only gradient,
# alone and with accumulation (first micro-step only)
GRAD_CASES = [("clip-refine", 1), ("contrastive", 1), ("contrastive", 2)]


def micro_config(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{**RUN, "output_dir": str(tmp_path / "runs"), **kw})


WORKER = """
    import os, shutil, torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.distributed import init_distributed_from_env, is_sharded
    from clip_refine_lab.training.loop import Refiner, refine
    init_distributed_from_env()
    out, runs = {out!r}, {runs!r}
    base = dict({run}, output_dir=runs)

    # one step's gradients, gathered whole (full_tensor is a collective: every rank calls it)
    for method, accum in {grad_cases!r}:
        cfg = RunConfig(**{{**base, "method": method}}, run_name=f"grads-{{method}}-{{accum}}", fsdp=True,
                        accum_steps=accum).resolved()
        r = Refiner(cfg, progress=False)
        assert is_sharded(r.model) and (r.teacher is None or is_sharded(r.teacher))
        images, tokens = r.load_batch(r.source.train_set, r.source.batch_indices(0, 0))
        terms = r.compute_loss(images, tokens, step=0, train=True)
        r.all_reduce_gradients()
        grads = {{n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for n, p in r.model.named_parameters() if p.grad is not None}}
        if r.rank == 0:
            torch.save({{"loss": terms["loss"], "grads": grads}}, os.path.join(out, f"grads-{{method}}-{{accum}}.pt"))

    # whole runs: data-parallel for 5 steps; sharded for 3, then resumed from its checkpoint to 5
    refine(RunConfig(**base, run_name="ddp", max_steps=5), progress=False)
    refine(RunConfig(**base, run_name="fsdp", max_steps=3, fsdp=True), progress=False)
    if dist.get_rank() == 0:  # the state of a run stopped after its step-3 checkpoint
        shutil.copytree(os.path.join(runs, "fsdp"), os.path.join(runs, "resumed"))
        for name in ("summary.json", "model_final.safetensors"):
            os.remove(os.path.join(runs, "resumed", name))
    dist.barrier()
    refine(RunConfig(**base, run_name="resumed", max_steps=5, fsdp=True), progress=False)
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, micro_base):
    """One torchrun launch of 2 gloo processes (the worker above); returns (tmp dir, its runs folder)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out, runs = tmp / "out", tmp / "runs"
    out.mkdir()
    script = tmp / "fsdp_worker.py"
    script.write_text(textwrap.dedent(WORKER.format(out=str(out), runs=str(runs), run=repr(RUN), grad_cases=GRAD_CASES)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, runs


@pytest.fixture(scope="module")
def single(tmp_path_factory, micro_base):
    """Single-process runs of the same configuration: 5 steps, and 3 (the sharded run's checkpoint)."""
    tmp = tmp_path_factory.mktemp("single")
    return (refine(micro_config(tmp, run_name="single", max_steps=5), progress=False),
            refine(micro_config(tmp, run_name="single3", max_steps=3), progress=False))


def _single_grads(tmp_path, method: str, accum: int):
    cfg = micro_config(tmp_path, method=method, run_name=f"single-grads-{method}-{accum}", accum_steps=accum)
    single = Refiner(cfg.resolved(), progress=False)
    images, tokens = single.load_batch(single.source.train_set, single.source.batch_indices(0, 0))
    single.model.zero_grad(set_to_none=True)
    terms = single.compute_loss(images, tokens, step=0, train=True)
    return terms["loss"], {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,accum", GRAD_CASES)
def test_sharded_gradients_equal_the_single_process_gradient(sharded, tmp_path, method, accum):
    """loss x world size, FSDP's averaging reduce-scatter and the rank-0-only logit-scale gradient
    (replicated, all-reduced by the trainer) give the gradient of the global batch in one process."""
    tmp, _ = sharded
    loss, expected = _single_grads(tmp_path, method, accum)
    got = torch.load(tmp / "out" / f"grads-{method}-{accum}.pt", weights_only=True)
    assert got["grads"].keys() == expected.keys()
    assert ("logit_scale" in expected) == (method == "contrastive")
    torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
    for name, g in expected.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    if method == "clip-refine":
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
        assert norm > 2 * CLIP, "the runs' gradient clipping must act for the run comparison to test it"


def _weights_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=f"{what}: {k}")


def _train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


def test_sharded_run_matches_data_parallel_and_single_process(sharded, single):
    _, runs = sharded
    single, single3 = single
    losses = _train_losses(single)
    assert len(losses) == 5
    assert _train_losses(runs / "ddp") == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert _train_losses(runs / "fsdp") == pytest.approx(losses[:3], rel=1e-5, abs=1e-6)
    final = load_file(str(single / "model_final.safetensors"))
    _weights_close(load_file(str(runs / "ddp" / "model_final.safetensors")), final, "ddp")
    _weights_close(load_file(str(runs / "fsdp" / "model_final.safetensors")),
                   load_file(str(single3 / "model_final.safetensors")), "fsdp")
    assert json.loads((runs / "fsdp" / "summary.json").read_text())["world_size"] == 2


def test_sharded_checkpoints_are_ordinary_state_dicts(sharded, single):
    _, runs = sharded
    single3 = single[1]
    for name in ("model_final.safetensors", "model_best.safetensors"):
        path = runs / "fsdp" / name
        loaded = load_model(str(path))  # plain load_model: architecture and spec from the header
        _weights_close({k: v for k, v in loaded.model.state_dict().items()}, load_file(str(path)), name)
    ours = torch.load(runs / "fsdp" / "checkpoints" / "last.pt", weights_only=True)
    theirs = torch.load(single3 / "checkpoints" / "last.pt", weights_only=True)
    assert ours["step"] == theirs["step"] == 3
    _weights_close(ours["model"], theirs["model"], "last.pt model")
    o, t = ours["optimizer"], theirs["optimizer"]
    assert [g["params"] for g in o["param_groups"]] == [g["params"] for g in t["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in o["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in t["param_groups"]]
    assert o["state"].keys() == t["state"].keys()
    for i in t["state"]:
        assert o["state"][i].keys() == t["state"][i].keys()
        for key in t["state"][i]:
            torch.testing.assert_close(o["state"][i][key].float(), t["state"][i][key].float(), rtol=1e-4, atol=1e-7,
                                       msg=f"optimizer state {i} {key}")


def test_resumed_sharded_run_continues_as_an_uninterrupted_one(sharded, single):
    _, runs = sharded
    single = single[0]
    assert [r["step"] for r in read_log(runs / "resumed")] == [1, 2, 3, 4, 5]
    assert _train_losses(runs / "resumed") == pytest.approx(_train_losses(single), rel=1e-5, abs=1e-6)
    _weights_close(load_file(str(runs / "resumed" / "model_final.safetensors")),
                   load_file(str(single / "model_final.safetensors")), "resumed")


def test_fsdp_options_are_checked_before_work(tmp_path, micro_base):
    with pytest.raises(ConfigError, match="fsdp runs in fp32 or bf16"):
        RunConfig(fsdp=True, precision="fp16", device="cuda").validate()
    with pytest.raises(ConfigError, match="fsdp and compile cannot be combined"):
        RunConfig(fsdp=True, compile=True).validate()
    with pytest.raises(ConfigError, match="fsdp must be true or false"):
        RunConfig(fsdp="yes").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="launch with torchrun --nproc_per_node N"):
        refine(micro_config(tmp_path, run_name="alone", fsdp=True, max_steps=1), progress=False)


def test_every_transformer_block_of_both_towers_is_one_unit(micro_base):
    from clip_refine_lab.distributed import transformer_blocks

    model = load_model(str(micro_base)).model
    blocks = transformer_blocks(model)
    expected = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    assert len(blocks) == len(expected) >= 2 and all(a is b for a, b in zip(blocks, expected))
