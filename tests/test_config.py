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


# ------------------------------------------------------------------------------- registered methods
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def readme_method_example() -> str:
    """The README's code block that adds a method."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text[text.index("Adding a method is one call"):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def registry():
    """The method registry, restored after the test (other tests list its methods)."""
    from clip_refine_lab.methods import METHODS

    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def test_the_help_lists_the_built_in_methods_of_the_registry():
    from clip_refine_lab.config import METHOD_NAMES, method_names
    from clip_refine_lab.methods import METHODS

    assert method_names() == tuple(METHODS) and method_names()[:len(METHOD_NAMES)] == METHOD_NAMES


def test_a_registered_method_validates_and_an_unknown_one_is_named(registry):
    from clip_refine_lab.methods import Method, register_method

    registered_first = r"got 'distil-only'.*registered first with clip_refine_lab.methods.register_method"
    with pytest.raises(ConfigError, match=registered_first):
        RunConfig(method="distil-only").validate()
    register_method(Method("distil-only", ("hycd",), needs_teacher=True))
    assert RunConfig(method="distil-only").validate().method == "distil-only"
    assert RunConfig.from_dict({"method": "distil-only"}).method == "distil-only"
    with pytest.raises(ConfigError, match=r"got 'distil-onyl' \(did you mean 'distil-only'\?\)"):
        RunConfig(method="distil-onyl").validate()


def test_readme_method_example_runs_as_written(registry, micro_base, tmp_path):
    """The README block verbatim; only the run itself is shortened to one step in a temporary folder."""
    import functools
    import json
    import types

    import clip_refine_lab as crl
    from clip_refine_lab.rundir import read_log

    short = functools.partial(RunConfig, preset="micro", max_steps=1, output_dir=str(tmp_path), run_name="mine")
    namespace = {"crl": types.SimpleNamespace(refine=functools.partial(crl.refine, progress=False), RunConfig=short)}
    exec(readme_method_example(), namespace)
    assert "rafa-only" in registry and not registry["rafa-only"].needs_teacher
    run_dir = namespace["run_dir"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
    (record,) = read_log(run_dir)
    assert set(record) >= {"rafa", "loss"} and "hycd" not in record
    assert record["loss"] == pytest.approx(record["rafa"])


# ------------------------------------------------------------------------------- doubtful combinations
def test_normalized_features_at_a_high_temperature_warn_when_resolved(monkeypatch):
    from clip_refine_lab.config import ConfigWarning

    monkeypatch.setenv("CLIP_REFINE_LAB_PRESET", "micro")
    why = r"feature_space 'normalized' with temperature 1: .*cosines in \[-1, 1\].*about 0\.01"
    with pytest.warns(ConfigWarning, match=why):
        RunConfig(feature_space="normalized").resolved()
    with pytest.warns(ConfigWarning, match="temperature 0.5"):
        RunConfig(feature_space="normalized", temperature=0.5, method="hycd").resolved()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        RunConfig(feature_space="normalized", temperature=0.01).resolved()  # the intended setting
        RunConfig(feature_space="raw", temperature=1.0).resolved()  # the released code's
        RunConfig(feature_space="normalized", method="contrastive").resolved()  # no HyCD term: T unused
        RunConfig(feature_space="normalized").validate()  # reading a run's config back does not warn


def test_cli_prints_the_warning_once_as_one_line(tmp_path, capsys):
    from clip_refine_lab.cli import main

    code = main(["refine", "--feature-space", "normalized", "--model", "micro-vit-32", "--preset", "micro",
                 "--pretrained", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "missing.yaml"),
                 "--output-dir", str(tmp_path / "runs"), "--run-name", "r"])
    err = capsys.readouterr().err
    assert code == 2 and "clip-refine-lab: error:" in err
    warning_lines = [line for line in err.splitlines()
                     if "ConfigWarning" in line or line.startswith("clip-refine-lab: warning:")]
    assert warning_lines == [line for line in err.splitlines()
                        if line.startswith("clip-refine-lab: warning: feature_space 'normalized' with temperature 1:")]
    assert len(warning_lines) == 1, err
