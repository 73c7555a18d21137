"""Tests of clip_refine_lab.priors: determinism through the run's generator, the σ = 0 ablation,
ranges, the feature-statistics Gaussians, and the factory's error messages."""

from __future__ import annotations

import pytest
import torch

from clip_refine_lab.priors import (
    PRIOR_NAMES,
    FixedPrior,
    NormalPrior,
    Prior,
    UniformPrior,
    build_prior,
    feature_statistics,
)

DIM = 6


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _stats():
    features = torch.randn(200, DIM, generator=_generator(99), dtype=torch.float64) * 2 + 1
    return {"text": feature_statistics(features), "image": feature_statistics(features * 3), "all": feature_statistics(features - 5)}


def _all_priors():
    return {
        "normal": build_prior("normal"),
        "uniform": build_prior("uniform"),
        "text-stats": build_prior("text-stats", stats=_stats()),
        "image-stats": build_prior("image-stats", stats=_stats()),
        "all-stats": build_prior("all-stats", stats=_stats()),
        "fixed": build_prior("fixed", vector=torch.arange(DIM, dtype=torch.float64)),
    }


def test_prior_names_are_exact():
    assert PRIOR_NAMES == ("normal", "uniform", "text-stats", "image-stats", "all-stats", "fixed")
    assert set(_all_priors()) == set(PRIOR_NAMES)
    assert all(isinstance(prior, Prior) for prior in _all_priors().values())


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_same_seed_same_draws_regardless_of_global_rng(name):
    prior = _all_priors()[name]
    torch.manual_seed(1)
    first = prior.sample(4, DIM, _generator(7))
    torch.manual_seed(2)  # the global RNG must not matter
    again = prior.sample(4, DIM, _generator(7))
    assert first.shape == (4, DIM)
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", ["normal", "uniform", "text-stats", "image-stats", "all-stats"])
def test_different_seeds_and_successive_draws_differ(name):
    prior = _all_priors()[name]
    generator = _generator(7)
    first, second = prior.sample(4, DIM, generator), prior.sample(4, DIM, generator)
    assert not torch.equal(first, second)
    assert not torch.equal(prior.sample(4, DIM, _generator(7)), prior.sample(4, DIM, _generator(8)))


def test_sigma_zero_is_exactly_the_mean():
    assert torch.equal(build_prior("normal", sigma=0.0).sample(5, DIM, _generator(0)), torch.zeros(5, DIM))
    mean = torch.linspace(-1, 1, DIM)
    z = build_prior("normal", sigma=0.0, mean=mean).sample(5, DIM, _generator(0), dtype=torch.float32)
    assert torch.equal(z, mean.expand(5, DIM))


def test_sigma_scales_the_same_noise():
    """Runs differing only in σ see the same standard-normal draws (common random numbers)."""
    unit = build_prior("normal", sigma=1.0).sample(3, DIM, _generator(4), dtype=torch.float64)
    double = build_prior("normal", sigma=2.0).sample(3, DIM, _generator(4), dtype=torch.float64)
    assert torch.equal(double, 2 * unit)
    generator = _generator(4)
    build_prior("normal", sigma=0.0).sample(3, DIM, generator, dtype=torch.float64)
    after_zero = build_prior("normal", sigma=1.0).sample(3, DIM, generator, dtype=torch.float64)
    generator = _generator(4)
    build_prior("normal", sigma=1.0).sample(3, DIM, generator, dtype=torch.float64)
    after_one = build_prior("normal", sigma=1.0).sample(3, DIM, generator, dtype=torch.float64)
    assert torch.equal(after_zero, after_one)


def test_normal_moments_and_per_dimension_parameters():
    mean, std = torch.tensor([0.0, 5.0, -2.0]), torch.tensor([1.0, 0.1, 3.0])
    z = NormalPrior(mean=mean, std=std).sample(20000, 3, _generator(1), dtype=torch.float64)
    torch.testing.assert_close(z.mean(0), mean.double(), atol=0.06, rtol=0)
    torch.testing.assert_close(z.std(0), std.double(), atol=0, rtol=0.03)
    with pytest.raises(ValueError, match="3 dimensions but the features have 4"):
        NormalPrior(mean=mean).sample(2, 4, _generator(1))
    with pytest.raises(ValueError, match="std must be >= 0"):
        NormalPrior(std=torch.tensor([1.0, -0.5]))


def test_uniform_range_and_validation():
    z = build_prior("uniform", low=-0.5, high=2.0).sample(5000, DIM, _generator(3))
    assert z.min() >= -0.5 and z.max() < 2.0
    assert z.min() < -0.4 and z.max() > 1.9
    z01 = UniformPrior().sample(5000, DIM, _generator(3), dtype=torch.float64)
    assert 0.0 <= z01.min() and z01.max() < 1.0
    with pytest.raises(ValueError, match="low < high"):
        build_prior("uniform", low=1.0, high=1.0)
    with pytest.raises(ValueError, match="low < high"):
        UniformPrior(low=2.0, high=0.0)


def test_fixed_prior_broadcasts_the_vector():
    vector = torch.tensor([1.0, -2.0, 3.5])
    z = FixedPrior(vector).sample(4, 3, _generator(0))
    assert torch.equal(z, vector.expand(4, 3))
    z[0, 0] = 99.0  # the rows are independent memory, not a view of the prior's vector
    assert torch.equal(FixedPrior(vector).sample(1, 3, _generator(0))[0], vector)
    with pytest.raises(ValueError, match="3 dimensions but the features have 5"):
        FixedPrior(vector).sample(4, 5, _generator(0))


def test_requested_dtype_and_device():
    prior = build_prior("normal")
    assert prior.sample(2, DIM, _generator(0)).dtype == torch.get_default_dtype()
    assert prior.sample(2, DIM, _generator(0), dtype=torch.float64).dtype == torch.float64
    half = prior.sample(2, DIM, _generator(0), device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    # Half precision is drawn in float32 and rounded: the same stream as a float32 request.
    assert torch.equal(half, prior.sample(2, DIM, _generator(0), dtype=torch.float32).half())


def test_feature_statistics_shapes_and_values():
    features = torch.randn(50, DIM, generator=_generator(5)) * 3 + 2
    mean, std = feature_statistics(features)
    assert mean.shape == (DIM,) and std.shape == (DIM,)
    assert mean.dtype == features.dtype == std.dtype
    torch.testing.assert_close(mean, features.double().mean(0).float())
    torch.testing.assert_close(std, features.double().std(0, unbiased=False).float())
    single_mean, single_std = feature_statistics(features[:1])
    assert torch.equal(single_std, torch.zeros(DIM)) and torch.equal(single_mean, features[0])
    with pytest.raises(ValueError, match="N×d matrix"):
        feature_statistics(features[0])


def test_stats_priors_use_the_named_statistics():
    stats = _stats()
    for name, key in (("text-stats", "text"), ("image-stats", "image"), ("all-stats", "all")):
        prior = build_prior(name, stats=stats)
        z = prior.sample(4000, DIM, _generator(6), dtype=torch.float64)
        assert z.shape == (4000, DIM)
        mean, std = stats[key]
        torch.testing.assert_close(z.mean(0), mean, atol=0.1 * float(std.max()), rtol=0)
        torch.testing.assert_close(z.std(0), std, atol=0, rtol=0.06)


def test_factory_error_messages():
    with pytest.raises(ValueError, match=r"unknown prior 'gauss'; valid names: normal, uniform, text-stats, image-stats, all-stats, fixed"):
        build_prior("gauss")
    with pytest.raises(ValueError, match=r"prior sigma must be >= 0, got -1\.0"):
        build_prior("normal", sigma=-1.0)
    with pytest.raises(ValueError, match=r"prior sigma must be >= 0, got -1\.0"):
        build_prior("normal", sigma=-1)
    with pytest.raises(ValueError, match=r"prior 'text-stats' needs stats=.*got stats=None"):
        build_prior("text-stats")
    stats = _stats()
    del stats["image"]
    with pytest.raises(ValueError, match=r"prior 'image-stats' needs stats\['image'\] = \(mean, std\); stats has keys \['all', 'text'\]"):
        build_prior("image-stats", stats=stats)
    with pytest.raises(ValueError, match=r"prior 'fixed' needs vector="):
        build_prior("fixed")


# ------------------------------------------------------------------------------- the run's feature space
def _raw_features():
    gen = _generator(11)
    image = torch.randn(40, DIM, generator=gen) * 4 + 3  # norms far from 1: the two spaces differ
    text = torch.randn(60, DIM, generator=gen) * 2 - 1
    return image, text


def _direct(features: torch.Tensor, normalize: bool):
    x = features.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    return x.mean(0).float(), x.std(0, unbiased=False).float()


def test_feature_statistics_of_normalized_rows():
    image, _ = _raw_features()
    mean, std = feature_statistics(image, normalize=True)
    direct_mean, direct_std = _direct(image, normalize=True)
    torch.testing.assert_close(mean, direct_mean)
    torch.testing.assert_close(std, direct_std)
    raw_mean, raw_std = feature_statistics(image)
    assert (mean - raw_mean).abs().min() > 0.5 and (std - raw_std).abs().min() > 0.5


def test_prior_statistics_are_measured_in_the_run_space_and_never_reused_across_spaces(tmp_path):
    from safetensors import safe_open

    from clip_refine_lab.training.caches import PRIOR_STATS_FILE, prior_statistics

    image, text = _raw_features()
    calls = []

    def compute():
        calls.append(1)
        return image, text

    def stats(space):
        return prior_statistics(tmp_path, compute, rank=0, device=torch.device("cpu"), progress=False,
                                feature_space=space)

    def header():
        with safe_open(str(tmp_path / PRIOR_STATS_FILE), framework="pt") as f:
            return f.metadata()["feature_space"]

    for space in ("normalized", "raw"):
        before = len(calls)
        measured = stats(space)
        assert len(calls) == before + 1, f"{space}: a file of the other space must be measured again"
        assert header() == space
        again = stats(space)
        assert len(calls) == before + 1, f"{space}: the file of the same space must be read back"
        assert all(torch.equal(again[k][i], measured[k][i]) for k in again for i in (0, 1))
        for key, feats in (("image", image), ("text", text), ("all", torch.cat([image, text]))):
            for got, want in zip(stats(space)[key], _direct(feats, normalize=space == "normalized")):
                torch.testing.assert_close(got, want)
    normalized, raw = stats("normalized"), stats("raw")
    assert all((normalized[k][0] - raw[k][0]).abs().max() > 0.5 for k in ("image", "text", "all"))


def test_the_trainer_measures_the_prior_in_its_feature_space(tmp_path, micro_base):
    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.training.loop import Refiner

    cfg = RunConfig(preset="micro", output_dir=str(tmp_path), run_name="r", prior="text-stats",
                    feature_space="normalized", temperature=0.01, max_steps=1).resolved()
    refiner = Refiner(cfg, progress=False)
    _, text = refiner.source.stats_features(refiner.model, progress=False)
    mean, std = _direct(text, normalize=True)
    torch.testing.assert_close(refiner.prior.mean.float(), mean)
    torch.testing.assert_close(refiner.prior.std.float(), std)
    assert float(mean.norm()) < 1.0  # the mean of unit vectors, not of raw features
