"""Loading and saving CLIP models: open_clip tags, local checkpoints, our tiny architectures.

Every model goes through open_clip, so a model loaded here is an ordinary open_clip ``CLIP``:

* ``load_model("ViT-B-32", "openai")``: an open_clip architecture and pretrained tag (or
  ``"hf-hub:org/repo"``). Works when the weights are in the local cache; with no network it fails
  in seconds with a message saying how to supply the weights, instead of retrying the hub for ~50 s.
* ``load_model("ViT-B-32", "/path/refined.safetensors")``: a local ``.safetensors``/``.pt``/``.bin``
  checkpoint. Checkpoints written by this toolkit carry their architecture, QuickGELU flag and
  preprocessing in the safetensors header, so ``load_model(path)`` alone works too.
* ``load_model("tiny-vit-48", path)``: one of our tiny architectures (registered with open_clip by
  :func:`register_tiny_architectures`). Its base pre-trained on the embedded world is a file too:
  :func:`clip_refine_lab.embedded.base.resolve_pretrained` turns the ``"embedded"`` tag into its path
  (``ensure_base`` builds it first); ``load_model`` itself never trains, so it refuses the bare tag.

QuickGELU: OpenAI-pretrained models use QuickGELU. open_clip only knows that from the pretrained
tag, so a fine-tuned copy reloaded as plain ``ViT-B-32`` silently uses GELU and degrades. We record
``quick_gelu`` in every checkpoint we write and apply it on load; plain open_clip users load our
files as ``ViT-B-32-quickgelu`` (the ``open_clip_name`` recorded in the header).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import families
from .checkpoints import CHECKPOINT_SUFFIXES, ModelSpec, read_checkpoint_meta

CONFIG_DIR = Path(__file__).parent.parent / "embedded" / "model_configs"
EMBEDDED_TAG = "embedded"
_REGISTERED = False


class ModelNotAvailableError(RuntimeError):
    """The requested weights are not on this machine and cannot be downloaded."""


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

    ``arch`` may also be a checkpoint path written by this toolkit (architecture read from it).
    ``quick_gelu=None`` takes the flag from the tag or the checkpoint header.
    ``pretrained="embedded"`` is refused: resolve it first (:func:`clip_refine_lab.embedded.base.resolve_pretrained`).
    """
    import open_clip

    register_tiny_architectures()
    if pretrained is None and Path(arch).suffix in CHECKPOINT_SUFFIXES and Path(arch).is_file():
        pretrained, arch = arch, ""
    if pretrained == EMBEDDED_TAG:
        raise ModelNotAvailableError(
            f"load_model does not pre-train: resolve pretrained='{EMBEDDED_TAG}' to the cached base with "
            f"clip_refine_lab.embedded.base.resolve_pretrained('{arch}', '{EMBEDDED_TAG}'), or build it with "
            f"clip_refine_lab.embedded.base.ensure_base('{arch}') or `clip-refine-lab pretrain --model {arch}`")
    preprocess_cfg: dict = {}
    tag_cfg = None
    if pretrained and Path(pretrained).suffix in CHECKPOINT_SUFFIXES and not Path(pretrained).exists():
        raise ModelNotAvailableError(f"checkpoint file not found: {pretrained}")
    if pretrained and Path(pretrained).is_file():
        meta = read_checkpoint_meta(pretrained)
        if meta.get("arch"):
            if arch and arch not in (meta["arch"], meta.get("open_clip_name")):
                raise ValueError(
                    f"{pretrained} holds a '{meta['arch']}' model, but architecture '{arch}' was requested; "
                    f"pass '{meta['arch']}' (or leave the architecture out)"
                )
            arch = meta["arch"]
            if quick_gelu is None:
                quick_gelu = meta.get("quick_gelu") == "true"
            preprocess_cfg = json.loads(meta.get("preprocess") or "{}")
        elif not arch:
            raise ValueError(f"{pretrained} records no architecture; name it, e.g. load_model('ViT-B-32', '{pretrained}')")
    elif pretrained and not arch.startswith("hf-hub:"):
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ModelNotAvailableError(
                f"'{pretrained}' is neither a file nor a known pretrained tag of '{arch}' "
                f"(known tags: {', '.join(tags) or 'none'}; our tiny architectures use '{EMBEDDED_TAG}')"
            )
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        preprocess_cfg = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        _ensure_weights_reachable(arch, pretrained, tag_cfg, cache_dir)
    elif arch.startswith("hf-hub:"):
        _ensure_weights_reachable(arch, None, None, cache_dir)
    if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"unknown architecture '{arch}'; open_clip knows: {', '.join(open_clip.list_models()[:8])}, ... "
                         f"and our tiny ones: {', '.join(tiny_architectures())}")
    quick_gelu = bool(quick_gelu)
    kwargs = {}
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
        if ours in preprocess_cfg:
            kwargs[theirs] = tuple(preprocess_cfg[ours]) if isinstance(preprocess_cfg[ours], list) else preprocess_cfg[ours]
    if missing := families.missing_tokenizer_dependencies(arch, cache_dir):
        raise ModelNotAvailableError(missing)
    with _hub_offline_if_needed():
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu, cache_dir=cache_dir,
            weights_only=True, **kwargs,
        )
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=cache_dir)
    model.eval()
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    spec = ModelSpec(arch, pretrained, quick_gelu, {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()},
                                                    **preprocess_cfg})
    return LoadedModel(model, preprocess, tokenizer, spec)


def reload_spec(spec: ModelSpec, weights: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``weights`` with the architecture and flags of ``spec`` (e.g. a refined copy of a base model)."""
    return load_model(spec.arch, str(weights), device=device, quick_gelu=spec.quick_gelu)


# ------------------------------------------------------------------------------- offline handling
def hub_is_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub cannot be reached within 3 seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return False
    except OSError:
        return True


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
