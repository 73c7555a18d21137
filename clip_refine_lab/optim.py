"""The one optimiser, learning-rate schedule and temperature clamp, shared by base pre-training and
post-pre-training.

AdamW with open_clip's weight-decay split (no decay on gains, biases and the logit scale) or, for the
released CLIP-Refine code's setting, decay on every parameter; a linear warm-up followed by a cosine
decay to zero (or a constant rate); and open_clip's clamp of the learned temperature at 100.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import SCHEDULES

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(logit_scale)


def is_gain_or_bias(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule for the parameters that take no weight decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def fused_adamw_available(device: torch.device) -> bool:
    """The fused AdamW kernel is much faster than the per-parameter loop (CPU support since torch 2.4)."""
    if device.type == "cuda":
        return True
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def build_adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float, weight_decay: float,
                betas: tuple[float, float], eps: float, exclude_gains: bool,
                device: torch.device, logit_scale_lr_factor: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with ``exclude_gains`` gains, biases and the logit scale
    take no weight decay (they are in a second group, after the decayed weights).

    ``logit_scale_lr_factor`` puts the logit scale in a group of its own, without weight decay, whose
    learning rate is that many times the others' at every step (:func:`set_lr` keeps the ratio). AdamW
    moves a parameter by about one learning rate per step, so at a base lr the log-scale crosses the ~2
    units from 1/0.07 to the cap of 100 only over thousands of steps; a short pre-training needs its own rate."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    own = [(n, p) for n, p in params if logit_scale_lr_factor is not None and n.endswith("logit_scale")]
    params = [(n, p) for n, p in params if all(p is not q for _, q in own)]
    if exclude_gains:
        groups = [{"params": [p for n, p in params if not is_gain_or_bias(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in params if is_gain_or_bias(n, p)], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    if own:
        groups.append({"params": [p for _, p in own], "weight_decay": 0.0, "lr_factor": logit_scale_lr_factor,
                       "lr": lr * logit_scale_lr_factor})
    kwargs = {"fused": True} if fused_adamw_available(device) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def lr_at(step: int, total: int, *, lr: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning rate of ``step`` (0-based) of ``total``: linear warm-up over ``warmup_steps``, then
    cosine decay to 0 at ``total`` (``schedule="cosine"``) or constant."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        return lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    if schedule == "constant":
        return lr * warm
    raise ValueError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_factor`` (1 unless the group has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the learned temperature at or below 100 after each optimiser step, as open_clip's training does.

    The same rule for every model family. CLIP caps exp(logit_scale) at 100, and open_clip's trainer
    (``open_clip_train/train.py``) clamps the log-scale to [0, ln 100] after every step for every
    model, its ``--siglip`` runs included, and never clamps ``logit_bias``; so does this, and a
    SigLIP refined here follows the rule it follows when fine-tuned with open_clip. Released SigLIP
    weights sit above the cap (ViT-SO400M-14-SigLIP-384: exp(4.72) ≈ 112; their pre-training did not
    cap it), so their first step here brings the scale to 100, as open_clip's fine-tuning does. The
    scale only enters the contrastive losses, never the features, so evaluation does not see it.
    """
    model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
