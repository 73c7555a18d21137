"""The explicit entry points to the embedded world and its base model.

Building the world (about half a minute on 2 CPU cores for the default preset) and pre-training a
base (about 8 minutes) are calls the user makes: :func:`ensure_world` and :func:`ensure_base` do the
work when it is not cached yet, after one line saying what starts and about how long it takes
(printed by :func:`~.world.build_world` and :func:`~.pretrain.pretrain_base`), or return at once.
:func:`resolve_pretrained` and :func:`world_manifest` only look things up: they never build or train.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PRESETS, ConfigError, preset_name
from ..models.loading import ModelNotAvailableError, embedded_base, is_embedded
from .pretrain import base_checkpoint_path, pretrain_base
from .world import World, WorldConfig, build_world, world_root


def _world_config(preset: str | None) -> WorldConfig:
    return WorldConfig.preset(PRESETS[preset_name(preset)].world)


def ensure_world(preset: str | None = None, *, progress: bool = True) -> World:
    """The embedded world of ``preset``, built first (and cached) when it is not there yet."""
    return build_world(_world_config(preset), progress=progress)


def base_is_built(arch: str | None = None, *, world_preset: str | None = None, base: str | None = None) -> bool:
    """Whether base ``base`` (default: the preset's) of ``arch`` (default: the preset's model) on
    ``world_preset``'s world is cached."""
    path = base_checkpoint_path(arch, world_preset=world_preset, base=base)
    return path.is_file() and path.with_suffix(".json").is_file()


def ensure_base(arch: str | None = None, *, world_preset: str | None = None, base: str | None = None,
                progress: bool = True) -> Path:
    """The cached base checkpoint of ``arch`` (default: the preset's model) on the embedded world of
    ``world_preset``, pre-trained by the recipe of base ``base`` (a name of
    :data:`~.pretrain.BASE_RECIPES`; default: the preset's): pre-trained first (world built first too)
    when it is not there yet."""
    return pretrain_base(arch, world_preset=world_preset, base=base, progress=progress)


def resolve_pretrained(arch: str, pretrained: str | None, world_preset: str | None = None) -> str | None:
    """``pretrained`` with an embedded tag (``"embedded"``, ``"embedded:NAME"``) replaced by the path of the
    cached base; never trains."""
    if not is_embedded(pretrained):
        return pretrained
    base = embedded_base(pretrained)
    if not base_is_built(arch, world_preset=world_preset, base=base):
        flag, call = (f" --base {base}", f", base='{base}'") if base else ("", "")
        raise ModelNotAvailableError(
            f"the embedded base{f' {base!r}' if base else ''} of '{arch}' (preset '{preset_name(world_preset)}') is "
            f"not built yet: run `clip-refine-lab pretrain --model {arch}{flag}` or "
            f"clip_refine_lab.ensure_base('{arch}'{call}) first")
    return str(base_checkpoint_path(arch, world_preset=world_preset, base=base))


def world_manifest(name: str, preset: str | None = None) -> Path:
    """The manifest of split ``name`` of the built embedded world of ``preset``; never builds."""
    root = world_root(_world_config(preset))
    if not (root / "world.json").is_file():
        raise ConfigError(f"'{name}' names a split of the embedded world, which is not built yet: run "
                          f"`clip-refine-lab world` or clip_refine_lab.embedded.base.ensure_world() first")
    world = World.load(root)
    try:
        return world.manifest(name)
    except KeyError:
        raise ConfigError(f"'{name}' is neither a manifest file nor a split of the embedded world "
                          f"(splits: {', '.join(world.names)})") from None
