"""Tests of clip_refine_lab.losses and clip_refine_lab.distributed.

The reference vectors (tests/data/vectors.json) were computed in float64 by an independent
implementation of REFERENCE.md's formulas; the property tests check the identities that REFERENCE.md
derives (HyCD's decomposition, Self-KD's zero at step 0, RaFA's pair/midpoint split) and m²-mix on a
hand-computable 2-D example. The last test runs two gloo processes to check the gather-and-scale rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_refine_lab.distributed import gather_features, is_main_process, world_info
from clip_refine_lab.losses import (
    clip_contrastive_loss,
    hard_negative_contrastive_loss,
    hybrid_contrastive_distillation,
    l2_alignment,
    m2_mix_loss,
    random_feature_alignment,
    spherical_interpolation,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())
CASES = VECTORS["cases"]
REL = 1e-9
FEATURE_KEYS = ("student_image", "student_text", "teacher_image", "teacher_text", "reference_z")


def _case_tensors(case):
    return {key: torch.tensor(case[key], dtype=torch.float64) for key in FEATURE_KEYS}


def _random_features(batch=6, dim=5, seed=0, scale=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, dim, generator=generator, dtype=dtype) for _ in range(5)]


# --------------------------------------------------------------------------- reference vectors


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}d{c['d']}")
def test_rafa_matches_vectors(case):
    t = _case_tensors(case)
    raw = random_feature_alignment(t["student_image"], t["student_text"], t["reference_z"])
    normalized = random_feature_alignment(t["student_image"], t["student_text"], t["reference_z"], normalize=True)
    assert raw.item() == pytest.approx(case["rafa_raw"], rel=REL)
    assert normalized.item() == pytest.approx(case["rafa_normalized"], rel=REL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}d{c['d']}")
@pytest.mark.parametrize("temperature", [1, 2])
@pytest.mark.parametrize("alpha", [0, 0.5, 1])
def test_hycd_raw_matches_vectors(case, temperature, alpha):
    t = _case_tensors(case)
    loss = hybrid_contrastive_distillation(
        t["student_image"], t["student_text"], t["teacher_image"], t["teacher_text"],
        alpha=alpha, temperature=temperature,
    )
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(case[f"hycd_raw_T{temperature}_alpha{alpha}"], rel=REL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}d{c['d']}")
def test_hycd_normalized_matches_vectors(case):
    t = _case_tensors(case)
    loss = hybrid_contrastive_distillation(
        t["student_image"], t["student_text"], t["teacher_image"], t["teacher_text"],
        alpha=0.5, temperature=0.01, normalize=True,
    )
    assert loss.item() == pytest.approx(case["hycd_normalized_T0.01_alpha0.5"], rel=REL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}d{c['d']}")
def test_clip_loss_and_alignment_match_vectors(case):
    t = _case_tensors(case)
    image, text = t["student_image"], t["student_text"]
    assert clip_contrastive_loss(image, text, 100.0).item() == pytest.approx(case["clip_loss_scale100"], rel=REL)
    scale = torch.tensor(100.0, dtype=torch.float64)
    assert clip_contrastive_loss(image, text, scale).item() == pytest.approx(case["clip_loss_scale100"], rel=REL)
    assert l2_alignment(image, text).item() == pytest.approx(case["l2_align"], rel=REL)


# --------------------------------------------------------------------------- HyCD properties


def _cross_entropy_both_ways(logits):
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _soft_cross_entropy_both_ways(logits, teacher_logits, temperature):
    def one_way(s, p):
        return -(F.softmax(p / temperature, dim=1) * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()

    return 0.5 * (one_way(logits, teacher_logits) + one_way(logits.T, teacher_logits.T))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_hycd_alpha_one_is_cross_entropy_times_t_squared(temperature):
    image, text, teacher_image, teacher_text, _ = _random_features()
    loss = hybrid_contrastive_distillation(image, text, teacher_image, teacher_text, alpha=1.0, temperature=temperature)
    expected = temperature**2 * _cross_entropy_both_ways(image @ text.T / temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=REL)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hycd_gradient_is_mixture_of_hard_and_soft_cross_entropy(alpha, temperature):
    """KL(α·e + (1−α)·q ‖ p) = α·CE(e, p) + (1−α)·CE(q, p) − H(target): same gradient, shifted value."""
    image, text, teacher_image, teacher_text, _ = _random_features(seed=1)
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    hycd = hybrid_contrastive_distillation(*student, teacher_image, teacher_text, alpha=alpha, temperature=temperature)
    hycd_grads = torch.autograd.grad(hycd, student)

    mixed = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    logits, teacher_logits = mixed[0] @ mixed[1].T, teacher_image @ teacher_text.T
    surrogate = temperature**2 * (
        alpha * _cross_entropy_both_ways(logits / temperature)
        + (1 - alpha) * _soft_cross_entropy_both_ways(logits, teacher_logits, temperature)
    )
    surrogate_grads = torch.autograd.grad(surrogate, mixed)
    for got, expected in zip(hycd_grads, surrogate_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)

    # The value differs by the target entropy, a constant of the teacher: T²·½·mean_k H(q_t[k]) both ways.
    def target_entropy(p):
        eye = torch.eye(p.shape[0], dtype=p.dtype)
        target = alpha * eye + (1 - alpha) * F.softmax(p / temperature, dim=1)
        return -torch.xlogy(target, target).sum(dim=1).mean()

    entropy = 0.5 * temperature**2 * (target_entropy(teacher_logits) + target_entropy(teacher_logits.T))
    assert hycd.item() == pytest.approx((surrogate - entropy).item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_self_kd_is_zero_when_student_equals_teacher(dtype, normalize):
    """Step 0 of Self-KD (α = 0): loss exactly 0, gradient 0 up to the rounding of Σ softmax = 1."""
    image, text, *_ = _random_features(seed=2, dtype=dtype)
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    temperature = 0.05 if normalize else 1.0
    loss = hybrid_contrastive_distillation(*student, image, text, alpha=0.0, temperature=temperature, normalize=normalize)
    assert loss.item() == 0.0
    loss.backward()
    eps = torch.finfo(dtype).eps
    for tensor in student:
        assert tensor.grad.abs().max().item() <= 10 * eps

    # With α > 0 the step-0 loss is not zero: the one-hot part pulls toward the true pairs.
    assert hybrid_contrastive_distillation(image, text, image, text, alpha=0.5).item() > 1e-3


def test_hycd_treats_teacher_as_constant():
    image, text, teacher_image, teacher_text, _ = _random_features(seed=3)
    teacher = [teacher_image.clone().requires_grad_(), teacher_text.clone().requires_grad_()]
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    hybrid_contrastive_distillation(*student, *teacher, alpha=0.5).backward()
    assert all(t.grad is None for t in teacher)
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in student)


def test_hycd_handles_saturated_softmax_and_low_precision():
    # Huge logits: the teacher softmax underflows to exact zeros; no NaN/inf may appear.
    image, text, teacher_image, teacher_text, _ = _random_features(seed=4, scale=30.0, dtype=torch.float32)
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    for alpha in (0.0, 0.5, 1.0):
        loss = hybrid_contrastive_distillation(*student, teacher_image, teacher_text, alpha=alpha)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, student)
        assert all(torch.isfinite(g).all() for g in grads)


def test_hycd_validates_arguments():
    image, text, teacher_image, teacher_text, _ = _random_features()
    with pytest.raises(ValueError, match="alpha must be in"):
        hybrid_contrastive_distillation(image, text, teacher_image, teacher_text, alpha=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        hybrid_contrastive_distillation(image, text, teacher_image, teacher_text, temperature=0.0)
    with pytest.raises(ValueError, match="batch size"):
        hybrid_contrastive_distillation(image, text[:3], teacher_image, teacher_text)


# --------------------------------------------------------------------------- RaFA properties


def test_rafa_z_row_only_affects_its_own_pair():
    image, text, _, _, z = _random_features(seed=5)
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    base = torch.autograd.grad(random_feature_alignment(*student, z), student)
    k = 2
    z_changed = z.clone()
    z_changed[k] += 1.7
    changed = torch.autograd.grad(random_feature_alignment(*student, z_changed), student)
    for before, after in zip(base, changed):
        rows_changed = (before != after).any(dim=1)
        assert rows_changed.tolist() == [row == k for row in range(image.shape[0])]


def test_rafa_is_pair_alignment_plus_midpoint_pull():
    """Per element (a−z)² + (b−z)² = ½(a−b)² + 2(m−z)², m = (a+b)/2 (REFERENCE.md)."""
    image, text, _, _, z = _random_features(seed=6)
    midpoint = (image + text) / 2
    expected = (0.5 * (image - text) ** 2 + 2 * (midpoint - z) ** 2).mean()
    assert random_feature_alignment(image, text, z).item() == pytest.approx(expected.item(), rel=REL)


def test_rafa_normalize_uses_unit_features_and_raw_z():
    image, text, _, _, z = _random_features(seed=7)
    expected = F.mse_loss(F.normalize(image, dim=-1), z) + F.mse_loss(F.normalize(text, dim=-1), z)
    assert random_feature_alignment(image, text, z, normalize=True).item() == pytest.approx(expected.item(), rel=REL)
    # z in another dtype is cast to the features' dtype; the result keeps the features' dtype.
    loss32 = random_feature_alignment(image.float(), text.float(), z)
    assert loss32.dtype == torch.float32


def test_rafa_rejects_mismatched_z():
    image, text, _, _, z = _random_features()
    with pytest.raises(ValueError, match="same shape"):
        random_feature_alignment(image, text, z[:, :3])


# --------------------------------------------------------------------------- CLIP loss and L_align


def test_clip_loss_matches_formula_and_passes_scale_gradient():
    image, text, *_ = _random_features(seed=8)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = clip_contrastive_loss(image, text, log_scale.exp())
    logits = log_scale.exp().detach() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    assert loss.item() == pytest.approx(_cross_entropy_both_ways(logits).item(), rel=REL)
    loss.backward()
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


def test_hard_negative_loss_without_negatives_is_clip_loss():
    image, text, *_ = _random_features(seed=9)
    none = text[:0]
    assert hard_negative_contrastive_loss(image, text, none, 14.0).item() == pytest.approx(
        clip_contrastive_loss(image, text, 14.0).item(), rel=REL)


def test_hard_negative_loss_matches_formula():
    """Negatives widen only the image->text softmax (they have no image), by hand in float64."""
    image, text, *_ = _random_features(seed=10)
    negatives = torch.randn(3, text.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    scale = 20.0
    i, t, n = (F.normalize(x, dim=-1) for x in (image, text, negatives))
    labels = torch.arange(image.shape[0])
    per_image = F.cross_entropy(scale * i @ torch.cat([t, n]).T, labels)
    per_text = F.cross_entropy(scale * t @ i.T, labels)
    loss = hard_negative_contrastive_loss(image, text, negatives, scale)
    assert loss.item() == pytest.approx(0.5 * (per_image + per_text).item(), rel=REL)
    # a negative equal to an image's true caption is as likely as the truth: the loss rises
    assert hard_negative_contrastive_loss(image, text, text[:2], scale) > clip_contrastive_loss(image, text, scale)
    with pytest.raises(ValueError, match="negative_text_features"):
        hard_negative_contrastive_loss(image, text, negatives[:, :3], scale)


def test_l2_alignment_is_two_minus_two_mean_cosine():
    image, text, *_ = _random_features(seed=9)
    cosine = F.cosine_similarity(image, text, dim=-1)
    assert l2_alignment(image, text).item() == pytest.approx((2 - 2 * cosine.mean()).item(), rel=REL)
    assert l2_alignment(image, 5 * image).item() == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- m²-mix


def _unit_circle(angles):
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_spherical_interpolation_endpoints_and_great_circle():
    image, text, *_ = _random_features(seed=10)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(spherical_interpolation(x, y, 1.0), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(spherical_interpolation(x, y, 0.0), y, rtol=0, atol=1e-12)
    mixed = spherical_interpolation(x, y, 0.3)
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(x.shape[0], dtype=torch.float64))
    # At angle λθ from y and (1−λ)θ from x.
    theta = torch.arccos((x * y).sum(-1))
    torch.testing.assert_close(torch.arccos((mixed * y).sum(-1).clamp(-1, 1)), 0.3 * theta)
    torch.testing.assert_close(torch.arccos((mixed * x).sum(-1).clamp(-1, 1)), 0.7 * theta)


@pytest.mark.parametrize("lam", [0.3, 0.5])
def test_m2_mix_on_hand_computed_circle_example(lam):
    """B = 2, d = 2: x_k at angle a_k, y_k at b_k, so m_k is at angle b_k + λ(a_k − b_k)."""
    a, b = [0.1, 1.4], [0.9, 2.0]
    c = [b[k] + lam * (a[k] - b[k]) for k in range(2)]
    scale = 100.0
    # Unnormalised inputs: the loss must normalise them.
    image = _unit_circle(a) * torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    text = _unit_circle(b) * torch.tensor([[2.0], [7.0]], dtype=torch.float64)

    def row_loss(positive, negative):  # CE of a 2-way row: log(1 + exp(s·(neg − pos)))
        return math.log1p(math.exp(scale * (negative - positive)))

    image_term = (row_loss(math.cos(a[0] - b[0]), math.cos(a[0] - c[1]))
                  + row_loss(math.cos(a[1] - b[1]), math.cos(a[1] - c[0]))) / 2
    text_term = (row_loss(math.cos(b[0] - a[0]), math.cos(b[0] - c[1]))
                 + row_loss(math.cos(b[1] - a[1]), math.cos(b[1] - c[0]))) / 2
    got = m2_mix_loss(image, text, lam, logit_scale=scale)
    assert got.item() == pytest.approx(image_term + text_term, rel=1e-9)


def test_m2_mix_at_lambda_zero_has_clip_image_term():
    """λ = 0 gives m_j = y_j, so L^I is CLIP's image→text logit matrix and L^T has y_k·y_j negatives."""
    image, text, *_ = _random_features(seed=11)
    x, y = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    labels = torch.arange(x.shape[0])
    eye = torch.eye(x.shape[0], dtype=torch.bool)
    text_logits = torch.where(eye, (x * y).sum(-1, keepdim=True), y @ y.T)
    expected = F.cross_entropy(100 * x @ y.T, labels) + F.cross_entropy(100 * text_logits, labels)
    assert m2_mix_loss(image, text, 0.0).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_m2_mix_is_nan_free_on_identical_features(dtype):
    image, *_ = _random_features(seed=12, dtype=dtype)
    for text in (image.clone(), 4 * image.clone()):
        student = [image.clone().requires_grad_(), text.requires_grad_()]
        loss = m2_mix_loss(*student, torch.tensor(0.37))
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, student)
        assert all(torch.isfinite(g).all() for g in grads)
    # Exactly coincident unit rows (θ = 0 after rounding) take the straight-mix limit.
    x = F.normalize(image, dim=-1)
    assert torch.isfinite(spherical_interpolation(x, x, 0.25)).all()


def test_m2_mix_gradient_is_finite_and_nonzero():
    image, text, *_ = _random_features(seed=13, scale=1.0)
    student = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    grads = torch.autograd.grad(m2_mix_loss(*student, 0.42, logit_scale=10.0), student)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="lambda must be in"):
        m2_mix_loss(image, text, 1.5)


# --------------------------------------------------------------------------- distributed


def test_gather_features_is_identity_without_process_group():
    image, text, z, *_ = _random_features()
    gathered = gather_features(image, text, z)
    assert all(g is t for g, t in zip(gathered, (image, text, z)))
    assert world_info() == (0, 1) and is_main_process()


def _ddp_worker(rank, world_size, init_file, full_inputs, expected_loss, expected_grads):
    """One rank: local slices of replicated leaf tensors → gather → global loss × W → backward."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        assert world_info() == (rank, world_size) and is_main_process() == (rank == 0)
        # The "parameters": the global feature matrices, identical on every rank like DDP's replicas.
        student = [tensor.clone().requires_grad_() for tensor in full_inputs[:2]]
        teacher_image, teacher_text, z = full_inputs[2:]
        local = slice(rank * (z.shape[0] // world_size), (rank + 1) * (z.shape[0] // world_size))

        image, text, t_image, t_text, z_all = gather_features(
            student[0][local], student[1][local], teacher_image[local], teacher_text[local], z[local]
        )
        loss = hybrid_contrastive_distillation(image, text, t_image, t_text, alpha=0.5) + random_feature_alignment(
            image, text, z_all
        )
        assert abs(loss.item() - expected_loss) <= 1e-12 * abs(expected_loss)
        (loss * world_size).backward()

        for tensor, expected in zip(student, expected_grads):
            grad = tensor.grad
            outside = torch.ones(grad.shape[0], dtype=torch.bool)
            outside[local] = False
            # Backward reaches this rank's slice only ...
            assert grad[outside].abs().max().item() == 0.0
            # ... and DDP's average of the ×W gradients is the single-process gradient, per slice.
            torch.testing.assert_close(grad[local] / world_size, expected[local], rtol=0, atol=1e-12)
            dist.all_reduce(grad)
            torch.testing.assert_close(grad / world_size, expected, rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_gathered_losses_with_world_size_scaling_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    world_size, batch, dim = 2, 8, 5
    full_inputs = _random_features(batch=batch, dim=dim, seed=14, scale=1.5)
    student = [tensor.clone().requires_grad_() for tensor in full_inputs[:2]]
    loss = hybrid_contrastive_distillation(*student, full_inputs[2], full_inputs[3], alpha=0.5) + random_feature_alignment(
        *student, full_inputs[4]
    )
    expected_grads = [g.detach() for g in torch.autograd.grad(loss, student)]
    mp.spawn(
        _ddp_worker,
        args=(world_size, str(tmp_path / "pg_init"), full_inputs, loss.item(), expected_grads),
        nprocs=world_size,
        join=True,
    )
