"""What a run checks before it builds a cache, pre-trains a base or writes ``config.yaml``.

A bad option or a bad record found after ``config.yaml`` is written blocks the corrected command
(the run directory then holds a different configuration), and one found at step 1000 costs the
steps before it; so :func:`check_run` looks at everything it can without loading a model:

* the architecture: known to open_clip (or one of ours), its embedding size against
  ``prior_vector``'s length, and, when the run starts from the embedded base, its image size against
  the embedded world's (the base is pre-trained on the world's images at their own size);
* the training manifest: the data check's schema and record checks and a cached header scan of its
  images (:func:`clip_refine_lab.data.preflight.preflight_manifest`), with ``on_bad_sample``;
* the leakage suite file.

:func:`check_runs` does the same for every run of a sweep (each manifest once) before the first
starts, and checks the sweep's evaluation suites. A split of the embedded world that is not built
yet is not checked: the toolkit writes it itself when the run builds the world.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Sequence

from ..config import PRESETS, ConfigError, RunConfig
from ..data.manifest import ManifestError
from ..data.preflight import check_suite, preflight_manifest
from ..embedded.pretrain import base_recipe, refuse_sigmoid_family
from ..embedded.world import WorldConfig, world_root
from ..models.checkpoints import CHECKPOINT_SUFFIXES, read_checkpoint_meta
from ..models.families import config_family
from ..models.loading import EMBEDDED_TAG, embedded_base, is_embedded, register_tiny_architectures, tiny_architectures
from .sources import is_manifest_path


# --------------------------------------------------------------------------------- the model
def architecture_config(cfg: RunConfig) -> tuple[str, dict | None]:
    """(architecture, its open_clip model config) of a run: the one a checkpoint file records, else
    ``cfg.model``; the config is None for hub and local-directory models and checkpoints that record no
    architecture (known only once loaded)."""
    import open_clip

    arch = str(cfg.model)
    # a checkpoint written by this toolkit names its architecture (load_model also takes one as the model)
    for path in (cfg.pretrained, cfg.model):
        if path and path != EMBEDDED_TAG and Path(path).suffix in CHECKPOINT_SUFFIXES and Path(path).is_file():
            try:
                arch = read_checkpoint_meta(path).get("arch") or arch
            except Exception:  # a damaged checkpoint is reported, with its remedy, when it is loaded
                pass
            break
    if arch.startswith(("hf-hub:", "local-dir:")) or Path(arch).suffix in CHECKPOINT_SUFFIXES:
        return arch, None
    register_tiny_architectures()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"model: unknown architecture '{arch}' ({hint}open_clip.list_models() lists open_clip's; "
                          f"ours are {', '.join(tiny_architectures())})")
    return arch, model_cfg


def image_size_of(model_cfg: dict) -> int | None:
    size = (model_cfg.get("vision_cfg") or {}).get("image_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) if isinstance(size, int) else None


def world_image_size(preset: str) -> int:
    return WorldConfig.preset(PRESETS[preset].world).image_size


def world_is_built(preset: str) -> bool:
    return (world_root(WorldConfig.preset(PRESETS[preset].world)) / "world.json").is_file()


def check_prior_vector(cfg: RunConfig, arch: str, embed_dim: int | None) -> None:
    if cfg.prior != "fixed" or cfg.prior_vector is None:
        return
    bad = [v for v in cfg.prior_vector if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise ConfigError(f"prior_vector must hold finite numbers, got {bad[0]!r}")
    if embed_dim is not None and len(cfg.prior_vector) != embed_dim:
        raise ConfigError(f"prior_vector has {len(cfg.prior_vector)} numbers, but {arch} has {embed_dim}-dimensional "
                          f"features: give {embed_dim} numbers (--prior-vector v1 ... v{embed_dim})")


def check_embedded_image_size(cfg: RunConfig, arch: str, model_cfg: dict) -> None:
    """The embedded base is pre-trained on the world's images as they are: the sizes must agree; and an
    ``embedded:NAME`` base must name a known recipe."""
    if not is_embedded(cfg.pretrained):
        return
    base_recipe(embedded_base(cfg.pretrained), cfg.preset)
    refuse_sigmoid_family(arch)
    size, world = image_size_of(model_cfg), world_image_size(str(cfg.preset))
    if size is None or size == world:
        return
    fits = [a for a in tiny_architectures()
            if image_size_of(_tiny_config(a)) == world and config_family(_tiny_config(a)) == "clip"]
    other = [p for p in PRESETS if world_image_size(p) == size]
    alternatives = [f"--model {fits[0]}" if fits else None, f"--preset {other[0]}" if other else None,
                    "--pretrained with real weights or a checkpoint"]
    raise ConfigError(f"model {arch} takes {size}x{size} images, but the embedded world of preset '{cfg.preset}' has "
                      f"{world}x{world} images, so its embedded base cannot be pre-trained there; use "
                      + " or ".join(a for a in alternatives if a))


def _tiny_config(arch: str) -> dict:
    import open_clip

    register_tiny_architectures()
    return open_clip.get_model_config(arch) or {}


# ---------------------------------------------------------------------------------- the data
def training_manifest(cfg: RunConfig) -> Path | None:
    """The manifest a run trains on; None for a split of an embedded world that is not built yet."""
    from ..embedded.base import world_manifest

    data = str(cfg.data)
    if is_manifest_path(data):
        if not Path(data).is_file():
            raise ConfigError(f"data: manifest file not found: {data}")
        return Path(data)
    if not world_is_built(str(cfg.preset)):
        return None
    return world_manifest(data, cfg.preset)


def check_data(cfg: RunConfig, *, progress: bool = False, seen: set | None = None) -> None:
    path = training_manifest(cfg)
    if path is None:
        return
    key = (str(path.resolve()), cfg.data_root, cfg.on_bad_sample)
    if seen is not None and key in seen:
        return
    preflight_manifest(path, cfg.data_root, kind="captions", on_bad_sample=cfg.on_bad_sample, progress=progress)
    if seen is not None:
        seen.add(key)


# ---------------------------------------------------------------------------------- entry points
def check_run(cfg: RunConfig, *, progress: bool = False, _seen: set | None = None) -> None:
    """Check a resolved run configuration before any work; ConfigError or ManifestError, one line."""
    arch, model_cfg = architecture_config(cfg)
    if model_cfg is not None:
        embed_dim = model_cfg.get("embed_dim")
        check_prior_vector(cfg, arch, int(embed_dim) if isinstance(embed_dim, int) else None)
        check_embedded_image_size(cfg, arch, model_cfg)
    else:
        check_prior_vector(cfg, arch, None)
    if cfg.leakage_suite is not None and not Path(cfg.leakage_suite).is_file():
        raise ConfigError(f"leakage_suite: suite file not found: {cfg.leakage_suite} "
                          "(e.g. data_manifests/suites/paper.yaml)")
    check_data(cfg, progress=progress, seen=_seen)


def check_runs(runs: Sequence[tuple[str, RunConfig]], suites: Sequence[tuple[str | os.PathLike | None, str]] = (),
               *, progress: bool = False) -> None:
    """Check every run of a sweep (``(key, config)``; each manifest once) and every evaluation suite
    (``(suite file or None for the default, preset)``) before the first run starts.

    Raises one ConfigError naming the first run with a problem, the problem, and how many others have one."""
    from ..evaluation.suites import load_suite

    failures: list[tuple[str, str]] = []
    seen: set = set()
    for key, cfg in runs:
        try:
            check_run(cfg.resolved(), progress=progress, _seen=seen)
        except (ConfigError, ManifestError) as e:
            failures.append((f"sweep run {key}", str(e)))
    for suite, preset in dict.fromkeys(suites):
        try:
            if suite is None and not world_is_built(preset):
                continue
            check_suite(load_suite(suite, preset), progress=progress)
        except ConfigError as e:
            if not world_is_built(preset):  # it names splits of a world the sweep builds first
                continue
            failures.append((f"suite {suite or '(default)'}", str(e)))
        except (ManifestError, FileNotFoundError, ValueError) as e:
            failures.append((f"suite {suite or '(default)'}", str(e)))
    if failures:
        what, msg = failures[0]
        more = f" ({len(failures) - 1} more with problems: {', '.join(w for w, _ in failures[1:4])}" \
               f"{', ...' if len(failures) > 4 else ''})" if len(failures) > 1 else ""
        raise ConfigError(f"{what}: {msg}{more}; nothing was run")
