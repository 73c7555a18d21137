"""Loading and saving CLIP models: open_clip tags, local checkpoints, our tiny architectures.

Every model goes through open_clip, so a model loaded here is an ordinary open_clip ``CLIP``:

* ``load_model("ViT-B-32", "openai")``: an open_clip architecture and pretrained tag (or
  ``"hf-hub:org/repo"``). Works when the weights are in the local cache; with no network it fails
  in seconds with a message saying how to supply the weights, instead of retrying the hub for ~50 s.
* ``load_model("ViT-B-32", "/path/refined.safetensors")``: a local ``.safetensors``/``.pt``/``.bin``
  checkpoint. Checkpoints written by this toolkit carry their architecture, QuickGELU flag and
  preprocessing in the safetensors header, so ``load_model(path)`` alone works too.
* ``load_model("tiny-vit-48", "embedded")``: one of our tiny architectures (registered with
  open_clip by :func:`register_tiny_architectures`), pre-trained on the embedded synthetic world by
  :func:`clip_refine_lab.pretrain.pretrain_base` (trained on first use, cached afterwards).

QuickGELU: OpenAI-pretrained models use QuickGELU. open_clip only knows that from the pretrained
tag, so a fine-tuned copy reloaded as plain ``ViT-B-32`` silently uses GELU and degrades. We record
``quick_gelu`` in every checkpoint we write and apply it on load; plain open_clip users load our
files as ``ViT-B-32-quickgelu`` (the ``open_clip_name`` recorded in the header).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils import atomic_path

CONFIG_DIR = Path(__file__).parent.parent / "embedded" / "model_configs"
EMBEDDED_TAG = "embedded"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_REGISTERED = False


class ModelNotAvailableError(RuntimeError):
    """The requested weights are not on this machine and cannot be downloaded."""


@dataclass(frozen=True)
class ModelSpec:
    """What a loaded model is: enough to load it again and to record it with a run."""

    arch: str  # open_clip architecture name, e.g. "ViT-B-32" or "tiny-vit-48"
    pretrained: str | None  # tag, "embedded", a file path, or None (random init)
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)  # open_clip PreprocessCfg fields (size, mean, std, ...)

    @property
    def open_clip_name(self) -> str:
        """The name plain open_clip users should pass to load these weights correctly."""
        import open_clip

        if self.quick_gelu and not self.arch.endswith("-quickgelu") and f"{self.arch}-quickgelu" in open_clip.list_models():
            return f"{self.arch}-quickgelu"
        return self.arch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable  # eval-time image transform (the paper uses no augmentation)
    tokenizer: Callable
    spec: ModelSpec

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else 0

    @property
    def image_size(self) -> int:
        """The side of the square images the model takes (its preprocessing's resize)."""
        size = self.spec.preprocess.get("size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)


def register_tiny_architectures() -> None:
    """Make our tiny architectures (``clip_refine_lab/model_configs/*.json``) ordinary open_clip models."""
    global _REGISTERED
    if not _REGISTERED:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _REGISTERED = True


def tiny_architectures() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, spec: ModelSpec, **extra: str) -> Path:
    """Write ``model``'s state dict as safetensors, atomically, with the spec in the header.

    The file loads in plain ``open_clip.create_model_and_transforms(spec.open_clip_name, pretrained=path)``.
    """
    from safetensors.torch import save_file

    import open_clip

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "clip-refine-lab/1",
        "arch": spec.arch,
        "open_clip_name": spec.open_clip_name,
        "quick_gelu": "true" if spec.quick_gelu else "false",
        "pretrained": str(spec.pretrained or ""),
        "preprocess": _json(spec.preprocess),
        "open_clip_version": open_clip.__version__,
        **{k: str(v) for k, v in extra.items()},
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors checkpoint ({} for other files or foreign checkpoints)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# ----------------------------------------------------------------------------------------- loading
def load_model(
    arch: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    world_preset: str | None = None,
) -> LoadedModel:
    """Load (model, preprocess, tokenizer, spec) in eval mode on ``device``.

    ``arch`` may also be a checkpoint path written by this toolkit (architecture read from it).
    ``quick_gelu=None`` takes the flag from the tag or the checkpoint header.
    ``world_preset`` picks the synthetic world for ``pretrained="embedded"`` (default: $CLIP_REFINE_LAB_PRESET).
    """
    import open_clip

    register_tiny_architectures()
    if pretrained is None and Path(arch).suffix in CHECKPOINT_SUFFIXES and Path(arch).is_file():
        pretrained, arch = arch, ""
    if pretrained == EMBEDDED_TAG:
        from ..embedded.pretrain import pretrain_base

        pretrained = str(pretrain_base(arch, world_preset=world_preset))
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


# --------------------------------------------------------------------------------- speed options
def _sdpa_block_class():
    """A subclass of open_clip's ``ResidualAttentionBlock`` whose self-attention calls SDPA batch-first.

    ``nn.MultiheadAttention`` works sequence-first: with open_clip's ``batch_first=True`` it transposes
    its input, splits the packed q/k/v projection through ``unflatten/transpose/contiguous`` and
    ``select`` (whose backward zero-fills and copies a 3x buffer) and transposes back. On CPU those
    copies were about 17% of a tiny-vit-48 training step (benchmarks/RESULTS.md). This path does the
    same arithmetic with the same parameters in one ``view/permute``; forward outputs are equal to
    open_clip's and gradients agree to float summation order (tests/test_models.py).
    """
    global _SDPA_BLOCK
    if _SDPA_BLOCK is not None:
        return _SDPA_BLOCK
    import torch.nn.functional as F
    from open_clip.transformer import ResidualAttentionBlock

    class SdpaResidualAttentionBlock(ResidualAttentionBlock):
        def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
            mha = self.attn
            if k_x is not None or v_x is not None or not mha.batch_first or not mha._qkv_same_embed_dim \
                    or mha.in_proj_weight is None:
                return super().attention(q_x, k_x, v_x, attn_mask)  # cross-attention etc.: open_clip's path
            batch, length, width = q_x.shape
            heads = mha.num_heads
            qkv = F.linear(q_x, mha.in_proj_weight, mha.in_proj_bias)
            q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None  # additive, as open_clip passes it
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=mha.dropout if self.training else 0.0)
            out = out.transpose(1, 2).reshape(batch, length, width)
            return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)

    _SDPA_BLOCK = SdpaResidualAttentionBlock
    return _SDPA_BLOCK


_SDPA_BLOCK = None


def use_sdpa_attention(model: torch.nn.Module) -> int:
    """Switch every open_clip ``ResidualAttentionBlock`` of ``model`` to the SDPA path, in place.

    Only the class of each block changes: parameters, state-dict keys and checkpoints stay the same,
    and ``copy.deepcopy`` copies the switched blocks. Returns the number of blocks switched."""
    from open_clip.transformer import ResidualAttentionBlock

    cls = _sdpa_block_class()
    n = 0
    for module in model.modules():
        if type(module) is ResidualAttentionBlock:
            module.__class__ = cls
            n += 1
    return n


def encode_text_trimmed(model: torch.nn.Module, text: torch.Tensor, buckets: int = 1) -> torch.Tensor:
    """``model.encode_text(text)``, with the padding columns after the batch's longest caption left out.

    ``buckets`` > 1 sorts the rows by caption length and encodes them in that many chunks, each trimmed to
    its own longest caption: the text tower's cost then follows the captions' lengths instead of the batch's
    longest (web alt-text: 13 tokens on average, 26 for the longest of 256). Every row is still encoded on
    its own (attention never mixes rows, layer norm is per token), so the features are the same up to float
    summation order, and the rows come back in their input order.

    open_clip's CLIP text tower runs under a causal mask and pools at the end-of-text token (``argmax``/
    ``eos``) or the first one, so no output it pools depends on a later column: dropping the trailing
    columns that are padding (token 0) in every row gives the same features up to float summation order, at
    the cost of the captions actually present (web alt-text averages 13 of the tiny models' 32 tokens).
    Other text towers (custom/HF text, ``last`` pooling, no causal mask) take the plain ``encode_text``."""
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    used = (text != 0).any(0).nonzero()
    if (type(model) is not CLIP or model.attn_mask is None or getattr(model, "text_pool_type", None)
            not in ("argmax", "eos", "first") or len(used) == 0):
        return model.encode_text(text)
    cast_dtype = model.transformer.get_cast_dtype()

    def encode(tokens: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        n = int((tokens != 0).any(0).nonzero()[-1]) + 1 if tokens.any() else 1
        tokens = tokens[:, :n]
        x = embedded[:, :n].to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
        return x

    n = int(used[-1]) + 1
    text = text[:, :n]
    # One embedding lookup for all rows: its backward writes a dense vocabulary-sized gradient (6.3M floats for
    # the tiny models), so looking up each chunk apart would pay that once per chunk.
    embedded = model.token_embedding(text)
    if buckets <= 1 or len(text) <= 1:
        return encode(text, embedded)
    lengths = (text != 0).cumsum(1).argmax(1)  # index of each row's last token (0 for an empty row)
    order = lengths.argsort(stable=True)
    parts = [encode(text[rows], embedded[rows]) for rows in order.chunk(buckets)]
    return torch.cat(parts)[order.argsort()]


def train_with_frozen_batch_norm(model: torch.nn.Module) -> int:
    """``model.train()``, but every batch-norm layer keeps using (and no longer updates) its running statistics.

    Post-pre-training starts from a converged model and distils from a frozen copy of it: with batch
    statistics in train mode, a ModifiedResNet tower would compute different features than its eval-mode
    teacher from step 0 (Self-KD would not be zero there) and a few thousand pairs would overwrite running
    statistics estimated on the whole pre-training set. The affine weights still train. This is what
    open_clip's ``lock_image_tower(freeze_bn_stats=True)`` does for a locked tower. Returns how many layers
    it froze (0 for the ViTs, which have none).
    """
    model.train()
    frozen = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            frozen += 1
    return frozen


def use_channels_last(model: torch.nn.Module) -> bool:
    """Channels-last memory format for a convolutional image tower (ModifiedResNet, ConvNeXt...).

    cuDNN's convolutions run fastest on NHWC tensors on recent GPUs; a ViT has a single patch
    convolution, so this only pays for conv towers. Returns whether the tower has convolutions."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return False
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    if convs <= 1:
        return False
    visual.to(memory_format=torch.channels_last)
    return True


def compile_towers(model: torch.nn.Module) -> None:
    """``torch.compile`` the image and text towers in place (``nn.Module.compile``: state-dict keys unchanged).

    Worth it on GPU for long runs; the first steps pay the compilation (minutes for ViT-B-32). On a small
    CPU it measured slower than eager (benchmarks/RESULTS.md)."""
    for name in ("visual", "transformer"):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.compile()
