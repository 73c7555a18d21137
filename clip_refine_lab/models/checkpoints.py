"""Checkpoints written by this toolkit: safetensors files that say what model they hold.

The header records the architecture, the QuickGELU flag and the preprocessing (:class:`ModelSpec`), so
``load_model(path)`` needs nothing else, and plain open_clip loads the file as
``create_model_and_transforms(spec.open_clip_name, pretrained=path)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_path

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


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


def save_checkpoint(model: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike, spec: ModelSpec,
                    **extra: str) -> Path:
    """Write ``model``'s state dict (or ``model`` itself, a state dict) as safetensors, atomically, with
    the spec in the header.

    The file loads in plain ``open_clip.create_model_and_transforms(spec.open_clip_name, pretrained=path)``.
    """
    from safetensors.torch import save_file

    import open_clip

    tensors = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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
