"""The one configuration object of a post-pre-training run, its presets and validation.

Defaults follow the authors' released code, which differs from the paper's text in two places,
both selectable here:

* ``feature_space="raw"``: RaFA and HyCD act on the raw projected features (released code). The
  paper's text writes normalised features: ``feature_space="normalized"``.
* ``temperature=1.0`` on raw features (released code): with raw ViT-B/32 features the logits are of
  the order of CLIP's own (about 100 x cosine). On normalised features the logits are cosines in
  [-1, 1]: at T = 1 HyCD's softmaxes are close to uniform and its distillation target carries almost
  nothing of the teacher, so a temperature of about 0.01 (1 / CLIP's logit scale of 100) puts them
  back on CLIP's scale. ``feature_space="normalized"`` with ``temperature >= 0.5`` for a method with a
  HyCD term therefore gives a :class:`ConfigWarning` when the run is resolved
  (:meth:`RunConfig.resolved`, which :func:`~clip_refine_lab.training.loop.refine` calls), not an
  error: the loss stays well defined and such a run is a fair ablation, only rarely what is meant.

``method`` is any name in the method registry (:data:`clip_refine_lab.methods.METHODS`): the
built-in methods, and any added with :func:`clip_refine_lab.methods.register_method` before the
config is validated.

Fields left ``None`` are filled from the *preset* when the config is resolved: ``default`` (the
embedded world and the tiny ViT pre-trained on it) or ``micro`` (a very small world and model for
tests and CI, seconds). The preset is chosen by the ``preset`` field or, when that is ``None``, by the
``CLIP_REFINE_LAB_PRESET`` environment variable, so notebooks and CI can switch without edits.

``python -m clip_refine_lab.config > docs/options.md`` regenerates the options reference from
:data:`FIELD_HELP` and the field defaults (:func:`options_markdown`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .utils import PRESET_ENV, atomic_write

# The built-in methods (clip_refine_lab.methods registers them), for help texts. Validation asks the
# registry itself, imported only then: it pulls in torch, which `--help` should not wait for.
METHOD_NAMES = ("clip-refine", "contrastive", "m2-mix", "self-kd", "hycd", "hycd+l2")
PRIOR_NAMES = ("normal", "uniform", "text-stats", "image-stats", "all-stats", "fixed")
FEATURE_SPACES = ("raw", "normalized")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "native")
SCHEDULES = ("constant", "cosine")
BAD_SAMPLE_POLICIES = ("fail", "skip")
DEFAULT_DATA = "synthetic-coco"  # the training pairs of a run that names none


@dataclass(frozen=True)
class Preset:
    """Defaults that depend on the scale of the run (the embedded world, the model, the budget)."""

    name: str
    world: str  # the synthetic world's preset (world.WorldConfig.preset)
    model: str  # tiny architecture pre-trained on that world
    lr: float
    batch_size: int
    epochs: float


# Embedded defaults chosen by zero-shot accuracy on the world's validation slices
# (sweeps/embedded_defaults.yaml; docs/embedded-world.md): lr 1e-5 scored 66.07 % against 66.00 % for
# 1e-6 and 64.87 % for 1e-4. The paper's own (lr 1e-6, batch 512, 1 epoch) are for ViT-B/32 on COCO:
# a real run passes them explicitly (README, "Real models and data").
PRESETS: dict[str, Preset] = {
    "default": Preset("default", world="default", model="tiny-vit-48", lr=1e-5, batch_size=256, epochs=2),
    "micro": Preset("micro", world="micro", model="micro-vit-32", lr=1e-4, batch_size=32, epochs=1),
}


def preset_name(name: str | None = None) -> str:
    name = name or os.environ.get(PRESET_ENV) or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}' (from {'the config' if name else PRESET_ENV}); "
                         f"choose one of {', '.join(PRESETS)}")
    return name


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class ConfigWarning(UserWarning):
    """A valid combination of options that is rarely what is meant; the message says why."""


# HyCD on unit vectors: logits are cosines in [-1, 1]; from this temperature up its softmaxes are flat.
NORMALIZED_MAX_TEMPERATURE = 0.5


def registered_methods() -> dict:
    """The method registry: name -> :class:`~clip_refine_lab.methods.Method`, built-in ones first."""
    from .methods import METHODS

    return METHODS


def method_names() -> tuple[str, ...]:
    """Every method a config may name: the built-in ones and those registered since."""
    return tuple(registered_methods())


RUN_NAME_RULE = ("a folder name: not empty, no '/' or '\\', not starting with '.' (so not '..'), "
                 "no spaces at either end, no control characters")


def check_run_name(name: Any) -> None:
    """Refuse a run name that is not one folder inside output_dir (empty, a path, hidden, '..')."""
    ok = (isinstance(name, str) and name.strip() == name and name != "" and not name.startswith(".")
          and "/" not in name and "\\" not in name and os.sep not in name
          and not any(ord(c) < 32 or ord(c) == 127 for c in name))
    if not ok:
        raise ConfigError(f"run_name must be {RUN_NAME_RULE}; got {name!r}")


@dataclass
class RunConfig:
    """Every option of a post-pre-training run; docs/options.md lists each with its meaning."""

    # what to run
    method: str = "clip-refine"
    preset: str | None = None
    # loss hyper-parameters
    alpha: float = 0.5
    temperature: float = 1.0
    feature_space: str = "raw"
    rafa_weight: float = 1.0
    hycd_weight: float = 1.0
    align_weight: float = 1.0  # HyCD+ (L2 alignment on normalised features)
    m2_weight: float = 0.01  # m2-mix: total = L_CLIP + w * L_m2 (its authors swept 0.05 ... 0.001)
    m2_beta: float = 0.5  # lambda ~ Beta(beta, beta) per batch
    # RaFA prior p(z)
    prior: str = "normal"
    prior_mean: float = 0.0
    prior_sigma: float = 1.0
    prior_low: float = 0.0
    prior_high: float = 1.0
    prior_vector: list[float] | None = None
    # optimisation
    lr: float | None = None
    weight_decay: float = 0.1
    no_decay_gains: bool = False  # exclude gains, biases and logit scale from weight decay (open_clip)
    schedule: str = "constant"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    batch_size: int | None = None
    accum_steps: int = 1
    epochs: float | None = None
    max_steps: int | None = None
    precision: str = "fp32"
    attention: str = "sdpa"  # "sdpa" (batch-first scaled_dot_product_attention) or "native" (nn.MultiheadAttention)
    compile: bool = False  # torch.compile the towers (GPU, long runs)
    channels_last: bool | None = None  # NHWC for convolutional image towers; None = on GPU only
    grad_checkpointing: bool = False  # recompute each transformer block's activations in backward (less memory)
    fsdp: bool = False  # shard student and teacher across torchrun processes (FSDP2 fully_shard)
    seed: int = 0
    device: str = "auto"
    # validation and checkpoints
    val_fraction: float = 0.01
    val_every: int | None = None  # steps; None = four times per epoch
    checkpoint_every: int | None = None  # steps; None = with every validation
    # model and data
    model: str | None = None
    pretrained: str | None = "embedded"
    quick_gelu: bool | None = None
    data: str | None = None  # manifest path, or a synthetic split name such as "synthetic-coco"
    data_root: str | None = None
    on_bad_sample: str = "fail"
    num_workers: int = 0
    teacher_cache: bool = False  # teacher features from the feature cache: computed once, reused across runs
    image_cache: bool = False  # decoded, resized images as a uint8 memory map: decoded once, reused across runs
    leakage_suite: str | None = None  # suite YAML whose evaluation sets are checked for overlap (image ids) at start
    # output
    output_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run

    # ---------------------------------------------------------------------------------- checking
    def validate(self) -> "RunConfig":
        """Raise ConfigError naming the first invalid field; return self for chaining."""

        def one_of(name: str, allowed: tuple, note: str = "") -> None:
            value = getattr(self, name)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}{hint}{note}")

        def number(name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                   integer: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
                kind = "an integer" if integer else "a number"
                raise ConfigError(f"{name} must be {kind}, got {value!r}")
            if value != value:  # NaN
                raise ConfigError(f"{name} must be a number, got nan")
            if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
                left = "(" if lo_open else "["
                rng = (f"in {left}{lo}, {hi}]" if hi is not None else
                       (f"> {lo}" if lo_open else f">= {lo}"))
                raise ConfigError(f"{name} must be {rng}, got {value}")

        one_of("method", method_names(),
               "; a method of your own must be registered first with clip_refine_lab.methods.register_method")
        if self.preset is not None:
            one_of("preset", tuple(PRESETS))
        number("alpha", 0, 1)
        number("temperature", 0, lo_open=True)
        one_of("feature_space", FEATURE_SPACES)
        for w in ("rafa_weight", "hycd_weight", "align_weight", "m2_weight"):
            number(w, 0)
        number("m2_beta", 0, lo_open=True)
        one_of("prior", PRIOR_NAMES)
        number("prior_mean")
        number("prior_sigma", 0)
        number("prior_low")
        number("prior_high")
        if self.prior == "uniform" and not self.prior_low < self.prior_high:
            raise ConfigError(f"prior_low must be < prior_high, got {self.prior_low} and {self.prior_high}")
        if self.prior == "fixed" and not self.prior_vector:
            raise ConfigError("prior 'fixed' needs prior_vector (a list of numbers, one per feature dimension)")
        number("lr", 0, lo_open=True, optional=True)
        number("weight_decay", 0)
        one_of("schedule", SCHEDULES)
        number("warmup_steps", 0, integer=True)
        number("adam_beta1", 0, 1)
        number("adam_beta2", 0, 1)
        number("adam_eps", 0, lo_open=True)
        number("grad_clip", 0, lo_open=True, optional=True)
        number("batch_size", 1, integer=True, optional=True)
        number("accum_steps", 1, integer=True)
        if self.batch_size is not None and self.batch_size % self.accum_steps:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by accum_steps ({self.accum_steps})")
        number("epochs", 0, lo_open=True, optional=True)
        number("max_steps", 1, integer=True, optional=True)
        one_of("precision", PRECISIONS)
        one_of("attention", ATTENTIONS)
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("fsdp runs in fp32 or bf16 (fp16 loss scaling of sharded gradients is not supported); "
                              "use precision bf16")
        if self.fsdp and self.compile:
            raise ConfigError("fsdp and compile cannot be combined (compiling towers around sharded blocks is not "
                              "supported); turn one of them off")
        number("seed", 0, integer=True)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith(("cuda", "mps"))):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")
        if self.precision != "fp32" and self.device == "cpu":
            raise ConfigError(f"precision {self.precision} needs a GPU; on CPU use fp32 (bf16 on CPU is ~300x slower here)")
        number("val_fraction", 0, 0.5)
        number("val_every", 1, integer=True, optional=True)
        number("checkpoint_every", 1, integer=True, optional=True)
        one_of("on_bad_sample", BAD_SAMPLE_POLICIES)
        number("num_workers", 0, integer=True)
        if self.leakage_suite is not None and (not isinstance(self.leakage_suite, str) or not self.leakage_suite.strip()):
            raise ConfigError(f"leakage_suite must be the path of a suite YAML file or null, got {self.leakage_suite!r}")
        number("log_every", 1, integer=True)
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ConfigError(f"output_dir must be a folder path, got {self.output_dir!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)
        return self

    def _warn_about_flat_hycd(self) -> None:
        """ConfigWarning for HyCD on normalised features at a temperature that flattens its softmaxes."""
        if (self.feature_space != "normalized" or self.temperature < NORMALIZED_MAX_TEMPERATURE
                or "hycd" not in registered_methods()[self.method].terms):
            return
        # warned when a run is resolved for training, not when a finished run's config is read back
        # for evaluation; one fixed text from one line, so Python's default filter prints it once
        warnings.warn(
            f"feature_space 'normalized' with temperature {self.temperature:g}: on normalised features HyCD's "
            "logits are cosines in [-1, 1], so its softmaxes are nearly uniform and the teacher's similarities "
            "barely shape the target; use a temperature of about 0.01 (1 / CLIP's logit scale of 100), "
            "or feature_space 'raw'", ConfigWarning, stacklevel=2)

    # ------------------------------------------------------------------------------- resolution
    def resolved(self) -> "RunConfig":
        """A validated copy with every preset-dependent ``None`` filled in and a run name."""
        self.validate()
        preset = PRESETS[preset_name(self.preset)]
        cfg = dataclasses.replace(self, preset=preset.name)
        if cfg.model is None:
            cfg.model = preset.model
        if cfg.lr is None:
            cfg.lr = preset.lr
        if cfg.batch_size is None:
            cfg.batch_size = preset.batch_size
            if cfg.batch_size % cfg.accum_steps:
                raise ConfigError(f"batch_size ({cfg.batch_size}, from preset '{preset.name}') must be divisible "
                                  f"by accum_steps ({cfg.accum_steps})")
        if cfg.epochs is None:
            cfg.epochs = preset.epochs
        if cfg.data is None:
            cfg.data = DEFAULT_DATA
        if cfg.pretrained == "embedded" and cfg.model.startswith(("hf-hub:", "local-dir:")):
            cfg.pretrained = None  # such a name carries its own weights: the folder's, not an embedded base
        if cfg.run_name is None:
            cfg.run_name = f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}"
        cfg.validate()
        cfg._warn_about_flat_hycd()
        return cfg

    @property
    def run_dir(self) -> Path:
        if self.run_name is None:
            raise ConfigError("run_name is not set; call resolved() first")
        return Path(self.output_dir) / self.run_name

    # ---------------------------------------------------------------------------------- YAML I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "RunConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{where}: unknown field '{key}'{hint}")
        return cls(**values).validate()

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        return cls.from_dict(values, where=str(path))


# One line of help per option: used by the CLI's --help, the notebooks' parameter help and docs/options.md.
FIELD_HELP: dict[str, str] = {
    "method": f"post-pre-training method: {', '.join(METHOD_NAMES)}, or one added with methods.register_method",
    "preset": "scale preset: default (embedded world, tiny ViT) or micro (seconds; tests/CI); "
              "default: $CLIP_REFINE_LAB_PRESET or 'default'",
    "alpha": "HyCD mixing weight of the one-hot target, in [0, 1] (0 = Self-KD, 1 = contrastive CE)",
    "temperature": "HyCD softmax temperature T (> 0); 1 on raw features as in the released code; about 0.01 "
                   "on normalized features (cosine logits; T >= 0.5 there gives a warning)",
    "feature_space": "features RaFA/HyCD act on: raw (released code) or normalized (paper's text)",
    "rafa_weight": "weight of L_RaFA (lambda_RaFA)",
    "hycd_weight": "weight of L_HyCD (lambda_HyCD)",
    "align_weight": "weight of the L2 alignment term of hycd+l2",
    "m2_weight": "weight w of the m2-mix term (total = L_CLIP + w * L_m2)",
    "m2_beta": "m2-mix: lambda ~ Beta(beta, beta) per batch",
    "prior": f"RaFA prior p(z): {', '.join(PRIOR_NAMES)}",
    "prior_mean": "mean of the normal prior",
    "prior_sigma": "std of the normal prior (0 = no randomness, z = mean)",
    "prior_low": "lower bound of the uniform prior",
    "prior_high": "upper bound of the uniform prior",
    "prior_vector": "the fixed prior's vector (one number per feature dimension)",
    "lr": "AdamW learning rate (paper: 1e-6 for ViT-B/32); default from the preset",
    "weight_decay": "AdamW weight decay (0.1, on all parameters as in the released code)",
    "no_decay_gains": "exclude gains, biases and the logit scale from weight decay (open_clip's rule)",
    "schedule": "learning-rate schedule: constant (paper) or cosine",
    "warmup_steps": "linear warm-up steps (0 = none, as in the paper)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "grad_clip": "clip the gradient norm to this value (default: no clipping)",
    "batch_size": "global batch size (pairs per optimiser step; paper: 512); default from the preset",
    "accum_steps": "split each batch into this many micro-batches (OpenCLIP-style accumulation, exact)",
    "epochs": "epochs over the training pairs (fractions allowed); default from the preset",
    "max_steps": "stop after this many optimiser steps",
    "precision": "fp32 (default; the only choice on CPU), bf16 or fp16 autocast on GPU",
    "attention": "sdpa (default: open_clip's attention blocks run batch-first through scaled_dot_product_attention; "
                 "same parameters and outputs, 1.18x faster training loop on CPU) or native (nn.MultiheadAttention)",
    "compile": "torch.compile the image and text towers (GPU, long runs; compilation costs minutes first)",
    "channels_last": "channels-last memory format for convolutional image towers (default: on GPU, off on CPU; "
                     "RN50 on an H100 took 1.48x more pairs/s with it; no effect on ViTs)",
    "grad_checkpointing": "recompute each transformer block's activations during backward instead of keeping them "
                          "(open_clip's set_grad_checkpointing on both towers of the student): far less activation "
                          "memory for about a third more compute; same gradients",
    "fsdp": "shard the student's weights, gradients and AdamW states (and the frozen teacher) across the torchrun "
            "processes with PyTorch FSDP2, each transformer block then the rest; needs >= 2 processes; same results "
            "as data-parallel, checkpoints stay ordinary full state dicts",
    "seed": "random seed: data order, caption choice, prior samples; CPU runs repeat exactly",
    "device": "auto, cpu, cuda or cuda:N",
    "val_fraction": "fraction of pairs held out for validation / best-checkpoint selection (released code: 0.01)",
    "val_every": "validate every N steps (default: four times per epoch)",
    "checkpoint_every": "write the resumable checkpoint every N steps (default: with each validation)",
    "model": "open_clip architecture (ViT-B-32, ...) or one of ours (tiny-vit-48, ...); default from the preset",
    "pretrained": "pretrained tag (openai, ...), a checkpoint file, 'embedded' (our base model: the preset's) or 'embedded:NAME' (embedded:high-temperature); an hf-hub: or local-dir: model uses its own weights",
    "quick_gelu": "force QuickGELU on/off (default: from the tag or checkpoint; OpenAI weights need it)",
    "data": "training pairs: a manifest YAML or a split of the embedded world (synthetic-coco, synthetic-web)",
    "data_root": "folder that ${CLIP_REFINE_LAB_DATA} in manifests stands for",
    "on_bad_sample": "what to do with unreadable images or empty captions: fail (default) or skip (counted)",
    "num_workers": "data-loading worker processes",
    "teacher_cache": "take teacher features from the feature cache (computed once per teacher and data set, "
                     "reused across epochs and runs; equal to recomputing them)",
    "image_cache": "keep decoded, resized images in a uint8 memory map in the cache (decode JPEGs once per data set)",
    "leakage_suite": "suite YAML (e.g. data_manifests/suites/paper.yaml): at the start of a run, report evaluation images "
                     "whose id is in the training set (leakage.json, log.jsonl); map-style manifests only",
    "output_dir": "folder holding run directories",
    "run_name": "run directory name (default: method, time and seed)",
    "log_every": "write a log line every N steps",
    "extra": "free-form notes recorded with the run (a YAML mapping; not compared on resume)",
}


# ------------------------------------------------------------------------------ options reference
OPTIONS_COMMAND = "python -m clip_refine_lab.config > docs/options.md"


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped (also inside code spans), no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return f"`{value}`"


def _field_default(f: dataclasses.Field) -> str:
    """The default as a user meets it: preset-dependent fields name each preset's value."""
    preset_fields = {pf.name for pf in fields(Preset)} - {"name", "world"}
    if f.name in preset_fields:
        return "from the preset: " + ", ".join(f"{_code(getattr(p, f.name))} ({p.name})" for p in PRESETS.values())
    if f.name == "preset":
        return f"`${PRESET_ENV}`, else `default`"
    if f.name == "data":
        return f"{_code(DEFAULT_DATA)} (when None)"
    if f.name == "run_name":
        return "method, time and seed (when None)"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return _code(value)


def options_markdown() -> str:
    """docs/options.md: every RunConfig field with its CLI flag, type, default and help, then the presets."""
    lines = [
        "# Options",
        "",
        f"<!-- Generated from clip_refine_lab/config.py; do not edit. Regenerate: {OPTIONS_COMMAND} -->",
        "",
        "Every option of a post-pre-training run is a field of `clip_refine_lab.RunConfig`, a flag of",
        "`clip-refine-lab refine` (`--help` lists them) and a parameter of `notebooks/02_refine.ipynb`",
        "(the main ones by name, any other through `-p options '{\"weight_decay\": 0.0}'`). A YAML file of",
        "options (`--config run.yaml`, flags override it) round-trips with `RunConfig.to_yaml` / `from_yaml`.",
        "Boolean flags take `true` or `false`; list flags take several numbers (`--prior-vector 0.5 -1 ...`);",
        "`--extra KEY=VALUE` adds one note (VALUE read as JSON when it parses, e.g. `3` or `[1, 2]`, else as text).",
        "Invalid values are refused with the field named, e.g. `alpha must be in [0, 1], got 1.5`.",
        "",
        "| field | CLI flag | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in fields(RunConfig):
        flag = "`--extra KEY=VALUE` (repeatable)" if f.name == "extra" else _code(f"--{f.name.replace('_', '-')}")
        row = (_code(f.name), flag, _code(f.type), _field_default(f), FIELD_HELP[f.name])
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    preset_fields = [pf.name for pf in fields(Preset) if pf.name != "name"]
    lines += [
        "",
        "## Presets",
        "",
        f"`--preset` (or `${PRESET_ENV}`) fills the fields a run leaves unset:",
        "",
        "| preset | " + " | ".join(preset_fields) + " |",
        "|---|" + "---|" * len(preset_fields),
    ]
    for p in PRESETS.values():
        lines.append(f"| `{p.name}` | " + " | ".join(_code(getattr(p, n)) for n in preset_fields) + " |")
    lines += [
        "",
        "`world` is the embedded synthetic world the preset trains and evaluates on ([embedded-world.md](embedded-world.md)).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown(), end="")
