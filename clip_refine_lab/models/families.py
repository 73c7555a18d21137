"""Model families: what differs between a CLIP and a SigLIP beyond their weights.

open_clip builds both as ordinary modules, but they differ where post-pre-training looks:

=========  ====================================  =================================================
family     how it is recognised                  its contrastive objective
=========  ====================================  =================================================
``clip``   no ``logit_bias``                     softmax InfoNCE (open_clip ``ClipLoss``)
``siglip`` a learned ``logit_bias`` (config:     pairwise sigmoid loss with the learned scale and
           ``init_logit_bias``)                  bias (open_clip ``SigLipLoss``)
=========  ====================================  =================================================

A learned logit bias is what marks a sigmoid-loss model: open_clip only gives a model one when it is
configured with ``init_logit_bias`` (the SigLIP configs, or ``open_clip_train --siglip``), and only
``SigLipLoss`` uses it. DFN, MetaCLIP and the OpenCLIP ViT-H/G are ``clip``.

SigLIP models are ``CustomTextCLIP`` modules: their text tower is ``model.text`` and there is no
top-level ``text_projection``, so the embedding size comes from the text tower itself
(:func:`embed_dim`). Their real configs tokenise with a Hugging Face tokenizer, which needs the
``transformers`` package (:func:`missing_tokenizer_dependencies`). Both families clamp the learned
logit scale the same way (:func:`clip_refine_lab.optim.clamp_logit_scale` says why).
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import torch

#: The optional dependency group that installs what Hugging Face tokenizers need.
TOKENIZER_EXTRA = "siglip"

_EMBED_DIMS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def model_family(model: torch.nn.Module) -> str:
    """``"siglip"`` for a model with a learned logit bias (trained with the sigmoid loss), else ``"clip"``."""
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


def config_family(model_cfg: dict | None) -> str:
    """The family an open_clip model config builds (``init_logit_bias`` set: ``"siglip"``)."""
    return "siglip" if (model_cfg or {}).get("init_logit_bias") is not None else "clip"


def logit_bias(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The learned logit bias of a sigmoid-loss model, None for a softmax one."""
    return getattr(model, "logit_bias", None) if model_family(model) == "siglip" else None


# ------------------------------------------------------------------------------ embedding size
def embed_dim(model: torch.nn.Module) -> int:
    """The size of the joint embedding: the width of ``encode_text``'s output.

    Read from the text projection when there is one (CLIP's top-level ``text_projection``, or that of
    a ``CustomTextCLIP``'s ``model.text`` tower); any other text tower (Hugging Face encoders, no
    projection) is asked by one forward of a single padding row, done once per model.
    """
    for owner in (model, getattr(model, "text", None)):
        projection = getattr(owner, "text_projection", None)
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        if isinstance(projection, torch.Tensor) and projection.dim() == 2:
            return int(projection.shape[1])
    if model not in _EMBED_DIMS:
        _EMBED_DIMS[model] = _embed_dim_by_forward(model)
    return _EMBED_DIMS[model]


@torch.no_grad()
def _embed_dim_by_forward(model: torch.nn.Module) -> int:
    device = next(model.parameters()).device
    tokens = torch.zeros((1, int(getattr(model, "context_length", 77))), dtype=torch.long, device=device)
    return int(model.encode_text(tokens).shape[-1])


# ----------------------------------------------------------------------------------- tokenizer
def missing_tokenizer_dependencies(arch: str, cache_dir: str | None = None) -> str | None:
    """One line saying what to install when ``arch``'s tokenizer needs packages that are absent, else None.

    open_clip tokenises with its own BPE unless the model's config names a Hugging Face tokenizer
    (``text_cfg.hf_tokenizer_name``: every released SigLIP and SigLIP 2) or a Hugging Face text
    tower (``hf_model_name``), which need ``transformers``; an architecture named ``*siglip*``
    without either takes open_clip's sentencepiece ``SigLipTokenizer``, which also needs
    ``sentencepiece`` and ``protobuf``. ``hf-hub:`` configs are read from the local hub cache
    (downloaded first if the hub is reachable); when no config can be read the check passes and
    open_clip decides.
    """
    model_cfg = _model_config(arch, cache_dir)
    if model_cfg is None:
        return None
    text_cfg = model_cfg.get("text_cfg") or {}
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name"):
        needed = ["transformers"]
    elif not arch.startswith(("hf-hub:", "local-dir:")) and "siglip" in arch.lower():
        needed = ["transformers", "sentencepiece", "google.protobuf"]
    else:
        return None
    missing = [module for module in needed if not _importable(module)]
    if not missing:
        return None
    packages = ", ".join("protobuf" if m == "google.protobuf" else m for m in missing)
    return (f"model '{arch}' tokenises with a Hugging Face tokenizer, which needs {packages}: "
            f"pip install 'clip-refine-lab[{TOKENIZER_EXTRA}]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False


def _model_config(arch: str, cache_dir: str | None) -> dict | None:
    """open_clip's model config of ``arch`` (a name, ``hf-hub:org/repo`` or ``local-dir:PATH``), None if unknown."""
    import open_clip

    if arch.startswith("local-dir:"):
        path = Path(arch[len("local-dir:"):]) / "open_clip_config.json"
        return _read_model_cfg(path) if path.is_file() else None
    if arch.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(arch[len("hf-hub:"):], "open_clip_config.json", cache_dir=cache_dir)
        if isinstance(cached, str) and Path(cached).is_file():
            return _read_model_cfg(Path(cached))
        try:
            return open_clip.get_model_config(arch)
        except Exception:  # offline or no such repository: loading the model says so
            return None
    return open_clip.get_model_config(arch)


def _read_model_cfg(path: Path) -> dict | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_cfg", config) if isinstance(config, dict) else None
