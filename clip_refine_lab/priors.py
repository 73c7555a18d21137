"""The prior p(z) of random feature alignment (RaFA).

Each training step draws z (B×d) from a prior; row k is the target shared by the image and the text
of pair k (see :func:`clip_refine_lab.losses.random_feature_alignment`). The paper's Table 4 compares
N(0, I) (the default and best), U(0, 1), Gaussians with the per-dimension mean/variance of the
pre-trained text, image or all features, and N(0, σ²I) over σ, including σ = 0 (z = 0, no
randomness), which is worse: the randomness matters.

Every draw goes through a ``torch.Generator`` that the run seeds, so the same seed gives the same
sequence of z whatever else consumes the global RNG. Draws are made on the generator's device in
float32/float64 (never in half or bfloat16, whose CPU samplers are slow or missing) and then moved to
the requested device and dtype, so a run's z sequence does not depend on where the model lives.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = [
    "PRIOR_NAMES",
    "Prior",
    "NormalPrior",
    "UniformPrior",
    "FixedPrior",
    "feature_statistics",
    "build_prior",
]

PRIOR_NAMES: tuple[str, ...] = ("normal", "uniform", "text-stats", "image-stats", "all-stats", "fixed")

_STATS_PRIORS = {"text-stats": "text", "image-stats": "image", "all-stats": "all"}


def _as_parameter(value: float | torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    """A scalar or a per-dimension vector, held in float64 on the CPU until sampling."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    if tensor.dim() > 1:
        raise ValueError(f"{what} must be a scalar or a per-dimension vector, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} must be finite, got {value}")
    return tensor


def _check_dim(tensor: torch.Tensor, dim: int, what: str) -> None:
    if tensor.dim() == 1 and tensor.shape[0] != dim:
        raise ValueError(f"{what} has {tensor.shape[0]} dimensions but the features have {dim}")


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _describe(tensor: torch.Tensor) -> str:
    return f"{tensor.item():g}" if tensor.dim() == 0 else f"<{tensor.shape[0]}-dim vector>"


class Prior:
    """A distribution over RaFA targets. Subclasses implement :meth:`sample`."""

    def sample(
        self,
        batch_size: int,
        dim: int,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Draw a ``batch_size × dim`` tensor of targets through ``generator``."""
        raise NotImplementedError

    @staticmethod
    def _resolve(
        generator: torch.Generator, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device, torch.dtype]:
        out_device = torch.device(device) if device is not None else generator.device
        return out_device, dtype if dtype is not None else torch.get_default_dtype()


class NormalPrior(Prior):
    """N(mean, diag(std²)); ``mean`` and ``std`` are floats or per-dimension vectors.

    ``std = 0`` is allowed and gives z = mean exactly (the paper's σ = 0 ablation). The standard
    normal draw is made even then, so runs that differ only in σ consume the generator identically
    and see the same noise, scaled (common random numbers across a σ sweep).
    """

    def __init__(self, mean: float | torch.Tensor = 0.0, std: float | torch.Tensor = 1.0):
        self.mean = _as_parameter(mean, "normal prior mean")
        self.std = _as_parameter(std, "normal prior std")
        if (self.std < 0).any():
            got = _describe(self.std) if self.std.dim() == 0 else "a vector with negative entries"
            raise ValueError(f"normal prior std must be >= 0, got {got}")

    def sample(self, batch_size, dim, generator, device=None, dtype=None):
        _check_dim(self.mean, dim, "normal prior mean")
        _check_dim(self.std, dim, "normal prior std")
        device, dtype = self._resolve(generator, device, dtype)
        draw_dtype = _draw_dtype(dtype)
        noise = torch.randn(batch_size, dim, generator=generator, device=generator.device, dtype=draw_dtype)
        mean = self.mean.to(device=noise.device, dtype=draw_dtype)
        std = self.std.to(device=noise.device, dtype=draw_dtype)
        return (mean + std * noise).to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"NormalPrior(mean={_describe(self.mean)}, std={_describe(self.std)})"


class UniformPrior(Prior):
    """U(low, high) per element; ``low`` and ``high`` are floats or per-dimension vectors."""

    def __init__(self, low: float | torch.Tensor = 0.0, high: float | torch.Tensor = 1.0):
        self.low = _as_parameter(low, "uniform prior low")
        self.high = _as_parameter(high, "uniform prior high")
        if not (self.low < self.high).all():
            raise ValueError(f"uniform prior needs low < high, got low={_describe(self.low)}, high={_describe(self.high)}")

    def sample(self, batch_size, dim, generator, device=None, dtype=None):
        _check_dim(self.low, dim, "uniform prior low")
        _check_dim(self.high, dim, "uniform prior high")
        device, dtype = self._resolve(generator, device, dtype)
        draw_dtype = _draw_dtype(dtype)
        unit = torch.rand(batch_size, dim, generator=generator, device=generator.device, dtype=draw_dtype)
        low = self.low.to(device=unit.device, dtype=draw_dtype)
        high = self.high.to(device=unit.device, dtype=draw_dtype)
        return (low + (high - low) * unit).to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"UniformPrior(low={_describe(self.low)}, high={_describe(self.high)})"


class FixedPrior(Prior):
    """A point mass: every row of z is ``vector`` (d,). Consumes no randomness."""

    def __init__(self, vector: torch.Tensor | Sequence[float]):
        self.vector = _as_parameter(vector, "fixed prior vector")
        if self.vector.dim() != 1:
            raise ValueError("fixed prior vector must be 1-D (one value per feature dimension)")

    def sample(self, batch_size, dim, generator, device=None, dtype=None):
        _check_dim(self.vector, dim, "fixed prior vector")
        device, dtype = self._resolve(generator, device, dtype)
        return self.vector.to(device=device, dtype=dtype).expand(batch_size, dim).clone()

    def __repr__(self) -> str:
        return f"FixedPrior(vector={_describe(self.vector)})"


def feature_statistics(features: torch.Tensor, *, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of an N×d feature matrix.

    The statistics must be those of the space RaFA compares z with: the raw features for the
    default raw-feature RaFA, the L2-normalised rows for ``feature_space="normalized"`` (pass
    ``normalize=True``, which divides each row by its norm, as the loss does, before measuring). For
    the "all" statistics pass the image and text features concatenated along dim 0.

    Accumulated in float64 and returned in the features' dtype. The std is the population one
    (divide by N), the maximum-likelihood Gaussian fit; N = 1 gives std 0.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"feature_statistics expects a non-empty N×d matrix, got shape {tuple(features.shape)}")
    as_float64 = features.detach().to(torch.float64)
    if normalize:
        as_float64 = torch.nn.functional.normalize(as_float64, dim=-1)
    mean = as_float64.mean(dim=0)
    std = as_float64.std(dim=0, unbiased=False)
    out_dtype = features.dtype if features.is_floating_point() else torch.get_default_dtype()
    return mean.to(out_dtype), std.to(out_dtype)


def build_prior(
    name: str,
    *,
    sigma: float = 1.0,
    mean: float | torch.Tensor = 0.0,
    low: float | torch.Tensor = 0.0,
    high: float | torch.Tensor = 1.0,
    vector: torch.Tensor | Sequence[float] | None = None,
    stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Prior:
    """The prior called ``name`` (one of :data:`PRIOR_NAMES`).

    - ``"normal"``: N(mean, σ²I) with σ = ``sigma`` (default N(0, I); σ = 0 allowed: z = mean).
    - ``"uniform"``: U(low, high).
    - ``"text-stats"`` / ``"image-stats"`` / ``"all-stats"``: N(μ, diag(s²)) with (μ, s) =
      ``stats["text"|"image"|"all"]``, as computed by :func:`feature_statistics` on the pre-trained
      model's features in the run's feature space.
    - ``"fixed"``: every row of z equals ``vector``.

    ``sigma`` and ``mean`` apply to "normal" only; ``low``/``high`` to "uniform" only.
    """
    if name not in PRIOR_NAMES:
        raise ValueError(f"unknown prior {name!r}; valid names: {', '.join(PRIOR_NAMES)}")
    if name == "normal":
        if sigma < 0:
            raise ValueError(f"prior sigma must be >= 0, got {float(sigma)}")
        return NormalPrior(mean=mean, std=sigma)
    if name == "uniform":
        return UniformPrior(low=low, high=high)
    if name == "fixed":
        if vector is None:
            raise ValueError("prior 'fixed' needs vector= (one value per feature dimension)")
        return FixedPrior(vector)
    key = _STATS_PRIORS[name]
    if stats is None:
        raise ValueError(
            f"prior {name!r} needs stats={{'{key}': (mean, std), ...}} computed with feature_statistics "
            "on the pre-trained features; got stats=None"
        )
    if key not in stats:
        raise ValueError(
            f"prior {name!r} needs stats['{key}'] = (mean, std); stats has keys {sorted(stats)}"
        )
    try:
        stat_mean, stat_std = stats[key]
    except (TypeError, ValueError):
        raise ValueError(f"prior {name!r}: stats['{key}'] must be a (mean, std) pair") from None
    return NormalPrior(mean=stat_mean, std=stat_std)
