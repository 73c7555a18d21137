"""Big-model settings: gradient checkpointing, the trimmed text path in the trainer, the memory estimate."""

import pytest
import torch

from clip_refine_lab.config import RunConfig
from clip_refine_lab.models import memory
from clip_refine_lab.training import loop
from clip_refine_lab.training.loop import Refiner

# tiny-vit-48 (random weights): 4 image and 3 text blocks, so checkpointing has blocks to recompute
TINY = dict(model="tiny-vit-48", pretrained=None)


def micro_config(tmp_path, **kw) -> RunConfig:
    values = dict(preset="micro", output_dir=str(tmp_path / "runs"), run_name="run", epochs=1, batch_size=16,
                  val_fraction=0.0)
    values.update(kw)
    return RunConfig(**values).resolved()


def step_gradients(refiner: Refiner, images, tokens) -> tuple[dict, dict]:
    refiner.model.zero_grad(set_to_none=True)
    terms = refiner.compute_loss(images, tokens, step=0, train=True)
    grads = {n: p.grad.detach().clone() for n, p in refiner.model.named_parameters() if p.grad is not None}
    return terms, grads


def assert_same_gradients(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def bytes_saved_for_backward(forward, excluded) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``forward()`` runs, leaving
    out the storages of ``excluded`` (the weights, which stay whatever is saved)."""
    skip = {t.untyped_storage()._cdata for t in excluded}
    kept: dict = {}

    def pack(t):
        if t.untyped_storage()._cdata not in skip:
            kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_grad_checkpointing_gives_the_plain_gradients(tmp_path, micro_world, accum_steps):
    plain = Refiner(micro_config(tmp_path, **TINY, accum_steps=accum_steps), progress=False)
    ckpt = Refiner(micro_config(tmp_path, **TINY, accum_steps=accum_steps, grad_checkpointing=True), progress=False)
    assert ckpt.model.transformer.grad_checkpointing and ckpt.model.visual.transformer.grad_checkpointing
    assert not ckpt.teacher.transformer.grad_checkpointing  # the frozen teacher keeps nothing to recompute
    assert not plain.model.transformer.grad_checkpointing
    images, tokens = plain.load_batch(plain.source.train_set, plain.source.batch_indices(0, 0))
    terms_plain, g_plain = step_gradients(plain, images, tokens)
    terms_ckpt, g_ckpt = step_gradients(ckpt, images, tokens)
    torch.testing.assert_close(terms_ckpt["loss"], terms_plain["loss"], rtol=1e-6, atol=0)
    assert_same_gradients(g_ckpt, g_plain, rtol=1e-6, atol=1e-9)


def test_grad_checkpointing_keeps_fewer_tensors_for_backward(tmp_path, micro_world):
    """What checkpointing is for: the student's forward keeps each block's input only."""
    saved = {}
    for on in (False, True):
        refiner = Refiner(micro_config(tmp_path, **TINY, method="contrastive", grad_checkpointing=on), progress=False)
        images, tokens = refiner.load_batch(refiner.source.train_set, refiner.source.batch_indices(0, 0))
        saved[on] = bytes_saved_for_backward(lambda: refiner.model.encode_image(images),
                                             excluded=refiner.model.parameters())
    assert saved[True] < saved[False] / 4


def test_the_trainer_encodes_captions_up_to_the_longest_and_equals_the_full_context(tmp_path, micro_world, monkeypatch):
    """compute_loss trims trailing padding columns (student and teacher): same loss, features and gradients."""
    cfg = micro_config(tmp_path, **TINY)
    trimmed = Refiner(cfg, progress=False)
    images, tokens = trimmed.load_batch(trimmed.source.train_set, trimmed.source.batch_indices(0, 0))
    used = int((tokens != 0).any(0).nonzero()[-1]) + 1
    assert used < tokens.shape[1]  # the batch has padding columns to drop
    widths = []
    trimmed.model.transformer.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    trimmed.teacher.transformer.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    terms_t, g_t = step_gradients(trimmed, images, tokens)
    assert widths == [used, used]  # teacher, then student

    monkeypatch.setattr(loop, "encode_text_trimmed", lambda model, text: model.encode_text(text))
    full = Refiner(cfg, progress=False)
    terms_f, g_f = step_gradients(full, images, tokens)
    for key in ("loss", "rafa", "hycd"):
        torch.testing.assert_close(terms_t[key], terms_f[key], rtol=1e-6, atol=1e-7)
    for a, b in zip(terms_t["_features"], terms_f["_features"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    largest = max(g.abs().max().item() for g in g_f.values())
    assert g_t.keys() == g_f.keys()
    for name in g_f:  # equal up to float summation order
        assert (g_t[name] - g_f[name]).abs().max().item() <= 1e-5 * largest, name


def test_a_run_resumes_with_grad_checkpointing_switched(tmp_path, micro_base):
    """A memory setting, not a maths one: switching it does not make the run directory another run's."""
    from clip_refine_lab.training.loop import refine

    first = refine(micro_config(tmp_path, max_steps=1), progress=False)
    assert refine(micro_config(tmp_path, max_steps=1, grad_checkpointing=True), progress=False) == first


def test_teacher_cache_keeps_no_teacher_copy(tmp_path, micro_base):
    refiner = Refiner(micro_config(tmp_path, teacher_cache=True), progress=False)
    assert refiner.teacher is None and refiner.teacher_features is not None
    idx = refiner.source.batch_indices(0, 0)
    images, tokens = refiner.load_batch(refiner.source.train_set, idx)
    terms = refiner.compute_loss(images, tokens, 0, train=True,
                                 teacher=refiner.teacher_batch("train", refiner.source.train_set, idx))
    assert torch.isfinite(terms["loss"]) and terms["hycd"] > 0


# ------------------------------------------------------------------------------------- memory
def test_memory_estimate_counts_parameters_exactly_and_each_part_responds_to_its_option():
    from clip_refine_lab.models.loading import load_model

    n = sum(p.numel() for p in load_model("tiny-vit-48").model.parameters())
    base = memory.estimate_memory("tiny-vit-48", batch_size=64)
    assert memory.architecture("tiny-vit-48").parameters == n
    assert (base.weights, base.gradients, base.optimizer, base.teacher) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert memory.estimate_memory("tiny-vit-48", batch_size=64, teacher=False).teacher == 0
    ckpt = memory.estimate_memory("tiny-vit-48", batch_size=64, grad_checkpointing=True)
    assert ckpt.activations < base.activations / 3 and ckpt.weights == base.weights
    accum = memory.estimate_memory("tiny-vit-48", batch_size=64, accum_steps=4)
    assert accum.micro_batch == 16 and accum.activations == base.activations // 4
    bf16 = memory.estimate_memory("tiny-vit-48", batch_size=64, precision="bf16")
    assert bf16.autocast_copies == 2 * n and bf16.activations < base.activations
    sharded = memory.estimate_memory("tiny-vit-48", batch_size=64, world_size=4, shards=4)
    assert sharded.optimizer == 2 * n and sharded.batch_per_device == 16
    short = memory.estimate_memory("tiny-vit-48", batch_size=64, text_tokens=8)
    assert short.text_activations < base.text_activations / 3 and short.image_activations == base.image_activations
    assert base.peak > base.static + base.activations


@pytest.mark.parametrize("arch", ["tiny-vit-48", "tiny-rn-48"])
def test_activation_estimate_matches_what_the_forward_keeps_for_backward(arch):
    """The per-sample formula (or, for a conv tower, the meta-device count) against the bytes a real CPU
    forward of the trainer's student (SDPA path) saves for backward."""
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.models.speed import train_with_frozen_batch_norm, use_sdpa_attention

    model = load_model(arch).model
    use_sdpa_attention(model)
    train_with_frozen_batch_norm(model)
    size = model.visual.image_size
    images = torch.randn(4, 3, *((size, size) if isinstance(size, int) else size))
    tokens = torch.randint(1, 1000, (4, model.context_length))
    measured = bytes_saved_for_backward(lambda: (model.encode_image(images), model.encode_text(tokens)),
                                        excluded=[*model.parameters(), *model.buffers()])
    estimate = memory.estimate_memory(arch, batch_size=4).activations
    assert 0.9 < estimate / measured < 1.15, (estimate, measured)


def test_memory_check_refuses_a_cuda_run_that_does_not_fit_and_names_what_helps(tmp_path, monkeypatch):
    cfg = RunConfig(preset="micro", model="ViT-L-14", pretrained=None, batch_size=512, precision="bf16",
                    device="cuda", output_dir=str(tmp_path)).resolved()
    needed = memory.estimate_for_config(cfg).peak
    monkeypatch.setattr(memory, "device_memory", lambda device: (needed // 2, needed))
    with pytest.raises(memory.MemoryEstimateError) as err:
        memory.check_memory_fits(cfg, torch.device("cuda"))
    text = str(err.value)
    assert "ViT-L-14 at batch 512" in text and "--grad-checkpointing true" in text and "--accum-steps" in text
    assert "--teacher-cache true" in text and memory.MEMORY_CHECK_ENV in text
    monkeypatch.setenv(memory.MEMORY_CHECK_ENV, "0")
    assert memory.check_memory_fits(cfg, torch.device("cuda")) is None
    monkeypatch.delenv(memory.MEMORY_CHECK_ENV)
    monkeypatch.setattr(memory, "device_memory", lambda device: (2 * needed, 2 * needed))
    assert memory.check_memory_fits(cfg, torch.device("cuda")).peak == needed
    assert memory.check_memory_fits(cfg, torch.device("cpu")) is None  # CPU runs are never refused


def test_refine_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, capsys):
    from clip_refine_lab.cli import main

    out_dir = tmp_path / "runs"
    code = main(["refine", "--dry-run", "--model", "ViT-bigG-14", "--pretrained", "none", "--batch-size", "512",
                 "--grad-checkpointing", "true", "--teacher-cache", "true", "--device", "cpu",
                 "--output-dir", str(out_dir)])
    text = capsys.readouterr().out
    assert code == 0 and not out_dir.exists()
    assert "memory estimate: ViT-bigG-14, 512 pairs per device" in text and "no teacher in memory" in text
    assert "peak" in text and "available RAM" in text
    assert main(["refine", "--dry-run", "--model", "no-such-arch", "--output-dir", str(out_dir)]) == 2
