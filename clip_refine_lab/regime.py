"""Regime statistics: where a CLIP's feature space sits, beside a converged real CLIP's.

A post-pre-training method moves the geometry of a feature space from where the pre-training left it, and
where that is decides which way things move: the learned temperature shapes the modality gap (Liang et al.,
NeurIPS 2022, "Mind the Gap": at a high temperature contrastive training closes the gap, at a low one it
keeps it), and HyCD at T = 1 takes the sharpness of its softmaxes from the raw feature norms rather than from
the model's scale. So before reading a result, read the regime: :func:`model_regime` measures it for any model
on any caption set (:func:`clip_refine_lab.metrics.regime_statistics` on the matched first-caption pairs), and
:func:`format_regime` prints it beside :data:`REAL_VIT_B32_COCO`.
"""

from __future__ import annotations

import math
import os

import torch

from .config import ConfigError
from .data.manifest import Manifest, load_manifest
from .features import dataset_features, first_caption_pairs
from .metrics import regime_statistics
from .models.loading import LoadedModel

__all__ = ["REAL_VIT_B32_COCO", "REAL_VIT_B32_SOURCE", "REGIME_ROWS", "logit_scale_of", "model_regime", "regime_rows",
           "format_regime", "within_band"]

#: OpenAI CLIP ViT-B/32 on COCO, as published: the logit scale at its cap of 100 (the released weights);
#: ‖Δ‖²/d, alignment and RBF uniformity from CLIP-Refine's Table 3 (its gap column is 10³·‖Δ‖²/d = 1.3345,
#: so ‖Δ‖ = sqrt(512 · 1.3345e-3) ≈ 0.83; Liang et al. measure ≈ 0.82). The raw norms and the log uniformity
#: are not published: they stay blank rather than guessed.
REAL_VIT_B32_COCO = {"logit_scale": 100.0, "gap_l2": math.sqrt(512 * 1.3345e-3), "gap_mse": 1.3345e-3,
                     "alignment": 1.3724, "uniformity_rbf": 0.0895}
REAL_VIT_B32_SOURCE = "OpenAI CLIP ViT-B/32 on COCO (CLIP-Refine Table 3; Liang et al. 2022)"

#: (key, label, format) of each statistic, in the order reports print them.
REGIME_ROWS = [
    ("logit_scale", "logit scale", ".1f"),
    ("gap_l2", "modality gap ‖Δ‖", ".3f"),
    ("gap_mse", "‖Δ‖²/d (×10³)", ".4f"),
    ("alignment", "alignment", ".3f"),
    ("uniformity_log", "uniformity (log)", ".3f"),
    ("uniformity_rbf", "uniformity (RBF)", ".4f"),
    ("image_norm", "mean raw image norm", ".2f"),
    ("text_norm", "mean raw text norm", ".2f"),
    ("norm_product_over_scale", "‖f_I‖·‖f_T‖ / logit scale", ".2f"),
]
_SCALED = {"gap_mse": 1e3}  # printed as the paper prints it


def logit_scale_of(model: torch.nn.Module) -> float:
    """The learned logit scale of a CLIP-style model: exp of its ``logit_scale`` parameter (scalar or 1-element)."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ConfigError(f"{type(model).__name__} has no logit_scale parameter: regime statistics need a CLIP-style model")
    return float(scale.detach().exp().reshape(-1)[0])


def model_regime(loaded: LoadedModel, manifest: str | os.PathLike | Manifest, *, device: str | torch.device = "cpu",
                 data_root: str | None = None, progress: bool = False) -> dict[str, float]:
    """:func:`~clip_refine_lab.metrics.regime_statistics` of ``loaded`` on a caption set (each image with its
    first caption), through the feature cache."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, data_root=data_root)
    if manifest.kind != "captions":
        raise ConfigError(f"{manifest.path}: regime statistics need image-caption pairs, and this manifest is of "
                         f"kind '{manifest.kind}'; pass a caption set (COCO captions, synthetic-retrieval)")
    scale = logit_scale_of(loaded.model)
    fs = dataset_features(loaded, manifest, device=device, progress=progress)
    return regime_statistics(*first_caption_pairs(fs), scale)


def within_band(value: float, reference: float, band: float = 0.25) -> bool:
    """Whether ``value`` lies within ±``band`` (relative) of ``reference``."""
    return abs(value - reference) <= band * abs(reference)


def regime_rows(columns: dict[str, dict], reference: dict | None = None,
                reference_name: str = REAL_VIT_B32_SOURCE) -> list[dict[str, str]]:
    """One row per statistic: its label, each column's value and the reference's (blank where unpublished).

    ``columns`` maps a column name (a model) to its :func:`model_regime` dict; the rows are formatted strings,
    ready for a DataFrame or a Markdown table."""
    reference = REAL_VIT_B32_COCO if reference is None else reference
    rows = []
    for key, label, fmt in REGIME_ROWS:
        factor = _SCALED.get(key, 1.0)
        row = {"statistic": label}
        for name, stats in columns.items():
            row[name] = format(factor * stats[key], fmt) if key in stats else ""
        if reference_name:
            row[reference_name] = format(factor * reference[key], fmt) if key in reference else ""
        rows.append(row)
    return rows


def format_regime(columns: dict[str, dict], reference: dict | None = None,
                  reference_name: str = "real ViT-B/32 (COCO)") -> str:
    """The regime statistics of each column beside the reference, as a plain-text table."""
    rows = regime_rows(columns, reference, reference_name)
    names = list(rows[0])
    widths = [max(len(n), *(len(r[n]) for r in rows)) for n in names]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(names)] + [line([r[n] for n in names]) for r in rows])
