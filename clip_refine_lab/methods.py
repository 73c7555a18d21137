"""Named post-pre-training methods: which loss terms, with which weights, and whether a teacher is needed.

A method is a composition of the terms in :mod:`clip_refine_lab.losses`; every weight and
hyper-parameter comes from the run's :class:`~clip_refine_lab.config.RunConfig`:

=============  ==========================================  ===============
method         loss                                         teacher
=============  ==========================================  ===============
clip-refine    rafa_weight * L_RaFA + hycd_weight * L_HyCD  yes
contrastive    L_CLIP (the model's own contrastive loss)    no
m2-mix         L_CLIP + m2_weight * L_m2                     no
self-kd        hycd_weight * L_HyCD with alpha = 0           yes
hycd           hycd_weight * L_HyCD                          yes
hycd+l2        hycd_weight * L_HyCD + align_weight * L_align  yes
=============  ==========================================  ===============

Adding a method is one :func:`register_method` call.

The ``clip`` and ``m2`` terms use the model's own objective, with its learned logit scale: a
softmax model (CLIP) gets open_clip's ``ClipLoss`` and m²-mix's cross-entropy; a model with a
learned logit bias (SigLIP, :mod:`clip_refine_lab.models.families`) gets SigLIP's sigmoid loss with
that scale and bias, the mixed embeddings of m²-mix entering it as extra negatives. RaFA, HyCD and
the L2 alignment act on the features alone and apply to any backbone unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import losses

# term name -> (config field holding its weight, or None for weight 1)
TERM_WEIGHTS: dict[str, str | None] = {
    "rafa": "rafa_weight",
    "hycd": "hycd_weight",
    "clip": None,
    "align": "align_weight",
    "m2": "m2_weight",
}


@dataclass(frozen=True)
class Method:
    name: str
    terms: tuple[str, ...]
    needs_teacher: bool
    fixed_alpha: float | None = None  # self-kd pins alpha to 0 whatever the config says
    description: str = ""

    @property
    def needs_prior(self) -> bool:
        return "rafa" in self.terms

    @property
    def needs_mix(self) -> bool:
        return "m2" in self.terms


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    unknown = set(method.terms) - set(TERM_WEIGHTS)
    if unknown:
        raise ValueError(f"method '{method.name}' uses unknown loss terms {sorted(unknown)}; known: {sorted(TERM_WEIGHTS)}")
    METHODS[method.name] = method
    return method


register_method(Method("clip-refine", ("rafa", "hycd"), True, description="CLIP-Refine: RaFA + HyCD"))
register_method(Method("contrastive", ("clip",), False,
                       description="the model's own contrastive loss: open_clip's ClipLoss, or SigLipLoss for SigLIP"))
register_method(Method("m2-mix", ("clip", "m2"), False, description="contrastive + geodesic multimodal mixup"))
register_method(Method("self-kd", ("hycd",), True, fixed_alpha=0.0, description="distillation from the frozen teacher"))
register_method(Method("hycd", ("hycd",), True, description="hybrid contrastive-distillation alone"))
register_method(Method("hycd+l2", ("hycd", "align"), True, description="HyCD + L2 alignment of normalised pairs (Eq. 2)"))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def loss_terms(
    method: Method,
    cfg,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    teacher_image: torch.Tensor | None = None,
    teacher_text: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    lam: float | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted loss terms of ``method`` plus ``"loss"``, their weighted sum.

    ``image``/``text`` are the student's raw projected features of the (global) batch; ``z`` the
    RaFA prior sample (one row per pair), ``lam`` the m2-mix interpolation weight for this batch.
    ``logit_scale`` is the exponentiated learned scale; ``logit_bias``, the learned bias of a
    sigmoid-loss model (None for CLIP), makes the ``clip`` and ``m2`` terms SigLIP's sigmoid loss.
    """
    normalize = cfg.feature_space == "normalized"
    alpha = method.fixed_alpha if method.fixed_alpha is not None else cfg.alpha
    compute: dict[str, Callable[[], torch.Tensor]] = {
        "rafa": lambda: losses.random_feature_alignment(image, text, _need(z, "z", method), normalize=normalize),
        "hycd": lambda: losses.hybrid_contrastive_distillation(
            image, text, _need(teacher_image, "teacher features", method), _need(teacher_text, "teacher features", method),
            alpha=alpha, temperature=cfg.temperature, normalize=normalize),
        "clip": lambda: _contrastive(image, text, logit_scale, logit_bias),
        "align": lambda: losses.l2_alignment(image, text),
        "m2": lambda: _m2_mix(image, text, _need(lam, "lam", method), logit_scale, logit_bias),
    }
    terms = {name: compute[name]() for name in method.terms}
    total = sum(term * weight_of(name, cfg) for name, term in terms.items())
    terms["loss"] = total  # type: ignore[assignment]
    return terms


def _contrastive(image, text, logit_scale, logit_bias) -> torch.Tensor:
    if logit_bias is None:
        return losses.clip_contrastive_loss(image, text, logit_scale)
    return losses.sigmoid_contrastive_loss(image, text, logit_scale, logit_bias)


def _m2_mix(image, text, lam, logit_scale, logit_bias) -> torch.Tensor:
    if logit_bias is None:
        return losses.m2_mix_loss(image, text, lam, logit_scale=logit_scale)
    return losses.m2_mix_sigmoid_loss(image, text, lam, logit_scale, logit_bias)


def weight_of(term: str, cfg) -> float:
    field = TERM_WEIGHTS[term]
    return 1.0 if field is None else float(getattr(cfg, field))


def _need(value, what: str, method: Method):
    if value is None:
        raise ValueError(f"method '{method.name}' needs {what}, but none was given")
    return value
