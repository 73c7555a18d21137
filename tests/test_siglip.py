"""SigLIP-family models (open_clip ``CustomTextCLIP`` with a learned logit bias): their own sigmoid objective,
embedding size, tokenizer dependencies, speed options, and every method end to end on a tiny random-init
SigLIP-shaped architecture (``micro-sigmoid-32``)."""

import copy
import math
import tomllib
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import load_file

from clip_refine_lab import losses
from clip_refine_lab.config import RunConfig
from clip_refine_lab.evaluation.evaluate import evaluate_run, load_run_models
from clip_refine_lab.methods import METHODS, get_method, loss_terms
from clip_refine_lab.models import families
from clip_refine_lab.models.checkpoints import save_checkpoint
from clip_refine_lab.models.loading import ModelNotAvailableError, load_model, tiny_architectures
from clip_refine_lab.optim import MAX_LOGIT_SCALE, clamp_logit_scale
from clip_refine_lab.rundir import read_log
from clip_refine_lab.training.loop import Refiner, refine

REPO = Path(__file__).resolve().parents[1]
SIGLIP = "micro-sigmoid-32"


def _features(batch=6, dim=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=dtype) * 3 for _ in range(2)]


# ------------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("bias", [-10.0, 0.5])
def test_sigmoid_loss_equals_open_clip_siglip_loss_in_value_and_gradients(bias):
    image, text = _features()
    ours = [t.clone().requires_grad_() for t in (image, text)]
    theirs = [t.clone().requires_grad_() for t in (image, text)]
    scale_ours, scale_theirs = (torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True) for _ in "ab")
    bias_ours, bias_theirs = (torch.tensor(bias, dtype=torch.float64, requires_grad=True) for _ in "ab")
    loss = losses.sigmoid_contrastive_loss(*ours, scale_ours.exp(), bias_ours)
    reference = SigLipLoss()(F.normalize(theirs[0], dim=-1), F.normalize(theirs[1], dim=-1), scale_theirs.exp(),
                             bias_theirs)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    loss.backward()
    reference.backward()
    for a, b in zip(ours + [scale_ours, bias_ours], theirs + [scale_theirs, bias_theirs]):
        assert a.grad is not None and a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_sigmoid_loss_scores_each_pair_on_its_own():
    """Each pair is its own binary decision, with no normaliser over the row: for orthogonal unit features
    (cosine 1 for the B true pairs, 0 elsewhere) the loss is softplus(−(s + b)) + (B − 1)·softplus(b)."""
    eye = torch.eye(4, dtype=torch.float64)
    value = losses.sigmoid_contrastive_loss(eye, eye, 10.0, -3.0)
    expected = F.softplus(torch.tensor(-(10.0 - 3.0), dtype=torch.float64)) + 3 * F.softplus(
        torch.tensor(-3.0, dtype=torch.float64))
    torch.testing.assert_close(value, expected.double(), rtol=0, atol=1e-12)


def test_m2_mix_sigmoid_at_lambda_zero_has_the_siglip_image_term():
    """At λ = 0 the mixed embeddings are the texts themselves: the image rows are SigLIP's logits."""
    image, text = _features(seed=3)
    cos_image, cos_text = losses._m2_mixed_cosines(image, text, 0.0)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(cos_image, x @ y.T, rtol=0, atol=1e-12)
    value = losses.m2_mix_sigmoid_loss(image, text, 0.0, 10.0, -5.0)
    text_rows = losses._pairwise_sigmoid_loss(10.0 * cos_text - 5.0)
    torch.testing.assert_close(value - text_rows, losses.sigmoid_contrastive_loss(image, text, 10.0, -5.0),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [0.3, 0.5])
def test_m2_mix_sigmoid_uses_the_mixed_embeddings_as_negatives(lam):
    image, text = _features(seed=5)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    mixed = losses.spherical_interpolation(x, y, lam)
    scale, bias = 7.0, -4.0
    expected = 0.0
    for rows in (x, y):
        for k in range(x.shape[0]):
            for j in range(x.shape[0]):
                if j == k:
                    expected += -F.logsigmoid(scale * (x[k] @ y[k]) + bias) / x.shape[0]
                else:
                    expected += -F.logsigmoid(-(scale * (rows[k] @ mixed[j]) + bias)) / x.shape[0]
    torch.testing.assert_close(losses.m2_mix_sigmoid_loss(image, text, lam, scale, bias), expected, rtol=0, atol=1e-10)


def test_m2_mix_sigmoid_is_finite_on_identical_features_and_trains_scale_and_bias():
    image, _ = _features(seed=7, dtype=torch.float32)
    features = image.clone().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = losses.m2_mix_sigmoid_loss(features, features, 0.5, scale, bias)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    assert scale.grad != 0 and bias.grad != 0


def test_methods_use_the_sigmoid_loss_when_the_model_has_a_logit_bias():
    image, text = _features(seed=11)
    cfg = RunConfig(preset="micro")
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    sig = loss_terms(get_method("m2-mix"), cfg, image, text, logit_scale=scale, logit_bias=bias, lam=0.4)
    soft = loss_terms(get_method("m2-mix"), cfg, image, text, logit_scale=scale, lam=0.4)
    torch.testing.assert_close(sig["clip"], losses.sigmoid_contrastive_loss(image, text, scale, bias))
    torch.testing.assert_close(sig["m2"], losses.m2_mix_sigmoid_loss(image, text, 0.4, scale, bias))
    torch.testing.assert_close(soft["clip"], losses.clip_contrastive_loss(image, text, scale))
    torch.testing.assert_close(soft["m2"], losses.m2_mix_loss(image, text, 0.4, logit_scale=scale))
    teacher = _features(seed=12)
    for name in ("hycd", "hycd+l2"):  # the feature losses are the same on any backbone
        with_bias = loss_terms(get_method(name), cfg, image, text, logit_scale=scale, logit_bias=bias,
                               teacher_image=teacher[0], teacher_text=teacher[1])
        without = loss_terms(get_method(name), cfg, image, text, logit_scale=scale,
                             teacher_image=teacher[0], teacher_text=teacher[1])
        assert torch.equal(with_bias["loss"], without["loss"])


def _siglip_ddp_worker(rank, world_size, init_file, image, text, expected_loss, expected_grads):
    """One rank: our gathered B×B sigmoid loss (x W, scale and bias carried by rank 0) and open_clip's
    distributed SigLipLoss on the local slice give the single-process loss and gradients."""
    import torch.distributed as dist

    from clip_refine_lab.distributed import gather_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = slice(rank * (image.shape[0] // world_size), (rank + 1) * (image.shape[0] // world_size))
        for implementation in ("ours", "open_clip"):
            leaves = [t.clone().requires_grad_() for t in (image, text)]
            log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
            if implementation == "ours":
                gi, gt = gather_features(leaves[0][local], leaves[1][local])
                carries = rank == 0
                loss = losses.sigmoid_contrastive_loss(gi, gt, log_scale.exp() if carries else log_scale.exp().detach(),
                                                       bias if carries else bias.detach())
                assert abs(loss.item() - expected_loss) <= 1e-12 * abs(expected_loss)
                (loss * world_size).backward()
            else:
                loss = SigLipLoss(rank=rank, world_size=world_size, dist_impl="gather")(
                    F.normalize(leaves[0][local], dim=-1), F.normalize(leaves[1][local], dim=-1), log_scale.exp(), bias)
                loss.backward()
            for tensor, expected in zip(leaves + [log_scale, bias], expected_grads):
                grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / world_size, expected, rtol=0, atol=1e-12, msg=implementation)
    finally:
        dist.destroy_process_group()


def test_gathered_sigmoid_loss_is_siglips_global_loss_on_two_processes(tmp_path):
    import torch.multiprocessing as mp

    image, text = _features(batch=8, seed=13)
    leaves = [t.clone().requires_grad_() for t in (image, text)]
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss = losses.sigmoid_contrastive_loss(*leaves, log_scale.exp(), bias)
    grads = [g.detach() for g in torch.autograd.grad(loss, leaves + [log_scale, bias])]
    mp.spawn(_siglip_ddp_worker, args=(2, str(tmp_path / "pg_init"), image, text, loss.item(), grads), nprocs=2,
             join=True)


# ----------------------------------------------------------------------------------- the family
def test_family_embedding_size_and_architecture():
    loaded = load_model(SIGLIP)
    model = loaded.model
    assert type(model).__name__ == "CustomTextCLIP" and not hasattr(model, "text_projection")
    assert families.model_family(model) == "siglip" and families.logit_bias(model) is model.logit_bias
    assert model.logit_bias.item() == -10 and model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.text.attn_mask is None and model.text.pool_type == "last"  # SigLIP's text tower
    assert families.model_family(load_model("micro-vit-32").model) == "clip"
    assert families.config_family(open_clip.get_model_config("ViT-B-16-SigLIP")) == "siglip"
    assert families.config_family(open_clip.get_model_config("ViT-B-32")) == "clip"
    tokens = loaded.tokenizer(["a red circle"])
    for arch in tiny_architectures():
        m = load_model(arch)
        with torch.no_grad():
            assert m.embed_dim == m.model.encode_text(tokens).shape[-1] > 0, arch


def test_embedding_size_of_a_text_tower_without_projection_comes_from_one_forward():
    model = open_clip.create_model(SIGLIP)
    model.text.text_projection = None  # the output is then the text tower's own width ...
    model.text.ln_final = torch.nn.Sequential(model.text.ln_final, torch.nn.Linear(32, 12))  # ... here 12
    forwards = []
    model.text.register_forward_hook(lambda module, args, out: forwards.append(out.shape))
    assert families.embed_dim(model) == families.embed_dim(model) == 12
    assert len(forwards) == 1  # asked once per model


def test_logit_scale_clamp_is_open_clips_for_every_family():
    model = load_model(SIGLIP).model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(112.3))
        model.logit_bias.fill_(-16.0)
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(MAX_LOGIT_SCALE)
    assert model.logit_bias.item() == -16.0  # never clamped


def test_a_hugging_face_tokenizer_without_transformers_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(families, "_importable", lambda module: False)
    message = families.missing_tokenizer_dependencies("ViT-B-16-SigLIP")
    assert "transformers" in message and f"pip install 'clip-refine-lab[{families.TOKENIZER_EXTRA}]'" in message
    assert "\n" not in message
    # a *siglip* name without an HF tokenizer takes open_clip's sentencepiece SigLipTokenizer
    with monkeypatch.context() as m:
        m.setattr(families, "_model_config", lambda arch, cache_dir: {"text_cfg": {}})
        assert "sentencepiece, protobuf" in families.missing_tokenizer_dependencies("my-vit-siglip")
    for arch in ("ViT-B-32", SIGLIP, "micro-vit-32"):  # open_clip's own BPE
        assert families.missing_tokenizer_dependencies(arch) is None
    with pytest.raises(ModelNotAvailableError, match=r"clip-refine-lab\[siglip\]"):
        load_model("ViT-B-16-SigLIP")  # refused before the model is built
    monkeypatch.setattr(families, "_importable", lambda module: True)
    assert families.missing_tokenizer_dependencies("ViT-B-16-SigLIP") is None


def test_the_named_extra_exists_and_installs_transformers():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = " ".join(extras[families.TOKENIZER_EXTRA]).lower()
    assert "transformers" in names and "sentencepiece" in names and "protobuf" in names


# ------------------------------------------------------------------------------ speed options
@pytest.mark.parametrize("pad_mask", [False, True])
def test_sdpa_attention_matches_open_clip_on_the_siglip_text_tower(pad_mask):
    from clip_refine_lab.models.speed import use_sdpa_attention

    torch.manual_seed(0)
    loaded = load_model(SIGLIP)
    native = loaded.model.train()
    native.text.use_pad_mask = pad_mask  # open_clip's per-row padding mask: (batch*heads, L, L)
    fast = copy.deepcopy(native)
    assert use_sdpa_attention(fast) == 2  # one image block, one text block
    images = torch.randn(3, 3, 32, 32)
    tokens = loaded.tokenizer(["a red circle", "two blue stars left of a big yellow square", "a"])

    def features_and_grads(model):
        model.zero_grad(set_to_none=True)
        fi, ft = model.encode_image(images), model.encode_text(tokens)
        losses.sigmoid_contrastive_loss(fi, ft, model.logit_scale.exp(), model.logit_bias).backward()
        return fi.detach(), ft.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    fi_n, ft_n, g_n = features_and_grads(native)
    fi_f, ft_f, g_f = features_and_grads(fast)
    torch.testing.assert_close(fi_f, fi_n, rtol=0, atol=1e-6)
    torch.testing.assert_close(ft_f, ft_n, rtol=0, atol=1e-6)
    assert g_n.keys() == g_f.keys()
    largest = max(g.abs().max().item() for g in g_n.values())
    for k in g_n:
        assert (g_f[k] - g_n[k]).abs().max().item() <= 1e-5 * largest, k


def test_trimming_is_skipped_for_the_siglip_text_tower_where_it_would_change_features():
    from clip_refine_lab.models.speed import encode_text_trimmed

    loaded = load_model(SIGLIP)
    tokens = loaded.tokenizer(["a red circle", "two blue stars"])
    with torch.no_grad():
        full = loaded.model.encode_text(tokens)
        assert torch.equal(encode_text_trimmed(loaded.model, tokens, buckets=2), full)
        # what trimming the padding would give: 'last' pooling then reads another column
        naive = loaded.model.encode_text(tokens[:, :8])
    assert not torch.allclose(naive, full, atol=1e-4)


def test_compile_towers_compiles_the_custom_text_tower():
    from clip_refine_lab.models.speed import compile_towers

    model = open_clip.create_model(SIGLIP)
    keys = list(model.state_dict())
    compile_towers(model)  # lazy: nothing is compiled until a forward
    assert model.visual._compiled_call_impl is not None and model.text._compiled_call_impl is not None
    assert list(model.state_dict()) == keys


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def siglip_start(tmp_path_factory):
    """A random-init micro SigLIP saved as a checkpoint: the user's starting weights."""
    torch.manual_seed(0)
    loaded = load_model(SIGLIP)
    return save_checkpoint(loaded.model, tmp_path_factory.mktemp("siglip") / "start.safetensors", loaded.spec)


def _config(tmp_path, start, method, **kw) -> RunConfig:
    values = dict(preset="micro", model=SIGLIP, pretrained=str(start), method=method, output_dir=str(tmp_path / "runs"),
                  run_name=method, batch_size=32, max_steps=2, val_every=1, lr=1e-3)
    values.update(kw)
    return RunConfig(**values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_refines_evaluates_and_reloads_a_siglip(tmp_path, micro_world, siglip_start, method):
    run_dir = refine(_config(tmp_path, siglip_start, method), progress=False)
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2]
    for record in log:
        assert all(math.isfinite(record[term]) for term in METHODS[method].terms + ("loss",))
        assert "logit_bias" in record and record["logit_scale"] <= MAX_LOGIT_SCALE
    if method == "self-kd":  # the teacher is an exact copy of the SigLIP student: zero at step 0
        assert log[0]["loss"] == pytest.approx(0.0, abs=1e-6)

    result = evaluate_run(run_dir, progress=False, device="cpu")
    for label in ("pre-trained", method):
        scores = result["models"][label]
        assert scores["zero_shot"] and all(0 <= s["top1"] <= 100 for s in scores["zero_shot"].values())
        assert all(math.isfinite(v) for s in scores["geometry"].values() for v in s.values())

    # the refined checkpoint reloads as the trained weights (the state the run ended with), not the start
    trained = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    saved = load_file(str(run_dir / "model_final.safetensors"))
    start = load_file(str(siglip_start))
    _, refined = load_run_models(run_dir, checkpoint="final")
    for route in (load_model(str(run_dir / "model_final.safetensors")).model.state_dict(), refined.model.state_dict()):
        assert route.keys() == trained.keys() == saved.keys()
        assert all(torch.equal(route[k], trained[k]) and torch.equal(saved[k], trained[k]) for k in trained)
    assert any(not torch.equal(start[k], trained[k]) for k in trained)


@pytest.mark.parametrize("method", ["contrastive", "m2-mix"])
def test_the_contrastive_terms_are_the_sigmoid_loss_and_train_the_logit_bias(tmp_path, micro_world, siglip_start,
                                                                              method):
    cfg = _config(tmp_path, siglip_start, method)
    refiner = Refiner(cfg.resolved(), progress=False)
    images, tokens, _ = next(iter(refiner.source.train_batches(0)))
    images, tokens = refiner.to_device(images, tokens)
    start = load_model(str(siglip_start)).model
    with torch.no_grad():
        fi, ft = start.encode_image(images), start.encode_text(tokens)
    expected = losses.sigmoid_contrastive_loss(fi, ft, start.logit_scale.exp(), start.logit_bias).item()
    softmax = ClipLoss()(F.normalize(fi, dim=-1), F.normalize(ft, dim=-1), start.logit_scale.exp()).item()
    assert abs(expected - softmax) > 1.0  # the two objectives are far apart here: the check can tell them apart

    refiner.model.zero_grad(set_to_none=True)
    terms = refiner.compute_loss(images, tokens, step=0, train=True)
    assert refiner.model.logit_bias.grad is not None and refiner.model.logit_bias.grad.abs() > 0
    assert refiner.model.logit_scale.grad is not None
    assert float(terms["clip"]) == pytest.approx(expected, rel=1e-5)

    run_dir = refine(cfg, progress=False)  # the logged step-1 loss is the same sigmoid loss
    assert read_log(run_dir)[0]["clip"] == pytest.approx(expected, rel=1e-5)


def test_the_feature_methods_leave_the_logit_bias_without_gradient(tmp_path, micro_world, siglip_start):
    refiner = Refiner(_config(tmp_path, siglip_start, "clip-refine").resolved(), progress=False)
    images, tokens, _ = next(iter(refiner.source.train_batches(0)))
    refiner.compute_loss(*refiner.to_device(images, tokens), step=0, train=True)
    assert refiner.model.logit_bias.grad is None and refiner.model.logit_scale.grad is None
