"""Loss functions of CLIP-Refine and of the paper's baselines, as pure functions on feature tensors.

Every function takes feature matrices (B×d, one row per image-text pair, row k of the image matrix
matching row k of the text matrix) and returns a scalar tensor. Nothing here knows about models,
data or configs, and nothing gathers across processes: in distributed training call these on the
output of :func:`clip_refine_lab.distributed.gather_features` (and read that module's note on
scaling the loss by the world size).

Notation (docs/method.md): F_I, F_T are the student's projected image / text features, G_I, G_T
the frozen teacher's; "raw" is what open_clip's ``encode_image`` / ``encode_text`` return without
``normalize=True``; F̂ is F divided by its L2 norm.

Where the paper's text and the authors' released code disagree, the functions offer both through a
``normalize`` flag whose default follows the released code (raw features).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "random_feature_alignment",
    "hybrid_contrastive_distillation",
    "clip_contrastive_loss",
    "hard_negative_contrastive_loss",
    "l2_alignment",
    "spherical_interpolation",
    "m2_mix_loss",
    "sigmoid_contrastive_loss",
    "m2_mix_sigmoid_loss",
]

# m²-mix: cosines are clamped this far inside [-1, 1] so that arccos (and its derivative
# -1/sqrt(1 - c²)) stays finite when a pair's image and text features coincide.
_COSINE_CLAMP = 1e-7
# Below this sin θ the slerp weights sin(λθ)/sin θ are replaced by their θ → 0 limit λ.
_SIN_THETA_EPS = 1e-6


def _check_pairs(name: str, *tensors: torch.Tensor) -> None:
    """All tensors must be 2-D with the same number of rows (pairs)."""
    for t in tensors:
        if t.dim() != 2:
            raise ValueError(f"{name}: expected B×d feature matrices, got shape {tuple(t.shape)}")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"{name}: feature matrices disagree on the batch size: {[tuple(t.shape) for t in tensors]}")


def random_feature_alignment(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    z: torch.Tensor,
    normalize: bool = False,
) -> torch.Tensor:
    """RaFA: pull the image and the text feature of each pair toward the same random sample.

        L_RaFA = mean_{k,j} (F_I[k,j] − z[k,j])² + mean_{k,j} (F_T[k,j] − z[k,j])²

    ``z`` (B×d) is drawn from the prior p(z) (see :mod:`clip_refine_lab.priors`) once per step; row k
    is shared by the image and the text of pair k. Sharing is the point: per element,
    (a−z)² + (b−z)² = ½(a−b)² + 2(m−z)² with m = (a+b)/2, so the loss is a pair-alignment term plus a
    pull of the pair's midpoint toward z (in expectation toward the prior's mean).

    ``normalize=False`` (default) uses the raw features, as the released code does; ``normalize=True``
    L2-normalises the features first (the paper's text). ``z`` itself is never normalised.
    """
    _check_pairs("random_feature_alignment", image_features, text_features, z)
    if image_features.shape != text_features.shape or z.shape != image_features.shape:
        raise ValueError(
            "random_feature_alignment: image, text and z must have the same shape, got "
            f"{tuple(image_features.shape)}, {tuple(text_features.shape)}, {tuple(z.shape)}"
        )
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    # z comes from a prior sampled on the run's generator device/dtype; meet the features where they are.
    z = z.to(device=image_features.device, dtype=image_features.dtype)
    return F.mse_loss(image_features, z) + F.mse_loss(text_features, z)


def _distillation_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """D(S, P) = (1/B) Σ_k KL(q_t[k] ‖ q_s[k]) · T², q_t[k] = α·e_k + (1−α)·softmax(P[k]/T).

    The target is built in log space, log q_t = logaddexp(log α + log e, log(1−α) + log_softmax(P/T)),
    so that (i) a teacher softmax that underflows never produces log 0, and (ii) at α = 0 with S = P
    bitwise, log q_t − log q_s is exactly zero and Self-KD's step-0 loss is exactly 0. Entries with
    q_t = 0 (the off-diagonal one-hot at α = 1) contribute 0·log 0 = 0, as in ``kl_div``.
    """
    num_rows = student_logits.shape[0]
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    with torch.no_grad():
        dtype, device = teacher_logits.dtype, teacher_logits.device
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        alpha_t = torch.as_tensor(alpha, dtype=dtype, device=device)
        eye = torch.eye(num_rows, teacher_logits.shape[1], dtype=torch.bool, device=device)
        log_one_hot = torch.zeros((), dtype=dtype, device=device).masked_fill(~eye, float("-inf"))
        log_target = torch.logaddexp(alpha_t.log() + log_one_hot, torch.log1p(-alpha_t) + log_teacher)
        target = log_target.exp()
        # Where the target is 0 the KL term is 0·(log 0 − ·) = 0; keep log_target finite there so the
        # product is a clean 0 rather than 0·(−inf).
        log_target = torch.where(target > 0, log_target, torch.zeros((), dtype=dtype, device=device))
    kl = (target * (log_target - log_student)).sum() / num_rows
    return kl * temperature**2


def hybrid_contrastive_distillation(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """HyCD: distil the frozen teacher's cross-modal similarities, with the true pair mixed in.

        S = F_I F_Tᵀ (student logits),  P = G_I G_Tᵀ (teacher logits, no gradient)
        q_s[k] = softmax(S[k]/T),       q_t[k] = α·e_k + (1−α)·softmax(P[k]/T)
        D(S, P) = (1/B) Σ_k KL(q_t[k] ‖ q_s[k]) · T²      ("batchmean")
        L_HyCD = ½ · (D(S, P) + D(Sᵀ, Pᵀ))

    α = 0 is Self-KD (plain distillation; exactly 0 while the student equals the teacher); α = 1 is
    the symmetric cross-entropy on S/T times T². Since KL(α·e + (1−α)·q ‖ p) = α·CE(e, p)
    + (1−α)·CE(q, p) − H(target), the gradient is that of α·(contrastive CE) + (1−α)·(soft-target CE).

    Defaults follow the released code: raw features, T = 1 (raw ViT-B/32 dot products are already on
    the scale of CLIP's own logits, ≈ 100 × cosine). ``normalize=True`` L2-normalises all four
    feature matrices first, as the paper's text reads; then a small T (e.g. 0.01) is needed.
    The teacher features are used under ``no_grad`` whether or not they require grad.
    """
    _check_pairs("hybrid_contrastive_distillation", student_image, student_text, teacher_image, teacher_text)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"HyCD alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"HyCD temperature must be > 0, got {temperature}")
    if normalize:
        student_image = F.normalize(student_image, dim=-1)
        student_text = F.normalize(student_text, dim=-1)
    student_logits = student_image @ student_text.T
    with torch.no_grad():
        if normalize:
            teacher_image = F.normalize(teacher_image, dim=-1)
            teacher_text = F.normalize(teacher_text, dim=-1)
        teacher_logits = teacher_image @ teacher_text.T
    image_to_text = _distillation_divergence(student_logits, teacher_logits, alpha, temperature)
    text_to_image = _distillation_divergence(student_logits.T, teacher_logits.T, alpha, temperature)
    return 0.5 * (image_to_text + text_to_image)


@functools.lru_cache(maxsize=1)
def _open_clip_loss():
    # Imported lazily: importing open_clip pulls in timm and the model zoo (seconds), which every
    # other loss here, and processes that only need them (e.g. DDP workers), can do without.
    from open_clip.loss import ClipLoss

    return ClipLoss()  # world_size=1: features arrive already gathered; no label cache.


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, exactly open_clip's ``ClipLoss``.

        logits = logit_scale · F̂_I F̂_Tᵀ,   L = ½ (CE(logits, diag) + CE(logitsᵀ, diag))

    ``logit_scale`` is the already-exponentiated scale (``model.logit_scale.exp()``, ≤ 100 for
    pre-trained CLIPs), a tensor (keeps its gradient) or a float. The features are normalised here,
    since ``ClipLoss`` expects unit vectors. This is the paper's standard "Contrastive" baseline; the
    released code's variant (raw features × a fresh learnable scale) is not reproduced here.
    """
    _check_pairs("clip_contrastive_loss", image_features, text_features)
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device)
    return _open_clip_loss()(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale)


def hard_negative_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    negative_text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """CLIP's InfoNCE with extra negative captions for the images (NegCLIP, Yuksekgonul et al., ICLR 2023).

        logits_I = logit_scale · F̂_I [F̂_T; F̂_N]ᵀ,   logits_T = logit_scale · F̂_T F̂_Iᵀ,
        L = ½ (CE(logits_I, diag) + CE(logits_T, diag))

    ``negative_text_features`` (H×d, H ≥ 0) are captions that are false of every image in the batch,
    typically a true caption with its relation words swapped ("left of" → "right of"). They only widen
    the image→text softmax: they have no image of their own, so the text→image term is CLIP's. In a
    random web batch hardly any other caption names the same two objects, so a relation word never has
    to be read to find the right caption; the swapped copy makes it the only difference. With H = 0 this
    is exactly :func:`clip_contrastive_loss`.
    """
    _check_pairs("hard_negative_contrastive_loss", image_features, text_features)
    if negative_text_features.dim() != 2 or negative_text_features.shape[1] != text_features.shape[1]:
        raise ValueError("hard_negative_contrastive_loss: negative_text_features must be H×d with the text features' d, "
                         f"got {tuple(negative_text_features.shape)} beside {tuple(text_features.shape)}")
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    negatives = F.normalize(negative_text_features, dim=-1)
    labels = torch.arange(image.shape[0], device=image.device)
    logits_per_image = logit_scale * image @ torch.cat([text, negatives]).T
    logits_per_text = logit_scale * text @ image.T
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def l2_alignment(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """L_align (Eq. 2, the "+" of HyCD+): mean_k ‖F̂_I[k] − F̂_T[k]‖² on normalised features.

    Equal to Wang & Isola's alignment (α = 2) over the batch, and to 2 − 2·mean_k cos(F_I[k], F_T[k]).
    """
    _check_pairs("l2_alignment", image_features, text_features)
    difference = F.normalize(image_features, dim=-1) - F.normalize(text_features, dim=-1)
    return difference.pow(2).sum(dim=-1).mean()


def spherical_interpolation(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Row-wise geodesic mix of unit vectors, weight ``lam`` on ``x`` (m²-mix's convention).

        θ_k = arccos(x_k·y_k),   m_k = [sin(λθ_k)·x_k + sin((1−λ)θ_k)·y_k] / sin θ_k

    λ = 1 gives x, λ = 0 gives y; m_k lies on the great circle through x_k and y_k, at angle λθ_k from
    y_k. ``x`` and ``y`` must already be unit rows. The cosine is clamped to [−1+1e-7, 1−1e-7] so
    arccos and its gradient stay finite; where sin θ is still ≈ 0 (identical rows, or a clamp that
    rounds to ±1 in low precision) the weights take their θ → 0 limit (λ, 1−λ), i.e. a straight mix.
    """
    cosine = (x * y).sum(dim=-1, keepdim=True).clamp(-1 + _COSINE_CLAMP, 1 - _COSINE_CLAMP)
    theta = torch.arccos(cosine)
    sin_theta = torch.sin(theta)
    degenerate = sin_theta.abs() < _SIN_THETA_EPS
    # A safe denominator rather than where() after dividing: where() would still route a NaN/inf
    # gradient through the untaken branch.
    safe_sin_theta = torch.where(degenerate, torch.ones_like(sin_theta), sin_theta)
    lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    weight_x = torch.where(degenerate, lam.expand_as(theta), torch.sin(lam * theta) / safe_sin_theta)
    weight_y = torch.where(degenerate, (1 - lam).expand_as(theta), torch.sin((1 - lam) * theta) / safe_sin_theta)
    return weight_x * x + weight_y * y


def m2_mix_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    lam: torch.Tensor | float,
    logit_scale: torch.Tensor | float = 100.0,
) -> torch.Tensor:
    """m²-mix's hard-negative term (Oh et al., NeurIPS 2023), on normalised features.

    With x_k = F̂_I[k], y_k = F̂_T[k] and m_j = :func:`spherical_interpolation` (x_j, y_j, λ):

        L^I[k,j] = s · (x_k·y_k if j = k else x_k·m_j)
        L^T[k,j] = s · (y_k·x_k if j = k else y_k·m_j)
        L_m² = CE(L^I, diag) + CE(L^T, diag)          (no ½; each CE is a mean over rows)

    The positives are the true pairs; the negatives are the mixed embeddings of the other pairs,
    which lie between the two modalities and are therefore harder. ``lam`` is one Beta(β, β) draw
    (β = 0.5) per batch, sampled by the caller so that this function stays deterministic. The full
    baseline objective is ``clip_contrastive_loss + w · m2_mix_loss`` (w ∈ {0.05, …, 0.001}).
    The paper's authors did not release m²-mix; this follows the paper's description of it.
    """
    _check_pairs("m2_mix_loss", image_features, text_features)
    cosines_image, cosines_text = _m2_mixed_cosines(image_features, text_features, lam)
    labels = torch.arange(cosines_image.shape[0], device=cosines_image.device)
    return (F.cross_entropy(cosines_image * logit_scale, labels)
            + F.cross_entropy(cosines_text * logit_scale, labels))


def _pairwise_sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss on a B×B logit matrix whose diagonal holds the true pairs:
    −(1/B) Σ_{k,j} log σ(y[k,j]·logits[k,j]) with y = +1 on the diagonal and −1 elsewhere."""
    num_rows = logits.shape[0]
    labels = 2 * torch.eye(num_rows, logits.shape[1], device=logits.device, dtype=logits.dtype) - torch.ones_like(logits)
    return -F.logsigmoid(labels * logits).sum() / num_rows


def sigmoid_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023), equal to open_clip's ``SigLipLoss`` on one process.

        logits = logit_scale · F̂_I F̂_Tᵀ + logit_bias,   y[k,j] = +1 if j = k else −1
        L = −(1/B) Σ_{k,j} log σ(y[k,j] · logits[k,j])

    Every image-text pair of the batch is an independent binary decision, true pair or not; the
    learned bias (−10 at initialisation) offsets the B − 1 negatives of each row. ``logit_scale`` is
    the exponentiated scale (``model.logit_scale.exp()``) and ``logit_bias`` the model's
    ``logit_bias``, tensors (their gradients flow) or floats. The features are normalised here.

    Distributed: open_clip's ``SigLipLoss`` sums, on each process, its local images against the
    texts of every process (divided by the local batch size), and DDP averages the gradients: that
    is exactly this B×B loss on the all-gathered global batch, which is what the trainer computes.
    """
    _check_pairs("sigmoid_contrastive_loss", image_features, text_features)
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    return _pairwise_sigmoid_loss(logit_scale * image @ text.T + logit_bias)


def _m2_mixed_cosines(image_features: torch.Tensor, text_features: torch.Tensor,
                      lam: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """m²-mix's B×B cosine matrices: the true pair on the diagonal, the mixed embeddings of the other
    pairs off it (rows: the images, then the texts; :func:`m2_mix_loss` documents the construction)."""
    lam_value = float(lam)
    if not 0.0 <= lam_value <= 1.0:
        raise ValueError(f"m2-mix lambda must be in [0, 1], got {lam_value}")
    x = F.normalize(image_features, dim=-1)
    y = F.normalize(text_features, dim=-1)
    mixed = spherical_interpolation(x, y, lam)
    positive = (x * y).sum(dim=-1)
    diagonal = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return (torch.where(diagonal, positive.unsqueeze(1), x @ mixed.T),
            torch.where(diagonal, positive.unsqueeze(1), y @ mixed.T))


def m2_mix_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    lam: torch.Tensor | float,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """m²-mix's hard-negative term for a sigmoid-loss (SigLIP) model: the same logits, SigLIP's loss.

    With the cosine matrices of :func:`m2_mix_loss` (true pair x_k·y_k on the diagonal, x_k·m_j and
    y_k·m_j for the mixed embeddings m_j of the other pairs off it):

        L^I = s · C^I + b,   L^T = s · C^T + b
        L_m² = sig(L^I) + sig(L^T),   sig(L) = −(1/B) Σ_{k,j} log σ(y[k,j] · L[k,j])

    m²-mix hardens the negatives of the model's own contrastive objective; for a model trained with
    the sigmoid loss that objective scores each pair on its own, so the mixed embeddings enter as
    extra negatives of SigLIP's pairwise loss (with the model's learned scale s and bias b) rather
    than of a softmax it was never trained with. The full baseline objective is
    ``sigmoid_contrastive_loss + w · m2_mix_sigmoid_loss``.
    """
    _check_pairs("m2_mix_sigmoid_loss", image_features, text_features)
    cosines_image, cosines_text = _m2_mixed_cosines(image_features, text_features, lam)
    return (_pairwise_sigmoid_loss(logit_scale * cosines_image + logit_bias)
            + _pairwise_sigmoid_loss(logit_scale * cosines_text + logit_bias))
