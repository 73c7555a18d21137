"""Loading CLIP models: every way of naming one goes through :func:`load_model`, and gives an open_clip model.

* ``load_model("ViT-B-32", "openai")``: an open_clip architecture and pretrained tag, loaded by open_clip.
  Works when the weights are in the local cache; with no network it fails in seconds with a message
  saying how to supply the weights, instead of retrying the hub for ~50 s.
* ``load_model("ViT-B-32", "/path/weights.pt")``: an architecture and a ``.safetensors``/``.pt``/``.bin``
  state dict (bare, under ``"state_dict"``, ``module.``-prefixed, ...: :func:`.checkpoints.read_state_dict`).
* ``load_model("hf-hub:org/repo")`` / ``load_model("local-dir:/folder")`` (or the folder's path): open_clip's
  folder layout, ``open_clip_config.json`` with the model config and ``open_clip_model.safetensors``.
  With a file as ``pretrained``, the folder gives the architecture and the file the weights (open_clip
  itself ignores ``pretrained`` for these names).
* ``load_model("/path/refined.safetensors")``: a checkpoint written by this toolkit. Its header records
  the model config, QuickGELU flag, preprocessing and tokenizer, so it rebuilds as the model it was saved
  from, whatever form the starting model had.
* ``load_model("tiny-vit-48", path)``: one of our tiny architectures (registered with open_clip by
  :func:`register_tiny_architectures`). Its base pre-trained on the embedded world is a file too:
  :func:`clip_refine_lab.embedded.base.resolve_pretrained` turns the ``"embedded"`` tag into its path;
  ``load_model`` itself never trains, so it refuses the bare tag.

Weights from files and folders load strictly: the model is built without weights, and the state dict
must have exactly its tensors with exactly their shapes, else a :class:`ModelLoadError` names the file,
the first mismatching tensor and the architecture to use. open_clip's own loader would resize position
embeddings silently; the conversions kept are its lossless ones (OpenAI's extra JIT keys, the old
text-tower layout, scalar vs 1-d ``logit_scale``/``logit_bias``, ``position_ids``, MobileCLIP keys).

QuickGELU: OpenAI-pretrained models use QuickGELU. open_clip only knows that from the pretrained
tag, so a fine-tuned copy reloaded as plain ``ViT-B-32`` silently uses GELU and degrades. We record
it in every checkpoint we write and apply it on load; plain open_clip users load our files as
``ViT-B-32-quickgelu`` (the ``open_clip_name`` in the header) or through :func:`export_open_clip_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import families
from ..utils import atomic_write
from .checkpoints import (CHECKPOINT_SUFFIXES, SCHEMA_PREFIXES, ModelLoadError, ModelNotAvailableError, ModelSpec,
                          header_model_cfg, read_checkpoint_meta, read_state_dict, save_checkpoint)

CONFIG_DIR = Path(__file__).parent.parent / "embedded" / "model_configs"
EMBEDDED_TAG = "embedded"  # the preset's default embedded base; "embedded:NAME" names another base recipe
CONFIG_FILE = "open_clip_config.json"  # open_clip's folder layout (hf-hub: and local-dir:)
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                  "model.pth")  # open_clip's order of preference for a folder's weights file
OPENAI_JIT_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI archives' non-weight entries
HUB_PROBE_SECONDS = 60.0
_HUB_PROBE: dict = {"at": -HUB_PROBE_SECONDS - 1, "offline": False}
_REGISTERED = False

__all__ = ["LoadedModel", "ModelLoadError", "ModelNotAvailableError", "load_model", "reload_spec",
           "export_open_clip_dir", "register_tiny_architectures", "tiny_architectures"]


@dataclass
class LoadedModel:
    """A model ready to use: eval-mode model, its image transform and tokenizer, and what it is."""

    model: torch.nn.Module
    preprocess: Callable  # eval-time image transform (the paper uses no augmentation)
    tokenizer: Callable
    spec: ModelSpec

    @property
    def embed_dim(self) -> int:
        return families.embed_dim(self.model)

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes (its preprocessing's resize)."""
        size = self.spec.preprocess.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)


@dataclass(frozen=True)
class Architecture:
    """What builds a model: an open_clip name (``registered``: open_clip builds it by name), or a model
    config read from a folder, the hub cache or a checkpoint header."""

    name: str  # recorded as ModelSpec.arch
    model_cfg: dict
    preprocess: dict  # preprocessing that goes with the config ({} = open_clip's defaults)
    tokenizer: str  # the name open_clip.get_tokenizer takes
    registered: bool = False


def is_embedded(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names an embedded base: ``"embedded"`` or ``"embedded:NAME"``."""
    return pretrained == EMBEDDED_TAG or (isinstance(pretrained, str) and pretrained.startswith(EMBEDDED_TAG + ":"))


def embedded_base(pretrained: str | None) -> str | None:
    """The base recipe an embedded tag names: NAME of ``"embedded:NAME"``; None for ``"embedded"`` (the preset's
    default) and for anything else."""
    if not is_embedded(pretrained):
        return None
    return pretrained.partition(":")[2] or None  # type: ignore[union-attr]


def register_tiny_architectures() -> None:
    """Make our tiny architectures (``clip_refine_lab/embedded/model_configs/*.json``) ordinary open_clip models."""
    global _REGISTERED
    if not _REGISTERED:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _REGISTERED = True


def tiny_architectures() -> list[str]:
    """The names of our tiny architectures."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# ----------------------------------------------------------------------------------------- loading
def load_model(
    arch: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load (model, preprocess, tokenizer, spec) in eval mode on ``device``.

    ``arch`` may also be a checkpoint path written by this toolkit (architecture read from it) or an
    open_clip model folder. ``quick_gelu=None`` takes the flag from the tag or the checkpoint header.
    ``pretrained="embedded"`` is refused: resolve it first (:func:`clip_refine_lab.embedded.base.resolve_pretrained`).
    """
    register_tiny_architectures()
    arch, pretrained = _normalise(arch, pretrained)
    if is_embedded(pretrained):
        raise ModelNotAvailableError(
            f"load_model does not pre-train: resolve pretrained='{EMBEDDED_TAG}' to the cached base with "
            f"clip_refine_lab.embedded.base.resolve_pretrained('{arch}', '{EMBEDDED_TAG}'), or build it with "
            f"clip_refine_lab.embedded.base.ensure_base('{arch}') or `clip-refine-lab pretrain --model {arch}`")
    if pretrained and Path(pretrained).suffix in CHECKPOINT_SUFFIXES and not Path(pretrained).exists():
        raise ModelNotAvailableError(f"checkpoint file not found: {pretrained}")
    if pretrained and Path(pretrained).is_dir():
        raise ModelLoadError(f"{pretrained} is a folder, not a checkpoint file: pass a .safetensors/.pt/.bin file, "
                             f"or the folder as the model (--model local-dir:{pretrained})")
    if pretrained and Path(pretrained).is_file():
        return _load_file(arch, Path(pretrained), None, device, quick_gelu, cache_dir)
    if pretrained:
        return _load_tag(arch, pretrained, device, quick_gelu, cache_dir)
    architecture = resolve_architecture(arch, cache_dir)
    if arch.startswith(SCHEMA_PREFIXES):
        weights = folder_weights(arch, cache_dir)  # pretrained stays None: the folder's own weights
        return _build_and_load(architecture, weights, None, None, device, bool(quick_gelu), architecture.preprocess,
                               cache_dir)
    return _build_and_load(architecture, None, None, None, device, bool(quick_gelu), {}, cache_dir)


def reload_spec(spec: ModelSpec, weights: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``weights`` with the architecture and flags of ``spec`` (e.g. a refined copy of a base model).

    A checkpoint of ours rebuilds from its own header; a header-less file takes the model config that
    ``spec`` recorded (so it does not need the starting model's folder or hub cache any more)."""
    register_tiny_architectures()
    fallback = Architecture(spec.arch, dict(spec.model_cfg), _preprocess_overrides(spec.preprocess),
                            spec.tokenizer or spec.arch) if spec.model_cfg else None
    if not Path(weights).is_file():
        raise ModelNotAvailableError(f"checkpoint file not found: {weights}")
    return _load_file(spec.arch, Path(weights), fallback, device, spec.quick_gelu, None)


def export_open_clip_dir(checkpoint: str | os.PathLike, folder: str | os.PathLike, arch: str | None = None) -> Path:
    """Write ``folder`` in open_clip's layout, so plain open_clip (without this toolkit) loads the weights:

        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:FOLDER")
        tokenizer = open_clip.get_tokenizer("local-dir:FOLDER")

    ``checkpoint`` is one of ours (``arch`` read from it) or any state-dict file with ``arch``. The folder
    gets ``open_clip_config.json`` (model config with QuickGELU, preprocessing), ``open_clip_model.safetensors``
    and, for Hugging Face tokenizers, the tokenizer files."""
    loaded = load_model(arch, str(checkpoint)) if arch else load_model(str(checkpoint))
    folder = Path(folder)
    save_checkpoint(loaded.model, folder / FOLDER_WEIGHTS[0], loaded.spec)
    config = {"model_cfg": loaded.spec.full_model_cfg(),
              "preprocess_cfg": {k: v for k, v in loaded.spec.preprocess.items() if k != "size"}}
    atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    if hasattr(loaded.tokenizer, "save_pretrained"):  # open_clip's HFTokenizer: local-dir: reads it from the folder
        loaded.tokenizer.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------- architectures
def resolve_architecture(name: str, cache_dir: str | None = None) -> Architecture:
    """How to build ``name``: open_clip's registered config, or a folder's / the hub cache's config."""
    import open_clip

    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not folder.is_dir():
            raise ModelNotAvailableError(f"model folder not found: {folder}")
        config = _read_folder_config(folder / CONFIG_FILE, folder)
        return Architecture(name, config["model_cfg"], config.get("preprocess_cfg") or {}, name)
    if name.startswith("hf-hub:"):
        path = _hub_file(name, "open_clip_config.json", cache_dir)
        config = _read_folder_config(Path(path), name)
        return Architecture(name, config["model_cfg"], config.get("preprocess_cfg") or {}, name)
    cfg = open_clip.get_model_config(name)
    if not cfg:
        raise ModelLoadError(f"unknown architecture '{name}'; open_clip knows: {', '.join(open_clip.list_models()[:8])}, "
                             f"... and our tiny ones: {', '.join(tiny_architectures())} (or give a file, an hf-hub: "
                             f"repository or a local-dir: folder)")
    return Architecture(name, cfg, {}, name, registered=True)


def folder_weights(name: str, cache_dir: str | None = None) -> Path:
    """The weights file of an ``hf-hub:`` or ``local-dir:`` model (open_clip's preferred file names)."""
    if name.startswith("hf-hub:"):
        return Path(_hub_file(name, None, cache_dir))
    folder = Path(name[len("local-dir:"):])
    for candidate in FOLDER_WEIGHTS:
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(p.name for s in (".safetensors", ".bin", ".pth", ".pt") for p in folder.glob(f"*{s}"))
    if len(found) == 1:
        return folder / found[0]
    if found:
        raise ModelLoadError(f"{folder} holds several weight files ({', '.join(found)}) and none with open_clip's "
                             f"name ({FOLDER_WEIGHTS[0]}): pass the one to use, --model local-dir:{folder} "
                             f"--pretrained {folder}/{found[0]}")
    raise ModelLoadError(f"{folder} has {CONFIG_FILE} but no weights file: open_clip's layout is {CONFIG_FILE} "
                         f"and {FOLDER_WEIGHTS[0]} (or {FOLDER_WEIGHTS[2]})")


def _read_folder_config(path: Path, where) -> dict:
    if not path.is_file():
        run_hint = (f"; for a run directory pass its weights file, {path.parent / 'model_best.safetensors'}"
                    if (path.parent / "model_best.safetensors").is_file() else "")
        raise ModelLoadError(f"{where} is not an open_clip model folder: it has no {CONFIG_FILE} (open_clip's layout "
                             f"is {CONFIG_FILE} with a model_cfg, and {FOLDER_WEIGHTS[0]}){run_hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelLoadError(f"{path} has no 'model_cfg' (open_clip's {CONFIG_FILE} holds model_cfg and preprocess_cfg)")
    return config


def _normalise(arch: str, pretrained: str | None) -> tuple[str, str | None]:
    """(arch, pretrained) with a lone checkpoint path moved to ``pretrained``, a folder path turned into
    ``local-dir:`` and ``local-dir:`` paths made absolute (so a run's base.json works from any folder)."""
    pretrained = pretrained or None
    if pretrained is None and Path(arch).suffix in CHECKPOINT_SUFFIXES:
        if not Path(arch).is_file():
            raise ModelNotAvailableError(f"checkpoint file not found: {arch}")
        return "", arch
    return _normalise_name(arch), pretrained


def _normalise_name(arch: str) -> str:
    if arch.startswith("local-dir:"):
        return "local-dir:" + str(Path(arch[len("local-dir:"):]).expanduser().resolve())
    if arch and not arch.startswith("hf-hub:") and ("/" in arch or os.sep in arch) and Path(arch).is_dir():
        return "local-dir:" + str(Path(arch).expanduser().resolve())
    return arch


# ----------------------------------------------------------------------------------- three routes
def _load_tag(arch: str, tag: str, device, quick_gelu: bool | None, cache_dir: str | None) -> LoadedModel:
    """An open_clip architecture and pretrained tag: open_clip downloads (or finds cached) and loads it."""
    import open_clip

    if arch.startswith(SCHEMA_PREFIXES):
        raise ModelLoadError(f"'{arch}' carries its own weights, so pretrained '{tag}' (neither a file nor a folder) "
                             "has no meaning: leave it out, or pass a checkpoint file")
    architecture = resolve_architecture(arch, cache_dir)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelNotAvailableError(
            f"'{tag}' is neither a file nor a known pretrained tag of '{arch}' "
            f"(known tags: {', '.join(tags) or 'none'}; our tiny architectures use '{EMBEDDED_TAG}')")
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    if missing := families.missing_tokenizer_dependencies(arch, cache_dir):
        raise ModelNotAvailableError(missing)
    _ensure_weights_reachable(arch, tag, tag_cfg, cache_dir)
    with _hub_offline_if_needed():
        model, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=tag, device=device, force_quick_gelu=quick_gelu, cache_dir=cache_dir,
            weights_only=True, **_image_kwargs(preprocess))
    return _finish(model, transform, architecture, tag, quick_gelu, preprocess, cache_dir)


def _load_file(arch: str, path: Path, fallback: Architecture | None, device, quick_gelu: bool | None,
               cache_dir: str | None) -> LoadedModel:
    """Weights from a file: the architecture from our header when it has one, else from ``arch``."""
    meta = read_checkpoint_meta(path)
    recorded = meta.get("arch", "")
    if recorded:
        if arch and arch not in (recorded, meta.get("open_clip_name")):
            raise ModelLoadError(f"{path} holds a '{recorded}' model, but architecture '{arch}' was requested; "
                                 f"pass '{recorded}' (or leave the architecture out)")
        cfg = header_model_cfg(meta)
        preprocess = json.loads(meta.get("preprocess") or "{}")
        architecture = (Architecture(recorded, cfg, _preprocess_overrides(preprocess), meta.get("tokenizer") or recorded)
                        if cfg else resolve_architecture(recorded, cache_dir))
        quick_gelu = meta.get("quick_gelu") == "true" if quick_gelu is None else quick_gelu
    elif arch:
        architecture = fallback or resolve_architecture(arch, cache_dir)
        preprocess = architecture.preprocess
    else:
        raise ModelLoadError(f"{path} records no architecture; name it, e.g. load_model('ViT-B-32', '{path}')")
    return _build_and_load(architecture, path, str(path), recorded, device, bool(quick_gelu), preprocess, cache_dir)


def _build_and_load(architecture: Architecture, weights: Path | None, pretrained: str | None, recorded: str | None,
                    device, quick_gelu: bool, preprocess: dict, cache_dir: str | None) -> LoadedModel:
    """Build ``architecture`` without weights, then load ``weights`` strictly (None: random init);
    ``pretrained`` is what the spec records, ``recorded`` the architecture a header names."""
    if missing := families.missing_tokenizer_dependencies(architecture.name, cache_dir):
        raise ModelNotAvailableError(missing)  # before building: a SigLIP tokenizer needs transformers
    quick_gelu = quick_gelu or bool(architecture.model_cfg.get("quick_gelu"))  # a -quickgelu config has it built in
    model, transform = _build(architecture, quick_gelu, preprocess, device, cache_dir, random_init=weights is None)
    if weights is not None:
        load_state_dict_strictly(model, read_state_dict(weights), weights, architecture.name, recorded)
    return _finish(model, transform, architecture, pretrained, quick_gelu, preprocess, cache_dir)


def _build(architecture: Architecture, quick_gelu: bool, preprocess: dict, device, cache_dir: str | None, *,
           random_init: bool):
    """(model, eval transform) with open_clip's own construction: by name for registered architectures
    (bit-identical to ``create_model(name)``), else from the config through a temporary ``local-dir:``."""
    import open_clip

    common = dict(device=device, force_quick_gelu=quick_gelu, cache_dir=cache_dir, weights_only=True,
                  **_image_kwargs(preprocess))
    if not random_init:  # the checkpoint has every tensor: no download of base text-tower weights
        common["pretrained_text"] = False
    with _hub_offline_if_needed(), (contextlib.nullcontext() if random_init else no_random_init_warning()):
        if architecture.registered:
            model, _, transform = open_clip.create_model_and_transforms(architecture.name, pretrained=None, **common)
        else:
            with tempfile.TemporaryDirectory(prefix="crl-model-cfg-") as tmp:
                config = {"model_cfg": architecture.model_cfg,
                          "preprocess_cfg": {k: v for k, v in preprocess.items() if k != "size"}}
                Path(tmp, CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
                try:
                    model, _, transform = open_clip.create_model_and_transforms(
                        f"local-dir:{tmp}", load_weights=False, **common)
                except (TypeError, KeyError, ValueError, AssertionError) as e:  # a config open_clip cannot build
                    raise ModelLoadError(f"open_clip cannot build the model config of '{architecture.name}' "
                                         f"({type(e).__name__}: {e})") from None
    return model, transform


def _finish(model, transform, architecture: Architecture, pretrained: str | None, quick_gelu: bool, preprocess: dict,
            cache_dir: str | None) -> LoadedModel:
    model.eval()
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    model_cfg = dict(architecture.model_cfg)
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    spec = ModelSpec(architecture.name, pretrained, quick_gelu,
                     {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}, **preprocess},
                     model_cfg, architecture.tokenizer)
    return LoadedModel(model, transform, _tokenizer(architecture, cache_dir), spec)


def _tokenizer(architecture: Architecture, cache_dir: str | None):
    """open_clip's tokenizer for the model: by name for registered architectures and Hugging Face / SigLIP
    tokenizers (their files come from the hub cache or the folder), else from the config's text settings."""
    import open_clip
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH

    text = architecture.model_cfg.get("text_cfg", {})
    name = architecture.tokenizer
    named = text.get("hf_tokenizer_name") or (not name.startswith(SCHEMA_PREFIXES) and "siglip" in name.lower())
    if architecture.registered or named:
        try:
            with _hub_offline_if_needed():
                return open_clip.get_tokenizer(name, cache_dir=cache_dir)
        except OSError as e:
            raise ModelNotAvailableError(f"the tokenizer of '{architecture.name}' ({name}) is not available: {e}") from None
    return open_clip.SimpleTokenizer(context_length=text.get("context_length") or DEFAULT_CONTEXT_LENGTH,
                                     **text.get("tokenizer_kwargs", {}))


def _image_kwargs(preprocess: dict) -> dict:
    kwargs = {}
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
        if ours in preprocess:
            kwargs[theirs] = tuple(preprocess[ours]) if isinstance(preprocess[ours], list) else preprocess[ours]
    return kwargs


def _preprocess_overrides(preprocess: dict) -> dict:
    return {k: v for k, v in preprocess.items() if k != "size"}


class no_random_init_warning(logging.Filter):
    """Drop open_clip's "initialized randomly" warnings while building a model whose weights load next, or
    one that is meant to start from random weights (pre-training the embedded base)."""

    MESSAGES = ("No pretrained weights loaded", "Local config loaded, but no CLIP weights")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.MESSAGES)

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)
        return False


# ------------------------------------------------------------------------------- strict loading
def load_state_dict_strictly(model: torch.nn.Module, state: dict[str, torch.Tensor], source, arch: str,
                             recorded: str | None = None) -> None:
    """Load ``state`` into ``model``: every tensor present with its exact shape, nothing extra, else
    ModelLoadError naming ``source``, the first mismatching tensor and the architecture to use."""
    state = convert_state_dict(model, state)
    expected = model.state_dict()
    hint = (f"; the file records architecture '{recorded}': load it with --model {recorded} (or load_model(path) alone)"
            if recorded else "; pass the architecture the weights were saved from (--model NAME)")
    for name, tensor in expected.items():
        if name not in state:
            raise ModelLoadError(f"{source} does not fit the '{arch}' model: it lacks tensor '{name}' "
                                 f"(model shape {tuple(tensor.shape)}){hint}")
        if state[name].shape != tensor.shape:
            raise ModelLoadError(f"{source} does not fit the '{arch}' model: tensor '{name}' has shape "
                                 f"{tuple(state[name].shape)} in the file but {tuple(tensor.shape)} in the model{hint}")
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ModelLoadError(f"{source} does not fit the '{arch}' model: it has tensor '{extra[0]}'{more}, which the "
                             f"model lacks{hint}")
    model.load_state_dict(state, strict=True)


def convert_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's lossless conversions of a state dict to ``model``'s layout (its ``load_checkpoint``
    without the position-embedding resizing, which would hide a wrong architecture)."""
    from open_clip.convert import convert_state_dict as convert_third_party
    from open_clip.model import convert_to_custom_text_state_dict

    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k in OPENAI_JIT_KEYS and k not in expected)}
    state = convert_third_party(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):  # a scalar vs a 1-element parameter
        if key in state and key in expected and state[key].ndim != expected[key].ndim \
                and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    if "logit_bias" in expected and "logit_bias" not in state and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(expected["logit_bias"])  # a CLIP checkpoint into a SigLIP model
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by transformers >= 4.31
    if position_ids in state and position_ids not in expected:
        del state[position_ids]
    return state


# ------------------------------------------------------------------------------- offline handling
def hub_is_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub cannot be reached within 3 seconds (the answer is
    kept for a minute: one load asks several times)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    now = time.monotonic()
    if now - _HUB_PROBE["at"] > HUB_PROBE_SECONDS:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=3):
                _HUB_PROBE["offline"] = False
        except OSError:
            _HUB_PROBE["offline"] = True
        _HUB_PROBE["at"] = now
    return bool(_HUB_PROBE["offline"])


class _hub_offline_if_needed:
    """Put huggingface_hub in offline mode for a call when there is no network (cached files still load)."""

    def __enter__(self):
        import huggingface_hub.constants as hc

        self.previous = hc.HF_HUB_OFFLINE
        if not self.previous and hub_is_offline():
            hc.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc):
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = self.previous
        return False


def _hub_file(name: str, filename: str | None, cache_dir: str | None) -> str:
    """A file of an ``hf-hub:`` repository (None: its weights, safetensors first) from the cache or the hub."""
    from open_clip.pretrained import download_pretrained_from_hf

    repo = name[len("hf-hub:"):]
    try:
        with _hub_offline_if_needed():
            return download_pretrained_from_hf(repo, filename=filename, cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub raises many types (offline, missing entry, missing repo)
        import huggingface_hub.constants as hc

        what = filename or "weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)"
        raise ModelNotAvailableError(
            f"'{name}': its {what} is not in the Hugging Face cache ({cache_dir or hc.HF_HUB_CACHE}) and could not "
            f"be downloaded ({type(e).__name__}); copy the hub cache from a machine with network (or set HF_HOME), "
            f"or copy the repository as a folder and use --model local-dir:PATH") from None


def _weights_cached(tag_cfg: dict | None, hf_id: str | None, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    candidates: list[tuple[str, str]] = []
    if hf_id:
        candidates += [(hf_id, "open_clip_model.safetensors"), (hf_id, "open_clip_pytorch_model.bin")]
    if tag_cfg:
        if tag_cfg.get("file"):
            return Path(tag_cfg["file"]).is_file()
        hub = tag_cfg.get("hf_hub", "")
        if hub:
            repo, filename = os.path.split(hub)
            filename = filename or "open_clip_pytorch_model.bin"
            names = [filename]
            if filename.endswith((".bin", ".pth")):
                names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
            if filename == "open_clip_pytorch_model.bin":
                names.insert(0, "open_clip_model.safetensors")
            candidates += [(repo, n) for n in names]
        url = tag_cfg.get("url", "")
        if url:
            root = cache_dir or os.path.expanduser("~/.cache/clip")
            if Path(root, os.path.basename(url)).is_file():
                return True
    for repo, filename in candidates:
        try:
            hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        except Exception:
            hit = None
        if isinstance(hit, str) and Path(hit).is_file():
            return True
    return False


def _ensure_weights_reachable(arch: str, tag: str | None, tag_cfg: dict | None, cache_dir: str | None) -> None:
    hf_id = arch[len("hf-hub:"):] if arch.startswith("hf-hub:") else None
    if _weights_cached(tag_cfg, hf_id, cache_dir) or not hub_is_offline():
        return
    what = f"'{arch}'" + (f" with pretrained tag '{tag}'" if tag else "")
    raise ModelNotAvailableError(
        f"the weights of {what} are not in the local cache and there is no network "
        f"(HF_HUB_OFFLINE is set or the hub is unreachable). Supply them by either\n"
        f"  * copying the hub cache from a machine with network (~/.cache/huggingface/hub, or set HF_HOME), or\n"
        f"  * downloading the checkpoint file yourself and passing its path: "
        f"--model {arch.removeprefix('hf-hub:')} --pretrained /path/to/open_clip_model.safetensors "
        f"(add --quick-gelu for OpenAI weights)."
    )
