import pytest

from clip_refine_lab.config import FIELD_HELP, ConfigError, RunConfig


@pytest.mark.parametrize("field,value,message", [
    ("alpha", 1.5, "alpha must be in [0, 1], got 1.5"),
    ("alpha", -0.1, "alpha must be in [0, 1], got -0.1"),
    ("temperature", 0.0, "temperature must be > 0, got 0.0"),
    ("method", "clip-refin", "did you mean 'clip-refine'"),
    ("prior", "gauss", "prior must be one of normal, uniform"),
    ("prior_sigma", -1.0, "prior_sigma must be >= 0, got -1.0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("accum_steps", 0, "accum_steps must be >= 1, got 0"),
    ("lr", "fast", "lr must be a number, got 'fast'"),
    ("val_fraction", 0.9, "val_fraction must be in [0, 0.5], got 0.9"),
    ("feature_space", "unit", "feature_space must be one of raw, normalized"),
    ("device", "tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value}).validate()
    assert message in str(err.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"batch_size \(10\) must be divisible by accum_steps \(4\)"):
        RunConfig(batch_size=10, accum_steps=4).validate()
    with pytest.raises(ConfigError, match="prior_low must be < prior_high"):
        RunConfig(prior="uniform", prior_low=1.0, prior_high=0.5).validate()
    with pytest.raises(ConfigError, match="prior 'fixed' needs prior_vector"):
        RunConfig(prior="fixed").validate()
    with pytest.raises(ConfigError, match="precision bf16 needs a GPU"):
        RunConfig(precision="bf16", device="cpu").validate()


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(method="hycd+l2", alpha=0.25, prior="fixed", prior_vector=[0.5, -1.0], lr=3e-6,
                    batch_size=64, accum_steps=4, extra={"note": "x"})
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert RunConfig.from_yaml(path) == cfg


def test_unknown_yaml_field_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("alpah: 0.3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown field 'alpah' \(did you mean 'alpha'\?\)"):
        RunConfig.from_yaml(path)


def test_resolved_fills_preset_defaults(monkeypatch):
    monkeypatch.setenv("CLIP_REFINE_LAB_PRESET", "micro")
    cfg = RunConfig().resolved()
    assert (cfg.preset, cfg.model, cfg.batch_size, cfg.data) == ("micro", "micro-vit-32", 32, "synthetic-coco")
    assert cfg.run_name.startswith("clip-refine-")
    explicit = RunConfig(preset="default", lr=1e-6).resolved()
    assert explicit.model == "tiny-vit-48" and explicit.lr == 1e-6


def test_every_field_has_help():
    import dataclasses

    assert {f.name for f in dataclasses.fields(RunConfig)} == set(FIELD_HELP)


def test_readme_option_table_lists_every_field():
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    for f in dataclasses.fields(RunConfig):
        assert f"| `{f.name}` |" in readme, f.name
